//! simile-train end to end: the real binary on small generated image datasets in temp folders.
//! Outputs and their readers, validation equal to embed + distance + score, resume after a
//! stop equal to an uninterrupted run, the OML recipes for two steps, bad input (exit 2).
use crate::common;

use simile::dataset::{Dataset, Split};
use simile::train::log;
use std::path::{Path, PathBuf};

const TRAIN: &str = env!("CARGO_BIN_EXE_simile-train");

fn configs() -> PathBuf {
    common::repo_root().join("pipelines/configs")
}

struct Env {
    dir: tempfile::TempDir,
    cache: PathBuf,
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    Env { dir, cache }
}

fn train(e: &Env, args: &[&str]) -> common::Run {
    train_env(e, args, &[])
}

fn train_env(e: &Env, args: &[&str], env: &[(&str, &str)]) -> common::Run {
    let out = std::process::Command::new(TRAIN)
        .args(args)
        .args(["--device", "cpu", "--cache-dir"])
        .arg(&e.cache)
        .env("SIMILE_CACHE", e.dir.path().join("zoo"))
        .envs(env.iter().copied())
        .output()
        .unwrap();
    common::Run::from(out)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The Font-ID default, shrunk for generated 24 px data.
const SMALL: &[&str] = &[
    "--set",
    "model.size=32",
    "--set",
    "model.width=8",
    "--set",
    "model.dim=16",
    "--set",
    "sampler.n_labels=3",
    "--set",
    "sampler.n_instances=4",
    "--set",
    "batch_size_val=64",
];

fn fontid_args<'a>(ds: &'a str, out: &'a str, cfg: &'a str) -> Vec<&'a str> {
    let mut v = vec!["--dataset", ds, "--config", cfg, "--out", out];
    v.extend_from_slice(SMALL);
    v
}

