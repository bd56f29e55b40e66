//! The HTML report of `simile-score --report`: one self-contained page (CSS, SVG charts and
//! thumbnails inline as `data:` URIs; no script, no network) that people can open anywhere.
//!
//! It shows the metrics table (overall and per category), the distributions of the distances
//! of correct and wrong neighbours, for every ranking metric its worst queries drawn as OML's
//! `RetrievalResults.visualize` draws them (query framed blue, its top galleries green when
//! correct and red when wrong with their distances, then a few ground-truth items grey),
//! and with `--train-dir` the learning curves. Layout and choices: `docs/metrics.md`
//! ("The report").
//!
//! Everything is computed from the score stage's [`Computed`] (per-query values, groups)
//! plus one streamed pass over the neighbours file; the page is built in memory before the
//! score stage writes anything, so bad input leaves no file, then written atomically with a
//! manifest beside it.
mod charts;
pub mod compare;
mod curves;
mod html;
mod scan;
mod thumbs;

use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::io::seal_bytes;
use crate::manifest::ManifestBuilder;
use crate::metrics::stage::{Computed, ScoreRequest};
use crate::metrics::{python_float, OVERALL};
use crate::retrieval::QueryGallery;
use curves::TrainDir;
use html::{esc, num};
use scan::Retrieved;
use std::collections::BTreeSet;
use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use thumbs::{Thumb, Thumbs};

pub use curves::{TRAIN_LOG, VAL_METRICS};

/// What the report shows and where it goes.
#[derive(Clone, Debug)]
pub struct ReportOptions {
    pub out: PathBuf,
    /// A `simile-train --out` folder, for the learning curves.
    pub train_dir: Option<PathBuf>,
    /// Worst queries drawn per metric (OML logs 5).
    pub n_worst: usize,
    /// Top galleries drawn per query (OML: 5).
    pub n_galleries: usize,
    /// Ground-truth items drawn per query (OML: 2).
    pub n_gt: usize,
    /// Side of the square thumbnails, in pixels.
    pub thumb_px: u32,
}

impl ReportOptions {
    /// OML's numbers: 5 worst queries per metric, 5 galleries and 2 ground-truth items each.
    pub fn new(out: PathBuf, train_dir: Option<PathBuf>) -> Self {
        ReportOptions {
            out,
            train_dir,
            n_worst: 5,
            n_galleries: 5,
            n_gt: 2,
            thumb_px: 80,
        }
    }
}

/// A built page, not yet written.
pub struct Report {
    pub html: String,
    /// Query rows drawn (all metrics together).
    pub n_query_rows: usize,
    /// Rows whose image could not be read (drawn as a note in place of the picture).
    pub unavailable: Vec<String>,
    out: PathBuf,
    manifest: ManifestBuilder,
    started: Instant,
}

/// Checks what can be checked before scoring: the report's path against the inputs and the
/// other outputs, and the training folder's layout.
pub fn check(req: &ScoreRequest, opts: &ReportOptions) -> Result<()> {
    crate::manifest::refuse_overlap(&req.inputs(), &[&opts.out])?;
    if opts.out.is_dir() {
        return Err(Error::input(format!(
            "--report {}: is a folder; name the page's file",
            opts.out.display()
        )));
    }
    for (flag, p) in [
        ("--out", Some(&req.out)),
        ("--per-query", req.per_query.as_ref()),
    ] {
        if p == Some(&opts.out) {
            return Err(Error::input(format!(
                "--report and {flag} name the same file ({}); choose two paths",
                opts.out.display()
            )));
        }
    }
    if let Some(d) = &opts.train_dir {
        TrainDir::locate(d)?;
    }
    Ok(())
}

/// The report's manifest before anything is computed: what it shows (the score parameters
/// and its own) and every input it reads, so an unchanged report can be recognised.
fn plan(req: &ScoreRequest, opts: &ReportOptions) -> Result<ManifestBuilder> {
    let params = serde_json::json!({
        "report": true,
        "metrics": req.set.metrics().iter().map(|m| m.key()).collect::<Vec<_>>(),
        "fmr": req.fmr,
        "pcf": req.pcf,
        "skip_queries_without_positives": req.options.skip_queries_without_positives,
        "n_worst": opts.n_worst,
        "n_galleries": opts.n_galleries,
        "n_gt": opts.n_gt,
        "thumb_px": opts.thumb_px,
    });
    let mut m = ManifestBuilder::new("score", params);
    for (role, p) in inputs(req, opts) {
        m.input(role, &p)?;
    }
    Ok(m)
}

