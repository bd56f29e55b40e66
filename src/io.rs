//! The file-level rules every stage follows: atomic writes, output locks, fingerprints, and
//! keeping outputs apart from inputs.
//!
//! Every file goes through [`AtomicFile`]: the bytes are written to a temporary file in the
//! destination folder, named `.<name>.<pid>-<n>.tmp`, flushed to disk, and renamed over the
//! final name only when complete (then the folder is flushed too), so a killed or failed run
//! never leaves a partial file under that name. A file that belongs to a set (an output and its
//! companions, committed together by `manifest::ManifestBuilder::commit`) is first
//! [`sealed`](AtomicFile::seal): complete on disk under its temporary name, renamed later.
//! Temporary files whose writer is dead are removed by the next writer of the same name.
use crate::error::{Error, IoContext, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::UNIX_EPOCH;
use xxhash_rust::xxh3::Xxh3;

/// A file being written under a temporary name beside its final path.
/// Dropped without [`commit`](Self::commit) or [`seal`](Self::seal), the temporary file is
/// deleted.
pub struct AtomicFile {
    file: File,
    tmp: TempPath,
    dest: PathBuf,
}

/// A complete file under its temporary name, waiting to be renamed to its destination
/// ([`persist`](Self::persist)); dropped unpersisted, it is deleted.
#[must_use = "a sealed file is deleted unless it is persisted or committed with its set"]
pub struct Sealed {
    tmp: TempPath,
    dest: PathBuf,
}

/// A temporary path removed on drop unless disarmed.
struct TempPath {
    path: PathBuf,
    armed: bool,
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// `.<name>.<pid>-<n>.tmp` beside `dest`: the pid tells a later run whether its writer lives.
pub fn temp_path_for(dest: &Path) -> PathBuf {
    temp_path_with(dest, "")
}

/// As [`temp_path_for`], ending in `ext` (`.tmp.safetensors`: libtorch picks the format by it).
fn temp_path_with(dest: &Path, ext: &str) -> PathBuf {
    let n = TEMP_SEQ.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    parent_dir(dest).join(format!(
        ".{}.{}-{n}{nanos:08x}.tmp{ext}",
        file_name(dest),
        std::process::id()
    ))
}

impl AtomicFile {
    pub fn create(dest: impl AsRef<Path>) -> Result<Self> {
        Self::create_ext(dest, "")
    }

    /// A temporary file whose name keeps `dest`'s extension (for writers that choose the
    /// format by it, as libtorch's `save` does).
    pub fn create_keeping_extension(dest: impl AsRef<Path>) -> Result<Self> {
        let ext = dest
            .as_ref()
            .extension()
            .map(|e| format!(".{}", e.to_string_lossy()))
            .unwrap_or_default();
        Self::create_ext(dest, &ext)
    }

    fn create_ext(dest: impl AsRef<Path>, ext: &str) -> Result<Self> {
        let dest = dest.as_ref().to_path_buf();
        let dir = parent_dir(&dest);
        if !dir.exists() {
            std::fs::create_dir_all(&dir).at(&dir)?;
        }
        if dest.is_dir() {
            return Err(Error::input(format!(
                "{}: is a folder; the output must be a file path",
                dest.display()
            )));
        }
        remove_dead_temps(&dest);
        let tmp = temp_path_with(&dest, ext);
        let mut o = OpenOptions::new();
        o.write(true).read(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            o.mode(0o644);
        }
        let file = o.open(&tmp).at(&dest)?;
        Ok(AtomicFile {
            file,
            tmp: TempPath {
                path: tmp,
                armed: true,
            },
            dest,
        })
    }

    pub fn file(&mut self) -> &mut File {
        &mut self.file
    }

    /// The temporary path (a library that writes by path, e.g. safetensors, writes here).
    pub fn path(&self) -> &Path {
        &self.tmp.path
    }

    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Flushes the content to disk; the file keeps its temporary name until persisted.
    pub fn seal(self) -> Result<Sealed> {
        let AtomicFile { file, tmp, dest } = self;
        file.sync_all().at(&dest)?;
        drop(file);
        Ok(Sealed { tmp, dest })
    }

    /// Flushes to disk and renames over the destination.
    pub fn commit(self) -> Result<()> {
        self.seal()?.persist()
    }
}

impl Sealed {
    /// Where it will be renamed to.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Where its bytes are now.
    pub fn temp(&self) -> &Path {
        &self.tmp.path
    }

    /// Renames it over its destination and flushes the folder, so the rename survives a crash.
    pub fn persist(self) -> Result<()> {
        let dest = self.dest.clone();
        self.rename()?;
        sync_dir(&parent_dir(&dest))
    }

    /// The rename alone; the caller flushes the folder (once for a whole set).
    pub(crate) fn rename(mut self) -> Result<()> {
        std::fs::rename(&self.tmp.path, &self.dest).at(&self.dest)?;
        self.tmp.armed = false;
        Ok(())
    }
}

/// A folder built whole under a temporary name beside its destination
/// (`.<name>.<pid>-<n>.tmp`, removed on drop unless persisted; those of dead writers removed
/// by the next writer of the same folder) and swapped in by renames: the old folder, if any,
/// moves aside to `.<name>.old`, the new one takes its name, the file system is flushed, and
/// the old one is deleted. A reader sees the old folder or the new one, never a mix; after a
/// crash between the two renames `.<name>.old` is the complete old folder (checkpoints read
/// it, see `train::checkpoint::find`). Files are written into [`path`](Self::path) with plain
/// writes: the folder is the unit, flushed once by [`persist`](Self::persist).
pub struct AtomicDir {
    tmp: PathBuf,
    dest: PathBuf,
    armed: bool,
}

impl AtomicDir {
    pub fn create(dest: impl AsRef<Path>) -> Result<Self> {
        let dest = dest.as_ref().to_path_buf();
        let parent = parent_dir(&dest);
        std::fs::create_dir_all(&parent).at(&parent)?;
        remove_dead_temps(&dest);
        let tmp = temp_path_for(&dest);
        std::fs::create_dir(&tmp).at(&tmp)?;
        Ok(AtomicDir {
            tmp,
            dest,
            armed: true,
        })
    }

    /// The folder to fill.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Where an interrupted swap leaves the previous folder.
    pub fn old_path(dest: &Path) -> PathBuf {
        parent_dir(dest).join(format!(".{}.old", file_name(dest)))
    }

    /// Flushes everything written into it, then swaps it in (as the type says).
    pub fn persist(mut self) -> Result<()> {
        sync_tree(&self.tmp)?;
        let old = Self::old_path(&self.dest);
        remove_any(&old)?;
        let had_old = match std::fs::symlink_metadata(&self.dest) {
            Ok(_) => {
                std::fs::rename(&self.dest, &old).at(&self.dest)?;
                true
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(Error::io(&self.dest, e)),
        };
        if let Err(e) = std::fs::rename(&self.tmp, &self.dest) {
            if had_old {
                let _ = std::fs::rename(&old, &self.dest);
            }
            return Err(Error::io(&self.dest, e));
        }
        self.armed = false;
        sync_dir(&parent_dir(&self.dest))?;
        // Left behind on failure, it is a stale folder the next swap removes.
        let _ = remove_any(&old);
        Ok(())
    }
}

impl AtomicDir {
    /// Renames it into place only where no folder is yet (first writer wins: two processes
    /// building the same cache entry end with one folder); false when one was there, and
    /// this one is deleted.
    pub fn persist_if_absent(mut self) -> Result<bool> {
        sync_tree(&self.tmp)?;
        match std::fs::rename(&self.tmp, &self.dest) {
            Ok(()) => {
                self.armed = false;
                sync_dir(&parent_dir(&self.dest))?;
                Ok(true)
            }
            Err(_) if self.dest.is_dir() => Ok(false),
            Err(e) => Err(Error::io(&self.dest, e)),
        }
    }
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Removes a file or folder (not following links); nothing to do when it does not exist.
pub fn remove_any(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path).at(path),
        Ok(_) => std::fs::remove_file(path).at(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Flushes the file system that holds `dir` once (`syncfs`): one call for a folder of
/// thousands of files (the Font-ID images), where an fsync per file would cost seconds.
fn sync_tree(dir: &Path) -> Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let d = File::open(dir).at(dir)?;
        // SAFETY: syncfs only reads the descriptor, which lives until the end of the block.
        if unsafe { libc::syncfs(d.as_raw_fd()) } != 0 {
            return Err(Error::io(dir, std::io::Error::last_os_error()));
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = dir;
    Ok(())
}

/// Flushes a folder's entries (a rename in it) to disk, as tantivy's `atomic_write` does.
pub fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        File::open(dir).and_then(|d| d.sync_all()).at(dir)?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

pub(crate) fn parent_dir(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// An input as the file it names: a symbolic link is followed (to its final target), so that
/// the manifest and companions read with it are those beside the real file, not whatever
/// happens to sit beside the link. Anything else (a regular file, a missing path) is as given.
pub fn resolve_link(p: &Path) -> PathBuf {
    let is_link = std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink());
    match is_link.then(|| p.canonicalize()) {
        Some(Ok(target)) => target,
        _ => p.to_path_buf(),
    }
}

/// Creates the folder `dir` (and its parents) that `flag` names; an existing file there is
/// refused by name (exit 2) rather than with the OS's "File exists" or "Not a directory".
pub fn create_folder(dir: &Path, flag: &str) -> Result<()> {
    if let Some(file) = dir
        .ancestors()
        .find(|a| !a.as_os_str().is_empty() && a.is_file())
    {
        return Err(Error::input(format!(
            "{flag} {}: {} is a file; {flag} names a folder",
            dir.display(),
            file.display()
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
}

/// Whether two paths (existing or not) are in the same folder, links and `..` resolved.
pub fn same_folder(a: &Path, b: &Path) -> bool {
    let dir = |p: &Path| {
        let d = parent_dir(p);
        d.canonicalize().unwrap_or(d)
    };
    dir(a) == dir(b)
}

pub(crate) fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into())
}

/// Whether process `pid` is alive (on this machine).
fn pid_alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        if pid == std::process::id() {
            return true;
        }
        // 0 and values past pid_t would name process groups (or every process) for kill.
        if pid == 0 || pid > i32::MAX as u32 {
            return false;
        }
        // A zombie (killed, not yet reaped by its parent) answers kill(pid, 0) but writes
        // nothing more: it is dead for our purpose. /proc/<pid>/stat's state follows the
        // command name in parentheses.
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            if let Some(state) = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.trim_start().chars().next())
            {
                return !matches!(state, 'Z' | 'X');
            }
        }
        // SAFETY: kill with signal 0 only checks for the process; it sends nothing.
        let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// Removes the temporary files and folders (`.<name>.<pid>-<n>.tmp[.ext]`) that dead writers of
/// `dest` left behind: a killed run's litter goes with the next run of the same output.
pub fn remove_dead_temps(dest: &Path) {
    let dir = parent_dir(dest);
    let prefix = format!(".{}.", file_name(dest));
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some((rest, _ext)) = name
            .strip_prefix(&prefix)
            .and_then(|r| r.split_once(".tmp"))
        else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !rest.contains('-') || pid_alive(pid) {
            continue;
        }
        let p = e.path();
        let _ = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
    }
}

/// Writes a whole file atomically from a closure that fills a writer.
pub fn atomic_write<F>(dest: impl AsRef<Path>, fill: F) -> Result<()>
where
    F: FnOnce(&mut std::io::BufWriter<&mut File>) -> Result<()>,
{
    seal_with(dest, fill)?.persist()
}

/// Writes a whole file under its temporary name (see [`Sealed`]).
pub fn seal_with<F>(dest: impl AsRef<Path>, fill: F) -> Result<Sealed>
where
    F: FnOnce(&mut std::io::BufWriter<&mut File>) -> Result<()>,
{
    let mut f = AtomicFile::create(dest.as_ref())?;
    {
        let mut w = std::io::BufWriter::new(f.file());
        fill(&mut w)?;
        w.flush().at(dest.as_ref())?;
    }
    f.seal()
}

/// simile's cache folder (the zoo, decoded images, the GEMM probe):
/// `${SIMILE_CACHE:-${XDG_CACHE_HOME:-~/.cache}/simile}`.
pub fn cache_root() -> PathBuf {
    std::env::var_os("SIMILE_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|x| PathBuf::from(x).join("simile")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/simile")))
        .unwrap_or_else(|| std::env::temp_dir().join("simile"))
}

/// Writes bytes atomically.
pub fn atomic_write_bytes(dest: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    seal_bytes(dest, bytes)?.persist()
}

/// Writes bytes under a temporary name (see [`Sealed`]).
pub fn seal_bytes(dest: impl AsRef<Path>, bytes: &[u8]) -> Result<Sealed> {
    let d = dest.as_ref().to_path_buf();
    seal_with(&d, |w| w.write_all(bytes).at(&d))
}

/// An advisory lock on an output: one writer at a time. Held from the moment a stage decides
/// to write an output until its set is committed, so two runs writing the same output never mix
/// (the second waits, then finds the output up to date or writes it whole). The lock file,
/// `.<name>.lock` beside the output, is removed when the lock is released (a killed run's stays,
/// empty, and is taken over by the next run).
pub struct OutputLock {
    file: File,
    path: PathBuf,
}

impl OutputLock {
    pub fn acquire(output: &Path) -> Result<OutputLock> {
        let dir = parent_dir(output);
        if !dir.exists() {
            std::fs::create_dir_all(&dir).at(&dir)?;
        }
        let path = dir.join(format!(".{}.lock", file_name(output)));
        let mut said = false;
        loop {
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .at(&path)?;
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    if !said {
                        eprintln!(
                            "simile: another process is writing {}; waiting for it to finish",
                            output.display()
                        );
                        said = true;
                    }
                    file.lock().at(&path)?;
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
            }
            // The holder before us may have removed the file as it released it: the lock is
            // ours only if the name still leads to the file we locked.
            if same_file(&file, &path) {
                return Ok(OutputLock { file, path });
            }
        }
    }
}

#[cfg(unix)]
fn same_file(f: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (f.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}
#[cfg(not(unix))]
fn same_file(_: &File, _: &Path) -> bool {
    true
}

/// Waits for a writer that holds `output`'s lock (a stage committing that set right now), so
/// that a reader that saw a half-committed set can look again. Whether there was one.
pub fn wait_for_writer(output: &Path) -> bool {
    let path = parent_dir(output).join(format!(".{}.lock", file_name(output)));
    let Ok(file) = OpenOptions::new().read(true).open(&path) else {
        return false;
    };
    match file.try_lock_shared() {
        Ok(()) => false,
        Err(std::fs::TryLockError::WouldBlock) => {
            eprintln!(
                "simile: another process is writing {}; waiting for it to finish",
                output.display()
            );
            file.lock_shared().is_ok()
        }
        Err(std::fs::TryLockError::Error(_)) => false,
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Removed while still held, so no one can lock the name we are about to leave.
        let _ = std::fs::remove_file(&self.path);
        let _ = self.file.unlock();
    }
}

/// What identifies a file's content: its size and an xxh3 hash of every byte.
///
/// `mtime_ns` is recorded but not compared: datasets move between machines and containers,
/// and a copy must stay the same input. A file larger than [`BLOCK`] is hashed block by block
/// (in parallel) and its `blocks` recorded, so that a reader of part of it (a shard worker) can
/// fingerprint and check only the blocks it reads ([`Fingerprint::of_range`]); the parts'
/// fingerprints combine into the whole file's ([`Fingerprint::combine`]). Hashing is cached
/// per process (keyed by the file's device, inode, size, modification and change times), so a
/// file checked by several steps of one stage is read once.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Fingerprint {
    pub size: u64,
    pub mtime_ns: i128,
    pub hash: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocks: Option<Blocks>,
}

/// The xxh3 digests of consecutive [`BLOCK`]-byte blocks of a file, from block `first` on.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Blocks {
    pub first: u64,
    pub digests: Vec<String>,
}

