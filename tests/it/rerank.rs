//! simile-rerank end to end: the real binary on small generated data, checked against naive
//! references written here (k-reciprocal's full-matrix form of the paper's algorithm, query
//! expansion by brute force), the neighbours schema, simile-score, and bad inputs.
use crate::common;

use crate::common::{check_against_schema, listing, run, Rng};
use simile::dataset::Split;
use simile::knn::exact;
use simile::knn::Metric;
use simile::neighbors::Neighbors;
use simile::npy::{self, DType};
use std::path::{Path, PathBuf};

const RERANK: &str = env!("CARGO_BIN_EXE_simile-rerank");
const DISTANCE: &str = env!("CARGO_BIN_EXE_simile-distance");
const SCORE: &str = env!("CARGO_BIN_EXE_simile-score");

// ---------------------------------------------------------------- fixtures

#[derive(Clone)]
struct Row {
    id: i64,
    label: i64,
    split: Split,
    query: bool,
    gallery: bool,
    seq: Option<String>,
}

struct Fx {
    dir: tempfile::TempDir,
    rows: Vec<Row>,
    emb: Vec<Vec<f32>>,
}

impl Fx {
    fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn dataset(&self) -> PathBuf {
        self.p("dataset.parquet")
    }
    fn embeddings(&self) -> PathBuf {
        self.p("emb.npy")
    }
    /// Validation rows: (id, sequence, embedding) of the queries and of the gallery.
    fn side(&self, query: bool) -> Vec<usize> {
        (0..self.rows.len())
            .filter(|&i| {
                let r = &self.rows[i];
                r.split == Split::Validation && if query { r.query } else { r.gallery }
            })
            .collect()
    }
    /// Runs simile-distance; returns the neighbours path.
    fn neighbors(&self, name: &str, k: usize, metric: &str) -> PathBuf {
        let out = self.p(name);
        let r = run(
            DISTANCE,
            &[
                "--dataset",
                s(&self.dataset()),
                "--embeddings",
                s(&self.embeddings()),
                "--out",
                s(&out),
                "--top-k",
                &k.to_string(),
                "--metric",
                metric,
            ],
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
        out
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn write_dataset(path: &Path, rows: &[Row]) {
    let flag = |r: &Row, v: bool| (r.split == Split::Validation).then_some(v);
    common::DatasetBuilder::new(rows.iter().map(|r| r.id))
        .label(|i| Some(rows[i].label))
        .text(|i| Some(format!("item {}", rows[i].id)))
        .split(|i| rows[i].split)
        .flags(|i| {
            (
                flag(&rows[i], rows[i].query),
                flag(&rows[i], rows[i].gallery),
            )
        })
        .sequence(|i| rows[i].seq.clone())
        .kind("text", "csv")
        .write(path);
}

/// `n` rows in `labels` clusters (centre + noise, so re-ranking has structure to use), some
/// train rows, overlapping query and gallery flags, a few sequences of two.
fn fixture(n: usize, d: usize, labels: u64, seed: u64) -> Fx {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(seed);
    let centres: Vec<Vec<f32>> = (0..labels)
        .map(|_| (0..d).map(|_| rng.f()).collect())
        .collect();
    let mut rows = Vec::new();
    let mut emb = Vec::new();
    for i in 0..n {
        let label = rng.below(labels) as i64;
        let query = rng.below(3) != 0;
        rows.push(Row {
            id: 3 * i as i64 + 2,
            label,
            split: if i % 11 == 5 {
                Split::Train
            } else {
                Split::Validation
            },
            query,
            gallery: !query || rng.below(3) != 0,
            seq: (i % 9 < 2).then(|| format!("s{}", i / 9)),
        });
        emb.push(
            centres[label as usize]
                .iter()
                .map(|&c| c + 0.9 * rng.f())
                .collect::<Vec<f32>>(),
        );
    }
    let fx = Fx { dir, rows, emb };
    write_dataset(&fx.dataset(), &fx.rows);
    let flat: Vec<f32> = fx.emb.iter().flatten().copied().collect();
    npy::write_f32_matrix(fx.embeddings(), &flat, d, DType::F32).unwrap();
    fx
}

fn rerank(args: &[&str]) -> common::Run {
    run(RERANK, args)
}

/// The output's lists: query id -> [(gallery id, distance)].
fn read_lists(p: &Path) -> Vec<(i64, Vec<(i64, f32)>)> {
    let nb = Neighbors::read(p).unwrap();
    nb.groups()
        .into_iter()
        .map(|(q, a, b)| {
            for (i, r) in (a..b).enumerate() {
                assert_eq!(nb.rank[r], i as i32 + 1, "ranks renumbered from 1");
            }
            (
                q,
                (a..b).map(|i| (nb.gallery_id[i], nb.distance[i])).collect(),
            )
        })
        .collect()
}

fn excluded(fx: &Fx, a: usize, b: usize) -> bool {
    let (ra, rb) = (&fx.rows[a], &fx.rows[b]);
    ra.id == rb.id || (ra.seq.is_some() && ra.seq == rb.seq)
}

fn assert_lists_eq(got: &[(i64, Vec<(i64, f32)>)], want: &[(i64, Vec<(i64, f32)>)], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: number of queries");
    for ((gq, gl), (wq, wl)) in got.iter().zip(want) {
        assert_eq!(gq, wq, "{what}");
        let gi: Vec<i64> = gl.iter().map(|x| x.0).collect();
        let wi: Vec<i64> = wl.iter().map(|x| x.0).collect();
        assert_eq!(gi, wi, "{what}: query {gq}");
        for (a, b) in gl.iter().zip(wl) {
            assert!(
                (a.1 - b.1).abs() <= 1e-5 * (1.0 + b.1.abs()),
                "{what}: query {gq}: distance {} vs {}",
                a.1,
                b.1
            );
        }
    }
}

// ---------------------------------------------------------------- k-reciprocal, naively

/// `numpy.around(x / 2)` for the paper's `k1 / 2`.
fn np_half(k1: usize) -> usize {
    let x = k1 as f64 / 2.0;
    let r = x.round();
    if (x - x.trunc() - 0.5).abs() < 1e-12 && r as usize % 2 == 1 {
        r as usize - 1
    } else {
        r as usize
    }
}

/// The paper's `re_ranking` (Zhong et al.'s published code) transcribed with full matrices
/// over the nodes (query and gallery rows of the split), with the documented differences:
/// cosine distances used as they are, pairs that may not retrieve each other at +inf.
/// Returns, for every pair of nodes, the final distance and the Jaccard overlap `sum min`.
fn naive_k_reciprocal(
    fx: &Fx,
    nodes: &[usize],
    k1: usize,
    k2: usize,
    lambda: f64,
) -> Vec<Vec<(f64, f64)>> {
    let n = nodes.len();
    let mut dist = vec![vec![0f64; n]; n];
    for a in 0..n {
        for b in 0..n {
            dist[a][b] = if a == b {
                0.0
            } else if excluded(fx, nodes[a], nodes[b]) {
                f64::INFINITY
            } else {
                exact::distance(Metric::Cosine, &fx.emb[nodes[a]], &fx.emb[nodes[b]]) as f64
            };
        }
    }
    // initial_rank = argsort(original_dist): itself first, then by (distance, node).
    let rank: Vec<Vec<usize>> = (0..n)
        .map(|a| {
            let mut o: Vec<usize> = (0..n).filter(|&b| b != a).collect();
            o.sort_by(|&x, &y| {
                (dist[a][x] as f32)
                    .total_cmp(&(dist[a][y] as f32))
                    .then(x.cmp(&y))
            });
            std::iter::once(a).chain(o).collect()
        })
        .collect();
    let kr = |i: usize, k: usize| -> Vec<usize> {
        let forward = &rank[i][..k + 1];
        forward
            .iter()
            .copied()
            .filter(|&f| rank[f][..k + 1].contains(&i))
            .collect()
    };
    let mut v = vec![vec![0f64; n]; n];
    for i in 0..n {
        let k_rec = kr(i, k1);
        let mut expansion = k_rec.clone();
        for &c in &k_rec {
            let c_rec = kr(c, np_half(k1));
            let inter = c_rec.iter().filter(|x| k_rec.contains(x)).count();
            if inter as f64 > 2.0 / 3.0 * c_rec.len() as f64 {
                expansion.extend(c_rec);
            }
        }
        expansion.sort();
        expansion.dedup();
        let w: Vec<f64> = expansion.iter().map(|&x| (-dist[i][x]).exp()).collect();
        let sum: f64 = w.iter().sum();
        for (&x, &wx) in expansion.iter().zip(&w) {
            v[i][x] = wx / sum;
        }
    }
    if k2 != 1 {
        let mut vqe = vec![vec![0f64; n]; n];
        for i in 0..n {
            for &b in &rank[i][..k2] {
                for x in 0..n {
                    vqe[i][x] += v[b][x] / k2 as f64;
                }
            }
        }
        v = vqe;
    }
    (0..n)
        .map(|i| {
            (0..n)
                .map(|j| {
                    let m: f64 = (0..n).map(|x| v[i][x].min(v[j][x])).sum();
                    let jac = 1.0 - m / (2.0 - m);
                    ((1.0 - lambda) * jac + lambda * dist[i][j], m)
                })
                .collect()
        })
        .collect()
}

/// The paper's final ranking, restricted as documented: every gallery row with Jaccard
/// distance < 1 plus the input list, sorted by (final distance, id), top k.
fn naive_k_reciprocal_lists(
    fx: &Fx,
    input: &Path,
    k1: usize,
    k2: usize,
    lambda: f64,
    top_k: usize,
) -> Vec<(i64, Vec<(i64, f32)>)> {
    let (queries, gallery) = (fx.side(true), fx.side(false));
    let mut nodes: Vec<usize> = queries.iter().chain(&gallery).copied().collect();
    nodes.sort();
    nodes.dedup();
    let fin = naive_k_reciprocal(fx, &nodes, k1, k2, lambda);
    let input: std::collections::HashMap<i64, Vec<i64>> = read_lists(input)
        .into_iter()
        .map(|(q, l)| (q, l.into_iter().map(|x| x.0).collect()))
        .collect();
    let node = |r: usize| nodes.binary_search(&r).unwrap();
    let mut out = Vec::new();
    for &q in &queries {
        let qi = node(q);
        let qid = fx.rows[q].id;
        let short = input.get(&qid).cloned().unwrap_or_default();
        let mut l: Vec<(i64, f32)> = gallery
            .iter()
            .filter(|&&g| !excluded(fx, q, g))
            .filter(|&&g| fin[qi][node(g)].1 > 0.0 || short.contains(&fx.rows[g].id))
            .map(|&g| (fx.rows[g].id, fin[qi][node(g)].0 as f32))
            .collect();
        l.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
        l.truncate(top_k);
        if !l.is_empty() {
            out.push((qid, l));
        }
    }
    out
}

#[test]
fn k_reciprocal_equals_the_full_matrix_algorithm() {
    let fx = fixture(66, 6, 5, 11);
    let short = fx.neighbors("nn10.parquet", 10, "l2");
    let all = fx.neighbors("nn_all.parquet", 100, "cosine");
    for (input, k1, k2, lambda, top_k) in [
        (&short, 5usize, 3usize, 0.3f64, None),
        (&all, 7, 1, 0.5, Some(12usize)),
        (&short, 4, 5, 0.0, Some(15)),
        (&all, 20, 6, 0.3, None),
    ] {
        let out = fx.p("kr.parquet");
        let mut args = vec![
            "--dataset".to_string(),
            s(&fx.dataset()).into(),
            "--neighbors".into(),
            s(input).into(),
            "--embeddings".into(),
            s(&fx.embeddings()).into(),
            "--out".into(),
            s(&out).into(),
            "--method".into(),
            "k-reciprocal".into(),
            "--k1".into(),
            k1.to_string(),
            "--k2".into(),
            k2.to_string(),
            "--lambda".into(),
            lambda.to_string(),
        ];
        if let Some(k) = top_k {
            args.extend(["--top-k".to_string(), k.to_string()]);
        }
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = rerank(&argv);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let in_k = Neighbors::read(input).unwrap().meta.k;
        let want = naive_k_reciprocal_lists(&fx, input, k1, k2, lambda, top_k.unwrap_or(in_k));
        assert_lists_eq(
            &read_lists(&out),
            &want,
            &format!("k1={k1} k2={k2} lambda={lambda}"),
        );
    }
}

// ---------------------------------------------------------------- query expansion, naively

fn normalised(v: &[f32]) -> Vec<f32> {
    let n: f64 = v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    v.iter().map(|&x| (x as f64 / n) as f32).collect()
}

/// AQE / alpha-QE by brute force: expanded queries against the normalised gallery.
fn naive_qe(
    fx: &Fx,
    input: &Path,
    qe_k: usize,
    alpha: f64,
    top_k: usize,
) -> Vec<(i64, Vec<(i64, f32)>)> {
    let lists = read_lists(input);
    let by_id = |id: i64| fx.rows.iter().position(|r| r.id == id).unwrap();
    let gallery = fx.side(false);
    let mut out = Vec::new();
    for q in fx.side(true) {
        let qid = fx.rows[q].id;
        let qv = normalised(&fx.emb[q]);
        let mut acc: Vec<f64> = qv.iter().map(|&x| x as f64).collect();
        if let Some((_, l)) = lists.iter().find(|x| x.0 == qid) {
            for &(g, _) in l.iter().take(qe_k) {
                let gv = normalised(&fx.emb[by_id(g)]);
                let cos: f64 = qv
                    .iter()
                    .zip(&gv)
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum::<f64>()
                    / (qv.iter().map(|&a| a as f64 * a as f64).sum::<f64>().sqrt()
                        * gv.iter().map(|&a| a as f64 * a as f64).sum::<f64>().sqrt());
                let w = if alpha == 0.0 {
                    1.0
                } else {
                    cos.max(0.0).powf(alpha)
                };
                for (a, &x) in acc.iter_mut().zip(&gv) {
                    *a += w * x as f64;
                }
            }
        }
        let n = acc.iter().map(|a| a * a).sum::<f64>().sqrt();
        let q2: Vec<f32> = acc.iter().map(|a| (a / n) as f32).collect();
        let mut l: Vec<(i64, f32)> = gallery
            .iter()
            .filter(|&&g| !excluded(fx, q, g))
            .map(|&g| {
                (
                    fx.rows[g].id,
                    exact::distance(Metric::L2, &q2, &normalised(&fx.emb[g])),
                )
            })
            .collect();
        l.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
        l.truncate(top_k);
        if !l.is_empty() {
            out.push((qid, l));
        }
    }
    out
}

fn base_args<'a>(fx_paths: &'a [String; 3], out: &'a str, method: &'a str) -> Vec<&'a str> {
    vec![
        "--dataset",
        &fx_paths[0],
        "--neighbors",
        &fx_paths[1],
        "--out",
        out,
        "--method",
        method,
    ]
}

#[test]
fn query_expansion_equals_brute_force() {
    let fx = fixture(60, 8, 6, 3);
    let nb = fx.neighbors("nn.parquet", 8, "l2");
    let paths = [
        s(&fx.dataset()).to_string(),
        s(&nb).to_string(),
        s(&fx.embeddings()).to_string(),
    ];
    for (method, qe_k, alpha, want_alpha) in [
        ("aqe", None, None, 0.0),
        ("alpha-qe", Some("4"), Some("3"), 3.0),
        ("alpha-qe", None, None, 3.0),
    ] {
        let out = fx.p("qe.parquet");
        let mut a = base_args(&paths, s(&out), method);
        a.extend(["--embeddings", &paths[2]]);
        if let Some(k) = qe_k {
            a.extend(["--qe-k", k]);
        }
        if let Some(al) = alpha {
            a.extend(["--alpha", al]);
        }
        let r = rerank(&a);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let k: usize = qe_k.map(|k| k.parse().unwrap()).unwrap_or(2);
        let want = naive_qe(&fx, &nb, k, want_alpha, 8);
        assert_lists_eq(&read_lists(&out), &want, method);
    }
}

// ---------------------------------------------------------------- every method, end to end

#[test]
fn every_method_writes_a_scorable_neighbours_file() {
    let fx = fixture(60, 8, 6, 5);
    let nb = fx.neighbors("nn.parquet", 10, "l2");
    let paths = [
        s(&fx.dataset()).to_string(),
        s(&nb).to_string(),
        s(&fx.embeddings()).to_string(),
    ];
    let emb = ["--embeddings", paths[2].as_str()];
    let cases: Vec<(&str, Vec<&str>)> = vec![
        ("aqe", emb.to_vec()),
        ("alpha-qe", emb.to_vec()),
        ("dba", emb.to_vec()),
        ("dba", [&emb[..], &["--dba-qe", "--top-k", "5"]].concat()),
        (
            "k-reciprocal",
            [&emb[..], &["--k1", "6", "--k2", "2"]].concat(),
        ),
        ("threshold", vec!["--threshold", "1.5"]),
        ("threshold", vec!["--n-std", "2"]),
    ];
    let input = read_lists(&nb);
    for (i, (method, extra)) in cases.iter().enumerate() {
        let out = fx.p(&format!("out{i}.parquet"));
        let mut a = base_args(&paths, s(&out), method);
        a.extend(extra.iter().copied());
        let r = rerank(&a);
        assert_eq!(r.code, 0, "{method} {extra:?}: {}", r.stderr);
        check_against_schema(&out, "neighbors");
        let nbo = Neighbors::read(&out).unwrap();
        let kv = &nbo.meta.extra;
        let method_key = if *method == "threshold" {
            "threshold"
        } else {
            method
        };
        assert_eq!(
            kv.get("simile.rerank.method").map(String::as_str),
            Some(method_key)
        );
        assert!(kv.contains_key("simile.rerank.params"));
        assert!(kv.contains_key("simile.rerank.neighbors_fingerprint"));
        assert_eq!(
            nbo.meta.dataset_fingerprint,
            Neighbors::read(&nb).unwrap().meta.dataset_fingerprint
        );
        let m: serde_json::Value = serde_json::from_slice(
            &std::fs::read(fx.p(&format!("out{i}.parquet.manifest.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(m["stage"], "rerank");
        assert!(m["inputs"]["neighbors"].is_object() && m["inputs"]["dataset"].is_object());
        assert_eq!(
            m["inputs"]["embeddings"].is_object(),
            extra.contains(&"--embeddings")
        );
        // Lists are sorted, exclusions hold, k is respected.
        for (q, l) in read_lists(&out) {
            assert!(l.len() <= nbo.meta.k);
            assert!(
                l.windows(2).all(|w| (w[0].1, w[0].0) <= (w[1].1, w[1].0)),
                "{method}: sorted"
            );
            let qr = fx.rows.iter().position(|r| r.id == q).unwrap();
            for (g, _) in &l {
                let gr = fx.rows.iter().position(|r| r.id == *g).unwrap();
                assert!(
                    !excluded(&fx, qr, gr),
                    "{method}: query {q} lists excluded {g}"
                );
            }
        }
        if *method == "threshold" {
            // Thresholding only cuts tails.
            for (q, l) in read_lists(&out) {
                let (_, orig) = input.iter().find(|x| x.0 == q).unwrap();
                assert_eq!(&orig[..l.len()], &l[..]);
                if extra[0] == "--threshold" {
                    assert!(l.iter().all(|x| x.1 < 1.5));
                    assert!(orig[l.len()..].iter().all(|x| x.1 >= 1.5));
                }
            }
        }
        // simile-score reads it unchanged.
        let metrics = fx.p(&format!("metrics{i}.json"));
        let r = run(
            SCORE,
            &[
                "--dataset",
                &paths[0],
                "--neighbors",
                s(&out),
                "--out",
                s(&metrics),
            ],
        );
        assert_eq!(r.code, 0, "score of {method}: {}", r.stderr);
    }
}

// ---------------------------------------------------------------- bad input

#[test]
fn bad_inputs_exit_2_and_write_nothing() {
    let fx = fixture(40, 4, 4, 9);
    let nb = fx.neighbors("nn.parquet", 5, "l2");
    let dot = fx.neighbors("dot.parquet", 5, "dot");
    // Another dataset (one label changed) and embeddings made from another dataset.
    let other = tempfile::tempdir().unwrap();
    let mut rows2 = fx.rows.clone();
    rows2[0].label += 1;
    let other_ds = other.path().join("dataset.parquet");
    write_dataset(&other_ds, &rows2);
    let other_emb = other.path().join("emb.npy");
    let flat: Vec<f32> = fx.emb.iter().flatten().map(|x| x * 2.0).collect();
    npy::write_f32_matrix(&other_emb, &flat, 4, DType::F32).unwrap();
    // A model folder of kind extractor.
    let model = fx.p("model");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(
        model.join("model.json"),
        br#"{"simile_model": 1, "kind": "extractor"}"#,
    )
    .unwrap();
    let pw_model = fx.p("pw_model");
    std::fs::create_dir_all(&pw_model).unwrap();
    std::fs::write(
        pw_model.join("model.json"),
        br#"{"simile_model": 1, "kind": "pairwise"}"#,
    )
    .unwrap();

    let (ds, nbs, emb) = (
        s(&fx.dataset()).to_string(),
        s(&nb).to_string(),
        s(&fx.embeddings()).to_string(),
    );
    let out = fx.p("out.parquet");
    let o = s(&out).to_string();
    let base = |m: &str| -> Vec<String> {
        [
            "--dataset",
            &ds,
            "--neighbors",
            &nbs,
            "--out",
            &o,
            "--method",
            m,
        ]
        .iter()
        .map(|x| x.to_string())
        .collect()
    };
    let with = |m: &str, extra: &[&str]| -> Vec<String> {
        let mut v = base(m);
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (base("aqe"), "needs the embeddings"),
        (base("k-reciprocal"), "needs the embeddings"),
        (base("dba"), "needs the embeddings"),
        (
            with("aqe", &["--embeddings", &emb, "--qe-k", "6"]),
            "larger than the k",
        ),
        (
            with("aqe", &["--embeddings", &emb, "--qe-k", "0"]),
            "--qe-k",
        ),
        (
            with("alpha-qe", &["--embeddings", &emb, "--alpha=-1"]),
            "--alpha",
        ),
        (
            with("k-reciprocal", &["--embeddings", &emb, "--k1", "0"]),
            "--k1",
        ),
        (
            with("k-reciprocal", &["--embeddings", &emb, "--lambda", "2"]),
            "--lambda",
        ),
        (
            with(
                "k-reciprocal",
                &["--embeddings", &emb, "--k1", "3", "--k2", "9"],
            ),
            "--k2",
        ),
        (
            with("k-reciprocal", &["--embeddings", &emb, "--threshold", "1"]),
            "does not apply",
        ),
        (with("threshold", &[]), "--threshold TH"),
        (with("threshold", &["--n-std=-1"]), "--n-std"),
        (with("nonsense", &[]), "invalid value"),
        (
            with("pairwise", &["--model", s(&model), "--top-n", "3"]),
            "kind 'extractor'",
        ),
        (
            with("pairwise", &["--model", s(&pw_model), "--top-n", "6"]),
            "larger than the k",
        ),
        (with("pairwise", &["--model", s(&pw_model)]), "--top-n"),
        (with("pairwise", &["--top-n", "3"]), "--model"),
        (
            with("aqe", &["--embeddings", s(&other_emb)]),
            "different embeddings",
        ),
        (
            with("aqe", &["--embeddings", &emb, "--top-k", "0"]),
            "--top-k",
        ),
    ];
    let mut cases = cases;
    // Pairwise on dot neighbours.
    let mut v = with("pairwise", &["--model", s(&pw_model), "--top-n", "3"]);
    v[3] = s(&dot).to_string();
    cases.push((v, "dot"));
    // Neighbours from another dataset.
    let mut v = with("threshold", &["--threshold", "1"]);
    v[1] = s(&other_ds).to_string();
    cases.push((v, "different dataset"));
    let before = listing(fx.dir.path());
    for (args, msg) in &cases {
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = rerank(&argv);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert!(
            r.stderr.contains(msg),
            "{args:?}: expected '{msg}' in: {}",
            r.stderr
        );
        assert_eq!(listing(fx.dir.path()), before, "{args:?} left files behind");
    }
}

#[test]
fn help_has_examples() {
    let r = rerank(&["--help"]);
    assert_eq!(r.code, 0);
    for m in [
        "k-reciprocal",
        "alpha-qe",
        "dba",
        "threshold",
        "pairwise",
        "Examples",
    ] {
        assert!(r.stdout.contains(m), "--help lacks {m}");
    }
}
