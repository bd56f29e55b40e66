//! How sure a mean is: bootstrap confidence intervals of the per-query means simile-score
//! reports, and the paired test of two models on the same queries (`simile-score compare`).
//!
//! Every reported mean is a ratio, the sum of a metric's values over the queries that count
//! ([`aggregate::counts`]) over their number. The bootstrap resamples *clusters* of queries
//! with replacement: single queries (`--ci-by query`), or whole labels (`--ci-by label`, the
//! default), because the queries of one identity share their gallery and, in 1-vs-rest
//! protocols, each other: their outcomes are correlated, and resampling them one by one makes
//! intervals too narrow. Intervals are BCa (bias-corrected and accelerated, Efron 1987): the
//! means sit near 1.0 for good models, where the bootstrap distribution is skewed and plain
//! percentile intervals undercover; BCa corrects for the skew (acceleration from the
//! leave-one-cluster-out jackknife) and for the median bias, at no extra resampling cost.
//! Resamples are seeded by the seed and their own index (or the estimand's), so results do
//! not depend on the number of threads. Where the clusters come in few kinds (a 0/1 metric
//! over single queries: two kinds), a resample is drawn as multinomial counts of kinds, which
//! is exact and costs the number of kinds instead of the number of clusters.
use super::aggregate::{self, AggregateOptions, PerQuery};
use crate::error::{Error, Result};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Binomial as BinomialDraw, Distribution};
use rayon::prelude::*;
use statrs::distribution::{Binomial, ContinuousCDF, DiscreteCDF, Normal};
use std::collections::HashMap;

/// What one resampling unit is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CiBy {
    /// Each query on its own: right when queries are independent.
    Query,
    /// Each label with all its queries (a cluster bootstrap).
    Label,
}

impl std::str::FromStr for CiBy {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "query" => Ok(CiBy::Query),
            "label" => Ok(CiBy::Label),
            _ => Err(format!("'{s}': expected label or query")),
        }
    }
}

impl std::fmt::Display for CiBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CiBy::Query => "query",
            CiBy::Label => "label",
        })
    }
}

/// How intervals are computed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CiOptions {
    /// The confidence level, in (0, 1): 0.95 for 95% intervals.
    pub level: f64,
    /// Bootstrap resamples.
    pub resamples: usize,
    pub by: CiBy,
    pub seed: u64,
}

impl Default for CiOptions {
    fn default() -> Self {
        CiOptions {
            level: 0.95,
            resamples: 1000,
            by: CiBy::Label,
            seed: 0,
        }
    }
}

impl CiOptions {
    pub fn validate(&self) -> Result<()> {
        if !(self.level > 0.0 && self.level < 1.0) {
            return Err(Error::input(format!(
                "--ci {}: the confidence level must be between 0 and 1 (0.95 for 95%), or off",
                self.level
            )));
        }
        if self.resamples < 100 {
            return Err(Error::input(format!(
                "--bootstrap {}: at least 100 resamples (1000 is the default; the interval's ends are tail quantiles)",
                self.resamples
            )));
        }
        Ok(())
    }

    /// The manifest's record of the settings.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "level": self.level,
            "resamples": self.resamples,
            "by": self.by.to_string(),
            "seed": self.seed,
            "method": "bca",
        })
    }
}

/// Which resampling unit each query belongs to.
#[derive(Clone, Debug)]
pub struct Clusters {
    of_query: Vec<u32>,
    n: usize,
}

