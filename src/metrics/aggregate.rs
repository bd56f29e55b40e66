//! Per-query values, their means overall and per category, and the flat key map with OML's
//! key names (`OVERALL/cmc/1`, `<category>/map/5`, `OVERALL/pcf/0.5`).
use super::ranking::{Metric, MetricSet};
use crate::error::{Error, Result};
use rayon::prelude::*;
use std::collections::BTreeMap;

/// The name of the group of all queries.
pub const OVERALL: &str = "OVERALL";

/// One query's relevance: the hit flags of its ranked list (excluded rows removed) and its
/// number of positives over the whole gallery. What training-time validation hands over.
#[derive(Clone, Copy, Debug)]
pub struct Relevance<'a> {
    pub hits: &'a [bool],
    pub n_gt: usize,
}

/// One query's value of every metric, into `out`.
#[inline]
pub fn eval_row(metrics: &[Metric], r: Relevance, out: &mut [f64]) {
    for (o, metric) in out.iter_mut().zip(metrics) {
        *o = metric.eval(r.hits, r.n_gt);
    }
}

/// Every query's value of every metric, row-major `[query][metric]`.
#[derive(Clone, Debug, Default)]
pub struct PerQuery {
    pub metrics: Vec<Metric>,
    pub values: Vec<f64>,
    pub n_gt: Vec<usize>,
    pub n_retrieved: Vec<usize>,
}

impl PerQuery {
    pub fn len(&self) -> usize {
        self.n_gt.len()
    }

    pub fn is_empty(&self) -> bool {
        self.n_gt.is_empty()
    }

    /// The values of query `q`, one per metric.
    pub fn row(&self, q: usize) -> &[f64] {
        let m = self.metrics.len();
        &self.values[q * m..(q + 1) * m]
    }

    /// Computes every metric of every query (in parallel).
    pub fn compute(rel: &[Relevance], metrics: &[Metric]) -> PerQuery {
        let m = metrics.len();
        let mut values = vec![0.0; rel.len() * m];
        if m > 0 {
            values
                .par_chunks_mut(m)
                .zip(rel.par_iter())
                .for_each(|(out, r)| eval_row(metrics, *r, out));
        }
        PerQuery {
            metrics: metrics.to_vec(),
            values,
            n_gt: rel.iter().map(|r| r.n_gt).collect(),
            n_retrieved: rel.iter().map(|r| r.hits.len()).collect(),
        }
    }
}

/// The means of one group of queries (all of them, or one category's).
#[derive(Clone, Debug, PartialEq)]
pub struct GroupStats {
    pub name: String,
    pub n_queries: usize,
    pub n_without_positives: usize,
    /// One per metric; `None` when no query of the group has a defined value.
    pub means: Vec<Option<f64>>,
    /// One per metric: the queries left out of that mean (undefined value, or skipped).
    pub n_left_out: Vec<usize>,
}

/// How queries without positives enter the means.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AggregateOptions {
    /// Leave queries without positives out of every mean (pytorch-metric-learning's
    /// convention) instead of only out of the means where their value is undefined.
    pub skip_queries_without_positives: bool,
}

/// Means overall and per category (categories sorted by name; queries without a category
/// count in OVERALL only). Sums in f64, in query order, so results are reproducible.
pub fn aggregate(
    pq: &PerQuery,
    categories: Option<&[Option<String>]>,
    opts: AggregateOptions,
) -> Result<Vec<GroupStats>> {
    Ok(groups(pq.len(), categories)?
        .iter()
        .map(|(name, qs)| group(pq, name, qs, opts))
        .collect())
}

/// The groups of queries the means are over: `OVERALL` (every query) first, then each
/// category's queries, categories sorted by name.
pub fn groups(
    n_queries: usize,
    categories: Option<&[Option<String>]>,
) -> Result<Vec<(String, Vec<usize>)>> {
    let mut members: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    if let Some(cats) = categories {
        if cats.len() != n_queries {
            return Err(Error::internal(format!(
                "{} categories for {n_queries} queries",
                cats.len()
            )));
        }
        for (q, c) in cats.iter().enumerate() {
            if let Some(c) = c {
                members.entry(c.as_str()).or_default().push(q);
            }
        }
        if members.contains_key(OVERALL) {
            return Err(Error::input(format!(
                "a category is named '{OVERALL}', which is the key of all queries; rename it"
            )));
        }
    }
    let mut out = vec![(OVERALL.to_string(), (0..n_queries).collect())];
    out.extend(members.into_iter().map(|(n, qs)| (n.to_string(), qs)));
    Ok(out)
}

/// Whether query `q`'s value `v` enters a mean: not undefined (NaN), and not a query without
/// positives when those are skipped. The one rule of the means and of their intervals.
#[inline]
pub fn counts(pq: &PerQuery, q: usize, v: f64, opts: AggregateOptions) -> bool {
    !(v.is_nan() || (opts.skip_queries_without_positives && pq.n_gt[q] == 0))
}

fn group(pq: &PerQuery, name: &str, qs: &[usize], opts: AggregateOptions) -> GroupStats {
    let m = pq.metrics.len();
    let mut sum = vec![0.0f64; m];
    let mut n = vec![0usize; m];
    let mut without = 0;
    for &q in qs {
        if pq.n_gt[q] == 0 {
            without += 1;
        }
        for (j, &v) in pq.row(q).iter().enumerate() {
            if counts(pq, q, v, opts) {
                sum[j] += v;
                n[j] += 1;
            }
        }
    }
    GroupStats {
        name: name.to_string(),
        n_queries: qs.len(),
        n_without_positives: without,
        means: (0..m)
            .map(|j| (n[j] > 0).then(|| sum[j] / n[j] as f64))
            .collect(),
        n_left_out: n.iter().map(|&c| qs.len() - c).collect(),
    }
}

