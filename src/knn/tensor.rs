//! The search through libtorch: per (query sub-chunk, gallery block), the scores
//! `bias + alpha * Q G^T` and a `topk` run on the device; the top entries come back to the
//! CPU and go through the same candidate buffers as the native kernels, so both engines
//! share the margin logic, the exact re-scoring and the ordering. On CUDA this is the fast
//! path; on the CPU it is the same code, which is how the tests cover it.
use crate::error::Result;
use crate::knn::job::{alpha, bias, prepare_row, Job};
use crate::knn::topk::Candidates;
use crate::knn::Compute;
use crate::retrieval::{QueryGallery, NO_SEQUENCE};
use rayon::prelude::*;
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

/// Gallery positions of each sequence code, to find the excluded pairs of a block without
/// testing every pair: only rows sharing the query's id or sequence can be excluded, and
/// each such pair is confirmed by [`QueryGallery::is_excluded`], the rule's one definition.
struct ExclusionIndex {
    by_seq: HashMap<u32, Vec<usize>>,
}

impl ExclusionIndex {
    fn new(qg: &QueryGallery, g: std::ops::Range<usize>) -> Self {
        let mut by_seq: HashMap<u32, Vec<usize>> = HashMap::new();
        for pos in g {
            let s = qg.gallery.seq[pos];
            if s != NO_SEQUENCE {
                by_seq.entry(s).or_default().push(pos);
            }
        }
        ExclusionIndex { by_seq }
    }

    /// Excluded (row in sub-chunk, column in block) pairs for queries `q` x gallery `g`.
    fn pairs(
        &self,
        qg: &QueryGallery,
        q: std::ops::Range<usize>,
        g: std::ops::Range<usize>,
    ) -> (Vec<i64>, Vec<i64>) {
        let (mut rows, mut cols) = (Vec::new(), Vec::new());
        for qp in q.clone() {
            let mut push = |gp: usize| {
                if g.contains(&gp) && qg.is_excluded(qp, gp) {
                    rows.push((qp - q.start) as i64);
                    cols.push((gp - g.start) as i64);
                }
            };
            if qg.same_dataset {
                if let Some(gp) = qg.gallery_pos(qg.queries.ids[qp]) {
                    push(gp);
                }
            }
            if let Some(list) = self.by_seq.get(&qg.queries.seq[qp]) {
                let a = list.partition_point(|&p| p < g.start);
                let b = list.partition_point(|&p| p < g.end);
                for &gp in &list[a..b] {
                    // Self is found above too; a pair is pushed once.
                    if !(qg.same_dataset && qg.queries.ids[qp] == qg.gallery.ids[gp]) {
                        push(gp);
                    }
                }
            }
        }
        (rows, cols)
    }
}

/// Block sizes: a sub-chunk's score matrix is `tq x bg` f32 on the device.
fn sizes(dev: Device) -> (usize, usize) {
    match dev {
        Device::Cpu => (1024, 4096),
        _ => (8192, 32768),
    }
}

fn to_device(v: &[f32], rows: usize, cols: usize, dev: Device, kind: Kind) -> Result<Tensor> {
    Ok(Tensor::f_from_slice(v)?
        .f_view([rows as i64, cols as i64])?
        .f_to_device(dev)?
        .f_to_kind(kind)?)
}

/// Scans the gallery for one chunk of queries (rows prepared in `qbuf`, positions from `q0`).
pub fn scan(
    job: &Job,
    dev: Device,
    qbuf: &[f32],
    q0: usize,
    states: &mut [Candidates],
    pb: &indicatif::ProgressBar,
) -> Result<()> {
    tch::no_grad(|| scan_inner(job, dev, qbuf, q0, states, pb))
}

