//! A hostile new user's findings (issue 26), one test each: fine-tuning a model in place,
//! inputs below an architecture's smallest size, a `.npy` header whose sizes overflow, inputs
//! through symbolic links, output names that belong to another set, short neighbour lists,
//! skipped embeddings, the advice after a diverging loss, two-sided files with splits, the
//! up-to-date check in a read-only place, and the messages that named the wrong thing.
use crate::common::{self, run, run_with, Run};
use crate::integrity::{fx, s, train_args, Fx};
use simile::dataset::Split;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

const PREPARE: &str = env!("CARGO_BIN_EXE_simile-prepare");
const TRAIN: &str = env!("CARGO_BIN_EXE_simile-train");
const EMBED: &str = env!("CARGO_BIN_EXE_simile-embed");
const DISTANCE: &str = env!("CARGO_BIN_EXE_simile-distance");
const SCORE: &str = env!("CARGO_BIN_EXE_simile-score");

fn fontid() -> String {
    s(&common::repo_root().join("pipelines/configs/fontid.toml")).to_string()
}

fn refused(r: &Run, want: &str) {
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains(want), "wanted '{want}' in: {}", r.stderr);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
}

/// Trains a small model into `out`.
fn train_small(f: &Fx, out: &Path, extra: &[&str]) -> Run {
    let cfg = fontid();
    let cache = f.p("imgcache");
    let mut args = train_args(f, s(out), &cfg, extra);
    args.extend(["--set", "epochs=1", "--cache-dir", s(&cache)]);
    f.run(TRAIN, &args, None)
}

/// Row 1: `model.init` (or `pairwise.extractor`) naming `--out` is refused before anything is
/// touched; the model stays whole and readable.
#[test]
fn fine_tuning_into_the_init_folder_is_refused_and_the_model_kept() {
    let f = fx();
    let m = f.p("M");
    assert_eq!(train_small(&f, &m, &[]).code, 0);
    let listing = common::listing(&m);
    let weights = std::fs::read(m.join("model.safetensors")).unwrap();
    let init = format!("model.init=\"{}\"", s(&m));
    let r = train_small(&f, &m, &["--set", &init]);
    refused(&r, "is also the --out folder");
    let pw = common::repo_root().join("pipelines/configs/fontid_pairwise.toml");
    let ext = format!("pairwise.extractor=\"{}\"", s(&m));
    let mut args = train_args(
        &f,
        s(&m),
        s(&pw),
        &["--set", &ext, "--set", "model.init=\"smallcnn\""],
    );
    args.extend(["--set", "model.size=32", "--set", "model.width=8"]);
    refused(&f.run(TRAIN, &args, None), "is also the --out folder");
    assert_eq!(common::listing(&m), listing);
    assert_eq!(std::fs::read(m.join("model.safetensors")).unwrap(), weights);
    // Fine-tuning into another folder works, and a changed init model makes it stale.
    let m2 = f.p("M2");
    assert_eq!(train_small(&f, &m2, &["--set", &init]).code, 0);
    let again = train_small(&f, &m2, &["--set", &init]);
    assert!(again.stderr.contains("is up to date"), "{}", again.stderr);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(m2.join("model.safetensors.manifest.json")).unwrap())
            .unwrap();
    assert!(manifest["inputs"]["init_weights"].is_object(), "{manifest}");
}

