//! simile-rerank: not implemented yet (issue #7).
use clap::Parser;

/// simile-rerank (not implemented yet: issue #7).
#[derive(Parser)]
#[command(name = "simile-rerank", version)]
struct Args {}

fn main() {
    let _ = Args::parse();
    simile::cli::not_yet("rerank", 7)
}
