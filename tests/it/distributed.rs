//! Data-parallel simile-train (issue 21): ranks over Gloo on this machine's loopback, through
//! `--nproc` and through torchrun's environment. Two ranks train as one process with the same
//! global batch (without BatchNorm, to 1e-5), with BatchNorm they train as well; a killed
//! rank stops the other with its name and `--resume` ends as the uninterrupted job; ranks
//! given different inputs are refused; ranks on two addresses (two "hosts") meet; a text
//! encoder fine-tunes on two ranks as in one process.
use crate::common::{self, Run};
use crate::integrity::{fx, s, Fx};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TRAIN: &str = env!("CARGO_BIN_EXE_simile-train");

/// A config for the striped fixture (4 train labels of 5 images): batches of 2 labels x 4,
/// two a epoch, validation after the last epoch only.
fn config(f: &Fx, name: &str, arch: &str, loss: &str, epochs: usize) -> PathBuf {
    // SGD for the equality test: Adam's update m / sqrt(v) turns the last-bit differences of
    // a gradient summed in another order into visible ones where gradients are near zero.
    let optimizer = if arch == "vits16" {
        "[optimizer]\nname = \"sgd\"\nlr = 0.01\nmomentum = 0.9\n"
    } else {
        "[optimizer]\nname = \"adamw\"\nlr = 1e-3\n"
    };
    let model = match arch {
        "vits16" => "arch = \"vits16\"\nsize = 16\nnormalise = true\n".to_string(),
        _ => "arch = \"smallcnn\"\nwidth = 8\ndim = 16\nsize = 32\nnormalise = true\n".to_string(),
    };
    let loss = match loss {
        "arcface" => "[loss]\nname = \"arcface\"\nm = 0.3\ns = 16.0\n".to_string(),
        _ => "[loss]\nname = \"triplet\"\nmargin = 0.2\n\n[loss.miner]\nname = \"hard_triplets\"\n"
            .to_string(),
    };
    let text = format!(
        "seed = 3\nepochs = {epochs}\nvalid_period = 0\nvalid_at_start = false\nbatch_size_val = 64\ncheckpoint_every_steps = 1\n\n[model]\n{model}\n[sampler]\nname = \"balance\"\nn_labels = 2\nn_instances = 4\n\n{loss}\n{optimizer}\n[schedule]\nname = \"constant\"\n"
    );
    let p = f.p(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn args<'a>(f: &'a Fx, cfg: &'a Path, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    args_on(&f.ds, cfg, out, extra)
}

/// [`args`] on another dataset.
fn args_on<'a>(ds: &'a Path, cfg: &'a Path, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "--dataset",
        s(ds),
        "--config",
        s(cfg),
        "--out",
        s(out),
        "--device",
        "cpu",
    ];
    v.extend_from_slice(extra);
    v
}

