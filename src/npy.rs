//! `.npy` files: memory-mapped reading and streaming, atomic writing.
//!
//! Embeddings are `[M, D]` float32 or float16 in C order; ids are `[M]` int64. Files are
//! memory-mapped and never read whole, so a stage's anonymous memory does not grow with them.
use crate::error::{Error, IoContext, Result};
use crate::io::{AtomicFile, Sealed};
use half::f16;
use memmap2::Mmap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    I64,
}

impl DType {
    pub fn descr(self) -> &'static str {
        match self {
            DType::F32 => "<f4",
            DType::F16 => "<f2",
            DType::I64 => "<i8",
        }
    }
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 => 2,
            DType::I64 => 8,
        }
    }
    fn from_descr(d: &str) -> Option<DType> {
        match d {
            "<f4" | "=f4" | "f4" => Some(DType::F32),
            "<f2" | "=f2" | "f2" => Some(DType::F16),
            "<i8" | "=i8" | "i8" => Some(DType::I64),
            _ => None,
        }
    }
}

/// A memory-mapped `.npy` array.
#[derive(Debug)]
pub struct Npy {
    path: PathBuf,
    mmap: Bytes,
    offset: usize,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

/// An array's bytes: a file's read-only map, or a buffer in memory.
#[derive(Debug)]
enum Bytes {
    Map(Mmap),
    Memory(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Map(m) => m,
            Bytes::Memory(v) => v,
        }
    }
}

impl Npy {
    /// A float32 matrix `[data.len() / cols, cols]` in memory, for the code that searches
    /// embeddings it has just computed (validation, query expansion) without a file.
    pub fn from_f32(data: &[f32], cols: usize) -> Npy {
        let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        Npy {
            path: PathBuf::from("<in memory>"),
            mmap: Bytes::Memory(bytes),
            offset: 0,
            dtype: DType::F32,
            shape: vec![data.len() / cols.max(1), cols],
        }
    }

    /// Whether the bytes are a file's map (which the search may release as it passes).
    pub fn is_mapped(&self) -> bool {
        matches!(self.mmap, Bytes::Map(_))
    }

    pub fn open(path: impl AsRef<Path>) -> Result<Npy> {
        // A link is read as its target, so that the companions found beside `path()` (the
        // ids) are the target's, the ones its manifest describes.
        let path = crate::io::resolve_link(path.as_ref());
        let file = File::open(&path).at(&path)?;
        // SAFETY: the map is read-only; simile never writes a file it has mapped (outputs go
        // to a new temporary file and are renamed), so the contents cannot change under us
        // unless another program truncates the file, which no stage does.
        let mmap = unsafe { Mmap::map(&file) }.at(&path)?;
        let (dtype, shape, offset) = parse_header(&path, &mmap)?;
        // parse_header checked that the data's byte count fits in a usize.
        let data_bytes = shape.iter().product::<usize>() * dtype.size();
        if mmap.len() - offset < data_bytes {
            return Err(Error::input(format!(
                "{}: truncated .npy: header says shape {:?} ({} bytes of data) but the file has {} bytes after the header",
                path.display(),
                shape,
                data_bytes,
                mmap.len() - offset
            )));
        }
        Ok(Npy {
            path,
            mmap: Bytes::Map(mmap),
            offset,
            dtype,
            shape,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of rows (the first dimension).
    pub fn rows(&self) -> usize {
        self.shape.first().copied().unwrap_or(0)
    }

    /// Row width for a 2-d array (1 for a 1-d array).
    pub fn cols(&self) -> usize {
        self.shape.get(1).copied().unwrap_or(1)
    }

    /// The byte offset of the data in the file (after the header).
    pub fn data_offset(&self) -> usize {
        self.offset
    }

    pub fn data(&self) -> &[u8] {
        let n: usize = self.shape.iter().product();
        &self.mmap[self.offset..self.offset + n * self.dtype.size()]
    }

    /// Requires a 2-d float array and returns (rows, cols).
    pub fn expect_matrix(&self) -> Result<(usize, usize)> {
        if self.shape.len() != 2 || self.dtype == DType::I64 {
            return Err(Error::input(format!(
                "{}: expected a 2-d float32 or float16 array [rows, dim], found dtype {} with shape {:?}",
                self.path.display(),
                self.dtype.descr(),
                self.shape
            )));
        }
        Ok((self.shape[0], self.shape[1]))
    }

    /// Copies rows `[start, end)` of a float matrix into `out` as f32 (row-major).
    pub fn read_rows_f32(&self, start: usize, end: usize, out: &mut Vec<f32>) {
        let d = self.cols();
        out.clear();
        let bytes = &self.data()[start * d * self.dtype.size()..end * d * self.dtype.size()];
        match self.dtype {
            DType::F32 => out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            ),
            DType::F16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()),
            ),
            DType::I64 => out.extend(
                bytes
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32),
            ),
        }
    }

    /// The whole array as i64 (for ids files); refuses other dtypes.
    pub fn to_i64_vec(&self) -> Result<Vec<i64>> {
        if self.dtype != DType::I64 || self.shape.len() != 1 {
            return Err(Error::input(format!(
                "{}: expected a 1-d int64 array of ids, found dtype {} with shape {:?}",
                self.path.display(),
                self.dtype.descr(),
                self.shape
            )));
        }
        Ok(self
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect())
    }
}