/// A float as Python's `repr` prints it (`0.5`, `0.01`, `1.0`, `1e-05`): OML's keys hold
/// pcf and fmr values printed that way.
pub fn python_float(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf" } else { "-inf" }.into();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    // Rust's `{:e}` gives the shortest digits that round-trip, as Python's repr does.
    let s = format!("{x:e}");
    let (mant, exp) = s.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("{:e} exponent is an integer");
    let (sign, mant) = match mant.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mant),
    };
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    let body = if (-4..16).contains(&exp) {
        if exp >= 0 {
            let int_len = exp as usize + 1;
            if digits.len() <= int_len {
                format!("{digits}{}.0", "0".repeat(int_len - digits.len()))
            } else {
                format!("{}.{}", &digits[..int_len], &digits[int_len..])
            }
        } else {
            format!("0.{}{digits}", "0".repeat((-exp - 1) as usize))
        }
    } else {
        let m = if digits.len() > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits.clone()
        };
        format!("{m}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
    };
    format!("{sign}{body}")
}

/// The flat result: keys in a fixed order, values `None` where undefined (JSON `null`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Scores {
    pub entries: Vec<(String, Option<f64>)>,
}

impl Scores {
    pub fn get(&self, key: &str) -> Option<Option<f64>> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
    }

    pub fn push(&mut self, key: String, value: Option<f64>) {
        self.entries.push((key, value));
    }

    /// One flat JSON object, keys in order; undefined values are `null`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        for (k, v) in &self.entries {
            let j = match v {
                // Counts are integers in JSON (`1000`, not `1000.0`).
                Some(x) if is_count_key(k) && x.fract() == 0.0 && *x >= 0.0 => {
                    serde_json::json!(*x as u64)
                }
                Some(x) if x.is_finite() => serde_json::json!(x),
                _ => serde_json::Value::Null,
            };
            m.insert(k.clone(), j);
        }
        serde_json::Value::Object(m)
    }
}

fn is_count_key(k: &str) -> bool {
    k.ends_with("/n_queries") || k.ends_with("/n_queries_without_positives")
}

/// Values at several parameters (PCF's variance shares, FNMR's FMRs): `(parameter, value)`.
pub type AtParams = Vec<(f64, Option<f64>)>;

/// Values computed outside the ranked lists: PCF per group and FNMR@FMR (OVERALL only).
#[derive(Clone, Debug, Default)]
pub struct Extras {
    /// (group name, [(variance r, value)]).
    pub pcf: Vec<(String, AtParams)>,
    /// [(fmr, value)], OVERALL only, as in OML.
    pub fnmr: AtParams,
    /// Confidence intervals `[group][metric]` as `(low, high)`, in the groups' order; empty
    /// when not computed (`--ci off`).
    pub ci: Vec<Vec<Option<(f64, f64)>>>,
}

/// Builds the flat key map: per group, the ranking metrics (each followed by its `ci_low` and
/// `ci_high` when intervals were computed), then `pcf/<r>`, then (OVERALL only)
/// `fnmr@fmr/<fmr>`, then `n_queries` and `n_queries_without_positives`.
pub fn scores(groups: &[GroupStats], metrics: &[Metric], extras: &Extras) -> Scores {
    let mut s = Scores::default();
    for (i, g) in groups.iter().enumerate() {
        for (j, (m, v)) in metrics.iter().zip(&g.means).enumerate() {
            s.push(format!("{}/{}", g.name, m.key()), *v);
            if let Some(ci) = extras.ci.get(i) {
                let (low, high) = (ci[j].map(|c| c.0), ci[j].map(|c| c.1));
                s.push(format!("{}/{}/ci_low", g.name, m.key()), low);
                s.push(format!("{}/{}/ci_high", g.name, m.key()), high);
            }
        }
        if let Some((_, pcf)) = extras.pcf.iter().find(|(n, _)| *n == g.name) {
            for (r, v) in pcf {
                s.push(format!("{}/pcf/{}", g.name, python_float(*r)), *v);
            }
        }
        if g.name == OVERALL {
            for (f, v) in &extras.fnmr {
                s.push(format!("{OVERALL}/fnmr@fmr/{}", python_float(*f)), *v);
            }
        }
        s.push(format!("{}/n_queries", g.name), Some(g.n_queries as f64));
        s.push(
            format!("{}/n_queries_without_positives", g.name),
            Some(g.n_without_positives as f64),
        );
    }
    s
}

/// The whole evaluation from per-query relevance, without files: what training-time
/// validation calls with its own neighbour lists (ground truth from `retrieval`).
pub fn evaluate(
    rel: &[Relevance],
    categories: Option<&[Option<String>]>,
    set: &MetricSet,
    opts: AggregateOptions,
) -> Result<Scores> {
    set.validate()?;
    let metrics = set.metrics();
    let pq = PerQuery::compute(rel, &metrics);
    let groups = aggregate(&pq, categories, opts)?;
    Ok(scores(&groups, &metrics, &Extras::default()))
}
