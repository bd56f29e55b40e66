//! Cached outputs that can never be silently wrong (docs/conventions.md, "Output sets and the
//! commit order"): the real binaries killed at every point of a commit and at random moments,
//! outputs that would overwrite inputs, content changes the up-to-date check must see, killed
//! training, failing stages, dead writers' litter, two writers of one output, and the messages
//! and exit codes of bad input.
use crate::common;

use crate::common::{run_with, Run};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

const PREPARE: &str = env!("CARGO_BIN_EXE_simile-prepare");
const TRAIN: &str = env!("CARGO_BIN_EXE_simile-train");
const EMBED: &str = env!("CARGO_BIN_EXE_simile-embed");
const DISTANCE: &str = env!("CARGO_BIN_EXE_simile-distance");
const RERANK: &str = env!("CARGO_BIN_EXE_simile-rerank");
const SCORE: &str = env!("CARGO_BIN_EXE_simile-score");
const UP_TO_DATE: &str = "is up to date";
const STALE: &str = "cannot be trusted";

/// A temp folder with a small striped image dataset; stages run with their caches inside it.
pub(crate) struct Fx {
    pub dir: tempfile::TempDir,
    pub ds: PathBuf,
}

pub(crate) fn fx() -> Fx {
    let dir = tempfile::tempdir().unwrap();
    let ds = common::striped_dataset(dir.path(), 4, 4, 5, false, 7);
    Fx { dir, ds }
}

impl Fx {
    pub fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs a stage with the zoo and image caches in the folder, and `fault` (if any) as
    /// `SIMILE_TEST_FAULT`.
    pub fn run(&self, bin: &str, args: &[&str], fault: Option<&str>) -> Run {
        let cache = self.p("cache");
        let mut env: Vec<(&str, &OsStr)> = vec![("SIMILE_CACHE", cache.as_os_str())];
        if let Some(f) = fault {
            env.push(("SIMILE_TEST_FAULT", OsStr::new(f)));
        }
        run_with(bin, args, &env)
    }

    pub fn ok(&self, bin: &str, args: &[&str]) -> Run {
        let r = self.run(bin, args, None);
        assert_eq!(r.code, 0, "{bin} {args:?}: {}", r.stderr);
        r
    }

    pub fn embed(&self, out: &Path, split: &str, fault: Option<&str>) -> Run {
        self.run(
            EMBED,
            &[
                "--dataset",
                s(&self.ds),
                "--model",
                "smallcnn",
                "--split",
                split,
                "--device",
                "cpu",
                "--out",
                s(out),
            ],
            fault,
        )
    }

    pub fn distance(&self, emb: &Path, out: &Path, k: &str, fault: Option<&str>) -> Run {
        self.run(
            DISTANCE,
            &[
                "--dataset",
                s(&self.ds),
                "--embeddings",
                s(emb),
                "--split",
                "validation",
                "--top-k",
                k,
                "--device",
                "cpu",
                "--out",
                s(out),
            ],
            fault,
        )
    }

    /// simile-score of `nb` on the fixture's dataset into `m.json`, with `extra` flags.
    pub fn score(&self, nb: &Path, extra: &[&str]) -> Run {
        let out = self.p("m.json");
        let mut a = vec![
            "--dataset",
            s(&self.ds),
            "--neighbors",
            s(nb),
            "--out",
            s(&out),
        ];
        a.extend_from_slice(extra);
        self.run(SCORE, &a, None)
    }

    fn temps(&self) -> Vec<String> {
        common::listing(self.dir.path())
            .into_iter()
            .filter(|f| f.contains(".tmp"))
            .collect()
    }
}