fn cmd(f: &Fx, a: &[&str]) -> Command {
    let mut c = Command::new(TRAIN);
    c.args(a)
        .env("SIMILE_CACHE", f.p("cache"))
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn ok(f: &Fx, a: &[&str]) -> Run {
    let r: Run = cmd(f, a).output().unwrap().into();
    assert_eq!(r.code, 0, "{a:?}: {}", r.stderr);
    r
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One rank of a job of `world` ranks, started by hand as torchrun would.
fn rank(f: &Fx, a: &[&str], r: usize, world: usize, port: u16, env: &[(&str, &str)]) -> Child {
    let mut c = cmd(f, a);
    c.env("RANK", r.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("SIMILE_DIST_TIMEOUT", "10");
    for (k, v) in env {
        c.env(k, v);
    }
    c.spawn().unwrap()
}

/// Waits for every rank; asserts each exited with `code`, showing every rank's stderr.
fn wait_all(children: Vec<Child>, code: i32) -> Vec<Run> {
    let runs: Vec<Run> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap().into())
        .collect();
    let all: String = runs
        .iter()
        .enumerate()
        .map(|(r, o)| format!("--- rank {r} (exit {}):\n{}", o.code, o.stderr))
        .collect();
    assert!(
        runs.iter().all(|o| o.code == code),
        "wanted exit {code}:\n{all}"
    );
    runs
}

fn losses(out: &Path) -> Vec<f64> {
    simile::train::log::read(&out.join("train_log.parquet"), &["epoch", "step"])
        .unwrap()
        .iter()
        .map(|r| r.value("loss").unwrap())
        .collect()
}

fn weights(file: &Path) -> Vec<(String, Vec<f32>)> {
    let mut v: Vec<(String, Vec<f32>)> = tch::Tensor::read_safetensors(file)
        .unwrap()
        .into_iter()
        .map(|(n, t)| {
            let t = t.to_kind(tch::Kind::Float).flatten(0, -1);
            (n, Vec::<f32>::try_from(&t).unwrap())
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn max_diff(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut d = 0f32;
    for ((na, va), (nb, vb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        assert_eq!(va.len(), vb.len(), "{na}");
        for (x, y) in va.iter().zip(vb) {
            d = d.max((x - y).abs());
        }
    }
    d
}

/// Without BatchNorm (a ViT), two ranks with the gathered batch and summed gradients train
/// as one process does: per-step losses and final weights within 1e-5 after 20 steps, for
/// the triplet loss with the hard miner and for ArcFace (whose own matrix is averaged).
#[test]
fn two_ranks_train_as_one_process() {
    let f = fx();
    for loss in ["triplet", "arcface"] {
        let cfg = config(&f, &format!("{loss}.toml"), "vits16", loss, 10);
        let one = f.p(&format!("one-{loss}"));
        let two = f.p(&format!("two-{loss}"));
        ok(&f, &args(&f, &cfg, &one, &["--threads", "1"]));
        let r = ok(
            &f,
            &args(&f, &cfg, &two, &["--nproc", "2", "--threads", "2"]),
        );
        assert!(r.stderr.contains("2 data-parallel ranks"), "{}", r.stderr);
        let (a, b) = (losses(&one), losses(&two));
        assert_eq!(a.len(), 20, "{loss}");
        assert_eq!(a.len(), b.len(), "{loss}");
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!((x - y).abs() < 1e-5, "{loss} step {}: {x} vs {y}", i + 1);
        }
        // The loss moved: the comparison is of a run that learns.
        assert!(a[0] != a[19], "{loss}: {a:?}");
        let d = max_diff(
            &weights(&one.join("model.safetensors")),
            &weights(&two.join("model.safetensors")),
        );
        assert!(d < 1e-5, "{loss}: weights differ by {d}");
    }
}

/// With BatchNorm (per rank, rank 0's buffers broadcast before each forward, as DDP) two
/// ranks train, validate like one process, and write one model folder.
#[test]
fn two_ranks_with_batchnorm_train_and_validate() {
    let f = fx();
    let cfg = config(&f, "bn.toml", "smallcnn", "triplet", 4);
    let one = f.p("one");
    let two = f.p("two");
    ok(&f, &args(&f, &cfg, &one, &["--threads", "1"]));
    ok(
        &f,
        &args(&f, &cfg, &two, &["--nproc", "2", "--threads", "2"]),
    );
    let cmc = |dir: &Path| -> f64 {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("model.json")).unwrap()).unwrap();
        v["provenance"]["weights"]["value"].as_f64().unwrap()
    };
    let (ca, cb) = (cmc(&one), cmc(&two));
    assert!(
        (ca - cb).abs() <= 0.25,
        "CMC@1 one process {ca}, two ranks {cb}"
    );
    assert!(cb > 0.3, "two ranks did not learn: {cb}");
    // One writer: no rank's temporaries or second log are left.
    let files = common::listing(&two);
    assert!(files.contains(&"model.json".to_string()), "{files:?}");
    assert!(!files.iter().any(|n| n.contains(".tmp")), "{files:?}");
    // Up to date: every rank says so and exits 0.
    let again = ok(&f, &args(&f, &cfg, &two, &["--nproc", "2"]));
    assert!(again.stderr.contains("is up to date"), "{}", again.stderr);
}

/// Rank 1 killed after step 3: rank 0 stops within the timeout naming rank 1, the folder holds
/// no model, and `--resume` on both ranks ends with the uninterrupted job's weights.
#[test]
fn a_killed_rank_stops_the_job_and_resume_ends_as_the_uninterrupted_job() {
    let f = fx();
    let cfg = config(&f, "k.toml", "smallcnn", "triplet", 3);
    let whole = f.p("whole");
    let port = free_port();
    let a = args(&f, &cfg, &whole, &["--threads", "1"]);
    let r0 = rank(&f, &a, 0, 2, port, &[]);
    let r1 = rank(&f, &a, 1, 2, port, &[]);
    wait_all(vec![r0, r1], 0);
    let out = f.p("killed");
    let port = free_port();
    let a = args(&f, &cfg, &out, &["--threads", "1"]);
    let t0 = Instant::now();
    let r0 = rank(&f, &a, 0, 2, port, &[]);
    let r1 = rank(
        &f,
        &a,
        1,
        2,
        port,
        &[("SIMILE_TEST_FAULT", "kill-after:step-3")],
    );
    let o1: Run = r1.wait_with_output().unwrap().into();
    assert_eq!(o1.code, 137, "{}", o1.stderr);
    let o0: Run = r0.wait_with_output().unwrap().into();
    assert!(t0.elapsed() < Duration::from_secs(40), "{:?}", t0.elapsed());
    assert_eq!(o0.code, 1, "{}", o0.stderr);
    assert!(o0.stderr.contains("rank 1 stopped"), "{}", o0.stderr);
    assert!(!out.join("model.json").exists());
    assert!(!out.join("model.safetensors").exists());
    // Resume both ranks.
    let port = free_port();
    let mut a = args(&f, &cfg, &out, &["--threads", "1"]);
    a.push("--resume");
    let r0 = rank(&f, &a, 0, 2, port, &[]);
    let r1 = rank(&f, &a, 1, 2, port, &[]);
    wait_all(vec![r0, r1], 0);
    let d = max_diff(
        &weights(&whole.join("model.safetensors")),
        &weights(&out.join("model.safetensors")),
    );
    assert!(d <= 1e-6, "resumed weights differ by {d}");
    assert_eq!(losses(&whole), losses(&out));
    // The launcher names the dead rank too and returns its code.
    let out2 = f.p("killed2");
    let mut c = cmd(&f, &args(&f, &cfg, &out2, &["--nproc", "2"]));
    c.env("SIMILE_TEST_FAULT", "kill-after:step-2")
        .env("SIMILE_DIST_TIMEOUT", "10");
    let r: Run = c.output().unwrap().into();
    assert_eq!(r.code, 137, "{}", r.stderr);
    assert!(r.stderr.contains("was killed by signal 9"), "{}", r.stderr);
}

/// Ranks started with different configs are refused at start (exit 2, the rank and the value
/// named) and nothing is written.
#[test]
fn ranks_with_different_inputs_are_refused_and_write_nothing() {
    let f = fx();
    let cfg = config(&f, "m.toml", "smallcnn", "triplet", 2);
    let out = f.p("m");
    let port = free_port();
    let a0 = args(&f, &cfg, &out, &["--threads", "1"]);
    let a1 = args(&f, &cfg, &out, &["--threads", "1", "--set", "epochs=3"]);
    let r0 = rank(&f, &a0, 0, 2, port, &[]);
    let r1 = rank(&f, &a1, 1, 2, port, &[]);
    for o in wait_all(vec![r0, r1], 2) {
        assert!(
            o.stderr.contains("were started with different configs"),
            "{}",
            o.stderr
        );
    }
    assert!(!out.exists(), "{:?}", common::listing(&out));
    // A batch that does not split over the ranks.
    let odd = config(&f, "odd.toml", "smallcnn", "triplet", 2);
    let text = std::fs::read_to_string(&odd)
        .unwrap()
        .replace("n_instances = 4", "n_instances = 3");
    std::fs::write(&odd, text).unwrap();
    let r: Run = cmd(&f, &args(&f, &odd, &out, &["--nproc", "4"]))
        .output()
        .unwrap()
        .into();
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("does not split over 4 ranks"),
        "{}",
        r.stderr
    );
    // A rendezvous no one serves: a bounded wait and a clear error.
    let t0 = Instant::now();
    let c = rank(&f, &a0, 1, 2, free_port(), &[("SIMILE_DIST_TIMEOUT", "2")]);
    let o: Run = c.wait_with_output().unwrap().into();
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(o.stderr.contains("did not answer"), "{}", o.stderr);
    assert!(t0.elapsed() < Duration::from_secs(30));
}

/// The backend follows the device (Gloo for CPU ranks, NCCL for CUDA ranks) unless
/// `SIMILE_DIST_BACKEND` names one; what cannot work is refused before anything is written.
#[test]
fn the_backend_follows_the_device_and_impossible_choices_are_refused() {
    let f = fx();
    let cfg = config(&f, "b.toml", "smallcnn", "triplet", 1);
    let out = f.p("b");
    let refused = |env: &[(&str, &str)], device: &str, says: &str| {
        let mut a = args(&f, &cfg, &out, &["--nproc", "2", "--threads", "2"]);
        let at = a.iter().position(|x| *x == "--device").expect("--device");
        a[at + 1] = device;
        let mut c = cmd(&f, &a);
        c.envs(env.iter().copied());
        let r: Run = c.output().unwrap().into();
        assert_eq!(r.code, 2, "{}", r.stderr);
        assert!(
            r.stderr.contains(says),
            "expected {says:?} in: {}",
            r.stderr
        );
        assert!(!out.exists(), "{:?}", common::listing(&out));
    };
    refused(
        &[("SIMILE_DIST_BACKEND", "nccl")],
        "cpu",
        "NCCL runs collectives on CUDA tensors",
    );
    refused(
        &[("SIMILE_DIST_BACKEND", "mpi")],
        "cpu",
        "SIMILE_DIST_BACKEND=\"mpi\": expected gloo or nccl",
    );
    if tch::Cuda::device_count() == 0 {
        refused(&[], "cuda", "no CUDA device");
    }
    let mut c = cmd(
        &f,
        &args(&f, &cfg, &out, &["--nproc", "2", "--threads", "2"]),
    );
    c.env("SIMILE_DIST_BACKEND", "gloo");
    let r: Run = c.output().unwrap().into();
    assert_eq!(r.code, 0, "{}", r.stderr);
    let m: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("model.safetensors.manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(m["notes"]["data_parallel"]["backend"], "gloo", "{m}");
    assert_eq!(m["notes"]["data_parallel"]["world_size"], 2, "{m}");
    // A one-rank job whose backend is named runs the data-parallel path (the backend's smoke
    // test, which scripts/gpu-check runs with NCCL); plain WORLD_SIZE=1 trains as one process.
    let one = f.p("one");
    let a = args(&f, &cfg, &one, &["--threads", "1"]);
    let r = rank(
        &f,
        &a,
        0,
        1,
        free_port(),
        &[("SIMILE_DIST_BACKEND", "gloo")],
    );
    wait_all(vec![r], 0);
    let m: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(one.join("model.safetensors.manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(m["notes"]["data_parallel"]["world_size"], 1, "{m}");
    assert_eq!(m["notes"]["data_parallel"]["backend"], "gloo", "{m}");
}

/// Two "hosts": rank 0 on 127.0.0.1, rank 1 on 127.0.0.2, MASTER_ADDR rank 0's address.
#[test]
fn ranks_on_two_addresses_meet() {
    let f = fx();
    let cfg = config(&f, "h.toml", "smallcnn", "triplet", 1);
    let out = f.p("h");
    let port = free_port();
    let a = args(&f, &cfg, &out, &["--threads", "1"]);
    let r0 = rank(&f, &a, 0, 2, port, &[("SIMILE_DIST_ADDRESS", "127.0.0.1")]);
    let r1 = rank(&f, &a, 1, 2, port, &[("SIMILE_DIST_ADDRESS", "127.0.0.2")]);
    wait_all(vec![r0, r1], 0);
    assert!(out.join("model.json").exists());
}

/// The pairwise re-ranker: every rank takes the whole batch (the siamese backbone's features,
/// so BatchNorm sees what one process sees), mines the same pairs and scores its share of
/// them; the parts of the loss add up to the whole batch's. With dropout off, two ranks train
/// as one process.
#[test]
fn the_pairwise_reranker_trains_on_two_ranks_as_in_one_process() {
    let f = fx();
    let ext = f.p("extractor");
    let ecfg = config(&f, "e.toml", "smallcnn", "triplet", 1);
    ok(&f, &args(&f, &ecfg, &ext, &["--threads", "1"]));
    let e = s(&ext);
    let text = format!(
        "seed = 1\nepochs = 2\nvalid_period = 0\nvalid_at_start = false\nbatch_size_val = 64\n\n[model]\narch = \"smallcnn\"\nwidth = 8\ndim = 16\nsize = 32\nnormalise = true\ninit = \"{e}\"\n\n[sampler]\nname = \"balance\"\nn_labels = 2\nn_instances = 4\n\n[optimizer]\nname = \"sgd\"\nlr = 0.01\nmomentum = 0.9\n\n[schedule]\nname = \"constant\"\n\n[pairwise]\nextractor = \"{e}\"\nmlp_hidden = [16]\ndropout = 0.0\nmining = \"hard\"\ntop_n = 3\n"
    );
    let cfg = f.p("pw.toml");
    std::fs::write(&cfg, text).unwrap();
    let one = f.p("pw-one");
    let two = f.p("pw-two");
    ok(&f, &args(&f, &cfg, &one, &["--threads", "1"]));
    ok(
        &f,
        &args(&f, &cfg, &two, &["--nproc", "2", "--threads", "2"]),
    );
    let (a, b) = (losses(&one), losses(&two));
    assert_eq!(a.len(), 4);
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!((x - y).abs() < 1e-5, "step {}: {x} vs {y}", i + 1);
    }
    let d = max_diff(
        &weights(&one.join("model.safetensors")),
        &weights(&two.join("model.safetensors")),
    );
    assert!(d < 1e-5, "weights differ by {d}");
}

/// Texts: each rank tokenizes its share of the batch and pads it to its own longest text, the
/// loss is over the gathered batch; two ranks fine-tune a BERT as one process does (losses and
/// weights within 1e-5 over 24 steps) and validate alike. Dropout 0: each rank draws its own
/// dropout masks (seeded by rank), so with dropout the runs differ by design.
#[test]
fn two_ranks_fine_tune_a_text_encoder_as_one_process() {
    let f = fx();
    let dir = f.p("texts");
    std::fs::create_dir_all(&dir).unwrap();
    let csv = crate::text::text_csv(&dir, 30, 18);
    let ds = dir.join("ds.parquet");
    let r = common::run(
        env!("CARGO_BIN_EXE_simile-prepare"),
        &["csv", "--csv", s(&csv), "--out", s(&ds)],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let init = crate::text::tiny_model_with(&dir, Some(0.0), &["--pooling", "mean", "--normalise"]);
    let cfg = crate::text::text_train_config(&dir, &init, "max_length = 16");
    // SGD for the equality (as `config` above); the rest as the one-process text test.
    let body = std::fs::read_to_string(&cfg).unwrap().replace(
        "name = \"adamw\"\nlr = 1e-3",
        "name = \"sgd\"\nlr = 0.05\nmomentum = 0.9",
    );
    assert!(body.contains("sgd"), "{body}");
    std::fs::write(&cfg, body).unwrap();
    let run = |out: &Path, extra: &[&str]| ok(&f, &args_on(&ds, &cfg, out, extra));
    let (one, two) = (dir.join("one"), dir.join("two"));
    run(&one, &["--threads", "1"]);
    let r = run(&two, &["--nproc", "2", "--threads", "2"]);
    assert!(r.stderr.contains("2 data-parallel ranks"), "{}", r.stderr);
    let (a, b) = (losses(&one), losses(&two));
    assert_eq!(a.len(), 24);
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!((x - y).abs() < 1e-5, "step {}: {x} vs {y}", i + 1);
    }
    assert!(a[23] < 0.5 * a[0], "the run learns: {a:?}");
    let d = max_diff(
        &weights(&one.join("model.safetensors")),
        &weights(&two.join("model.safetensors")),
    );
    assert!(d < 1e-5, "weights differ by {d}");
    let cmc = |out: &Path| -> Vec<f64> {
        simile::train::log::read(&out.join("val_metrics.parquet"), &["epoch", "step"])
            .unwrap()
            .iter()
            .map(|r| r.value("OVERALL/cmc/1").unwrap())
            .collect()
    };
    let (va, vb) = (cmc(&one), cmc(&two));
    assert_eq!(va.len(), 5, "at the start and every 2 epochs: {va:?}");
    assert_eq!(va, vb, "validation on two ranks");
    // The folder is the one process's: a text model with its tokenizer.
    assert_eq!(
        std::fs::read(two.join("tokenizer.json")).unwrap(),
        std::fs::read(init.join("tokenizer.json")).unwrap()
    );
}
