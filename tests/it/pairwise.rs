//! The pairwise re-ranker end to end on small generated data: simile-train's pairwise mode
//! writes a model folder of kind `pairwise` (2 steps; siamese by default, stacked on request)
//! and skips a finished run, simile-embed refuses it, the library's
//! `rerank::pairwise::rescore` keeps the tail and CMC@top_n, and a seed (and a resume)
//! reproduces the weights.
use crate::common;

use simile::dataset::{Dataset, Split};
use simile::image::{Preprocess, ResizeMode};
use simile::model::pairwise::Fusion;
use simile::model::{ArchSpec, ModelKind, ModelSpec, Net};
use std::path::{Path, PathBuf};
use tch::{nn, Device, Tensor};

const TRAIN: &str = env!("CARGO_BIN_EXE_simile-train");
const EMBED: &str = env!("CARGO_BIN_EXE_simile-embed");

fn arch() -> ArchSpec {
    let mut a = ArchSpec::new("smallcnn");
    a.width = Some(4);
    a
}

fn input() -> Preprocess {
    Preprocess {
        size: 24,
        resize: ResizeMode::Pad,
        crop_ratio: 0.875,
        mean: [0.5; 3],
        std: [0.5; 3],
    }
}

/// An (untrained, seeded) extractor folder: it mines the pairs and gives the neighbours.
fn make_extractor(dir: &Path) {
    tch::manual_seed(1);
    let vs = nn::VarStore::new(Device::Cpu);
    Net::new(&vs.root(), &arch(), true).unwrap();
    let spec = ModelSpec::new(arch(), true, input()).unwrap();
    simile::model::save_folder(dir, &spec, &vs).unwrap();
}

fn write_config(dir: &Path, extractor: &Path) -> PathBuf {
    let e = extractor.display();
    let text = format!(
        r#"seed = 3
epochs = 1
batch_size_val = 16
[model]
arch = "smallcnn"
width = 4
normalise = false
size = 24
mean = [0.5, 0.5, 0.5]
std = [0.5, 0.5, 0.5]
init = "{e}"
[augment]
contrast = 0.2
[sampler]
name = "balance"
n_labels = 3
n_instances = 4
[pairwise]
extractor = "{e}"
mlp_hidden = [8]
top_n = 3
"#
    );
    let p = dir.join("pairwise.toml");
    std::fs::write(&p, text).unwrap();
    p
}

struct Env {
    dir: tempfile::TempDir,
    ds: PathBuf,
    cfg: PathBuf,
    ext: PathBuf,
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    // 6 train labels / 3 per batch: an epoch is 2 steps.
    let ds = common::striped_dataset(dir.path(), 6, 3, 4, false, 777);
    let ext = dir.path().join("extractor");
    make_extractor(&ext);
    let cfg = write_config(dir.path(), &ext);
    Env { dir, ds, cfg, ext }
}