pub(crate) fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The embed stage killed at each point of its commit (between the renames too) while it
/// replaces an embeddings set with one of other rows: every reader refuses what is left (or
/// reads the old or the new set whole), the litter stays until the next run, which mends all.
#[test]
fn a_kill_at_any_commit_point_leaves_nothing_a_reader_accepts() {
    let f = fx();
    let emb = f.p("emb.npy");
    let nb = f.p("nb.parquet");
    let r = f.embed(&emb, "validation", None);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let clean = f.distance(&emb, &nb, "5", None);
    assert_eq!(clean.code, 0, "{}", clean.stderr);
    let want = std::fs::read(&nb).unwrap();
    for (point, readable) in [
        ("before-commit", true),
        ("manifest", false),
        ("companion", false),
        ("output", true),
    ] {
        // Alternate the row set, so old and new ids differ (validation: 20 rows, all: 40).
        let r = f.embed(&emb, "all", Some(&format!("kill-after:{point}")));
        assert_eq!(r.code, 137, "{point}: not killed: {}", r.stderr);
        let d = f.distance(&emb, &f.p("nb2.parquet"), "5", None);
        let sc = f.score(&nb, &["--embeddings", s(&emb)]);
        if readable {
            assert_eq!(d.code, 0, "{point}: {}", d.stderr);
            assert_eq!(std::fs::read(f.p("nb2.parquet")).unwrap(), want, "{point}");
            simile::manifest::verify(&emb).unwrap();
        } else {
            for (what, r) in [("distance", &d), ("score", &sc)] {
                assert_eq!(r.code, 2, "{point}: {what} accepted a half-replaced set");
                assert!(r.stderr.contains(STALE), "{point} {what}: {}", r.stderr);
                assert!(r.stderr.contains("emb."), "{point} {what}: {}", r.stderr);
            }
        }
        if point != "output" {
            assert!(!f.temps().is_empty(), "{point}: the killed run's temps");
        }
        // The next run of the same output removes the dead run's temps and mends the set.
        let r = f.embed(&emb, "validation", None);
        assert_eq!(r.code, 0, "{point}: {}", r.stderr);
        assert!(f.temps().is_empty(), "{point}: {:?}", f.temps());
        let d = f.distance(&emb, &nb, "5", None);
        assert_eq!(d.code, 0, "{point}: {}", d.stderr);
        assert_eq!(std::fs::read(&nb).unwrap(), want, "{point}");
    }
    // The same for a single-file set: distance killed after its manifest is in place.
    let r = f.distance(&emb, &nb, "7", Some("kill-after:manifest"));
    assert_eq!(r.code, 137);
    let sc = f.score(&nb, &[]);
    assert_eq!(sc.code, 2, "{}", sc.stderr);
    assert!(
        sc.stderr.contains("nb.parquet does not match"),
        "{}",
        sc.stderr
    );
}

/// SIGKILL at random moments of embed runs that alternate two row sets: whatever is left, a
/// reader either refuses it (exit 2) or reads a set whose files all match its manifest.
#[test]
fn random_kills_never_leave_a_mixed_set() {
    let f = fx();
    let emb = f.p("emb.npy");
    f.embed(&emb, "validation", None);
    let cache = f.p("cache");
    let mut seed = common::Rng(99);
    let mut refused = 0;
    for round in 0..10 {
        let split = if round % 2 == 0 { "all" } else { "validation" };
        let mut child = std::process::Command::new(EMBED)
            .args([
                "--dataset",
                s(&f.ds),
                "--model",
                "smallcnn",
                "--split",
                split,
                "--device",
                "cpu",
                "--force",
                "--out",
                s(&emb),
            ])
            .env("SIMILE_CACHE", &cache)
            // A pause inside the commit makes some kills land between its renames.
            .env("SIMILE_TEST_FAULT", "sleep-at:companion:300")
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(100 + seed.below(1500)));
        let _ = child.kill();
        let _ = child.wait();
        let d = f.distance(&emb, &f.p("nb.parquet"), "5", None);
        match d.code {
            0 => {
                simile::manifest::verify(&emb).expect("a set a reader accepted verifies");
            }
            2 => {
                refused += 1;
                assert!(
                    d.stderr.contains(STALE) || d.stderr.contains("No such file"),
                    "round {round}: {}",
                    d.stderr
                );
            }
            c => panic!("round {round}: exit {c}: {}", d.stderr),
        }
    }
    // The run after the kills mends whatever they left.
    let r = f.embed(&emb, "validation", None);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let d = f.distance(&emb, &f.p("nb.parquet"), "5", None);
    assert_eq!(d.code, 0, "{}", d.stderr);
    eprintln!("{refused} of 10 kills left a set that readers refused");
}

