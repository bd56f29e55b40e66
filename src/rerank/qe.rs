//! Query expansion and database-side augmentation: each vector is replaced by a weighted
//! combination of itself and its top neighbours, then the queries are searched again through
//! the exact search of [`crate::knn`] (same metric, same exclusions).
//!
//! - AQE (Chum et al., ICCV 2007): `q' = normalise(q + sum_i g_i)` over the query's top `k`.
//! - alpha-QE (Radenovic et al., TPAMI 2018): the same sum weighted by `max(0, cos(q, g_i))^alpha`.
//! - DBA (database-side augmentation, Arandjelovic & Zisserman 2012, Gordo et al. 2017): every
//!   gallery vector replaced by the weighted combination of itself and its own top `k` gallery
//!   neighbours (gallery against gallery, excluding itself and its sequence), then the queries
//!   (optionally expanded against the augmented gallery too) searched against it.
//!
//! One formula covers all three: a row's own weight is 1, a neighbour's `w(cos) = max(0, cos)^alpha`
//! with `alpha = 0` meaning 1 (a plain sum). For `l2` and `cosine` the vectors are
//! L2-normalised before and after (where the two metrics rank alike); for `dot` they are used as
//! they are and the combination is the weighted mean, so its scale stays that of the inputs.
use crate::error::{Error, Result};
use crate::knn::rows::Rows;
use crate::knn::search::{self, Job, Stats};
use crate::knn::{Compute, Engine, Metric};
use crate::npy::Npy;
use crate::retrieval::QueryGallery;
use rayon::prelude::*;

/// Each query position's neighbours: `(gallery position, distance)`, sorted.
pub type Lists = Vec<Vec<(u32, f32)>>;

/// Dense row-major vectors in memory.
#[derive(Clone, Debug, PartialEq)]
pub struct Matrix {
    pub rows: usize,
    pub dim: usize,
    pub data: Vec<f32>,
}

impl Matrix {
    /// Every position of `rows`, as f32, L2-normalised when `normalise`.
    pub fn from_rows(rows: &Rows, normalise: bool) -> Matrix {
        let dim = rows.dim;
        let mut data = vec![0f32; rows.len() * dim];
        data.par_chunks_mut(dim.max(1))
            .enumerate()
            .for_each(|(i, r)| {
                rows.read(i, r);
                if normalise {
                    normalise_row(r);
                }
            });
        Matrix {
            rows: rows.len(),
            dim,
            data,
        }
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }
}

/// Scales `v` to unit L2 norm (a zero vector stays zero).
pub fn normalise_row(v: &mut [f32]) {
    let n: f64 = v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    if n > 0.0 {
        for x in v.iter_mut() {
            *x = (*x as f64 / n) as f32;
        }
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 {
        0.0
    } else {
        ab / (aa.sqrt() * bb.sqrt())
    }
}

/// A neighbour's weight: `max(0, cos)^alpha`, and 1 for `alpha = 0` (plain average).
pub fn weight(cos: f64, alpha: f64) -> f64 {
    if alpha == 0.0 {
        1.0
    } else {
        cos.max(0.0).powf(alpha)
    }
}

/// Whether a metric's vectors are L2-normalised for expansion.
pub fn normalises(metric: Metric) -> bool {
    metric != Metric::Dot
}

/// Each row of `base` combined with its first `k` listed rows of `others` (positions).
pub fn expand(
    base: &Matrix,
    others: &Matrix,
    lists: &[Vec<u32>],
    k: usize,
    alpha: f64,
    metric: Metric,
) -> Matrix {
    let d = base.dim;
    let mut data = vec![0f32; base.data.len()];
    data.par_chunks_mut(d.max(1)).enumerate().for_each_init(
        || vec![0f64; d],
        |acc, (i, out)| {
            let q = base.row(i);
            acc.iter_mut().zip(q).for_each(|(a, &x)| *a = x as f64);
            let mut total = 1f64;
            for &g in lists[i].iter().take(k) {
                let gv = others.row(g as usize);
                let w = weight(cosine(q, gv), alpha);
                total += w;
                acc.iter_mut()
                    .zip(gv)
                    .for_each(|(a, &x)| *a += w * x as f64);
            }
            if normalises(metric) {
                let n = acc.iter().map(|a| a * a).sum::<f64>().sqrt();
                let s = if n > 0.0 { 1.0 / n } else { 0.0 };
                out.iter_mut()
                    .zip(acc.iter())
                    .for_each(|(o, a)| *o = (a * s) as f32);
            } else {
                out.iter_mut()
                    .zip(acc.iter())
                    .for_each(|(o, a)| *o = (a / total) as f32);
            }
        },
    );
    Matrix {
        rows: base.rows,
        dim: d,
        data,
    }
}

/// Runs exact searches of in-memory vectors through [`crate::knn::search`].
pub struct Searcher {
    pub engine: Engine,
    pub metric: Metric,
    pub memory_budget: usize,
}

impl Searcher {
    /// Top `k` of every row of `q` among the rows of `g`, with `qg`'s exclusions (its sides'
    /// positions are the rows of `q` and `g`): `(gallery position, distance)` sorted by
    /// (distance, position).
    pub fn search(
        &self,
        q: &Matrix,
        g: &Matrix,
        qg: &QueryGallery,
        k: usize,
        name: &str,
    ) -> Result<(Lists, Stats)> {
        if q.rows != qg.queries.len() || g.rows != qg.gallery.len() {
            return Err(Error::internal(format!(
                "search {name}: {} x {} vectors for {} queries x {} gallery rows",
                q.rows,
                g.rows,
                qg.queries.len(),
                qg.gallery.len()
            )));
        }
        let (qn, gn) = (Npy::from_f32(&q.data, q.dim), Npy::from_f32(&g.data, g.dim));
        let qmap: Vec<usize> = (0..q.rows).collect();
        let gmap: Vec<usize> = (0..g.rows).collect();
        let queries = Rows::new(&qn, &qmap, &qg.queries.ids);
        let gallery = Rows::new(&gn, &gmap, &qg.gallery.ids);
        search_rows(
            &queries,
            &gallery,
            qg,
            k,
            self.metric,
            self.engine,
            self.memory_budget,
        )
    }
}

/// Every query of `queries` against `gallery`: the lists, in query position order.
pub fn search_rows(
    queries: &Rows,
    gallery: &Rows,
    qg: &QueryGallery,
    k: usize,
    metric: Metric,
    engine: Engine,
    memory_budget: usize,
) -> Result<(Lists, Stats)> {
    let job = Job {
        queries,
        gallery,
        q_range: 0..queries.len(),
        g_range: 0..gallery.len(),
        k,
        metric,
        compute: Compute::Fp32,
        engine,
        qg,
        memory_budget,
    };
    let mut lists = vec![Vec::new(); queries.len()];
    let stats = search::search(&job, |q, l| {
        lists[q] = l.to_vec();
        Ok(())
    })?;
    Ok((lists, stats))
}

/// The gallery searched against itself: each gallery row excludes itself and the rows of its
/// own (non-null) sequence, the same rule a query obeys.
pub fn gallery_vs_gallery(qg: &QueryGallery) -> QueryGallery {
    QueryGallery {
        queries: qg.gallery.clone(),
        gallery: qg.gallery.clone(),
        same_dataset: true,
        rule: qg.rule,
    }
}

/// Which expansion, with its parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Expansion {
    /// Query expansion from the input lists' top `k` (AQE: `alpha = 0`).
    Query { k: usize, alpha: f64 },
    /// Database-side augmentation with the gallery's own top `k`; with `qe`, the queries are
    /// then expanded against the augmented gallery (their top `k` there, weights `alpha`).
    Dba {
        k: usize,
        alpha: f64,
        qe: Option<(usize, f64)>,
    },
}