fn scan_inner(
    job: &Job,
    dev: Device,
    qbuf: &[f32],
    q0: usize,
    states: &mut [Candidates],
    pb: &indicatif::ProgressBar,
) -> Result<()> {
    let d = job.queries.dim;
    let n = states.len();
    let kind = match job.compute {
        Compute::Fp32 => Kind::Float,
        Compute::Bf16 => Kind::BFloat16,
    };
    let (tq, bg) = sizes(dev);
    let alpha = alpha(job.metric) as f64;
    let index = ExclusionIndex::new(job.qg, job.g_range.clone());
    let q_all = to_device(qbuf, n, d, dev, kind)?;
    let mut gbuf: Vec<f32> = Vec::new();
    let mut bbuf: Vec<f32> = Vec::new();
    let release = job.gallery.streamed();
    let mut g0 = job.g_range.start;
    while g0 < job.g_range.end {
        let g1 = (g0 + bg).min(job.g_range.end);
        let nb = g1 - g0;
        gbuf.resize(nb * d, 0.0);
        bbuf.resize(nb, 0.0);
        gbuf.par_chunks_mut(d)
            .zip(bbuf.par_iter_mut())
            .enumerate()
            .for_each(|(r, (row, b))| {
                job.gallery.read(g0 + r, row);
                *b = bias(job.metric, prepare_row(job.metric, row));
            });
        let g_t = to_device(&gbuf, nb, d, dev, kind)?.f_tr()?;
        let b_t = Tensor::f_from_slice(&bbuf)?
            .f_to_device(dev)?
            .f_unsqueeze(0)?;
        let mut s0 = 0;
        while s0 < n {
            let s1 = (s0 + tq).min(n);
            let rows = s1 - s0;
            let mut scores = q_all
                .f_narrow(0, s0 as i64, rows as i64)?
                .f_matmul(&g_t)?
                .f_to_kind(Kind::Float)?
                .f_mul_scalar(alpha)?
                .f_add(&b_t)?;
            let (er, ec) = index.pairs(job.qg, q0 + s0..q0 + s1, g0..g1);
            if !er.is_empty() {
                let er = Tensor::f_from_slice(&er)?.f_to_device(dev)?;
                let ec = Tensor::f_from_slice(&ec)?.f_to_device(dev)?;
                let inf = Tensor::f_from_slice(&[f32::INFINITY])?.f_to_device(dev)?;
                let _ = scores.f_index_put_(&[Some(er), Some(ec)], &inf, false)?;
            }
            let kk = (states[s0].keep() + 16).min(nb);
            let (vals, idx) = scores.f_topk(kk as i64, 1, false, false)?;
            let vals: Vec<f32> = Vec::try_from(&vals.f_flatten(0, -1)?.f_to_device(Device::Cpu)?)?;
            let idx: Vec<i64> = Vec::try_from(&idx.f_flatten(0, -1)?.f_to_device(Device::Cpu)?)?;
            let mut refine = Vec::new();
            for r in 0..rows {
                let st = &mut states[s0 + r];
                let v = &vals[r * kk..(r + 1) * kk];
                let ix = &idx[r * kk..(r + 1) * kk];
                let mut vmax = f32::NEG_INFINITY;
                for (&s, &c) in v.iter().zip(ix) {
                    vmax = vmax.max(s);
                    // Excluded pairs are +inf; real scores are finite (checked inputs).
                    if s.is_finite() {
                        st.offer(s, (g0 + c as usize) as u32);
                    }
                }
                // Rows not returned score >= vmax; if that can still be within the limit
                // (ties at the cut, or a wide margin), fetch the whole row.
                if kk < nb && vmax <= st.limit() {
                    refine.push(r);
                }
            }
            for r in refine {
                let row: Vec<f32> =
                    Vec::try_from(&scores.f_get(r as i64)?.f_to_device(Device::Cpu)?)?;
                let mut taken: Vec<i64> = idx[r * kk..(r + 1) * kk].to_vec();
                taken.sort_unstable();
                let st = &mut states[s0 + r];
                for (c, &s) in row.iter().enumerate() {
                    if s.is_finite() && taken.binary_search(&(c as i64)).is_err() {
                        st.offer(s, (g0 + c) as u32);
                    }
                }
            }
            s0 = s1;
        }
        if release {
            job.gallery.release(g0, g1);
        }
        pb.inc((g1 - g0) as u64);
        g0 = g1;
    }
    Ok(())
}