/// Every stage refuses an output that is one of its inputs or an input's companion, writes
/// nothing, and leaves the input untouched.
#[test]
fn outputs_that_are_inputs_are_refused() {
    let f = fx();
    let emb = f.p("emb.npy");
    let nb = f.p("nb.parquet");
    f.ok(
        EMBED,
        &[
            "--dataset",
            s(&f.ds),
            "--model",
            "smallcnn",
            "--split",
            "validation",
            "--out",
            s(&emb),
        ],
    );
    f.ok(
        DISTANCE,
        &[
            "--dataset",
            s(&f.ds),
            "--embeddings",
            s(&emb),
            "--split",
            "validation",
            "--out",
            s(&nb),
        ],
    );
    let model = f.p("cache/zoo/smallcnn");
    let ids = f.p("emb.ids.npy");
    let csv = f.p("df.csv");
    std::fs::write(
        &csv,
        "label,path,split,is_query,is_gallery\n0,img/0_0.png,train,,\n",
    )
    .unwrap();
    let weights = model.join("model.safetensors");
    let emb_manifest = f.p("emb.npy.manifest.json");
    let metrics = f.p("m.json");
    let cases: Vec<(&str, Vec<&str>, &Path)> = vec![
        (
            EMBED,
            vec![
                "--dataset",
                s(&f.ds),
                "--model",
                "smallcnn",
                "--out",
                s(&f.ds),
            ],
            &f.ds,
        ),
        (
            EMBED,
            vec![
                "--dataset",
                s(&f.ds),
                "--model",
                s(&model),
                "--out",
                s(&weights),
            ],
            &weights,
        ),
        (
            DISTANCE,
            vec![
                "--dataset",
                s(&f.ds),
                "--embeddings",
                s(&emb),
                "--split",
                "validation",
                "--out",
                s(&ids),
            ],
            &ids,
        ),
        (
            DISTANCE,
            vec![
                "--dataset",
                s(&f.ds),
                "--embeddings",
                s(&emb),
                "--split",
                "validation",
                "--out",
                s(&emb_manifest),
            ],
            &emb_manifest,
        ),
        (
            RERANK,
            vec![
                "--dataset",
                s(&f.ds),
                "--neighbors",
                s(&nb),
                "--method",
                "aqe",
                "--embeddings",
                s(&emb),
                "--out",
                s(&ids),
            ],
            &ids,
        ),
        (
            RERANK,
            vec![
                "--dataset",
                s(&f.ds),
                "--neighbors",
                s(&nb),
                "--method",
                "threshold",
                "--threshold",
                "1.0",
                "--out",
                s(&nb),
            ],
            &nb,
        ),
        (
            SCORE,
            vec![
                "--dataset",
                s(&f.ds),
                "--neighbors",
                s(&nb),
                "--embeddings",
                s(&emb),
                "--fmr",
                "0.1",
                "--out",
                s(&ids),
            ],
            &ids,
        ),
        (
            SCORE,
            vec![
                "--dataset",
                s(&f.ds),
                "--neighbors",
                s(&nb),
                "--out",
                s(&metrics),
                "--per-query",
                s(&f.ds),
            ],
            &f.ds,
        ),
        (
            PREPARE,
            vec!["csv", "--csv", s(&csv), "--out", s(&csv)],
            &csv,
        ),
    ];
    for (bin, args, victim) in cases {
        let before = std::fs::read(victim).unwrap();
        let listing = common::listing(f.dir.path());
        let r = f.run(bin, &args, None);
        assert_eq!(r.code, 2, "{bin} {args:?}: {}", r.stderr);
        assert!(
            r.stderr.contains("would overwrite"),
            "{bin} {args:?}: {}",
            r.stderr
        );
        assert_eq!(std::fs::read(victim).unwrap(), before, "{bin} {args:?}");
        assert_eq!(
            common::listing(f.dir.path()),
            listing,
            "{bin} {args:?} wrote"
        );
    }
    // Training into a folder whose config.toml is the config it reads.
    let out = f.p("model");
    std::fs::create_dir(&out).unwrap();
    let cfg = out.join("config.toml");
    std::fs::copy(
        common::repo_root().join("pipelines/configs/fontid.toml"),
        &cfg,
    )
    .unwrap();
    let r = f.run(TRAIN, &train_args(&f, s(&out), s(&cfg), &[]), None);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("would overwrite"), "{}", r.stderr);
}

