//! Atomic file writes and file fingerprints: the two things every stage does to its files.
//!
//! Every output goes through [`atomic_write`] (or [`AtomicFile`]): the bytes are written to a
//! temporary file in the destination folder and renamed over the final name only when
//! complete, so a killed or failed run never leaves a partial or stale file under that name.
use crate::error::{Error, IoContext, Result};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;
use xxhash_rust::xxh3::Xxh3;

/// A file being written under a temporary name beside its final path.
/// Dropped without [`AtomicFile::commit`], the temporary file is deleted.
pub struct AtomicFile {
    tmp: tempfile::NamedTempFile,
    dest: PathBuf,
}

impl AtomicFile {
    pub fn create(dest: impl AsRef<Path>) -> Result<Self> {
        let dest = dest.as_ref().to_path_buf();
        let dir = parent_dir(&dest);
        if !dir.as_os_str().is_empty() && !dir.exists() {
            std::fs::create_dir_all(&dir).at(&dir)?;
        }
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "out".into());
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".tmp")
            .tempfile_in(&dir)
            .at(&dir)?;
        Ok(AtomicFile { tmp, dest })
    }

    pub fn file(&mut self) -> &mut File {
        self.tmp.as_file_mut()
    }

    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    /// Flushes to disk and renames over the destination.
    pub fn commit(self) -> Result<()> {
        let AtomicFile { tmp, dest } = self;
        tmp.as_file().sync_all().at(&dest)?;
        // tempfile creates 0600 files; outputs are ordinary files readable as usual.
        set_default_permissions(tmp.path());
        tmp.persist(&dest).map_err(|e| Error::io(&dest, e.error))?;
        Ok(())
    }
}

#[cfg(unix)]
fn set_default_permissions(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644));
}
#[cfg(not(unix))]
fn set_default_permissions(_: &Path) {}

fn parent_dir(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Writes a whole file atomically from a closure that fills a writer.
pub fn atomic_write<F>(dest: impl AsRef<Path>, fill: F) -> Result<()>
where
    F: FnOnce(&mut std::io::BufWriter<&mut File>) -> Result<()>,
{
    let mut f = AtomicFile::create(dest.as_ref())?;
    {
        let mut w = std::io::BufWriter::new(f.file());
        fill(&mut w)?;
        w.flush().at(dest.as_ref())?;
    }
    f.commit()
}

/// Writes bytes atomically.
pub fn atomic_write_bytes(dest: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    let d = dest.as_ref().to_path_buf();
    atomic_write(&d, |w| w.write_all(bytes).at(&d))
}

/// What identifies a file's content without reading all of it.
///
/// `hash` covers the size, the first and last 64 KiB (a `.npy` header, a Parquet footer) and
/// 64 evenly spaced 4 KiB blocks in between, so any rewrite of a real artifact changes it.
/// `mtime_ns` is recorded but not compared: datasets move between machines and containers,
/// and a copy must stay the same input. `content_hash` (with `--verify`) hashes every byte.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Fingerprint {
    pub size: u64,
    pub mtime_ns: i128,
    pub hash: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_hash: Option<String>,
}

const EDGE: u64 = 64 * 1024;
const BLOCK: u64 = 4096;
const BLOCKS: u64 = 64;

impl Fingerprint {
    /// Fingerprints a file; `verify` also hashes its whole content.
    pub fn of(path: impl AsRef<Path>, verify: bool) -> Result<Self> {
        let path = path.as_ref();
        let mut f = File::open(path).at(path)?;
        let meta = f.metadata().at(path)?;
        let size = meta.len();
        let mtime_ns = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(0);
        let mut h = Xxh3::new();
        h.update(&size.to_le_bytes());
        let mut buf = vec![0u8; EDGE as usize];
        let mut read_at = |f: &mut File, off: u64, len: u64, h: &mut Xxh3| -> Result<()> {
            f.seek(SeekFrom::Start(off)).at(path)?;
            let b = &mut buf[..len as usize];
            f.read_exact(b).at(path)?;
            h.update(b);
            Ok(())
        };
        if size <= 2 * EDGE + BLOCKS * BLOCK {
            read_at(&mut f, 0, size.min(EDGE), &mut h)?;
            if size > EDGE {
                // Small files: hash everything after the head too, in EDGE pieces.
                let mut off = EDGE;
                while off < size {
                    let len = (size - off).min(EDGE);
                    read_at(&mut f, off, len, &mut h)?;
                    off += len;
                }
            }
        } else {
            read_at(&mut f, 0, EDGE, &mut h)?;
            let span = size - 2 * EDGE - BLOCK;
            for i in 0..BLOCKS {
                read_at(&mut f, EDGE + span * i / (BLOCKS - 1), BLOCK, &mut h)?;
            }
            read_at(&mut f, size - EDGE, EDGE, &mut h)?;
        }
        let content_hash = if verify { Some(hash_file(path)?) } else { None };
        Ok(Fingerprint {
            size,
            mtime_ns,
            hash: format!("xxh3:{:016x}", h.digest()),
            content_hash,
        })
    }

    /// Whether two fingerprints name the same content (see the type's documentation).
    pub fn same_content(&self, other: &Fingerprint) -> bool {
        if self.size != other.size || self.hash != other.hash {
            return false;
        }
        match (&self.content_hash, &other.content_hash) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        }
    }
}

/// xxh3 of a whole file.
pub fn hash_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).at(path)?;
    let mut h = Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).at(path)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("xxh3:{:016x}", h.digest()))
}

/// Refuses to read an output path that is also an input (it would be replaced mid-run).
pub fn ensure_distinct(input: &Path, output: &Path) -> Result<()> {
    if let (Ok(a), Ok(b)) = (input.canonicalize(), output.canonicalize()) {
        if a == b {
            return Err(Error::input(format!(
                "{}: the output would overwrite an input; choose another --out",
                output.display()
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
    }

    #[test]
    fn fingerprint_tracks_content_not_mtime() {
        let dir = tempfile::tempdir().unwrap();
        for size in [10usize, 200_000, 3_000_000] {
            let a = dir.path().join("a");
            let mut data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
            std::fs::write(&a, &data).unwrap();
            let fa = Fingerprint::of(&a, false).unwrap();
            let b = dir.path().join("b");
            std::fs::write(&b, &data).unwrap();
            assert!(fa.same_content(&Fingerprint::of(&b, false).unwrap()));
            // A change in the middle of a large file is seen through the sampled blocks
            // (the change covers more than one block gap).
            let mid = size / 2;
            for x in data
                .iter_mut()
                .skip(mid.saturating_sub(30_000))
                .take(60_000)
            {
                *x ^= 0xff;
            }
            std::fs::write(&b, &data).unwrap();
            assert!(!fa.same_content(&Fingerprint::of(&b, false).unwrap()));
            let v = Fingerprint::of(&a, true).unwrap();
            assert!(v.content_hash.is_some());
        }
    }
}
