//! `simile-score compare`: two neighbour files of the same dataset and split (two models, or a
//! model before and after re-ranking) scored on the queries they share, each metric's paired
//! difference with its bootstrap interval and p-value (the same resamples for both, so the
//! models' shared luck cancels), McNemar's exact test for CMC@k, and the queries that
//! improved, worsened or stayed. Writes `compare.json` (+ manifest) and an optional per-query
//! table; nothing is written when the inputs are not comparable.
use super::aggregate::{self, AggregateOptions};
use super::confidence::{self, CiOptions, Clusters, Estimand, Ratio};
use super::ranking::{Metric, MetricSet};
use super::stage::{self, Computed, ScoreRequest};
use crate::error::{Error, Result};
use crate::io::seal_bytes;
use crate::manifest::ManifestBuilder;
use crate::table::{self, Meta};
use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Schema};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// What to compare and where to write it.
#[derive(Clone, Debug)]
pub struct CompareRequest {
    pub dataset: PathBuf,
    pub gallery_dataset: Option<PathBuf>,
    pub baseline: PathBuf,
    pub candidate: PathBuf,
    pub out: PathBuf,
    pub set: MetricSet,
    pub options: AggregateOptions,
    pub ci: CiOptions,
    pub per_query: Option<PathBuf>,
    pub gates: Vec<Gate>,
}

/// `--fail-if-worse METRIC[:MARGIN]`: the candidate fails when the whole interval of its
/// difference lies below `-margin` (significantly worse by more than the margin).
#[derive(Clone, Debug, PartialEq)]
pub struct Gate {
    /// A full key (`OVERALL/cmc/1`, `<category>/map/5`).
    pub key: String,
    pub margin: f64,
}

impl std::str::FromStr for Gate {
    type Err = String;
    /// `cmc/1`, `OVERALL/cmc/1`, `cmc@1`, each optionally `:0.01`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (key, margin) = match s.rsplit_once(':') {
            Some((k, m)) => (
                k,
                m.trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|m| m.is_finite() && *m >= 0.0)
                    .ok_or_else(|| {
                        format!("'{s}': the margin after ':' must be a number >= 0 (a share, e.g. 0.01)")
                    })?,
            ),
            None => (s, 0.0),
        };
        let mut key = key.trim().to_string();
        // `cmc@1` as the per-query table's columns write it; `map@r` is a key itself.
        if let Some((name, k)) = key.rsplit_once('@') {
            if !k.is_empty() && k.chars().all(|c| c.is_ascii_digit()) {
                key = format!("{name}/{k}");
            }
        }
        if key.is_empty() {
            return Err(format!(
                "'{s}': expected a metric such as cmc/1 or OVERALL/map/5"
            ));
        }
        // A metric key has one '/' before a cut-off (`cmc/1`) and none otherwise (`mrr`);
        // more is a group's prefix.
        let parts = key.split('/').count();
        let has_k = key
            .rsplit('/')
            .next()
            .is_some_and(|k| k.chars().all(|c| c.is_ascii_digit()));
        let prefixed = if has_k { parts >= 3 } else { parts >= 2 };
        if !prefixed {
            key = format!("{}/{key}", aggregate::OVERALL);
        }
        Ok(Gate { key, margin })
    }
}

/// One metric of one group, compared.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub key: String,
    pub baseline: Option<f64>,
    pub candidate: Option<f64>,
    /// candidate - baseline, with its interval and p-value (paired bootstrap).
    pub difference: Option<f64>,
    pub ci_low: Option<f64>,
    pub ci_high: Option<f64>,
    pub p_value: Option<f64>,
    /// McNemar's exact test (CMC@k only: a hit or a miss per query).
    pub mcnemar_p_value: Option<f64>,
    /// Queries whose value went up, down, or stayed (among those both means count).
    pub improved: u64,
    pub worsened: u64,
    pub unchanged: u64,
}

impl Row {
    /// The gate's verdict: significantly worse by more than `margin`.
    pub fn worse_beyond(&self, margin: f64) -> bool {
        self.ci_high.is_some_and(|h| h < -margin)
    }
}

/// Everything computed, before anything is written.
pub struct Compared {
    pub rows: Vec<Row>,
    pub baseline: Computed,
    pub candidate: Computed,
    pub started: Instant,
    pub timings: Vec<(&'static str, f64)>,
}

impl Compared {
    pub fn row(&self, key: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.key == key)
    }

    /// The gates that fail, with their rows.
    pub fn failed<'a>(&'a self, gates: &'a [Gate]) -> Vec<(&'a Gate, &'a Row)> {
        gates
            .iter()
            .filter_map(|g| self.row(&g.key).map(|r| (g, r)))
            .filter(|(g, r)| r.worse_beyond(g.margin))
            .collect()
    }
}

