//! Per-query ranking metrics on the ranked hit flags of one retrieved list.
//!
//! Every function takes `hits` (is the i-th retrieved gallery row a positive of the query,
//! in rank order, excluded rows already removed) and `n_gt` (the query's positives over the
//! whole gallery, not only the retrieved ones) and returns one number. Formulas, edge rules
//! and deviations are in `docs/metrics.md`.
//!
//! OML's edge rules apply to every metric here: an empty list scores 1 when the query has no
//! positives and 0 when it has some. A value that divides by the number of positives is
//! 0/0 = NaN for a query without positives but with results (as OML's Precision is); the
//! aggregation leaves NaNs out of the mean and counts them.
use crate::error::{Error, Result};

/// OML's edge rule for an empty retrieved list.
#[inline]
fn empty_list(hits: &[bool], n_gt: usize) -> Option<f64> {
    if hits.is_empty() {
        Some(if n_gt == 0 { 1.0 } else { 0.0 })
    } else {
        None
    }
}

#[inline]
fn count(hits: &[bool]) -> usize {
    hits.iter().filter(|&&h| h).count()
}

/// CMC@k (OML): 1 if a positive is among the first k, else 0.
pub fn cmc_at_k(hits: &[bool], n_gt: usize, k: usize) -> f64 {
    if let Some(v) = empty_list(hits, n_gt) {
        return v;
    }
    if hits.iter().take(k).any(|&h| h) {
        1.0
    } else {
        0.0
    }
}

/// Precision@k (OML's variant): hits in the first k' = min(k, len) over min(n_gt, k'), so a
/// perfect ranking scores 1 even when n_gt < k. NaN when n_gt = 0 and the list is not empty.
pub fn precision_at_k(hits: &[bool], n_gt: usize, k: usize) -> f64 {
    if let Some(v) = empty_list(hits, n_gt) {
        return v;
    }
    let kk = k.min(hits.len());
    count(&hits[..kk]) as f64 / n_gt.min(kk) as f64
}

/// MAP@k (OML 4.0): the mean of precision@i over the hits i in the first k' = min(k, len);
/// the denominator is the number of those hits (0 hits give 0).
pub fn map_at_k(hits: &[bool], n_gt: usize, k: usize) -> f64 {
    if let Some(v) = empty_list(hits, n_gt) {
        return v;
    }
    let kk = k.min(hits.len());
    let (mut n, mut sum) = (0usize, 0.0f64);
    for (i, _) in hits[..kk].iter().enumerate().filter(|(_, &h)| h) {
        n += 1;
        sum += n as f64 / (i + 1) as f64;
    }
    if n == 0 {
        0.0
    } else {
        sum / n as f64
    }
}

/// 1 / log2(rank + 1) for a 0-based position.
#[inline]
fn discount(i: usize) -> f64 {
    1.0 / ((i + 2) as f64).log2()
}

/// NDCG@k, binary relevance: DCG of the first min(k, len) over the ideal DCG of
/// min(n_gt, k) positives at the top. NaN when n_gt = 0 and the list is not empty.
pub fn ndcg_at_k(hits: &[bool], n_gt: usize, k: usize) -> f64 {
    if let Some(v) = empty_list(hits, n_gt) {
        return v;
    }
    let kk = k.min(hits.len());
    let dcg: f64 = (0..kk).filter(|&i| hits[i]).map(discount).sum();
    let idcg: f64 = (0..n_gt.min(k)).map(discount).sum();
    dcg / idcg
}

/// Recall@k: hits in the first k over n_gt. NaN when n_gt = 0 and the list is not empty.
pub fn recall_at_k(hits: &[bool], n_gt: usize, k: usize) -> f64 {
    if let Some(v) = empty_list(hits, n_gt) {
        return v;
    }
    let kk = k.min(hits.len());
    count(&hits[..kk]) as f64 / n_gt as f64
}

/// MAP@R (pytorch-metric-learning): with R = n_gt, (1/R) Σ_{i≤R} P@i·rel_i.
/// NaN when n_gt = 0 and the list is not empty.
pub fn map_at_r(hits: &[bool], n_gt: usize) -> f64 {
    if let Some(v) = empty_list(hits, n_gt) {
        return v;
    }
    let rr = n_gt.min(hits.len());
    let (mut n, mut sum) = (0usize, 0.0f64);
    for (i, _) in hits[..rr].iter().enumerate().filter(|(_, &h)| h) {
        n += 1;
        sum += n as f64 / (i + 1) as f64;
    }
    sum / n_gt as f64
}

/// R-Precision (pytorch-metric-learning): with R = n_gt, hits in the first R over R.
/// NaN when n_gt = 0 and the list is not empty.
pub fn r_precision(hits: &[bool], n_gt: usize) -> f64 {
    if let Some(v) = empty_list(hits, n_gt) {
        return v;
    }
    count(&hits[..n_gt.min(hits.len())]) as f64 / n_gt as f64
}

/// Reciprocal rank of the first positive in the whole list, 0 if there is none.
pub fn reciprocal_rank(hits: &[bool], n_gt: usize) -> f64 {
    if let Some(v) = empty_list(hits, n_gt) {
        return v;
    }
    match hits.iter().position(|&h| h) {
        Some(i) => 1.0 / (i + 1) as f64,
        None => 0.0,
    }
}

/// One metric of a query's ranked list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Metric {
    Cmc(usize),
    Precision(usize),
    Map(usize),
    Ndcg(usize),
    Recall(usize),
    MapAtR,
    RPrecision,
    Mrr,
}

