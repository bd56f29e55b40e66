//! The blocked driver: query chunks (their candidate buffers bounded by a memory budget) x
//! the gallery streamed in blocks, then exact re-scoring of every query's candidates.
use crate::error::{Error, Result};
use crate::knn::exact;
pub use crate::knn::job::{
    alpha, bf16_margin, bias, error_bound, prepare_row, process_cpu_seconds, Job, Stats,
};
use crate::knn::kernel::{self, Aligned, Format, Isa, TileOut, MR, NR};
use crate::knn::topk::Candidates;
use crate::knn::{tensor, Compute, Engine, Metric};
use rayon::prelude::*;

/// Runs the search; calls `sink(query position, neighbours)` for every query of `q_range`
/// in order, with `(gallery position, distance)` sorted by (distance, gallery position),
/// at most `k` of them.
pub fn search(job: &Job, sink: impl FnMut(usize, &[(u32, f32)]) -> Result<()>) -> Result<Stats> {
    search_isa(job, Isa::detect(), sink)
}

/// Searches embeddings in memory (row-major `[rows, dim]`, float32; the queries and the gallery
/// are rows `q_map` and `g_map` of it) as `simile-distance` does by default: L2, exact, float32,
/// the exclusion rule of `qg`. For validation while training, which has just computed them.
#[allow(clippy::too_many_arguments)]
pub fn search_matrix(
    emb: &[f32],
    dim: usize,
    qg: &crate::retrieval::QueryGallery,
    q_map: &[usize],
    g_map: &[usize],
    k: usize,
    device: tch::Device,
    sink: impl FnMut(usize, &[(u32, f32)]) -> Result<()>,
) -> Result<Stats> {
    let npy = crate::npy::Npy::from_f32(emb, dim);
    let queries = crate::knn::rows::Rows::new(&npy, q_map, &qg.queries.ids);
    let gallery = crate::knn::rows::Rows::new(&npy, g_map, &qg.gallery.ids);
    let job = Job {
        queries: &queries,
        gallery: &gallery,
        q_range: 0..qg.queries.len(),
        g_range: 0..qg.gallery.len(),
        k,
        metric: Metric::L2,
        compute: Compute::Fp32,
        engine: Engine::resolve(crate::knn::Backend::Auto, device)?,
        qg,
        memory_budget: 256 << 20,
    };
    search(&job, sink)
}

