//! Manifests: `<output>.manifest.json` beside every artifact a stage writes, and the commit
//! protocol that keeps an artifact, its companions and its manifest one consistent set.
//!
//! A manifest records the stage, simile's version and commit, the resolved parameters, each
//! input's path and fingerprint, the output's and every companion's fingerprint, row counts
//! and timings. Downstream stages read it to refuse inputs made from another version of the
//! data (an `emb.npy` computed from an older `dataset.parquet`) and sets left half-replaced by
//! an interrupted run; the pipeline uses it to skip stages whose inputs did not change.
//!
//! **Commit order** ([`ManifestBuilder::commit`]): every file of the set is written complete
//! under a temporary name first; then the new manifest is renamed into place, recording the
//! new files' fingerprints; then the companions, then the output are renamed over the old
//! ones; then the folder is flushed. A kill at any point leaves either the old set intact, or a
//! manifest that some file does not match: [`verify`] (called by every reader, and by
//! [`ManifestBuilder::input`]) refuses that with exit 2, naming the stale file, and the next
//! run of the stage redoes it.
use crate::error::{Error, Result};
use crate::io::{self, Fingerprint, OutputLock, Sealed};
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
    /// The input's own companions (an `emb.npy`'s `emb.ids.npy`), name -> fingerprint.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub companions: BTreeMap<String, Fingerprint>,
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
    /// Inputs by role ("dataset", "embeddings", "csv", "images", ...).
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
    output.with_file_name(format!("{}.manifest.json", io::file_name(output)))
}

/// The companions an artifact has by convention, whether or not they exist: an embeddings
/// file's ids and skipped-rows list.
fn conventional_companions(path: &Path) -> Vec<PathBuf> {
    let path = &io::resolve_link(path);
    let name = io::file_name(path);
    if name.ends_with(".npy") && !name.ends_with(".ids.npy") {
        vec![crate::npy::ids_path(path), crate::npy::skipped_path(path)]
    } else {
        Vec::new()
    }
}

/// Every file that belongs to the artifact at `path`: itself, its manifest, its conventional
/// companions and those its manifest records; for a folder (a model), the folder's files.
pub fn artifact_files(path: &Path) -> Vec<PathBuf> {
    let mut out = vec![path.to_path_buf()];
    let path = &io::resolve_link(path);
    out.extend([path.to_path_buf(), manifest_path(path)]);
    if path.is_dir() {
        if let Ok(rd) = std::fs::read_dir(path) {
            out.extend(rd.flatten().map(|e| e.path()).filter(|p| p.is_file()));
        }
        return out;
    }
    out.extend(conventional_companions(path));
    if let Some(m) = read_raw(path) {
        let dir = io::parent_dir(path);
        out.extend(m.companions.keys().map(|n| dir.join(n)));
    }
    out
}

/// Refuses (exit 2) outputs that would overwrite any file of the inputs' artifacts (see
/// [`artifact_files`]): for stages and subcommands that check before building a manifest.
pub fn refuse_overlap(inputs: &[(&str, &Path)], outputs: &[&Path]) -> Result<()> {
    let reads: Vec<(String, PathBuf)> = inputs
        .iter()
        .flat_map(|(what, p)| {
            artifact_files(p)
                .into_iter()
                .map(move |f| (format!("the {what}"), f))
        })
        .collect();
    let writes: Vec<PathBuf> = outputs
        .iter()
        .flat_map(|o| {
            let mut v = vec![o.to_path_buf(), manifest_path(o)];
            v.extend(conventional_companions(o));
            v
        })
        .collect();
    io::refuse_overlap(&reads, &writes)
}

