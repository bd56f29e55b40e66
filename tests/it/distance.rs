//! simile-distance end to end: the real binary on small datasets built here, against a
//! brute-force reference written independently of the library's kernels.
use crate::common;
use simile::dataset::{Dataset, Split};
use simile::neighbors::Neighbors;
use simile::npy::{self, DType};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::common::Rng;

const BIN: &str = env!("CARGO_BIN_EXE_simile-distance");

// ---------------------------------------------------------------- fixtures

#[derive(Clone)]
struct Row {
    id: i64,
    label: Option<i64>,
    split: Split,
    query: bool,
    gallery: bool,
    seq: Option<String>,
}

fn row(id: i64, split: Split, query: bool, gallery: bool, seq: Option<&str>) -> Row {
    Row {
        id,
        label: Some(id % 5),
        split,
        query,
        gallery,
        seq: seq.map(str::to_string),
    }
}

fn write_dataset(path: &Path, rows: &[Row]) {
    let flag = |r: &Row, v: bool| {
        if r.split == Split::Validation {
            Some(v)
        } else {
            None
        }
    };
    common::DatasetBuilder::new(rows.iter().map(|r| r.id))
        .label(|i| rows[i].label)
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

fn write_emb(path: &Path, values: &[f32], d: usize, dtype: DType) {
    npy::write_f32_matrix(path, values, d, dtype).unwrap();
}

/// A random validation set: `n` rows, some train rows mixed in, overlapping query and
/// gallery flags, sequences in small groups with some missing, and exact duplicate
/// embeddings (ties). Embedding rows are stored in a shuffled order with an ids file.
struct Fixture {
    dir: tempfile::TempDir,
    rows: Vec<Row>,
    /// Embedding of each row (by row index), as stored (after any f16 rounding).
    emb: Vec<Vec<f32>>,
}

impl Fixture {
    fn dataset(&self) -> PathBuf {
        self.dir.path().join("dataset.parquet")
    }
    fn embeddings(&self) -> PathBuf {
        self.dir.path().join("emb.npy")
    }
    fn out(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn random_fixture(n: usize, d: usize, seed: u64, dtype: DType) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(seed);
    let mut rows = Vec::new();
    for i in 0..n {
        let id = 3 * i as i64 + 1; // ids are not positions
        let split = if i % 7 == 3 {
            Split::Train
        } else {
            Split::Validation
        };
        let query = rng.below(3) != 0;
        let gallery = !query || rng.below(2) == 0;
        let seq = match rng.below(4) {
            0 => None,
            _ => Some(format!("s{}", rng.below(n as u64 / 3 + 1))),
        };
        rows.push(Row {
            id,
            label: Some(rng.below(6) as i64),
            split,
            query,
            gallery,
            seq,
        });
    }
    let mut emb: Vec<Vec<f32>> = (0..n).map(|_| (0..d).map(|_| rng.f()).collect()).collect();
    // Duplicates: every 10th row copies the row before it (ties at equal distance).
    for i in (10..n).step_by(10) {
        emb[i] = emb[i - 1].clone();
    }
    if dtype == DType::F16 {
        for v in emb.iter_mut().flatten() {
            *v = half::f16::from_f32(*v).to_f32();
        }
    }
    let f = Fixture { dir, rows, emb };
    write_dataset(&f.dataset(), &f.rows);
    // Stored shuffled, with an ids file saying which row is which.
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let flat: Vec<f32> = order.iter().flat_map(|&i| f.emb[i].clone()).collect();
    write_emb(&f.embeddings(), &flat, d, dtype);
    let ids: Vec<i64> = order.iter().map(|&i| f.rows[i].id).collect();
    npy::write_i64(npy::ids_path(&f.embeddings()), &ids).unwrap();
    f
}

// ---------------------------------------------------------------- the reference

fn dist64(metric: &str, q: &[f32], g: &[f32]) -> f64 {
    let dot: f64 = q.iter().zip(g).map(|(&a, &b)| a as f64 * b as f64).sum();
    match metric {
        "l2" => q
            .iter()
            .zip(g)
            .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
            .sum::<f64>()
            .sqrt(),
        "dot" => -dot,
        "cosine" => {
            let nq: f64 = q.iter().map(|&a| (a as f64).powi(2)).sum::<f64>().sqrt();
            let ng: f64 = g.iter().map(|&a| (a as f64).powi(2)).sum::<f64>().sqrt();
            if nq == 0.0 || ng == 0.0 {
                1.0
            } else {
                1.0 - dot / (nq * ng)
            }
        }
        _ => unreachable!(),
    }
}

type Lists = Vec<(i64, Vec<(i64, f32)>)>;

/// Brute force: every query against every gallery row, exclusions (same id, same non-null
/// sequence), sorted by (distance, gallery id), cut at k; queries with no neighbours omitted.
fn brute_force(
    queries: &[(i64, Option<String>, Vec<f32>)],
    gallery: &[(i64, Option<String>, Vec<f32>)],
    metric: &str,
    k: usize,
    self_exclusion: bool,
) -> Lists {
    let mut out = Vec::new();
    for (qid, qseq, q) in queries {
        let mut l: Vec<(i64, f32)> = gallery
            .iter()
            .filter(|(gid, gseq, _)| {
                let is_self = self_exclusion && gid == qid;
                let same_sequence = qseq.is_some() && qseq == gseq;
                !is_self && !same_sequence
            })
            .map(|(gid, _, g)| (*gid, dist64(metric, q, g) as f32 + 0.0))
            .collect();
        l.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
        l.truncate(k);
        if !l.is_empty() {
            out.push((*qid, l));
        }
    }
    out
}

fn reference(f: &Fixture, split: Split, metric: &str, k: usize) -> Lists {
    let side = |pick: fn(&Row) -> bool| -> Vec<(i64, Option<String>, Vec<f32>)> {
        f.rows
            .iter()
            .zip(&f.emb)
            .filter(|(r, _)| r.split == split && pick(r))
            .map(|(r, e)| (r.id, r.seq.clone(), e.clone()))
            .collect()
    };
    brute_force(&side(|r| r.query), &side(|r| r.gallery), metric, k, true)
}

fn lists(n: &Neighbors) -> Lists {
    n.groups()
        .into_iter()
        .map(|(q, a, b)| {
            for (i, r) in n.rank[a..b].iter().enumerate() {
                assert_eq!(*r as usize, i + 1, "ranks of query {q} must count from 1");
            }
            (
                q,
                (a..b)
                    .map(|i| (n.gallery_id[i], n.distance[i]))
                    .collect::<Vec<_>>(),
            )
        })
        .collect()
}

fn assert_lists_eq(got: &Lists, want: &Lists, what: &str) {
    assert_eq!(
        got.iter().map(|x| x.0).collect::<Vec<_>>(),
        want.iter().map(|x| x.0).collect::<Vec<_>>(),
        "{what}: query ids"
    );
    for ((q, g), (_, w)) in got.iter().zip(want) {
        let gi: Vec<i64> = g.iter().map(|x| x.0).collect();
        let wi: Vec<i64> = w.iter().map(|x| x.0).collect();
        assert_eq!(gi, wi, "{what}: neighbours of query {q}");
        for ((_, a), (_, b)) in g.iter().zip(w) {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1e-2),
                "{what}: query {q}: distance {a} vs {b}"
            );
        }
    }
}