#[test]
fn trains_and_the_folder_is_read_by_embed_with_the_same_metrics() {
    let e = env();
    let ds = common::striped_dataset(e.dir.path(), 6, 4, 6, true, 12345);
    let out = e.dir.path().join("model");
    let cfg = configs().join("fontid.toml");
    let mut args = fontid_args(s(&ds), s(&out), s(&cfg));
    args.extend(["--set", "epochs=3", "--set", "valid_period=1"]);
    let r = train(&e, &args);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("best OVERALL/cmc/1"), "{}", r.stdout);
    for f in [
        "model.json",
        "model.safetensors",
        "model.safetensors.manifest.json",
        "config.toml",
        "train_log.parquet",
        "val_metrics.parquet",
        "checkpoints/last/state.json",
        "checkpoints/last/model.safetensors",
        "checkpoints/last/optimizer.safetensors",
        "checkpoints/best/state.json",
    ] {
        assert!(out.join(f).exists(), "missing {f}");
    }
    // One row per step (6 train labels // 3 = 2 steps per epoch), one per validation
    // (before training, then after each epoch).
    let tl = log::read(&out.join("train_log.parquet"), &["epoch", "step"]).unwrap();
    assert_eq!(tl.len(), 6);
    assert_eq!(tl[5].int("step"), Some(6));
    assert_eq!(tl[5].int("epoch"), Some(2));
    // The default loss (multi-similarity) logs its mean positive and negative similarity.
    for k in ["loss", "lr", "pos_sim", "neg_sim", "gflop_s"] {
        assert!(tl[0].value(k).is_some(), "train_log has no {k}");
    }
    // Utilisation: the network's FLOPs as the profiler counts them (2 per multiply-add) for
    // smallcnn width 8 at 32 px with a 64 -> 16 projection, x3 for forward + backward.
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out.join("model.safetensors.manifest.json")).unwrap(),
    )
    .unwrap();
    let u = &manifest["notes"]["utilisation"];
    let conv = |cin: f64, cout: f64, hw: f64| 2.0 * cin * cout * 9.0 * hw * hw;
    let fwd = conv(3.0, 8.0, 32.0)
        + conv(8.0, 16.0, 16.0)
        + conv(16.0, 32.0, 8.0)
        + conv(32.0, 64.0, 4.0)
        + 2.0 * 64.0 * 16.0;
    let f = u["flops_per_image"].as_f64().unwrap();
    assert!(
        (f / (3.0 * fwd) - 1.0).abs() < 0.05,
        "flops_per_image {f}, want about {}",
        3.0 * fwd
    );
    let (g, peak) = (
        u["gflop_s"].as_f64().unwrap(),
        u["peak_gflop_s"].as_f64().unwrap(),
    );
    assert!(g > 0.0 && peak > 0.0, "{u}");
    assert!((u["share_of_peak"].as_f64().unwrap() - g / peak).abs() < 1e-9);
    assert!(r.stdout.contains("GFLOP/s"), "{}", r.stdout);
    let vm = log::read(&out.join("val_metrics.parquet"), &["epoch", "step"]).unwrap();
    assert_eq!(vm.len(), 4);
    for k in [
        "OVERALL/cmc/1",
        "OVERALL/cmc/5",
        "OVERALL/precision/5",
        "OVERALL/map/5",
        "c0/cmc/1",
    ] {
        assert!(vm[0].value(k).is_some(), "val_metrics has no {k}");
    }
    let model: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("model.json")).unwrap()).unwrap();
    assert_eq!(model["embedding_dim"], 16);
    assert_eq!(
        model["provenance"]["label_map"]["labels"],
        serde_json::json!([0, 1, 2, 3, 4, 5])
    );
    let best_epoch = model["provenance"]["weights"]["epoch"].as_i64().unwrap();
    let best_row = vm
        .iter()
        .find(|r| r.int("epoch") == Some(best_epoch))
        .unwrap();
    // The resolved config reads back as the same config.
    let resolved = simile::train::Config::load(&out.join("config.toml"), &[]).unwrap();
    assert_eq!(resolved.epochs, 3);

    // embed + distance + score on the model folder give the validation numbers.
    let m = common::stage_metrics(&ds, &out, e.dir.path());
    for k in ["OVERALL/cmc/1", "OVERALL/precision/5", "OVERALL/map/5"] {
        let want = best_row.value(k).unwrap();
        let got = m[k]
            .as_f64()
            .unwrap_or_else(|| panic!("metrics.json has no {k}: {m}"));
        assert!(
            (got - want).abs() < 1e-9,
            "{k}: score {got} vs training {want}"
        );
    }

    // A second run on the same data reuses the image cache; the same run again is up to date.
    let out2 = e.dir.path().join("model2");
    let mut args = fontid_args(s(&ds), s(&out2), s(&cfg));
    args.extend(["--set", "epochs=1", "--set", "valid_at_start=false"]);
    let r = train(&e, &args);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("from the cache"), "{}", r.stderr);
    let r = train(&e, &args);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("is up to date"), "{}", r.stderr);
}