/// The block size of large files' fingerprints: 64 MiB.
pub const BLOCK: u64 = 64 << 20;

/// The hash prefix of a list of files' fingerprint.
const SUM: &str = "xxh3-sum:";
/// The hash prefix of a fingerprint of some blocks of a file.
const RANGE: &str = "xxh3-range:";

type FileKey = (u64, u64, u64, i128, i128);

/// Per path: the file's identity and the digests of the blocks hashed so far.
type BlockCache = HashMap<PathBuf, (FileKey, Vec<Option<u64>>)>;

fn block_cache() -> &'static Mutex<BlockCache> {
    static CACHE: OnceLock<Mutex<BlockCache>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

fn file_key(meta: &std::fs::Metadata) -> (FileKey, i128) {
    let mtime_ns = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0);
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let ctime = meta.ctime() as i128 * 1_000_000_000 + meta.ctime_nsec() as i128;
        (
            (meta.dev(), meta.ino(), meta.len(), mtime_ns, ctime),
            mtime_ns,
        )
    }
    #[cfg(not(unix))]
    ((0, 0, meta.len(), mtime_ns, 0), mtime_ns)
}

fn n_blocks(size: u64) -> u64 {
    size.div_ceil(BLOCK).max(1)
}

/// The digests of blocks `lo..hi` of `path` (hashed in parallel, memory-mapped, cached).
fn digests(path: &Path, lo: u64, hi: u64) -> Result<(u64, i128, Vec<u64>)> {
    use rayon::prelude::*;
    let meta = std::fs::metadata(path).at(path)?;
    let (key, mtime_ns) = file_key(&meta);
    let size = meta.len();
    let n = n_blocks(size);
    let hi = hi.min(n);
    let known: Vec<Option<u64>> = block_cache()
        .lock()
        .ok()
        .and_then(|c| {
            c.get(path)
                .filter(|(k, _)| *k == key)
                .map(|(_, d)| d.clone())
        })
        .unwrap_or_else(|| vec![None; n as usize]);
    let missing: Vec<u64> = (lo..hi).filter(|&i| known[i as usize].is_none()).collect();
    let mut all = known;
    if !missing.is_empty() {
        let f = File::open(path).at(path)?;
        let got: Vec<(u64, u64)> = if size <= BLOCK {
            let mut buf = Vec::with_capacity(size as usize);
            (&f).read_to_end(&mut buf).at(path)?;
            vec![(0, xxhash_rust::xxh3::xxh3_64(&buf))]
        } else {
            // SAFETY: a read-only map, dropped before returning; a file truncated under it by
            // another program would fault, which no stage does to its inputs.
            let map = unsafe { memmap2::Mmap::map(&f) }.at(path)?;
            missing
                .par_iter()
                .map(|&i| {
                    let a = (i * BLOCK) as usize;
                    let b = ((i + 1) * BLOCK).min(size) as usize;
                    (i, xxhash_rust::xxh3::xxh3_64(&map[a..b]))
                })
                .collect()
        };
        for (i, d) in got {
            all[i as usize] = Some(d);
        }
        if let Ok(mut c) = block_cache().lock() {
            c.insert(path.to_path_buf(), (key, all.clone()));
        }
    }
    Ok((
        size,
        mtime_ns,
        (lo..hi).map(|i| all[i as usize].unwrap_or(0)).collect(),
    ))
}

