//! simile-score: retrieval metrics of a neighbours file against its dataset's labels.
use anyhow::Result;
use clap::{Args as ClapArgs, Parser, Subcommand};
use simile::metrics::compare::{self, CompareRequest, Gate};
use simile::metrics::confidence::{CiBy, CiOptions};
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

  # Two models on the same queries: paired differences, intervals, p-values; a CI gate
  simile-score compare --dataset dataset.parquet --baseline old.parquet --candidate new.parquet \\
      --out compare.json --fail-if-worse cmc/1:0.005

Keys follow OML: OVERALL/cmc/1, <category>/precision/5, OVERALL/fnmr@fmr/0.1 (see schemas/metrics.md);
each mean has a 95% interval beside it (OVERALL/cmc/1/ci_low, .../ci_high; --ci off to skip).
Exit codes: 0 done, 2 bad input (nothing written), 1 internal error.";

const COMPARE_EXAMPLES: &str = "\
Examples:
  # A trained model against its starting point, on the validation split both searched
  simile-score compare --dataset dataset.parquet --baseline baseline/neighbors.parquet \\
      --candidate trained/neighbors.parquet --out compare.json

  # Re-ranking's effect, every query's pair of values, and a gate for CI
  simile-score compare --dataset dataset.parquet --baseline neighbors.parquet \\
      --candidate reranked.parquet --out compare.json --per-query flips.parquet \\
      --fail-if-worse cmc/1 --fail-if-worse map/5:0.01