/// Refuses (exit 2) an output set that would write over a file of another set in its folder:
/// a manifest (`--out x.parquet.manifest.json`), a conventional companion of an existing
/// artifact (`--out emb.ids.npy` beside `emb.npy`), or a file another manifest records as its
/// companion. That set would be left broken (its readers would refuse it). `writes`: every file
/// the set writes; `output`: the set's own output, whose companions are its own.
pub fn refuse_foreign_files(output: &Path, writes: &[PathBuf]) -> Result<()> {
    let own_manifest = manifest_path(output);
    if io::file_name(output).ends_with(".manifest.json") {
        return Err(Error::input(format!(
            "{}: names a manifest (the record of another output set); choose another --out",
            output.display()
        )));
    }
    let dir = io::parent_dir(output);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(());
    };
    let (out_name, own_manifest) = (io::file_name(output), io::file_name(&own_manifest));
    let mut foreign: Vec<(PathBuf, PathBuf)> = Vec::new();
    for e in entries.flatten() {
        let p = e.path();
        let name = io::file_name(&p);
        if name == out_name || name == own_manifest || !p.is_file() {
            continue;
        }
        if let Some(artifact) = name.strip_suffix(".manifest.json") {
            if artifact == out_name {
                continue;
            }
            let artifact = dir.join(artifact);
            if let Some(m) = read_raw(&artifact) {
                foreign.extend(m.companions.keys().map(|c| (dir.join(c), artifact.clone())));
            }
        } else {
            foreign.extend(
                conventional_companions(&p)
                    .into_iter()
                    .map(|c| (c, p.clone())),
            );
        }
    }
    for w in writes {
        if let Some((_, owner)) = foreign
            .iter()
            .find(|(c, _)| io::file_name(c) == io::file_name(w) && io::same_folder(c, w))
        {
            return Err(Error::input(format!(
                "{}: is a companion of {} (part of its output set); writing it would break that set. Choose another --out",
                w.display(),
                owner.display()
            )));
        }
    }
    Ok(())
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
        let then = &m.inputs[role];
        if !rec.fingerprint.same_content(&then.fingerprint) {
            return Ok(Some(format!("{role} {} changed", rec.path)));
        }
        if rec.companions.keys().ne(then.companions.keys())
            || rec
                .companions
                .iter()
                .any(|(n, fp)| !fp.same_content(&then.companions[n]))
        {
            return Ok(Some(format!(
                "the companions of {role} {} changed",
                rec.path
            )));
        }
    }
    if let (Some(now), Some(then)) = (&b.shard, &m.shard) {
        if now != then {
            return Ok(Some("a different shard".into()));
        }
    }
    if let Some(bad) = mismatch(m, output, &[])? {
        return Ok(Some(format!("{} changed or is missing", bad.display())));
    }
    let dir = io::parent_dir(output);
    for c in &b.companions {
        if c.is_file() && !m.companions.contains_key(&io::file_name(c)) {
            return Ok(Some(format!("{} is not recorded", c.display())));
        }
    }
    for c in &b.stale_files {
        if c.exists() && !m.companions.contains_key(&io::file_name(c)) {
            return Ok(Some(format!("{} is left from another run", c.display())));
        }
    }
    let _ = dir;
    Ok(None)
}

/// Byte ranges of an artifact's files that a reader depends on (file, start, end); files not
/// listed are checked whole.
pub type Ranges = [(PathBuf, u64, u64)];

/// The first file of `m`'s set (the output, then each companion) that is missing or does not
/// have the content `m` recorded (in the byte range `ranges` gives it, if any).
fn mismatch(m: &Manifest, output: &Path, ranges: &Ranges) -> Result<Option<PathBuf>> {
    if !fingerprint_matches(output, &m.output_fingerprint, ranges)? {
        return Ok(Some(output.to_path_buf()));
    }
    let dir = io::parent_dir(output);
    for (name, fp) in &m.companions {
        let p = dir.join(name);
        if !fingerprint_matches(&p, fp, ranges)? {
            return Ok(Some(p));
        }
    }
    Ok(None)
}

