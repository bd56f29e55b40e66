//! simile-score end to end: the real binary on a hand-made dataset with categories and
//! sequences, hand-made neighbour files, and every bad-input case of issue #4.
use crate::common;
use simile::dataset::{Dataset, Split};
use simile::io::Fingerprint;
use simile::metrics::stage::{self, ScoreRequest};
use simile::metrics::{AggregateOptions, MetricSet};
use simile::neighbors::NeighborsMeta;
use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_simile-score");

/// Validation rows 0..8 (all queries and gallery) and two train rows:
///
/// | id | label | category | sequence | positives (self and same sequence removed) |
/// |----|-------|----------|----------|-------------------------------------------|
/// | 0  | 1     | cat      | s1       | {2}                                       |
/// | 1  | 1     | cat      | s1       | {2}                                       |
/// | 2  | 1     | cat      | -        | {0, 1}                                    |
/// | 3  | 2     | dog      | -        | {4, 5}                                    |
/// | 4  | 2     | dog      | s2       | {3}                                       |
/// | 5  | 2     | dog      | s2       | {3}                                       |
/// | 6  | 3     | dog      | -        | none                                      |
/// | 7  | 4     | cat      | -        | none                                      |
fn make_dataset() -> Dataset {
    let val = 8;
    let labels = [1, 1, 1, 2, 2, 2, 3, 4, 1, 2];
    let cats = [
        "cat", "cat", "cat", "dog", "dog", "dog", "dog", "cat", "cat", "dog",
    ];
    let seqs = [
        Some("s1"),
        Some("s1"),
        None,
        None,
        Some("s2"),
        Some("s2"),
        None,
        None,
        None,
        None,
    ];
    let ids: Vec<i64> = (0..val as i64).chain([100, 101]).collect();
    common::DatasetBuilder::new(ids)
        .label(|i| Some(labels[i]))
        .path(|i| Some(format!("img/{i}.jpg")))
        .split(|i| {
            if i < val {
                Split::Validation
            } else {
                Split::Train
            }
        })
        .flags(|i| ((i < val).then_some(true), (i < val).then_some(true)))
        .category(|i| Some(cats[i].to_string()))
        .sequence(|i| seqs[i].map(str::to_string))
        .build()
}

fn label(id: i64) -> i64 {
    [1, 1, 1, 2, 2, 2, 3, 4][id as usize]
}

fn seq(id: i64) -> Option<&'static str> {
    [
        Some("s1"),
        Some("s1"),
        None,
        None,
        Some("s2"),
        Some("s2"),
        None,
        None,
    ][id as usize]
}

/// The exclusion rule, written out independently of the library.
fn excluded(q: i64, g: i64) -> bool {
    q == g || (seq(q).is_some() && seq(q) == seq(g))
}

fn positive(q: i64, g: i64) -> bool {
    label(q) == label(g) && !excluded(q, g)
}

/// Per query id, its (gallery id, distance) list.
type Lists = Vec<(i64, Vec<(i64, f32)>)>;

struct Fx {
    _dir: tempfile::TempDir,
    root: PathBuf,
    dataset: PathBuf,
}

impl Fx {
    fn new() -> Fx {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let dataset = root.join("dataset.parquet");
        make_dataset().write(&dataset, &root).unwrap();
        Fx {
            _dir: dir,
            root,
            dataset,
        }
    }