A difference is 'real' at the chosen level when its interval excludes 0 (docs/metrics.md, \
\"How sure is a number\"). Output: schemas/compare.md.
Exit codes: 0 done, 3 a --fail-if-worse gate failed (compare.json is written), 2 bad input
(nothing written), 1 internal error.";

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

/// The metrics to compute (shared by scoring and `compare`).
#[derive(ClapArgs, Debug)]
struct MetricArgs {
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
    /// Leave queries without positives out of every mean (pytorch-metric-learning's
    /// convention); by default they are left out only where their value is undefined.
    #[arg(long)]
    skip_queries_without_positives: bool,
}

impl MetricArgs {
    fn set(&self) -> MetricSet {
        MetricSet {
            cmc: self
                .cmc
                .clone()
                .unwrap_or_else(|| simile::metrics::DEFAULT_CMC.to_vec()),
            precision: self
                .precision
                .clone()
                .unwrap_or_else(|| simile::metrics::DEFAULT_PRECISION.to_vec()),
            map: self
                .map
                .clone()
                .unwrap_or_else(|| simile::metrics::DEFAULT_MAP.to_vec()),
            ndcg: self.ndcg.clone(),
            recall: self.recall.clone(),
            map_at_r: self.map_at_r,
            r_precision: self.r_precision,
            mrr: self.mrr,
        }
    }

    fn options(&self) -> AggregateOptions {
        AggregateOptions {
            skip_queries_without_positives: self.skip_queries_without_positives,
        }
    }
}

/// A confidence level in (0, 1), or `off`.
fn level(s: &str) -> Result<Level, String> {
    match s.trim() {
        "off" | "none" => Ok(Level(None)),
        v => match v.parse::<f64>() {
            Ok(x) if x > 0.0 && x < 1.0 => Ok(Level(Some(x))),
            _ => Err(format!(
                "'{s}': a confidence level between 0 and 1 (0.95 for 95%), or off"
            )),
        },
    }
}

/// `--ci`'s value: a level, or none (`off`).
#[derive(Clone, Copy, Debug)]
struct Level(Option<f64>);

/// How intervals are computed (shared by scoring and `compare`).
#[derive(ClapArgs, Debug)]
struct CiArgs {
    /// Confidence level of the intervals (BCa bootstrap), or `off`.
    #[arg(long, value_parser = level, default_value = "0.95")]
    ci: Level,
    /// Bootstrap resamples for the intervals and p-values.
    #[arg(long, default_value_t = 1000)]
    bootstrap: usize,
    /// What one resample draws: `label` (all queries of a label together: queries of one
    /// identity are not independent) or `query`.
    #[arg(long, default_value = "label")]
    ci_by: CiBy,
    /// Seed of the resamples: the same seed gives the same intervals.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl CiArgs {
    fn options(&self) -> Option<CiOptions> {
        self.ci.0.map(|level| CiOptions {
            level,
            resamples: self.bootstrap,
            by: self.ci_by,
            seed: self.seed,
        })
    }
}

/// Retrieval metrics of a neighbours file, with OML's definitions and key names.
///
/// Queries, gallery and the dataset are those the neighbours file was made from (its
/// metadata names the split and the dataset's fingerprint, which must match --dataset).
/// A query's positives are the gallery rows with its label, minus itself and rows of the
/// same sequence, counted over the whole gallery.
#[derive(Parser, Debug)]
#[command(
    name = "simile-score",
    version,
    after_help = EXAMPLES,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// The dataset the neighbours were computed from (the query dataset of a two-sided file).
    #[arg(long, required = true)]
    dataset: Option<PathBuf>,
    /// The neighbours file (simile-distance or simile-rerank output).
    #[arg(long, required = true)]
    neighbors: Option<PathBuf>,
    /// Where to write the metrics (one flat JSON object).
    #[arg(long, required = true)]
    out: Option<PathBuf>,
    #[command(flatten)]
    metrics: MetricArgs,
    #[command(flatten)]
    ci: CiArgs,
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

#[derive(Subcommand, Debug)]
enum Command {
    Compare(CompareArgs),
}

/// Two neighbour files of the same dataset and split (two models, or before and after
/// re-ranking), compared on the queries they share: per metric the baseline's and the
/// candidate's means, the paired difference (candidate - baseline) with its bootstrap
/// interval and p-value, McNemar's exact p-value for CMC@k, and the queries that improved,
/// worsened or stayed.
#[derive(ClapArgs, Debug)]
#[command(after_help = COMPARE_EXAMPLES)]
struct CompareArgs {
    /// The dataset both files were computed from (the query dataset of two-sided files).
    #[arg(long)]
    dataset: PathBuf,
    /// The gallery dataset of two-sided neighbour files.
    #[arg(long)]
    gallery_dataset: Option<PathBuf>,
    /// The reference neighbours file (A).
    #[arg(long)]
    baseline: PathBuf,
    /// The neighbours file to judge (B).
    #[arg(long)]
    candidate: PathBuf,
    /// Where to write the comparison (schemas/compare.md).
    #[arg(long)]
    out: PathBuf,
    /// Also write each query's baseline and candidate values (a Parquet table).
    #[arg(long)]
    per_query: Option<PathBuf>,
    /// Exit 3 when the candidate is significantly worse than the baseline on METRIC by more
    /// than MARGIN (the interval of the difference lies wholly below -MARGIN), e.g. `cmc/1`,
    /// `map/5:0.01`, `<category>/cmc/1`. Repeatable.
    #[arg(long, value_name = "METRIC[:MARGIN]")]
    fail_if_worse: Vec<Gate>,
    /// Also write a self-contained HTML page: each difference with its interval, and the
    /// queries whose first result flipped, drawn with both files' neighbours.
    #[arg(long)]
    report: Option<PathBuf>,
    #[command(flatten)]
    metrics: MetricArgs,
    #[command(flatten)]
    ci: CiArgs,
    #[command(flatten)]
    force: simile::cli::ForceArg,
}

fn main() {
    simile::cli::run(|| {
        let a = simile::cli::parse::<Args>();
        if let Some(Command::Compare(c)) = a.command {
            return run_compare(c);
        }
        a.force.apply();
        let req = ScoreRequest {
            dataset: a.dataset.expect("required"),
            gallery_dataset: a.gallery_dataset,
            neighbors: a.neighbors.expect("required"),
            out: a.out.expect("required"),
            set: a.metrics.set(),
            fmr: a.fmr,
            pcf: a.pcf,
            embeddings: a.embeddings,
            gallery_embeddings: a.gallery_embeddings,
            per_query: a.per_query,
            options: a.metrics.options(),
            ci: a.ci.options(),
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
    // The interval of OVERALL's mean, beside it.
    let overall_ci = |j: usize| -> Option<String> {
        let iv = c.intervals.as_ref()?;
        Some(match iv[0][j] {
            Some(i) => format!("[{:.4}, {:.4}]", i.low, i.high),
            None => "-".into(),
        })
    };
    let mut head = format!("  {:<18}", "metric");
    for (i, g) in groups.iter().enumerate() {
        let name: String = g.name.chars().take(w).collect();
        head.push_str(&format!(" {name:>w$}"));
        if let (0, Some(ci)) = (i, req.ci) {
            head.push_str(&format!(" {:>18}", format!("{}% interval", pct(ci.level))));
        }
    }
    eprintln!("{head}");
    for (j, m) in c.per_query.metrics.iter().enumerate() {
        let mut line = format!("  {:<18}", m.key());
        for (i, g) in groups.iter().enumerate() {
            line.push_str(&format!(" {:>w$}", fmt(g.means[j])));
            if let (0, Some(ci)) = (i, overall_ci(j)) {
                line.push_str(&format!(" {ci:>18}"));
            }
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

fn run_compare(c: CompareArgs) -> Result<()> {
    c.force.apply();
    let Some(ci) = c.ci.options() else {
        anyhow::bail!(simile::Error::input(
            "--ci off: compare's differences are judged by their intervals; give a level (0.95 by default)"
        ));
    };
    let req = CompareRequest {
        dataset: c.dataset,
        gallery_dataset: c.gallery_dataset,
        baseline: c.baseline,
        candidate: c.candidate,
        out: c.out,
        set: c.metrics.set(),
        options: c.metrics.options(),
        ci,
        per_query: c.per_query,
        gates: c.fail_if_worse,
    };
    let report = c
        .report
        .map(|p| simile::report::ReportOptions::new(p, None));
    if let Some(r) = &report {
        let mut outs = vec![req.out.as_path(), r.out.as_path()];
        outs.extend(req.per_query.as_deref());
        simile::manifest::refuse_overlap(
            &[
                ("dataset", req.dataset.as_path()),
                ("baseline", req.baseline.as_path()),
                ("candidate", req.candidate.as_path()),
            ],
            &outs,
        )?;
        if outs.iter().filter(|o| **o == r.out.as_path()).count() > 1 {
            anyhow::bail!(simile::Error::input(format!(
                "--report {}: the same path as another output",
                r.out.display()
            )));
        }
    }
    // A gate's verdict is needed on every run, so with gates (or a page to draw) the
    // comparison is always made; without, an up-to-date comparison is shown from its file.
    if req.gates.is_empty() && report.is_none() {
        match compare::skip_if_done(&req) {
            Err(simile::Error::UpToDate(m)) => {
                eprintln!("{m}");
                print_compare(&req, &compare::read(&req.out)?);
                return Ok(());
            }
            other => other?,
        }
    }
    let computed = compare::compute(&req)?;
    // The page is built before anything is written: bad input leaves no file.
    let page = match &report {
        Some(r) => Some(simile::report::compare::build(&req, &computed, r)?),
        None => None,
    };
    compare::write(&req, &computed)?;
    print_compare(&req, &computed.rows);
    if let Some(p) = page {
        for w in p.unavailable.iter().take(5) {
            eprintln!("warning: report: image unavailable: {w}");
        }
        let (kib, rows, out) = (
            p.html.len().div_ceil(1024),
            p.n_query_rows,
            p.out().to_path_buf(),
        );
        p.write()?;
        eprintln!(
            "wrote report {} ({kib} KiB, {rows} query rows)",
            out.display()
        );
    }
    let failed = computed.failed(&req.gates);
    if !failed.is_empty() {
        for (g, r) in &failed {
            eprintln!(
                "simile-score compare: FAILED --fail-if-worse {}:{}: the candidate is worse by {} ({}% interval {}), beyond the margin",
                g.key,
                g.margin,
                signed(r.difference),
                pct(req.ci.level),
                interval(r)
            );
        }
        std::process::exit(3);
    }
    Ok(())
}

fn signed(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:+.4}"))
}

fn pct(level: f64) -> String {
    let p = level * 100.0;
    if p.fract() == 0.0 {
        format!("{p:.0}")
    } else {
        format!("{p}")
    }
}

fn interval(r: &compare::Row) -> String {
    match (r.ci_low, r.ci_high) {
        (Some(l), Some(h)) => format!("[{l:+.4}, {h:+.4}]"),
        _ => "-".into(),
    }
}

fn p_value(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(p) if p < 0.001 => format!("{p:.1e}"),
        Some(p) => format!("{p:.3}"),
    }
}

/// The OVERALL rows as a table, each difference judged in words.
fn print_compare(req: &CompareRequest, rows: &[compare::Row]) {
    let prefix = format!("{OVERALL}/");
    let n = rows
        .iter()
        .find(|r| r.key.starts_with(&prefix))
        .map_or(0, |r| r.improved + r.worsened + r.unchanged);
    eprintln!(
        "simile-score compare: {} vs {}, {n} queries; candidate - baseline with {}% intervals ({} resamples by {}, seed {})",
        req.candidate.display(),
        req.baseline.display(),
        pct(req.ci.level),
        req.ci.resamples,
        req.ci.by,
        req.ci.seed
    );
    eprintln!(
        "  {:<14} {:>9} {:>9} {:>10} {:>20} {:>8} {:>9} {:>16}  verdict",
        "metric",
        "baseline",
        "candidate",
        "difference",
        "interval",
        "p",
        "McNemar",
        "better/worse/same"
    );
    for r in rows.iter().filter(|r| r.key.starts_with(&prefix)) {
        let verdict = match (r.ci_low, r.ci_high) {
            (Some(l), _) if l > 0.0 => "better: the interval excludes 0",
            (_, Some(h)) if h < 0.0 => "worse: the interval excludes 0",
            (Some(_), Some(_)) => "no clear difference (could be noise)",
            _ => "undefined",
        };
        eprintln!(
            "  {:<14} {:>9} {:>9} {:>10} {:>20} {:>8} {:>9} {:>16}  {verdict}",
            &r.key[prefix.len()..],
            fmt(r.baseline),
            fmt(r.candidate),
            signed(r.difference),
            interval(r),
            p_value(r.p_value),
            p_value(r.mcnemar_p_value),
            format!("{}/{}/{}", r.improved, r.worsened, r.unchanged),
        );
    }
    let groups = rows.iter().filter(|r| !r.key.starts_with(&prefix)).count();
    if groups > 0 {
        eprintln!("  (per-category rows in {})", req.out.display());
    }
    eprintln!("wrote {}", req.out.display());
}
