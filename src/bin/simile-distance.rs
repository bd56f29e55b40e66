//! simile-distance: exact k-nearest neighbours of every query among the gallery rows.
use clap::{Args, Parser, Subcommand};
use simile::dataset::Split;
use simile::device::{self, DeviceArg};
use simile::knn::stage::{self, Inputs, Options, ShardKind};
use simile::knn::{merge, Backend, Compute, Engine, Metric};
use simile::shard::ShardSpec;
use std::path::PathBuf;

const EXAMPLES: &str = "\
Examples:
  # The validation split's queries against its gallery (self and same-sequence rows excluded)
  simile-distance --dataset dataset.parquet --embeddings emb.npy --out neighbors.parquet

  # Cosine distance, 10 neighbours, on a GPU
  simile-distance --dataset dataset.parquet --embeddings emb.npy --out nn.parquet \\
      --metric cosine --top-k 10 --device cuda

  # An unlabeled inference set against a labelled gallery (two-sided form)
  simile-distance --query-dataset new.parquet --query-embeddings new.npy \\
      --gallery-dataset catalog.parquet --gallery-embeddings catalog.npy --out nn.parquet

  # Fan out over 4 machines by gallery slices, then join the parts
  simile-distance --dataset d.parquet --embeddings e.npy --out nn.parquet --gallery-shard 0/4
  simile-distance merge --out nn.parquet --query-shard 1/2   # queries 1/2 of the 4 parts
  simile-distance merge --out nn.parquet --query-parts       # joins nn.qpart-*-of-2
  ...
  simile-distance merge --out nn.parquet     # finds nn.part-*-of-4.parquet beside it

Embedding rows map to dataset ids through <stem>.ids.npy beside the .npy (simile-embed writes
it); without one, the .npy must have the rows of --split, in id order, or of the whole dataset.
Output columns: query_id, rank (from 1), gallery_id, distance; see schemas/neighbors.md.";

#[derive(Parser)]
#[command(
    name = "simile-distance",
    version,
    about = "Exact k-nearest-neighbour search over memory-mapped embeddings",
    after_help = EXAMPLES,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    search: SearchArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Join shard parts into the complete result (identical to an unsharded run).
    Merge {
        /// The complete output; its parts are <stem>.part-<i>-of-<n>.parquet.
        #[arg(long)]
        out: PathBuf,
        /// The parts; found beside --out when none are given.
        parts: Vec<PathBuf>,
        /// Merge only query range I/N of the gallery-shard parts, into
        /// <stem>.qpart-<i>-of-<n>.parquet (one merge per range, in parallel: the queries are
        /// read from the dataset the parts were made from); auto/N as --query-shard.
        #[arg(long, value_name = "I/N", conflicts_with = "query_parts")]
        query_shard: Option<ShardSpec>,
        /// Join the query-range parts <stem>.qpart-<i>-of-<n>.parquet into --out.
        #[arg(long)]
        query_parts: bool,
        #[command(flatten)]
        force: simile::cli::ForceArg,
    },
}

#[derive(Args)]
struct SearchArgs {
    /// The dataset (one-dataset form): queries are --split's is_query rows, the gallery its
    /// is_gallery rows.
    #[arg(long, value_name = "PARQUET")]
    dataset: Option<PathBuf>,
    /// Embeddings of --dataset: float32 or float16 .npy [rows, dim].
    #[arg(long, value_name = "NPY")]
    embeddings: Option<PathBuf>,
    /// The split searched (one-dataset form).
    #[arg(long, default_value = "validation")]
    split: Split,
    /// Two-sided form: the queries' dataset (all its rows, or --query-split's).
    #[arg(long, value_name = "PARQUET")]
    query_dataset: Option<PathBuf>,
    /// Two-sided form: embeddings of --query-dataset.
    #[arg(long, value_name = "NPY")]
    query_embeddings: Option<PathBuf>,
    /// Two-sided form: only this split's rows of --query-dataset.
    #[arg(long, value_name = "SPLIT")]
    query_split: Option<Split>,
    /// Two-sided form: the gallery's dataset (all its rows, or --gallery-split's).
    #[arg(long, value_name = "PARQUET")]
    gallery_dataset: Option<PathBuf>,
    /// Two-sided form: embeddings of --gallery-dataset.
    #[arg(long, value_name = "NPY")]
    gallery_embeddings: Option<PathBuf>,
    /// Two-sided form: only this split's rows of --gallery-dataset.
    #[arg(long, value_name = "SPLIT")]
    gallery_split: Option<Split>,
    /// The neighbours table to write (a shard writes <stem>.part-<i>-of-<n>.parquet).
    #[arg(long, value_name = "PARQUET")]
    out: Option<PathBuf>,
    /// Neighbours per query (fewer when fewer gallery rows are eligible; ranks are int32).
    #[arg(short = 'k', long, default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=i32::MAX as i64))]
    top_k: u32,
    /// l2 (Euclidean, OML's), cosine (1 - cosine similarity) or dot (negative inner product).
    #[arg(long, default_value = "l2")]
    metric: Metric,
    #[command(flatten)]
    dev: simile::cli::DeviceArgs,
    /// auto (torch on CUDA, native on the CPU), native (simile's CPU kernels) or torch.
    #[arg(long, default_value = "auto")]
    backend: Backend,
    /// fp32: exact. bf16: candidates from bf16 products, a margin re-scored exactly
    /// (approximate at the margin; faster where the hardware has bf16).
    #[arg(long, default_value = "fp32")]
    compute: Compute,
    /// Compute part i of n of the queries (0-based); auto/N takes i from JOB_COMPLETION_INDEX
    /// (a Kubernetes Indexed Job).
    #[arg(long, value_name = "I/N", conflicts_with = "gallery_shard")]
    query_shard: Option<ShardSpec>,
    /// Compute part i of n of the gallery (0-based; auto/N as --query-shard); parts merge per
    /// query.
    #[arg(long, value_name = "I/N")]
    gallery_shard: Option<ShardSpec>,
    /// Memory for one chunk of queries' rows and candidates, in MiB (more: fewer gallery passes).
    #[arg(long, default_value_t = 192, hide = true)]
    chunk_mib: usize,
    #[command(flatten)]
    force: simile::cli::ForceArg,
}