/// Rewrites a file with `edit` applied, keeping its size and modification time.
fn edit_in_place(path: &Path, edit: impl FnOnce(&mut Vec<u8>)) {
    let mtime = std::fs::metadata(path).unwrap().modified().unwrap();
    let mut bytes = std::fs::read(path).unwrap();
    let n = bytes.len();
    edit(&mut bytes);
    assert_eq!(bytes.len(), n);
    std::fs::write(path, &bytes).unwrap();
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
}

/// The up-to-date check sees content: a changed pixel (same file size and time) redoes embed,
/// and a value changed inside an embeddings file is refused (its manifest no longer matches) or,
/// for a file no stage made, makes the neighbours stale.
#[test]
fn content_changes_are_seen_by_the_up_to_date_check() {
    let f = fx();
    let emb = f.p("emb.npy");
    assert_eq!(f.embed(&emb, "validation", None).code, 0);
    let again = f.embed(&emb, "validation", None);
    assert!(again.stderr.contains(UP_TO_DATE), "{}", again.stderr);
    let before = std::fs::read(&emb).unwrap();
    // One pixel of one validation image; the file keeps its modification time.
    let img = f.p("img/5_0.png");
    let mtime = std::fs::metadata(&img).unwrap().modified().unwrap();
    let mut im = image::open(&img).unwrap().to_rgb8();
    let px = im.get_pixel_mut(3, 3);
    px.0[0] = px.0[0].wrapping_add(90);
    im.save(&img).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&img)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let redo = f.embed(&emb, "validation", None);
    assert_eq!(redo.code, 0, "{}", redo.stderr);
    assert!(!redo.stderr.contains(UP_TO_DATE), "{}", redo.stderr);
    assert_ne!(
        std::fs::read(&emb).unwrap(),
        before,
        "the changed image was not embedded"
    );

    // One float inside emb.npy, same size and time: the set no longer matches its manifest.
    let nb = f.p("nb.parquet");
    assert_eq!(f.distance(&emb, &nb, "5", None).code, 0);
    edit_in_place(&emb, |b| {
        let at = b.len() - 4 * 17;
        b[at] ^= 0x40;
    });
    let d = f.distance(&emb, &nb, "5", None);
    assert_eq!(d.code, 2, "{}", d.stderr);
    assert!(d.stderr.contains("emb.npy does not match"), "{}", d.stderr);
    // Taken as the user's own file (manifest deleted): the neighbours are computed again.
    std::fs::remove_file(f.p("emb.npy.manifest.json")).unwrap();
    let d = f.distance(&emb, &nb, "5", None);
    assert_eq!(d.code, 0, "{}", d.stderr);
    assert!(!d.stderr.contains(UP_TO_DATE), "{}", d.stderr);
    // A file with no manifest, changed in place: stale too.
    let again = f.distance(&emb, &nb, "5", None);
    assert!(again.stderr.contains(UP_TO_DATE), "{}", again.stderr);
    edit_in_place(&emb, |b| {
        let at = b.len() / 2;
        b[at] ^= 0x01;
    });
    let d = f.distance(&emb, &nb, "5", None);
    assert_eq!(d.code, 0, "{}", d.stderr);
    assert!(!d.stderr.contains(UP_TO_DATE), "{}", d.stderr);
}