fn inputs(req: &ScoreRequest, opts: &ReportOptions) -> Vec<(&'static str, PathBuf)> {
    let mut v = vec![
        ("dataset", req.dataset.clone()),
        ("neighbors", req.neighbors.clone()),
    ];
    let optional = [
        ("gallery_dataset", &req.gallery_dataset),
        ("embeddings", &req.embeddings),
        ("gallery_embeddings", &req.gallery_embeddings),
    ];
    for (role, p) in optional {
        if let Some(p) = p {
            v.push((role, p.clone()));
        }
    }
    if let Some(d) = &opts.train_dir {
        v.push(("train_log", d.join(TRAIN_LOG)));
        let val = d.join(VAL_METRICS);
        if val.is_file() {
            v.push(("val_metrics", val));
        }
    }
    v
}

/// Whether `opts.out` exists with a manifest recording these inputs (by content) and
/// parameters and this simile: then the report need not be built again. A missing input is
/// "not up to date", left for scoring to report properly.
pub fn up_to_date(req: &ScoreRequest, opts: &ReportOptions) -> Result<bool> {
    if inputs(req, opts).iter().any(|(_, p)| !p.is_file()) {
        return Ok(false);
    }
    Ok(plan(req, opts)?.stale(&opts.out)?.is_none())
}

/// The worst queries of metric `j` (see [`pick_worst`]).
pub fn worst_queries(c: &Computed, j: usize, n: usize) -> Vec<usize> {
    let pq = &c.per_query;
    let values: Vec<f64> = (0..pq.len()).map(|q| pq.row(q)[j]).collect();
    pick_worst(&values, &c.qg.queries.labels, n)
}

/// The `n` smallest values (OML: `topk(largest=False)`), worst first; NaN (undefined) values
/// are not candidates. Ties are common (every query without a hit has CMC 0), so among equal
/// values the first query of each label not shown yet comes first, then the rest, each in
/// position order: the rows show `n` identities rather than `n` samples of the first one.
pub fn pick_worst(values: &[f64], labels: &[Option<i64>], n: usize) -> Vec<usize> {
    let mut qs: Vec<usize> = (0..values.len()).filter(|&q| !values[q].is_nan()).collect();
    qs.sort_by(|&a, &b| values[a].total_cmp(&values[b]).then(a.cmp(&b)));
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(n);
    for tie in qs.chunk_by(|&a, &b| values[a] == values[b]) {
        if out.len() >= n {
            break;
        }
        let (fresh, again): (Vec<usize>, Vec<usize>) =
            tie.iter().partition(|&&q| seen.insert(labels[q]));
        out.extend(fresh.into_iter().chain(again).take(n - out.len()));
    }
    out
}

