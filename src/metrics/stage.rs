//! The `simile-score` stage: dataset + neighbours (+ embeddings) in, `metrics.json` (and an
//! optional per-query table) out. The binary only parses flags and prints.
use super::aggregate::{self, AggregateOptions, AtParams, Extras, GroupStats, PerQuery, Scores};
use super::confidence::{self, CiOptions, Interval};
use super::embeddings::{self, Embeddings, Item};
use super::lists::{self, ScanSpec};
use super::ranking::{Metric, MetricSet};
use super::{fnmr, pcf};
use crate::dataset::{Dataset, Split};
use crate::error::{Error, Result};
use crate::io::{seal_bytes, Fingerprint};
use crate::manifest::ManifestBuilder;
use crate::neighbors::NeighborsMeta;
use crate::retrieval::{QueryGallery, SequenceRule};
use crate::table::{self, Meta};
use arrow::array::{ArrayRef, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// What to score and where to write it.
#[derive(Clone, Debug)]
pub struct ScoreRequest {
    /// The dataset the neighbours were computed from (the query dataset of a two-sided file).
    pub dataset: PathBuf,
    /// The gallery dataset of a two-sided neighbours file.
    pub gallery_dataset: Option<PathBuf>,
    pub neighbors: PathBuf,
    pub out: PathBuf,
    pub set: MetricSet,
    pub fmr: Vec<f64>,
    pub pcf: Vec<f64>,
    /// Embeddings of `dataset` (queries' side), for FNMR@FMR and PCF.
    pub embeddings: Option<PathBuf>,
    /// Embeddings of `gallery_dataset`, for a two-sided file.
    pub gallery_embeddings: Option<PathBuf>,
    pub per_query: Option<PathBuf>,
    pub options: AggregateOptions,
    /// Confidence intervals of the means (`--ci`); `None`: `--ci off`.
    pub ci: Option<CiOptions>,
}

impl ScoreRequest {
    /// The files scored, by what they are.
    pub fn inputs(&self) -> Vec<(&'static str, &Path)> {
        let mut v: Vec<(&str, &Path)> =
            vec![("dataset", &self.dataset), ("neighbours", &self.neighbors)];
        v.extend(
            self.gallery_dataset
                .as_deref()
                .map(|p| ("gallery dataset", p)),
        );
        v.extend(self.embeddings.as_deref().map(|p| ("embeddings", p)));
        v.extend(
            self.gallery_embeddings
                .as_deref()
                .map(|p| ("gallery embeddings", p)),
        );
        v
    }
}

/// Everything computed, before anything is written.
pub struct Computed {
    /// Queries with candidates but no row in the neighbours file (scored as empty lists).
    pub queries_without_rows: usize,
    pub qg: QueryGallery,
    pub per_query: PerQuery,
    pub groups: Vec<GroupStats>,
    /// `[group][metric]`, when intervals were asked for.
    pub intervals: Option<Vec<Vec<Option<Interval>>>>,
    pub scores: Scores,
    pub meta: NeighborsMeta,
    pub n_rows: usize,
    /// Where FNMR@FMR came from: "neighbors" (an exhaustive file) or "embeddings".
    pub fnmr_source: Option<&'static str>,
    pub timings: Vec<(&'static str, f64)>,
    pub started: Instant,
}

/// What a run wrote.
pub struct Outcome {
    pub computed: Computed,
}

/// Scores and writes `metrics.json` (+ manifest) and the per-query table. Every check runs
/// before the first write, so bad input leaves no output.
pub fn run(req: &ScoreRequest) -> Result<Outcome> {
    let computed = compute(req)?;
    write(req, &computed)?;
    Ok(Outcome { computed })
}

fn fingerprint_check(
    neighbors: &Path,
    what: &str,
    recorded: Option<&str>,
    dataset: &Path,
) -> Result<()> {
    let now = Fingerprint::of(dataset)?.hash;
    match recorded {
        Some(r) if r == now => Ok(()),
        Some(r) if !r.is_empty() => Err(Error::input(format!(
            "{} was computed from a different {what}: its metadata records fingerprint {r}, but {} is {now}; score it against the dataset it was made from, or re-run simile-distance",
            neighbors.display(),
            dataset.display()
        ))),
        _ => Err(Error::input(format!(
            "{}: its metadata records no {what} fingerprint (simile.{}), so it cannot be checked against {}; write it with simile-distance",
            neighbors.display(),
            if what == "dataset" { "dataset_fingerprint" } else { "gallery_dataset_fingerprint" },
            dataset.display()
        ))),
    }
}

/// Reads, checks and computes everything; writes nothing.
pub fn compute(req: &ScoreRequest) -> Result<Computed> {
    let t0 = Instant::now();
    let mut timings = Vec::new();
    req.set.validate()?;
    if let Some(ci) = &req.ci {
        ci.validate()?;
    }
    fnmr::check_fmr(&req.fmr)?;
    pcf::check_pcf(&req.pcf)?;
    if !req.pcf.is_empty() && req.embeddings.is_none() {
        return Err(Error::input(
            "--pcf needs the embeddings: give --embeddings emb.npy",
        ));
    }
    let mut outputs: Vec<&Path> = vec![&req.out];
    outputs.extend(req.per_query.as_deref());
    crate::manifest::refuse_overlap(&req.inputs(), &outputs)?;
    if let Some(pq) = &req.per_query {
        if pq == &req.out {
            return Err(Error::input(
                "--per-query and --out name the same file; choose two paths",
            ));
        }
        // One manifest describes metrics.json and its per-query table, by name in its folder.
        if !crate::io::same_folder(pq, &req.out) {
            return Err(Error::input(format!(
                "--per-query {}: must be in the folder of --out ({}): the table is part of the output set that {}'s manifest describes",
                pq.display(),
                crate::io::parent_dir(&req.out).display(),
                req.out.display()
            )));
        }
    }

    // The neighbours' metadata first: it names the split and the dataset it was made from.
    crate::parts::refuse_part(&req.neighbors)?;
    let meta = NeighborsMeta::from_kv(&req.neighbors, &table::read_meta(&req.neighbors)?)?;
    if !meta.complete {
        return Err(Error::input(format!(
            "{} is a shard part (simile.complete=false); join the parts with `simile-distance merge` first",
            req.neighbors.display()
        )));
    }
    let kind = embeddings::distance_of(&meta.metric)?;
    fingerprint_check(
        &req.neighbors,
        "dataset",
        Some(&meta.dataset_fingerprint),
        &req.dataset,
    )?;
    let ds = Dataset::read(&req.dataset)?;
    timings.push(("read_dataset_file", t0.elapsed().as_secs_f64()));
    let (qg, gds, split) = match (&meta.split, &meta.gallery_dataset) {
        (Some(s), None) => {
            if req.gallery_dataset.is_some() || req.gallery_embeddings.is_some() {
                return Err(Error::input(format!(
                    "{} searched one dataset (split '{s}'); --gallery-dataset and --gallery-embeddings are for two-sided files",
                    req.neighbors.display()
                )));
            }
            let split: Split = s.parse().map_err(|e: String| {
                Error::input(format!(
                    "{}: metadata simile.split: {e}",
                    req.neighbors.display()
                ))
            })?;
            (
                QueryGallery::from_dataset(&ds, split, SequenceRule::default())?,
                None,
                Some(split),
            )
        }
        _ => {
            let Some(gpath) = &req.gallery_dataset else {
                return Err(Error::input(format!(
                    "{} searched a query dataset against a gallery dataset ({}); give that one with --gallery-dataset",
                    req.neighbors.display(),
                    meta.gallery_dataset.as_deref().unwrap_or("not named")
                )));
            };
            fingerprint_check(
                &req.neighbors,
                "gallery dataset",
                meta.gallery_dataset_fingerprint.as_deref(),
                gpath,
            )?;
            let gds = Dataset::read(gpath)?;
            let (qs, gs) = meta.two_sided_splits(&req.neighbors)?;
            let qg = QueryGallery::two_sided(&ds, qs, &gds, gs, SequenceRule::default())?;
            (qg, Some(gds), None)
        }
    };
    if meta.n_queries != qg.queries.len() || meta.n_gallery != qg.gallery.len() {
        return Err(Error::input(format!(
            "{} searched {} queries and {} gallery rows, but {} has {} queries and {} gallery rows{}; it was made from other query/gallery flags",
            req.neighbors.display(),
            meta.n_queries,
            meta.n_gallery,
            req.dataset.display(),
            qg.queries.len(),
            qg.gallery.len(),
            split.map(|s| format!(" in split '{s}'")).unwrap_or_default()
        )));
    }
    if qg.queries.labels.iter().all(Option::is_none) {
        return Err(Error::input(format!(
            "{}: the queries have no labels, so there is nothing to score",
            req.dataset.display()
        )));
    }
    timings.push(("read_dataset", t0.elapsed().as_secs_f64()));

    // Ground truth over the whole gallery, then the k rules.
    let t = Instant::now();
    let checker = lists::Checker::new(&qg);
    let n_gt = checker.positive_counts();
    timings.push(("ground_truth", t.elapsed().as_secs_f64()));
    let exhaustive = meta.k >= qg.gallery.len();
    let metrics = req.set.metrics();
    if !exhaustive {
        if let Some(m) = metrics.iter().find(|m| m.k().is_some_and(|k| k > meta.k)) {
            return Err(Error::input(format!(
                "{} is larger than the neighbours file's k = {}: OML would retrieve {} items and give a different number. Re-run simile-distance with --top-k {} or more, or ask for k <= {}",
                m.key().replace('/', "@"),
                meta.k,
                m.k().unwrap_or(0),
                req.set.max_k(),
                meta.k
            )));
        }
        if req.set.needs_all_positives() {
            if let Some((q, &most)) = n_gt.iter().enumerate().max_by_key(|(_, &n)| n) {
                if most > meta.k {
                    return Err(Error::input(format!(
                        "MAP@R and R-Precision read the first R = (number of positives) items of every list; query id {} has {most} positives but the neighbours file's k is {}. Re-run simile-distance with --top-k {most} or more",
                        qg.queries.ids[q], meta.k
                    )));
                }
            }
        }
    }
    let fnmr_from_file = !req.fmr.is_empty() && exhaustive;
    if !req.fmr.is_empty() && !exhaustive && req.embeddings.is_none() {
        return Err(Error::input(format!(
            "--fmr needs every non-excluded (query, gallery) pair: give --embeddings emb.npy, or a neighbours file searched with --top-k {} (the gallery size) or more; this one has k = {}",
            qg.gallery.len(),
            meta.k
        )));
    }
    // Embeddings are opened (and checked) before the long work.
    let need_emb = !req.pcf.is_empty() || (!req.fmr.is_empty() && !fnmr_from_file);
    let embs: Option<(Embeddings, Option<Embeddings>)> = if need_emb {
        let e = req.embeddings.as_ref().expect("checked above");
        // FNMR and PCF must describe the embeddings the lists were searched in.
        crate::manifest::check_upstream(&req.neighbors, "embeddings", e)?;
        let (qs, gs) = match &gds {
            None => (split, None),
            Some(_) => meta.two_sided_splits(&req.neighbors)?,
        };
        let q = Embeddings::open(e, &ds, qs)?;
        let g = match &gds {
            None => None,
            Some(gds) => {
                let Some(ge) = &req.gallery_embeddings else {
                    return Err(Error::input(
                        "a two-sided neighbours file needs --gallery-embeddings too for --fmr or --pcf",
                    ));
                };
                crate::manifest::check_upstream(&req.neighbors, "gallery_embeddings", ge)?;
                Some(Embeddings::open(ge, gds, gs)?)
            }
        };
        Some((q, g))
    } else {
        None
    };

    let t = Instant::now();
    let sides = match &gds {
        None => {
            let s = format!(
                "{} split '{}'",
                req.dataset.display(),
                split.map(|s| s.as_str()).unwrap_or("")
            );
            (s.clone(), s)
        }
        Some(g) => (
            req.dataset.display().to_string(),
            g.file.display().to_string(),
        ),
    };
    let scan = lists::scan(
        &req.neighbors,
        &ScanSpec {
            qg: &qg,
            checker: &checker,
            sides: (&sides.0, &sides.1),
            metrics: &metrics,
            n_gt: &n_gt,
            keep_distance: fnmr_from_file,
        },
    )?;
    if meta.k > 0 {
        if let Some(q) = (0..qg.queries.len()).find(|&q| scan.n_retrieved[q] > meta.k) {
            return Err(Error::input(format!(
                "{}: query_id {} has {} neighbours, more than the file's k = {}",
                req.neighbors.display(),
                qg.queries.ids[q],
                scan.n_retrieved[q],
                meta.k
            )));
        }
    }
    // A query with candidates but no row in the file: the file may have been cut or filtered
    // (or a threshold left the list empty); it is scored as an empty list, and said so.
    let candidates = qg.candidate_counts();
    // A list shorter than min(k, its candidates) was cut after the search (by hand or by
    // another program): precision and the like would be scored over the wrong depth. Only
    // OML's thresholding shortens lists on purpose.
    let thresholded =
        meta.extra.get("simile.rerank.method").map(String::as_str) == Some("threshold");
    let short: Vec<usize> = (0..qg.queries.len())
        .filter(|&q| {
            let n = scan.n_retrieved[q];
            n > 0 && n < meta.k.min(candidates[q])
        })
        .collect();
    if !thresholded && !short.is_empty() {
        let q = short[0];
        return Err(Error::input(format!(
            "{}: {} of {} queries have lists shorter than min(k = {}, their candidates after exclusions), e.g. query id {} has {} rows where {} were searched for; the file was cut after the search. Re-run simile-distance (or simile-rerank) to get whole lists",
            req.neighbors.display(),
            short.len(),
            qg.queries.len(),
            meta.k,
            qg.queries.ids[q],
            scan.n_retrieved[q],
            meta.k.min(candidates[q])
        )));
    }
    let missing: Vec<i64> = (0..qg.queries.len())
        .filter(|&q| scan.n_retrieved[q] == 0 && candidates[q] > 0)
        .map(|q| qg.queries.ids[q])
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "warning: {}: {} of {} queries have no rows though the gallery has candidates for them (query ids {}{}); they are scored as empty lists (misses)",
            req.neighbors.display(),
            missing.len(),
            qg.queries.len(),
            missing
                .iter()
                .take(5)
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            if missing.len() > 5 { ", ..." } else { "" }
        );
    }
    timings.push(("scan_neighbors", t.elapsed().as_secs_f64()));
    let t = Instant::now();
    let per_query = PerQuery {
        metrics: metrics.clone(),
        values: scan.values,
        n_gt,
        n_retrieved: scan.n_retrieved,
    };
    let categories: Option<&[Option<String>]> = qg
        .queries
        .category
        .iter()
        .any(Option::is_some)
        .then_some(&qg.queries.category[..]);
    let groups = aggregate::aggregate(&per_query, categories, req.options)?;
    timings.push(("metrics", t.elapsed().as_secs_f64()));
    let intervals = match &req.ci {
        Some(ci) => {
            let t = Instant::now();
            let members = aggregate::groups(per_query.len(), categories)?;
            let v = confidence::group_intervals(
                &per_query,
                &members,
                &qg.queries.labels,
                req.options,
                ci,
            )?;
            timings.push(("intervals", t.elapsed().as_secs_f64()));
            Some(v)
        }
        None => None,
    };

    let mut extras = Extras::default();
    let mut fnmr_source = None;
    if !req.fmr.is_empty() {
        let t = Instant::now();
        extras.fnmr = if fnmr_from_file {
            fnmr_source = Some("neighbors");
            let mut neg = scan.neg;
            req.fmr
                .iter()
                .copied()
                .zip(fnmr::fnmr_at_fmr(&scan.pos, &mut neg, &req.fmr))
                .collect()
        } else {
            fnmr_source = Some("embeddings");
            let (q, g) = embs.as_ref().expect("opened above");
            let v =
                embeddings::fnmr_from_embeddings(&qg, q, g.as_ref().unwrap_or(q), kind, &req.fmr)?;
            req.fmr.iter().copied().zip(v).collect()
        };
        timings.push(("fnmr", t.elapsed().as_secs_f64()));
    }
    if !req.pcf.is_empty() {
        let t = Instant::now();
        let (q, g) = embs.as_ref().expect("opened above");
        let g = g.as_ref().unwrap_or(q);
        extras.pcf = pcf_groups(&qg, q, g, &groups, &req.pcf)?;
        timings.push(("pcf", t.elapsed().as_secs_f64()));
    }
    if let Some(iv) = &intervals {
        extras.ci = iv
            .iter()
            .map(|g| g.iter().map(|i| i.map(|i| (i.low, i.high))).collect())
            .collect();
    }
    let scores = aggregate::scores(&groups, &metrics, &extras);
    Ok(Computed {
        intervals,
        queries_without_rows: missing.len(),
        n_rows: scan.rows,
        qg,
        per_query,
        groups,
        scores,
        meta,
        fnmr_source,
        timings,
        started: t0,
    })
}