/// The whole file's hash from all its block digests (one block: the content's own xxh3).
fn whole_hash(size: u64, d: &[u64]) -> String {
    if size <= BLOCK {
        return format!("xxh3:{:016x}", d[0]);
    }
    let mut h = Xxh3::new();
    h.update(&size.to_le_bytes());
    for x in d {
        h.update(&x.to_le_bytes());
    }
    format!("xxh3:{:016x}", h.digest())
}

fn hex(d: &[u64]) -> Vec<String> {
    d.iter().map(|x| format!("{x:016x}")).collect()
}

impl Fingerprint {
    /// Fingerprints a file: every byte is hashed (xxh3 streams at several GB/s).
    pub fn of(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let (size, mtime_ns, d) = digests(path, 0, u64::MAX)?;
        Ok(Fingerprint {
            size,
            mtime_ns,
            hash: whole_hash(size, &d),
            blocks: (size > BLOCK).then(|| Blocks {
                first: 0,
                digests: hex(&d),
            }),
        })
    }

    /// Fingerprints the blocks of `path` that hold bytes `[start, end)`: what a reader of that
    /// part of a large file depends on. A file of one block is fingerprinted whole.
    pub fn of_range(path: impl AsRef<Path>, start: u64, end: u64) -> Result<Self> {
        let path = path.as_ref();
        let size = std::fs::metadata(path).at(path)?.len();
        if size <= BLOCK {
            return Self::of(path);
        }
        let (lo, hi) = (start / BLOCK, end.max(start + 1).div_ceil(BLOCK));
        let (size, mtime_ns, d) = digests(path, lo, hi)?;
        if lo == 0 && hi >= n_blocks(size) {
            return Self::of(path);
        }
        let mut h = Xxh3::new();
        h.update(&size.to_le_bytes());
        h.update(&lo.to_le_bytes());
        for x in &d {
            h.update(&x.to_le_bytes());
        }
        Ok(Fingerprint {
            size,
            mtime_ns,
            hash: format!("{RANGE}{lo}-{}:{:016x}", lo + d.len() as u64, h.digest()),
            blocks: Some(Blocks {
                first: lo,
                digests: hex(&d),
            }),
        })
    }