/// [`search`] with the native kernels limited to `isa` (tests run the portable kernels).
pub fn search_isa(
    job: &Job,
    isa: Isa,
    mut sink: impl FnMut(usize, &[(u32, f32)]) -> Result<()>,
) -> Result<Stats> {
    let d = job.queries.dim;
    if job.gallery.dim != d {
        return Err(Error::input(format!(
            "dimension mismatch: {} has {} columns, {} has {}",
            job.queries.path().display(),
            d,
            job.gallery.path().display(),
            job.gallery.dim
        )));
    }
    if job.k == 0 {
        return Err(Error::input("--top-k must be at least 1"));
    }
    if job.g_range.len() > u32::MAX as usize {
        return Err(Error::input(format!(
            "a gallery of {} rows is more than one search handles; split it with --gallery-shard",
            job.g_range.len()
        )));
    }
    // Finite inputs first (nothing is written before this): the first bad row of either side.
    let gscan = job
        .gallery
        .scan(job.g_range.start, job.g_range.end, job.metric);
    let qscan = job
        .queries
        .scan(job.q_range.start, job.q_range.end, job.metric);
    let gmax = match (gscan, qscan) {
        (Ok(g), Ok(_)) => g,
        (Err((a, e)), Err((b, f))) => return Err(if b < a { f } else { e }),
        (Err((_, e)), _) | (_, Err((_, e))) => return Err(e),
    };

    let (keep, exact_bound) = match job.compute {
        Compute::Fp32 => (job.k, true),
        Compute::Bf16 => (job.k + bf16_margin(job.k), false),
    };
    let fmt = match job.compute {
        Compute::Fp32 => Format::F32,
        Compute::Bf16 => Format::Bf16,
    };
    let per_query = d * 4 + fmt.kd(d) * 4 + Candidates::bytes_for(keep) + 64;
    let chunk = (job.memory_budget / per_query).clamp(MR * PANELS_PER_TASK, 1 << 20);
    let mut stats = Stats {
        queries: job.q_range.len(),
        gallery: job.g_range.len(),
        ..Stats::default()
    };
    let n_chunks = job.q_range.len().div_ceil(chunk);
    let pb = crate::progress::bar((n_chunks * job.g_range.len()) as u64, "distance");
    let mut qbuf: Vec<f32> = Vec::new();
    let mut c0 = job.q_range.start;
    while c0 < job.q_range.end {
        let c1 = (c0 + chunk).min(job.q_range.end);
        let n = c1 - c0;
        let t0 = std::time::Instant::now();
        let c0_cpu = process_cpu_seconds();
        // The chunk's query rows, prepared (normalised for cosine), and their buffers.
        qbuf.resize(n * d, 0.0);
        let mut states: Vec<Candidates> = qbuf
            .par_chunks_mut(d)
            .enumerate()
            .map(|(i, row)| {
                job.queries.read(c0 + i, row);
                let n2 = prepare_row(job.metric, row);
                let qn = if job.metric == Metric::Cosine {
                    1.0
                } else {
                    n2.sqrt()
                };
                let slack = if exact_bound {
                    2.0 * error_bound(d, qn, gmax)
                } else {
                    0.0
                };
                Candidates::new(keep, slack as f32)
            })
            .collect();
        match job.engine {
            Engine::Native => scan_native(job, fmt, isa, &qbuf, c0, &mut states, &pb),
            Engine::Torch(dev) => tensor::scan(job, dev, &qbuf, c0, &mut states, &pb)?,
        }
        stats.gallery_passes += 1;
        stats.seconds_scan += t0.elapsed().as_secs_f64();
        let c1_cpu = process_cpu_seconds();
        stats.cpu_scan += c1_cpu - c0_cpu;
        let t1 = std::time::Instant::now();
        let lists: Vec<Vec<(u32, f32)>> = states
            .into_par_iter()
            .enumerate()
            .map_init(
                || (vec![0f32; d], vec![0f32; d]),
                |(q, g), (i, st)| rescore(job, c0 + i, st.finish(), q, g),
            )
            .collect();
        stats.candidates_rescored += lists.iter().map(|l| l.len() as u64).sum::<u64>();
        stats.seconds_rescore += t1.elapsed().as_secs_f64();
        stats.cpu_rescore += process_cpu_seconds() - c1_cpu;
        for (i, l) in lists.iter().enumerate() {
            sink(c0 + i, &l[..l.len().min(job.k)])?;
        }
        c0 = c1;
    }
    pb.finish_and_clear();
    Ok(stats)
}

/// Exact distances of a query's candidates, sorted by (distance, gallery position). Returns
/// them all (the caller cuts at k) so the count re-scored can be reported.
fn rescore(
    job: &Job,
    qpos: usize,
    cands: Vec<(f32, u32)>,
    q: &mut [f32],
    g: &mut [f32],
) -> Vec<(u32, f32)> {
    // Rows are fetched a few candidates ahead: they are scattered over the gallery and each
    // would otherwise wait on memory.
    const AHEAD: usize = 4;
    for c in cands.iter().take(AHEAD) {
        job.gallery.prefetch(c.1 as usize);
    }
    let qrow: &[f32] = match job.queries.row_f32(qpos) {
        Some(r) => r,
        None => {
            job.queries.read(qpos, q);
            q
        }
    };
    let mut out: Vec<(u32, f32)> = Vec::with_capacity(cands.len());
    for i in 0..cands.len() {
        if let Some(c) = cands.get(i + AHEAD) {
            job.gallery.prefetch(c.1 as usize);
        }
        let pos = cands[i].1;
        let grow: &[f32] = match job.gallery.row_f32(pos as usize) {
            Some(r) => r,
            None => {
                job.gallery.fetch(pos as usize, g);
                g
            }
        };
        out.push((pos, exact::distance(job.metric, qrow, grow)));
    }
    out.sort_unstable_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
    out
}