fn parse_header(path: &Path, b: &[u8]) -> Result<(DType, Vec<usize>, usize)> {
    let bad = |why: &str| Error::input(format!("{}: not a valid .npy file: {why}", path.display()));
    if b.len() < 10 || &b[..6] != b"\x93NUMPY" {
        return Err(bad("missing the \\x93NUMPY magic"));
    }
    let major = b[6];
    let (hlen, start) = match major {
        1 => (u16::from_le_bytes([b[8], b[9]]) as usize, 10),
        2 | 3 => {
            if b.len() < 12 {
                return Err(bad("header truncated"));
            }
            (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12)
        }
        _ => return Err(bad(&format!("unsupported format version {major}"))),
    };
    if b.len() < start + hlen {
        return Err(bad("header truncated"));
    }
    let h = std::str::from_utf8(&b[start..start + hlen]).map_err(|_| bad("header not text"))?;
    let field = |key: &str| -> Option<&str> {
        let i = h.find(&format!("'{key}'"))?;
        let rest = &h[i + key.len() + 2..];
        let rest = rest.trim_start().strip_prefix(':')?.trim_start();
        Some(rest)
    };
    let descr = field("descr")
        .and_then(|r| r.strip_prefix('\'').and_then(|r| r.split('\'').next()))
        .ok_or_else(|| bad("no 'descr' in header"))?;
    let dtype = DType::from_descr(descr).ok_or_else(|| {
        Error::input(format!(
            "{}: unsupported dtype '{descr}': expected float32 ('<f4') or float16 ('<f2') embeddings, or int64 ('<i8') ids",
            path.display()
        ))
    })?;
    let fortran = field("fortran_order").ok_or_else(|| bad("no 'fortran_order' in header"))?;
    if fortran.starts_with("True") {
        return Err(Error::input(format!(
            "{}: Fortran-ordered array; save it in C order (np.ascontiguousarray)",
            path.display()
        )));
    }
    let shape_s = field("shape")
        .and_then(|r| r.strip_prefix('('))
        .and_then(|r| r.split(')').next())
        .ok_or_else(|| bad("no 'shape' in header"))?;
    let mut shape = Vec::new();
    for part in shape_s.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        shape.push(
            part.trim_end_matches('L')
                .parse::<usize>()
                .map_err(|_| bad("bad shape"))?,
        );
    }
    // Every size derived from the header (elements, bytes, the end of the data) must fit:
    // a crafted shape such as (2**62, 2**62) would otherwise wrap around and pass the
    // truncation check.
    let fits = shape
        .iter()
        .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
        .and_then(|bytes| bytes.checked_add(start + hlen))
        .is_some_and(|end| end <= isize::MAX as usize);
    if !fits {
        return Err(Error::input(format!(
            "{}: not a valid .npy file: header shape {shape:?} is too large (its size in bytes overflows)",
            path.display()
        )));
    }
    Ok((dtype, shape, start + hlen))
}