// ---------------------------------------------------------------- running

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run simile-distance")
}

fn ok(args: &[&str]) -> String {
    let o = run(args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{args:?} failed: {err}");
    err
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn search(f: &Fixture, out: &Path, extra: &[&str]) -> Neighbors {
    let (ds, emb) = (f.dataset(), f.embeddings());
    let mut args = vec![
        "--dataset",
        p(&ds),
        "--embeddings",
        p(&emb),
        "--out",
        p(out),
        "--threads",
        "2",
    ];
    args.extend_from_slice(extra);
    let err = ok(&args);
    assert!(err.contains("queries x"), "no summary line: {err}");
    Neighbors::read(out).unwrap()
}

/// The stage in-process (the binary's code minus flag parsing: each process start loads
/// libtorch, which costs most of a second, so the matrix of cases runs in-process and the
/// binary is run for what only it does: flags, exit codes, the summary line, merge).
fn stage(
    f: &Fixture,
    out: &Path,
    metric: &str,
    backend: &str,
    compute: &str,
    k: usize,
) -> simile::Result<Neighbors> {
    stage_on(
        &f.dataset(),
        &f.embeddings(),
        out,
        metric,
        backend,
        compute,
        k,
        None,
    )
}

#[allow(clippy::too_many_arguments)]
fn stage_on(
    ds: &Path,
    emb: &Path,
    out: &Path,
    metric: &str,
    backend: &str,
    compute: &str,
    k: usize,
    shard: Option<(simile::knn::stage::ShardKind, &str)>,
) -> simile::Result<Neighbors> {
    use simile::knn::stage::{run, Inputs, Options};
    use simile::knn::{Backend, Engine};
    let backend: Backend = backend.parse().unwrap();
    let s = run(&Options {
        inputs: Inputs::One {
            dataset: ds.to_path_buf(),
            embeddings: emb.to_path_buf(),
            split: Split::Validation,
        },
        out: out.to_path_buf(),
        k,
        metric: metric.parse().unwrap(),
        compute: compute.parse().unwrap(),
        engine: Engine::resolve(backend, tch::Device::Cpu)?,
        shard: shard.map(|(kind, spec)| (kind, spec.parse().unwrap())),
        memory_budget: 1 << 20,
    })?;
    if shard.is_some() {
        return Ok(Neighbors {
            query_id: vec![],
            rank: vec![],
            gallery_id: vec![],
            distance: vec![],
            meta: Default::default(),
        });
    }
    assert_eq!(s.out, out);
    Neighbors::read(out)
}

// ---------------------------------------------------------------- tests

/// All three metrics, on both engines (simile's kernels and the libtorch path on the CPU),
/// with self and sequence exclusion, duplicate embeddings (ties) and shuffled ids.
#[test]
fn matches_brute_force_all_metrics_and_engines() {
    let f = random_fixture(260, 19, 11, DType::F32);
    let k = 7;
    for metric in ["l2", "cosine", "dot"] {
        let want = reference(&f, Split::Validation, metric, k);
        assert!(want.len() > 100);
        for backend in ["native", "torch"] {
            let out = f.out(&format!("{metric}-{backend}.parquet"));
            let n = stage(&f, &out, metric, backend, "fp32", k).unwrap();
            assert_eq!(n.meta.metric, metric);
            assert_eq!(n.meta.k, k);
            assert!(n.meta.complete);
            assert_eq!(n.meta.exclusions, "self,sequence");
            assert_lists_eq(&lists(&n), &want, &format!("{metric}/{backend}"));
        }
    }
    // Ties: a duplicated embedding is found at distance 0 and ordered by id.
    let n = Neighbors::read(&f.out("l2-native.parquet")).unwrap();
    let ties = n
        .groups()
        .iter()
        .filter(|(_, a, b)| b - a >= 2 && n.distance[*a] == n.distance[a + 1])
        .count();
    assert!(ties > 0, "the fixture should produce ties");
}

/// bf16 candidates with exact re-scoring: reported distances are exact; the neighbours are
/// the exact ones on this data (recall 1.0), on both engines.
#[test]
fn bf16_compute_rescores_exactly() {
    let f = random_fixture(200, 24, 5, DType::F32);
    let want = reference(&f, Split::Validation, "l2", 5);
    for backend in ["native", "torch"] {
        let out = f.out(&format!("bf16-{backend}.parquet"));
        let n = stage(&f, &out, "l2", backend, "bf16", 5).unwrap();
        assert_eq!(
            n.meta.extra.get("simile.compute").map(String::as_str),
            Some("bf16")
        );
        assert_lists_eq(&lists(&n), &want, &format!("bf16/{backend}"));
    }
}

#[test]
fn k_larger_than_gallery_and_float16() {
    let f = random_fixture(40, 8, 3, DType::F16);
    let want = reference(&f, Split::Validation, "l2", 1000);
    let n = search(&f, &f.out("all.parquet"), &["-k", "1000"]);
    let got = lists(&n);
    assert_lists_eq(&got, &want, "k > gallery, f16");
    // Every eligible gallery row, and no more.
    let gallery = f
        .rows
        .iter()
        .filter(|r| r.split == Split::Validation && r.gallery)
        .count();
    assert!(got.iter().all(|(_, l)| l.len() <= gallery));
    assert!(got.iter().any(|(_, l)| l.len() == gallery));
    assert_eq!(n.meta.n_gallery, gallery);
}

/// OML's exact kNN case (oml.md section 10, T3): one-hot embeddings, sequences
/// [0,1,2,3,3,4], queries [0,3], gallery all, top 10.
#[test]
fn oml_t3_exact_case() {
    let dir = tempfile::tempdir().unwrap();
    let seqs = ["0", "1", "2", "3", "3", "4"];
    let rows: Vec<Row> = (0..6)
        .map(|i| {
            row(
                i,
                Split::Validation,
                i == 0 || i == 3,
                true,
                Some(seqs[i as usize]),
            )
        })
        .collect();
    let ds = dir.path().join("d.parquet");
    write_dataset(&ds, &rows);
    let emb: Vec<f32> = (0..6)
        .flat_map(|i| if i < 3 { [1.0, 0.0] } else { [0.0, 1.0] })
        .collect();
    let e = dir.path().join("e.npy");
    write_emb(&e, &emb, 2, DType::F32);
    let out = dir.path().join("nn.parquet");
    ok(&[
        "--dataset",
        p(&ds),
        "--embeddings",
        p(&e),
        "--out",
        p(&out),
        "-k",
        "10",
    ]);
    let n = lists(&Neighbors::read(&out).unwrap());
    let r2 = 2f32.sqrt();
    assert_eq!(n.len(), 2);
    assert_eq!(n[0].0, 0);
    assert_eq!(n[0].1, vec![(1, 0.0), (2, 0.0), (3, r2), (4, r2), (5, r2)]);
    assert_eq!(n[1].0, 3);
    assert_eq!(n[1].1, vec![(5, 0.0), (0, r2), (1, r2), (2, r2)]);
}

/// Large-norm near-duplicates: ||q||^2 + ||g||^2 - 2 q.g in f32 cancels to noise here, so a
/// search that trusted it would misorder neighbours and report wrong distances.
#[test]
fn large_norm_near_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let d = 64;
    let n = 120;
    let mut rng = Rng(99);
    let base: Vec<f32> = (0..d).map(|_| 3000.0 + 1000.0 * rng.f()).collect();
    let emb: Vec<Vec<f32>> = (0..n)
        .map(|i| {
            let scale = 10f32.powi(-(i % 4)) * 0.05;
            base.iter().map(|&b| b + scale * rng.f()).collect()
        })
        .collect();
    let rows: Vec<Row> = (0..n as i64)
        .map(|i| row(i, Split::Validation, i % 3 == 0, true, None))
        .collect();
    let ds = dir.path().join("d.parquet");
    write_dataset(&ds, &rows);
    let e = dir.path().join("e.npy");
    write_emb(&e, &emb.concat(), d, DType::F32);
    let side = |pick: fn(&Row) -> bool| -> Vec<(i64, Option<String>, Vec<f32>)> {
        rows.iter()
            .zip(&emb)
            .filter(|(r, _)| pick(r))
            .map(|(r, e)| (r.id, None, e.clone()))
            .collect()
    };
    let want = brute_force(&side(|r| r.query), &side(|r| r.gallery), "l2", 5, true);
    // The naive f32 expansion gets this wrong (otherwise the case proves nothing).
    let naive_wrong = want.iter().any(|(q, l)| {
        let qv = &emb[*q as usize];
        let nq: f32 = qv.iter().map(|x| x * x).sum();
        let mut s: Vec<(i64, f32)> = (0..n as i64)
            .filter(|g| g != q)
            .map(|g| {
                let gv = &emb[g as usize];
                let ng: f32 = gv.iter().map(|x| x * x).sum();
                let dot: f32 = qv.iter().zip(gv).map(|(a, b)| a * b).sum();
                (g, (nq + ng - 2.0 * dot).max(0.0).sqrt())
            })
            .collect();
        s.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
        s.iter().take(5).map(|x| x.0).collect::<Vec<_>>()
            != l.iter().map(|x| x.0).collect::<Vec<_>>()
    });
    assert!(naive_wrong, "the fixture should defeat the naive expansion");
    for backend in ["native", "torch"] {
        let out = dir.path().join(format!("nn-{backend}.parquet"));
        let n = stage_on(&ds, &e, &out, "l2", backend, "fp32", 5, None).unwrap();
        assert_lists_eq(&lists(&n), &want, backend);
    }
}

/// Two-sided: each side's own ids (they overlap here, yet nothing is self-excluded), the
/// sequence exclusion across the two, both datasets named in the metadata.
#[test]
fn two_sided_form() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(21);
    let d = 6;
    let qrows: Vec<Row> = (0..30)
        .map(|i| {
            row(
                i,
                Split::Inference,
                true,
                true,
                if i % 4 == 0 { Some("shared") } else { None },
            )
        })
        .collect();
    let grows: Vec<Row> = (0..50)
        .map(|i| {
            row(
                i,
                Split::Validation,
                i % 2 == 0,
                true,
                if i % 5 == 0 { Some("shared") } else { None },
            )
        })
        .collect();
    let qe: Vec<Vec<f32>> = (0..30).map(|_| (0..d).map(|_| rng.f()).collect()).collect();
    let ge: Vec<Vec<f32>> = (0..50).map(|_| (0..d).map(|_| rng.f()).collect()).collect();
    let (qd, gd) = (dir.path().join("q.parquet"), dir.path().join("g.parquet"));
    let (qn, gn) = (dir.path().join("q.npy"), dir.path().join("g.npy"));
    write_dataset(&qd, &qrows);
    write_dataset(&gd, &grows);
    write_emb(&qn, &qe.concat(), d, DType::F32);
    write_emb(&gn, &ge.concat(), d, DType::F32);
    let out = dir.path().join("nn.parquet");
    ok(&[
        "--query-dataset",
        p(&qd),
        "--query-embeddings",
        p(&qn),
        "--gallery-dataset",
        p(&gd),
        "--gallery-embeddings",
        p(&gn),
        "--out",
        p(&out),
        "-k",
        "4",
        "--metric",
        "cosine",
    ]);
    let n = Neighbors::read(&out).unwrap();
    let side = |rows: &[Row], e: &[Vec<f32>]| -> Vec<(i64, Option<String>, Vec<f32>)> {
        rows.iter()
            .zip(e)
            .map(|(r, e)| (r.id, r.seq.clone(), e.clone()))
            .collect()
    };
    let want = brute_force(&side(&qrows, &qe), &side(&grows, &ge), "cosine", 4, false);
    assert_lists_eq(&lists(&n), &want, "two-sided");
    assert_eq!(n.meta.split, None);
    assert_eq!(n.meta.exclusions, "sequence");
    assert_eq!(n.meta.gallery_dataset.as_deref(), Some(p(&gd)));
    assert!(n.meta.gallery_dataset_fingerprint.is_some());
    assert_eq!((n.meta.n_queries, n.meta.n_gallery), (30, 50));
    // Every gallery row, in-process: the same id on both sides is not "self" (query 1 finds
    // gallery id 1), but a shared sequence still excludes (query 0 and gallery 0, 5, 10, ...
    // are all "shared").
    let all = dir.path().join("all.parquet");
    simile::knn::stage::run(&simile::knn::stage::Options {
        inputs: simile::knn::stage::Inputs::Two {
            query_dataset: qd.clone(),
            query_embeddings: qn.clone(),
            query_split: None,
            gallery_dataset: gd.clone(),
            gallery_embeddings: gn.clone(),
            gallery_split: Some(Split::Validation),
        },
        out: all.clone(),
        k: 50,
        metric: simile::knn::Metric::L2,
        compute: simile::knn::Compute::Fp32,
        engine: simile::knn::Engine::Native,
        shard: None,
        memory_budget: 1 << 20,
    })
    .unwrap();
    let l = lists(&Neighbors::read(&all).unwrap());
    let ids = |q: usize| l[q].1.iter().map(|x| x.0).collect::<Vec<_>>();
    assert_eq!(ids(1).len(), 50);
    assert!(ids(1).contains(&1));
    assert_eq!(ids(0).len(), 40);
    assert!(ids(0).iter().all(|g| g % 5 != 0));
}