/// Gallery rows per block: the packed block should stay in a core's L2 while every query
/// panel streams past it.
fn block_rows(kd: usize) -> usize {
    const TARGET: usize = 384 * 1024;
    let rows = TARGET / (kd * 4);
    (rows / NR * NR).clamp(NR, 8192)
}

/// Query panels per parallel task.
const PANELS_PER_TASK: usize = 4;

fn scan_native(
    job: &Job,
    fmt: Format,
    isa: Isa,
    qbuf: &[f32],
    q0: usize,
    states: &mut [Candidates],
    pb: &indicatif::ProgressBar,
) {
    let d = job.queries.dim;
    let kd = fmt.kd(d);
    let alpha = alpha(job.metric);
    let n = states.len();
    let panels = n.div_ceil(MR);
    let mut a = Aligned::default();
    a.resize(panels * kd * MR);
    a.as_u32_mut()
        .par_chunks_mut(kd * MR)
        .enumerate()
        .for_each(|(p, panel)| {
            for r in 0..MR.min(n - p * MR) {
                let qi = p * MR + r;
                kernel::pack_row(panel, MR, r, &qbuf[qi * d..(qi + 1) * d], fmt);
            }
        });
    let bg = block_rows(kd);
    let mut b = Aligned::default();
    b.resize(bg / NR * kd * NR);
    let mut bias = vec![0f32; bg];
    let release = job.gallery.streamed();
    let mut g0 = job.g_range.start;
    while g0 < job.g_range.end {
        let g1 = (g0 + bg).min(job.g_range.end);
        let bpanels = (g1 - g0).div_ceil(NR);
        b.as_u32_mut()[..bpanels * kd * NR]
            .par_chunks_mut(kd * NR)
            .zip(bias.par_chunks_mut(NR))
            .enumerate()
            .for_each_init(
                || vec![0f32; d],
                |row, (p, (panel, bi))| {
                    for (r, bv) in bi.iter_mut().enumerate() {
                        let pos = g0 + p * NR + r;
                        if pos < g1 {
                            job.gallery.read(pos, row);
                            let n2 = prepare_row(job.metric, row);
                            kernel::pack_row(panel, NR, r, row, fmt);
                            *bv = self::bias(job.metric, n2);
                        } else {
                            // Padding: a NaN score never passes a limit.
                            row.iter_mut().for_each(|v| *v = 0.0);
                            kernel::pack_row(panel, NR, r, row, fmt);
                            *bv = f32::NAN;
                        }
                    }
                },
            );
        let bq = b.as_u32();
        let bias_ref = &bias;
        states
            .par_chunks_mut(MR * PANELS_PER_TASK)
            .zip(a.as_u32().par_chunks(kd * MR * PANELS_PER_TASK))
            .enumerate()
            .for_each(|(t, (st, ap))| {
                let mut out = TileOut::default();
                for (pi, (rows, apanel)) in st.chunks_mut(MR).zip(ap.chunks(kd * MR)).enumerate() {
                    let qbase = q0 + (t * PANELS_PER_TASK + pi) * MR;
                    let mut lim = [f32::NAN; MR];
                    for (l, s) in lim.iter_mut().zip(rows.iter()) {
                        *l = s.limit();
                    }
                    for bp in 0..bpanels {
                        let bpanel = &bq[bp * kd * NR..(bp + 1) * kd * NR];
                        let bb = &bias_ref[bp * NR..(bp + 1) * NR];
                        if !kernel::tile(isa, fmt, apanel, bpanel, kd, alpha, bb, &lim, &mut out) {
                            continue;
                        }
                        let gbase = g0 + bp * NR;
                        for (i, st) in rows.iter_mut().enumerate() {
                            let mut m = out.masks[i];
                            while m != 0 {
                                let j = m.trailing_zeros() as usize;
                                m &= m - 1;
                                if !job.qg.is_excluded(qbase + i, gbase + j) {
                                    st.offer(out.scores[i][j], (gbase + j) as u32);
                                }
                            }
                            lim[i] = st.limit();
                        }
                    }
                }
            });
        if release {
            job.gallery.release(g0, g1);
        }
        pb.inc((g1 - g0) as u64);
        g0 = g1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::{Dataset, Split};
    use crate::knn::rows::Rows;
    use crate::npy::{self, DType, Npy};
    use crate::retrieval::{QueryGallery, SequenceRule};

    /// Native kernels (portable and AVX-512, fp32 and bf16, several chunk sizes) and the
    /// libtorch path agree with an exhaustive exact search, exclusions included.
    #[test]
    fn engines_and_kernels_agree_with_exhaustive() {
        let (n, d) = (150usize, 21usize);
        let mut seed = 5u64;
        let mut r = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        let emb: Vec<f32> = (0..n * d).map(|_| r()).collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.npy");
        npy::write_f32_matrix(&path, &emb, d, DType::F32).unwrap();
        let npy = Npy::open(&path).unwrap();
        let ds = Dataset {
            ids: (0..n as i64).map(|i| i * 2).collect(),
            label: vec![Some(0); n],
            split: vec![Split::Validation; n],
            is_query: (0..n).map(|i| Some(i % 3 != 0)).collect(),
            is_gallery: (0..n).map(|i| Some(i % 4 != 1)).collect(),
            category: vec![None; n],
            sequence: (0..n)
                .map(|i| (i % 5 == 0).then(|| format!("s{}", i % 15)))
                .collect(),
            ..Dataset::default()
        };
        let qg =
            QueryGallery::from_dataset(&ds, Split::Validation, SequenceRule::default()).unwrap();
        let qmap: Vec<usize> = qg.queries.rows.clone();
        let gmap: Vec<usize> = qg.gallery.rows.clone();
        let queries = Rows::new(&npy, &qmap, &qg.queries.ids);
        let gallery = Rows::new(&npy, &gmap, &qg.gallery.ids);
        let k = 6;
        for metric in [Metric::L2, Metric::Cosine, Metric::Dot] {
            // Exhaustive reference.
            let want: Vec<Vec<(u32, f32)>> = (0..queries.len())
                .map(|q| {
                    let qv = &emb[qmap[q] * d..(qmap[q] + 1) * d];
                    let mut l: Vec<(u32, f32)> = (0..gallery.len())
                        .filter(|&g| !qg.is_excluded(q, g))
                        .map(|g| {
                            (
                                g as u32,
                                exact::distance(metric, qv, &emb[gmap[g] * d..(gmap[g] + 1) * d]),
                            )
                        })
                        .collect();
                    l.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
                    l.truncate(k);
                    l
                })
                .collect();
            let mut runs = vec![];
            for isa in [Isa::portable(), Isa::detect()] {
                for compute in [Compute::Fp32, Compute::Bf16] {
                    for budget in [1, 1 << 20] {
                        runs.push((Engine::Native, isa, compute, budget));
                    }
                }
            }
            runs.push((
                Engine::Torch(tch::Device::Cpu),
                Isa::portable(),
                Compute::Fp32,
                1 << 20,
            ));
            for (engine, isa, compute, budget) in runs {
                let job = Job {
                    queries: &queries,
                    gallery: &gallery,
                    q_range: 0..queries.len(),
                    g_range: 0..gallery.len(),
                    k,
                    metric,
                    compute,
                    engine,
                    qg: &qg,
                    memory_budget: budget,
                };
                let mut got = vec![Vec::new(); queries.len()];
                search_isa(&job, isa, |q, l| {
                    got[q] = l.to_vec();
                    Ok(())
                })
                .unwrap();
                assert_eq!(
                    got, want,
                    "{metric} {engine:?} {isa:?} {compute:?} budget {budget}"
                );
            }
        }
    }
}