fn score_request(req: &CompareRequest, neighbors: &Path) -> ScoreRequest {
    ScoreRequest {
        dataset: req.dataset.clone(),
        gallery_dataset: req.gallery_dataset.clone(),
        neighbors: neighbors.to_path_buf(),
        out: req.out.clone(),
        set: req.set.clone(),
        fmr: Vec::new(),
        pcf: Vec::new(),
        embeddings: None,
        gallery_embeddings: None,
        per_query: None,
        options: req.options,
        ci: None,
    }
}

/// Reads, checks and compares; writes nothing.
pub fn compute(req: &CompareRequest) -> Result<Compared> {
    let t0 = Instant::now();
    req.ci.validate()?;
    if req.baseline == req.candidate {
        return Err(Error::input(format!(
            "--baseline and --candidate are the same file ({}): compare two neighbour files",
            req.baseline.display()
        )));
    }
    let mut outputs: Vec<&Path> = vec![&req.out];
    outputs.extend(req.per_query.as_deref());
    let inputs = [
        ("dataset", req.dataset.as_path()),
        ("baseline", req.baseline.as_path()),
        ("candidate", req.candidate.as_path()),
    ];
    crate::manifest::refuse_overlap(&inputs, &outputs)?;
    if let Some(pq) = &req.per_query {
        if pq == &req.out || !crate::io::same_folder(pq, &req.out) {
            return Err(Error::input(format!(
                "--per-query {}: must be another file in the folder of --out ({})",
                pq.display(),
                crate::io::parent_dir(&req.out).display()
            )));
        }
    }
    // Each file is checked against the dataset (its fingerprint, split and sizes) by the
    // scoring itself; what is left is that they hold the same queries.
    let a = stage::compute(&score_request(req, &req.baseline))?;
    let b = stage::compute(&score_request(req, &req.candidate))?;
    comparable(req, &a, &b)?;
    let t = Instant::now();
    let rows = paired_rows(&a, &b, req.options, &req.ci)?;
    for g in &req.gates {
        if !rows.iter().any(|r| r.key == g.key) {
            return Err(Error::input(format!(
                "--fail-if-worse {}: not a computed metric; the comparison has {}",
                g.key,
                rows.iter()
                    .map(|r| r.key.as_str())
                    .take(12)
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    Ok(Compared {
        rows,
        baseline: a,
        candidate: b,
        started: t0,
        timings: vec![("compare", t.elapsed().as_secs_f64())],
    })
}

/// Both files must describe the same searches: the same split (or sides), the same queries
/// and the same gallery.
fn comparable(req: &CompareRequest, a: &Computed, b: &Computed) -> Result<()> {
    let differ = |what: &str, x: String, y: String| {
        Error::input(format!(
            "--baseline {} and --candidate {} are not comparable: {what} differ ({x} vs {y}); compare neighbour files of the same dataset and split",
            req.baseline.display(),
            req.candidate.display()
        ))
    };
    if a.meta.split != b.meta.split {
        return Err(differ(
            "their splits",
            format!("{:?}", a.meta.split),
            format!("{:?}", b.meta.split),
        ));
    }
    if a.meta.gallery_dataset_fingerprint != b.meta.gallery_dataset_fingerprint {
        return Err(differ(
            "their gallery datasets",
            format!("{:?}", a.meta.gallery_dataset_fingerprint),
            format!("{:?}", b.meta.gallery_dataset_fingerprint),
        ));
    }
    if a.qg.queries.ids != b.qg.queries.ids {
        return Err(differ(
            "their query sets",
            format!("{} queries", a.qg.queries.len()),
            format!("{} queries", b.qg.queries.len()),
        ));
    }
    if a.qg.gallery.ids != b.qg.gallery.ids {
        return Err(differ(
            "their galleries",
            format!("{} rows", a.qg.gallery.len()),
            format!("{} rows", b.qg.gallery.len()),
        ));
    }
    Ok(())
}

fn paired_rows(
    a: &Computed,
    b: &Computed,
    opts: AggregateOptions,
    ci: &CiOptions,
) -> Result<Vec<Row>> {
    let queries = &a.qg.queries;
    let categories: Option<&[Option<String>]> = queries
        .category
        .iter()
        .any(Option::is_some)
        .then_some(&queries.category[..]);
    let groups = aggregate::groups(queries.len(), categories)?;
    let clusters = Clusters::new(ci.by, &queries.labels);
    let metrics: Vec<Metric> = a.per_query.metrics.clone();
    let (pa, pb) = (&a.per_query, &b.per_query);
    let mut estimands = Vec::new();
    for (_, members) in &groups {
        for j in 0..metrics.len() {
            estimands.push(Estimand::difference(
                Ratio::of_metric(pb, members, j, opts, &clusters),
                Ratio::of_metric(pa, members, j, opts, &clusters),
            ));
        }
    }
    let intervals = confidence::intervals(&estimands, &clusters, ci)?;
    let mut rows = Vec::new();
    for (gi, (name, members)) in groups.iter().enumerate() {
        for (j, m) in metrics.iter().enumerate() {
            let iv = intervals[gi * metrics.len() + j];
            let (mut up, mut down, mut same) = (0u64, 0u64, 0u64);
            let (mut lost, mut won) = (0u64, 0u64);
            for &q in members {
                let (x, y) = (pa.row(q)[j], pb.row(q)[j]);
                if !aggregate::counts(pa, q, x, opts) || !aggregate::counts(pb, q, y, opts) {
                    continue;
                }
                if y > x {
                    up += 1;
                } else if y < x {
                    down += 1;
                } else {
                    same += 1;
                }
                if x >= 0.5 && y < 0.5 {
                    lost += 1;
                } else if x < 0.5 && y >= 0.5 {
                    won += 1;
                }
            }
            let mean_a = a.groups[gi].means[j];
            let mean_b = b.groups[gi].means[j];
            rows.push(Row {
                key: format!("{name}/{}", m.key()),
                baseline: mean_a,
                candidate: mean_b,
                difference: mean_a.zip(mean_b).map(|(x, y)| y - x),
                ci_low: iv.map(|i| i.low),
                ci_high: iv.map(|i| i.high),
                p_value: iv.map(|i| i.p_value),
                mcnemar_p_value: matches!(m, Metric::Cmc(_))
                    .then(|| confidence::mcnemar_exact(lost, won)),
                improved: up,
                worsened: down,
                unchanged: same,
            });
        }
    }
    Ok(rows)
}

/// `compare.json`: one object per key (schemas/compare.md).
pub fn to_json(rows: &[Row]) -> serde_json::Value {
    let num = |v: Option<f64>| match v {
        Some(x) if x.is_finite() => serde_json::json!(x),
        _ => serde_json::Value::Null,
    };
    let mut m = serde_json::Map::new();
    for r in rows {
        let mut o = serde_json::Map::new();
        o.insert("baseline".into(), num(r.baseline));
        o.insert("candidate".into(), num(r.candidate));
        o.insert("difference".into(), num(r.difference));
        o.insert("ci_low".into(), num(r.ci_low));
        o.insert("ci_high".into(), num(r.ci_high));
        o.insert("p_value".into(), num(r.p_value));
        if r.mcnemar_p_value.is_some() {
            o.insert("mcnemar_p_value".into(), num(r.mcnemar_p_value));
        }
        o.insert("improved".into(), r.improved.into());
        o.insert("worsened".into(), r.worsened.into());
        o.insert("unchanged".into(), r.unchanged.into());
        m.insert(r.key.clone(), serde_json::Value::Object(o));
    }
    serde_json::Value::Object(m)
}

/// The rows of a `compare.json` written by [`write`] (to show an up-to-date comparison).
pub fn read(path: &Path) -> Result<Vec<Row>> {
    let bad = |what: String| Error::input(format!("{}: {what}", path.display()));
    let text = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let v: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| bad("not a JSON object".into()))?;
    obj.iter()
        .map(|(key, o)| {
            let f = |name: &str| o.get(name).and_then(serde_json::Value::as_f64);
            let n = |name: &str| {
                o.get(name)
                    .and_then(serde_json::Value::as_u64)
                    .ok_or_else(|| bad(format!("{key}: no count '{name}'")))
            };
            Ok(Row {
                key: key.clone(),
                baseline: f("baseline"),
                candidate: f("candidate"),
                difference: f("difference"),
                ci_low: f("ci_low"),
                ci_high: f("ci_high"),
                p_value: f("p_value"),
                mcnemar_p_value: f("mcnemar_p_value"),
                improved: n("improved")?,
                worsened: n("worsened")?,
                unchanged: n("unchanged")?,
            })
        })
        .collect()
}

/// The manifest's parameters and inputs, known before anything is read.
pub fn plan(req: &CompareRequest) -> Result<ManifestBuilder> {
    let params = serde_json::json!({
        "metrics": req.set.metrics().iter().map(Metric::key).collect::<Vec<_>>(),
        "skip_queries_without_positives": req.options.skip_queries_without_positives,
        "ci": req.ci.to_json(),
    });
    let mut m = ManifestBuilder::new("compare", params);
    m.input("dataset", &req.dataset)?;
    if let Some(g) = &req.gallery_dataset {
        m.input("gallery_dataset", g)?;
    }
    m.input("baseline", &req.baseline)?;
    m.input("candidate", &req.candidate)?;
    if let Some(p) = &req.per_query {
        m.companion(p);
    }
    Ok(m)
}

/// Stops with `Error::UpToDate` when `req.out` is up to date (and reuse is allowed).
pub fn skip_if_done(req: &CompareRequest) -> Result<()> {
    let present = [&req.dataset, &req.baseline, &req.candidate]
        .iter()
        .all(|p| p.is_file())
        && req.gallery_dataset.as_deref().is_none_or(Path::is_file);
    if !present {
        return Ok(());
    }
    plan(req)?.skip_if_done(&req.out)
}

/// Writes `compare.json`, the per-query table and the manifest, as one set.
pub fn write(req: &CompareRequest, c: &Compared) -> Result<()> {
    let per_query = match &req.per_query {
        Some(p) => Some(seal_per_query(p, c)?),
        None => None,
    };
    let mut json =
        serde_json::to_vec_pretty(&to_json(&c.rows)).map_err(|e| Error::internal(e.to_string()))?;
    json.push(b'\n');
    let sealed = seal_bytes(&req.out, &json)?;
    let mut m = plan(req)?;
    m.note("split", serde_json::json!(c.baseline.meta.split));
    m.rows("queries", c.baseline.qg.queries.len() as u64);
    m.rows("gallery", c.baseline.qg.gallery.len() as u64);
    for (k, v) in &c.timings {
        m.timing(k, *v);
    }
    m.timing("total", c.started.elapsed().as_secs_f64());
    m.commit(sealed, per_query.into_iter().collect())?;
    Ok(())
}

pub const PER_QUERY_SCHEMA_VERSION: &str = "1";

/// One row per query: id, label, category, then each metric's baseline and candidate values
/// (`<column>_baseline`, `<column>_candidate`; null where undefined). `schemas/compare.md`.
fn seal_per_query(dest: &Path, c: &Compared) -> Result<crate::io::Sealed> {
    let (pa, pb) = (&c.baseline.per_query, &c.candidate.per_query);
    let (mut fields, mut cols) = stage::query_columns(&c.baseline.qg.queries);
    for (j, m) in pa.metrics.iter().enumerate() {
        for (side, pq) in [("baseline", pa), ("candidate", pb)] {
            fields.push(Field::new(
                format!("{}_{side}", m.column()),
                DataType::Float64,
                true,
            ));
            cols.push(stage::metric_column(pq, j));
        }
    }
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), cols)
        .map_err(|e| Error::internal(e.to_string()))?;
    let mut meta = Meta::new();
    meta.insert("simile.artifact".into(), "compare_per_query".into());
    meta.insert(
        "simile.schema_version".into(),
        PER_QUERY_SCHEMA_VERSION.into(),
    );
    table::seal_parquet(dest, &batch, &meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gates_parse_as_users_write_them() {
        let g: Gate = "cmc/1".parse().unwrap();
        assert_eq!((g.key.as_str(), g.margin), ("OVERALL/cmc/1", 0.0));
        let g: Gate = "cmc@5:0.01".parse().unwrap();
        assert_eq!((g.key.as_str(), g.margin), ("OVERALL/cmc/5", 0.01));
        let g: Gate = "shoes/map/5:0.02".parse().unwrap();
        assert_eq!((g.key.as_str(), g.margin), ("shoes/map/5", 0.02));
        let g: Gate = "mrr".parse().unwrap();
        assert_eq!(g.key, "OVERALL/mrr");
        let g: Gate = "map@r".parse().unwrap();
        assert_eq!(g.key, "OVERALL/map@r");
        let g: Gate = "shoes/mrr".parse().unwrap();
        assert_eq!(g.key, "shoes/mrr");
        assert!("cmc/1:-1".parse::<Gate>().is_err());
        assert!("cmc/1:x".parse::<Gate>().is_err());
        assert!("".parse::<Gate>().is_err());
        let row = Row {
            key: "OVERALL/cmc/1".into(),
            baseline: Some(0.9),
            candidate: Some(0.85),
            difference: Some(-0.05),
            ci_low: Some(-0.08),
            ci_high: Some(-0.02),
            p_value: Some(0.001),
            mcnemar_p_value: None,
            improved: 1,
            worsened: 5,
            unchanged: 10,
        };
        assert!(row.worse_beyond(0.0));
        assert!(row.worse_beyond(0.01));
        assert!(!row.worse_beyond(0.03));
    }
}