fn main() {
    simile::cli::run(|| {
        let cli = simile::cli::parse::<Cli>();
        if let Some(Cmd::Merge {
            out,
            parts,
            query_shard,
            query_parts,
            force,
        }) = cli.cmd
        {
            force.apply();
            let what = match (query_shard, query_parts) {
                (Some(q), _) => merge::What::QueryRange(q),
                (None, true) => merge::What::QueryParts,
                (None, false) => merge::What::Parts,
            };
            let s = merge::merge_what(&out, &parts, what)?;
            eprintln!("{s}");
            return Ok(());
        }
        let a = cli.search;
        a.force.apply();
        let inputs = inputs(&a)?;
        let out = a
            .out
            .clone()
            .ok_or_else(|| simile::cli::user_error("--out is required"))?;
        a.dev.start(false);
        // The native kernels are CPU code: with them, `auto` means the CPU.
        let dev = match (a.backend, a.dev.device) {
            (Backend::Native, DeviceArg::Auto) => tch::Device::Cpu,
            (_, d) => device::resolve(d)?,
        };
        let engine = Engine::resolve(a.backend, dev)?;
        let shard = match (a.query_shard, a.gallery_shard) {
            (Some(s), _) => Some((ShardKind::Query, s)),
            (_, Some(s)) => Some((ShardKind::Gallery, s)),
            _ => None,
        };
        let s = stage::run(&Options {
            inputs,
            out,
            k: a.top_k as usize,
            metric: a.metric,
            compute: a.compute,
            engine,
            shard,
            memory_budget: a.chunk_mib << 20,
        })?;
        eprintln!("{s}");
        Ok(())
    })
}

fn inputs(a: &SearchArgs) -> anyhow::Result<Inputs> {
    let two = [
        &a.query_dataset,
        &a.query_embeddings,
        &a.gallery_dataset,
        &a.gallery_embeddings,
    ];
    let any_two = two.iter().any(|p| p.is_some());
    match (&a.dataset, &a.embeddings, any_two) {
        (Some(d), Some(e), false) => Ok(Inputs::One {
            dataset: d.clone(),
            embeddings: e.clone(),
            split: a.split,
        }),
        (None, None, true) => {
            let need = |p: &Option<PathBuf>, flag: &str| {
                p.clone().ok_or_else(|| {
                    simile::cli::user_error(format!(
                        "the two-sided form needs --query-dataset, --query-embeddings, --gallery-dataset and --gallery-embeddings; {flag} is missing"
                    ))
                })
            };
            Ok(Inputs::Two {
                query_dataset: need(&a.query_dataset, "--query-dataset")?,
                query_embeddings: need(&a.query_embeddings, "--query-embeddings")?,
                query_split: a.query_split,
                gallery_dataset: need(&a.gallery_dataset, "--gallery-dataset")?,
                gallery_embeddings: need(&a.gallery_embeddings, "--gallery-embeddings")?,
                gallery_split: a.gallery_split,
            })
        }
        (Some(_), Some(_), true) => Err(simile::cli::user_error(
            "give either --dataset/--embeddings or the two-sided --query-*/--gallery-* flags, not both",
        )),
        _ => Err(simile::cli::user_error(
            "give --dataset and --embeddings (or the two-sided --query-dataset, --query-embeddings, --gallery-dataset, --gallery-embeddings)",
        )),
    }
}