pub(crate) fn train_args<'a>(
    f: &'a Fx,
    out: &'a str,
    cfg: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut v = vec![
        "--dataset",
        s(&f.ds),
        "--config",
        cfg,
        "--out",
        out,
        "--device",
        "cpu",
        "--set",
        "model.size=32",
        "--set",
        "model.width=8",
        "--set",
        "model.dim=16",
        "--set",
        "sampler.n_labels=2",
        "--set",
        "sampler.n_instances=4",
        "--set",
        "epochs=2",
    ];
    v.extend_from_slice(extra);
    v
}

/// A killed simile-train leaves no model a reader takes; a forced re-run of a finished folder,
/// killed, leaves no stale model either; a changed image makes a finished run stale.
#[test]
fn killed_training_leaves_no_model_a_reader_takes() {
    let f = fx();
    let out = f.p("model");
    let cfg = common::repo_root().join("pipelines/configs/fontid.toml");
    let cfg = s(&cfg).to_string();
    let embed_with = |m: &Path| {
        f.run(
            EMBED,
            &[
                "--dataset",
                s(&f.ds),
                "--model",
                s(m),
                "--split",
                "validation",
                "--out",
                s(&f.p("e.npy")),
            ],
            None,
        )
    };
    // Killed at the end of training, just before the model folder is committed.
    let r = f.run(
        TRAIN,
        &train_args(&f, s(&out), &cfg, &[]),
        Some("kill-after:before-commit"),
    );
    assert_eq!(r.code, 137, "{}", r.stderr);
    assert!(out.join("checkpoints").is_dir());
    assert!(!out.join("model.json").exists());
    let e = embed_with(&out);
    assert_eq!(e.code, 2, "{}", e.stderr);
    assert!(
        e.stderr.contains("unfinished simile-train run"),
        "{}",
        e.stderr
    );
    // Resumed, it finishes and the folder is a model.
    let r = f.run(TRAIN, &train_args(&f, s(&out), &cfg, &["--resume"]), None);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(embed_with(&out).code, 0);
    simile::manifest::verify(&out.join("model.safetensors"))
        .unwrap()
        .expect("a finished run has its manifest");
    // A finished folder trained again (--force) and killed mid-way: the old model is gone
    // first, so nothing stale is read.
    let r = f.run(
        TRAIN,
        &train_args(&f, s(&out), &cfg, &["--force"]),
        Some("kill-after:before-commit"),
    );
    assert_eq!(r.code, 137);
    assert!(!out.join("model.json").exists() && !out.join("model.safetensors").exists());
    assert_eq!(embed_with(&out).code, 2);
    let r = f.run(TRAIN, &train_args(&f, s(&out), &cfg, &["--force"]), None);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = f.run(TRAIN, &train_args(&f, s(&out), &cfg, &[]), None);
    assert!(r.stderr.contains(UP_TO_DATE), "{}", r.stderr);
    // A train image's bytes change: the finished run is stale.
    std::fs::write(
        f.p("img/0_0.png"),
        std::fs::read(f.p("img/1_0.png")).unwrap(),
    )
    .unwrap();
    let r = f.run(TRAIN, &train_args(&f, s(&out), &cfg, &[]), None);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("images"), "{}", r.stderr);
    assert!(!r.stderr.contains(UP_TO_DATE), "{}", r.stderr);
}

