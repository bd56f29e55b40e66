//! The shard and manifest conventions on a toy artifact: embeddings parts joined by
//! `simile-embed merge`.
mod common;
use common::{listing, run};
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
    assert!(simile::shard::refuse_part(&part).is_err());
    assert!(simile::shard::refuse_part(&out).is_ok());
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