/// Row 2: every architecture states its smallest input; smaller is refused (exit 2, the key
/// and the minimum named) in train, import and embed, never a panic.
#[test]
fn inputs_below_an_architectures_smallest_size_are_refused() {
    let f = fx();
    for size in ["1", "4", "7"] {
        let set = format!("model.size={size}");
        let r = train_small(&f, &f.p("m"), &["--set", &set]);
        refused(&r, "config key 'model.size'");
        assert!(r.stderr.contains("smallest input, 8 px"), "{}", r.stderr);
    }
    // resnet18's smallest is 32 px: a 16 px config is refused too.
    let r = train_small(
        &f,
        &f.p("m"),
        &["--set", "model.arch=\"resnet18\"", "--set", "model.size=16"],
    );
    refused(&r, "resnet18's smallest input, 32 px");
    // import: --size below the minimum.
    let pt = f.p("w.pt");
    std::fs::write(&pt, b"not read").unwrap();
    let r = run(
        EMBED,
        &[
            "import",
            "--arch",
            "smallcnn",
            "--weights",
            s(&pt),
            "--size",
            "4",
            "--out",
            s(&f.p("imp")),
        ],
    );
    refused(&r, "--size: 4 is below smallcnn's smallest input, 8 px");
    // A model.json edited by hand to a size below the minimum: refused by embed.
    let m = f.p("M");
    assert_eq!(train_small(&f, &m, &[]).code, 0);
    let mj = m.join("model.json");
    let mut spec: serde_json::Value = serde_json::from_slice(&std::fs::read(&mj).unwrap()).unwrap();
    spec["input"]["size"] = 4.into();
    std::fs::write(&mj, serde_json::to_vec(&spec).unwrap()).unwrap();
    std::fs::remove_file(m.join("model.safetensors.manifest.json")).unwrap();
    let r = f.run(
        EMBED,
        &[
            "--dataset",
            s(&f.ds),
            "--model",
            s(&m),
            "--device",
            "cpu",
            "--out",
            s(&f.p("e.npy")),
        ],
        None,
    );
    refused(&r, "input.size: 4 is below smallcnn's smallest input, 8 px");
}

/// A `.npy` header: magic, version 1.0, the header text padded to 64 bytes.
fn npy_header(descr: &str, shape: &str) -> Vec<u8> {
    let mut h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + h.len() + 1) % 64 != 0 {
        h.push(' ');
    }
    h.push('\n');
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend_from_slice(&(h.len() as u16).to_le_bytes());
    b.extend_from_slice(h.as_bytes());
    b
}

/// Row 3: a header whose element or byte count overflows is refused, not a panic.
#[test]
fn npy_headers_whose_sizes_overflow_are_refused() {
    let f = fx();
    let big = 1u64 << 62;
    let emb = f.p("wrap.npy");
    std::fs::write(&emb, npy_header("<f4", &format!("({big}, {big})"))).unwrap();
    std::fs::write(f.p("wrap.ids.npy"), npy_header("<i8", &format!("({big},)"))).unwrap();
    let r = f.distance(&emb, &f.p("x.parquet"), "5", None);
    refused(&r, "is too large");
    // One dimension alone past the address space, and a count that wraps to a small number.
    for shape in [
        format!("({},)", u64::MAX),
        format!("({}, 4)", (1u64 << 62) + 1),
    ] {
        std::fs::write(&emb, npy_header("<f4", &shape)).unwrap();
        let r = f.distance(&emb, &f.p("x.parquet"), "5", None);
        assert_eq!(r.code, 2, "{shape}: {}", r.stderr);
        assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    }
}