/// A stage that fails leaves no partial output set: a report that cannot be written leaves no
/// metrics and no per-query table; an output that is a folder leaves no companion.
#[test]
fn a_failing_stage_leaves_no_partial_set() {
    let f = fx();
    let emb = f.p("emb.npy");
    let nb = f.p("nb.parquet");
    assert_eq!(f.embed(&emb, "validation", None).code, 0);
    assert_eq!(f.distance(&emb, &nb, "5", None).code, 0);
    let blocker = f.p("not_a_folder");
    std::fs::write(&blocker, b"x").unwrap();
    let r = f.run(
        SCORE,
        &[
            "--dataset",
            s(&f.ds),
            "--neighbors",
            s(&nb),
            "--out",
            s(&f.p("metrics.json")),
            "--per-query",
            s(&f.p("pq.parquet")),
            "--report",
            s(&blocker.join("report.html")),
        ],
        None,
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("not_a_folder"), "{}", r.stderr);
    for left in ["metrics.json", "metrics.json.manifest.json", "pq.parquet"] {
        assert!(!f.p(left).exists(), "{left} was left by a failed run");
    }
    let folder = f.p("a_folder");
    std::fs::create_dir(&folder).unwrap();
    let r = f.embed(&folder, "validation", None);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("is a folder"), "{}", r.stderr);
    assert!(!f.p("a_folder.ids.npy").exists());
    assert!(f.temps().is_empty(), "{:?}", f.temps());
}

/// Two runs writing one output at once: the second waits for the first's lock, then finds the
/// output up to date (same parameters) or writes its own set whole (other parameters).
#[test]
fn two_writers_of_one_output_never_mix() {
    let f = fx();
    let emb = f.p("emb.npy");
    assert_eq!(f.embed(&emb, "validation", None).code, 0);
    let nb = f.p("nb.parquet");
    let cache = f.p("cache");
    for (k_first, k_second) in [("5", "5"), ("5", "8")] {
        let _ = std::fs::remove_file(&nb);
        let first = std::process::Command::new(DISTANCE)
            .args([
                "--dataset",
                s(&f.ds),
                "--embeddings",
                s(&emb),
                "--split",
                "validation",
                "--top-k",
                k_first,
                "--device",
                "cpu",
                "--out",
                s(&nb),
            ])
            .env("SIMILE_CACHE", &cache)
            .env("SIMILE_TEST_FAULT", "sleep-at:before-commit:2500")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // The first holds the lock (its lock file exists) before the second starts.
        let lock = f.p(".nb.parquet.lock");
        for _ in 0..300 {
            if lock.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(100));
        let second = f.distance(&emb, &nb, k_second, None);
        let first = first.wait_with_output().unwrap();
        assert!(first.status.success());
        assert_eq!(second.code, 0, "{}", second.stderr);
        assert!(
            second.stderr.contains("waiting for it to finish"),
            "{}",
            second.stderr
        );
        let m = simile::manifest::verify(&nb).unwrap().unwrap();
        if k_first == k_second {
            assert!(second.stderr.contains(UP_TO_DATE), "{}", second.stderr);
        } else {
            assert!(!second.stderr.contains(UP_TO_DATE), "{}", second.stderr);
            assert_eq!(m.params["k"], 8);
        }
        assert!(!f.p(".nb.parquet.lock").exists(), "the lock file stays");
    }
}

/// Line numbers are right for CRLF and LF endings and after a quoted field spanning lines.
#[test]
fn csv_errors_name_the_right_line() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..4 {
        image::RgbImage::new(8, 8)
            .save(dir.path().join(format!("{i}.png")))
            .unwrap();
    }
    let body = [
        "label,path,split,is_query,is_gallery,category",
        "0,0.png,train,,,\"two\nlines\"",
        "0,1.png,train,,,a",
        "x,2.png,train,,,a",
        "1,3.png,train,,,a",
    ];
    for (ending, name) in [("\n", "lf"), ("\r\n", "crlf")] {
        let csv = dir.path().join(format!("{name}.csv"));
        std::fs::write(&csv, body.join(ending) + ending).unwrap();
        let r = run_with(
            PREPARE,
            &[
                "csv",
                "--csv",
                s(&csv),
                "--out",
                s(&dir.path().join("d.parquet")),
            ],
            &[],
        );
        assert_eq!(r.code, 2, "{name}: {}", r.stderr);
        // The bad label is on line 5: the quoted field takes lines 2 and 3.
        assert!(
            r.stderr.contains(&format!("{name}.csv:5: column 'label'")),
            "{name}: {}",
            r.stderr
        );
    }
}