/// PCF overall and per category, over all items (queries and gallery rows alike, each
/// once) as OML computes it on its validation set.
fn pcf_groups(
    qg: &QueryGallery,
    q_emb: &Embeddings,
    g_emb: &Embeddings,
    groups: &[GroupStats],
    r: &[f64],
) -> Result<Vec<(String, AtParams)>> {
    let same = std::ptr::eq(q_emb, g_emb);
    let q_rows = q_emb.rows_of(&qg.queries.ids)?;
    let g_rows = g_emb.rows_of(&qg.gallery.ids)?;
    // (item, category); in the one-dataset form a row that is both query and gallery is
    // one item.
    let mut items: Vec<(Item, Option<&str>)> = Vec::new();
    for (i, &row) in q_rows.iter().enumerate() {
        items.push((Item { source: 0, row }, qg.queries.category[i].as_deref()));
    }
    let gsrc = if same { 0 } else { 1 };
    for (i, &row) in g_rows.iter().enumerate() {
        items.push((
            Item { source: gsrc, row },
            qg.gallery.category[i].as_deref(),
        ));
    }
    items.sort_by_key(|(it, _)| *it);
    items.dedup_by_key(|(it, _)| *it);
    let sources = [q_emb, g_emb];
    let mut out = Vec::new();
    for g in groups {
        let members: Vec<Item> = items
            .iter()
            .filter(|(_, c)| g.name == aggregate::OVERALL || *c == Some(g.name.as_str()))
            .map(|(it, _)| *it)
            .collect();
        let v = embeddings::pcf_of_items(&members, sources, r)?;
        out.push((g.name.clone(), r.iter().copied().zip(v).collect()));
    }
    Ok(out)
}

