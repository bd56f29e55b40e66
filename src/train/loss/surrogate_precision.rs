//! Surrogate precision@k (OML's `SurrogatePrecision`).
use super::{labels_tensor, Criterion, Logs, LossOutput, Reduction};
use crate::error::Result;
use crate::train::miner::pairwise_dist;
use crate::train::sampler::Rng;
use tch::{Kind, Tensor};

/// OML's functional surrogate precision@k on a distance matrix `[Q, G]` and a ground-truth
/// mask `[Q, G]`: `rank[b,c] = sum_a sigmoid((D[b,c] - D[b,a]) / t2)`,
/// `prec[b] = sum_c sigmoid((k - rank[b,c]) / t1) M[b,c] / min(sum_c M[b,c], k)`.
pub fn surrogate_precision(
    distances: &Tensor,
    mask_gt: &Tensor,
    k: usize,
    t1: f64,
    t2: f64,
    reduction: Reduction,
) -> Result<Tensor> {
    let diff = distances
        .f_unsqueeze(2)?
        .f_sub(&distances.f_unsqueeze(1)?)?; // [Q, c, a] = D[b,c] - D[b,a]
    let rank = diff
        .f_div_scalar(t2)?
        .f_sigmoid()?
        .f_sum_dim_intlist(2i64, false, None::<Kind>)?;
    let m = mask_gt.f_to_kind(distances.kind())?;
    let hit = rank
        .f_neg()?
        .f_add_scalar(k as f64)?
        .f_div_scalar(t1)?
        .f_sigmoid()?
        .f_mul(&m)?
        .f_sum_dim_intlist(1i64, false, None::<Kind>)?;
    let denom = m
        .f_sum_dim_intlist(1i64, false, None::<Kind>)?
        .f_clamp_max(k as f64)?;
    reduction.apply(&hit.f_div(&denom)?)
}

/// OML's `SurrogatePrecision` loss: the batch is query and gallery at once, so each item
/// finds itself at distance 0; precision is taken at `k + 1` with the self match counted.
/// `loss = 1 - reduce(prec)`.
pub struct SurrogatePrecision {
    pub k: usize,
    pub temperature1: f64,
    pub temperature2: f64,
    pub reduction: Reduction,
}

impl Criterion for SurrogatePrecision {
    fn name(&self) -> &'static str {
        "surrogate_precision"
    }

    fn forward(&mut self, features: &Tensor, labels: &[i64], _rng: &mut Rng) -> Result<LossOutput> {
        let d = pairwise_dist(features, features)?;
        let y = labels_tensor(labels, features)?;
        let mask = y.f_unsqueeze(1)?.f_eq_tensor(&y.f_unsqueeze(0)?)?;
        let prec = surrogate_precision(
            &d,
            &mask,
            self.k + 1,
            self.temperature1,
            self.temperature2,
            self.reduction,
        )?;
        Ok(LossOutput {
            loss: prec.f_neg()?.f_add_scalar(1.0)?,
            logs: Logs::new(),
        })
    }
}