    fn p(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    fn meta(&self, k: usize) -> NeighborsMeta {
        NeighborsMeta {
            metric: "l2".into(),
            k,
            split: Some("validation".into()),
            dataset: self.dataset.display().to_string(),
            dataset_fingerprint: Fingerprint::of(&self.dataset).unwrap().hash,
            n_queries: 8,
            n_gallery: 8,
            exclusions: "self,sequence".into(),
            complete: true,
            ..Default::default()
        }
    }

    /// Writes a neighbours file: per query id, its (gallery id, distance) list.
    fn neighbors(&self, name: &str, k: usize, lists: &[(i64, Vec<(i64, f32)>)]) -> PathBuf {
        self.neighbors_with(name, self.meta(k), lists)
    }

    fn neighbors_with(
        &self,
        name: &str,
        meta: NeighborsMeta,
        lists: &[(i64, Vec<(i64, f32)>)],
    ) -> PathBuf {
        common::write_neighbors(&self.p(name), &meta, lists)
    }

    /// Embeddings of all ten rows (train ones too), with the ids file.
    fn embeddings(&self) -> (PathBuf, Vec<Vec<f32>>) {
        let d = 4;
        let mut s = 12345u64;
        let mut rnd = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        let rows: Vec<Vec<f32>> = (0..10).map(|_| (0..d).map(|_| rnd()).collect()).collect();
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        let path = self.p("emb.npy");
        simile::npy::write_f32_matrix(&path, &flat, d, simile::npy::DType::F32).unwrap();
        let ids: Vec<i64> = (0..8).chain([100, 101]).collect();
        simile::npy::write_i64(simile::npy::ids_path(&path), &ids).unwrap();
        (path, rows[..8].to_vec())
    }
}

/// The hand-made lists of the fixture (k = 3; query 7 has none).
fn lists() -> Lists {
    let l = |gs: [i64; 3]| {
        gs.iter()
            .enumerate()
            .map(|(i, &g)| (g, 0.1 * (i + 1) as f32))
            .collect()
    };
    vec![
        (0, l([3, 2, 6])),
        (1, l([2, 7, 3])),
        (2, l([5, 0, 1])),
        (3, l([4, 0, 5])),
        (4, l([0, 1, 2])),
        (5, l([3, 6, 7])),
        (6, l([3, 4, 5])),
    ]
}

struct Out {
    code: i32,
    stderr: String,
}

fn score(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Out {
    let o = Command::new(BIN).args(args).output().unwrap();
    Out {
        code: o.status.code().unwrap_or(-1),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

fn read_json(p: &Path) -> serde_json::Map<String, serde_json::Value> {
    match serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap() {
        serde_json::Value::Object(m) => m,
        other => panic!("not an object: {other}"),
    }
}

fn num(m: &serde_json::Map<String, serde_json::Value>, k: &str) -> f64 {
    m.get(k)
        .unwrap_or_else(|| panic!("no key {k}"))
        .as_f64()
        .unwrap_or(f64::NAN)
}

fn assert_close(got: f64, want: f64, what: &str) {
    assert!((got - want).abs() < 1e-9, "{what}: got {got}, want {want}");
}

#[test]
fn scores_a_dataset_with_categories_and_sequences() {
    let fx = Fx::new();
    let nb = fx.neighbors("neighbors.parquet", 3, &lists());
    let out = fx.p("metrics.json");
    let pq = fx.p("per_query.parquet");
    let (emb, _) = fx.embeddings();
    let r = score(&[
        &"--dataset",
        &fx.dataset,
        &"--neighbors",
        &nb,
        &"--out",
        &out,
        &"--cmc",
        &"1,3",
        &"--precision",
        &"2",
        &"--map",
        &"3",
        &"--ndcg",
        &"3",
        &"--recall",
        &"3",
        &"--map-at-r",
        &"--r-precision",
        &"--mrr",
        &"--per-query",
        &pq,
        &"--embeddings",
        &emb,
        &"--pcf",
        &"0.5",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("8 queries (2 without positives)"),
        "{}",
        r.stderr
    );
    let m = read_json(&out);
    // Hand-computed from the table in `dataset()` and `lists()`.
    assert_close(num(&m, "OVERALL/cmc/1"), 0.5, "cmc@1");
    assert_close(num(&m, "cat/cmc/1"), 0.5, "cat cmc@1");
    assert_close(num(&m, "OVERALL/cmc/3"), 6.0 / 8.0, "cmc@3");
    // precision@2: 1, 1, .5, .5, 0, 1, NaN (left out), 1 (empty list, no positives).
    assert_close(num(&m, "OVERALL/precision/2"), 5.0 / 7.0, "precision@2");
    assert_close(num(&m, "dog/precision/2"), 1.5 / 3.0, "dog precision@2");
    let map3 = 0.5 + 1.0 + 7.0 / 12.0 + 5.0 / 6.0 + 0.0 + 1.0 + 0.0 + 1.0;
    assert_close(num(&m, "OVERALL/map/3"), map3 / 8.0, "map@3");
    assert_close(
        num(&m, "OVERALL/mrr"),
        (0.5 + 1.0 + 0.5 + 1.0 + 0.0 + 1.0 + 0.0 + 1.0) / 8.0,
        "mrr",
    );
    // recall@3: 1, 1, 1, 1, 0, 1, undefined, 1 (empty list, no positives).
    assert_close(num(&m, "OVERALL/recall/3"), 6.0 / 7.0, "recall@3");
    // r-precision: R = 1, 1, 2, 2, 1, 1: hits in the first R: 0, 1, 1/2, 1/2, 0, 1; q7 1.
    assert_close(num(&m, "OVERALL/r_precision"), 4.0 / 7.0, "r_precision");
    assert_eq!(num(&m, "OVERALL/n_queries"), 8.0);
    assert_eq!(num(&m, "OVERALL/n_queries_without_positives"), 2.0);
    assert_eq!(num(&m, "cat/n_queries"), 4.0);
    let keys: Vec<&String> = m.keys().collect();
    assert_eq!(keys[0], "OVERALL/cmc/1");
    assert!(m.contains_key("OVERALL/pcf/0.5") && m.contains_key("dog/pcf/0.5"));
    assert!(m.contains_key("OVERALL/ndcg/3") && m.contains_key("OVERALL/map@r"));
    assert!(!m.keys().any(|k| k.contains("fnmr")));
    assert!(fx.p("metrics.json.manifest.json").exists());

    // The per-query table: one row per query, in id order, with every metric.
    let t = simile::table::read_parquet(&pq, None).unwrap();
    assert_eq!(t.rows(), 8);
    assert_eq!(
        t.meta.get("simile.artifact").map(String::as_str),
        Some("per_query")
    );
    let col = |n: &str| {
        t.batch
            .column_by_name(n)
            .unwrap_or_else(|| panic!("no column {n}"))
            .clone()
    };
    use arrow::array::{Array, Float64Array, Int64Array};
    let npos = col("n_positives");
    let npos = npos.as_any().downcast_ref::<Int64Array>().unwrap();
    assert_eq!(npos.values().to_vec(), vec![1, 1, 2, 2, 1, 1, 0, 0]);
    let prec = col("precision@2");
    let prec = prec.as_any().downcast_ref::<Float64Array>().unwrap();
    assert!(prec.is_null(6) && !prec.is_null(7));
    assert_eq!(prec.value(2), 0.5);
    for c in [
        "query_id",
        "label",
        "category",
        "n_retrieved",
        "cmc@1",
        "cmc@3",
        "map@3",
        "ndcg@3",
        "recall@3",
        "map@r",
        "r_precision",
        "mrr",
    ] {
        col(c);
    }

    // --skip-queries-without-positives leaves queries 6 and 7 out of every mean.
    let out2 = fx.p("skip.json");
    let r = score(&[
        &"--dataset",
        &fx.dataset,
        &"--neighbors",
        &nb,
        &"--out",
        &out2,
        &"--cmc",
        &"1",
        &"--precision",
        &"2",
        &"--map",
        &"3",
        &"--skip-queries-without-positives",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let m = read_json(&out2);
    assert_close(num(&m, "OVERALL/cmc/1"), 3.0 / 6.0, "skip cmc@1");
    assert_close(
        num(&m, "OVERALL/precision/2"),
        4.0 / 6.0,
        "skip precision@2",
    );
    assert_close(num(&m, "OVERALL/map/3"), (map3 - 1.0) / 6.0, "skip map@3");
    // The default set when no metric flag is given (k = 5 > 3 needs an exhaustive file).
    let r = score(&[
        &"--dataset",
        &fx.dataset,
        &"--neighbors",
        &nb,
        &"--out",
        &fx.p("d.json"),
    ]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr
            .contains("cmc@5 is larger than the neighbours file's k = 3"),
        "{}",
        r.stderr
    );
}

/// numpy's linear quantile over sorted values.
fn np_quantile(sorted: &[f64], q: f64) -> f64 {
    let h = (sorted.len() - 1) as f64 * q;
    let lo = h.floor() as usize;
    let hi = (lo + 1).min(sorted.len() - 1);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (h - lo as f64)
}

fn expected_fnmr(pairs: &[(f64, bool)], fmr: f64) -> f64 {
    let mut neg: Vec<f64> = pairs.iter().filter(|p| !p.1).map(|p| p.0).collect();
    neg.sort_by(f64::total_cmp);
    let t = np_quantile(&neg, fmr);
    let pos: Vec<f64> = pairs.iter().filter(|p| p.1).map(|p| p.0).collect();
    pos.iter().filter(|&&p| p >= t).count() as f64 / pos.len() as f64
}

#[test]
fn fnmr_from_embeddings_and_from_an_exhaustive_file() {
    let fx = Fx::new();
    let (emb, rows) = fx.embeddings();
    let dist = |a: usize, b: usize| -> f32 {
        rows[a]
            .iter()
            .zip(&rows[b])
            .map(|(x, y)| (x - y) * (x - y))
            .sum::<f32>()
            .sqrt()
    };
    // Every non-excluded pair, and exhaustive lists sorted by (distance, id).
    let mut pairs = Vec::new();
    let mut full = Vec::new();
    for q in 0..8i64 {
        let mut l: Vec<(i64, f32)> = (0..8i64)
            .filter(|&g| !excluded(q, g))
            .map(|g| (g, dist(q as usize, g as usize)))
            .collect();
        l.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
        pairs.extend(l.iter().map(|&(g, d)| (d as f64, positive(q, g))));
        full.push((q, l));
    }
    let fmr = [0.1, 0.5];
    let want: Vec<f64> = fmr.iter().map(|&f| expected_fnmr(&pairs, f)).collect();

    let nb = fx.neighbors("neighbors.parquet", 3, &lists());
    let out = fx.p("m.json");
    let r = score(&[
        &"--dataset",
        &fx.dataset,
        &"--neighbors",
        &nb,
        &"--out",
        &out,
        &"--cmc",
        &"1",
        &"--precision",
        &"1",
        &"--map",
        &"1",
        &"--fmr",
        &"0.1,0.5",
        &"--embeddings",
        &emb,
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let m = read_json(&out);
    assert!((num(&m, "OVERALL/fnmr@fmr/0.1") - want[0]).abs() < 1e-12);
    assert!((num(&m, "OVERALL/fnmr@fmr/0.5") - want[1]).abs() < 1e-12);
    assert!(
        !m.contains_key("cat/fnmr@fmr/0.1"),
        "FNMR is OVERALL only, as in OML"
    );

    // A file that holds the whole gallery needs no embeddings.
    let nb = fx.neighbors("full.parquet", 8, &full);
    let out = fx.p("full.json");
    let r = score(&[
        &"--dataset",
        &fx.dataset,
        &"--neighbors",
        &nb,
        &"--out",
        &out,
        &"--fmr",
        &"0.1,0.5",
        &"--cmc",
        &"1,5",
        &"--map-at-r",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let m = read_json(&out);
    assert!((num(&m, "OVERALL/fnmr@fmr/0.1") - want[0]).abs() < 1e-12);
    assert!((num(&m, "OVERALL/fnmr@fmr/0.5") - want[1]).abs() < 1e-12);
    // k = 10 > the file's k = 8 is fine: every list is already exhaustive.
    let r = score(&[
        &"--dataset",
        &fx.dataset,
        &"--neighbors",
        &nb,
        &"--out",
        &fx.p("k10.json"),
        &"--cmc",
        &"10",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

/// Runs the binary expecting exit 2, a message containing `needle`, and no output file.
fn refused(fx: &Fx, args: &[&dyn AsRef<std::ffi::OsStr>], needle: &str) {
    let out = fx.p("bad.json");
    let mut all: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"--dataset", &fx.dataset, &"--out", &out];
    all.extend_from_slice(args);
    let r = score(&all);
    assert_eq!(
        r.code, 2,
        "expected exit 2 for {needle:?}; stderr: {}",
        r.stderr
    );
    assert!(
        r.stderr.contains(needle),
        "expected {needle:?} in: {}",
        r.stderr
    );
    assert!(!out.exists(), "no output on bad input ({needle})");
    assert!(!fx.p("bad.json.manifest.json").exists());
}

fn one(f: &dyn Fn(&mut Lists)) -> Lists {
    let mut l = lists();
    f(&mut l);
    l
}

/// Flag errors (clap) and a few of the stage's, through the real binary: exit 2, a clear
/// message, nothing written. Each start loads libtorch, so the rest run in-process below.
#[test]
fn bad_flags_are_refused_by_the_binary() {
    let fx = Fx::new();
    let good = fx.neighbors("neighbors.parquet", 3, &lists());
    for k in ["0", "1.5", "-1"] {
        refused(
            &fx,
            &[&"--neighbors", &good, &"--cmc", &k],
            "k must be a positive integer",
        );
    }
    refused(
        &fx,
        &[&"--neighbors", &good, &"--cmc", &"1", &"--fmr", &"1.5"],
        "must be a number in [0, 1]",
    );
    let mut meta = fx.meta(3);
    meta.dataset_fingerprint = "xxh3:0000000000000000".into();
    let nb = fx.neighbors_with("otherds.parquet", meta, &lists());
    refused(
        &fx,
        &[&"--neighbors", &nb, &"--cmc", &"1"],
        "was computed from a different dataset",
    );
}

fn request(fx: &Fx, neighbors: &Path) -> ScoreRequest {
    ScoreRequest {
        dataset: fx.dataset.clone(),
        gallery_dataset: None,
        neighbors: neighbors.to_path_buf(),
        out: fx.p("bad.json"),
        set: MetricSet {
            cmc: vec![1],
            precision: vec![1],
            map: vec![1],
            ..Default::default()
        },
        fmr: vec![],
        pcf: vec![],
        embeddings: None,
        gallery_embeddings: None,
        per_query: Some(fx.p("bad_pq.parquet")),
        options: AggregateOptions::default(),
        ci: None,
    }
}

/// Runs the stage in-process expecting a user error (exit code 2) and no output.
fn refused_by_stage(fx: &Fx, req: ScoreRequest, needle: &str) {
    let e = match stage::run(&req) {
        Ok(_) => panic!("expected an error containing {needle:?}"),
        Err(e) => e,
    };
    assert_eq!(e.exit_code(), 2, "{e}");
    assert!(
        e.to_string().contains(needle),
        "expected {needle:?} in: {e}"
    );
    for f in ["bad.json", "bad.json.manifest.json", "bad_pq.parquet"] {
        assert!(!fx.p(f).exists(), "no output on bad input ({needle})");
    }
}

#[test]
fn bad_input_is_refused_by_the_stage() {
    let fx = Fx::new();
    let good = fx.neighbors("neighbors.parquet", 3, &lists());
    let with = |name: &str, l: &[(i64, Vec<(i64, f32)>)]| request(&fx, &fx.neighbors(name, 3, l));
    // Neighbour ids not in the dataset, or not in its query/gallery sets.
    refused_by_stage(
        &fx,
        with("unknown.parquet", &one(&|l| l[2].1[1].0 = 999)),
        "gallery_id 999 is not a gallery row",
    );
    refused_by_stage(
        &fx,
        with(
            "unknown_q.parquet",
            &one(&|l| l.push((555, vec![(1, 0.1)]))),
        ),
        "query_id 555 is not a query",
    );
    refused_by_stage(
        &fx,
        with("train.parquet", &one(&|l| l[0].1[0].0 = 100)),
        "gallery_id 100 is not a gallery row",
    );
    // Distances not sorted, duplicate gallery ids, a row the exclusion rule removes.
    refused_by_stage(
        &fx,
        with("unsorted.parquet", &one(&|l| l[3].1[2].1 = 0.05)),
        "query_id 3: distances are not sorted",
    );
    refused_by_stage(
        &fx,
        with("nan.parquet", &one(&|l| l[3].1[2].1 = f32::NAN)),
        "is NaN",
    );
    refused_by_stage(
        &fx,
        with("dup.parquet", &one(&|l| l[1].1[2].0 = 2)),
        "gallery_id 2 appears twice",
    );
    refused_by_stage(
        &fx,
        with("excl.parquet", &one(&|l| l[0].1[0].0 = 1)),
        "is excluded for this query",
    );
    // Non-positive k, FMR and PCF values outside [0, 1].
    let mut r = request(&fx, &good);
    r.set.map = vec![1, 0];
    refused_by_stage(&fx, r, "every k must be a positive integer");
    let mut r = request(&fx, &good);
    r.fmr = vec![-0.1];
    refused_by_stage(&fx, r, "--fmr: every value must be in [0, 1]");
    let mut r = request(&fx, &good);
    r.pcf = vec![2.0];
    refused_by_stage(&fx, r, "--pcf: every value must be in [0, 1]");
    // --pcf or --fmr without the embeddings they need.
    let mut r = request(&fx, &good);
    r.pcf = vec![0.5];
    refused_by_stage(&fx, r, "--pcf needs the embeddings");
    let mut r = request(&fx, &good);
    r.fmr = vec![0.1];
    refused_by_stage(
        &fx,
        r,
        "--fmr needs every non-excluded (query, gallery) pair",
    );
    // k larger than the file's k; MAP@R and R-Precision needing more.
    let mut r = request(&fx, &good);
    r.set.cmc = vec![4];
    refused_by_stage(&fx, r, "cmc@4 is larger than the neighbours file's k = 3");
    let short: Vec<_> = lists()
        .into_iter()
        .map(|(q, l)| (q, l[..1].to_vec()))
        .collect();
    let mut r = request(&fx, &fx.neighbors("short.parquet", 1, &short));
    r.set.r_precision = true;
    refused_by_stage(&fx, r, "--top-k 2 or more");
    // A list longer than the file's k.
    let mut r = request(&fx, &fx.neighbors("long.parquet", 2, &lists()));
    r.set = MetricSet {
        cmc: vec![1],
        ..Default::default()
    };
    refused_by_stage(&fx, r, "has 3 neighbours, more than the file's k = 2");
    // A dataset fingerprint mismatch, and a file without one.
    let mut meta = fx.meta(3);
    meta.dataset_fingerprint = "xxh3:0000000000000000".into();
    refused_by_stage(
        &fx,
        request(&fx, &fx.neighbors_with("fp.parquet", meta, &lists())),
        "was computed from a different dataset",
    );
    let mut meta = fx.meta(3);
    meta.dataset_fingerprint = String::new();
    refused_by_stage(
        &fx,
        request(&fx, &fx.neighbors_with("nofp.parquet", meta, &lists())),
        "records no dataset fingerprint",
    );
    // Other query/gallery flags: the counts the file records differ.
    let mut meta = fx.meta(3);
    meta.n_queries = 9;
    refused_by_stage(
        &fx,
        request(&fx, &fx.neighbors_with("counts.parquet", meta, &lists())),
        "searched 9 queries",
    );
    // A shard part, by name and by metadata.
    let part = fx.p("neighbors.part-0-of-2.parquet");
    std::fs::copy(&good, &part).unwrap();
    refused_by_stage(&fx, request(&fx, &part), "shard part");
    let mut meta = fx.meta(3);
    meta.complete = false;
    refused_by_stage(
        &fx,
        request(
            &fx,
            &fx.neighbors_with("incomplete.parquet", meta, &lists()),
        ),
        "shard part",
    );
    // Not a neighbours file; an output that would overwrite an input.
    refused_by_stage(
        &fx,
        request(&fx, &fx.dataset),
        "not a simile neighbours file",
    );
    let mut r = request(&fx, &good);
    r.out = good.clone();
    let e = stage::run(&r).err().expect("refused");
    assert!(e.to_string().contains("would overwrite an input"), "{e}");
}

#[test]
fn help_has_examples() {
    let o = Command::new(BIN).arg("--help").output().unwrap();
    assert!(o.status.success());
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(
        s.contains("Examples:") && s.contains("--skip-queries-without-positives"),
        "{s}"
    );
}

/// FNMR from embeddings with the cosine and dot distances the neighbours file can name.
#[test]
fn fnmr_from_embeddings_for_every_distance() {
    let fx = Fx::new();
    let (emb, rows) = fx.embeddings();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    for metric in ["cosine", "dot"] {
        let d = |a: usize, b: usize| -> f64 {
            let (x, y) = (&rows[a], &rows[b]);
            match metric {
                "cosine" => 1.0 - (dot(x, y) / (norm(x) * norm(y))) as f64,
                _ => -(dot(x, y) as f64),
            }
        };
        let pairs: Vec<(f64, bool)> = (0..8i64)
            .flat_map(|q| (0..8i64).map(move |g| (q, g)))
            .filter(|&(q, g)| !excluded(q, g))
            .map(|(q, g)| (d(q as usize, g as usize), positive(q, g)))
            .collect();
        let mut meta = fx.meta(3);
        meta.metric = metric.into();
        let nb = fx.neighbors_with(&format!("{metric}.parquet"), meta, &lists());
        let mut r = request(&fx, &nb);
        r.out = fx.p(&format!("{metric}.json"));
        r.per_query = None;
        r.fmr = vec![0.25, 0.5];
        r.embeddings = Some(emb.clone());
        let out = stage::run(&r).unwrap();
        for f in [0.25, 0.5] {
            let got = out
                .computed
                .scores
                .get(&format!("OVERALL/fnmr@fmr/{f}"))
                .unwrap()
                .unwrap();
            assert!(
                (got - expected_fnmr(&pairs, f)).abs() < 1e-12,
                "{metric} {f}"
            );
        }
    }
}

/// The two-sided form: a query dataset against a gallery dataset, no self-exclusion.
#[test]
fn scores_a_two_sided_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let make = |ids: Vec<i64>, labels: Vec<i64>, name: &str| -> PathBuf {
        common::DatasetBuilder::new(ids)
            .label(|i| Some(labels[i]))
            .text(|i| Some(format!("t{i}")))
            .write(&root.join(name))
    };
    // The same ids on both sides: without self-exclusion, query 0 may retrieve gallery 0.
    let q = make(vec![0, 1, 2], vec![1, 2, 3], "q.parquet");
    let g = make(vec![0, 1, 2, 3], vec![1, 1, 2, 5], "g.parquet");
    let meta = NeighborsMeta {
        metric: "l2".into(),
        k: 2,
        split: None,
        dataset: q.display().to_string(),
        dataset_fingerprint: Fingerprint::of(&q).unwrap().hash,
        gallery_dataset: Some(g.display().to_string()),
        gallery_dataset_fingerprint: Some(Fingerprint::of(&g).unwrap().hash),
        n_queries: 3,
        n_gallery: 4,
        exclusions: "sequence".into(),
        complete: true,
        ..Default::default()
    };
    let nb = common::write_neighbors(
        &root.join("nb.parquet"),
        &meta,
        &[(0, vec![(0, 0.0), (2, 0.5)]), (1, vec![(3, 0.1), (2, 0.2)])],
    );
    let mut req = ScoreRequest {
        dataset: q.clone(),
        gallery_dataset: None,
        neighbors: nb.clone(),
        out: root.join("m.json"),
        set: MetricSet {
            cmc: vec![1, 2],
            precision: vec![2],
            map: vec![2],
            ..Default::default()
        },
        fmr: vec![],
        pcf: vec![],
        embeddings: None,
        gallery_embeddings: None,
        per_query: None,
        options: AggregateOptions::default(),
        ci: None,
    };
    let e = stage::run(&req).err().expect("needs the gallery dataset");
    assert!(e.to_string().contains("--gallery-dataset"), "{e}");
    req.gallery_dataset = Some(g.clone());
    let out = stage::run(&req).unwrap();
    let v = |k: &str| out.computed.scores.get(k).unwrap().unwrap();
    // q0: [hit, miss], 2 positives; q1: [miss, hit], 1 positive; q2: no rows, no positives.
    assert_close(v("OVERALL/cmc/1"), 2.0 / 3.0, "cmc@1");
    assert_close(v("OVERALL/cmc/2"), 1.0, "cmc@2");
    assert_close(
        v("OVERALL/precision/2"),
        (0.5 + 1.0 + 1.0) / 3.0,
        "precision@2",
    );
    assert_close(v("OVERALL/map/2"), (1.0 + 0.5 + 1.0) / 3.0, "map@2");
}