/// Query shards concatenate and gallery shards merge per query into exactly the unsharded
/// result: same rows, same bits, same metadata.
#[test]
fn sharded_then_merged_equals_unsharded() {
    use simile::knn::stage::ShardKind;
    let f = random_fixture(150, 10, 8, DType::F32);
    let full = f.out("nn.parquet");
    let whole = stage(&f, &full, "l2", "native", "fp32", 6).unwrap();
    for (kind, name) in [(ShardKind::Query, "query"), (ShardKind::Gallery, "gallery")] {
        let out = f.out(&format!("{name}.parquet"));
        for (i, backend) in ["native", "torch", "native"].iter().enumerate() {
            let spec = format!("{i}/3");
            stage_on(
                &f.dataset(),
                &f.embeddings(),
                &out,
                "l2",
                backend,
                "fp32",
                6,
                Some((kind, &spec)),
            )
            .unwrap();
        }
        let part = f.out(&format!("{name}.part-1-of-3.parquet"));
        assert!(part.exists() && !out.exists());
        // A part is not a result: readers refuse it.
        assert!(Neighbors::read(&part).is_err());
        let err = ok(&["merge", "--out", p(&out)]);
        assert!(err.contains("3 "), "{err}");
        let merged = Neighbors::read(&out).unwrap();
        assert_eq!(merged.query_id, whole.query_id, "{name}");
        assert_eq!(merged.rank, whole.rank, "{name}");
        assert_eq!(merged.gallery_id, whole.gallery_id, "{name}");
        assert_eq!(
            merged
                .distance
                .iter()
                .map(|x| x.to_bits())
                .collect::<Vec<_>>(),
            whole
                .distance
                .iter()
                .map(|x| x.to_bits())
                .collect::<Vec<_>>(),
            "{name}"
        );
        assert_eq!(merged.meta, whole.meta, "{name}");
        assert!(simile::manifest::verify(&out).unwrap().is_some());
    }
    // A missing part is reported by number, and nothing is written.
    std::fs::remove_file(f.out("gallery.part-2-of-3.parquet")).unwrap();
    let out2 = f.out("gallery2.parquet");
    let e = simile::knn::merge::merge(
        &out2,
        &[
            f.out("gallery.part-0-of-3.parquet"),
            f.out("gallery.part-1-of-3.parquet"),
        ],
    )
    .unwrap_err();
    assert_eq!(e.exit_code(), 2);
    assert!(e.to_string().contains("missing part"), "{e}");
    assert!(!out2.exists());
}

