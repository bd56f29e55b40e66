//! `simile-score compare --report`: one self-contained page of a comparison: every OVERALL
//! difference drawn with its interval against zero, and the queries whose first result
//! flipped (baseline right and candidate wrong, then the other way), each drawn twice, with
//! the baseline's and the candidate's neighbours, as the score report draws a query.
use super::html::{self, esc, num};
use super::{file_name, query_row, read_sides, scan, Report, ReportOptions};
use crate::error::Result;
use crate::metrics::compare::{self, CompareRequest, Compared, Row};
use crate::metrics::{Metric, OVERALL};
use std::collections::BTreeSet;
use std::fmt::Write;
use std::time::Instant;

/// Flipped queries drawn per direction.
const N_FLIPPED: usize = 10;

/// Builds the page in memory (nothing is written).
pub fn build(req: &CompareRequest, c: &Compared, opts: &ReportOptions) -> Result<Report> {
    let started = Instant::now();
    let (a, b) = (&c.baseline, &c.candidate);
    // The first CMC metric decides what flipped (the first result right or wrong).
    let j = a
        .per_query
        .metrics
        .iter()
        .position(|m| matches!(m, Metric::Cmc(_)));
    let (mut lost, mut won) = (Vec::new(), Vec::new());
    if let Some(j) = j {
        for q in 0..a.per_query.len() {
            let (x, y) = (a.per_query.row(q)[j], b.per_query.row(q)[j]);
            if x >= 0.5 && y < 0.5 && lost.len() < N_FLIPPED {
                lost.push(q);
            } else if x < 0.5 && y >= 0.5 && won.len() < N_FLIPPED {
                won.push(q);
            }
        }
    }
    let wanted: BTreeSet<usize> = lost.iter().chain(&won).copied().collect();
    let sa = scan::scan(&req.baseline, &a.qg, &wanted)?;
    let sb = scan::scan(&req.candidate, &b.qg, &wanted)?;
    let (qds, gds) = read_sides(&req.dataset, req.gallery_dataset.as_deref())?;
    let (mut th, names) = super::side_views(&qds, gds.as_ref(), opts.thumb_px);

    let mut s = String::with_capacity(1 << 20);
    let _ = write!(
        s,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>simile comparison: {} vs {}</title><style>{}</style></head><body>",
        esc(&file_name(&req.candidate)),
        esc(&file_name(&req.baseline)),
        html::STYLE
    );
    let _ = write!(
        s,
        r#"<h1>{} (candidate) vs {} (baseline)</h1><p class="note">{} queries of {}; differences are candidate - baseline with {}% intervals (paired BCa bootstrap, {} resamples by {}, seed {}).</p>"#,
        esc(&req.candidate.display().to_string()),
        esc(&req.baseline.display().to_string()),
        a.qg.queries.len(),
        esc(&req.dataset.display().to_string()),
        req.ci.level * 100.0,
        req.ci.resamples,
        req.ci.by,
        req.ci.seed
    );
    let overall: Vec<&Row> = c
        .rows
        .iter()
        .filter(|r| r.key.starts_with(&format!("{OVERALL}/")))
        .collect();
    s.push_str(r#"<section id="differences"><h2>Differences</h2>"#);
    s.push_str(&forest(&overall));
    s.push_str(r#"<table class="metrics"><thead><tr><th>metric</th><th>baseline</th><th>candidate</th><th>difference</th><th>interval</th><th>p</th><th>McNemar p</th><th>better / worse / same</th></tr></thead><tbody>"#);
    for r in &overall {
        let _ = write!(
            s,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>[{}, {}]</td><td>{}</td><td>{}</td><td>{} / {} / {}</td></tr>",
            esc(&r.key[OVERALL.len() + 1..]),
            num(r.baseline),
            num(r.candidate),
            num(r.difference),
            num(r.ci_low),
            num(r.ci_high),
            num(r.p_value),
            num(r.mcnemar_p_value),
            r.improved,
            r.worsened,
            r.unchanged
        );
    }
    s.push_str("</tbody></table></section>");

    s.push_str(r#"<section id="flipped"><h2>Queries that flipped</h2>"#);
    let metric = j.map(|j| a.per_query.metrics[j].key()).unwrap_or_default();
    let mut n_rows = 0;
    let empty = Vec::new();
    for (title, qs) in [
        ("the baseline right, the candidate wrong", &lost),
        ("the candidate right, the baseline wrong", &won),
    ] {
        let _ = write!(
            s,
            r#"<section class="worst"><h3>{} by {} (first {} of them, in id order): each query drawn with the baseline's neighbours, then the candidate's</h3>"#,
            esc(title),
            esc(&metric),
            qs.len()
        );
        if qs.is_empty() {
            s.push_str(r#"<p class="note">None.</p>"#);
        }
        for &q in qs.iter() {
            let jj = j.unwrap_or(0);
            for (who, comp, sc) in [("baseline", a, &sa), ("candidate", b, &sb)] {
                let list = sc.lists.get(&q).unwrap_or(&empty);
                let key = format!("{who}: {metric}");
                let value = comp.per_query.row(q)[jj];
                query_row(&mut s, &mut th, &names, comp, q, list, (&key, value), opts);
                n_rows += 1;
            }
        }
        s.push_str("</section>");
    }
    s.push_str("</section>");
    let _ = write!(
        s,
        r#"<p class="note">simile {} ({}), simile-score compare --report.</p></body></html>"#,
        esc(crate::manifest::VERSION),
        esc(crate::manifest::COMMIT)
    );
    let mut manifest = compare::plan(req)?;
    manifest.note("page", serde_json::json!("compare report"));
    Ok(Report {
        html: s,
        n_query_rows: n_rows,
        unavailable: th.unavailable,
        out: opts.out.clone(),
        manifest,
        started,
    })
}

/// Each difference as a dot on its interval, against a line at zero (inline SVG).
fn forest(rows: &[&Row]) -> String {
    let ends: Vec<f64> = rows
        .iter()
        .flat_map(|r| [r.ci_low, r.ci_high, r.difference])
        .flatten()
        .chain([0.0])
        .collect();
    let lo = ends.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = ends.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let span = (hi - lo).max(1e-9);
    let (w, left, row_h) = (640.0, 130.0, 24.0);
    let x = |v: f64| left + (v - lo) / span * (w - left - 20.0);
    let h = row_h * rows.len() as f64 + 30.0;
    let mut s = format!(
        r##"<svg class="chart" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img"><line x1="{z:.1}" y1="0" x2="{z:.1}" y2="{y0:.1}" stroke="#888" stroke-dasharray="3,3"/>"##,
        z = x(0.0),
        y0 = h - 20.0
    );
    for (i, r) in rows.iter().enumerate() {
        let y = 15.0 + row_h * i as f64;
        let _ = write!(
            s,
            r#"<text x="4" y="{:.1}" font-size="12">{}</text>"#,
            y + 4.0,
            esc(&r.key[OVERALL.len() + 1..])
        );
        if let (Some(l), Some(hh), Some(d)) = (r.ci_low, r.ci_high, r.difference) {
            let colour = if l > 0.0 {
                "#1a7f37"
            } else if hh < 0.0 {
                "#cf222e"
            } else {
                "#555"
            };
            let _ = write!(
                s,
                r#"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{colour}" stroke-width="2"/><circle cx="{:.1}" cy="{y:.1}" r="4" fill="{colour}"/>"#,
                x(l),
                x(hh),
                x(d)
            );
        }
    }
    let _ = write!(
        s,
        r#"<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle">0</text><text x="{left}" y="{:.1}" font-size="11">{:+.4}</text><text x="{:.1}" y="{:.1}" font-size="11" text-anchor="end">{:+.4}</text></svg>"#,
        x(0.0),
        h - 5.0,
        h - 5.0,
        lo,
        w - 20.0,
        h - 5.0,
        hi
    );
    s
}