/// Whether `path` exists with the content `fp` describes (in its range in `ranges`, if any).
fn fingerprint_matches(path: &Path, fp: &Fingerprint, ranges: &Ranges) -> Result<bool> {
    if !path.is_file() {
        return Ok(false);
    }
    match ranges.iter().find(|(p, _, _)| p == path) {
        Some((_, a, b)) => Ok(fp.contains(&Fingerprint::of_range(path, *a, *b)?)),
        None => Ok(Fingerprint::of(path)?.same_content(fp)),
    }
}

/// Collects what a stage records while it runs, then commits the output set.
///
/// Record the parameters and every input *before* the work, then call
/// [`skip_if_done`](Self::skip_if_done) (it refuses outputs that are inputs, takes the output's
/// lock and stops when the output is up to date); the rows, timings and shard range follow;
/// [`commit`](Self::commit) publishes the sealed files with their manifest.
///
/// ```ignore
/// simile::manifest::reuse_up_to_date(!args.force); // in the binary's main, first thing
/// // ... in the stage:
/// let mut m = ManifestBuilder::new("rerank", params);
/// m.input("neighbors", &opts.neighbors)?;
/// m.companion(&ids_path); // companions known up front
/// m.skip_if_done(&out)?; // Err(Error::UpToDate): cli::run prints it and exits 0
/// // ... the work, writing each file sealed (`NpyWriter::seal`, `io::seal_bytes`, ...)
/// m.rows(..).timing(..);
/// m.commit(sealed_out, vec![sealed_ids])?;
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
    /// Files of an earlier set this run does not produce (a skipped-rows list): removed at
    /// commit so no reader pairs them with the new output.
    stale_files: Vec<PathBuf>,
    /// Every file the stage reads, by what it is (for [`io::refuse_overlap`]).
    reads: Vec<(String, PathBuf)>,
    lock: Option<(PathBuf, OutputLock)>,
    started: std::time::Instant,
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
            stale_files: Vec::new(),
            reads: Vec::new(),
            lock: None,
            started: std::time::Instant::now(),
        }
    }

    pub fn stage(&self) -> &str {
        &self.stage
    }

    /// Adds a parameter (the parameters decide whether an earlier run is up to date).
    pub fn param(&mut self, key: &str, value: serde_json::Value) -> &mut Self {
        if let Some(o) = self.params.as_object_mut() {
            o.insert(key.to_string(), value);
        }
        self
    }

    /// Records an input artifact: refuses it when its set is inconsistent ([`verify`]), and
    /// fingerprints it and its companions.
    pub fn input(&mut self, role: &str, path: &Path) -> Result<&mut Self> {
        self.input_part(role, path, &[])
    }

    /// Records an input of which the stage reads only byte ranges (a shard worker's rows of a
    /// large embeddings file, and their ids): the set is checked, and fingerprinted, in those
    /// ranges only (`Fingerprint::of_range`). `ranges` names the artifact and its companions.
    pub fn input_part(&mut self, role: &str, path: &Path, ranges: &Ranges) -> Result<&mut Self> {
        verify_part(path, ranges)?;
        let range_of = |p: &Path| -> Result<Fingerprint> {
            match ranges.iter().find(|(r, _, _)| r == p) {
                Some((_, a, b)) => Fingerprint::of_range(p, *a, *b),
                None => Fingerprint::of(p),
            }
        };
        let mut companions = BTreeMap::new();
        for c in conventional_companions(path) {
            if c.is_file() {
                companions.insert(io::file_name(&c), range_of(&c)?);
            }
        }
        self.inputs.insert(
            role.to_string(),
            InputRecord {
                path: path.display().to_string(),
                fingerprint: range_of(path)?,
                companions,
            },
        );
        self.reads.extend(
            artifact_files(path)
                .into_iter()
                .map(|p| (format!("the {role}"), p)),
        );
        Ok(self)
    }

    /// Records many files read as one input (`role` "images": every image a stage decodes,
    /// hashed whole, in the order given), described as `label` in messages.
    pub fn input_files(&mut self, role: &str, label: &str, paths: &[PathBuf]) -> Result<&mut Self> {
        self.input_files_at(role, label, 0, paths)
    }

    /// [`input_files`](Self::input_files) for positions `first..` of a longer list (a shard's
    /// rows: see `Fingerprint::of_files_at`).
    pub fn input_files_at(
        &mut self,
        role: &str,
        label: &str,
        first: u64,
        paths: &[PathBuf],
    ) -> Result<&mut Self> {
        let fp = Fingerprint::of_files_at(first, paths);
        self.inputs.insert(
            role.to_string(),
            InputRecord {
                path: label.to_string(),
                fingerprint: fp,
                companions: BTreeMap::new(),
            },
        );
        self.reads.extend(
            paths
                .iter()
                .map(|p| (format!("one of the {role}"), p.clone())),
        );
        Ok(self)
    }

    /// Records an input whose fingerprint is already known (e.g. carried from a part's manifest).
    pub fn input_record(&mut self, role: &str, rec: InputRecord) -> &mut Self {
        self.inputs.insert(role.to_string(), rec);
        self
    }

    /// Declares a file the stage reads that is not a fingerprinted input (a part to merge).
    pub fn reads(&mut self, what: &str, path: &Path) -> &mut Self {
        self.reads.extend(
            artifact_files(path)
                .into_iter()
                .map(|p| (what.to_string(), p)),
        );
        self
    }

    /// The fingerprint recorded for input `role`, if any.
    pub fn input_fingerprint(&self, role: &str) -> Option<&Fingerprint> {
        self.inputs.get(role).map(|r| &r.fingerprint)
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

    /// Declares a file of the output set: given sealed to [`commit`](Self::commit), or
    /// already written (a log), it is fingerprinted into the manifest.
    pub fn companion(&mut self, path: &Path) -> &mut Self {
        self.companions.push(path.to_path_buf());
        self
    }

    /// Declares a possible companion this run may not produce: when it does not, the file of
    /// an earlier run is removed at commit.
    pub fn optional_companion(&mut self, path: &Path) -> &mut Self {
        self.stale_files.push(path.to_path_buf());
        self
    }

    /// Every file committing `output` writes: the output, its manifest and lock, companions.
    fn output_files(&self, output: &Path) -> Vec<PathBuf> {
        let mut v = vec![output.to_path_buf(), manifest_path(output)];
        v.push(io::parent_dir(output).join(format!(".{}.lock", io::file_name(output))));
        v.extend(self.companions.iter().cloned());
        v.extend(self.stale_files.iter().cloned());
        v
    }

    /// Refuses an output set that would overwrite a file the stage reads (exit 2).
    pub fn refuse_overlap(&self, output: &Path) -> Result<()> {
        let writes = self.output_files(output);
        io::refuse_overlap(&self.reads, &writes)?;
        refuse_foreign_files(output, &writes)
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

    /// The start of writing `output`: refuses an output that is one of the inputs' files,
    /// takes the output's lock (waiting for another writer of it), then stops the stage with
    /// [`Error::UpToDate`] (the binaries print it and exit 0) when reuse is on
    /// ([`reuse_up_to_date`]) and `output` is up to date; otherwise the stage does its work.
    pub fn skip_if_done(&mut self, output: &Path) -> Result<()> {
        if output.is_dir() {
            return Err(Error::input(format!(
                "{}: is a folder; the output must name a file",
                output.display()
            )));
        }
        self.refuse_overlap(output)?;
        let reuse = REUSE.load(Ordering::Relaxed);
        // An up-to-date set needs no lock (its folder may be read-only): a set that matches
        // its manifest is whole. Anything else is looked at again under the lock.
        let done = reuse && self.stale(output)?.is_none();
        if !done {
            self.take_lock(output)?;
        }
        // Killed writers' temporaries can go (only dead writers' are removed, so this needs no
        // lock; in a read-only folder they stay).
        for f in self.output_files(output) {
            io::remove_dead_temps(&f);
        }
        if !done && (!reuse || self.stale(output)?.is_some()) {
            return Ok(());
        }
        Err(Error::UpToDate(format!(
            "simile-{}: {} is up to date (inputs and parameters unchanged); --force redoes it",
            self.stage,
            output.display()
        )))
    }

    /// Refuses an output that is an input and takes the output's lock (as
    /// [`skip_if_done`](Self::skip_if_done) does, without the up-to-date check).
    pub fn lock(&mut self, output: &Path) -> Result<()> {
        self.refuse_overlap(output)?;
        self.take_lock(output)
    }

    fn take_lock(&mut self, output: &Path) -> Result<()> {
        if self.lock.as_ref().is_none_or(|(p, _)| p != output) {
            self.lock = Some((output.to_path_buf(), OutputLock::acquire(output)?));
        }
        Ok(())
    }

    /// Publishes an output set (see the module's commit order): `out` and the sealed
    /// companions are renamed into place after the manifest that records them; declared
    /// companions already on disk are fingerprinted as they are; optional companions not
    /// produced are removed.
    pub fn commit(mut self, out: Sealed, sealed: Vec<Sealed>) -> Result<Manifest> {
        let output = out.dest().to_path_buf();
        self.refuse_overlap(&output)?;
        self.take_lock(&output)?;
        self.timings
            .entry("total".into())
            .or_insert(self.started.elapsed().as_secs_f64());
        let dir = io::parent_dir(&output);
        let mut companions = BTreeMap::new();
        for s in &sealed {
            if !io::same_folder(s.dest(), &output) {
                return Err(Error::internal(format!(
                    "{}: a companion must be in the folder of {}",
                    s.dest().display(),
                    output.display()
                )));
            }
            companions.insert(io::file_name(s.dest()), Fingerprint::of(s.temp())?);
        }
        for c in &self.companions {
            let name = io::file_name(c);
            if !companions.contains_key(&name) && c.is_file() {
                companions.insert(name, Fingerprint::of(c)?);
            }
        }
        let m = Manifest {
            simile_manifest: MANIFEST_VERSION,
            stage: self.stage.clone(),
            simile_version: VERSION.to_string(),
            commit: COMMIT.to_string(),
            output: io::file_name(&output),
            output_fingerprint: Fingerprint::of(out.temp())?,
            companions,
            params: self.params.clone(),
            notes: std::mem::take(&mut self.notes),
            inputs: std::mem::take(&mut self.inputs),
            rows: std::mem::take(&mut self.rows),
            shard: self.shard.take(),
            timings_s: std::mem::take(&mut self.timings),
            created_unix_s: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        let json = serde_json::to_vec_pretty(&m).map_err(|e| Error::internal(e.to_string()))?;
        fault("before-commit");
        // The manifest first: from here on the old files no longer match it.
        io::seal_bytes(manifest_path(&output), &json)?.rename()?;
        fault("manifest");
        for c in &self.stale_files {
            if !m.companions.contains_key(&io::file_name(c)) && c.exists() {
                std::fs::remove_file(c).map_err(|e| Error::io(c, e))?;
            }
        }
        for s in sealed {
            s.rename()?;
            fault("companion");
        }
        out.rename()?;
        fault("output");
        io::sync_dir(&dir)?;
        Ok(m)
    }
}

/// Fault injection for the tests of the commit order (`docs/conventions.md`): with
/// `SIMILE_TEST_FAULT=kill-after:<point>` the process kills itself (SIGKILL, as a crash or an
/// OOM kill would) at that point of every commit; with `sleep-at:<point>:<ms>` it pauses there.
/// Points: `before-commit`, `manifest`, `companion` (after each), `output`.
/// Test hook (`SIMILE_TEST_FAULT`): `kill-after:<point>` kills this process at `point`,
/// `sleep-at:<point>:<ms>` pauses there.
pub(crate) fn fault(point: &str) {
    let Some(spec) = std::env::var_os("SIMILE_TEST_FAULT") else {
        return;
    };
    let spec = spec.to_string_lossy();
    if spec.strip_prefix("kill-after:") == Some(point) {
        #[cfg(unix)]
        // SAFETY: sends SIGKILL to this process; nothing runs after it.
        unsafe {
            libc::kill(std::process::id() as libc::pid_t, libc::SIGKILL);
        }
    }
    if let Some((p, ms)) = spec
        .strip_prefix("sleep-at:")
        .and_then(|r| r.rsplit_once(':'))
    {
        if p == point {
            std::thread::sleep(std::time::Duration::from_millis(ms.parse().unwrap_or(0)));
        }
    }
}

/// The manifest beside `artifact` as written, without checking it.
fn read_raw(artifact: &Path) -> Option<Manifest> {
    let text = std::fs::read(manifest_path(&io::resolve_link(artifact))).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Reads the manifest beside `artifact` and checks that the artifact and every companion it
/// records are the files it describes. No manifest: `Ok(None)` (a file made by another
/// program). A file that does not match is refused (exit 2): it is what an interrupted run
/// leaves, or a file another program replaced; either way its set cannot be trusted.
pub fn verify(artifact: &Path) -> Result<Option<Manifest>> {
    verify_part(artifact, &[])
}

/// [`verify`] for a reader of part of the artifact: the files in `ranges` are checked in those
/// byte ranges only (through their block fingerprints), so a shard worker reads no more of a
/// large gallery to check it than to search it.
pub fn verify_part(artifact: &Path, ranges: &Ranges) -> Result<Option<Manifest>> {
    // The set is the one beside the real file (a link's own folder may hold another set).
    let artifact = &io::resolve_link(artifact);
    match verify_once(artifact, ranges) {
        // A set being committed right now: wait for its writer, then look again.
        Err(e) if io::wait_for_writer(artifact) => verify_once(artifact, ranges).or(Err(e)),
        r => r,
    }
}

fn verify_once(artifact: &Path, ranges: &Ranges) -> Result<Option<Manifest>> {
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
    if let Some(bad) = mismatch(&m, artifact, ranges)? {
        let what = if bad.is_file() {
            "does not match"
        } else {
            "is missing but recorded in"
        };
        return Err(Error::input(format!(
            "{} {what} {}: it is left from an interrupted run of simile-{} or was changed by another program, so {} cannot be trusted; re-run simile-{} (or delete {} to use the files as they are)",
            bad.display(),
            mp.display(),
            m.stage,
            artifact.display(),
            m.stage,
            mp.display()
        )));
    }
    Ok(Some(m))
}

/// Refuses `artifact` when its manifest records an input `role` whose fingerprint differs
/// from the file the user gave now (e.g. embeddings made from another `dataset.parquet`).
pub fn check_upstream(artifact: &Path, role: &str, given: &Path) -> Result<()> {
    check_upstream_part(artifact, &[], role, given)
}

/// [`check_upstream`] for a reader of the byte `ranges` of the artifact (see [`verify_part`]).
pub fn check_upstream_part(
    artifact: &Path,
    ranges: &Ranges,
    role: &str,
    given: &Path,
) -> Result<()> {
    let Some(m) = verify_part(artifact, ranges)? else {
        return Ok(());
    };
    let Some(rec) = m.inputs.get(role) else {
        return Ok(());
    };
    let now = Fingerprint::of(given)?;
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

    fn commit_files(b: ManifestBuilder, out: &Path, ids: &Path, o: &[u8], i: &[u8]) {
        b.commit(
            io::seal_bytes(out, o).unwrap(),
            vec![io::seal_bytes(ids, i).unwrap()],
        )
        .unwrap();
    }

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
        commit_files(builder(1), &out, &ids, b"embeddings", b"ids");
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
    fn a_half_replaced_set_is_refused_by_readers() {
        let dir = tempfile::tempdir().unwrap();
        let ds = dir.path().join("dataset.parquet");
        std::fs::write(&ds, b"version one").unwrap();
        let out = dir.path().join("emb.npy");
        let ids = dir.path().join("emb.ids.npy");
        let b = || {
            let mut b = ManifestBuilder::new("embed", serde_json::json!({"k": 1}));
            b.input("dataset", &ds).unwrap();
            b.companion(&ids);
            b
        };
        commit_files(b(), &out, &ids, b"embeddings one", b"ids one");
        assert!(verify(&out).unwrap().is_some());
        check_upstream(&out, "dataset", &ds).unwrap();
        // A run killed after renaming its new ids but before its output: refused.
        std::fs::write(&ids, b"ids two").unwrap();
        let e = verify(&out).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("emb.ids.npy does not match"), "{e}");
        // A reader that takes emb.npy as an input refuses it too.
        let mut reader = ManifestBuilder::new("distance", serde_json::json!({}));
        assert!(reader.input("embeddings", &out).is_err());
        // Re-running the stage mends it.
        commit_files(b(), &out, &ids, b"embeddings two", b"ids two");
        verify(&out).unwrap();
        // A replaced artifact is refused, not silently used with its old manifest.
        std::fs::write(&out, b"other embeddings").unwrap();
        assert!(verify(&out).is_err());
        // Without a manifest, files are taken as they are (made by another program).
        std::fs::remove_file(manifest_path(&out)).unwrap();
        assert!(verify(&out).unwrap().is_none());
    }

    #[test]
    fn upstream_mismatch_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ds = dir.path().join("dataset.parquet");
        std::fs::write(&ds, b"version one").unwrap();
        let out = dir.path().join("emb.npy");
        let mut b = ManifestBuilder::new("embed", serde_json::json!({"k": 1}));
        b.input("dataset", &ds).unwrap();
        b.commit(io::seal_bytes(&out, b"embeddings").unwrap(), vec![])
            .unwrap();
        check_upstream(&out, "dataset", &ds).unwrap();
        std::fs::write(&ds, b"version two!").unwrap();
        let e = check_upstream(&out, "dataset", &ds).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(
            e.to_string().contains("made from a different dataset"),
            "{e}"
        );
    }

    #[test]
    fn outputs_that_are_inputs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let emb = dir.path().join("emb.npy");
        std::fs::write(&emb, b"e").unwrap();
        std::fs::write(crate::npy::ids_path(&emb), b"i").unwrap();
        for bad in ["emb.npy", "emb.ids.npy", "emb.npy.manifest.json"] {
            let mut b = ManifestBuilder::new("distance", serde_json::json!({}));
            b.input("embeddings", &emb).unwrap();
            let e = b.skip_if_done(&dir.path().join(bad)).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad}");
            assert!(e.to_string().contains("which this stage reads"), "{e}");
        }
        // An output whose companion is an input.
        let mut b = ManifestBuilder::new("embed", serde_json::json!({}));
        b.input("dataset", &dir.path().join("emb.ids.npy")).unwrap();
        b.companion(&dir.path().join("emb.ids.npy"));
        assert!(b.skip_if_done(&dir.path().join("emb.npy")).is_err());
    }

    #[test]
    fn optional_companions_of_an_earlier_run_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("emb.npy");
        let skipped = dir.path().join("emb.skipped.tsv");
        let b = || {
            let mut b = ManifestBuilder::new("embed", serde_json::json!({}));
            b.optional_companion(&skipped);
            b
        };
        b().commit(
            io::seal_bytes(&out, b"one").unwrap(),
            vec![io::seal_bytes(&skipped, b"id\tpath\treason\n").unwrap()],
        )
        .unwrap();
        assert!(skipped.exists());
        verify(&out).unwrap();
        b().commit(io::seal_bytes(&out, b"two").unwrap(), vec![])
            .unwrap();
        assert!(!skipped.exists());
        verify(&out).unwrap();
    }
}