/// Gallery-shard parts merged per query range (one merge per range, as parallel merge tasks
/// run), then the ranges joined: the unsharded result, and its manifest's inputs.
#[test]
fn merged_per_query_range_equals_unsharded() {
    use simile::knn::stage::ShardKind;
    let f = random_fixture(150, 10, 9, DType::F32);
    let full = f.out("nn.parquet");
    let whole = stage(&f, &full, "l2", "native", "fp32", 6).unwrap();
    let out = f.out("g.parquet");
    for i in 0..4 {
        let spec = format!("{i}/4");
        stage_on(
            &f.dataset(),
            &f.embeddings(),
            &out,
            "l2",
            "native",
            "fp32",
            6,
            Some((ShardKind::Gallery, &spec)),
        )
        .unwrap();
    }
    for q in 0..3 {
        ok(&[
            "merge",
            "--out",
            p(&out),
            "--query-shard",
            &format!("{q}/3"),
        ]);
    }
    let range = f.out("g.qpart-1-of-3.parquet");
    assert!(Neighbors::read(&range).is_err(), "a query range is a part");
    let again = run(&["merge", "--out", p(&out), "--query-shard", "1/3"]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("is up to date"));
    ok(&["merge", "--out", p(&out), "--query-parts"]);
    let merged = Neighbors::read(&out).unwrap();
    assert_eq!(merged.query_id, whole.query_id);
    assert_eq!(merged.gallery_id, whole.gallery_id);
    assert_eq!(merged.rank, whole.rank);
    assert_eq!(merged.meta, whole.meta);
    let (m, w) = (
        simile::manifest::verify(&out).unwrap().unwrap(),
        simile::manifest::verify(&full).unwrap().unwrap(),
    );
    assert_eq!(m.params, w.params);
    assert_eq!(m.inputs, w.inputs);
    // Query-shard parts are not what --query-shard merges.
    let e = run(&[
        "merge",
        "--out",
        p(&full),
        "--query-shard",
        "0/2",
        p(&range),
    ]);
    assert_eq!(e.status.code(), Some(2));
}