fn tensors(p: &Path) -> Vec<(String, Vec<f32>)> {
    let mut v: Vec<(String, Vec<f32>)> = tch::Tensor::read_safetensors(p)
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn resume_after_a_stop_ends_like_an_uninterrupted_run() {
    resume_ends_like_an_uninterrupted_run("fp32");
}

#[test]
fn resume_under_bf16_autocast_ends_like_an_uninterrupted_run() {
    resume_ends_like_an_uninterrupted_run("bf16");
}

/// fp16 with its loss scaler, on the CPU through the test hook (CUDA's path otherwise).
#[test]
fn resume_under_fp16_with_the_loss_scaler_ends_like_an_uninterrupted_run() {
    resume_ends_like_an_uninterrupted_run("fp16");
}

fn resume_ends_like_an_uninterrupted_run(compute: &str) {
    let e = env();
    let hook: &[(&str, &str)] = if compute == "fp16" {
        &[("SIMILE_TEST_FP16_ON_CPU", "1")]
    } else {
        &[]
    };
    let train = |e: &Env, args: &[&str]| train_env(e, args, hook);
    let ds = common::striped_dataset(e.dir.path(), 6, 3, 5, false, 12345);
    let cfg = configs().join("fontid.toml");
    // A memory-bank miner and SGD with momentum: their state must survive the checkpoint.
    let extra = [
        "--set",
        "epochs=2",
        "--set",
        "valid_period=1",
        "--set",
        "loss={ name = \"triplet\", margin = \"soft\", miner = { name = \"triplets_with_memory\", \
         bank_size_in_batches = 2, tri_expand_k = 2 } }",
        "--set",
        "optimizer.name=sgd",
        "--set",
        "optimizer.lr=0.05",
        "--set",
        "optimizer.momentum=0.9",
        "--set",
        "schedule={ name = \"multi_step\", milestones = [1] }",
        "--compute",
        compute,
    ];
    let a = e.dir.path().join("a");
    let mut args = fontid_args(s(&ds), s(&a), s(&cfg));
    args.extend(extra);
    let r = train(&e, &args);
    assert_eq!(r.code, 0, "{}", r.stderr);

    let b = e.dir.path().join("b");
    let mut args = fontid_args(s(&ds), s(&b), s(&cfg));
    args.extend(extra);
    let mut stop = args.clone();
    stop.extend(["--stop-after-steps", "3"]);
    let r = train(&e, &stop);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("stopped after step 3"), "{}", r.stdout);
    assert!(!b.join("model.safetensors.manifest.json").exists());
    let st: serde_json::Value =
        serde_json::from_slice(&std::fs::read(b.join("checkpoints/last/state.json")).unwrap())
            .unwrap();
    assert_eq!(st["step"], 3);
    assert_eq!(st["batch_in_epoch"], 1);
    assert!(b.join("checkpoints/last/bank.safetensors").exists());
    let mut resume = args.clone();
    resume.push("--resume");
    let r = train(&e, &resume);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("resuming"), "{}", r.stderr);

    let la = log::read(&a.join("train_log.parquet"), &["epoch", "step"]).unwrap();
    let lb = log::read(&b.join("train_log.parquet"), &["epoch", "step"]).unwrap();
    assert_eq!(la.len(), lb.len());
    if compute == "fp16" {
        // The scale went through the checkpoint: every step's equal in both runs.
        for (x, y) in la.iter().zip(&lb) {
            let s = x.value("loss_scale").expect("fp16 logs its loss scale");
            assert_eq!(Some(s), y.value("loss_scale"));
            assert_eq!(x.value("skipped"), y.value("skipped"));
        }
        assert!(st["loss_scaler"]["scale"].as_f64().unwrap() > 0.0, "{st}");
    }
    for (x, y) in la.iter().zip(&lb) {
        let (p, q) = (x.value("loss").unwrap(), y.value("loss").unwrap());
        assert!((p - q).abs() <= 1e-6 * p.abs().max(1.0), "loss {p} vs {q}");
    }
    let va = log::read(&a.join("val_metrics.parquet"), &["epoch", "step"]).unwrap();
    let vb = log::read(&b.join("val_metrics.parquet"), &["epoch", "step"]).unwrap();
    assert_eq!(va.len(), vb.len());
    for (x, y) in va.iter().zip(&vb) {
        for (k, v) in &x.values {
            let w = y.value(k);
            match (v, w) {
                (Some(v), Some(w)) => assert!((v - w).abs() <= 1e-6, "{k}: {v} vs {w}"),
                (None, None) => {}
                _ => panic!("{k}: {v:?} vs {w:?}"),
            }
        }
    }
    for (x, y) in tensors(&a.join("checkpoints/last/model.safetensors"))
        .iter()
        .zip(tensors(&b.join("checkpoints/last/model.safetensors")))
    {
        assert_eq!(x.0, y.0);
        let d =
            x.1.iter()
                .zip(&y.1)
                .map(|(p, q)| (p - q).abs())
                .fold(0f32, f32::max);
        assert!(d <= 1e-6, "{}: max difference {d}", x.0);
    }
}