    /// Whether this fingerprints only some blocks of a file ([`of_range`](Self::of_range)).
    pub fn is_range(&self) -> bool {
        self.hash.starts_with(RANGE)
    }

    /// The whole file's fingerprint from fingerprints of parts of it (shard workers' ranges,
    /// or whole): `None` unless they are of one file size, agree where they overlap and
    /// cover every block.
    pub fn combine<'a>(parts: impl IntoIterator<Item = &'a Fingerprint>) -> Option<Fingerprint> {
        let parts: Vec<&Fingerprint> = parts.into_iter().collect();
        let size = parts.first()?.size;
        if parts.iter().any(|p| p.size != size) {
            return None;
        }
        if let Some(w) = parts.iter().find(|p| !p.is_range()) {
            let w = (*w).clone();
            return parts.iter().all(|p| w.contains(p)).then_some(w);
        }
        // Every block must be covered by a part's digests: fewer digests than blocks (a size
        // from a hand-edited manifest, say) cannot combine, and would size the table.
        let digests: u64 = parts
            .iter()
            .map(|p| p.blocks.as_ref().map_or(0, |b| b.digests.len() as u64))
            .sum();
        if n_blocks(size) > digests {
            return None;
        }
        let mut all: Vec<Option<String>> = vec![None; n_blocks(size) as usize];
        for p in &parts {
            let b = p.blocks.as_ref()?;
            for (k, d) in b.digests.iter().enumerate() {
                let slot = all.get_mut((b.first as usize).checked_add(k)?)?;
                match slot {
                    Some(prev) if prev != d => return None,
                    _ => *slot = Some(d.clone()),
                }
            }
        }
        let d: Vec<u64> = all
            .iter()
            .map(|x| x.as_ref().and_then(|h| u64::from_str_radix(h, 16).ok()))
            .collect::<Option<_>>()?;
        Some(Fingerprint {
            size,
            mtime_ns: parts[0].mtime_ns,
            hash: whole_hash(size, &d),
            blocks: (size > BLOCK).then(|| Blocks {
                first: 0,
                digests: hex(&d),
            }),
        })
    }

    /// Whether `self`, a whole-file fingerprint, has the content `part` (a range of the same
    /// file, or whole) describes.
    pub fn contains(&self, part: &Fingerprint) -> bool {
        if !part.is_range() {
            return self.same_content(part);
        }
        match (&self.blocks, &part.blocks) {
            (Some(w), Some(p)) if self.size == part.size && w.first == 0 => p
                .digests
                .iter()
                .enumerate()
                .all(|(k, d)| w.digests.get(p.first as usize + k) == Some(d)),
            _ => false,
        }
    }

    /// One fingerprint of many files' contents, in the order given (the images a stage reads):
    /// `size` is their total, `hash` covers every byte of each, file by file. Files are read in
    /// parallel. A missing or unreadable file counts as such (the stage reports it when it
    /// decodes, or leaves it out), so it changes the fingerprint without failing it.
    pub fn of_files(paths: &[PathBuf]) -> Self {
        Self::of_files_at(0, paths)
    }

    /// [`of_files`](Self::of_files) of files that are positions `first..` of a longer list (a
    /// shard's rows). The hash is a sum over positions of a hash of (position, size, content),
    /// so the parts' fingerprints [`sum`](Self::sum) to the whole list's: a merged shard run
    /// records the images of the unsharded run.
    pub fn of_files_at(first: u64, paths: &[PathBuf]) -> Self {
        use rayon::prelude::*;
        let each: Vec<(u64, u64)> = paths
            .par_iter()
            .enumerate()
            .map(|(i, p)| {
                let (n, x) = match std::fs::read(p) {
                    Ok(bytes) => (bytes.len() as u64, xxhash_rust::xxh3::xxh3_64(&bytes)),
                    Err(e) => (u64::MAX, e.kind() as u64),
                };
                let mut key = [0u8; 24];
                key[..8].copy_from_slice(&(first + i as u64).to_le_bytes());
                key[8..16].copy_from_slice(&n.to_le_bytes());
                key[16..].copy_from_slice(&x.to_le_bytes());
                (
                    if n == u64::MAX { 0 } else { n },
                    xxhash_rust::xxh3::xxh3_64(&key),
                )
            })
            .collect();
        Fingerprint {
            size: each.iter().map(|e| e.0).sum(),
            mtime_ns: 0,
            blocks: None,
            hash: format!(
                "{SUM}{:016x}",
                each.iter().fold(0u64, |a, e| a.wrapping_add(e.1))
            ),
        }
    }

    /// Whether this fingerprints a list of files (see [`of_files_at`](Self::of_files_at)).
    pub fn is_sum(&self) -> bool {
        self.hash.starts_with(SUM)
    }

    /// The fingerprint of the concatenated lists whose parts these are (`None` unless all are
    /// list fingerprints).
    pub fn sum<'a>(parts: impl IntoIterator<Item = &'a Fingerprint>) -> Option<Fingerprint> {
        let (mut size, mut h) = (0u64, 0u64);
        for p in parts {
            let v = u64::from_str_radix(p.hash.strip_prefix(SUM)?, 16).ok()?;
            size += p.size;
            h = h.wrapping_add(v);
        }
        Some(Fingerprint {
            size,
            mtime_ns: 0,
            hash: format!("{SUM}{h:016x}"),
            blocks: None,
        })
    }

    /// Whether two fingerprints name the same content (see the type's documentation).
    pub fn same_content(&self, other: &Fingerprint) -> bool {
        self.size == other.size && self.hash == other.hash
    }
}