/// Row 4: an input given as a link is checked against the manifest beside its target.
#[test]
fn a_linked_input_is_checked_against_its_targets_manifest() {
    let f = fx();
    let other = f.p("other");
    std::fs::create_dir(&other).unwrap();
    // Embeddings of another dataset (one label fewer), with their manifest, in other/.
    let mut d = simile::dataset::Dataset::read(&f.ds).unwrap();
    d.label[0] = Some(99);
    let ds_b = f.p("b.parquet");
    d.write(&ds_b, f.dir.path()).unwrap();
    let emb_b = other.join("emb.npy");
    let r = f.run(
        EMBED,
        &[
            "--dataset",
            s(&ds_b),
            "--model",
            "smallcnn",
            "--split",
            "validation",
            "--device",
            "cpu",
            "--out",
            s(&emb_b),
        ],
        None,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    // The real paths are refused ...
    let direct = f.distance(&emb_b, &f.p("n0.parquet"), "5", None);
    refused(&direct, "was made from a different dataset");
    // ... and so are links to them.
    let link = f.p("e.npy");
    std::os::unix::fs::symlink(&emb_b, &link).unwrap();
    std::os::unix::fs::symlink(other.join("emb.ids.npy"), f.p("e.ids.npy")).unwrap();
    let r = f.distance(&link, &f.p("n.parquet"), "5", None);
    refused(&r, "was made from a different dataset");
    assert!(!f.p("n.parquet").exists());
    // A link to a set made from this dataset is read as that set.
    let emb_a = other.join("a.npy");
    assert_eq!(f.embed(&emb_a, "validation", None).code, 0);
    let link_a = f.p("ea.npy");
    std::os::unix::fs::symlink(&emb_a, &link_a).unwrap();
    let r = f.distance(&link_a, &f.p("na.parquet"), "5", None);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

/// Embeddings of the validation rows and their one-dataset neighbours (k = 5).
fn searched(f: &Fx) -> (PathBuf, PathBuf) {
    let emb = f.p("emb.npy");
    let nb = f.p("nb.parquet");
    assert_eq!(f.embed(&emb, "validation", None).code, 0);
    let r = f.distance(&emb, &nb, "5", None);
    assert_eq!(r.code, 0, "{}", r.stderr);
    (emb, nb)
}

/// Row 5: `--per-query` outside `--out`'s folder is the user's error (exit 2), in it fine.
#[test]
fn per_query_in_another_folder_is_refused_as_the_users_error() {
    let f = fx();
    let (_, nb) = searched(&f);
    std::fs::create_dir(f.p("other")).unwrap();
    let r = f.score(&nb, &["--per-query", s(&f.p("other/pq.parquet"))]);
    refused(&r, "must be in the folder of --out");
    assert!(!f.p("m.json").exists());
    let r = f.score(&nb, &["--per-query", s(&f.p("./pq.parquet"))]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

/// Row 6: the advice printed after a diverging loss works as printed, and the change of
/// learning rate is recorded in the manifest and the log.
#[test]
fn the_advice_after_a_diverging_loss_works() {
    let f = fx();
    let out = f.p("m");
    // The rate jumps by 1e30 at epoch 1: its first update blows the weights up and the next
    // step's loss is not finite; the last checkpoint (end of epoch 0) is older and good.
    let diverge = [
        "--set",
        "model.normalise=false",
        "--set",
        "optimizer.name=\"sgd\"",
        "--set",
        "optimizer.lr=1e-3",
        "--set",
        "valid_at_start=false",
        "--set",
        "epochs=3",
    ];
    let text = std::fs::read_to_string(fontid()).unwrap();
    let at = text.find("[schedule]").unwrap();
    let rest = &text[at + 1..];
    let end = rest.find("\n[").map(|i| at + 2 + i).unwrap_or(text.len());
    let cfg = f.p("diverge.toml");
    std::fs::write(
        &cfg,
        format!(
            "{}[schedule]\nname = \"multi_step\"\nmilestones = [1]\ngamma = 1e30\n{}",
            &text[..at],
            &text[end..]
        ),
    )
    .unwrap();
    let cfg = s(&cfg).to_string();
    let train_with = |extra: &[&str]| {
        let mut args = train_args(&f, s(&out), &cfg, &diverge);
        args.extend(extra);
        f.run(TRAIN, &args, None)
    };
    let r = train_with(&[]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("the loss became"), "{}", r.stderr);
    // The message's advice, as printed, with a rate 1e30 times lower.
    assert!(
        r.stderr.contains(
            "resume from it with a lower learning rate (--resume --set optimizer.lr=...)"
        ),
        "{}",
        r.stderr
    );
    let r = train_with(&["--resume", "--set", "optimizer.lr=1e-33"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("resuming at step 2 with optimizer.lr = 1e-33 (was 0.001)"),
        "{}",
        r.stderr
    );
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out.join("model.safetensors.manifest.json")).unwrap(),
    )
    .unwrap();
    let ch = &manifest["notes"]["resume_changes"]["optimizer.lr"];
    assert_eq!(ch["to"].as_f64(), Some(1e-33), "{manifest}");
    assert_eq!(ch["from"].as_f64(), Some(1e-3), "{manifest}");
    assert_eq!(ch["at_step"].as_u64(), Some(2), "{manifest}");
    // The log's rate after the resume is the new one (times the schedule's 1e30).
    let log = simile::train::log::read(&out.join("train_log.parquet"), &["epoch", "step"]).unwrap();
    let lr_at = |step: i64| {
        log.iter()
            .find(|r| r.int("step") == Some(step))
            .and_then(|r| r.value("lr"))
            .unwrap()
    };
    assert!((lr_at(1) - 1e-3).abs() < 1e-9);
    assert!((lr_at(3) - 1e-3).abs() < 1e-9, "{}", lr_at(3));
    // Other keys still may not change on resume.
    let r = train_with(&["--resume", "--set", "optimizer.momentum=0.5"]);
    refused(&r, "another config");
    // When the last checkpoint holds the weights that diverged, the advice is to start over.
    let out2 = f.p("m2");
    let mut args = train_args(&f, s(&out2), &cfg, &diverge);
    args.extend(["--set", "checkpoint_every_steps=1"]);
    let r = f.run(TRAIN, &args, None);
    assert!(
        r.stderr
            .contains("start over with a lower learning rate (--force"),
        "{}",
        r.stderr
    );
}

/// Row 7: a two-sided file searched with --query-split/--gallery-split records both splits,
/// and score reads them.
#[test]
fn two_sided_files_with_splits_are_scored() {
    let f = fx();
    let emb = f.p("emb.npy");
    assert_eq!(f.embed(&emb, "validation", None).code, 0);
    let nb = f.p("q.parquet");
    f.ok(
        DISTANCE,
        &[
            "--query-dataset",
            s(&f.ds),
            "--query-embeddings",
            s(&emb),
            "--query-split",
            "validation",
            "--gallery-dataset",
            s(&f.ds),
            "--gallery-embeddings",
            s(&emb),
            "--gallery-split",
            "validation",
            "--device",
            "cpu",
            "--out",
            s(&nb),
            "-k",
            "5",
        ],
    );
    let meta = simile::neighbors::Neighbors::read(&nb).unwrap().meta;
    assert_eq!(meta.query_split.as_deref(), Some("validation"));
    assert_eq!(meta.gallery_split.as_deref(), Some("validation"));
    let r = f.ok(
        SCORE,
        &[
            "--dataset",
            s(&f.ds),
            "--neighbors",
            s(&nb),
            "--gallery-dataset",
            s(&f.ds),
            "--out",
            s(&f.p("m.json")),
        ],
    );
    // 4 validation labels x 5 images: 20 queries.
    assert!(
        r.stdout.contains("20 queries") || r.stderr.contains("20 queries"),
        "{}{}",
        r.stdout,
        r.stderr
    );
}

/// Row 8: an up-to-date output whose lock cannot be taken (here the lock's name is a folder,
/// which no one, root included, can open for writing: as in a read-only folder) is still up
/// to date: exit 0.
#[test]
fn an_up_to_date_output_needs_no_lock() {
    let f = fx();
    let (emb, nb) = searched(&f);
    std::fs::create_dir(f.p(".nb.parquet.lock")).unwrap();
    let r = f.distance(&emb, &nb, "5", None);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("is up to date"), "{}", r.stderr);
    // Work to do: the lock is needed, and its failure is the user's (exit 2).
    let r = f.distance(&emb, &nb, "6", None);
    assert_eq!(r.code, 2, "{}", r.stderr);
}

/// Row 9: an output named like another set's manifest or companion is refused, and that set
/// stays readable.
#[test]
fn outputs_named_like_another_sets_files_are_refused() {
    let f = fx();
    let (emb, nb) = searched(&f);
    let csv = f.p("df.csv");
    std::fs::write(&csv, "label,path\n0,img/0_0.png\n0,img/0_1.png\n").unwrap();
    let r = f.run(
        PREPARE,
        &[
            "csv",
            "--csv",
            s(&csv),
            "--out",
            s(&f.p("ds2.parquet.manifest.json")),
        ],
        None,
    );
    refused(&r, "names a manifest");
    let r = f.embed(&f.p("emb.ids.npy"), "validation", None);
    refused(&r, "is a companion of");
    // A score whose --per-query would overwrite another set's companion.
    let r = f.score(&nb, &["--per-query", s(&f.p("emb.skipped.tsv"))]);
    refused(&r, "is a companion of");
    assert_eq!(f.distance(&emb, &f.p("nb2.parquet"), "5", None).code, 0);
}

/// Row 10: a list shorter than min(k, its candidates) is refused, naming a query.
#[test]
fn lists_cut_after_the_search_are_refused() {
    let f = fx();
    let (_, nb) = searched(&f);
    let full = simile::neighbors::Neighbors::read(&nb).unwrap();
    let mut lists: Vec<(i64, Vec<(i64, f32)>)> = Vec::new();
    for i in 0..full.query_id.len() {
        if full.rank[i] > 2 {
            continue;
        }
        if lists.last().map(|l| l.0) != Some(full.query_id[i]) {
            lists.push((full.query_id[i], Vec::new()));
        }
        lists
            .last_mut()
            .unwrap()
            .1
            .push((full.gallery_id[i], full.distance[i]));
    }
    let cut = f.p("cut.parquet");
    common::write_neighbors(&cut, &full.meta, &lists);
    let r = f.score(&cut, &[]);
    refused(&r, "shorter than min(k = 5");
}

/// Row 11: embeddings with skipped rows: the search names the skip list and what to do.
#[test]
fn skipped_rows_are_explained_by_the_search() {
    let f = fx();
    // Image 0 of validation label 4 (row 20) is corrupt.
    std::fs::write(f.p("img/4_0.png"), b"not a png").unwrap();
    let emb = f.p("emb.npy");
    f.ok(
        EMBED,
        &[
            "--dataset",
            s(&f.ds),
            "--model",
            "smallcnn",
            "--split",
            "validation",
            "--device",
            "cpu",
            "--on-bad-image",
            "skip",
            "--out",
            s(&emb),
        ],
    );
    let r = f.distance(&emb, &f.p("nb.parquet"), "5", None);
    refused(&r, "emb.skipped.tsv");
    assert!(r.stderr.contains("--on-bad-image skip"), "{}", r.stderr);
    assert!(r.stderr.contains("re-run simile-embed"), "{}", r.stderr);
}

/// Row 12: messages that named the wrong thing.
#[test]
fn messages_name_the_right_thing() {
    let f = fx();
    // (a) negative numbers reach the value's own check.
    let r = run(
        PREPARE,
        &[
            "folder",
            "--images",
            s(&f.p("img")),
            "--val-fraction",
            "-0.1",
            "--out",
            s(&f.p("x.parquet")),
        ],
    );
    refused(&r, "--val-fraction -0.1: expected a number in [0, 1]");
    let r = f.distance(&f.p("emb.npy"), &f.p("x.parquet"), "-3", None);
    refused(&r, "-3 is not in 1..=2147483647");
    // A count without a range of its own: said negative, not "unexpected argument".
    let r = run(
        EMBED,
        &[
            "--dataset",
            s(&f.ds),
            "--model",
            "smallcnn",
            "--batch-size",
            "-4",
            "--out",
            "e.npy",
        ],
    );
    refused(&r, "--batch-size <BATCH_SIZE>: -4 is negative");
    // (b) the loss's name key, once.
    let r = train_small(&f, &f.p("m"), &["--set", "loss.name=\"tripplet\""]);
    refused(&r, "config key 'loss.name'");
    assert!(!r.stderr.contains("loss.name.name"), "{}", r.stderr);
    // (c) a bad --set key is blamed on the --set.
    let r = train_small(&f, &f.p("m"), &["--set", "optimizer.lrr=1"]);
    refused(&r, "--set optimizer.lrr=1: unknown config key");
    // (d) resuming on another dataset names the dataset.
    let out = f.p("m");
    let r = train_small(
        &f,
        &out,
        &[
            "--set",
            "checkpoint_every_steps=1",
            "--stop-after-steps",
            "2",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let mut d = simile::dataset::Dataset::read(&f.ds).unwrap();
    d.split[0] = Split::Inference;
    let other = f.p("other.parquet");
    d.write(&other, f.dir.path()).unwrap();
    let cfg = fontid();
    let mut args = train_args(
        &f,
        s(&out),
        &cfg,
        &[
            "--set",
            "epochs=1",
            "--set",
            "checkpoint_every_steps=1",
            "--resume",
        ],
    );
    args[1] = s(&other);
    let r = f.run(TRAIN, &args, None);
    refused(&r, "was written while training on");
    assert!(r.stderr.contains("other.parquet"), "{}", r.stderr);
    assert!(!r.stderr.contains("\"sampler\""), "{}", r.stderr);
    // (e) and (f): a file where a folder is named.
    let file = f.p("a-file");
    std::fs::write(&file, b"x").unwrap();
    let r = train_small(&f, &f.p("m3"), &["--tensorboard", s(&file)]);
    refused(&r, "is a file; --tensorboard names a folder");
    let r = train_small(&f, &file, &[]);
    refused(&r, "is a file; simile-train writes a model folder");
    let ts = f.p("t.pt");
    std::fs::write(&ts, b"x").unwrap();
    let r = run(
        EMBED,
        &[
            "import",
            "--torchscript",
            s(&ts),
            "--size",
            "32",
            "--out",
            s(&file),
        ],
    );
    refused(&r, "is a file; --out names a folder");
    // (g) an I/O error's cause is said once.
    let r = f.run(
        SCORE,
        &[
            "--dataset",
            s(&f.p("missing.parquet")),
            "--neighbors",
            s(&f.p("nb.parquet")),
            "--out",
            s(&f.p("m.json")),
        ],
        None,
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert_eq!(
        r.stderr.matches("No such file or directory").count(),
        1,
        "{}",
        r.stderr
    );
}

/// Rows 13 and 14, as the docs now say: the lock file goes with its writer; prepare and
/// score do not load libtorch_cuda (they do link libtorch_cpu).
#[test]
fn lock_files_go_and_prepare_and_score_do_not_load_cuda() {
    let f = fx();
    searched(&f);
    assert!(!common::listing(f.dir.path())
        .iter()
        .any(|n| n.ends_with(".lock")));
    for bin in [PREPARE, SCORE] {
        let out = std::process::Command::new("readelf")
            .args(["-d", bin])
            .output();
        let Ok(out) = out else { continue };
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!text.contains("libtorch_cuda"), "{bin}: {text}");
        assert!(text.contains("libtorch_cpu"), "{bin}: {text}");
    }
}

/// Also seen: a killed writer that is still a zombie (not reaped) leaves no temp that lasts.
#[test]
fn a_zombie_writers_temp_files_are_removed() {
    let f = fx();
    let (emb, nb) = searched(&f);
    let mut child = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    let pid = child.id();
    child.kill().unwrap();
    // Not reaped yet: a zombie.
    std::thread::sleep(Duration::from_millis(100));
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    assert!(stat.contains(") Z"), "{stat}");
    let temp = f.p(&format!(".nb.parquet.{pid}-0.tmp"));
    std::fs::write(&temp, b"partial").unwrap();
    assert_eq!(f.distance(&emb, &nb, "6", None).code, 0);
    assert!(!temp.exists());
    let _ = child.wait();
}

/// Also seen: a reader that starts while a set is being committed waits for its writer.
#[test]
fn a_reader_during_a_commit_waits_for_the_writer() {
    let f = fx();
    let emb = f.p("emb.npy");
    assert_eq!(f.embed(&emb, "validation", None).code, 0);
    // Re-embed other rows (a new set), pausing after the manifest is renamed into place.
    let cache = f.p("cache");
    let writer = std::process::Command::new(EMBED)
        .args([
            "--dataset",
            s(&f.ds),
            "--model",
            "smallcnn",
            "--split",
            "all",
            "--device",
            "cpu",
            "--out",
            s(&emb),
        ])
        .env("SIMILE_CACHE", &cache)
        .env("SIMILE_TEST_FAULT", "sleep-at:manifest:3000")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the new manifest is in place (the set is half committed).
    let manifest = f.p("emb.npy.manifest.json");
    let before = std::fs::read(&manifest).unwrap();
    for _ in 0..500 {
        if std::fs::read(&manifest).unwrap() != before {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = f.distance(&emb, &f.p("nb.parquet"), "5", None);
    let w = writer.wait_with_output().unwrap();
    assert!(w.status.success());
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("waiting for it to finish"),
        "{}",
        r.stderr
    );
}

/// Also seen: a changed byte in the training image cache is noticed (the cache is rebuilt).
#[test]
fn a_changed_image_cache_is_rebuilt() {
    let f = fx();
    let out = f.p("m");
    assert_eq!(train_small(&f, &out, &[]).code, 0);
    let cache = f.p("imgcache");
    let u8_file = common::listing(&cache)
        .into_iter()
        .find(|n| n.ends_with(".u8"))
        .unwrap();
    let p = cache.join(u8_file);
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&p, &bytes).unwrap();
    let r = train_small(&f, &f.p("m2"), &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("does not match its record"),
        "{}",
        r.stderr
    );
    assert_ne!(std::fs::read(&p).unwrap(), bytes);
}

/// Also seen: `prepare folder` leaves out hidden and empty files and empty label folders
/// without shifting the labels; `prepare csv` warns about repeated images and queries whose
/// positives are all in their own sequence.
#[test]
fn prepare_leaves_out_what_is_no_sample_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img");
    for (label, files) in [("a", 2), ("b", 0), ("c", 2)] {
        std::fs::create_dir_all(img.join(label)).unwrap();
        for k in 0..files {
            image::RgbImage::new(8, 8)
                .save(img.join(label).join(format!("{k}.png")))
                .unwrap();
        }
    }
    std::fs::write(img.join("a/.hidden.png"), b"").unwrap();
    std::fs::write(img.join("c/empty.png"), b"").unwrap();
    std::fs::create_dir_all(img.join(".thumbs")).unwrap();
    let out = dir.path().join("ds.parquet");
    let r = run(
        PREPARE,
        &[
            "folder",
            "--images",
            s(&img),
            "--val-fraction",
            "0",
            "--out",
            s(&out),
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("1 label folder(s) hold no images"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("1 empty (0-byte) image file(s)"),
        "{}",
        r.stderr
    );
    let d = simile::dataset::Dataset::read(&out).unwrap();
    assert_eq!(d.len(), 4);
    assert_eq!(d.label, vec![Some(0), Some(0), Some(1), Some(1)]);
    assert_eq!(
        d.meta.label_names,
        Some(vec!["a".to_string(), "c".to_string()])
    );
    // CSV: line 3 repeats line 2's image; the query on line 4 has positives only in its
    // own sequence.
    let csv = dir.path().join("df.csv");
    std::fs::write(
        &csv,
        "label,path,split,is_query,is_gallery,sequence\n\
         0,img/a/0.png,train,,,\n\
         0,img/a/0.png,train,,,\n\
         1,img/c/0.png,validation,True,True,s1\n\
         1,img/c/1.png,validation,True,True,s1\n\
         2,img/a/1.png,validation,True,True,\n\
         2,img/c/1.png,validation,False,True,\n",
    )
    .unwrap();
    let r = run_with(
        PREPARE,
        &[
            "csv",
            "--csv",
            s(&csv),
            "--out",
            s(&dir.path().join("c.parquet")),
        ],
        &[("SIMILE_CACHE", OsStr::new(s(&dir.path().join("cache"))))],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("2 row(s) repeat the image (path and box) of an earlier row, e.g. line 3"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains("2 validation query row(s) have positives only in their own sequence"),
        "{}",
        r.stderr
    );
}