/// simile: a missing sequence excludes nothing. OML: all rows without a sequence share one
/// (pandas' factorize maps NaN to -1), so they exclude each other. Both, through the library.
#[test]
fn missing_sequence_simile_vs_oml() {
    use simile::knn::rows::Rows;
    use simile::knn::search::{search, Job};
    use simile::knn::{Compute, Engine, Metric};
    use simile::retrieval::{QueryGallery, SequenceRule};
    let dir = tempfile::tempdir().unwrap();
    // Rows 0-3 have no sequence, rows 4-5 share "a".
    let seqs = [None, None, None, None, Some("a"), Some("a")];
    let rows: Vec<Row> = (0..6)
        .map(|i| row(i, Split::Validation, true, true, seqs[i as usize]))
        .collect();
    let dsp = dir.path().join("d.parquet");
    write_dataset(&dsp, &rows);
    let e = dir.path().join("e.npy");
    write_emb(
        &e,
        &(0..12).map(|i| i as f32).collect::<Vec<_>>(),
        2,
        DType::F32,
    );
    let ds = Dataset::read(&dsp).unwrap();
    let npy = simile::npy::Npy::open(&e).unwrap();
    let map: Vec<usize> = (0..6).collect();
    let run_rule = |rule| {
        let qg = QueryGallery::from_dataset(&ds, Split::Validation, rule).unwrap();
        let q = Rows::new(&npy, &map, &qg.queries.ids);
        let g = Rows::new(&npy, &map, &qg.gallery.ids);
        let mut got: Vec<Vec<i64>> = Vec::new();
        for engine in [Engine::Native, Engine::Torch(tch::Device::Cpu)] {
            let job = Job {
                queries: &q,
                gallery: &g,
                q_range: 0..6,
                g_range: 0..6,
                k: 10,
                metric: Metric::L2,
                compute: Compute::Fp32,
                engine,
                qg: &qg,
                memory_budget: 1 << 20,
            };
            let mut lists = vec![Vec::new(); 6];
            search(&job, |qp, l| {
                lists[qp] = l
                    .iter()
                    .map(|&(gp, _)| qg.gallery.ids[gp as usize])
                    .collect();
                Ok(())
            })
            .unwrap();
            if !got.is_empty() {
                assert_eq!(got, lists, "engines disagree");
            }
            got = lists;
        }
        got
    };
    let simile_rule = run_rule(SequenceRule::MissingExcludesNothing);
    let oml_rule = run_rule(SequenceRule::OmlMissingShared);
    // Query 0: simile sees the other unsequenced rows; OML excludes them.
    assert_eq!(simile_rule[0], vec![1, 2, 3, 4, 5]);
    assert_eq!(oml_rule[0], vec![4, 5]);
    // Query 4 ("a") excludes 5 under both rules.
    assert_eq!(simile_rule[4], vec![3, 2, 1, 0]);
    assert_eq!(oml_rule[4], simile_rule[4]);
}

