//! One side's embeddings: a memory-mapped `.npy` (float32 or float16) read row by row through
//! the map from side positions to `.npy` rows, never whole.
use crate::error::{Error, Result};
use crate::knn::Metric;
use crate::npy::{DType, Npy};
use half::f16;
use rayon::prelude::*;
use std::path::Path;

/// Rows of one side (queries or gallery).
pub struct Rows<'a> {
    npy: &'a Npy,
    f16: bool,
    /// Row width.
    pub dim: usize,
    /// `.npy` row of each side position.
    map: &'a [usize],
    /// Id of each side position (for messages).
    ids: &'a [i64],
    /// Large files only: the file and its data offset, for re-scoring reads (see
    /// [`Rows::fetch`]).
    file: Option<(std::fs::File, u64)>,
}

/// Files whose mapped rows exceed this are streamed: released block by block as the scan
/// passes, and re-scoring reads rows with `pread` instead of touching the map (each touch
/// would map a 64 KiB neighbourhood, and scattered rows would map the whole file back in).
/// Smaller files stay mapped, which saves system calls and page faults.
pub const STREAM_ABOVE: usize = 256 << 20;

/// Byte offset of a `.npy`'s data: after the magic, version, header length and header.
fn data_offset(path: &Path) -> Option<u64> {
    use std::io::Read;
    let mut head = [0u8; 12];
    std::fs::File::open(path).ok()?.read_exact(&mut head).ok()?;
    match head[6] {
        1 => Some(10 + u16::from_le_bytes([head[8], head[9]]) as u64),
        2 | 3 => Some(12 + u32::from_le_bytes([head[8], head[9], head[10], head[11]]) as u64),
        _ => None,
    }
}

impl<'a> Rows<'a> {
    /// `npy` must be a float matrix (checked by the caller with `Npy::expect_matrix`).
    pub fn new(npy: &'a Npy, map: &'a [usize], ids: &'a [i64]) -> Rows<'a> {
        debug_assert_eq!(map.len(), ids.len());
        let data_len = npy.data().len();
        let file = (npy.is_mapped() && data_len > STREAM_ABOVE)
            .then(|| {
                let off = data_offset(npy.path())?;
                let f = std::fs::File::open(npy.path()).ok()?;
                // The same bytes as the map, or no file reads at all.
                (f.metadata().ok()?.len() >= off + data_len as u64).then_some((f, off))
            })
            .flatten();
        Rows {
            npy,
            f16: npy.dtype == DType::F16,
            dim: npy.cols(),
            map,
            ids,
            file,
        }
    }

    /// Whether this side is streamed (see [`STREAM_ABOVE`]).
    pub fn streamed(&self) -> bool {
        self.npy.is_mapped() && self.npy.data().len() > STREAM_ABOVE
    }

    /// Like [`Rows::read`], for scattered rows: from the file with `pread` when the side is
    /// streamed, else from the map.
    #[inline]
    pub fn fetch(&self, pos: usize, out: &mut [f32]) {
        #[cfg(unix)]
        if let Some((f, off)) = &self.file {
            use std::os::unix::fs::FileExt;
            let rb = self.row_bytes();
            let mut bytes = [0u8; 4096];
            if rb <= bytes.len()
                && f.read_exact_at(&mut bytes[..rb], off + (self.map[pos] * rb) as u64)
                    .is_ok()
            {
                self.decode(&bytes[..rb], out);
                return;
            }
        }
        self.read(pos, out)
    }

    #[inline(always)]
    fn decode(&self, bytes: &[u8], out: &mut [f32]) {
        if self.f16 {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        } else {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn path(&self) -> &Path {
        self.npy.path()
    }

    pub fn id(&self, pos: usize) -> i64 {
        self.ids[pos]
    }

    /// The `.npy` row of side position `pos`.
    pub fn npy_row(&self, pos: usize) -> usize {
        self.map[pos]
    }

    fn row_bytes(&self) -> usize {
        self.dim * if self.f16 { 2 } else { 4 }
    }

    /// Copies side position `pos` into `out` (length `dim`) as f32.
    #[inline(always)]
    pub fn read(&self, pos: usize, out: &mut [f32]) {
        let rb = self.row_bytes();
        let start = self.map[pos] * rb;
        self.decode(&self.npy.data()[start..start + rb], out);
    }

    /// Side position `pos`'s row straight from the map, when the file is float32 and the
    /// data 4-byte aligned (numpy aligns it to 64); else `None` (use [`Rows::read`]).
    #[inline]
    pub fn row_f32(&self, pos: usize) -> Option<&'a [f32]> {
        if self.f16 || self.file.is_some() {
            return None;
        }
        let data: &'a [u8] = self.npy.data();
        let start = self.map[pos] * self.dim * 4;
        let bytes = &data[start..start + self.dim * 4];
        if !(bytes.as_ptr() as usize).is_multiple_of(4) || cfg!(target_endian = "big") {
            return None;
        }
        // SAFETY: in bounds, aligned for f32 (checked), little-endian like the file, and
        // every bit pattern is a valid f32.
        Some(unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const f32, self.dim) })
    }

