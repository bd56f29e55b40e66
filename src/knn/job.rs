//! What a search is, shared by its two engines (the CPU kernel in `search` and the libtorch
//! scan in `tensor`): the job, its statistics, the error bound of the f32 ranking score, and
//! the metric's row preparation (`score = bias(g) + alpha <q', g'>`).
use crate::knn::rows::Rows;
use crate::knn::{Compute, Engine, Metric};
use crate::retrieval::QueryGallery;
use std::ops::Range;

/// One search: which queries and gallery rows, how, and the exclusion rule (its positions are
/// the positions of `queries` and `gallery`).
pub struct Job<'a> {
    pub queries: &'a Rows<'a>,
    pub gallery: &'a Rows<'a>,
    pub q_range: Range<usize>,
    pub g_range: Range<usize>,
    pub k: usize,
    pub metric: Metric,
    pub compute: Compute,
    pub engine: Engine,
    pub qg: &'a QueryGallery,
    /// Bytes for a query chunk's rows and candidate buffers; more queries per chunk means
    /// fewer passes over the gallery.
    pub memory_budget: usize,
}

/// Unit roundoff of f32.
const U32: f64 = 1.0 / (1u64 << 24) as f64;

/// Bound on the absolute error of a ranking score (`||g||^2 - 2 q.g`, `-q.g` or `-q^.g^`)
/// computed in f32 by any summation order, against the exact value, including the rounding
/// of the final distance to f32 (so that ties in the output are never split by the margin):
/// `(D + 32) u (||q|| + max ||g||)^2` with 10% to spare. The worst-case dot-product bound is
/// `gamma_D sum |q_i g_i| <= D u ||q|| ||g||`; the rest covers the norms, the final FMA,
/// cosine normalisation and the output rounding.
pub fn error_bound(d: usize, qnorm: f64, gmax: f64) -> f64 {
    1.1 * (d as f64 + 32.0) * U32 * (qnorm + gmax).powi(2)
}

/// Extra candidates re-scored in bf16 mode, where no useful bound exists.
pub fn bf16_margin(k: usize) -> usize {
    k.max(32)
}

/// What a search did, for the summary and the manifest.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub queries: usize,
    pub gallery: usize,
    pub gallery_passes: usize,
    pub candidates_rescored: u64,
    pub seconds_scan: f64,
    pub seconds_rescore: f64,
    /// CPU seconds of the process (all threads) in each phase: on a busy machine the wall
    /// clock says little about the code.
    pub cpu_scan: f64,
    pub cpu_rescore: f64,
}

/// CPU time of the whole process, in seconds.
pub fn process_cpu_seconds() -> f64 {
    #[cfg(unix)]
    {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes the timespec we pass.
        if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) } == 0 {
            return ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9;
        }
    }
    0.0
}

/// Normalises `row` in place for cosine; returns the squared norm of the original.
#[inline]
pub fn prepare_row(metric: Metric, row: &mut [f32]) -> f64 {
    let n2: f64 = row.iter().map(|&v| v as f64 * v as f64).sum();
    if metric == Metric::Cosine {
        let r = if n2 > 0.0 { 1.0 / n2.sqrt() } else { 0.0 };
        for v in row.iter_mut() {
            *v = (*v as f64 * r) as f32;
        }
    }
    n2
}

/// The ranking score is `bias(g) + alpha * <q', g'>`.
pub fn alpha(metric: Metric) -> f32 {
    match metric {
        Metric::L2 => -2.0,
        Metric::Cosine | Metric::Dot => -1.0,
    }
}

#[inline]
pub fn bias(metric: Metric, n2: f64) -> f32 {
    match metric {
        Metric::L2 => n2 as f32,
        Metric::Cosine | Metric::Dot => 0.0,
    }
}
