//! `simile-score --report`: the real binary on a small generated image dataset (real PNGs, a
//! bbox, text that needs escaping) with a hand-made neighbours file and a training folder;
//! then the page rendered in headless Chromium as a person sees it (skipped, with a message,
//! where Chromium is not installed; `make test` installs it and fails without it).
use crate::common;

use image::{Rgb, RgbImage};
use simile::dataset::Split;
use simile::io::Fingerprint;
use simile::neighbors::NeighborsMeta;
use simile::train::log::{self, Row};
use std::path::{Path, PathBuf};

const BIN: &str = env!("CARGO_BIN_EXE_simile-score");

/// Colours of the six validation images: one per id, none of them a frame colour.
const COLOURS: [[u8; 3]; 6] = [
    [255, 0, 255],
    [0, 160, 160],
    [250, 200, 0],
    [120, 60, 0],
    [30, 30, 30],
    [200, 120, 255],
];

/// Six validation rows (all queries and gallery) and one train row:
///
/// | id | label | category | positives |
/// |----|-------|----------|-----------|
/// | 0  | 0     | c<1      | {1}       |
/// | 1  | 0     | c<1      | {0}       |
/// | 2  | 1     | c<1      | {3}       |
/// | 3  | 1     | dog      | {2}       |
/// | 4  | 2     | dog      | none      |
/// | 5  | 3     | dog      | none      |
///
/// Label 0 is named `<b>a&b</b>` (names are escaped); id 1's image is a canvas whose bbox is
/// the coloured square.
struct Fx {
    _dir: tempfile::TempDir,
    root: PathBuf,
    dataset: PathBuf,
}

fn square(c: [u8; 3]) -> RgbImage {
    // A coloured square with a white border, so a thumbnail is recognisable.
    RgbImage::from_fn(48, 48, |x, y| {
        if (6..42).contains(&x) && (6..42).contains(&y) {
            Rgb(c)
        } else {
            Rgb([255, 255, 255])
        }
    })
}

