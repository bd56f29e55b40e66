//! simile-rerank: re-ranks or post-processes a neighbours table (query expansion, database-side
//! augmentation, k-reciprocal re-ranking, OML's pairwise re-ranker, thresholding).
use clap::{Parser, ValueEnum};
use simile::device;
use simile::knn::{Backend, Engine};
use simile::rerank::kreciprocal::Params;
use simile::rerank::stage::{self, Method, Options};
use std::path::PathBuf;

const EXAMPLES: &str = "\
Examples:
  # k-reciprocal re-ranking (needs the embeddings the neighbours came from)
  simile-rerank --dataset dataset.parquet --neighbors neighbors.parquet --out reranked.parquet \\
      --method k-reciprocal --embeddings emb.npy
  simile-score --dataset dataset.parquet --neighbors reranked.parquet --out metrics.json

  # Alpha-weighted query expansion over each query's top 3, alpha 3
  simile-rerank --dataset d.parquet --neighbors nn.parquet --out qe.parquet \\
      --method alpha-qe --qe-k 3 --alpha 3 --embeddings emb.npy

  # Database-side augmentation, then query expansion against the augmented gallery
  simile-rerank --dataset d.parquet --neighbors nn.parquet --out dba.parquet \\
      --method dba --dba-k 2 --dba-qe --embeddings emb.npy

  # OML's thresholding: keep distance < 0.8, or cut at the first gap > 3 average gaps
  simile-rerank --dataset d.parquet --neighbors nn.parquet --out th.parquet \\
      --method threshold --threshold 0.8
  simile-rerank --dataset d.parquet --neighbors nn.parquet --out th.parquet \\
      --method threshold --n-std 3

  # OML's pairwise re-ranker on the first 5 neighbours (a model of kind pairwise)
  simile-rerank --dataset d.parquet --neighbors nn.parquet --out pw.parquet \\
      --method pairwise --model pairwise_model/ --top-n 5

Defaults (the literature's; Font-ID measurements in docs/rerank.md): aqe --qe-k 2; alpha-qe --qe-k 2 --alpha 3;
dba --dba-k 2 (plain average; --alpha weights it); k-reciprocal --k1 20 --k2 6 --lambda 0.3.
The output has the neighbours schema (schemas/neighbors.md), ranks renumbered from 1, and
simile.rerank.* metadata naming the method, its parameters and its inputs.";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum MethodArg {
    Aqe,
    AlphaQe,
    Dba,
    KReciprocal,
    Pairwise,
    Threshold,
}

#[derive(Parser)]
#[command(
    name = "simile-rerank",
    version,
    about = "Re-rank a neighbours table: query expansion, DBA, k-reciprocal, pairwise model, thresholding",
    after_help = EXAMPLES
)]
struct Args {
    /// The dataset the neighbours were computed from.
    #[arg(long, value_name = "PARQUET")]
    dataset: PathBuf,
    /// The neighbours table (simile-distance's output, or another rerank's).
    #[arg(long, value_name = "PARQUET")]
    neighbors: PathBuf,
    /// The re-ranked neighbours table to write.
    #[arg(long, value_name = "PARQUET")]
    out: PathBuf,
    /// aqe, alpha-qe, dba, k-reciprocal, pairwise or threshold.
    #[arg(long, value_enum)]
    method: MethodArg,
    /// The embeddings the neighbours were computed from (aqe, alpha-qe, dba, k-reciprocal).
    #[arg(long, value_name = "NPY")]
    embeddings: Option<PathBuf>,
    /// Neighbours kept per query (aqe, alpha-qe, dba, k-reciprocal; default: the input's k).
    #[arg(short = 'k', long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=i32::MAX as u64))]
    top_k: Option<usize>,
    /// Query expansion: top neighbours combined with the query (default 2).
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=i32::MAX as u64))]
    qe_k: Option<usize>,
    /// Weight exponent: neighbours weigh max(0, cos)^alpha (alpha-qe default 3; dba default 0,
    /// a plain average; --dba-qe's query expansion uses it too).
    #[arg(long)]
    alpha: Option<f64>,
    /// DBA: each gallery vector combined with its own top neighbours (default 2).
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=i32::MAX as u64))]
    dba_k: Option<usize>,
    /// DBA: also expand the queries against the augmented gallery (--qe-k, --alpha).
    #[arg(long)]
    dba_qe: bool,
    /// k-reciprocal: k1, the reciprocal-neighbour depth (default 20).
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=i32::MAX as u64))]
    k1: Option<usize>,
    /// k-reciprocal: k2, the local query expansion depth (default 6).
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=i32::MAX as u64))]
    k2: Option<usize>,
    /// k-reciprocal: weight of the original distance in the final one (default 0.3).
    #[arg(long)]
    lambda: Option<f64>,
    /// threshold (constant): keep neighbours with distance < this.
    #[arg(long, conflicts_with = "n_std")]
    threshold: Option<f32>,
    /// threshold (adaptive): cut each list at its first gap > n_std x the average gap.
    #[arg(long)]
    n_std: Option<f64>,
    /// pairwise: the model folder (kind pairwise).
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// pairwise: how many of each list's first neighbours the model re-scores.
    #[arg(long)]
    top_n: Option<usize>,
    /// pairwise: pairs per model batch.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    // --device: where the pairwise model and the re-searches run.
    #[command(flatten)]
    dev: simile::cli::DeviceArgs,
    #[command(flatten)]
    force: simile::cli::ForceArg,
}

