//! Manifests: `<output>.manifest.json` beside every artifact a stage writes.
//!
//! A manifest records the stage, simile's version and commit, the resolved parameters, each
//! input's path and fingerprint, row counts and timings. Downstream stages read it to refuse
//! inputs made from another version of the data (e.g. an `emb.npy` computed from an older
//! `dataset.parquet`), and the pipeline uses it to skip stages whose inputs did not change.
use crate::error::{Error, Result};
use crate::io::{atomic_write_bytes, Fingerprint};
use crate::shard::ShardSpec;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

pub const MANIFEST_VERSION: u32 = 1;
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const COMMIT: &str = env!("SIMILE_COMMIT");

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct InputRecord {
    pub path: String,
    pub fingerprint: Fingerprint,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ShardRecord {
    pub index: usize,
    pub count: usize,
    /// Half-open range of positions (in id order) this part covers.
    pub start: usize,
    pub end: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub simile_manifest: u32,
    pub stage: String,
    pub simile_version: String,
    pub commit: String,
    /// The artifact's file name (relative to the manifest's folder) and fingerprint.
    pub output: String,
    pub output_fingerprint: Fingerprint,
    /// Further files the artifact consists of (e.g. `emb.ids.npy`), name -> fingerprint.
    #[serde(default)]
    pub companions: BTreeMap<String, Fingerprint>,
    pub params: serde_json::Value,
    /// Facts that follow from the inputs (e.g. the neighbours' k), recorded for people; unlike
    /// `params` they are not compared when deciding whether an output is up to date.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub notes: BTreeMap<String, serde_json::Value>,
    /// Inputs by role ("dataset", "embeddings", "csv", ...).
    pub inputs: BTreeMap<String, InputRecord>,
    #[serde(default)]
    pub rows: BTreeMap<String, u64>,
    #[serde(default)]
    pub shard: Option<ShardRecord>,
    #[serde(default)]
    pub timings_s: BTreeMap<String, f64>,
    pub created_unix_s: u64,
}

/// `<output>.manifest.json`.
pub fn manifest_path(output: &Path) -> PathBuf {
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    output.with_file_name(format!("{name}.manifest.json"))
}

/// Whether [`ManifestBuilder::skip_if_done`] may skip work. Off by default, so library callers
/// (tests, benchmarks) always get fresh outputs; a stage binary turns it on unless `--force`.
static REUSE: AtomicBool = AtomicBool::new(false);

/// Lets this process skip stages whose output is up to date (the binaries call
/// `reuse_up_to_date(!force)` first thing).
pub fn reuse_up_to_date(on: bool) {
    REUSE.store(on, Ordering::Relaxed);
}

/// Why an existing output cannot be reused, or `None` when `m` describes exactly what `b` would
/// write: same stage, version, commit, parameters, input roles and input contents, and the
/// output and every companion still the files the manifest fingerprinted.
fn stale_reason(b: &ManifestBuilder, m: &Manifest, output: &Path) -> Result<Option<String>> {
    if m.stage != b.stage {
        return Ok(Some(format!("written by the {} stage", m.stage)));
    }
    if m.simile_version != VERSION || m.commit != COMMIT {
        return Ok(Some(format!(
            "written by simile {} ({})",
            m.simile_version, m.commit
        )));
    }
    if m.params != b.params {
        return Ok(Some("parameters changed".into()));
    }
    if m.inputs.keys().ne(b.inputs.keys()) {
        return Ok(Some("a different set of inputs".into()));
    }
    for (role, rec) in &b.inputs {
        if !rec.fingerprint.same_content(&m.inputs[role].fingerprint) {
            return Ok(Some(format!("{role} {} changed", rec.path)));
        }
    }
    if let (Some(now), Some(then)) = (&b.shard, &m.shard) {
        if now != then {
            return Ok(Some("a different shard".into()));
        }
    }
    if !fingerprint_matches(output, &m.output_fingerprint)? {
        return Ok(Some(format!("{} changed", output.display())));
    }
    let dir = output.parent().unwrap_or(Path::new(""));
    for c in &b.companions {
        if !m.companions.contains_key(&file_name(c)) {
            return Ok(Some(format!("{} is not recorded", c.display())));
        }
    }
    for (name, fp) in &m.companions {
        if !fingerprint_matches(&dir.join(name), fp)? {
            return Ok(Some(format!("{name} changed or is missing")));
        }
    }
    Ok(None)
}

/// Whether `path` exists with the content `fp` describes.
fn fingerprint_matches(path: &Path, fp: &Fingerprint) -> Result<bool> {
    if !path.is_file() {
        return Ok(false);
    }
    Ok(Fingerprint::of(path, fp.content_hash.is_some())?.same_content(fp))
}

/// Collects what a stage records while it runs, then writes the manifest.
///
/// Skipping what is done: record the parameters and every input *before* the work, then ask
/// [`skip_if_done`](Self::skip_if_done); the rows, timings and shard range follow after it.
///
/// ```ignore
/// simile::manifest::reuse_up_to_date(!args.force); // in the binary's main, first thing
/// // ... in the stage:
/// let mut m = ManifestBuilder::new("rerank", params);
/// m.input("neighbors", &opts.neighbors)?;
/// m.companion(&ids_path); // companions known up front, if any
/// m.skip_if_done(&out)?; // Err(Error::UpToDate): cli::run prints it and exits 0
/// // ... the work, then m.rows(..), m.timing(..), m.write(&out)?
/// ```
pub struct ManifestBuilder {
    stage: String,
    params: serde_json::Value,
    notes: BTreeMap<String, serde_json::Value>,
    inputs: BTreeMap<String, InputRecord>,
    rows: BTreeMap<String, u64>,
    timings: BTreeMap<String, f64>,
    shard: Option<ShardRecord>,
    companions: Vec<PathBuf>,
    started: std::time::Instant,
    verify: bool,
}

impl ManifestBuilder {
    pub fn new(stage: &str, params: serde_json::Value) -> Self {
        ManifestBuilder {
            stage: stage.to_string(),
            params,
            notes: BTreeMap::new(),
            inputs: BTreeMap::new(),
            rows: BTreeMap::new(),
            timings: BTreeMap::new(),
            shard: None,
            companions: Vec::new(),
            started: std::time::Instant::now(),
            verify: false,
        }
    }

    /// Hash whole files rather than sampled blocks (`--verify`).
    pub fn verify(mut self, verify: bool) -> Self {
        self.verify = verify;
        self
    }

    pub fn input(&mut self, role: &str, path: &Path) -> Result<&mut Self> {
        let fp = Fingerprint::of(path, self.verify)?;
        self.inputs.insert(
            role.to_string(),
            InputRecord {
                path: path.display().to_string(),
                fingerprint: fp,
            },
        );
        Ok(self)
    }

    /// Records an input whose fingerprint is already known (e.g. carried from a part's manifest).
    pub fn input_record(&mut self, role: &str, rec: InputRecord) -> &mut Self {
        self.inputs.insert(role.to_string(), rec);
        self
    }

    /// Records a fact that follows from the inputs (see [`Manifest::notes`]).
    pub fn note(&mut self, key: &str, value: serde_json::Value) -> &mut Self {
        self.notes.insert(key.to_string(), value);
        self
    }

    pub fn rows(&mut self, key: &str, n: u64) -> &mut Self {
        self.rows.insert(key.to_string(), n);
        self
    }

    pub fn timing(&mut self, key: &str, seconds: f64) -> &mut Self {
        self.timings.insert(key.to_string(), seconds);
        self
    }

    pub fn shard(&mut self, spec: ShardSpec, start: usize, end: usize) -> &mut Self {
        self.shard = Some(ShardRecord {
            index: spec.index,
            count: spec.count,
            start,
            end,
        });
        self
    }

    pub fn companion(&mut self, path: &Path) -> &mut Self {
        self.companions.push(path.to_path_buf());
        self
    }

    /// Whether `output` already exists with a manifest describing exactly what this builder
    /// would write (see the type's documentation); `Ok(None)` then, else why not. Pure: it
    /// does not look at the [`reuse_up_to_date`] policy.
    pub fn stale(&self, output: &Path) -> Result<Option<String>> {
        if !output.is_file() {
            return Ok(Some(format!("{} does not exist", output.display())));
        }
        let mp = manifest_path(output);
        let Ok(text) = std::fs::read(&mp) else {
            return Ok(Some(format!("{} does not exist", mp.display())));
        };
        let Ok(m) = serde_json::from_slice::<Manifest>(&text) else {
            return Ok(Some(format!("{} is not a simile manifest", mp.display())));
        };
        stale_reason(self, &m, output)
    }

    /// Stops the stage with [`Error::UpToDate`] (the binaries print it and exit 0) when reuse is
    /// on ([`reuse_up_to_date`]) and `output` is up to date; otherwise returns `Ok(())` and the
    /// stage does its work.
    pub fn skip_if_done(&self, output: &Path) -> Result<()> {
        if !REUSE.load(Ordering::Relaxed) || self.stale(output)?.is_some() {
            return Ok(());
        }
        Err(Error::UpToDate(format!(
            "simile-{}: {} is up to date (inputs and parameters unchanged); --force redoes it",
            self.stage,
            output.display()
        )))
    }

    /// Fingerprints the finished output and writes its manifest atomically.
    pub fn write(mut self, output: &Path) -> Result<Manifest> {
        self.timings
            .entry("total".into())
            .or_insert(self.started.elapsed().as_secs_f64());
        let mut companions = BTreeMap::new();
        for c in &self.companions {
            companions.insert(file_name(c), Fingerprint::of(c, self.verify)?);
        }
        let m = Manifest {
            simile_manifest: MANIFEST_VERSION,
            stage: self.stage,
            simile_version: VERSION.to_string(),
            commit: COMMIT.to_string(),
            output: file_name(output),
            output_fingerprint: Fingerprint::of(output, self.verify)?,
            companions,
            params: self.params,
            notes: self.notes,
            inputs: self.inputs,
            rows: self.rows,
            shard: self.shard,
            timings_s: self.timings,
            created_unix_s: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        let json = serde_json::to_vec_pretty(&m).map_err(|e| Error::internal(e.to_string()))?;
        atomic_write_bytes(manifest_path(output), &json)?;
        Ok(m)
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Reads the manifest beside `artifact`, if there is one that still describes it.
///
/// A manifest whose recorded output fingerprint no longer matches the file (the artifact was
/// replaced by another program) is ignored with a warning: it says nothing about this file.
pub fn read_for(artifact: &Path) -> Result<Option<Manifest>> {
    let mp = manifest_path(artifact);
    if !mp.exists() {
        return Ok(None);
    }
    let text = std::fs::read(&mp).map_err(|e| Error::io(&mp, e))?;
    let m: Manifest = serde_json::from_slice(&text).map_err(|e| {
        Error::input(format!(
            "{}: not a simile manifest ({e}); delete it or re-run the stage that wrote {}",
            mp.display(),
            artifact.display()
        ))
    })?;
    let now = Fingerprint::of(artifact, false)?;
    if !now.same_content(&m.output_fingerprint) {
        eprintln!(
            "warning: {} does not describe {} (the file changed since); its checks are skipped",
            mp.display(),
            artifact.display()
        );
        return Ok(None);
    }
    Ok(Some(m))
}

/// Refuses `artifact` when its manifest records an input `role` whose fingerprint differs
/// from the file the user gave now (e.g. embeddings made from another `dataset.parquet`).
pub fn check_upstream(artifact: &Path, role: &str, given: &Path) -> Result<()> {
    let Some(m) = read_for(artifact)? else {
        return Ok(());
    };
    let Some(rec) = m.inputs.get(role) else {
        return Ok(());
    };
    let now = Fingerprint::of(given, false)?;
    if !now.same_content(&rec.fingerprint) {
        return Err(Error::input(format!(
            "{} was made from a different {role}: its manifest records {} ({} bytes, {}), but {} is {} bytes, {}; re-run the `{}` stage on this {role}",
            artifact.display(),
            rec.path,
            rec.fingerprint.size,
            rec.fingerprint.hash,
            given.display(),
            now.size,
            now.hash,
            m.stage
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_names_what_changed() {
        let dir = tempfile::tempdir().unwrap();
        let ds = dir.path().join("dataset.parquet");
        std::fs::write(&ds, b"version one").unwrap();
        let out = dir.path().join("emb.npy");
        let ids = dir.path().join("emb.ids.npy");
        let builder = |k: i64| {
            let mut b = ManifestBuilder::new("embed", serde_json::json!({ "k": k }));
            b.input("dataset", &ds).unwrap();
            b.companion(&ids);
            b
        };
        assert!(builder(1)
            .stale(&out)
            .unwrap()
            .unwrap()
            .contains("does not exist"));
        std::fs::write(&out, b"embeddings").unwrap();
        std::fs::write(&ids, b"ids").unwrap();
        builder(1).write(&out).unwrap();
        assert_eq!(builder(1).stale(&out).unwrap(), None);
        assert_eq!(
            builder(2).stale(&out).unwrap().unwrap(),
            "parameters changed"
        );
        let mut other = ManifestBuilder::new("score", serde_json::json!({ "k": 1 }));
        other.input("dataset", &ds).unwrap();
        assert!(other
            .stale(&out)
            .unwrap()
            .unwrap()
            .contains("written by the embed stage"));
        let mut more = builder(1);
        more.input("weights", &ids).unwrap();
        assert!(more.stale(&out).unwrap().unwrap().contains("inputs"));
        // Reuse is off by default: a library caller always does the work.
        builder(1).skip_if_done(&out).unwrap();
        std::fs::write(&ids, b"other ids").unwrap();
        assert!(builder(1)
            .stale(&out)
            .unwrap()
            .unwrap()
            .contains("emb.ids.npy"));
        std::fs::write(&ids, b"ids").unwrap();
        std::fs::write(&ds, b"version two").unwrap();
        assert!(builder(1).stale(&out).unwrap().unwrap().contains("dataset"));
        std::fs::write(&ds, b"version one").unwrap();
        std::fs::write(&out, b"embeddingz").unwrap();
        assert!(builder(1).stale(&out).unwrap().unwrap().contains("emb.npy"));
    }

    #[test]
    fn upstream_mismatch_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ds = dir.path().join("dataset.parquet");
        std::fs::write(&ds, b"version one").unwrap();
        let out = dir.path().join("emb.npy");
        std::fs::write(&out, b"embeddings").unwrap();
        let mut b = ManifestBuilder::new("embed", serde_json::json!({"k": 1}));
        b.input("dataset", &ds).unwrap();
        b.write(&out).unwrap();
        check_upstream(&out, "dataset", &ds).unwrap();
        std::fs::write(&ds, b"version two!").unwrap();
        let e = check_upstream(&out, "dataset", &ds).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(
            e.to_string().contains("made from a different dataset"),
            "{e}"
        );
        // A replaced artifact makes its manifest stale: ignored, not trusted.
        std::fs::write(&out, b"other embeddings").unwrap();
        assert!(read_for(&out).unwrap().is_none());
    }
}