fn train(e: &Env, out: &Path, extra: &[&str]) -> common::Run {
    let o = std::process::Command::new(TRAIN)
        .args([
            "--dataset",
            s(&e.ds),
            "--config",
            s(&e.cfg),
            "--out",
            s(out),
        ])
        .args(["--device", "cpu", "--cache-dir"])
        .arg(e.dir.path().join("cache"))
        .args(extra)
        .env("SIMILE_CACHE", e.dir.path().join("zoo"))
        .output()
        .unwrap();
    common::Run::from(o)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn tensors(p: &Path) -> Vec<(String, Vec<f32>)> {
    let mut v: Vec<(String, Vec<f32>)> = Tensor::read_safetensors(p)
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Ids of the first `n` of a list that share the query's label.
fn hits(ds: &Dataset, q: i64, list: &[(i64, f32)], n: usize) -> usize {
    let label = |id: i64| ds.label[ds.position_of(id).unwrap()];
    list.iter()
        .take(n)
        .filter(|(g, _)| label(*g) == label(q))
        .count()
}

#[test]
fn trains_a_pairwise_folder_that_embed_refuses_and_rescore_keeps_the_tail() {
    let e = env();
    let out = e.dir.path().join("pw");
    let r = train(&e, &out, &["--log-every", "1"]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    // The pairwise trainer logs as the extractor's does: a line per step here.
    let lines = r
        .stderr
        .lines()
        .filter(|l| l.contains(" loss ") && l.contains(" ETA "));
    assert_eq!(lines.count(), 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("the extractor on 12 validation queries"),
        "{}",
        r.stderr
    );

    // The folder: kind pairwise, OML's parameter names, logs, checkpoints, manifest.
    let spec = ModelSpec::read(&out).unwrap();
    assert_eq!(spec.kind, ModelKind::Pairwise);
    let pspec = simile::model::pairwise::PairwiseSpec::read(&out).unwrap();
    assert_eq!(pspec.pairwise.mlp_hidden, vec![8]);
    // A CNN backbone defaults to the siamese fusion.
    assert_eq!(pspec.pairwise.fusion, Fusion::Siamese);
    let names: Vec<String> = tensors(&out.join("model.safetensors"))
        .into_iter()
        .map(|t| t.0)
        .collect();
    assert!(names.contains(&"extractor.blocks.3.conv.weight".to_string()));
    assert!(names.contains(&"head.3.weight".to_string()), "{names:?}");
    assert!(names.contains(&"head.dist.weight".to_string()), "{names:?}");
    let log = simile::train::log::read(&out.join("train_log.parquet"), &["epoch", "step"]).unwrap();
    assert_eq!(log.len(), 2);
    for row in &log {
        let acc = row.value("pair_accuracy").unwrap();
        assert!((0.0..=1.0).contains(&acc));
        assert!(row.value("loss").unwrap().is_finite());
        assert!(row.value("n_pos_pairs").unwrap() >= 1.0);
    }
    let val =
        simile::train::log::read(&out.join("val_metrics.parquet"), &["epoch", "step"]).unwrap();
    assert_eq!(val.len(), 1);
    assert!(val[0].value("OVERALL/cmc/1").is_some());
    for f in [
        "model.json",
        "config.toml",
        "model.safetensors.manifest.json",
        "checkpoints",
    ] {
        assert!(out.join(f).exists(), "{f}");
    }
    // A second run with the same inputs and parameters does nothing.
    let r = train(&e, &out, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("is up to date"), "{}", r.stderr);

    // simile-embed refuses a pairwise model: exit 2, a clear message, no output.
    let emb = e.dir.path().join("emb.npy");
    let r = common::run(
        EMBED,
        &[
            "--dataset",
            s(&e.ds),
            "--model",
            s(&out),
            "--out",
            s(&emb),
            "--device",
            "cpu",
        ],
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("pairwise"), "{}", r.stderr);
    assert!(!emb.exists());

    // rescore: per query, every other validation image ranked by a fixed distance.
    let ds = Dataset::read(&e.ds).unwrap();
    let vrows = ds.rows_of_split(Split::Validation);
    let query_ids: Vec<i64> = vrows.iter().map(|&r| ds.ids[r]).collect();
    let mut lists: Vec<Vec<(i64, f32)>> = query_ids
        .iter()
        .map(|&q| {
            let mut l: Vec<(i64, f32)> = query_ids
                .iter()
                .filter(|&&g| g != q)
                .map(|&g| (g, ((q * 7 + g * 13) % 17) as f32 / 10.0 + 0.1))
                .collect();
            l.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
            l
        })
        .collect();
    let before = lists.clone();
    let top_n = 4;
    simile::rerank::pairwise::rescore(&out, &ds, &mut lists, &query_ids, top_n, Device::Cpu, 5)
        .unwrap();
    let mut changed = 0;
    for ((q, b), a) in query_ids.iter().zip(&before).zip(&lists) {
        assert_eq!(a.len(), b.len());
        assert_eq!(&a[top_n..], &b[top_n..], "the tail is untouched");
        let mut ha: Vec<i64> = a[..top_n].iter().map(|x| x.0).collect();
        let mut hb: Vec<i64> = b[..top_n].iter().map(|x| x.0).collect();
        changed += (ha != hb) as usize;
        ha.sort_unstable();
        hb.sort_unstable();
        assert_eq!(ha, hb, "the head is a permutation of the old head");
        assert!(a.windows(2).all(|w| w[0].1 <= w[1].1), "sorted: {a:?}");
        // CMC@top_n and precision@top_n cannot change.
        assert_eq!(hits(&ds, *q, a, top_n), hits(&ds, *q, b, top_n));
        assert_eq!((hits(&ds, *q, a, top_n) > 0), (hits(&ds, *q, b, top_n) > 0));
        // The new head scores are probabilities, rescaled below the tail when needed.
        assert!(a[top_n - 1].1 <= b[top_n].1);
    }
    assert!(changed > 0, "the model re-ordered no list");

    // Bad input: an extractor is not a pairwise model; top_n 1 is refused (exit-2 errors).
    let err = simile::rerank::pairwise::rescore(
        &e.ext,
        &ds,
        &mut lists,
        &query_ids,
        top_n,
        Device::Cpu,
        5,
    )
    .unwrap_err();
    assert_eq!(err.exit_code(), 2);
    assert!(
        err.to_string().contains("not a pairwise re-ranker"),
        "{err}"
    );
    let err =
        simile::rerank::pairwise::rescore(&out, &ds, &mut lists, &query_ids, 1, Device::Cpu, 5)
            .unwrap_err();
    assert_eq!(err.exit_code(), 2);
}

#[test]
fn a_seed_and_a_resume_reproduce_the_weights() {
    let e = env();
    let (a, b, c) = (
        e.dir.path().join("a"),
        e.dir.path().join("b"),
        e.dir.path().join("c"),
    );
    for o in [&a, &b] {
        let r = train(&e, o, &[]);
        assert_eq!(r.code, 0, "{}", r.stderr);
    }
    let wa = tensors(&a.join("model.safetensors"));
    assert_eq!(wa, tensors(&b.join("model.safetensors")));
    // Stopped after the first step, then resumed: the same weights and losses.
    let r = train(&e, &c, &["--stop-after-steps", "1"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!c.join("model.safetensors.manifest.json").exists());
    let r = train(&e, &c, &["--resume"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let wc = tensors(&c.join("model.safetensors"));
    for ((na, va), (nc, vc)) in wa.iter().zip(&wc) {
        assert_eq!(na, nc);
        let d = va
            .iter()
            .zip(vc)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(d <= 1e-6, "{na}: resumed weights differ by {d}");
    }
    let la = simile::train::log::read(&a.join("train_log.parquet"), &["epoch", "step"]).unwrap();
    let lc = simile::train::log::read(&c.join("train_log.parquet"), &["epoch", "step"]).unwrap();
    assert_eq!(la.len(), lc.len());
    for (x, y) in la.iter().zip(&lc) {
        assert_eq!(x.value("loss"), y.value("loss"));
    }
    // Another seed gives other weights.
    let d = e.dir.path().join("d");
    let r = train(&e, &d, &["--set", "seed=4"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_ne!(wa, tensors(&d.join("model.safetensors")));
}

/// bf16 under autocast: trains, differs from fp32 by rounding only, and resumes exactly.
#[test]
fn bf16_trains_and_resumes_under_autocast() {
    let e = env();
    let (a, c, f) = (
        e.dir.path().join("a"),
        e.dir.path().join("c"),
        e.dir.path().join("f32"),
    );
    let r = train(&e, &a, &["--compute", "bf16"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = train(&e, &f, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let la = simile::train::log::read(&a.join("train_log.parquet"), &["epoch", "step"]).unwrap();
    let lf = simile::train::log::read(&f.join("train_log.parquet"), &["epoch", "step"]).unwrap();
    let (x, y) = (la[0].value("loss").unwrap(), lf[0].value("loss").unwrap());
    assert!(
        x != y && (x - y).abs() < 0.05 * y.abs(),
        "bf16 {x} vs fp32 {y}"
    );
    let r = train(&e, &c, &["--compute", "bf16", "--stop-after-steps", "1"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = train(&e, &c, &["--compute", "bf16", "--resume"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        tensors(&a.join("model.safetensors")),
        tensors(&c.join("model.safetensors"))
    );
}

#[test]
fn the_stacked_fusion_trains_and_rescores() {
    // OML's ConcatSiamese (`fusion = "stack"`), kept for ViTs, still works on a CNN.
    let e = env();
    let out = e.dir.path().join("stack");
    let r = train(&e, &out, &["--set", "pairwise.fusion=\"stack\""]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let pspec = simile::model::pairwise::PairwiseSpec::read(&out).unwrap();
    assert_eq!(pspec.pairwise.fusion, Fusion::Stack);
    let names: Vec<String> = tensors(&out.join("model.safetensors"))
        .into_iter()
        .map(|t| t.0)
        .collect();
    assert!(
        !names.iter().any(|n| n.starts_with("head.dist")),
        "{names:?}"
    );
    let ds = Dataset::read(&e.ds).unwrap();
    let ids: Vec<i64> = ds
        .rows_of_split(Split::Validation)
        .iter()
        .map(|&r| ds.ids[r])
        .collect();
    let mut lists: Vec<Vec<(i64, f32)>> = ids
        .iter()
        .map(|&q| {
            ids.iter()
                .filter(|&&g| g != q)
                .enumerate()
                .map(|(i, &g)| (g, 0.1 * (i + 1) as f32))
                .collect()
        })
        .collect();
    let before = lists.clone();
    simile::rerank::pairwise::rescore(&out, &ds, &mut lists, &ids, 3, Device::Cpu, 4).unwrap();
    for (a, b) in lists.iter().zip(&before) {
        assert_eq!(&a[3..], &b[3..]);
        assert!(a[..3].iter().all(|x| (0.0..=1.0).contains(&x.1)));
    }
}

#[test]
fn bad_pairwise_configs_are_refused() {
    let e = env();
    let out = e.dir.path().join("bad");
    let r = train(&e, &out, &["--set", "loss.name=triplet"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("no [loss] table"), "{}", r.stderr);
    let r = train(
        &e,
        &out,
        &["--set", "pairwise.extractor=/nonexistent/model"],
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("pairwise.extractor"), "{}", r.stderr);
    let r = train(&e, &out, &["--set", "pairwise.top_n=1"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    let r = train(&e, &out, &["--set", "pairwise.fusion=\"concat\""]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("pairwise.fusion"), "{}", r.stderr);
    assert!(!out.join("model.json").exists());
}
