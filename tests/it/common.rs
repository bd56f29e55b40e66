//! Shared helpers for the integration tests: running the real binaries in temp dirs, and
//! checking real files against the machine-readable schemas in `schemas/`.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs a binary and keeps its exit code, stdout and stderr.
pub fn run(bin: &str, args: &[&str]) -> Run {
    run_with(bin, args, &[])
}

/// Runs a binary with extra environment variables.
pub fn run_with(bin: &str, args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Run {
    Command::new(bin)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {bin}: {e}"))
        .into()
}

/// A finished process: a process killed by a signal reports `code` 128 + the signal, as a
/// shell does (137 for SIGKILL).
impl From<Output> for Run {
    fn from(out: Output) -> Run {
        use std::os::unix::process::ExitStatusExt;
        Run {
            code: out
                .status
                .code()
                .or_else(|| out.status.signal().map(|s| 128 + s))
                .unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Checks a Parquet file's columns (names, types, nullability) and required metadata keys
/// against `schemas/<name>.schema.json`.
pub fn check_against_schema(file: &Path, schema_name: &str) {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let spec: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            repo_root()
                .join("schemas")
                .join(format!("{schema_name}.schema.json")),
        )
        .unwrap(),
    )
    .unwrap();
    let f = std::fs::File::open(file).unwrap();
    let b = ParquetRecordBatchReaderBuilder::try_new(f).unwrap();
    let schema = b.schema().clone();
    let kv: Vec<String> = b
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .map(|v| v.iter().map(|k| k.key.clone()).collect())
        .unwrap_or_default();
    let cols = spec["columns"].as_array().unwrap();
    assert_eq!(
        schema.fields().len(),
        cols.len(),
        "{}: column count differs from schemas/{schema_name}.schema.json",
        file.display()
    );
    for (field, col) in schema.fields().iter().zip(cols) {
        assert_eq!(field.name(), col["name"].as_str().unwrap());
        let ty = match field.data_type() {
            arrow::datatypes::DataType::Int64 => "int64",
            arrow::datatypes::DataType::Int32 => "int32",
            arrow::datatypes::DataType::Float32 => "float32",
            arrow::datatypes::DataType::Float64 => "float64",
            arrow::datatypes::DataType::Utf8 => "utf8",
            arrow::datatypes::DataType::Boolean => "bool",
            other => panic!("unexpected type {other}"),
        };
        assert_eq!(ty, col["type"].as_str().unwrap(), "column {}", field.name());
        assert_eq!(
            field.is_nullable(),
            col["nullable"].as_bool().unwrap(),
            "nullability of column {}",
            field.name()
        );
    }
    for key in spec["metadata_keys"].as_array().unwrap() {
        let key = key.as_str().unwrap();
        assert!(
            kv.iter().any(|k| k == key),
            "{}: missing metadata key {key}",
            file.display()
        );
    }
}

/// Files in a folder (to check that nothing partial was left behind).
pub fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// A small deterministic generator for fixtures (a 64-bit LCG; the same numbers on every
/// machine, no dependency).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    /// Uniform in [-1, 1).
    pub fn f(&mut self) -> f32 {
        (self.next() % (1 << 24)) as f32 / (1 << 23) as f32 - 1.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A dataset of `train` + `val` labels with `per` 24 x 24 images each, written under `dir`: every
/// label is a colour and a stripe frequency, every image a noisy, shifted instance (noise from
/// `seed`); validation labels are queries and gallery; categories `c0..c2` by label on request.
pub fn striped_dataset(
    dir: &Path,
    train: usize,
    val: usize,
    per: usize,
    categories: bool,
    seed: u32,
) -> PathBuf {
    let img = dir.join("img");
    std::fs::create_dir_all(&img).unwrap();
    let n = (train + val) * per;
    let mut state = seed;
    let mut rnd = move || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        state
    };
    for l in 0..train + val {
        for k in 0..per {
            let (r, g, b) = (
                (l * 53 % 256) as u8,
                (l * 97 % 256) as u8,
                (l * 31 % 256) as u8,
            );
            let f = 2 + (l % 5) as u32;
            let shift = rnd() % 5;
            let im = image::RgbImage::from_fn(24, 24, |x, y| {
                let stripe = ((x + shift) / f + y / (1 + (l as u32 % 3))).is_multiple_of(2);
                let noise = (rnd() % 40) as u8;
                if stripe {
                    image::Rgb([r.saturating_add(noise), g, b.saturating_sub(noise)])
                } else {
                    image::Rgb([255 - r, 255 - g.saturating_add(noise), 255 - b])
                }
            });
            let name = format!("img/{l}_{k}.png");
            im.save(dir.join(&name)).unwrap();
        }
    }
    // Row i is image k of label l, i = l * per + k.
    let is_val = |i: usize| i / per >= train;
    DatasetBuilder::new(0..n as i64)
        .label(|i| Some((i / per) as i64))
        .path(|i| Some(format!("img/{}_{}.png", i / per, i % per)))
        .split(|i| {
            if is_val(i) {
                simile::dataset::Split::Validation
            } else {
                simile::dataset::Split::Train
            }
        })
        .flags(|i| (is_val(i).then_some(true), is_val(i).then_some(true)))
        .category(|i| categories.then(|| format!("c{}", (i / per) % 3)))
        .write(&dir.join("dataset.parquet"))
}

/// The path a project script prints (`scripts/<script> <args>`: a Python, a virtualenv, a
/// model folder), the script installing what it names first; a failing script fails the test.
pub fn script_path(script: &str, args: &[&str]) -> PathBuf {
    let out = Command::new(repo_root().join("scripts").join(script))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// The torch Python with the test extras (torchvision, timm, scikit-image, tensorboard, ...),
/// installed once by scripts/bootstrap-pyextras.sh.
pub fn pyextras_python() -> &'static Path {
    static P: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    P.get_or_init(|| script_path("bootstrap-pyextras.sh", &[]))
}

/// The Python of the open-metric-learning 4.0 virtualenv (scripts/bootstrap-oml.sh).
pub fn oml_python() -> PathBuf {
    script_path("bootstrap-oml.sh", &[]).join("bin/python")
}

/// The one dataset builder: `n` rows with ids `ids`, every other column empty (no label, no
/// path or text, split `inference`, no flags), each set by a function of the row's position.
pub struct DatasetBuilder(pub simile::dataset::Dataset);

impl DatasetBuilder {
    pub fn new(ids: impl IntoIterator<Item = i64>) -> Self {
        let ids: Vec<i64> = ids.into_iter().collect();
        let n = ids.len();
        DatasetBuilder(simile::dataset::Dataset {
            ids,
            label: vec![None; n],
            path: vec![None; n],
            text: vec![None; n],
            split: vec![simile::dataset::Split::Inference; n],
            is_query: vec![None; n],
            is_gallery: vec![None; n],
            category: vec![None; n],
            sequence: vec![None; n],
            bbox: vec![None; n],
            ..Default::default()
        })
    }

    fn each<T>(n: usize, f: impl Fn(usize) -> T) -> Vec<T> {
        (0..n).map(f).collect()
    }

    pub fn label(mut self, f: impl Fn(usize) -> Option<i64>) -> Self {
        self.0.label = Self::each(self.0.ids.len(), f);
        self
    }
    pub fn path(mut self, f: impl Fn(usize) -> Option<String>) -> Self {
        self.0.path = Self::each(self.0.ids.len(), f);
        self
    }
    pub fn text(mut self, f: impl Fn(usize) -> Option<String>) -> Self {
        self.0.text = Self::each(self.0.ids.len(), f);
        self
    }
    pub fn split(mut self, f: impl Fn(usize) -> simile::dataset::Split) -> Self {
        self.0.split = Self::each(self.0.ids.len(), f);
        self
    }
    /// `is_query` and `is_gallery`.
    pub fn flags(mut self, f: impl Fn(usize) -> (Option<bool>, Option<bool>)) -> Self {
        let v = Self::each(self.0.ids.len(), f);
        self.0.is_query = v.iter().map(|x| x.0).collect();
        self.0.is_gallery = v.iter().map(|x| x.1).collect();
        self
    }
    pub fn category(mut self, f: impl Fn(usize) -> Option<String>) -> Self {
        self.0.category = Self::each(self.0.ids.len(), f);
        self
    }
    pub fn sequence(mut self, f: impl Fn(usize) -> Option<String>) -> Self {
        self.0.sequence = Self::each(self.0.ids.len(), f);
        self
    }
    pub fn bbox(mut self, f: impl Fn(usize) -> Option<[i32; 4]>) -> Self {
        self.0.bbox = Self::each(self.0.ids.len(), f);
        self
    }
    /// `modality` and `source_kind` of the metadata.
    pub fn kind(mut self, modality: &str, source_kind: &str) -> Self {
        self.0.meta.modality = modality.into();
        self.0.meta.source_kind = source_kind.into();
        self
    }
    pub fn build(self) -> simile::dataset::Dataset {
        self.0
    }
    /// Writes `path` (image paths relative to its folder).
    pub fn write(self, path: &Path) -> PathBuf {
        let mut ds = self.0;
        ds.write(path, path.parent().unwrap()).unwrap();
        path.to_path_buf()
    }
}

/// The one neighbours fixture: writes `lists` (per query id, its (gallery id, distance) list)
/// with `meta`.
pub fn write_neighbors(
    path: &Path,
    meta: &simile::neighbors::NeighborsMeta,
    lists: &[(i64, Vec<(i64, f32)>)],
) -> PathBuf {
    let mut w = simile::neighbors::NeighborsWriter::create(path, meta).unwrap();
    for (q, l) in lists {
        let g: Vec<i64> = l.iter().map(|x| x.0).collect();
        let d: Vec<f32> = l.iter().map(|x| x.1).collect();
        w.push(*q, &g, &d).unwrap();
    }
    w.finish().unwrap();
    path.to_path_buf()
}

/// The validation split's metrics through the stages, as a user gets them for a model folder:
/// `simile-embed`, `simile-distance` and `simile-score` on the CPU, in `work`. Returns
/// `metrics.json`'s metrics (the `OVERALL/...` keys).
pub fn stage_metrics(ds: &Path, model: &Path, work: &Path) -> serde_json::Value {
    let (emb, nb, met) = (
        work.join("emb.npy"),
        work.join("nb.parquet"),
        work.join("metrics.json"),
    );
    let p = |x: &Path| x.to_str().unwrap().to_string();
    for (bin, args) in [
        (
            env!("CARGO_BIN_EXE_simile-embed"),
            vec!["--model".to_string(), p(model), "--out".into(), p(&emb)],
        ),
        (
            env!("CARGO_BIN_EXE_simile-distance"),
            vec!["--embeddings".to_string(), p(&emb), "--out".into(), p(&nb)],
        ),
        (
            env!("CARGO_BIN_EXE_simile-score"),
            vec!["--neighbors".to_string(), p(&nb), "--out".into(), p(&met)],
        ),
    ] {
        let mut a = vec!["--dataset".to_string(), p(ds)];
        a.extend(args);
        if !bin.ends_with("simile-score") {
            a.extend(["--split", "validation", "--device", "cpu"].map(String::from));
        }
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let r = run(bin, &a);
        assert_eq!(r.code, 0, "{bin}: {}", r.stderr);
    }
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&met).unwrap()).unwrap();
    if m.get("OVERALL/cmc/1").is_some() {
        m
    } else {
        m["metrics"].clone()
    }
}