/// The absolute, symlink-free form of a path that may not exist yet (its folder must, or it
/// is taken as given).
fn normalised(p: &Path) -> PathBuf {
    if let Ok(c) = p.canonicalize() {
        return c;
    }
    let dir = parent_dir(p);
    match (dir.canonicalize(), p.file_name()) {
        (Ok(d), Some(n)) => d.join(n),
        _ => std::env::current_dir()
            .map(|c| c.join(p))
            .unwrap_or_else(|_| p.to_path_buf()),
    }
}

/// Refuses (exit 2, nothing written) when any file a stage would write is one of the files it
/// reads. Both lists hold every file of each artifact: an output's companions and manifest,
/// an input's companions and manifest (see `manifest::artifact_files`).
pub fn refuse_overlap(inputs: &[(String, PathBuf)], outputs: &[PathBuf]) -> Result<()> {
    let ins: Vec<(PathBuf, &str, &Path)> = inputs
        .iter()
        .map(|(what, p)| (normalised(p), what.as_str(), p.as_path()))
        .collect();
    for o in outputs {
        let n = normalised(o);
        if let Some((_, what, p)) = ins.iter().find(|(i, _, _)| *i == n) {
            return Err(Error::input(format!(
                "{}: the output would overwrite an input, {} ({what}), which this stage reads; choose another --out",
                o.display(),
                p.display()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_leaves_no_file_on_failure() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.bin");
        let r = atomic_write(&dest, |w| {
            w.write_all(b"partial").unwrap();
            Err(Error::input("boom"))
        });
        assert!(r.is_err());
        assert!(!dest.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        atomic_write_bytes(&dest, b"done").unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"done");
        // Sealed but not persisted: nothing under the name, and nothing left on drop.
        let s = seal_bytes(&dest, b"next").unwrap();
        assert!(s.temp().exists());
        assert_eq!(std::fs::read(&dest).unwrap(), b"done");
        drop(s);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn dead_writers_temps_are_removed_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("emb.npy");
        // A pid that cannot be alive (above the kernel's pid_max).
        let dead = dir.path().join(".emb.npy.999999999-0.tmp");
        let live = dir
            .path()
            .join(format!(".emb.npy.{}-7.tmp", std::process::id()));
        let other = dir.path().join(".other.npy.999999999-0.tmp");
        std::fs::create_dir(dir.path().join(".emb.npy.999999998-1.tmp")).unwrap();
        for p in [&dead, &live, &other] {
            std::fs::write(p, b"x").unwrap();
        }
        atomic_write_bytes(&dest, b"new").unwrap();
        assert!(!dead.exists());
        assert!(!dir.path().join(".emb.npy.999999998-1.tmp").exists());
        assert!(live.exists(), "a live writer's temp is kept");
        assert!(other.exists(), "another output's temp is not touched");
    }

    #[test]
    fn fingerprint_sees_every_byte_not_mtime() {
        let dir = tempfile::tempdir().unwrap();
        for size in [10usize, 200_000, 9_000_000] {
            let a = dir.path().join(format!("a{size}"));
            let mut data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
            std::fs::write(&a, &data).unwrap();
            let fa = Fingerprint::of(&a).unwrap();
            let b = dir.path().join(format!("b{size}"));
            std::fs::write(&b, &data).unwrap();
            assert!(fa.same_content(&Fingerprint::of(&b).unwrap()));
            // One byte anywhere changes it, even in place with the same size.
            let at = size * 3 / 7;
            data[at] ^= 1;
            std::fs::write(&b, &data).unwrap();
            assert!(!fa.same_content(&Fingerprint::of(&b).unwrap()));
        }
        let (x, y) = (dir.path().join("x"), dir.path().join("y"));
        std::fs::write(&x, b"one").unwrap();
        std::fs::write(&y, b"two").unwrap();
        let f1 = Fingerprint::of_files(&[x.clone(), y.clone()]);
        assert_eq!(f1.size, 6);
        assert_ne!(f1, Fingerprint::of_files(&[y.clone(), x.clone()]));
        std::fs::write(&y, b"twO").unwrap();
        assert!(!f1.same_content(&Fingerprint::of_files(&[x.clone(), y.clone()])));
        let missing = Fingerprint::of_files(&[x.clone(), dir.path().join("missing")]);
        assert_ne!(missing, Fingerprint::of_files(std::slice::from_ref(&x)));
        // Parts of a list sum to the whole list's fingerprint.
        let z = dir.path().join("z");
        std::fs::write(&z, b"three").unwrap();
        let whole = Fingerprint::of_files(&[x.clone(), y.clone(), z.clone()]);
        let parts = [
            Fingerprint::of_files_at(0, std::slice::from_ref(&x)),
            Fingerprint::of_files_at(1, &[y.clone(), z.clone()]),
        ];
        assert_eq!(Fingerprint::sum(&parts), Some(whole.clone()));
        assert_ne!(
            Fingerprint::sum(&[Fingerprint::of_files_at(0, &[y, z]), parts[0].clone()]),
            Some(whole)
        );
    }

    #[test]
    fn large_files_are_fingerprinted_by_blocks_and_ranges_combine() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big.npy");
        let size = (2 * BLOCK + BLOCK / 2) as usize;
        let mut data: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let whole = Fingerprint::of(&p).unwrap();
        assert_eq!(whole.blocks.as_ref().unwrap().digests.len(), 3);
        // A shard worker's range: only its blocks.
        let a = Fingerprint::of_range(&p, 10, BLOCK + 5).unwrap();
        let b = Fingerprint::of_range(&p, BLOCK + 5, size as u64).unwrap();
        assert!(a.is_range() && b.is_range());
        assert_eq!(a.blocks.as_ref().unwrap().digests.len(), 2);
        assert!(whole.contains(&a) && whole.contains(&b));
        assert_eq!(Fingerprint::combine([&a, &b]), Some(whole.clone()));
        assert_eq!(Fingerprint::combine([&a]), None, "block 2 is not covered");
        // A change in block 2 is seen by the whole and by the range holding it only.
        data[2 * BLOCK as usize + 7] ^= 1;
        std::fs::write(&p, &data).unwrap();
        let whole2 = Fingerprint::of(&p).unwrap();
        assert!(!whole2.same_content(&whole));
        let a2 = Fingerprint::of_range(&p, 10, BLOCK + 5).unwrap();
        assert!(a2.same_content(&a), "blocks 0 and 1 did not change");
        let b2 = Fingerprint::of_range(&p, BLOCK + 5, size as u64).unwrap();
        assert!(!b2.same_content(&b) && !whole.contains(&b2) && whole2.contains(&b2));
        assert!(Fingerprint::combine([&a, &b2])
            .unwrap()
            .same_content(&whole2));
        // Parts that disagree where they overlap are of two different files.
        let mut other = data.clone();
        other[BLOCK as usize + 1] ^= 1;
        std::fs::write(&p, &other).unwrap();
        let a3 = Fingerprint::of_range(&p, 10, BLOCK + 5).unwrap();
        assert_eq!(Fingerprint::combine([&a3, &b2]), None);
    }

    #[test]
    fn overlap_is_refused_through_links_and_relative_paths() {
        let dir = tempfile::tempdir().unwrap();
        let ds = dir.path().join("dataset.parquet");
        std::fs::write(&ds, b"d").unwrap();
        let inputs = vec![("dataset".to_string(), ds.clone())];
        let e = refuse_overlap(&inputs, &[dir.path().join("./dataset.parquet")]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("dataset"), "{e}");
        #[cfg(unix)]
        {
            let link = dir.path().join("link.parquet");
            std::os::unix::fs::symlink(&ds, &link).unwrap();
            assert!(refuse_overlap(&inputs, &[link]).is_err());
        }
        refuse_overlap(&inputs, &[dir.path().join("emb.npy")]).unwrap();
    }
}