/// Builds the page (reads the datasets again for paths, and the neighbours file).
pub fn build(req: &ScoreRequest, c: &Computed, opts: &ReportOptions) -> Result<Report> {
    let started = Instant::now();
    let train = opts
        .train_dir
        .as_deref()
        .map(TrainDir::locate)
        .transpose()?;
    let (qds, gds) = read_sides(&req.dataset, req.gallery_dataset.as_deref())?;
    let metrics = &c.per_query.metrics;
    let worst: Vec<Vec<usize>> = (0..metrics.len())
        .map(|j| worst_queries(c, j, opts.n_worst))
        .collect();
    let wanted: BTreeSet<usize> = worst.iter().flatten().copied().collect();
    let sc = scan::scan(&req.neighbors, &c.qg, &wanted)?;

    let (mut th, names) = side_views(&qds, gds.as_ref(), opts.thumb_px);

    let mut s = String::with_capacity(1 << 20);
    s.push_str("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">");
    s.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">");
    let _ = write!(
        s,
        "<title>simile report: {}</title><style>{}</style></head><body>",
        esc(&file_name(&req.neighbors)),
        html::STYLE
    );
    header(&mut s, req, c);
    s.push_str(r##"<p class="nav"><a href="#metrics">Metrics</a> · <a href="#distances">Distances</a> · Worst queries by"##);
    for m in metrics {
        let _ = write!(s, r##" <a href="#{}">{}</a>"##, anchor(m), esc(&m.key()));
    }
    if train.is_some() {
        s.push_str(r##" · <a href="#curves">Learning curves</a>"##);
    }
    s.push_str("</p>");
    metrics_table(&mut s, req, c);
    distances(&mut s, c, &sc);

    s.push_str(r#"<section id="worst"><h2>Worst queries</h2>"#);
    let _ = write!(
        s,
        r#"<p class="note">For every metric, the {} queries with the smallest value (OVERALL; among equal values one query per label while other labels remain, then in id order; queries where it is undefined are left out), drawn as OML draws them:</p><p class="legend"><span><i style="border-color:rgb(0,0,255)"></i>query</span><span><i style="border-color:rgb(0,255,0)"></i>correct neighbour</span><span><i style="border-color:rgb(255,0,0)"></i>wrong neighbour</span><span><i style="border-color:rgb(120,120,120)"></i>ground truth (first {} positives in gallery order)</span></p>"#,
        opts.n_worst, opts.n_gt
    );
    let pb = crate::progress::bar(
        (wanted.len() * (1 + opts.n_galleries + opts.n_gt)) as u64,
        "thumbnails",
    );
    let mut n_rows = 0;
    let empty = Vec::new();
    for (j, m) in metrics.iter().enumerate() {
        let key = format!("{OVERALL}/{}", m.key());
        let _ = write!(
            s,
            r#"<section class="worst" id="{}"><h3>top {} worst by {}</h3>"#,
            anchor(m),
            worst[j].len(),
            esc(&key)
        );
        if worst[j].is_empty() {
            s.push_str(r#"<p class="note">No query has a defined value.</p>"#);
        }
        for &q in &worst[j] {
            let list = sc.lists.get(&q).unwrap_or(&empty);
            let value = c.per_query.row(q)[j];
            query_row(&mut s, &mut th, &names, c, q, list, (&m.key(), value), opts);
            pb.inc(1 + list.len().min(opts.n_galleries) as u64 + opts.n_gt as u64);
            n_rows += 1;
        }
        s.push_str("</section>");
    }
    pb.finish_and_clear();
    s.push_str("</section>");

    if let Some(t) = &train {
        let _ = write!(
            s,
            r#"<section id="curves"><h2>Learning curves</h2><p class="note">{}</p>{}</section>"#,
            esc(&opts
                .train_dir
                .as_deref()
                .unwrap_or(Path::new(""))
                .display()
                .to_string()),
            t.render()?
        );
    }
    let _ = write!(
        s,
        r#"<p class="note">simile {} ({}), simile-score --report.</p></body></html>"#,
        esc(crate::manifest::VERSION),
        esc(crate::manifest::COMMIT)
    );

    Ok(Report {
        html: s,
        n_query_rows: n_rows,
        unavailable: th.unavailable,
        out: opts.out.clone(),
        manifest: plan(req, opts)?,
        started,
    })
}

impl Report {
    /// Where the page goes.
    pub fn out(&self) -> &Path {
        &self.out
    }

    /// Writes the page atomically with its manifest (stage `score`).
    pub fn write(self) -> Result<()> {
        self.seal()?.commit()
    }

    /// Writes the page under its temporary name (see `io::Sealed`), for `simile-score` to
    /// commit with the metrics only when both are complete.
    pub fn seal(self) -> Result<SealedReport> {
        let page = seal_bytes(&self.out, self.html.as_bytes())?;
        let mut m = self.manifest;
        m.rows("query_rows", self.n_query_rows as u64);
        m.timing("report", self.started.elapsed().as_secs_f64());
        Ok(SealedReport { page, manifest: m })
    }
}

/// A report page complete on disk under its temporary name.
pub struct SealedReport {
    page: crate::io::Sealed,
    manifest: ManifestBuilder,
}

impl SealedReport {
    pub fn commit(self) -> Result<()> {
        self.manifest.commit(self.page, Vec::new())?;
        Ok(())
    }
}

/// The in-page anchor of a metric's worst queries: `worst-cmc_1`, `worst-map_r`.
fn anchor(m: &crate::metrics::Metric) -> String {
    format!("worst-{}", m.key().replace(['/', '@'], "_"))
}

/// The query dataset and, for two-sided files, the gallery dataset: what thumbnails and
/// label names are drawn from.
fn read_sides(dataset: &Path, gallery: Option<&Path>) -> Result<(Dataset, Option<Dataset>)> {
    Ok((
        Dataset::read(dataset)?,
        gallery.map(Dataset::read).transpose()?,
    ))
}

/// The thumbnails and label names of a query dataset and its optional gallery dataset.
fn side_views<'a>(qds: &'a Dataset, gds: Option<&'a Dataset>, px: u32) -> (Thumbs<'a>, Names<'a>) {
    let mut datasets = vec![qds];
    datasets.extend(gds);
    (
        Thumbs::new(datasets, px),
        Names {
            query: qds,
            gallery: gds.unwrap_or(qds),
        },
    )
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

fn header(s: &mut String, req: &ScoreRequest, c: &Computed) {
    let meta = &c.meta;
    s.push_str("<h1>simile report</h1><table class=\"meta\">");
    let mut row = |k: &str, v: String| {
        let _ = write!(s, "<tr><td>{}</td><td>{}</td></tr>", esc(k), esc(&v));
    };
    row("dataset", req.dataset.display().to_string());
    if let Some(g) = &req.gallery_dataset {
        row("gallery dataset", g.display().to_string());
    }
    row("neighbours", req.neighbors.display().to_string());
    if let Some(split) = &meta.split {
        row("split", split.clone());
    }
    row(
        "search",
        format!(
            "{} distance, top {}, exclusions: {}",
            meta.metric,
            meta.k,
            if meta.exclusions.is_empty() {
                "none"
            } else {
                &meta.exclusions
            }
        ),
    );
    row(
        "sizes",
        format!(
            "{} queries, {} gallery rows, {} neighbour rows",
            c.qg.queries.len(),
            c.qg.gallery.len(),
            c.n_rows
        ),
    );
    for (k, v) in &meta.extra {
        row(k.trim_start_matches("simile."), v.clone());
    }
    s.push_str("</table>");
}

fn metrics_table(s: &mut String, req: &ScoreRequest, c: &Computed) {
    let metrics = &c.per_query.metrics;
    let _ = write!(
        s,
        r#"<section id="metrics"><h2>Metrics</h2>{}<table class="metrics"><thead><tr><th>group</th><th>queries</th><th>without positives</th>"#,
        // Many categories scroll inside their own box, so the rest of the page stays in view.
        if c.groups.len() > 16 {
            r#"<div class="scroll">"#
        } else {
            "<div>"
        }
    );
    for m in metrics {
        let _ = write!(s, "<th>{}</th>", esc(&m.key()));
    }
    for r in &req.pcf {
        let _ = write!(s, "<th>pcf/{}</th>", esc(&python_float(*r)));
    }
    for f in &req.fmr {
        let _ = write!(s, "<th>fnmr@fmr/{}</th>", esc(&python_float(*f)));
    }
    s.push_str("</tr></thead><tbody>");
    for (gi, g) in c.groups.iter().enumerate() {
        let class = if g.name == OVERALL {
            "overall"
        } else {
            "group"
        };
        let _ = write!(
            s,
            r#"<tr class="{class}"><td>{}</td><td>{}</td><td>{}</td>"#,
            esc(&g.name),
            g.n_queries,
            g.n_without_positives
        );
        for (j, v) in g.means.iter().enumerate() {
            // The mean's interval under it, small (`--ci`).
            let ci = c
                .intervals
                .as_ref()
                .and_then(|iv| iv[gi][j])
                .map(|i| {
                    format!(
                        r#"<br><small class="ci">[{}, {}]</small>"#,
                        num(Some(i.low)),
                        num(Some(i.high))
                    )
                })
                .unwrap_or_default();
            let _ = write!(s, "<td>{}{ci}</td>", num(*v));
        }
        for r in &req.pcf {
            let v = c
                .scores
                .get(&format!("{}/pcf/{}", g.name, python_float(*r)))
                .flatten();
            let _ = write!(s, "<td>{}</td>", num(v));
        }
        for f in &req.fmr {
            // FNMR@FMR is OVERALL only, as in OML.
            let v = (g.name == OVERALL)
                .then(|| {
                    c.scores
                        .get(&format!("{OVERALL}/fnmr@fmr/{}", python_float(*f)))
                        .flatten()
                })
                .flatten();
            let _ = write!(s, "<td>{}</td>", num(v));
        }
        s.push_str("</tr>");
    }
    s.push_str("</tbody></table></div>");
    if c.groups.len() == 1 {
        s.push_str(r#"<p class="note">The dataset has no categories.</p>"#);
    }
    s.push_str("</section>");
}

fn distances(s: &mut String, c: &Computed, sc: &scan::ScanOut) {
    s.push_str(r#"<section id="distances"><h2>Distances</h2>"#);
    match sc.range {
        None => s.push_str(r#"<p class="note">The neighbours file has no finite distance.</p>"#),
        Some((lo, hi)) => {
            let _ = write!(
                s,
                r#"<p class="note">Every retrieved row of every list (ranks 1 to {}): correct when the gallery row has the query's label (and is not excluded), wrong otherwise. Each class is drawn as its share per bin.</p>"#,
                c.meta.k
            );
            s.push_str(&charts::histograms(
                &sc.pos,
                &sc.neg,
                lo,
                hi,
                &c.meta.metric,
            ));
        }
    }
    s.push_str("</section>");
}

/// Row captions: label names where the dataset has them.
struct Names<'a> {
    query: &'a Dataset,
    gallery: &'a Dataset,
}

fn label_text(ds: &Dataset, label: Option<i64>) -> String {
    match label {
        None => "no label".into(),
        Some(l) => match ds
            .meta
            .label_names
            .as_ref()
            .and_then(|n| usize::try_from(l).ok().and_then(|i| n.get(i)))
        {
            Some(name) => format!("label {l}: {name}"),
            None => format!("label {l}"),
        },
    }
}

/// The first `n` positives of query `q` in gallery order (OML's `gt_ids[:n_gt_to_show]`).
fn first_positives(qg: &QueryGallery, q: usize, n: usize) -> Vec<usize> {
    (0..qg.gallery.len())
        .filter(|&g| qg.is_positive(q, g))
        .take(n)
        .collect()
}

fn item(s: &mut String, class: &str, thumb: Thumb, caption: &[String]) {
    let _ = write!(s, r#"<div class="item {class}"><div class="pic">"#);
    match thumb {
        Thumb::Image(uri) => {
            let _ = write!(s, r#"<img alt="" src="{uri}">"#);
        }
        Thumb::Text(t) => {
            let _ = write!(s, r#"<div class="txt">{}</div>"#, esc(&t));
        }
        Thumb::Unavailable(why) => {
            let _ = write!(
                s,
                r#"<div class="miss">image unavailable: {}</div>"#,
                esc(&why)
            );
        }
    }
    s.push_str("</div>");
    for (i, line) in caption.iter().enumerate() {
        if i > 0 {
            s.push_str("<br>");
        }
        s.push_str(&esc(line));
    }
    s.push_str("</div>");
}

#[allow(clippy::too_many_arguments)]
fn query_row(
    s: &mut String,
    th: &mut Thumbs,
    names: &Names,
    c: &Computed,
    q: usize,
    list: &[Retrieved],
    (key, value): (&str, f64),
    opts: &ReportOptions,
) {
    let qg = &c.qg;
    let qid = qg.queries.ids[q];
    let _ = write!(
        s,
        r#"<div class="qrow" data-query-id="{qid}"><div class="info">{} = {:.4}<br>positives: {}<br>retrieved: {}{}</div>"#,
        esc(key),
        value,
        c.per_query.n_gt[q],
        c.per_query.n_retrieved[q],
        qg.queries.category[q]
            .as_deref()
            .map(|cat| format!("<br>{}", esc(cat)))
            .unwrap_or_default()
    );
    let gside = if qg.same_dataset { 0 } else { 1 };
    item(
        s,
        "query",
        th.get(0, qg.queries.rows[q]),
        &[
            format!("Query #{qid}"),
            label_text(names.query, qg.queries.labels[q]),
        ],
    );
    for r in list.iter().take(opts.n_galleries) {
        let g = r.gallery;
        item(
            s,
            if r.hit { "hit" } else { "miss-item" },
            th.get(gside, qg.gallery.rows[g]),
            &[
                format!("Gallery #{} - {:.3}", qg.gallery.ids[g], r.distance),
                label_text(names.gallery, qg.gallery.labels[g]),
            ],
        );
    }
    if list.is_empty() {
        s.push_str(r#"<div class="item empty"><div class="pic"></div>no neighbours</div>"#);
    }
    s.push_str(r#"<div class="sep"></div>"#);
    for g in first_positives(qg, q, opts.n_gt) {
        item(
            s,
            "gt",
            th.get(gside, qg.gallery.rows[g]),
            &[
                format!("GT #{}", qg.gallery.ids[g]),
                label_text(names.gallery, qg.gallery.labels[g]),
            ],
        );
    }
    s.push_str("</div>");
}

#[cfg(test)]
mod tests {
    use super::pick_worst;

    #[test]
    fn worst_first_one_label_per_tie_first() {
        let v = [0.0, 0.0, 1.0, 0.0, f64::NAN, 0.5, 0.0];
        let l = [
            Some(1),
            Some(1),
            Some(2),
            Some(3),
            Some(4),
            Some(1),
            Some(3),
        ];
        // The zeros: 0 (label 1), 3 (label 3) are fresh; 1 and 6 repeat a label.
        assert_eq!(pick_worst(&v, &l, 3), [0, 3, 1]);
        assert_eq!(pick_worst(&v, &l, 5), [0, 3, 1, 6, 5]);
        // A worse value always comes before a better one of a new label; NaN never shows.
        assert_eq!(pick_worst(&v, &l, 10), [0, 3, 1, 6, 5, 2]);
        assert!(pick_worst(&v, &l, 0).is_empty());
    }
}
