//! simile-score: retrieval metrics of a neighbours file against its dataset's labels.
use anyhow::Result;
use clap::Parser;
use simile::metrics::stage::{self, ScoreRequest};
use simile::metrics::{AggregateOptions, GroupStats, MetricSet, OVERALL};
use std::path::PathBuf;

const EXAMPLES: &str = "\
Examples:
  # OML's default metrics (cmc@1, cmc@5, precision@5, map@5), overall and per category
  simile-score --dataset dataset.parquet --neighbors neighbors.parquet --out metrics.json

  # More cut-offs, the metrics OML lacks, and a table of the worst queries
  simile-score --dataset dataset.parquet --neighbors neighbors.parquet --out metrics.json \\
      --cmc 1,5,10 --ndcg 10 --recall 10 --map-at-r --r-precision --mrr --per-query per_query.parquet

  # FNMR@FMR over every pair and PCF, from the embeddings
  simile-score --dataset dataset.parquet --neighbors neighbors.parquet --out metrics.json \\
      --embeddings emb.npy --fmr 0.1,0.01 --pcf 0.5

Keys follow OML: OVERALL/cmc/1, <category>/precision/5, OVERALL/fnmr@fmr/0.1 (see schemas/metrics.md).
Exit codes: 0 done, 2 bad input (nothing written), 1 internal error.";

/// A positive integer cut-off k.
fn positive_k(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(k) if k > 0 => Ok(k),
        _ => Err(format!("'{s}': k must be a positive integer")),
    }
}

/// A share in [0, 1].
fn unit(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("'{s}': must be a number in [0, 1]")),
    }
}

/// Retrieval metrics of a neighbours file, with OML's definitions and key names.
///
/// Queries, gallery and the dataset are those the neighbours file was made from (its
/// metadata names the split and the dataset's fingerprint, which must match --dataset).
/// A query's positives are the gallery rows with its label, minus itself and rows of the
/// same sequence, counted over the whole gallery.
#[derive(Parser, Debug)]
#[command(name = "simile-score", version, after_help = EXAMPLES)]
struct Args {
    /// The dataset the neighbours were computed from (the query dataset of a two-sided file).
    #[arg(long)]
    dataset: PathBuf,
    /// The neighbours file (simile-distance or simile-rerank output).
    #[arg(long)]
    neighbors: PathBuf,
    /// Where to write the metrics (one flat JSON object).
    #[arg(long)]
    out: PathBuf,
    /// CMC@k cut-offs [default: 1,5].
    #[arg(long, value_delimiter = ',', value_parser = positive_k, allow_negative_numbers = true)]
    cmc: Option<Vec<usize>>,
    /// Precision@k cut-offs, OML's variant [default: 5].
    #[arg(long, value_delimiter = ',', value_parser = positive_k, allow_negative_numbers = true)]
    precision: Option<Vec<usize>>,
    /// MAP@k cut-offs, OML's variant [default: 5].
    #[arg(long, value_delimiter = ',', value_parser = positive_k, allow_negative_numbers = true)]
    map: Option<Vec<usize>>,
    /// NDCG@k cut-offs (binary relevance).
    #[arg(long, value_delimiter = ',', value_parser = positive_k, allow_negative_numbers = true)]
    ndcg: Vec<usize>,
    /// Recall@k cut-offs (hits in the top k over the number of positives).
    #[arg(long, value_delimiter = ',', value_parser = positive_k, allow_negative_numbers = true)]
    recall: Vec<usize>,
    /// MAP@R (pytorch-metric-learning); needs k >= the largest number of positives.
    #[arg(long)]
    map_at_r: bool,
    /// R-Precision (pytorch-metric-learning); needs k >= the largest number of positives.
    #[arg(long)]
    r_precision: bool,
    /// Mean reciprocal rank of the first positive in each list.
    #[arg(long)]
    mrr: bool,
    /// FNMR at these FMR values (over every non-excluded pair: needs --embeddings, or a
    /// neighbours file that holds the whole gallery).
    #[arg(long, value_delimiter = ',', value_parser = unit, allow_negative_numbers = true)]
    fmr: Vec<f64>,
    /// PCF at these explained-variance shares (needs --embeddings).
    #[arg(long, value_delimiter = ',', value_parser = unit, allow_negative_numbers = true)]
    pcf: Vec<f64>,
    /// Embeddings of --dataset (for --fmr and --pcf).
    #[arg(long)]
    embeddings: Option<PathBuf>,
    /// The gallery dataset of a two-sided neighbours file.
    #[arg(long)]
    gallery_dataset: Option<PathBuf>,
    /// Embeddings of --gallery-dataset (two-sided files, for --fmr and --pcf).
    #[arg(long)]
    gallery_embeddings: Option<PathBuf>,
    /// Also write one row per query (id, label, category, positives, each metric).
    #[arg(long)]
    per_query: Option<PathBuf>,
    /// Leave queries without positives out of every mean (pytorch-metric-learning's
    /// convention); by default they are left out only where their value is undefined.
    #[arg(long)]
    skip_queries_without_positives: bool,
    /// Also write a self-contained HTML report: the metrics, the distance distributions,
    /// the worst queries with thumbnails (docs/metrics.md, "The report").
    #[arg(long)]
    report: Option<PathBuf>,
    /// A simile-train --out folder: add its learning curves to the report.
    #[arg(long, requires = "report")]
    train_dir: Option<PathBuf>,
    #[command(flatten)]
    force: simile::cli::ForceArg,
}