/// The output matches the machine-readable schema in schemas/neighbors.schema.json.
#[test]
fn output_matches_schema_json() {
    let f = random_fixture(30, 4, 2, DType::F32);
    let out = f.out("nn.parquet");
    stage(&f, &out, "l2", "native", "fp32", 3).unwrap();
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/neighbors.schema.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(schema["artifact"], "neighbors");
    let t = simile::table::read_parquet(&out, None).unwrap();
    let fields = t.batch.schema();
    let cols = schema["columns"].as_array().unwrap();
    assert_eq!(cols.len(), fields.fields().len());
    for (c, fld) in cols.iter().zip(fields.fields()) {
        assert_eq!(c["name"].as_str().unwrap(), fld.name());
        let ty = match fld.data_type() {
            arrow::datatypes::DataType::Int64 => "int64",
            arrow::datatypes::DataType::Int32 => "int32",
            arrow::datatypes::DataType::Float32 => "float32",
            arrow::datatypes::DataType::Utf8 => "utf8",
            arrow::datatypes::DataType::Boolean => "bool",
            other => panic!("unexpected type {other}"),
        };
        assert_eq!(c["type"].as_str().unwrap(), ty, "{}", fld.name());
        assert_eq!(
            c["nullable"].as_bool().unwrap(),
            fld.is_nullable(),
            "{}",
            fld.name()
        );
    }
    for key in schema["metadata_keys"].as_array().unwrap() {
        let key = key.as_str().unwrap();
        assert!(t.meta.contains_key(key), "metadata key {key} missing");
    }
    // The manifest records both inputs.
    let m = simile::manifest::verify(&out).unwrap().unwrap();
    assert_eq!(m.stage, "distance");
    assert!(m.inputs.contains_key("dataset") && m.inputs.contains_key("embeddings"));
}

