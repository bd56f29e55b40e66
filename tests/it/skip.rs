//! Stages skip what is done: the real binaries, run twice on a small Font-ID set. A second
//! run says "up to date" and leaves its output untouched; a changed parameter or input content
//! redoes it; `--force` redoes it; an input rewritten with the same bytes is still the same.
use crate::common;

use std::path::{Path, PathBuf};
use std::time::SystemTime;

const PREPARE: &str = env!("CARGO_BIN_EXE_simile-prepare");
const TRAIN: &str = env!("CARGO_BIN_EXE_simile-train");
const EMBED: &str = env!("CARGO_BIN_EXE_simile-embed");
const DISTANCE: &str = env!("CARGO_BIN_EXE_simile-distance");
const SCORE: &str = env!("CARGO_BIN_EXE_simile-score");
const FONTS: &str = "/usr/share/fonts/truetype/aenigma";
const UP_TO_DATE: &str = "is up to date (inputs and parameters unchanged); --force redoes it";

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs a stage with the zoo and image caches inside the temp folder.
    fn run(&self, bin: &str, args: &[&str]) -> common::Run {
        let out = std::process::Command::new(bin)
            .args(args)
            .env("SIMILE_CACHE", self.path("cache"))
            .output()
            .unwrap_or_else(|e| panic!("cannot run {bin}: {e}"));
        common::Run::from(out)
    }

    /// Runs a stage that must do its work (exit 0, no "up to date").
    fn did(&self, bin: &str, args: &[&str]) {
        let r = self.run(bin, args);
        assert_eq!(r.code, 0, "{bin} {args:?}: {}", r.stderr);
        assert!(
            !r.stderr.contains(UP_TO_DATE),
            "{bin} {args:?}: {}",
            r.stderr
        );
    }

    /// Runs a stage that must find `out` up to date and leave it (and `also`) untouched.
    fn skipped(&self, bin: &str, args: &[&str], out: &Path, also: &[&Path]) {
        let files: Vec<&Path> = std::iter::once(out).chain(also.iter().copied()).collect();
        let before: Vec<SystemTime> = files.iter().map(|f| mtime(f)).collect();
        let r = self.run(bin, args);
        assert_eq!(r.code, 0, "{bin} {args:?}: {}", r.stderr);
        let stage = Path::new(bin).file_name().unwrap().to_string_lossy();
        let line = format!("{stage}: {} {UP_TO_DATE}", out.display());
        assert_eq!(r.stderr.trim(), line, "{bin} {args:?}");
        assert!(r.stdout.is_empty(), "{}", r.stdout);
        let after: Vec<SystemTime> = files.iter().map(|f| mtime(f)).collect();
        assert_eq!(before, after, "{bin} touched its outputs");
    }
}