fn header_bytes(dtype: DType, shape: &[usize]) -> Vec<u8> {
    let shape_s = match shape.len() {
        1 => format!("({},)", shape[0]),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut h = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {}, }}",
        dtype.descr(),
        shape_s
    );
    // Pad so the data starts on a 64-byte boundary (numpy's own rule), ending in '\n'.
    let total = 10 + h.len() + 1;
    let pad = (64 - total % 64) % 64;
    h.push_str(&" ".repeat(pad));
    h.push('\n');
    let mut out = Vec::with_capacity(10 + h.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(h.len() as u16).to_le_bytes());
    out.extend_from_slice(h.as_bytes());
    out
}

/// Streams rows into a new `.npy` file of known shape, atomically.
pub struct NpyWriter {
    file: Option<AtomicFile>,
    dtype: DType,
    expected: usize,
    written: usize,
    buf: Vec<u8>,
    dest: PathBuf,
}

impl NpyWriter {
    pub fn create(dest: impl AsRef<Path>, dtype: DType, shape: &[usize]) -> Result<Self> {
        let dest = dest.as_ref().to_path_buf();
        let mut file = AtomicFile::create(&dest)?;
        file.file()
            .write_all(&header_bytes(dtype, shape))
            .at(&dest)?;
        Ok(NpyWriter {
            file: Some(file),
            dtype,
            expected: shape.iter().product(),
            written: 0,
            buf: Vec::new(),
            dest,
        })
    }

    fn flush_buf(&mut self) -> Result<()> {
        if self.buf.len() >= 1 << 20 {
            let f = self.file.as_mut().unwrap().file();
            f.write_all(&self.buf).at(&self.dest)?;
            self.buf.clear();
        }
        Ok(())
    }

    pub fn write_f32(&mut self, values: &[f32]) -> Result<()> {
        match self.dtype {
            DType::F32 => values
                .iter()
                .for_each(|v| self.buf.extend_from_slice(&v.to_le_bytes())),
            DType::F16 => values
                .iter()
                .for_each(|v| self.buf.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
            DType::I64 => return Err(Error::internal("write_f32 on an int64 .npy")),
        }
        self.written += values.len();
        self.flush_buf()
    }

    /// Appends raw little-endian element bytes of this writer's dtype.
    pub fn write_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.buf.extend_from_slice(bytes);
        self.written += bytes.len() / self.dtype.size();
        self.flush_buf()
    }

    pub fn write_i64(&mut self, values: &[i64]) -> Result<()> {
        if self.dtype != DType::I64 {
            return Err(Error::internal("write_i64 on a float .npy"));
        }
        values
            .iter()
            .for_each(|v| self.buf.extend_from_slice(&v.to_le_bytes()));
        self.written += values.len();
        self.flush_buf()
    }

    /// Completes the file and renames it into place.
    pub fn finish(self) -> Result<()> {
        self.seal()?.persist()
    }

    /// Completes the file under its temporary name, for a set committed together
    /// (`ManifestBuilder::commit`).
    pub fn seal(mut self) -> Result<Sealed> {
        if self.written != self.expected {
            return Err(Error::internal(format!(
                "{}: wrote {} elements, header promised {}",
                self.dest.display(),
                self.written,
                self.expected
            )));
        }
        let mut file = self.file.take().unwrap();
        let mut w = BufWriter::new(file.file());
        w.write_all(&self.buf).at(&self.dest)?;
        w.flush().at(&self.dest)?;
        drop(w);
        file.seal()
    }
}