impl Clusters {
    /// Units for `by`: with `Label`, the queries of one label form one unit (a query without
    /// a label is a unit of its own).
    pub fn new(by: CiBy, labels: &[Option<i64>]) -> Clusters {
        match by {
            CiBy::Query => Clusters {
                of_query: (0..labels.len() as u32).collect(),
                n: labels.len(),
            },
            CiBy::Label => {
                let mut ids: HashMap<i64, u32> = HashMap::new();
                let mut n = 0u32;
                let of_query = labels
                    .iter()
                    .map(|l| {
                        let id = match l {
                            Some(l) => *ids.entry(*l).or_insert(n),
                            None => n,
                        };
                        if id == n {
                            n += 1;
                        }
                        id
                    })
                    .collect();
                Clusters {
                    of_query,
                    n: n as usize,
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }
}

/// A ratio estimate (a mean over the queries that count), held per cluster: the sums and
/// counts of the clusters that have queries in it, by cluster index.
#[derive(Clone, Debug, Default)]
pub struct Ratio {
    clusters: Vec<u32>,
    sums: Vec<f64>,
    counts: Vec<f64>,
}

impl Ratio {
    /// The mean of `(query, value)` pairs (the values that count), held by cluster.
    pub fn of(values: impl IntoIterator<Item = (usize, f64)>, clusters: &Clusters) -> Ratio {
        // Dense by cluster index (clusters are numbered 0..n), then the ones with queries.
        let mut sums = vec![0.0f64; clusters.n];
        let mut counts = vec![0.0f64; clusters.n];
        for (q, v) in values {
            let c = clusters.of_query[q] as usize;
            sums[c] += v;
            counts[c] += 1.0;
        }
        let held: Vec<u32> = (0..clusters.n as u32)
            .filter(|&c| counts[c as usize] > 0.0)
            .collect();
        Ratio {
            sums: held.iter().map(|&c| sums[c as usize]).collect(),
            counts: held.iter().map(|&c| counts[c as usize]).collect(),
            clusters: held,
        }
    }

    /// One metric's mean over group `members`, with the rule of the reported means.
    pub fn of_metric(
        pq: &PerQuery,
        members: &[usize],
        metric: usize,
        opts: AggregateOptions,
        clusters: &Clusters,
    ) -> Ratio {
        Ratio::of(
            members
                .iter()
                .map(|&q| (q, pq.row(q)[metric]))
                .filter(|&(q, v)| aggregate::counts(pq, q, v, opts)),
            clusters,
        )
    }

    fn totals(&self) -> (f64, f64) {
        (self.sums.iter().sum(), self.counts.iter().sum())
    }

    /// The mean when cluster c is drawn `w[c]` times.
    fn under(&self, w: &[u32]) -> Option<f64> {
        let (mut s, mut n) = (0.0, 0.0);
        for ((&c, &cs), &cn) in self.clusters.iter().zip(&self.sums).zip(&self.counts) {
            let k = w[c as usize] as f64;
            s += k * cs;
            n += k * cn;
        }
        (n > 0.0).then(|| s / n)
    }
}

/// A quantity estimated from ratios: `sum of coefficient x ratio` (one metric's mean, or the
/// difference of two models' means).
#[derive(Clone, Debug, Default)]
pub struct Estimand {
    terms: Vec<(f64, Ratio)>,
}

impl Estimand {
    pub fn mean(r: Ratio) -> Estimand {
        Estimand {
            terms: vec![(1.0, r)],
        }
    }

    /// `candidate - baseline`.
    pub fn difference(candidate: Ratio, baseline: Ratio) -> Estimand {
        Estimand {
            terms: vec![(1.0, candidate), (-1.0, baseline)],
        }
    }

    /// The estimate on the sample itself; `None` where a ratio has no query.
    pub fn estimate(&self) -> Option<f64> {
        let totals: Vec<(f64, f64)> = self.terms.iter().map(|(_, r)| r.totals()).collect();
        self.of_totals(&totals)
    }

    fn under(&self, w: &[u32]) -> Option<f64> {
        self.terms
            .iter()
            .try_fold(0.0, |acc, (c, r)| r.under(w).map(|v| acc + c * v))
    }

    /// The clusters grouped by their values: clusters that hold the same sums and counts in
    /// every term are interchangeable to the estimate, so a resample only needs how many of
    /// each kind it drew. The clusters in no term form one kind of zeros.
    fn kinds(&self, n: usize) -> Kinds {
        // Each held cluster's (sum, count) per term, by a slot per cluster.
        let t = self.terms.len();
        let mut slot = vec![u32::MAX; n];
        let mut values: Vec<(f64, f64)> = Vec::new();
        for (k, (_, r)) in self.terms.iter().enumerate() {
            for ((&c, &s), &m) in r.clusters.iter().zip(&r.sums).zip(&r.counts) {
                let c = c as usize;
                if slot[c] == u32::MAX {
                    slot[c] = (values.len() / t) as u32;
                    values.resize(values.len() + t, (0.0, 0.0));
                }
                values[slot[c] as usize * t + k] = (s, m);
            }
        }
        let held = values.len() / t.max(1);
        // An estimand has one term (a mean) or two (a difference): a fixed key, no allocation.
        debug_assert!(t <= 2);
        let mut index: HashMap<[u64; 4], usize> = HashMap::new();
        let mut kinds = Kinds::default();
        let mut add = |v: &[(f64, f64)], times: u64, kinds: &mut Kinds| {
            let mut key = [0u64; 4];
            for (i, (s, m)) in v.iter().take(2).enumerate() {
                key[2 * i] = s.to_bits();
                key[2 * i + 1] = m.to_bits();
            }
            let i = *index.entry(key).or_insert_with(|| {
                kinds.values.push(v.to_vec());
                kinds.times.push(0);
                kinds.times.len() - 1
            });
            kinds.times[i] += times;
        };
        for v in values.chunks(t.max(1)).take(held) {
            add(v, 1, &mut kinds);
        }
        if n > held {
            add(&vec![(0.0, 0.0); t], (n - held) as u64, &mut kinds);
        }
        kinds
    }

    /// The estimate from per-term totals.
    fn of_totals(&self, totals: &[(f64, f64)]) -> Option<f64> {
        self.terms
            .iter()
            .zip(totals)
            .try_fold(0.0, |acc, ((c, _), &(s, m))| {
                (m > 0.0).then(|| acc + c * s / m)
            })
    }

    /// BCa's acceleration: the skewness of the leave-one-cluster-out jackknife estimates.
    fn acceleration(&self, kinds: &Kinds, n: usize) -> f64 {
        let totals: Vec<(f64, f64)> = self.terms.iter().map(|(_, r)| r.totals()).collect();
        let mut loo = Vec::with_capacity(kinds.times.len());
        for values in &kinds.values {
            let left: Vec<(f64, f64)> = totals
                .iter()
                .zip(values)
                .map(|(&(s, m), &(vs, vm))| (s - vs, m - vm))
                .collect();
            match self.of_totals(&left) {
                Some(v) => loo.push(v),
                None => return 0.0, // one cluster holds a whole ratio: no jackknife
            }
        }
        let mean = loo
            .iter()
            .zip(&kinds.times)
            .map(|(v, &k)| v * k as f64)
            .sum::<f64>()
            / n as f64;
        let (mut m2, mut m3) = (0.0, 0.0);
        for (v, &k) in loo.iter().zip(&kinds.times) {
            let d = mean - v;
            m2 += k as f64 * d * d;
            m3 += k as f64 * d * d * d;
        }
        if m2 <= 0.0 {
            0.0
        } else {
            m3 / (6.0 * m2.powf(1.5))
        }
    }
}

/// Clusters grouped by their values ([`Estimand::kinds`]): each kind's (sum, count) per term,
/// and how many clusters are of that kind.
#[derive(Default)]
struct Kinds {
    values: Vec<Vec<(f64, f64)>>,
    times: Vec<u64>,
}

impl Kinds {
    /// One resample's estimate: how many clusters of each kind `n` draws with replacement
    /// take (a multinomial, drawn as a binomial per kind), and the estimate they give.
    fn resample(&self, e: &Estimand, n: u64, rng: &mut ChaCha8Rng) -> Option<f64> {
        let t = e.terms.len();
        let mut totals = vec![(0.0, 0.0); t];
        let (mut draws, mut left) = (n, n);
        for (values, &times) in self.values.iter().zip(&self.times) {
            if draws == 0 {
                break;
            }
            let k = if times >= left {
                draws
            } else {
                BinomialDraw::new(draws, times as f64 / left as f64).map_or(0, |b| b.sample(rng))
            };
            draws -= k;
            left -= times;
            if k > 0 {
                for (tot, &(s, m)) in totals.iter_mut().zip(values) {
                    tot.0 += k as f64 * s;
                    tot.1 += k as f64 * m;
                }
            }
        }
        e.of_totals(&totals)
    }
}

/// An estimate with its interval.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Interval {
    pub estimate: f64,
    pub low: f64,
    pub high: f64,
    /// Two-sided p-value of "the quantity is 0", from the bootstrap distribution moved to
    /// that null (meaningful for differences).
    pub p_value: f64,
}

/// The intervals of `estimands`; `None` where an estimate is undefined, or where fewer than
/// half of the resamples define it (a category too small to resample). Every estimand has its
/// own resamples (its interval needs only its own distribution; a difference's two terms
/// share theirs, which is what pairs them), drawn the cheap way for its data: where its
/// clusters come in few kinds (0/1 metrics, or labels of similar sizes) as multinomial counts
/// of kinds, otherwise as `n` cluster draws, shared by those estimands.
pub fn intervals(
    estimands: &[Estimand],
    clusters: &Clusters,
    opts: &CiOptions,
) -> Result<Vec<Option<Interval>>> {
    opts.validate()?;
    let n = clusters.len();
    if n == 0 || estimands.is_empty() {
        return Ok(vec![None; estimands.len()]);
    }
    let kinds: Vec<Kinds> = estimands.par_iter().map(|e| e.kinds(n)).collect();
    // A binomial draw per kind (rand_distr's inversion or BTPE, with its set-up) costs about
    // what 64 cluster draws do (measured: bench/score_ci_cost.sh).
    let few = |k: &Kinds| k.times.len() * 64 <= n;
    let mut replicates: Vec<Vec<f64>> = vec![Vec::new(); estimands.len()];
    let by_kind: Vec<(usize, Vec<f64>)> = (0..estimands.len())
        .into_par_iter()
        .filter(|&e| few(&kinds[e]))
        .map(|e| {
            // This estimand's own stream: the same whatever else is computed beside it.
            let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
            rng.set_stream(1 << 32 | e as u64);
            let reps = (0..opts.resamples)
                .map(|_| {
                    kinds[e]
                        .resample(&estimands[e], n as u64, &mut rng)
                        .unwrap_or(f64::NAN)
                })
                .collect();
            (e, reps)
        })
        .collect();
    for (e, reps) in by_kind {
        replicates[e] = reps;
    }
    let direct: Vec<usize> = (0..estimands.len()).filter(|&e| !few(&kinds[e])).collect();
    if !direct.is_empty() {
        // resample b's value of each direct estimand (NaN: undefined).
        let rows: Vec<Vec<f64>> = (0..opts.resamples)
            .into_par_iter()
            .map_init(
                || vec![0u32; n],
                |w, b| {
                    draw(w, opts.seed, b as u64);
                    direct
                        .iter()
                        .map(|&e| estimands[e].under(w).unwrap_or(f64::NAN))
                        .collect()
                },
            )
            .collect();
        for (i, &e) in direct.iter().enumerate() {
            replicates[e] = rows.iter().map(|r| r[i]).collect();
        }
    }
    let normal = Normal::standard();
    let alpha = (1.0 - opts.level) / 2.0;
    let (z_lo, z_hi) = (normal.inverse_cdf(alpha), normal.inverse_cdf(1.0 - alpha));
    Ok(estimands
        .par_iter()
        .zip(replicates.into_par_iter())
        .zip(kinds.par_iter())
        .map(|((est, reps), kinds)| {
            let full = est.estimate()?;
            let mut reps: Vec<f64> = reps.into_iter().filter(|v| !v.is_nan()).collect();
            if reps.len() * 2 < opts.resamples {
                return None;
            }
            reps.sort_unstable_by(f64::total_cmp);
            let b = reps.len() as f64;
            let below = reps.iter().filter(|&&v| v < full).count() as f64;
            let equal = reps.iter().filter(|&&v| v == full).count() as f64;
            let share = ((below + 0.5 * equal) / b).clamp(0.5 / b, 1.0 - 0.5 / b);
            let z0 = normal.inverse_cdf(share);
            let a = est.acceleration(kinds, n);
            let adjust = |z: f64| {
                let t = z0 + z;
                normal.cdf(z0 + t / (1.0 - a * t))
            };
            let far = reps
                .iter()
                .filter(|&&v| (v - full).abs() >= full.abs())
                .count() as f64;
            Some(Interval {
                estimate: full,
                low: quantile(&reps, adjust(z_lo)),
                high: quantile(&reps, adjust(z_hi)),
                p_value: if full == 0.0 {
                    1.0
                } else {
                    ((1.0 + far) / (b + 1.0)).min(1.0)
                },
            })
        })
        .collect())
}

/// The interval of every metric of every group (`groups` as [`aggregate::groups`] gives them),
/// the queries resampled by `ci.by` over `labels`: `[group][metric]`.
pub fn group_intervals(
    pq: &PerQuery,
    groups: &[(String, Vec<usize>)],
    labels: &[Option<i64>],
    opts: AggregateOptions,
    ci: &CiOptions,
) -> Result<Vec<Vec<Option<Interval>>>> {
    let clusters = Clusters::new(ci.by, labels);
    let m = pq.metrics.len();
    let estimands: Vec<Estimand> = groups
        .iter()
        .flat_map(|(_, members)| {
            (0..m).map(|j| Estimand::mean(Ratio::of_metric(pq, members, j, opts, &clusters)))
        })
        .collect();
    let flat = intervals(&estimands, &clusters, ci)?;
    Ok(flat.chunks(m.max(1)).map(<[_]>::to_vec).collect())
}

/// [`aggregate::evaluate`] plus the interval of one key (`OVERALL/cmc/1`, the metric training
/// keeps its best checkpoint by) as `<key>/ci_low` and `<key>/ci_high`, queries resampled by
/// `ci.by` over `labels`: what training-time validation reports. A key that is not a mean of
/// the set gets no interval.
pub fn evaluate_with_interval(
    rel: &[aggregate::Relevance],
    categories: Option<&[Option<String>]>,
    labels: &[Option<i64>],
    set: &super::ranking::MetricSet,
    opts: AggregateOptions,
    ci: &CiOptions,
    key: &str,
) -> Result<aggregate::Scores> {
    set.validate()?;
    let metrics = set.metrics();
    let pq = PerQuery::compute(rel, &metrics);
    let groups = aggregate::groups(pq.len(), categories)?;
    let stats = aggregate::aggregate(&pq, categories, opts)?;
    let mut scores = aggregate::scores(&stats, &metrics, &aggregate::Extras::default());
    let found = groups.iter().find_map(|(name, members)| {
        metrics
            .iter()
            .position(|m| format!("{name}/{}", m.key()) == key)
            .map(|j| (members, j))
    });
    if let Some((members, j)) = found {
        let clusters = Clusters::new(ci.by, labels);
        let e = Estimand::mean(Ratio::of_metric(&pq, members, j, opts, &clusters));
        let iv = intervals(&[e], &clusters, ci)?[0];
        // Right after the key, as in metrics.json.
        let at = scores
            .entries
            .iter()
            .position(|(k, _)| k == key)
            .map_or(scores.entries.len(), |i| i + 1);
        scores
            .entries
            .insert(at, (format!("{key}/ci_low"), iv.map(|i| i.low)));
        scores
            .entries
            .insert(at + 1, (format!("{key}/ci_high"), iv.map(|i| i.high)));
    }
    Ok(scores)
}

/// Cluster counts of one resample: `n` draws with replacement, from the stream `b` of the
/// seed's ChaCha8 generator.
fn draw(w: &mut [u32], seed: u64, b: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(b);
    w.fill(0);
    let n = w.len() as u32;
    let reject_below = n.wrapping_neg() % n;
    let mut left = w.len();
    while left > 0 {
        // Two 32-bit draws per 64-bit output (cluster counts fit in 32 bits).
        let x = rng.next_u64();
        for half in [x as u32, (x >> 32) as u32] {
            if left > 0 {
                if let Some(c) = below(half, n, reject_below) {
                    w[c as usize] += 1;
                    left -= 1;
                }
            }
        }
    }
}

/// A uniform integer in [0, n) from 32 random bits, or `None` to draw again (Lemire's
/// multiply-and-reject, `reject_below` = 2^32 mod n: no modulo bias).
#[inline]
fn below(x: u32, n: u32, reject_below: u32) -> Option<u32> {
    let m = x as u64 * n as u64;
    ((m as u32) >= reject_below).then_some((m >> 32) as u32)
}

/// The `p` quantile of sorted values, linear between order statistics.
fn quantile(sorted: &[f64], p: f64) -> f64 {
    let h = (sorted.len() - 1) as f64 * p.clamp(0.0, 1.0);
    let (i, f) = (h.floor() as usize, h.fract());
    if i + 1 < sorted.len() {
        sorted[i] + f * (sorted[i + 1] - sorted[i])
    } else {
        sorted[i]
    }
}

/// McNemar's exact test of paired 0/1 outcomes: `b` queries the baseline got and the
/// candidate missed, `c` the other way. The two-sided binomial test of `min(b, c)` out of
/// `b + c` at 1/2 (scipy's `binomtest`, statsmodels' `mcnemar(exact=True)`).
pub fn mcnemar_exact(b: u64, c: u64) -> f64 {
    let n = b + c;
    if n == 0 {
        return 1.0;
    }
    let k = b.min(c);
    let tail = Binomial::new(0.5, n).map_or(1.0, |d| d.cdf(k));
    (2.0 * tail).min(1.0)
}

#[cfg(test)]
mod tests;