fn main() {
    simile::cli::run(|| {
        let a = simile::cli::parse::<Args>();
        a.force.apply();
        let set = MetricSet {
            cmc: a
                .cmc
                .unwrap_or_else(|| simile::metrics::DEFAULT_CMC.to_vec()),
            precision: a
                .precision
                .unwrap_or_else(|| simile::metrics::DEFAULT_PRECISION.to_vec()),
            map: a
                .map
                .unwrap_or_else(|| simile::metrics::DEFAULT_MAP.to_vec()),
            ndcg: a.ndcg,
            recall: a.recall,
            map_at_r: a.map_at_r,
            r_precision: a.r_precision,
            mrr: a.mrr,
        };
        let req = ScoreRequest {
            dataset: a.dataset,
            gallery_dataset: a.gallery_dataset,
            neighbors: a.neighbors,
            out: a.out,
            set,
            fmr: a.fmr,
            pcf: a.pcf,
            embeddings: a.embeddings,
            gallery_embeddings: a.gallery_embeddings,
            per_query: a.per_query,
            options: AggregateOptions {
                skip_queries_without_positives: a.skip_queries_without_positives,
            },
        };
        // The report is checked and built before anything is written: bad input leaves no file.
        let report = a
            .report
            .map(|p| simile::report::ReportOptions::new(p, a.train_dir));
        if let Some(r) = &report {
            simile::report::check(&req, r)?;
        }
        // With --report, scoring is skipped only when the report is up to date too.
        let report_done = match &report {
            Some(r) => simile::report::up_to_date(&req, r)?,
            None => true,
        };
        if report_done {
            stage::skip_if_done(&req)?;
        }
        let computed = stage::compute(&req)?;
        let page = match &report {
            Some(r) => Some(simile::report::build(&req, &computed, r)?),
            None => None,
        };
        // Every file is complete on disk before any is renamed into place: a failure on
        // the report leaves neither the metrics nor the report.
        let scored = stage::seal(&req, &computed)?;
        let page = match page {
            Some(p) => {
                for w in p.unavailable.iter().take(5) {
                    eprintln!("warning: report: image unavailable: {w}");
                }
                let (kib, rows) = (p.html.len().div_ceil(1024), p.n_query_rows);
                Some((p.seal()?, kib, rows))
            }
            None => None,
        };
        scored.commit()?;
        print_table(&req, &computed);
        if let (Some((page, kib, rows)), Some(r)) = (page, &report) {
            page.commit()?;
            eprintln!(
                "wrote report {} ({kib} KiB, {rows} query rows)",
                r.out.display()
            );
        }
        Ok(())
    })
}

/// Most categories shown as columns of the summary; the JSON always has all of them.
const MAX_COLUMNS: usize = 6;

fn fmt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.4}"))
}

fn print_table(req: &ScoreRequest, c: &stage::Computed) {
    let groups: Vec<&GroupStats> = c.groups.iter().take(MAX_COLUMNS + 1).collect();
    let overall = &c.groups[0];
    eprintln!(
        "simile-score: {} queries ({} without positives), {} gallery rows, {} neighbour rows{}",
        overall.n_queries,
        overall.n_without_positives,
        c.qg.gallery.len(),
        c.n_rows,
        if c.groups.len() > 1 {
            format!(", {} categories", c.groups.len() - 1)
        } else {
            String::new()
        }
    );
    let w = groups
        .iter()
        .map(|g| g.name.len())
        .max()
        .unwrap_or(7)
        .clamp(7, 16);
    let mut head = format!("  {:<18}", "metric");
    for g in &groups {
        let name: String = g.name.chars().take(w).collect();
        head.push_str(&format!(" {name:>w$}"));
    }
    eprintln!("{head}");
    for (j, m) in c.per_query.metrics.iter().enumerate() {
        let mut line = format!("  {:<18}", m.key());
        for g in &groups {
            line.push_str(&format!(" {:>w$}", fmt(g.means[j])));
        }
        eprintln!("{line}");
    }
    for (k, v) in &c.scores.entries {
        if let Some(rest) = k.strip_prefix(&format!("{OVERALL}/")) {
            if rest.starts_with("pcf/") || rest.starts_with("fnmr@fmr/") {
                eprintln!("  {rest:<18} {:>w$}", fmt(*v));
            }
        }
    }
    if c.groups.len() > groups.len() {
        eprintln!(
            "  ({} more categories in {})",
            c.groups.len() - groups.len(),
            req.out.display()
        );
    }
    let left: usize = overall.n_left_out.iter().copied().max().unwrap_or(0);
    if left > 0 && !req.options.skip_queries_without_positives {
        eprintln!(
            "  note: queries without positives but with results have no defined precision, ndcg, recall, map@r or r_precision; those means leave them out"
        );
    }
    eprintln!("wrote {}", req.out.display());
}