impl Metric {
    /// The key suffix after `<category>/`, as OML writes it: `cmc/1`, `map/5`; and for the
    /// metrics OML lacks `ndcg/5`, `recall/5`, `map@r`, `r_precision`, `mrr`.
    pub fn key(&self) -> String {
        match self.name_and_k() {
            (name, Some(k)) => format!("{name}/{k}"),
            (name, None) => name.into(),
        }
    }

    /// The column name in the per-query table: `cmc@1`, `precision@5`, `map@r`, `mrr`.
    pub fn column(&self) -> String {
        match self.name_and_k() {
            (name, Some(k)) => format!("{name}@{k}"),
            (name, None) => name.into(),
        }
    }

    fn name_and_k(&self) -> (&'static str, Option<usize>) {
        match *self {
            Metric::Cmc(k) => ("cmc", Some(k)),
            Metric::Precision(k) => ("precision", Some(k)),
            Metric::Map(k) => ("map", Some(k)),
            Metric::Ndcg(k) => ("ndcg", Some(k)),
            Metric::Recall(k) => ("recall", Some(k)),
            Metric::MapAtR => ("map@r", None),
            Metric::RPrecision => ("r_precision", None),
            Metric::Mrr => ("mrr", None),
        }
    }

    /// The cut-off k, for the metrics that have one.
    pub fn k(&self) -> Option<usize> {
        match *self {
            Metric::Cmc(k)
            | Metric::Precision(k)
            | Metric::Map(k)
            | Metric::Ndcg(k)
            | Metric::Recall(k) => Some(k),
            _ => None,
        }
    }

    /// Whether the metric reads the first n_gt items (so the list must hold every positive).
    pub fn needs_all_positives(&self) -> bool {
        matches!(self, Metric::MapAtR | Metric::RPrecision)
    }

    /// The value for one query.
    #[inline]
    pub fn eval(&self, hits: &[bool], n_gt: usize) -> f64 {
        match *self {
            Metric::Cmc(k) => cmc_at_k(hits, n_gt, k),
            Metric::Precision(k) => precision_at_k(hits, n_gt, k),
            Metric::Map(k) => map_at_k(hits, n_gt, k),
            Metric::Ndcg(k) => ndcg_at_k(hits, n_gt, k),
            Metric::Recall(k) => recall_at_k(hits, n_gt, k),
            Metric::MapAtR => map_at_r(hits, n_gt),
            Metric::RPrecision => r_precision(hits, n_gt),
            Metric::Mrr => reciprocal_rank(hits, n_gt),
        }
    }
}

/// OML's default cut-offs, the ones `simile-score` uses when a flag is not given and
/// training-time validation reports: `--cmc 1,5 --precision 5 --map 5`.
pub const DEFAULT_CMC: [usize; 2] = [1, 5];
pub const DEFAULT_PRECISION: [usize; 1] = [5];
pub const DEFAULT_MAP: [usize; 1] = [5];

/// Which ranking metrics to compute.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct MetricSet {
    pub cmc: Vec<usize>,
    pub precision: Vec<usize>,
    pub map: Vec<usize>,
    pub ndcg: Vec<usize>,
    pub recall: Vec<usize>,
    pub map_at_r: bool,
    pub r_precision: bool,
    pub mrr: bool,
}

impl MetricSet {
    /// The default set: `--cmc 1,5 --precision 5 --map 5`.
    pub fn default_set() -> Self {
        MetricSet {
            cmc: DEFAULT_CMC.to_vec(),
            precision: DEFAULT_PRECISION.to_vec(),
            map: DEFAULT_MAP.to_vec(),
            ..Default::default()
        }
    }

    /// Refuses a cut-off that is not a positive integer (OML's
    /// `check_if_nonempty_positive_integers`).
    pub fn validate(&self) -> Result<()> {
        for (name, ks) in [
            ("cmc", &self.cmc),
            ("precision", &self.precision),
            ("map", &self.map),
            ("ndcg", &self.ndcg),
            ("recall", &self.recall),
        ] {
            if ks.contains(&0) {
                return Err(Error::input(format!(
                    "--{name}: every k must be a positive integer, got {ks:?}"
                )));
            }
        }
        if self.metrics().is_empty() {
            return Err(Error::input("no metric requested"));
        }
        Ok(())
    }

    /// The metrics in key order: each family's cut-offs ascending and deduplicated.
    pub fn metrics(&self) -> Vec<Metric> {
        let sorted = |ks: &[usize]| {
            let mut v = ks.to_vec();
            v.sort_unstable();
            v.dedup();
            v
        };
        let mut out = Vec::new();
        out.extend(sorted(&self.cmc).into_iter().map(Metric::Cmc));
        out.extend(sorted(&self.precision).into_iter().map(Metric::Precision));
        out.extend(sorted(&self.map).into_iter().map(Metric::Map));
        out.extend(sorted(&self.ndcg).into_iter().map(Metric::Ndcg));
        out.extend(sorted(&self.recall).into_iter().map(Metric::Recall));
        if self.map_at_r {
            out.push(Metric::MapAtR);
        }
        if self.r_precision {
            out.push(Metric::RPrecision);
        }
        if self.mrr {
            out.push(Metric::Mrr);
        }
        out
    }

    /// The largest cut-off asked for (0 when there is none).
    pub fn max_k(&self) -> usize {
        self.metrics()
            .iter()
            .filter_map(Metric::k)
            .max()
            .unwrap_or(0)
    }

    /// Whether MAP@R or R-Precision is asked for (the lists must reach every positive).
    pub fn needs_all_positives(&self) -> bool {
        self.map_at_r || self.r_precision
    }
}
