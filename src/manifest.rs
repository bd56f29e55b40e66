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

/// Collects what a stage records while it runs, then writes the manifest.
pub struct ManifestBuilder {
    stage: String,
    params: serde_json::Value,
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