/// The manifest's parameters (what the request asks for) and inputs, known before anything is
/// read, so an up-to-date `metrics.json` is not computed again ([`skip_if_done`]).
pub fn plan(req: &ScoreRequest) -> Result<ManifestBuilder> {
    let params = serde_json::json!({
        "metrics": req.set.metrics().iter().map(Metric::key).collect::<Vec<_>>(),
        "fmr": req.fmr,
        "pcf": req.pcf,
        "skip_queries_without_positives": req.options.skip_queries_without_positives,
        "ci": req.ci.as_ref().map(CiOptions::to_json),
    });
    let mut m = ManifestBuilder::new("score", params);
    m.input("dataset", &req.dataset)?;
    m.input("neighbors", &req.neighbors)?;
    if let Some(p) = &req.gallery_dataset {
        m.input("gallery_dataset", p)?;
    }
    if let Some(p) = &req.embeddings {
        m.input("embeddings", p)?;
    }
    if let Some(p) = &req.gallery_embeddings {
        m.input("gallery_embeddings", p)?;
    }
    if let Some(p) = &req.per_query {
        m.companion(p);
    }
    Ok(m)
}

/// Stops with `Error::UpToDate` when the binary allows reuse and `req.out` is up to date. A
/// missing input is left to `compute`, which reports it properly.
pub fn skip_if_done(req: &ScoreRequest) -> Result<()> {
    let inputs = [
        &req.gallery_dataset,
        &req.embeddings,
        &req.gallery_embeddings,
    ];
    let present = |p: &Path| p.is_file();
    if !present(&req.dataset)
        || !present(&req.neighbors)
        || inputs
            .iter()
            .any(|p| p.as_deref().is_some_and(|p| !present(p)))
    {
        return Ok(());
    }
    plan(req)?.skip_if_done(&req.out)
}