/// Recipe configs run two steps on tiny inputs (vits16 at 32 px: 4 patches).
#[test]
fn oml_recipes_run_two_steps() {
    let e = env();
    let ds = common::striped_dataset(e.dir.path(), 6, 3, 4, true, 12345);
    for (name, sets) in [
        (
            "cub.toml",
            vec!["sampler.n_labels=2", "sampler.n_instances=2"],
        ),
        (
            "sop.toml",
            vec![
                "sampler.n_categories=2",
                "sampler.n_labels=2",
                "sampler.n_instances=2",
            ],
        ),
        (
            "inshop.toml",
            vec![
                "sampler.n_categories=3",
                "sampler.n_labels=2",
                "sampler.n_instances=2",
            ],
        ),
    ] {
        let out = e.dir.path().join(name);
        let cfg = configs().join(name);
        let mut args: Vec<String> = vec![
            "--dataset".into(),
            s(&ds).into(),
            "--config".into(),
            s(&cfg).into(),
            "--out".into(),
            s(&out).into(),
            "--stop-after-steps".into(),
            "2".into(),
        ];
        for x in sets.iter().chain(&["model.size=32", "batch_size_val=16"]) {
            args.push("--set".into());
            args.push(x.to_string());
        }
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = train(&e, &a);
        assert_eq!(r.code, 0, "{name}: {}", r.stderr);
        assert!(
            r.stdout.contains("stopped after step 2"),
            "{name}: {}",
            r.stdout
        );
        let tl = log::read(&out.join("train_log.parquet"), &["epoch", "step"]).unwrap();
        assert_eq!(tl.len(), 2, "{name}");
        assert!(tl
            .iter()
            .all(|r| r.value("loss").is_some_and(f64::is_finite)));
        if name == "cub.toml" {
            assert!(
                tl[0].value("bank_active_tri").is_some(),
                "{name}: no bank logs"
            );
        }
    }
}

#[test]
fn bf16_compute_trains() {
    let e = env();
    let ds = common::striped_dataset(e.dir.path(), 6, 3, 4, false, 12345);
    let out = e.dir.path().join("m");
    let cfg = configs().join("fontid.toml");
    let mut args = fontid_args(s(&ds), s(&out), s(&cfg));
    args.extend(["--set", "epochs=1", "--compute", "bf16"]);
    let r = train(&e, &args);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let st: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("checkpoints/last/state.json")).unwrap())
            .unwrap();
    assert_eq!(st["compute"], "bf16");
    // Autocast: the weights stay fp32.
    let t = tch::Tensor::read_safetensors(out.join("model.safetensors")).unwrap();
    assert!(t.iter().all(|(_, t)| t.kind() == tch::Kind::Float));
    // A CPU without bf16 kernels is named, one with them is not.
    let slow = !simile::torch_ext::cpu_has_bf16_kernels().unwrap();
    assert_eq!(
        r.stderr.contains("without AVX512 or AMX"),
        slow,
        "{}",
        r.stderr
    );
    // bf16 training differs from fp32 (the convolutions ran in bf16), but not by much.
    let out32 = e.dir.path().join("m32");
    let mut args = fontid_args(s(&ds), s(&out32), s(&cfg));
    args.extend(["--set", "epochs=1"]);
    let r = train(&e, &args);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let l16 = log::read(&out.join("train_log.parquet"), &["epoch", "step"]).unwrap();
    let l32 = log::read(&out32.join("train_log.parquet"), &["epoch", "step"]).unwrap();
    let (a, b) = (l16[0].value("loss").unwrap(), l32[0].value("loss").unwrap());
    assert!(a != b, "bf16 and fp32 gave the same first loss {a}");
    assert!((a - b).abs() < 0.05 * b.abs(), "bf16 {a} vs fp32 {b}");
}

#[test]
fn fp16_is_refused_on_the_cpu() {
    let e = env();
    let ds = common::striped_dataset(e.dir.path(), 6, 3, 4, false, 12345);
    let out = e.dir.path().join("m");
    let cfg = configs().join("fontid.toml");
    let mut args = fontid_args(s(&ds), s(&out), s(&cfg));
    args.extend(["--compute", "fp16"]);
    let r = train(&e, &args);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("needs a CUDA device"), "{}", r.stderr);
    assert!(!out.exists(), "nothing written");
}