/// What an expansion did, for the manifest.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub searches: Vec<(String, f64)>,
}

fn positions(lists: &[Vec<(u32, f32)>]) -> Vec<Vec<u32>> {
    lists
        .iter()
        .map(|l| l.iter().map(|x| x.0).collect())
        .collect()
}

/// Expands and re-searches: the final top `top_k` of every query (gallery positions).
/// `input` holds each query position's input list (gallery positions, sorted).
pub fn run(
    q: &Matrix,
    g: &Matrix,
    input: &[Vec<(u32, f32)>],
    qg: &QueryGallery,
    how: Expansion,
    searcher: &Searcher,
    top_k: usize,
) -> Result<(Lists, Report)> {
    let mut report = Report::default();
    let mut timed = |name: &str, qv: &Matrix, gv: &Matrix, qg: &QueryGallery, k: usize| {
        let t = std::time::Instant::now();
        let r = searcher.search(qv, gv, qg, k, name).map(|(l, _)| l);
        report
            .searches
            .push((name.to_string(), t.elapsed().as_secs_f64()));
        r
    };
    let lists = match how {
        Expansion::Query { k, alpha } => {
            let q2 = expand(q, g, &positions(input), k, alpha, searcher.metric);
            timed("query", &q2, g, qg, top_k)?
        }
        Expansion::Dba { k, alpha, qe } => {
            let gg = gallery_vs_gallery(qg);
            let own = timed("gallery", g, g, &gg, k)?;
            let g2 = expand(g, g, &positions(&own), k, alpha, searcher.metric);
            drop(own);
            let q2 = match qe {
                Some((qk, qalpha)) => {
                    let first = timed("first", q, &g2, qg, qk)?;
                    expand(q, &g2, &positions(&first), qk, qalpha, searcher.metric)
                }
                None => q.clone(),
            };
            timed("query", &q2, &g2, qg, top_k)?
        }
    };
    Ok((lists, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(rows: &[&[f32]]) -> Matrix {
        Matrix {
            rows: rows.len(),
            dim: rows[0].len(),
            data: rows.iter().flat_map(|r| r.iter().copied()).collect(),
        }
    }

    #[test]
    fn aqe_alpha_qe_and_dot_weighting() {
        let q = m(&[&[1.0, 0.0]]);
        let g = m(&[&[0.0, 1.0], &[0.6, 0.8], &[-1.0, 0.0]]);
        // AQE with k=2: q + g1 + g0 (list order), normalised.
        let out = expand(&q, &g, &[vec![1, 0, 2]], 2, 0.0, Metric::L2);
        let (x, y) = (1.6f64, 1.8f64);
        let n = (x * x + y * y).sqrt();
        assert!((out.data[0] as f64 - x / n).abs() < 1e-6);
        assert!((out.data[1] as f64 - y / n).abs() < 1e-6);
        // alpha-QE, alpha=3: g1 weighs 0.6^3, g0 (cos 0) nothing, g2 (cos -1) nothing.
        let out = expand(&q, &g, &[vec![1, 0, 2]], 3, 3.0, Metric::Cosine);
        let w = 0.216f64;
        let (x, y) = (1.0 + w * 0.6, w * 0.8);
        let n = (x * x + y * y).sqrt();
        assert!((out.data[0] as f64 - x / n).abs() < 1e-6);
        assert!((out.data[1] as f64 - y / n).abs() < 1e-6);
        // dot: the weighted mean, not normalised.
        let out = expand(&q, &g, &[vec![0]], 1, 0.0, Metric::Dot);
        assert_eq!(out.data, vec![0.5, 0.5]);
    }
}