/// Writes the per-query table, `metrics.json` and its manifest.
pub fn write(req: &ScoreRequest, c: &Computed) -> Result<()> {
    seal(req, c)?.commit()
}

/// The score's output set, complete on disk under temporary names (see `io::Sealed`).
pub struct SealedScore {
    manifest: ManifestBuilder,
    metrics: crate::io::Sealed,
    per_query: Option<crate::io::Sealed>,
}

impl SealedScore {
    /// Publishes `metrics.json`, the per-query table and the manifest as one set.
    pub fn commit(self) -> Result<()> {
        self.manifest
            .commit(self.metrics, self.per_query.into_iter().collect())?;
        Ok(())
    }
}

/// Writes the per-query table and `metrics.json` under temporary names, with the manifest to
/// commit them by: nothing appears under the final names until [`SealedScore::commit`].
pub fn seal(req: &ScoreRequest, c: &Computed) -> Result<SealedScore> {
    let per_query = match &req.per_query {
        Some(p) => Some(seal_per_query(p, c)?),
        None => None,
    };
    let mut json = serde_json::to_vec_pretty(&c.scores.to_json())
        .map_err(|e| Error::internal(e.to_string()))?;
    json.push(b'\n');
    let metrics = seal_bytes(&req.out, &json)?;
    let mut m = plan(req)?;
    m.note("neighbors_k", c.meta.k.into())
        .note("neighbors_metric", c.meta.metric.clone().into())
        .note("split", serde_json::json!(c.meta.split))
        .note("fnmr_source", serde_json::json!(c.fnmr_source));
    m.rows("queries", c.qg.queries.len() as u64);
    m.rows("gallery", c.qg.gallery.len() as u64);
    m.rows("neighbor_rows", c.n_rows as u64);
    m.rows("queries_without_rows", c.queries_without_rows as u64);
    for (k, v) in &c.timings {
        m.timing(k, *v);
    }
    m.timing("total", c.started.elapsed().as_secs_f64());
    Ok(SealedScore {
        manifest: m,
        metrics,
        per_query,
    })
}