#[test]
fn a_diverging_loss_stops_with_a_message_and_keeps_the_checkpoint() {
    let e = env();
    let ds = common::striped_dataset(e.dir.path(), 6, 3, 4, false, 12345);
    let out = e.dir.path().join("m");
    let cfg = configs().join("fontid.toml");
    let mut args = fontid_args(s(&ds), s(&out), s(&cfg));
    args.extend([
        "--set",
        "epochs=3",
        "--set",
        "valid_at_start=false",
        "--set",
        "model.normalise=false",
        "--set",
        "checkpoint_every_steps=1",
        "--set",
        "optimizer.name=sgd",
        "--set",
        "optimizer.lr=1e30",
        "--set",
        "schedule.warmup_epochs=0",
    ]);
    let r = train(&e, &args);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("the loss became"), "{}", r.stderr);
    // Checkpointed after every step: the last checkpoint holds the weights that diverged.
    assert!(
        r.stderr.contains("start over with a lower learning rate"),
        "{}",
        r.stderr
    );
    assert!(out.join("checkpoints/last/state.json").exists());
}

#[test]
fn bad_input_is_refused_before_training() {
    let e = env();
    let ds = common::striped_dataset(e.dir.path(), 4, 2, 3, false, 12345);
    let cfg = configs().join("fontid.toml");
    let out = e.dir.path().join("m");
    let check = |extra: &[&str], want: &str| {
        let mut args = fontid_args(s(&ds), s(&out), s(&cfg));
        args.extend(extra);
        let r = train(&e, &args);
        assert_eq!(r.code, 2, "{extra:?}: {}", r.stderr);
        assert!(r.stderr.contains(want), "{extra:?}: {}", r.stderr);
        assert!(!out.join("train_log.parquet").exists(), "{extra:?} trained");
    };
    check(&["--set", "optimizer.lrr=1"], "did you mean 'optimizer.lr'");
    check(
        &["--set", "sampler.n_label=2"],
        "did you mean 'sampler.n_labels'",
    );
    check(&["--set", "epochs=\"many\""], "'epochs'");
    check(&["--set", "loss.name=tripplet"], "did you mean 'triplet'");
    check(
        &[
            "--set",
            "sampler.name=category_balance",
            "--set",
            "sampler.n_categories=1",
        ],
        "no category",
    );
    check(&["--set", "sampler.n_labels=9"], "n_labels");
    check(&["--resume"], "no checkpoint");
    // No train rows.
    let mut d = Dataset::read(&ds).unwrap();
    for sp in d.split.iter_mut() {
        *sp = Split::Validation;
    }
    d.is_query = vec![Some(true); d.len()];
    d.is_gallery = vec![Some(true); d.len()];
    let ds2 = e.dir.path().join("val_only.parquet");
    d.write(&ds2, e.dir.path()).unwrap();
    let r = train(&e, &fontid_args(s(&ds2), s(&out), s(&cfg)));
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("no train rows"), "{}", r.stderr);
}