impl Fx {
    fn new() -> Fx {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        std::fs::create_dir(root.join("img")).unwrap();
        let mut paths = Vec::new();
        for (i, c) in COLOURS.iter().enumerate() {
            let name = format!("img/{i}.png");
            let img = if i == 1 {
                // The square inside a larger grey canvas, at x 20..68, y 10..58.
                let mut canvas = RgbImage::from_pixel(100, 80, Rgb([128, 128, 128]));
                image::imageops::replace(&mut canvas, &square(*c), 20, 10);
                canvas
            } else {
                square(*c)
            };
            img.save(root.join(&name)).unwrap();
            paths.push(Some(name));
        }
        paths.push(Some("img/0.png".into()));
        let labels = [0, 0, 1, 1, 2, 3, 0];
        let cats = ["c<1", "c<1", "c<1", "dog", "dog", "dog", "dog"];
        let mut b = common::DatasetBuilder::new(0..7)
            .label(|i| Some(labels[i]))
            .path(|i| paths[i].clone())
            .split(|i| {
                if i < 6 {
                    Split::Validation
                } else {
                    Split::Train
                }
            })
            .flags(|i| ((i < 6).then_some(true), (i < 6).then_some(true)))
            .category(|i| Some(cats[i].to_string()))
            .bbox(|i| (i == 1).then_some([20, 68, 10, 58]));
        b.0.meta.label_names = Some(
            ["<b>a&b</b>", "one", "two", "three"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
        );
        b.0.meta.modality = "image".into();
        let dataset = b.write(&root.join("dataset.parquet"));
        Fx {
            _dir: dir,
            root,
            dataset,
        }
    }

    fn p(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// A neighbours file with every kind of list: a hit at rank 1, at rank 2, none. Its k is
    /// the gallery size (so @5 metrics are allowed); the lists hold 3 rows each, as OML's
    /// thresholding leaves them (recorded as such: score refuses lists cut otherwise).
    fn neighbors(&self) -> PathBuf {
        let lists: [(i64, [(i64, f32); 3]); 6] = [
            (0, [(1, 0.1), (2, 0.5), (3, 0.9)]),
            (1, [(4, 0.3), (0, 0.4), (5, 1.2)]),
            (2, [(0, 0.6), (1, 0.7), (4, 1.1)]),
            (3, [(2, 0.2), (5, 0.8), (0, 1.3)]),
            (4, [(5, 0.7), (3, 1.0), (1, 1.4)]),
            (5, [(4, 0.7), (2, 1.5), (0, 1.6)]),
        ];
        let meta = NeighborsMeta {
            metric: "l2".into(),
            k: 6,
            split: Some("validation".into()),
            dataset: self.dataset.display().to_string(),
            dataset_fingerprint: Fingerprint::of(&self.dataset).unwrap().hash,
            n_queries: 6,
            n_gallery: 6,
            exclusions: "self,sequence".into(),
            complete: true,
            extra: [("simile.rerank.method".to_string(), "threshold".to_string())]
                .into_iter()
                .collect(),
            ..Default::default()
        };
        let lists: Vec<(i64, Vec<(i64, f32)>)> =
            lists.iter().map(|(q, l)| (*q, l.to_vec())).collect();
        common::write_neighbors(&self.p("neighbors.parquet"), &meta, &lists)
    }

    /// A training folder: 2 epochs of 3 steps, validation before and after each epoch.
    fn train_dir(&self) -> PathBuf {
        let dir = self.p("trained");
        std::fs::create_dir(&dir).unwrap();
        let steps: Vec<Row> = (0..6)
            .map(|i| Row {
                ints: vec![("epoch".into(), i / 3), ("step".into(), i + 1)],
                values: vec![("loss".into(), Some(1.0 / (i + 1) as f64))],
            })
            .collect();
        log::write(
            &dir.join("train_log.parquet"),
            &steps,
            &log::meta("train_log"),
        )
        .unwrap();
        let val: Vec<Row> = (0..3)
            .map(|e| Row {
                ints: vec![("epoch".into(), e), ("step".into(), 3 * e)],
                values: vec![
                    ("OVERALL/cmc/1".into(), Some(0.2 + 0.2 * e as f64)),
                    ("OVERALL/map/5".into(), Some(0.3 + 0.1 * e as f64)),
                    ("OVERALL/n_queries".into(), Some(6.0)),
                ],
            })
            .collect();
        log::write(
            &dir.join("val_metrics.parquet"),
            &val,
            &log::meta("val_metrics"),
        )
        .unwrap();
        dir
    }
}

fn score(args: &[&dyn AsRef<std::ffi::OsStr>]) -> common::Run {
    let args: Vec<String> = args
        .iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect();
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    common::run(BIN, &refs)
}

/// Every `src="..."` and `href="..."` value of the page.
fn links(html: &str) -> Vec<String> {
    let mut out = Vec::new();
    for attr in ["src=\"", "href=\""] {
        let mut rest = html;
        while let Some(i) = rest.find(attr) {
            rest = &rest[i + attr.len()..];
            let end = rest.find('"').expect("a closed attribute");
            out.push(rest[..end].to_string());
            rest = &rest[end..];
        }
    }
    out
}

/// Writes the report of the fixture (with the training folder) and returns (fixture, page).
fn report() -> (Fx, PathBuf, String) {
    let fx = Fx::new();
    let nb = fx.neighbors();
    let td = fx.train_dir();
    let out = fx.p("report.html");
    let r = score(&[
        &"--dataset",
        &fx.dataset,
        &"--neighbors",
        &nb,
        &"--out",
        &fx.p("metrics.json"),
        &"--report",
        &out,
        &"--train-dir",
        &td,
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("wrote report"), "{}", r.stderr);
    let html = std::fs::read_to_string(&out).unwrap();
    (fx, out, html)
}

/// Query rows the fixture must show: per default metric, the 5 worst of the queries where it
/// is defined. Precision@5 is undefined for queries 4 and 5 (no positives, non-empty list).
const EXPECTED_ROWS: usize = 5 + 5 + 4 + 5;

#[test]
fn report_is_self_contained_escaped_and_complete() {
    let (fx, out, html) = report();
    // Self-contained: every src and href is a data: URI or an in-page anchor; no network.
    let ls = links(&html);
    assert!(!ls.is_empty());
    for l in &ls {
        assert!(
            l.starts_with("data:") || l.starts_with('#'),
            "external reference {l}"
        );
    }
    assert!(!html.contains("http://") && !html.contains("https://"));
    assert!(!html.contains("<script"), "no script needed");
    let imgs = html.matches("<img ").count();
    assert_eq!(html.matches(r#"src="data:image/"#).count(), imgs);
    // Rows: the worst queries of each default metric.
    assert_eq!(html.matches(r#"<div class="qrow""#).count(), EXPECTED_ROWS);
    for key in ["cmc/1", "cmc/5", "precision/5", "map/5"] {
        assert!(
            html.contains(&format!(
                "top {} worst by OVERALL/{key}",
                if key == "precision/5" { 4 } else { 5 }
            )),
            "{key}"
        );
    }
    // Each row: the query (blue), up to 5 galleries (3 here), 1 ground-truth item or none.
    assert_eq!(html.matches(r#"class="item query""#).count(), EXPECTED_ROWS);
    let galleries = html.matches(r#"class="item hit""#).count()
        + html.matches(r#"class="item miss-item""#).count();
    assert_eq!(galleries, 3 * EXPECTED_ROWS);
    // The worst by cmc/1 are the queries without a hit at rank 1, in id order: 1, 2, 4, 5,
    // then 0 (value 1). Query 1's first neighbour, id 4, is wrong at distance 0.300.
    let cmc1 = &html[html.find(r#"id="worst-cmc_1""#).unwrap()..];
    let order: Vec<&str> = cmc1
        .match_indices(r#"data-query-id=""#)
        .take(5)
        .map(|(i, m)| {
            let s = &cmc1[i + m.len()..];
            &s[..s.find('"').unwrap()]
        })
        .collect();
    assert_eq!(order, ["1", "2", "4", "5", "0"]);
    assert!(html.contains("Gallery #4 - 0.300"));
    assert!(html.contains("GT #0"));
    // Escaped: the label name and the category are shown as text, never as markup.
    assert!(
        html.contains("label 0: &lt;b&gt;a&amp;b&lt;/b&gt;"),
        "label name"
    );
    assert!(!html.contains("<b>a&b</b>"));
    assert!(
        html.contains("<td>c&lt;1</td>"),
        "category row of the metrics table"
    );
    assert!(!html.contains("c<1"));
    // The metrics table: OVERALL and both categories, OVERALL cmc@1 = 2/6, with its
    // interval under it.
    assert!(html.contains(
        r#"<tr class="overall"><td>OVERALL</td><td>6</td><td>2</td><td>0.3333<br><small class="ci">["#
    ));
    // Distances: 3 correct rows (queries 0, 1, 3 find their one positive) of 18.
    assert!(html.contains("correct (same label): 3"));
    assert!(html.contains("wrong: 15"));
    // Learning curves from the training folder.
    assert!(html.contains("Training loss") && html.contains("Validation metrics"));
    assert!(html.contains("OVERALL/cmc/1") && !html.contains("OVERALL/n_queries<"));
    // Written atomically with a manifest; nothing else left behind.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fx.p("report.html.manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["stage"], "score");
    assert_eq!(manifest["rows"]["query_rows"], EXPECTED_ROWS as u64);
    assert!(manifest["inputs"]["train_log"].is_object());
    assert_eq!(
        common::listing(&fx.root),
        [
            "dataset.parquet",
            "img",
            "metrics.json",
            "metrics.json.manifest.json",
            "neighbors.parquet",
            "report.html",
            "report.html.manifest.json",
            "trained"
        ]
    );
    // Thumbnails are small: the page stays well under 200 KiB for 19 rows.
    let size = std::fs::metadata(&out).unwrap().len();
    assert!(size < 200 * 1024, "{size} bytes");
}

#[test]
fn bad_report_flags_leave_nothing() {
    let fx = Fx::new();
    let nb = fx.neighbors();
    let listing = common::listing(&fx.root);
    // --train-dir without --report is a flag error.
    let r = score(&[
        &"--dataset",
        &fx.dataset,
        &"--neighbors",
        &nb,
        &"--out",
        &fx.p("m.json"),
        &"--train-dir",
        &fx.root,
    ]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    // A training folder without train_log.parquet: exit 2 naming it, nothing written.
    let r = score(&[
        &"--dataset",
        &fx.dataset,
        &"--neighbors",
        &nb,
        &"--out",
        &fx.p("m.json"),
        &"--report",
        &fx.p("r.html"),
        &"--train-dir",
        &fx.p("img"),
    ]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("train_log.parquet"), "{}", r.stderr);
    // The report over an input or over --out.
    for (report, needle) in [(&nb, "neighbors.parquet"), (&fx.p("m.json"), "same file")] {
        let r = score(&[
            &"--dataset",
            &fx.dataset,
            &"--neighbors",
            &nb,
            &"--out",
            &fx.p("m.json"),
            &"--report",
            report,
        ]);
        assert_eq!(r.code, 2, "{}", r.stderr);
        assert!(r.stderr.contains(needle), "{}", r.stderr);
    }
    assert_eq!(common::listing(&fx.root), listing);
}

#[test]
fn missing_images_are_drawn_as_notes() {
    let fx = Fx::new();
    let nb = fx.neighbors();
    std::fs::remove_file(fx.p("img/4.png")).unwrap();
    let out = fx.p("r.html");
    let r = score(&[
        &"--dataset",
        &fx.dataset,
        &"--neighbors",
        &nb,
        &"--out",
        &fx.p("m.json"),
        &"--report",
        &out,
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("image unavailable"), "{}", r.stderr);
    let html = std::fs::read_to_string(&out).unwrap();
    assert!(html.contains("image unavailable: id 4"));
    assert!(
        !html.contains("Learning curves"),
        "no --train-dir, no curves"
    );
}

/// Where the rendered page is kept: `target/tmp/report/` (CARGO_TARGET_TMPDIR).
fn artifacts() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("report");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Counts screenshot pixels of exactly this colour.
fn count(img: &RgbImage, c: [u8; 3]) -> usize {
    img.pixels().filter(|p| p.0 == c).count()
}

#[test]
fn renders_in_headless_chromium() {
    let have = ["chromium", "chromium-browser"].iter().any(|b| {
        std::process::Command::new("sh")
            .args(["-c", &format!("command -v {b}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    });
    if !have {
        // `make test` installs Chromium and sets SIMILE_REQUIRE_CHROMIUM: there a missing
        // browser is a failure, not a skip.
        assert!(
            std::env::var_os("SIMILE_REQUIRE_CHROMIUM").is_none(),
            "chromium is not installed but SIMILE_REQUIRE_CHROMIUM is set (make test): `make deps` or scripts/bootstrap-apt.sh chromium installs it"
        );
        eprintln!(
            "SKIPPED renders_in_headless_chromium: chromium is not installed (`make deps` or scripts/bootstrap-apt.sh chromium installs it)"
        );
        return;
    }
    let (_fx, page, _) = report();
    let dir = artifacts();
    let kept = dir.join("report.html");
    std::fs::copy(&page, &kept).unwrap();
    let shot = dir.join("report.png");
    let r = common::run(
        common::repo_root()
            .join("scripts/chromium-check")
            .to_str()
            .unwrap(),
        &[kept.to_str().unwrap(), shot.to_str().unwrap(), "1280,3000"],
    );
    assert_eq!(r.code, 0, "chromium-check failed: {}", r.stderr);
    // The DOM after load: every section and every query row is there.
    let dom = &r.stdout;
    for id in ["metrics", "distances", "worst", "curves"] {
        assert!(dom.contains(&format!(r#"id="{id}""#)), "section {id}");
    }
    assert_eq!(dom.matches(r#"class="qrow""#).count(), EXPECTED_ROWS);
    // As a person sees it: OML's frame colours and the thumbnails' own colours are painted
    // (a thumbnail that failed to decode would leave its colour out).
    let img = image::open(&shot).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (1280, 3000));
    assert!(count(&img, [0, 0, 255]) > 1000, "blue query frames");
    assert!(count(&img, [0, 255, 0]) > 500, "green frames");
    assert!(count(&img, [255, 0, 0]) > 500, "red frames");
    assert!(
        count(&img, [120, 120, 120]) > 500,
        "grey ground-truth frames"
    );
    for c in COLOURS {
        assert!(count(&img, c) > 200, "thumbnail colour {c:?} not painted");
    }
    eprintln!("screenshot kept at {}", shot.display());
}

#[test]
fn an_unchanged_report_is_not_redone() {
    let fx = Fx::new();
    let nb = fx.neighbors();
    let td = fx.train_dir();
    let (out, m) = (fx.p("r.html"), fx.p("m.json"));
    let args = |extra: &[&str]| {
        let mut a: Vec<String> = [
            "--dataset",
            fx.dataset.to_str().unwrap(),
            "--neighbors",
            nb.to_str().unwrap(),
            "--out",
            m.to_str().unwrap(),
            "--report",
            out.to_str().unwrap(),
            "--train-dir",
            td.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let go = |extra: &[&str]| {
        let a = args(extra);
        common::run(BIN, &a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let r = go(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("wrote report"));
    // Same inputs and parameters: nothing is redone.
    let r = go(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("up to date"), "{}", r.stderr);
    assert!(!r.stderr.contains("wrote report"), "{}", r.stderr);
    // A new training log (the run went on) redoes the report, and the scoring with it.
    let steps: Vec<Row> = (0..2)
        .map(|i| Row {
            ints: vec![("epoch".into(), 0), ("step".into(), i + 1)],
            values: vec![("loss".into(), Some(0.5))],
        })
        .collect();
    log::write(
        &td.join("train_log.parquet"),
        &steps,
        &log::meta("train_log"),
    )
    .unwrap();
    let r = go(&[]);
    assert!(r.stderr.contains("wrote report"), "{}", r.stderr);
    // --force redoes an up-to-date one.
    let r = go(&["--force"]);
    assert!(r.stderr.contains("wrote report"), "{}", r.stderr);
}