/// Bad input gets one clear message each, and no panic.
#[test]
fn bad_input_messages() {
    let f = fx();
    let csv = f.p("df.csv");
    let prep = |text: &str| {
        std::fs::write(&csv, text).unwrap();
        f.run(
            PREPARE,
            &["csv", "--csv", s(&csv), "--out", s(&f.p("d.parquet"))],
            None,
        )
    };
    // A duplicated header column is named as such.
    let r = prep("label,path,split,is_query,is_gallery,path\n0,img/0_0.png,train,,,x\n");
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("column 'path' appears twice"),
        "{}",
        r.stderr
    );
    // A wrong split is one error, not three.
    let r = prep("label,path,split,is_query,is_gallery\n0,img/0_0.png,val,True,True\n");
    assert_eq!(r.code, 2);
    assert_eq!(r.stderr.matches("df.csv:2:").count(), 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("expected 'train' or 'validation', found 'val'"),
        "{}",
        r.stderr
    );
    // A box reaching outside its image (24 x 24).
    let r = prep(
        "label,path,split,is_query,is_gallery,x_1,x_2,y_1,y_2\n0,img/0_0.png,train,,,0,30,0,10\n",
    );
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("df.csv:2:") && r.stderr.contains("24 x 24"),
        "{}",
        r.stderr
    );
    // --set with a value of the wrong type names the key and the type.
    let cfg = common::repo_root().join("pipelines/configs/fontid.toml");
    let r = f.run(
        TRAIN,
        &[
            "--dataset",
            s(&f.ds),
            "--config",
            s(&cfg),
            "--out",
            s(&f.p("m")),
            "--set",
            "optimizer.lr=abc",
        ],
        None,
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("optimizer.lr"), "{}", r.stderr);
    assert!(r.stderr.contains("a number"), "{}", r.stderr);
    // An empty split embeds nothing.
    let r = f.run(
        EMBED,
        &[
            "--dataset",
            s(&f.ds),
            "--model",
            "smallcnn",
            "--split",
            "inference",
            "--out",
            s(&f.p("e.npy")),
        ],
        None,
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("no rows in split inference"),
        "{}",
        r.stderr
    );
    assert!(!f.p("e.npy").exists());
    // A closed stdout ends `info` quietly (no panic, exit 101).
    let mut child = std::process::Command::new(PREPARE)
        .args(["info", "--dataset", s(&f.ds)])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_ne!(out.status.code(), Some(101), "{err}");
}