/// TensorBoard's own reader on a log folder: {tag: [(step, value)]}.
fn tensorboard_scalars(dir: &Path) -> std::collections::BTreeMap<String, Vec<(i64, f64)>> {
    let out = std::process::Command::new(common::pyextras_python())
        .arg(common::repo_root().join("tests/fixtures_py/read_tensorboard.py"))
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "read_tensorboard.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// When stderr is not a terminal, `--log-every N` prints a line every N steps; `--tensorboard`
/// writes event files that TensorBoard reads back as the run's train_log / val_metrics; a run
/// resumed from a checkpoint (here: twice from the same one, as after a kill past it) leaves
/// each step once in TensorBoard's view.
#[test]
fn log_lines_and_tensorboard_events_follow_the_run() {
    let e = env();
    let ds = common::striped_dataset(e.dir.path(), 6, 3, 4, false, 12345);
    let cfg = configs().join("fontid.toml");
    let a = e.dir.path().join("a");
    let tb = e.dir.path().join("tb");
    let extra = [
        "--set",
        "epochs=2",
        "--set",
        "valid_period=1",
        "--set",
        "valid_at_start=true",
    ];
    let mut args = fontid_args(s(&ds), s(&a), s(&cfg));
    args.extend(extra);
    args.extend(["--log-every", "1", "--tensorboard", s(&tb)]);
    let r = train(&e, &args);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let tl = log::read(&a.join("train_log.parquet"), &["epoch", "step"]).unwrap();
    let n = tl.len();
    assert!(n >= 4, "{n} steps");
    let lines: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.starts_with("simile-train: epoch ") && l.contains(" loss "))
        .collect();
    assert_eq!(lines.len(), n, "{}", r.stderr);
    for (line, row) in lines.iter().zip(&tl) {
        let step = row.int("step").unwrap();
        let epoch = row.int("epoch").unwrap() + 1;
        let head = format!(
            "simile-train: epoch {epoch}/2 step {step}/{n} loss {:.4} lr {:.3e} ",
            row.value("loss").unwrap(),
            row.value("lr").unwrap()
        );
        assert!(line.starts_with(&head), "{line:?} vs {head:?}");
        assert!(line.contains(" img/s ETA "), "{line}");
    }
    let sc = tensorboard_scalars(&tb);
    let loss = &sc["train/loss"];
    assert_eq!(loss.len(), n);
    for ((step, v), row) in loss.iter().zip(&tl) {
        assert_eq!(*step, row.int("step").unwrap());
        let want = row.value("loss").unwrap();
        assert!(
            (v - want).abs() <= 1e-6 * want.abs().max(1.0),
            "{v} vs {want}"
        );
    }
    assert!(sc.contains_key("train/lr") && sc.contains_key("train/grad_norm"));
    let vm = log::read(&a.join("val_metrics.parquet"), &["epoch", "step"]).unwrap();
    let cmc = &sc["OVERALL/cmc/1"];
    assert_eq!(cmc.len(), vm.len());
    assert_eq!(cmc.len(), 3, "before training and after each epoch");
    for ((step, v), row) in cmc.iter().zip(&vm) {
        assert_eq!(*step, row.int("step").unwrap());
        assert!((v - row.value("OVERALL/cmc/1").unwrap()).abs() <= 1e-6);
    }
    // Without --log-every and with stderr not a terminal, lines come every 30 s and at the
    // last step: only that one here.
    let q = e.dir.path().join("q");
    let mut args = fontid_args(s(&ds), s(&q), s(&cfg));
    args.extend(extra);
    let r = train(&e, &args);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let lines: Vec<&str> = r.stderr.lines().filter(|l| l.contains(" loss ")).collect();
    assert_eq!(lines.len(), 1, "{}", r.stderr);
    assert!(
        lines[0].starts_with(&format!("simile-train: epoch 2/2 step {n}/{n} ")),
        "{}",
        lines[0]
    );

    // Stopped at step 3, resumed; then the copy taken at step 3 resumed into the same folder.
    let b = e.dir.path().join("b");
    let tbb = e.dir.path().join("tbb");
    let mut args = fontid_args(s(&ds), s(&b), s(&cfg));
    args.extend(extra);
    args.extend(["--tensorboard", s(&tbb), "--log-every", "off"]);
    let mut stop = args.clone();
    stop.extend(["--stop-after-steps", "3"]);
    assert_eq!(train(&e, &stop).code, 0);
    let b0 = e.dir.path().join("b0");
    let cp = std::process::Command::new("cp")
        .args(["-a", s(&b), s(&b0)])
        .status()
        .unwrap();
    assert!(cp.success());
    let mut resume = args.clone();
    resume.push("--resume");
    let r = train(&e, &resume);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        !r.stderr.contains(" loss "),
        "--log-every off: {}",
        r.stderr
    );
    // A later file name: TensorBoard orders a folder's files by the seconds in their names.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let again: Vec<&str> = resume
        .iter()
        .map(|&x| if x == s(&b) { s(&b0) } else { x })
        .collect();
    let r = train(&e, &again);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let files = std::fs::read_dir(&tbb).unwrap().count();
    assert_eq!(files, 3, "one event file per run");
    let sc = tensorboard_scalars(&tbb);
    let steps: Vec<i64> = sc["train/loss"].iter().map(|p| p.0).collect();
    assert_eq!(steps, (1..=n as i64).collect::<Vec<_>>());
    let tl0 = log::read(&b0.join("train_log.parquet"), &["epoch", "step"]).unwrap();
    for ((_, v), row) in sc["train/loss"].iter().zip(&tl0) {
        let want = row.value("loss").unwrap();
        assert!((v - want).abs() <= 1e-6 * want.abs().max(1.0));
    }
    assert_eq!(sc["OVERALL/cmc/1"].len(), 3);
}