fn mtime(p: &Path) -> SystemTime {
    std::fs::metadata(p)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A Font-ID set of a few fonts at 32 px, made (and checked to be skipped) by simile-prepare.
fn fonts(e: &Env) -> PathBuf {
    let dir = e.path("fontid");
    let args = [
        "fonts",
        "--font-dir",
        FONTS,
        "--max-fonts",
        "10",
        "--size",
        "32",
        "--out",
        s(&dir),
    ];
    e.did(PREPARE, &args);
    let ds = dir.join("dataset.parquet");
    e.skipped(PREPARE, &args, &ds, &[&dir.join("df.csv")]);
    ds
}

#[test]
fn prepare_embed_distance_score_skip_what_is_done() {
    let e = Env {
        dir: tempfile::tempdir().unwrap(),
    };
    let ds = fonts(&e);

    // prepare csv: an input rewritten with the same bytes is the same input; new content is not.
    let csv = e.path("df.csv");
    std::fs::copy(e.path("fontid/df.csv"), &csv).unwrap();
    let ds2 = e.path("csv.parquet");
    let root = e.path("fontid");
    let args = [
        "csv",
        "--csv",
        s(&csv),
        "--root",
        s(&root),
        "--out",
        s(&ds2),
    ];
    e.did(PREPARE, &args);
    e.skipped(PREPARE, &args, &ds2, &[]);
    let text = std::fs::read_to_string(&csv).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&csv, &text).unwrap();
    e.skipped(PREPARE, &args, &ds2, &[]);
    let mut lines: Vec<&str> = text.lines().collect();
    lines.pop();
    std::fs::write(&csv, lines.join("\n") + "\n").unwrap();
    e.did(PREPARE, &args);
    e.skipped(PREPARE, &args, &ds2, &[]);

    // embed: the untrained zoo model; twice, then --force.
    let emb = e.path("emb.npy");
    let ids = e.path("emb.ids.npy");
    let embed = [
        "--dataset",
        s(&ds),
        "--model",
        "smallcnn",
        "--split",
        "validation",
        "--device",
        "cpu",
        "--out",
        s(&emb),
    ];
    e.did(EMBED, &embed);
    e.skipped(EMBED, &embed, &emb, &[&ids]);
    let before = mtime(&emb);
    let mut forced = embed.to_vec();
    forced.push("--force");
    e.did(EMBED, &forced);
    assert_ne!(
        before,
        mtime(&emb),
        "--force did not rewrite {}",
        emb.display()
    );
    e.skipped(EMBED, &embed, &emb, &[&ids]);
    // A lost companion makes the output stale.
    std::fs::remove_file(&ids).unwrap();
    e.did(EMBED, &embed);

    // embed in two shards, then merge: parts and merge skip too.
    let sharded = e.path("sh.npy");
    for i in ["0/2", "1/2"] {
        let mut a = embed.to_vec();
        a[9] = s(&sharded);
        a.extend(["--shard", i]);
        e.did(EMBED, &a);
        let part = e.path(&format!("sh.part-{}-of-2.npy", &i[..1]));
        e.skipped(EMBED, &a, &part, &[]);
    }
    e.did(EMBED, &["merge", "--out", s(&sharded)]);
    e.skipped(EMBED, &["merge", "--out", s(&sharded)], &sharded, &[]);

    // distance: twice; a new k redoes it.
    let nb = e.path("nb.parquet");
    let dist = |k: &'static str| {
        vec![
            "--dataset".to_string(),
            s(&ds).into(),
            "--embeddings".into(),
            s(&emb).into(),
            "--top-k".into(),
            k.into(),
            "--out".into(),
            s(&nb).into(),
        ]
    };
    let d10 = dist("10");
    let d10: Vec<&str> = d10.iter().map(String::as_str).collect();
    e.did(DISTANCE, &d10);
    e.skipped(DISTANCE, &d10, &nb, &[]);
    // Gallery shards and their merge.
    let nbs = e.path("nbs.parquet");
    for i in ["0/3", "1/3", "2/3"] {
        let mut a = d10.clone();
        a[7] = s(&nbs);
        a.extend(["--gallery-shard", i]);
        e.did(DISTANCE, &a);
        e.skipped(
            DISTANCE,
            &a,
            &e.path(&format!("nbs.part-{}-of-3.parquet", &i[..1])),
            &[],
        );
    }
    e.did(DISTANCE, &["merge", "--out", s(&nbs)]);
    e.skipped(DISTANCE, &["merge", "--out", s(&nbs)], &nbs, &[]);

    // score: twice; then new neighbours (another k) are a changed input: redone.
    let mj = e.path("metrics.json");
    let score = ["--dataset", s(&ds), "--neighbors", s(&nb), "--out", s(&mj)];
    e.did(SCORE, &score);
    e.skipped(SCORE, &score, &mj, &[]);
    let d5 = dist("5");
    let d5: Vec<&str> = d5.iter().map(String::as_str).collect();
    e.did(DISTANCE, &d5);
    e.did(SCORE, &score);
    e.skipped(SCORE, &score, &mj, &[]);
    // A new parameter of score alone redoes score.
    let mut cmc = score.to_vec();
    cmc.extend(["--cmc", "1,2"]);
    e.did(SCORE, &cmc);
    e.skipped(SCORE, &cmc, &mj, &[]);
}

#[test]
fn train_keeps_a_finished_run_and_refuses_an_unfinished_one() {
    let e = Env {
        dir: tempfile::tempdir().unwrap(),
    };
    let ds = fonts(&e);
    let cfg = common::repo_root().join("pipelines/configs/fontid.toml");
    let model = e.path("model");
    let cache = e.path("images");
    let args = |out: &Path, more: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "--dataset",
            s(&ds),
            "--config",
            s(&cfg),
            "--out",
            s(out),
            "--device",
            "cpu",
            "--cache-dir",
            s(&cache),
            "--set",
            "epochs=1",
            "--set",
            "valid_at_start=false",
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
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        v.extend(more.iter().map(|x| x.to_string()));
        v
    };
    let weights = model.join("model.safetensors");
    let first = args(&model, &[]);
    e.did(TRAIN, &refs(&first));
    let log = model.join("train_log.parquet");
    e.skipped(TRAIN, &refs(&first), &weights, &[&log]);
    // A changed parameter: the finished run is out of date and trained again from scratch.
    let lr = args(&model, &["--set", "optimizer.lr=5e-4"]);
    let r = e.run(TRAIN, &refs(&lr));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("parameters changed"), "{}", r.stderr);
    e.skipped(TRAIN, &refs(&lr), &weights, &[&log]);
    let mut forced = lr.clone();
    forced.push("--force".into());
    e.did(TRAIN, &refs(&forced));

    // An unfinished run (stopped after a checkpoint) is refused without --resume or --force.
    let other = e.path("model2");
    e.did(TRAIN, &refs(&args(&other, &["--stop-after-steps", "1"])));
    let again = args(&other, &[]);
    let r = e.run(TRAIN, &refs(&again));
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("unfinished") && r.stderr.contains("--resume"),
        "{}",
        r.stderr
    );
    let mut forced = again.clone();
    forced.push("--force".into());
    e.did(TRAIN, &refs(&forced));
    assert!(other.join("model.safetensors.manifest.json").is_file());
}
