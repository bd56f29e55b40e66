//! Intervals in `metrics.json` and `simile-score compare`, the real binary on generated
//! neighbour files whose differences are known: a candidate that gains on a fifth of the
//! queries, one that only swaps a few, gates, and inputs that cannot be compared.
use crate::common;
use simile::dataset::Split;
use simile::io::Fingerprint;
use simile::neighbors::NeighborsMeta;
use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_simile-score");
const LABELS: i64 = 120;
const PER_LABEL: i64 = 3;

struct Fx {
    _dir: tempfile::TempDir,
    root: PathBuf,
    dataset: PathBuf,
}

fn label_of(id: i64) -> i64 {
    id / PER_LABEL
}

impl Fx {
    /// 120 labels x 3 validation rows, every row a query and a gallery row; categories by
    /// label parity.
    fn new() -> Fx {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let dataset = root.join("dataset.parquet");
        let n = LABELS * PER_LABEL;
        common::DatasetBuilder::new(0..n)
            .label(|i| Some(label_of(i as i64)))
            .path(|i| Some(format!("img/{i}.jpg")))
            .split(|_| Split::Validation)
            .flags(|_| (Some(true), Some(true)))
            .category(|i| {
                Some(
                    if label_of(i as i64) % 2 == 0 {
                        "even"
                    } else {
                        "odd"
                    }
                    .into(),
                )
            })
            .build()
            .write(&dataset, &root)
            .unwrap();
        Fx {
            _dir: dir,
            root,
            dataset,
        }
    }

