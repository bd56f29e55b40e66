//! The embedding-based metrics of the score stage: FNMR@FMR over every non-excluded
//! (query, gallery) pair, recomputed in blocks from memory-mapped embeddings, and PCF.
use super::fnmr::{self, Counts, Pass};
use super::pcf;
use crate::dataset::{Dataset, Split};
use crate::error::{Error, Result};
use crate::knn::Metric;
use crate::npy::Npy;
use crate::retrieval::QueryGallery;
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

/// The distance a neighbours file holds (its `metric`; empty in files that predate the
/// key: L2), recomputed the same way: `knn::Metric`, the one distance enum.
pub fn distance_of(metric: &str) -> Result<Metric> {
    if metric.is_empty() {
        return Ok(Metric::L2);
    }
    metric.parse().map_err(|e| {
        Error::input(format!(
            "unknown distance metric in the neighbours file: {e}"
        ))
    })
}

/// A memory-mapped embeddings file and the dataset ids of its rows.
pub struct Embeddings {
    pub npy: Npy,
    pub dim: usize,
    row_of: HashMap<i64, usize>,
}

impl Embeddings {
    /// Opens `path` for `ds`: rows map to ids through the sibling `<stem>.ids.npy`, else
    /// the rows must be those of `split` in id order, or of the whole dataset.
    pub fn open(path: &Path, ds: &Dataset, split: Option<Split>) -> Result<Embeddings> {
        let npy = crate::embeddings::open(path, &ds.file)?;
        let dim = npy.cols();
        // The one ids rule (duplicates and unknown ids refused), as every reader.
        let of_row = crate::embeddings::rows_of_dataset(ds, &ds.file, &npy, path, split)?;
        let row_of = of_row
            .iter()
            .enumerate()
            .filter(|(_, &e)| e != usize::MAX)
            .map(|(r, &e)| (ds.ids[r], e))
            .collect();
        Ok(Embeddings { npy, dim, row_of })
    }

    /// The embedding rows of `ids`; an error names the first id without one.
    pub fn rows_of(&self, ids: &[i64]) -> Result<Vec<usize>> {
        ids.iter()
            .map(|id| {
                self.row_of.get(id).copied().ok_or_else(|| {
                    Error::input(format!(
                        "{}: no embedding for dataset id {id}",
                        self.npy.path().display()
                    ))
                })
            })
            .collect()
    }

    /// Copies the given rows into `out` (row-major f32) and refuses NaN or infinite values.
    pub fn gather(&self, rows: &[usize], out: &mut Vec<f32>) -> Result<()> {
        out.clear();
        out.reserve(rows.len() * self.dim);
        let mut one = Vec::with_capacity(self.dim);
        for &r in rows {
            self.npy.read_rows_f32(r, r + 1, &mut one);
            if one.iter().any(|v| !v.is_finite()) {
                return Err(Error::input(format!(
                    "{}: row {r} has a NaN or infinite value",
                    self.npy.path().display()
                )));
            }
            out.extend_from_slice(&one);
        }
        Ok(())
    }
}

/// A block of rows prepared for the distance product: row-major, unit rows for cosine,
/// with squared norms for L2.
struct Prepared {
    x: Vec<f32>,
    sq: Vec<f32>,
    n: usize,
}

fn prepare(mut x: Vec<f32>, d: usize, kind: Metric) -> Prepared {
    // d > 0: `Embeddings::open` refuses zero-width embeddings.
    let n = x.len() / d;
    let mut sq = Vec::new();
    match kind {
        Metric::L2 => {
            sq = x
                .chunks_exact(d)
                .map(|r| r.iter().map(|v| v * v).sum())
                .collect();
        }
        Metric::Cosine => {
            for r in x.chunks_exact_mut(d) {
                let norm = r.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                r.iter_mut().for_each(|v| *v /= norm);
            }
        }
        Metric::Dot => {}
    }
    Prepared { x, sq, n }
}