    /// Asks the CPU to start loading side position `pos`'s row into cache: re-scoring reads
    /// rows in random order, and without this each row waits on memory latency.
    #[inline(always)]
    pub fn prefetch(&self, pos: usize) {
        #[cfg(target_arch = "x86_64")]
        if self.file.is_none() {
            let rb = self.row_bytes();
            let start = self.map[pos] * rb;
            let data = self.npy.data();
            let mut off = start & !63;
            while off < start + rb {
                // SAFETY: prefetching is a hint that never faults; the address is in the map.
                unsafe {
                    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                        data.as_ptr().add(off.min(data.len() - 1)) as *const i8,
                    )
                };
                off += 64;
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = pos;
    }

    /// Tells the kernel the mapped pages of positions `[start, end)` are no longer needed, so
    /// streaming a gallery through the map keeps resident memory bounded by the block size.
    /// The map is read-only and file-backed: dropped pages are re-read from the page cache if
    /// touched again, so this is only ever a hint.
    pub fn release(&self, start: usize, end: usize) {
        if start >= end {
            return;
        }
        let (lo, hi) = self.map[start..end]
            .iter()
            .fold((usize::MAX, 0), |(lo, hi), &r| (lo.min(r), hi.max(r)));
        let rb = self.row_bytes();
        let data = self.npy.data();
        advise_dontneed(&data[lo * rb..(hi + 1) * rb]);
    }

    /// Checks every row of positions `[start, end)` is finite with a squared norm inside the
    /// float32 range. Returns the largest norm (1 for cosine, whose vectors are normalised
    /// before the products) or the bad row with the smallest `.npy` row number and why.
    pub fn scan(&self, start: usize, end: usize, metric: Metric) -> Result<f64, (usize, Error)> {
        const CHUNK: usize = 1024;
        let n_chunks = (end - start).div_ceil(CHUNK);
        // Per chunk: the largest norm and the first bad row (`.npy` row, position, why).
        type Bad = Option<(usize, usize, String)>;
        let per_chunk: Vec<(f64, Bad)> = (0..n_chunks)
            .into_par_iter()
            .map(|c| {
                let mut buf = vec![0f32; self.dim];
                let mut max = 0f64;
                let mut bad: Bad = None;
                let a = start + c * CHUNK;
                let b = (a + CHUNK).min(end);
                for pos in a..b {
                    self.read(pos, &mut buf);
                    let why = if let Some(col) = buf.iter().position(|v| !v.is_finite()) {
                        let what = if buf[col].is_nan() {
                            "NaN"
                        } else {
                            "an infinite value"
                        };
                        Some(format!("{what} in column {col}"))
                    } else {
                        let n2: f64 = buf.iter().map(|&v| (v as f64) * (v as f64)).sum();
                        max = max.max(n2.sqrt());
                        // Squared norms must fit in f32 with room for the expansion's sums.
                        (n2 > (f32::MAX as f64) / 16.0).then(|| {
                            format!("squared norm {n2:e}, beyond the float32 range; rescale the embeddings")
                        })
                    };
                    if let Some(why) = why {
                        if bad.as_ref().is_none_or(|b| self.map[pos] < b.0) {
                            bad = Some((self.map[pos], pos, why));
                        }
                    }
                }
                if self.streamed() {
                    self.release(a, b);
                }
                (max, bad)
            })
            .collect();
        if let Some((row, pos, why)) = per_chunk
            .iter()
            .filter_map(|(_, bad)| bad.clone())
            .min_by_key(|b| b.0)
        {
            return Err((
                row,
                Error::input(format!(
                    "{}: row {row} (id {}) has {why}; embeddings must be finite",
                    self.path().display(),
                    self.ids[pos]
                )),
            ));
        }
        let max = per_chunk.iter().map(|(m, _)| *m).fold(0f64, f64::max);
        Ok(if metric == Metric::Cosine { 1.0 } else { max })
    }
}

#[cfg(unix)]
fn advise_dontneed(bytes: &[u8]) {
    // SAFETY: the range lies inside a live read-only file mapping; MADV_DONTNEED on such a
    // mapping only drops this process's page-table entries (pages are re-read on access).
    unsafe {
        let page = libc::sysconf(libc::_SC_PAGESIZE).max(4096) as usize;
        let start = bytes.as_ptr() as usize;
        let lo = start / page * page;
        let hi = (start + bytes.len()).div_ceil(page) * page;
        libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_DONTNEED);
    }
}

#[cfg(not(unix))]
fn advise_dontneed(_: &[u8]) {}
