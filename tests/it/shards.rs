//! The shard and manifest conventions on a toy artifact: embeddings parts joined by
//! `simile-embed merge`.
use crate::common;
use crate::common::{listing, run};
use simile::manifest::{self, ManifestBuilder};
use simile::npy::{self, DType, Npy};
use simile::shard::ShardSpec;
use std::path::{Path, PathBuf};

const EMBED: &str = env!("CARGO_BIN_EXE_simile-embed");
const N: usize = 10;
const D: usize = 3;

fn value(row: usize, col: usize) -> f32 {
    row as f32 * 10.0 + col as f32
}

/// Writes part `spec` of a run over N rows, "made from" `dataset`.
fn write_part(dir: &Path, spec: ShardSpec, dataset: &Path) -> PathBuf {
    let out = dir.join("emb.npy");
    let part = spec.part_path(&out);
    let (a, b) = spec.range(N);
    let vals: Vec<f32> = (a..b)
        .flat_map(|r| (0..D).map(move |c| value(r, c)))
        .collect();
    let emb = npy::seal_f32_matrix(&part, &vals, D, DType::F32).unwrap();
    let ids: Vec<i64> = (a..b).map(|r| r as i64 * 2).collect();
    let ids = npy::seal_i64(npy::ids_path(&part), &ids).unwrap();
    let mut m = ManifestBuilder::new("embed", serde_json::json!({"model": "toy"}));
    m.input("dataset", dataset).unwrap();
    m.shard(spec, a, b).companion(&npy::ids_path(&part));
    m.commit(emb, vec![ids]).unwrap();
    part
}

fn setup() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("dataset.parquet");
    std::fs::write(&ds, b"pretend dataset v1").unwrap();
    (dir, ds)
}