pub const PER_QUERY_SCHEMA_VERSION: &str = "1";

/// The first columns of a per-query table: `query_id`, `label`, `category`.
pub fn query_columns(q: &crate::retrieval::Side) -> (Vec<Field>, Vec<ArrayRef>) {
    (
        vec![
            Field::new("query_id", DataType::Int64, false),
            Field::new("label", DataType::Int64, true),
            Field::new("category", DataType::Utf8, true),
        ],
        vec![
            Arc::new(Int64Array::from(q.ids.clone())),
            Arc::new(Int64Array::from(q.labels.clone())),
            Arc::new(StringArray::from(
                q.category.iter().map(|c| c.as_deref()).collect::<Vec<_>>(),
            )),
        ],
    )
}

/// Metric `j` of every query, null where undefined.
pub fn metric_column(pq: &PerQuery, j: usize) -> ArrayRef {
    Arc::new(Float64Array::from(
        (0..pq.len())
            .map(|i| Some(pq.row(i)[j]).filter(|v| !v.is_nan()))
            .collect::<Vec<_>>(),
    ))
}

/// One row per query: id, label, category, positives, list length, one column per metric
/// (null where the value is undefined). Schema in `schemas/per_query.md`.
pub fn seal_per_query(dest: &Path, c: &Computed) -> Result<crate::io::Sealed> {
    let pq = &c.per_query;
    let (mut fields, mut cols) = query_columns(&c.qg.queries);
    fields.push(Field::new("n_positives", DataType::Int64, false));
    cols.push(Arc::new(Int64Array::from(
        pq.n_gt.iter().map(|&n| n as i64).collect::<Vec<_>>(),
    )));
    fields.push(Field::new("n_retrieved", DataType::Int32, false));
    cols.push(Arc::new(Int32Array::from(
        pq.n_retrieved.iter().map(|&n| n as i32).collect::<Vec<_>>(),
    )));
    for (j, m) in pq.metrics.iter().enumerate() {
        fields.push(Field::new(m.column(), DataType::Float64, true));
        cols.push(metric_column(pq, j));
    }
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), cols)
        .map_err(|e| Error::internal(e.to_string()))?;
    let mut meta = Meta::new();
    meta.insert("simile.artifact".into(), "per_query".into());
    meta.insert(
        "simile.schema_version".into(),
        PER_QUERY_SCHEMA_VERSION.into(),
    );
    meta.insert(
        "simile.metrics".into(),
        pq.metrics
            .iter()
            .map(Metric::key)
            .collect::<Vec<_>>()
            .join(","),
    );
    table::seal_parquet(dest, &batch, &meta)
}