/// Writes a 1-d int64 array atomically.
pub fn write_i64(dest: impl AsRef<Path>, values: &[i64]) -> Result<()> {
    seal_i64(dest, values)?.persist()
}

/// Writes a 1-d int64 array under its temporary name (see `io::Sealed`).
pub fn seal_i64(dest: impl AsRef<Path>, values: &[i64]) -> Result<Sealed> {
    let mut w = NpyWriter::create(dest, DType::I64, &[values.len()])?;
    w.write_i64(values)?;
    w.seal()
}

/// Writes a `[rows, cols]` f32 matrix atomically.
pub fn write_f32_matrix(
    dest: impl AsRef<Path>,
    values: &[f32],
    cols: usize,
    dtype: DType,
) -> Result<()> {
    seal_f32_matrix(dest, values, cols, dtype)?.persist()
}

/// Writes a `[rows, cols]` f32 matrix under its temporary name (see `io::Sealed`).
pub fn seal_f32_matrix(
    dest: impl AsRef<Path>,
    values: &[f32],
    cols: usize,
    dtype: DType,
) -> Result<Sealed> {
    let rows = values.len().checked_div(cols).unwrap_or(0);
    let mut w = NpyWriter::create(dest, dtype, &[rows, cols])?;
    w.write_f32(values)?;
    w.seal()
}

/// The ids file beside an embeddings file: `emb.npy` -> `emb.ids.npy`.
pub fn ids_path(emb: &Path) -> PathBuf {
    beside(emb, "ids.npy")
}

/// `<stem>.skipped.tsv` beside an embeddings file: the rows `--on-bad-image skip` left out.
pub fn skipped_path(emb: &Path) -> PathBuf {
    beside(emb, "skipped.tsv")
}

/// `<stem>.<suffix>` in the folder of `emb`.
fn beside(emb: &Path, suffix: &str) -> PathBuf {
    let stem = emb
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    emb.with_file_name(format!("{stem}.{suffix}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_f32_f16_i64() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("e.npy");
        let v: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 2.0).collect();
        write_f32_matrix(&p, &v, 3, DType::F32).unwrap();
        let n = Npy::open(&p).unwrap();
        assert_eq!(n.shape, vec![4, 3]);
        assert_eq!(n.offset % 64, 0);
        let mut out = Vec::new();
        n.read_rows_f32(1, 3, &mut out);
        assert_eq!(out, v[3..9].to_vec());
        let p16 = dir.path().join("h.npy");
        write_f32_matrix(&p16, &v, 3, DType::F16).unwrap();
        let n = Npy::open(&p16).unwrap();
        assert_eq!(n.dtype, DType::F16);
        n.read_rows_f32(0, 4, &mut out);
        assert_eq!(out, v);
        let pi = dir.path().join("e.ids.npy");
        write_i64(&pi, &[5, -1, 7]).unwrap();
        assert_eq!(
            Npy::open(&pi).unwrap().to_i64_vec().unwrap(),
            vec![5, -1, 7]
        );
        assert_eq!(ids_path(&p), pi);
    }

    #[test]
    fn rejects_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.npy");
        std::fs::write(&p, b"hello world, not npy").unwrap();
        assert!(Npy::open(&p).unwrap_err().to_string().contains("magic"));
        let mut bytes = header_bytes(DType::F32, &[10, 4]);
        bytes.extend_from_slice(&[0u8; 16]);
        std::fs::write(&p, &bytes).unwrap();
        assert!(Npy::open(&p).unwrap_err().to_string().contains("truncated"));
        let mut bytes = header_bytes(DType::F32, &[1, 1]);
        // Swap the dtype in place ('<f4' -> '<f8'): same length, so the header stays valid.
        let at = bytes.windows(3).position(|w| w == b"<f4").unwrap();
        bytes[at + 2] = b'8';
        bytes.extend_from_slice(&[0u8; 8]);
        std::fs::write(&p, &bytes).unwrap();
        assert!(Npy::open(&p)
            .unwrap_err()
            .to_string()
            .contains("unsupported dtype"));
    }
}