/// `out[i][j] = q_i . g_j` for row-major `q` (m x d) and `g` (n x d).
fn inner_products(q: &[f32], m: usize, g: &[f32], n: usize, d: usize, out: &mut Vec<f32>) {
    out.clear();
    out.resize(m * n, 0.0);
    if m == 0 || n == 0 || d == 0 {
        return;
    }
    assert!(q.len() >= m * d && g.len() >= n * d);
    // SAFETY: the pointers and strides describe row-major q (m x d), g read as its transpose
    // (d x n), and out (m x n); the asserts and the resize above give their lengths.
    unsafe {
        matrixmultiply::sgemm(
            m,
            d,
            n,
            1.0,
            q.as_ptr(),
            d as isize,
            1,
            g.as_ptr(),
            1,
            d as isize,
            0.0,
            out.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

const QUERY_BLOCK: usize = 1024;
/// Queries per parallel task: one small product and its classification.
const QUERY_TASK: usize = 64;
const GALLERY_BLOCK: usize = 4096;
/// Prepared gallery blocks are kept between query blocks and passes up to this size.
const GALLERY_CACHE_BYTES: usize = 512 << 20;

thread_local! {
    static IP: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Exact FNMR@FMR over every non-excluded (query, gallery) pair of `qg`, distances
/// recomputed from the embeddings in blocks (pure Rust products, parallel over queries);
/// memory bounded by the block sizes.
pub fn fnmr_from_embeddings(
    qg: &QueryGallery,
    q_emb: &Embeddings,
    g_emb: &Embeddings,
    kind: Metric,
    fmr: &[f64],
) -> Result<Vec<Option<f64>>> {
    if q_emb.dim != g_emb.dim {
        return Err(Error::input(format!(
            "{} has width {} but {} has width {}",
            q_emb.npy.path().display(),
            q_emb.dim,
            g_emb.npy.path().display(),
            g_emb.dim
        )));
    }
    let d = q_emb.dim;
    let q_rows = q_emb.rows_of(&qg.queries.ids)?;
    let g_rows = g_emb.rows_of(&qg.gallery.ids)?;
    let nq = q_rows.len();
    let ng = g_rows.len();
    let gather = |e: &Embeddings, rows: &[usize]| -> Result<Prepared> {
        let mut buf = Vec::new();
        e.gather(rows, &mut buf)?;
        Ok(prepare(buf, d, kind))
    };
    let cache: Option<Vec<Prepared>> = if ng * d * 4 <= GALLERY_CACHE_BYTES {
        Some(
            (0..ng)
                .step_by(GALLERY_BLOCK)
                .map(|g0| gather(g_emb, &g_rows[g0..(g0 + GALLERY_BLOCK).min(ng)]))
                .collect::<Result<_>>()?,
        )
    } else {
        None
    };
    let threads = rayon::current_num_threads();
    let feed = |pass: &Pass| -> Result<Counts> {
        let states: Vec<Mutex<Counts>> = (0..threads + 1)
            .map(|_| Mutex::new(Counts::new(pass)))
            .collect();
        for q0 in (0..nq).step_by(QUERY_BLOCK) {
            let q1 = (q0 + QUERY_BLOCK).min(nq);
            let qp = gather(q_emb, &q_rows[q0..q1])?;
            for (bi, g0) in (0..ng).step_by(GALLERY_BLOCK).enumerate() {
                let owned;
                let gp = match &cache {
                    Some(c) => &c[bi],
                    None => {
                        owned = gather(g_emb, &g_rows[g0..(g0 + GALLERY_BLOCK).min(ng)])?;
                        &owned
                    }
                };
                (0..qp.n.div_ceil(QUERY_TASK))
                    .into_par_iter()
                    .for_each(|task| {
                        let t0 = task * QUERY_TASK;
                        let m = QUERY_TASK.min(qp.n - t0);
                        let t = rayon::current_thread_index().map_or(threads, |t| t.min(threads));
                        let mut c = states[t].lock().expect("no panics while counting");
                        IP.with(|ip| {
                            let mut ip = ip.borrow_mut();
                            inner_products(&qp.x[t0 * d..], m, &gp.x, gp.n, d, &mut ip);
                            for (i, row) in ip.chunks_exact(gp.n).enumerate() {
                                let q = q0 + t0 + i;
                                for (j, &p) in row.iter().enumerate() {
                                    let g = g0 + j;
                                    if qg.is_excluded(q, g) {
                                        continue;
                                    }
                                    let dist = match kind {
                                        Metric::L2 => {
                                            (qp.sq[t0 + i] + gp.sq[j] - 2.0 * p).max(0.0).sqrt()
                                        }
                                        Metric::Cosine => 1.0 - p,
                                        Metric::Dot => -p,
                                    };
                                    c.add(pass, dist, qg.is_positive(q, g));
                                }
                            }
                        });
                    });
            }
        }
        let mut it = states
            .into_iter()
            .map(|m| m.into_inner().expect("no panics while counting"));
        let first = it.next().expect("at least one state");
        Ok(it.fold(first, |a, b| a.merge(&b)))
    };
    fnmr::streaming_fnmr(fmr, feed)
}

/// One item PCF is computed over: which embeddings file (0 queries', 1 gallery's) and row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Item {
    pub source: u8,
    pub row: usize,
}

/// PCF of a set of items, streamed from their embeddings files.
pub fn pcf_of_items(
    items: &[Item],
    sources: [&Embeddings; 2],
    r: &[f64],
) -> Result<Vec<Option<f64>>> {
    let d = sources[0].dim;
    if sources[1].dim != d {
        return Err(Error::input(format!(
            "{} has width {} but {} has width {}",
            sources[0].npy.path().display(),
            d,
            sources[1].npy.path().display(),
            sources[1].dim
        )));
    }
    let mut rows = Vec::new();
    let mut one = Vec::new();
    pcf::pcf_of_rows(items.len(), d, r, |s, e, out| {
        out.clear();
        // Items are sorted by source then row, so runs share one file.
        for src in 0..2u8 {
            rows.clear();
            rows.extend(
                items[s..e]
                    .iter()
                    .filter(|i| i.source == src)
                    .map(|i| i.row),
            );
            if !rows.is_empty() {
                sources[src as usize].gather(&rows, &mut one)?;
                out.extend_from_slice(&one);
            }
        }
        Ok(())
    })
}