/// Each bad input: exit code 2, a message naming the problem, no output file left behind.
/// Most cases run in-process (`Error::exit_code` is what the binary exits with); the binary
/// is run for a library error, a flag error and a device error.
#[test]
fn bad_inputs_fail_cleanly() {
    use simile::knn::stage::{run as run_stage, Inputs, Options};
    use simile::knn::{Compute, Engine, Metric};
    let f = random_fixture(30, 4, 4, DType::F32);
    let dir = f.dir.path();
    let ds = f.dataset();
    let out = f.out("bad.parquet");
    let nothing_left = |what: &str| {
        assert!(!out.exists(), "{what} left {}", out.display());
        let leftovers: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".bad") || n.starts_with("bad"))
            .collect();
        assert!(leftovers.is_empty(), "{what} left {leftovers:?}");
    };
    let check = |inputs: Inputs, k: usize, want: &str| {
        let e = run_stage(&Options {
            inputs,
            out: out.clone(),
            k,
            metric: Metric::L2,
            compute: Compute::Fp32,
            engine: Engine::Native,
            shard: None,
            memory_budget: 1 << 20,
        })
        .unwrap_err();
        assert_eq!(e.exit_code(), 2, "{want}: {e}");
        assert!(e.to_string().contains(want), "expected '{want}' in: {e}");
        nothing_left(want);
    };
    let one = |emb: &Path| Inputs::One {
        dataset: ds.clone(),
        embeddings: emb.to_path_buf(),
        split: Split::Validation,
    };
    let n = f.rows.len();
    // Wrong dtype (float64) and wrong rank (1-d).
    let e64 = dir.join("e64.npy");
    write_emb(&e64, &vec![0.5; n * 4], 4, DType::F32);
    let mut bytes = std::fs::read(&e64).unwrap();
    let at = bytes.windows(3).position(|w| w == b"<f4").unwrap();
    bytes[at + 2] = b'8';
    bytes.extend(vec![0u8; n * 4 * 4]);
    std::fs::write(&e64, bytes).unwrap();
    check(one(&e64), 5, "unsupported dtype");
    let e1 = dir.join("e1.npy");
    let mut w = npy::NpyWriter::create(&e1, DType::F32, &[n]).unwrap();
    w.write_f32(&vec![0.0; n]).unwrap();
    w.finish().unwrap();
    check(one(&e1), 5, "expected a 2-d");
    // NaN and infinity: the first bad row is named (rows 5 and 9 are bad).
    for (bad, what) in [(f32::NAN, "NaN"), (f32::INFINITY, "an infinite value")] {
        let mut v = vec![0.25f32; n * 4];
        v[9 * 4] = bad;
        v[5 * 4 + 2] = bad;
        let e = dir.join("nan.npy");
        write_emb(&e, &v, 4, DType::F32);
        check(
            one(&e),
            5,
            &format!("row 5 (id {}) has {what} in column 2", f.rows[5].id),
        );
    }
    // Row count that matches neither the split nor the dataset, without an ids file.
    let e = dir.join("short.npy");
    write_emb(&e, &[0.0; 7 * 4], 4, DType::F32);
    let split_rows = f
        .rows
        .iter()
        .filter(|r| r.split == Split::Validation)
        .count();
    check(one(&e), 5, "7 rows and no");
    check(
        one(&e),
        5,
        &format!("expected {split_rows} (the rows of split 'validation', in id order) or {n}"),
    );
    // Ids not in the dataset, and an id listed twice.
    let e = dir.join("ids.npy");
    write_emb(&e, &vec![0.0; n * 4], 4, DType::F32);
    let mut ids: Vec<i64> = f.rows.iter().map(|r| r.id).collect();
    ids[3] = 999_999;
    npy::write_i64(npy::ids_path(&e), &ids).unwrap();
    check(one(&e), 5, "row 3: id 999999 is not in");
    ids[3] = ids[4];
    npy::write_i64(npy::ids_path(&e), &ids).unwrap();
    check(one(&e), 5, "appears twice");
    // k = 0, the train split, an empty query set.
    check(one(&f.embeddings()), 0, "top-k");
    check(
        Inputs::One {
            dataset: ds.clone(),
            embeddings: f.embeddings(),
            split: Split::Train,
        },
        5,
        "train",
    );
    let empty = dir.join("noq.parquet");
    let mut rows = f.rows.clone();
    rows.iter_mut().for_each(|r| r.query = false);
    write_dataset(&empty, &rows);
    check(
        Inputs::One {
            dataset: empty,
            embeddings: f.embeddings(),
            split: Split::Validation,
        },
        5,
        "no query rows",
    );
    // A shard part as input.
    let part = dir.join("emb.part-0-of-2.npy");
    std::fs::copy(f.embeddings(), &part).unwrap();
    check(one(&part), 5, "shard part");
    // Dimension mismatch between the two sides.
    let g = dir.join("g5.npy");
    write_emb(&g, &vec![0.0; n * 5], 5, DType::F32);
    check(
        Inputs::Two {
            query_dataset: ds.clone(),
            query_embeddings: f.embeddings(),
            query_split: None,
            gallery_dataset: ds.clone(),
            gallery_embeddings: g,
            gallery_split: None,
        },
        5,
        "dimension mismatch",
    );
    // Embeddings whose manifest names another dataset.
    let other = dir.join("other.parquet");
    write_dataset(&other, &f.rows[..10]);
    let e = dir.join("stale.npy");
    std::fs::copy(npy::ids_path(&f.embeddings()), npy::ids_path(&e)).unwrap();
    let mut mb = simile::manifest::ManifestBuilder::new("embed", serde_json::json!({}));
    mb.input("dataset", &other).unwrap();
    let sealed = simile::io::seal_bytes(&e, &std::fs::read(f.embeddings()).unwrap()).unwrap();
    mb.commit(sealed, vec![]).unwrap();
    check(one(&e), 5, "made from a different dataset");

    // Through the binary: exit code 2 and the message for a library error, a bad flag and
    // a missing device.
    let nan = dir.join("nan.npy");
    let bin = |extra: &[&str], want: &str| {
        let mut a = vec![
            "--dataset",
            p(&ds),
            "--embeddings",
            p(&nan),
            "--out",
            p(&out),
        ];
        a.extend_from_slice(extra);
        let o = run(&a);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{a:?}: {err}");
        assert!(err.contains(want), "{a:?}: expected '{want}' in: {err}");
        nothing_left(want);
    };
    bin(&[], "has an infinite value");
    bin(&["--top-k", "0"], "--top-k");
    bin(&["--metric", "hamming"], "expected l2, cosine or dot");
    if tch::Cuda::device_count() == 0 {
        bin(&["--device", "cuda"], "no CUDA device");
    }
}

#[test]
fn help_has_examples() {
    let o = run(&["--help"]);
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success());
    assert!(s.contains("Examples:") && s.contains("merge"), "{s}");
}