#[test]
fn merge_joins_parts_like_an_unsharded_run() {
    let (dir, ds) = setup();
    for i in 0..3 {
        write_part(dir.path(), ShardSpec { index: i, count: 3 }, &ds);
    }
    let out = dir.path().join("emb.npy");
    let r = run(EMBED, &["merge", "--out", out.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let a = Npy::open(&out).unwrap();
    assert_eq!(a.shape, vec![N, D]);
    let mut buf = Vec::new();
    a.read_rows_f32(0, N, &mut buf);
    let want: Vec<f32> = (0..N)
        .flat_map(|r| (0..D).map(move |c| value(r, c)))
        .collect();
    assert_eq!(buf, want);
    let ids = Npy::open(npy::ids_path(&out))
        .unwrap()
        .to_i64_vec()
        .unwrap();
    assert_eq!(ids, (0..N as i64).map(|r| r * 2).collect::<Vec<_>>());
    // The merged manifest is complete (no shard) and keeps the upstream dataset.
    let m = manifest::verify(&out).unwrap().unwrap();
    assert!(m.shard.is_none());
    manifest::check_upstream(&out, "dataset", &ds).unwrap();
    // Consumers refuse parts but accept the merged file.
    let part = ShardSpec { index: 1, count: 3 }.part_path(&out);
    assert!(simile::parts::refuse_part(&part).is_err());
    assert!(simile::parts::refuse_part(&out).is_ok());
}

#[test]
fn merge_refuses_gaps() {
    let (dir, ds) = setup();
    write_part(dir.path(), ShardSpec { index: 0, count: 3 }, &ds);
    write_part(dir.path(), ShardSpec { index: 2, count: 3 }, &ds);
    let out = dir.path().join("emb.npy");
    let r = run(EMBED, &["merge", "--out", out.to_str().unwrap()]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("missing part(s) 1 of 3"), "{}", r.stderr);
    assert!(!out.exists());
    assert!(!listing(dir.path()).iter().any(|f| f.ends_with(".tmp")));
}

#[test]
fn merge_refuses_duplicates_and_mixed_shardings() {
    let (dir, ds) = setup();
    let p0 = write_part(dir.path(), ShardSpec { index: 0, count: 2 }, &ds);
    let p1 = write_part(dir.path(), ShardSpec { index: 1, count: 2 }, &ds);
    let copy = dir.path().join("copy.part-0-of-2.npy");
    std::fs::copy(&p0, &copy).unwrap();
    std::fs::copy(npy::ids_path(&p0), npy::ids_path(&copy)).unwrap();
    std::fs::copy(manifest::manifest_path(&p0), manifest::manifest_path(&copy)).unwrap();
    // The copied manifest names the original file, but fingerprints match (same bytes).
    let out = dir.path().join("emb.npy");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let r = run(
        EMBED,
        &["merge", "--out", &s(&out), &s(&p0), &s(&copy), &s(&p1)],
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("duplicate part 0"), "{}", r.stderr);
    let p3 = write_part(dir.path(), ShardSpec { index: 0, count: 3 }, &ds);
    let r = run(EMBED, &["merge", "--out", &s(&out), &s(&p3), &s(&p1)]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("different shardings"), "{}", r.stderr);
    assert!(!out.exists());
}

#[test]
fn merge_refuses_parts_from_different_inputs() {
    let (dir, ds) = setup();
    write_part(dir.path(), ShardSpec { index: 0, count: 2 }, &ds);
    std::fs::write(&ds, b"pretend dataset, version two").unwrap();
    write_part(dir.path(), ShardSpec { index: 1, count: 2 }, &ds);
    let out = dir.path().join("emb.npy");
    let r = run(EMBED, &["merge", "--out", out.to_str().unwrap()]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("different inputs"), "{}", r.stderr);
    assert!(!out.exists());
}

#[test]
fn upstream_fingerprint_mismatch_is_refused() {
    let (dir, ds) = setup();
    for i in 0..2 {
        write_part(dir.path(), ShardSpec { index: i, count: 2 }, &ds);
    }
    let out = dir.path().join("emb.npy");
    assert_eq!(
        run(EMBED, &["merge", "--out", out.to_str().unwrap()]).code,
        0
    );
    std::fs::write(&ds, b"the dataset changed after embedding").unwrap();
    let e = manifest::check_upstream(&out, "dataset", &ds).unwrap_err();
    assert_eq!(e.exit_code(), 2);
    assert!(e.to_string().contains("re-run the `embed` stage"), "{e}");
}

/// A dataset of `n` unlabelled rows (ids 10, 20, ...): a catalogue or a query batch.
fn inference_dataset(path: &Path, n: usize) {
    let mut b = common::DatasetBuilder::new((0..n as i64).map(|i| 10 * i + 10))
        .text(|i| Some(format!("item {i}")));
    b.0.meta.modality = "text".into();
    b.write(path);
}

/// Gallery-shard workers of a large two-sided search read (and fingerprint) only their
/// blocks of the gallery: their manifests record ranges, the merge joins them into the whole
/// file's fingerprint (the unsharded run's), a change in one shard's blocks redoes that shard
/// only, and the merged result equals the unsharded one.
#[test]
fn gallery_shards_fingerprint_their_own_blocks() {
    use simile::io::{Fingerprint, BLOCK};
    const DIST: &str = env!("CARGO_BIN_EXE_simile-distance");
    let dir = tempfile::tempdir().unwrap();
    let d = 96;
    // Just over two blocks of float32: a gallery shard of half the rows reads block 0 (and 1).
    let n = (2 * BLOCK as usize) / (d * 4) + 1000;
    let (gds, qds) = (
        dir.path().join("catalog.parquet"),
        dir.path().join("batch.parquet"),
    );
    inference_dataset(&gds, n);
    inference_dataset(&qds, 40);
    let mut rng = common::Rng(5);
    let gemb = dir.path().join("catalog.npy");
    let vals: Vec<f32> = (0..n * d).map(|_| rng.f()).collect();
    npy::write_f32_matrix(&gemb, &vals, d, DType::F32).unwrap();
    let ids: Vec<i64> = (0..n as i64).map(|i| 10 * i + 10).collect();
    npy::write_i64(npy::ids_path(&gemb), &ids).unwrap();
    let qemb = dir.path().join("batch.npy");
    npy::write_f32_matrix(&qemb, &vals[..40 * d], d, DType::F32).unwrap();
    npy::write_i64(npy::ids_path(&qemb), &ids[..40]).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let search = |out: &Path, shard: Option<&str>| {
        let mut a = vec![
            "--query-dataset".to_string(),
            s(&qds),
            "--query-embeddings".into(),
            s(&qemb),
            "--gallery-dataset".into(),
            s(&gds),
            "--gallery-embeddings".into(),
            s(&gemb),
            "--top-k".into(),
            "5".into(),
            "--device".into(),
            "cpu".into(),
            "--out".into(),
            s(out),
        ];
        if let Some(sh) = shard {
            a.extend(["--gallery-shard".to_string(), sh.to_string()]);
        }
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let r = run(DIST, &a);
        assert_eq!(r.code, 0, "{a:?}: {}", r.stderr);
        r
    };
    let whole = dir.path().join("whole.parquet");
    search(&whole, None);
    let nn = dir.path().join("nn.parquet");
    for i in 0..2 {
        search(&nn, Some(&format!("{i}/2")));
    }
    let part = |i| {
        manifest::verify(&dir.path().join(format!("nn.part-{i}-of-2.parquet")))
            .unwrap()
            .unwrap()
    };
    let g0 = part(0).inputs["gallery_embeddings"].fingerprint.clone();
    assert!(g0.is_range(), "{g0:?}");
    assert_eq!(
        g0.blocks.as_ref().unwrap().digests.len(),
        2,
        "rows [0, n/2) end in block 1"
    );
    let r = run(DIST, &["merge", "--out", &s(&nn)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let merged = manifest::verify(&nn).unwrap().unwrap();
    let unsharded = manifest::verify(&whole).unwrap().unwrap();
    let want = Fingerprint::of(&gemb).unwrap();
    for m in [&merged, &unsharded] {
        assert!(m.inputs["gallery_embeddings"]
            .fingerprint
            .same_content(&want));
    }
    let rows = |p: &Path| {
        let t = simile::neighbors::Neighbors::read(p).unwrap();
        (t.query_id, t.gallery_id, t.distance)
    };
    assert_eq!(rows(&nn), rows(&whole));
    // A value in the last block changes: shard 1 reads it, shard 0 does not.
    let mut bytes = std::fs::read(&gemb).unwrap();
    let at = bytes.len() - 8;
    bytes[at] ^= 0x10;
    std::fs::write(&gemb, &bytes).unwrap();
    let r0 = search(&nn, Some("0/2"));
    let r1 = search(&nn, Some("1/2"));
    assert!(r0.stderr.contains("is up to date"), "{}", r0.stderr);
    assert!(!r1.stderr.contains("is up to date"), "{}", r1.stderr);
}

/// `--gallery-shard auto/N` (a Kubernetes Indexed Job's pod) takes its index from
/// JOB_COMPLETION_INDEX, and refuses a missing or out-of-range one (exit 2).
#[test]
fn auto_shard_reads_the_job_completion_index() {
    const DIST: &str = env!("CARGO_BIN_EXE_simile-distance");
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("items.parquet");
    inference_dataset(&ds, 30);
    let emb = dir.path().join("items.npy");
    let mut rng = common::Rng(3);
    let vals: Vec<f32> = (0..30 * 4).map(|_| rng.f()).collect();
    npy::write_f32_matrix(&emb, &vals, 4, DType::F32).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let out = dir.path().join("nn.parquet");
    let args = [
        "--dataset".to_string(),
        s(&ds),
        "--embeddings".into(),
        s(&emb),
        "--split".into(),
        "inference".into(),
        "--top-k".into(),
        "3".into(),
        "--out".into(),
        s(&out),
        "--gallery-shard".into(),
        "auto/2".into(),
    ];
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let with = |v: Option<&str>| {
        let mut c = std::process::Command::new(DIST);
        c.args(&a).env_remove(simile::shard::INDEX_ENV);
        if let Some(v) = v {
            c.env(simile::shard::INDEX_ENV, v);
        }
        let o = c.output().unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (code, err) = with(Some("1"));
    assert_eq!(code, Some(0), "{err}");
    assert!(dir.path().join("nn.part-1-of-2.parquet").exists());
    assert!(!dir.path().join("nn.part-0-of-2.parquet").exists());
    for (v, want) in [
        (None, "not set"),
        (Some("2"), "not below the shard count 2"),
        (Some("x"), "not a shard index"),
    ] {
        let (code, err) = with(v);
        assert_eq!(code, Some(2), "{v:?}: {err}");
        assert!(err.contains(want), "{v:?}: {err}");
    }
}