fn main() {
    simile::cli::run(|| {
        let a = simile::cli::parse::<Args>();
        a.force.apply();
        a.dev.start(false);
        let method = method(&a)?;
        let needs_device =
            matches!(method, Method::Pairwise { .. }) || !matches!(a.method, MethodArg::Threshold);
        let dev = if needs_device {
            device::resolve(a.dev.device)?
        } else {
            tch::Device::Cpu
        };
        let method = match method {
            Method::Pairwise {
                model,
                top_n,
                batch_size,
                ..
            } => Method::Pairwise {
                model,
                top_n,
                device: dev,
                batch_size,
            },
            m => m,
        };
        let engine = Engine::resolve(Backend::Auto, dev)?;
        let s = stage::run(&Options {
            dataset: a.dataset,
            neighbors: a.neighbors,
            out: a.out,
            embeddings: a.embeddings,
            method,
            top_k: a.top_k,
            engine,
            memory_budget: 192 << 20,
        })?;
        eprintln!("{s}");
        Ok(())
    })
}

/// The method and its parameters from the flags; a flag that does not belong to the method
/// is refused rather than silently ignored.
fn method(a: &Args) -> anyhow::Result<Method> {
    use simile::cli::user_error;
    let given: Vec<(&str, bool)> = vec![
        ("--qe-k", a.qe_k.is_some()),
        ("--alpha", a.alpha.is_some()),
        ("--dba-k", a.dba_k.is_some()),
        ("--dba-qe", a.dba_qe),
        ("--k1", a.k1.is_some()),
        ("--k2", a.k2.is_some()),
        ("--lambda", a.lambda.is_some()),
        ("--threshold", a.threshold.is_some()),
        ("--n-std", a.n_std.is_some()),
        ("--model", a.model.is_some()),
        ("--top-n", a.top_n.is_some()),
        ("--top-k", a.top_k.is_some()),
    ];
    let allowed: &[&str] = match a.method {
        MethodArg::Aqe => &["--qe-k", "--top-k"],
        MethodArg::AlphaQe => &["--qe-k", "--alpha", "--top-k"],
        MethodArg::Dba => &["--dba-k", "--alpha", "--dba-qe", "--qe-k", "--top-k"],
        MethodArg::KReciprocal => &["--k1", "--k2", "--lambda", "--top-k"],
        MethodArg::Threshold => &["--threshold", "--n-std"],
        MethodArg::Pairwise => &["--model", "--top-n"],
    };
    let name = a.method.to_possible_value().unwrap().get_name().to_string();
    for (flag, set) in given {
        if set && !allowed.contains(&flag) {
            return Err(user_error(format!(
                "{flag} does not apply to --method {name} (it takes {})",
                allowed.join(", ")
            )));
        }
    }
    if a.method == MethodArg::Dba && a.qe_k.is_some() && !a.dba_qe {
        return Err(user_error("--qe-k with --method dba needs --dba-qe"));
    }
    Ok(match a.method {
        MethodArg::Aqe => Method::Aqe {
            k: a.qe_k.unwrap_or(stage::AQE_K),
        },
        MethodArg::AlphaQe => Method::AlphaQe {
            k: a.qe_k.unwrap_or(stage::ALPHA_QE_K),
            alpha: a.alpha.unwrap_or(stage::ALPHA),
        },
        MethodArg::Dba => {
            let alpha = a.alpha.unwrap_or(0.0);
            Method::Dba {
                k: a.dba_k.unwrap_or(stage::DBA_K),
                alpha,
                qe: a
                    .dba_qe
                    .then(|| (a.qe_k.unwrap_or(stage::ALPHA_QE_K), alpha)),
            }
        }
        MethodArg::KReciprocal => Method::KReciprocal(Params {
            k1: a.k1.unwrap_or(stage::K1),
            k2: a.k2.unwrap_or(stage::K2),
            lambda: a.lambda.unwrap_or(stage::LAMBDA),
        }),
        MethodArg::Threshold => {
            match (a.threshold, a.n_std) {
                (Some(th), None) => Method::Constant { th },
                (None, Some(n_std)) => Method::Adaptive { n_std },
                _ => return Err(user_error(
                    "--method threshold needs --threshold TH (constant) or --n-std N (adaptive)",
                )),
            }
        }
        MethodArg::Pairwise => Method::Pairwise {
            model: a
                .model
                .clone()
                .ok_or_else(|| user_error("--method pairwise needs --model DIR"))?,
            top_n: a
                .top_n
                .ok_or_else(|| user_error("--method pairwise needs --top-n N"))?,
            device: tch::Device::Cpu,
            batch_size: a.batch_size,
        },
    })
}