    fn p(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// A neighbours file (k = 5) where query `q` finds a positive first iff `hit(q)`.
    fn model(&self, name: &str, hit: impl Fn(i64) -> bool) -> PathBuf {
        let n = LABELS * PER_LABEL;
        let meta = NeighborsMeta {
            metric: "l2".into(),
            k: 5,
            split: Some("validation".into()),
            dataset: self.dataset.display().to_string(),
            dataset_fingerprint: Fingerprint::of(&self.dataset).unwrap().hash,
            n_queries: n as usize,
            n_gallery: n as usize,
            exclusions: "self,sequence".into(),
            complete: true,
            ..Default::default()
        };
        let lists: Vec<(i64, Vec<(i64, f32)>)> = (0..n)
            .map(|q| {
                let l = label_of(q);
                let pos: Vec<i64> = (l * PER_LABEL..(l + 1) * PER_LABEL)
                    .filter(|&g| g != q)
                    .collect();
                let next = (l + 1) % LABELS;
                let neg: Vec<i64> = (next * PER_LABEL..(next + 1) * PER_LABEL).collect();
                let order = if hit(q) {
                    [pos[0], neg[0], pos[1], neg[1], neg[2]]
                } else {
                    [neg[0], pos[0], neg[1], pos[1], neg[2]]
                };
                let list = order
                    .iter()
                    .enumerate()
                    .map(|(i, &g)| (g, 0.1 * (i + 1) as f32))
                    .collect();
                (q, list)
            })
            .collect();
        common::write_neighbors(&self.p(name), &meta, &lists)
    }
}

/// The baseline: whole labels are easy or hard (labels 0-6 of every 10 hit, the rest miss).
fn baseline_hit(q: i64) -> bool {
    label_of(q) % 10 < 7
}

fn run(args: &[&dyn AsRef<std::ffi::OsStr>]) -> (i32, String) {
    let o = Command::new(BIN).args(args).output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// `simile-score compare` of two files of `fx`'s dataset into `out`, with `extra` flags.
fn compare(
    fx: &Fx,
    baseline: &Path,
    candidate: &Path,
    out: &Path,
    extra: &[&str],
) -> (i32, String) {
    let mut v: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
        &"compare",
        &"--dataset",
        &fx.dataset,
        &"--baseline",
        &baseline,
        &"--candidate",
        &candidate,
        &"--out",
        &out,
    ];
    for e in extra {
        v.push(e);
    }
    run(&v)
}

fn json(p: &Path) -> serde_json::Map<String, serde_json::Value> {
    match serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap() {
        serde_json::Value::Object(m) => m,
        other => panic!("not an object: {other}"),
    }
}

fn num(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn metrics_json_carries_intervals_beside_unchanged_means() {
    let fx = Fx::new();
    let a = fx.model("a.parquet", baseline_hit);
    let (with, off, by_query) = (fx.p("m.json"), fx.p("off.json"), fx.p("q.json"));
    let ds = &fx.dataset;
    let (code, err) = run(&[&"--dataset", ds, &"--neighbors", &a, &"--out", &with]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("95% interval"), "{err}");
    let (code, err) = run(&[
        &"--dataset",
        ds,
        &"--neighbors",
        &a,
        &"--out",
        &off,
        &"--ci",
        &"off",
    ]);
    assert_eq!(code, 0, "{err}");
    let (code, err) = run(&[
        &"--dataset",
        ds,
        &"--neighbors",
        &a,
        &"--out",
        &by_query,
        &"--ci-by",
        &"query",
    ]);
    assert_eq!(code, 0, "{err}");
    let (m, o, q) = (json(&with), json(&off), json(&by_query));
    // OML's keys keep their values bit for bit; the intervals are extra keys.
    for (k, v) in &o {
        assert_eq!(m.get(k), Some(v), "{k}");
        assert!(!k.ends_with("/ci_low") && !k.ends_with("/ci_high"), "{k}");
    }
    for g in ["OVERALL", "even", "odd"] {
        for metric in ["cmc/1", "cmc/5", "precision/5", "map/5"] {
            let key = format!("{g}/{metric}");
            let (v, lo, hi) = (
                num(&m[&key]),
                num(&m[&format!("{key}/ci_low")]),
                num(&m[&format!("{key}/ci_high")]),
            );
            assert!(lo <= v && v <= hi, "{key}: {lo} {v} {hi}");
        }
    }
    // CMC@1 is 0.7, decided per label: resampling labels sees that only 120 labels vary,
    // so its interval is wider than resampling the 360 queries as if independent.
    let width = |m: &serde_json::Map<_, _>| {
        num(&m["OVERALL/cmc/1/ci_high"]) - num(&m["OVERALL/cmc/1/ci_low"])
    };
    assert!(
        width(&m) > 1.4 * width(&q),
        "label {} vs query {}",
        width(&m),
        width(&q)
    );
    assert!((num(&m["OVERALL/cmc/1"]) - 0.7).abs() < 1e-12);
    // Same seed, same bytes; the settings are part of the manifest, so changing them
    // recomputes.
    let again = fx.p("again.json");
    run(&[&"--dataset", ds, &"--neighbors", &a, &"--out", &again]);
    assert_eq!(
        std::fs::read(&with).unwrap(),
        std::fs::read(&again).unwrap()
    );
    let (code, err) = run(&[
        &"--dataset",
        ds,
        &"--neighbors",
        &a,
        &"--out",
        &with,
        &"--bootstrap",
        &"500",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("up to date"), "{err}");
    let (code, err) = run(&[
        &"--dataset",
        ds,
        &"--neighbors",
        &a,
        &"--out",
        &fx.p("x.json"),
        &"--ci",
        &"1.5",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(!fx.p("x.json").exists());
}

#[test]
fn compare_finds_a_real_gain_and_calls_a_few_swaps_noise() {
    let fx = Fx::new();
    let a = fx.model("a.parquet", baseline_hit);
    // Trained: also hits the labels 7 and 8 of every 10 (a fifth of the queries).
    let b = fx.model("b.parquet", |q| baseline_hit(q) || label_of(q) % 10 < 9);
    // A wash: three queries lost, three gained.
    let c = fx.model("c.parquet", |q| match q {
        0 | 30 | 60 => false,
        21 | 51 | 81 => true,
        _ => baseline_hit(q),
    });
    let (out, pq) = (fx.p("cmp.json"), fx.p("flips.parquet"));
    let ds = &fx.dataset;
    let (code, err) = compare(&fx, &a, &b, &out, &["--per-query", pq.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("better: the interval excludes 0"), "{err}");
    let m = json(&out);
    let r = m["OVERALL/cmc/1"].as_object().unwrap();
    let gained = (LABELS / 10 * 2 * PER_LABEL) as f64;
    let n = (LABELS * PER_LABEL) as f64;
    assert!((num(&r["baseline"]) - 0.7).abs() < 1e-12, "{r:?}");
    assert!((num(&r["difference"]) - gained / n).abs() < 1e-12, "{r:?}");
    assert!(num(&r["ci_low"]) > 0.0 && num(&r["ci_high"]) >= num(&r["difference"]));
    assert!(num(&r["p_value"]) < 0.01, "{r:?}");
    assert!(num(&r["mcnemar_p_value"]) < 1e-10, "{r:?}");
    assert_eq!(r["improved"], gained as u64);
    assert_eq!(r["worsened"], 0);
    assert_eq!(r["unchanged"], (n - gained) as u64);
    assert!(!m["OVERALL/map/5"]
        .as_object()
        .unwrap()
        .contains_key("mcnemar_p_value"));
    // The baseline column is what simile-score says of that file.
    let alone = fx.p("a.json");
    run(&[&"--dataset", ds, &"--neighbors", &a, &"--out", &alone]);
    let s = json(&alone);
    for (k, v) in &m {
        assert_eq!(v["baseline"], s[k], "{k}");
    }
    assert_eq!(m.len(), 12, "4 metrics x 3 groups: {:?}", m.keys());
    // Every query's pair of values.
    let t = simile::table::read_parquet(&pq, None).unwrap();
    let names: Vec<String> = t
        .batch
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    assert_eq!(
        &names[..5],
        [
            "query_id",
            "label",
            "category",
            "cmc@1_baseline",
            "cmc@1_candidate"
        ]
    );
    assert_eq!(t.batch.num_rows(), n as usize);
    assert_eq!(t.meta["simile.artifact"], "compare_per_query");

    let (code, err) = compare(&fx, &a, &c, &fx.p("wash.json"), &[]);
    assert_eq!(code, 0, "{err}");
    let w = json(&fx.p("wash.json"));
    let r = w["OVERALL/cmc/1"].as_object().unwrap();
    assert_eq!(num(&r["difference"]), 0.0);
    assert!(num(&r["ci_low"]) < 0.0 && num(&r["ci_high"]) > 0.0, "{r:?}");
    assert_eq!(num(&r["p_value"]), 1.0);
    assert_eq!(num(&r["mcnemar_p_value"]), 1.0);
    assert_eq!(
        (r["improved"].as_u64(), r["worsened"].as_u64()),
        (Some(3), Some(3))
    );
    assert!(err.contains("no clear difference"), "{err}");

    // The page: each difference against zero, and the flipped queries drawn twice.
    let page = fx.p("wash.html");
    let (code, err) = compare(
        &fx,
        &a,
        &c,
        &fx.p("wash2.json"),
        &["--report", page.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{err}");
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(
        html.contains("<svg class=\"chart\""),
        "the differences chart"
    );
    assert!(html.contains("Queries that flipped"));
    // 3 lost and 3 gained, each drawn with the baseline's and the candidate's neighbours.
    assert_eq!(html.matches(r#"<div class="qrow""#).count(), 12);
    assert!(html.contains(r#"data-query-id="0""#) && html.contains(r#"data-query-id="21""#));
    assert!(!html.contains("<script") && !html.contains("http://"));
    assert!(fx.p("wash.html.manifest.json").exists());
    // A report path that is an input is refused before anything is written.
    let (code, err) = compare(
        &fx,
        &a,
        &c,
        &fx.p("wash3.json"),
        &["--report", a.to_str().unwrap()],
    );
    assert_eq!(code, 2, "{err}");
    assert!(!fx.p("wash3.json").exists());
}

#[test]
fn a_gate_fails_a_worse_candidate_and_bad_pairs_are_refused() {
    let fx = Fx::new();
    let a = fx.model("a.parquet", baseline_hit);
    let b = fx.model("b.parquet", |q| baseline_hit(q) || label_of(q) % 10 < 9);
    let ds = &fx.dataset;
    let out = fx.p("gate.json");
    // B as the baseline, A as the candidate: significantly worse on CMC@1.
    let (code, err) = compare(&fx, &b, &a, &out, &["--fail-if-worse", "cmc/1"]);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("FAILED --fail-if-worse OVERALL/cmc/1"),
        "{err}"
    );
    assert!(out.exists(), "the numbers behind a failed gate are written");
    // A margin wider than the loss passes.
    let (code, err) = compare(&fx, &b, &a, &out, &["--fail-if-worse", "cmc@1:0.5"]);
    assert_eq!(code, 0, "{err}");
    // The better candidate passes its gate.
    let (code, err) = compare(&fx, &a, &b, &fx.p("ok.json"), &["--fail-if-worse", "cmc/1"]);
    assert_eq!(code, 0, "{err}");

    let refused = |args: &[&dyn AsRef<std::ffi::OsStr>], says: &str| {
        let dest = fx.p("refused.json");
        let mut v: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"compare", &"--out", &dest];
        v.extend_from_slice(args);
        let (code, err) = run(&v);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains(says), "expected {says:?} in: {err}");
        assert!(!dest.exists());
    };
    // A metric that was not computed.
    refused(
        &[
            &"--dataset",
            ds,
            &"--baseline",
            &a,
            &"--candidate",
            &b,
            &"--fail-if-worse",
            &"ndcg/10",
        ],
        "not a computed metric",
    );
    // The same file twice.
    refused(
        &[&"--dataset", ds, &"--baseline", &a, &"--candidate", &a],
        "are the same file",
    );
    // Intervals off.
    refused(
        &[
            &"--dataset",
            ds,
            &"--baseline",
            &a,
            &"--candidate",
            &b,
            &"--ci",
            &"off",
        ],
        "--ci off",
    );
    // Files of another dataset than --dataset (one more row: another fingerprint).
    let grown = fx.p("grown.parquet");
    common::DatasetBuilder::new(0..LABELS * PER_LABEL + 1)
        .label(|i| Some(label_of(i as i64)))
        .path(|i| Some(format!("img/{i}.jpg")))
        .split(|_| Split::Validation)
        .flags(|_| (Some(true), Some(true)))
        .build()
        .write(&grown, &fx.root)
        .unwrap();
    refused(
        &[&"--dataset", &grown, &"--baseline", &a, &"--candidate", &b],
        "computed from a different dataset",
    );
}