/// Score: a query the gallery has candidates for but the file has no rows for is reported;
/// duplicate ids in an embeddings file are refused by every reader alike.
#[test]
fn score_reports_missing_queries_and_refuses_duplicate_ids() {
    let f = fx();
    let emb = f.p("emb.npy");
    let nb = f.p("nb.parquet");
    assert_eq!(f.embed(&emb, "validation", None).code, 0);
    assert_eq!(f.distance(&emb, &nb, "5", None).code, 0);
    // Drop the first query's rows with the library's own writer.
    let full = simile::neighbors::Neighbors::read(&nb).unwrap();
    let cut = f.p("cut.parquet");
    let mut w = simile::neighbors::NeighborsWriter::create(&cut, &full.meta).unwrap();
    let first = full.query_id[0];
    for (q, a, b) in full.groups() {
        if q != first {
            w.push(q, &full.gallery_id[a..b], &full.distance[a..b])
                .unwrap();
        }
    }
    w.finish().unwrap();
    let r = f.ok(
        SCORE,
        &[
            "--dataset",
            s(&f.ds),
            "--neighbors",
            s(&cut),
            "--out",
            s(&f.p("m.json")),
        ],
    );
    assert!(
        r.stderr.contains("1 of 20 queries have no rows") && r.stderr.contains(&first.to_string()),
        "{}",
        r.stderr
    );
    // Duplicate ids: distance and score give the same refusal.
    let dup = f.p("dup.npy");
    std::fs::copy(&emb, &dup).unwrap();
    let mut ids = simile::npy::Npy::open(simile::npy::ids_path(&emb))
        .unwrap()
        .to_i64_vec()
        .unwrap();
    ids[1] = ids[0];
    simile::npy::write_i64(simile::npy::ids_path(&dup), &ids).unwrap();
    let d = f.distance(&dup, &f.p("nb2.parquet"), "5", None);
    let sc = f.run(
        SCORE,
        &[
            "--dataset",
            s(&f.ds),
            "--neighbors",
            s(&nb),
            "--embeddings",
            s(&dup),
            "--fmr",
            "0.1",
            "--out",
            s(&f.p("m2.json")),
        ],
        None,
    );
    for r in [&d, &sc] {
        assert_eq!(r.code, 2, "{}", r.stderr);
        assert!(r.stderr.contains("appears twice"), "{}", r.stderr);
    }
}

/// A full disk is exit 2 (an I/O error on a named file) in every stage, and leaves nothing
/// under the output's name. Needs a small tmpfs (root); says so and returns where it cannot.
#[test]
fn a_full_disk_is_an_io_error_in_every_stage() {
    let f = fx();
    let emb = f.p("emb.npy");
    let nb = f.p("nb.parquet");
    assert_eq!(f.embed(&emb, "validation", None).code, 0);
    assert_eq!(f.distance(&emb, &nb, "5", None).code, 0);
    let full = f.p("full");
    std::fs::create_dir(&full).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8k", "tmpfs", s(&full)])
        .status()
        .is_ok_and(|st| st.success());
    if !mounted {
        eprintln!("SKIPPED a_full_disk_is_an_io_error_in_every_stage: cannot mount a tmpfs here");
        return;
    }
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _u = Unmount(&full);
    let (e, n, m, pq) = (
        full.join("e.npy"),
        full.join("n.parquet"),
        full.join("m.json"),
        full.join("pq.parquet"),
    );
    let cases: Vec<(&str, Vec<&str>)> = vec![
        (
            EMBED,
            vec![
                "--dataset",
                s(&f.ds),
                "--model",
                "smallcnn",
                "--split",
                "validation",
                "--out",
                s(&e),
            ],
        ),
        (
            DISTANCE,
            vec![
                "--dataset",
                s(&f.ds),
                "--embeddings",
                s(&emb),
                "--split",
                "validation",
                "--top-k",
                "20",
                "--out",
                s(&n),
            ],
        ),
        (
            SCORE,
            vec![
                "--dataset",
                s(&f.ds),
                "--neighbors",
                s(&nb),
                "--out",
                s(&m),
                "--per-query",
                s(&pq),
            ],
        ),
    ];
    // Fill the tmpfs so that no output fits.
    std::fs::write(full.join("filler"), vec![1u8; 6 * 1024]).unwrap();
    for (bin, args) in cases {
        let r = f.run(bin, &args, None);
        assert_eq!(r.code, 2, "{bin}: {}", r.stderr);
        assert!(r.stderr.contains("No space left"), "{bin}: {}", r.stderr);
        let left: Vec<String> = common::listing(&full)
            .into_iter()
            .filter(|n| n != "filler")
            .collect();
        assert!(left.is_empty(), "{bin} left {left:?}");
    }
}
