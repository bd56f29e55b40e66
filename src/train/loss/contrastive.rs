//! The contrastive loss (pytorch-metric-learning's `ContrastiveLoss`).
use super::{l2_normalize, pair_masks, Criterion, Logs, LossOutput};
use crate::error::Result;
use crate::train::miner::pairwise_dist;
use crate::train::sampler::Rng;
use tch::{Kind, Tensor};

/// pytorch-metric-learning's `ContrastiveLoss` over all pairs of the batch (both orders):
/// positives `relu(d - pos_margin)`, negatives `relu(neg_margin - d)`, each averaged over
/// its non-zero terms (pml's `AvgNonZeroReducer`; 0 when none), summed. `d` is the
/// Euclidean distance between L2-normalised embeddings (pml's default `LpDistance`), or
/// between the raw embeddings with `normalize = false`. Logs `pos_dist`, `neg_dist` and
/// the shares of non-zero pairs `active_pos`, `active_neg`.
pub struct Contrastive {
    pub pos_margin: f64,
    pub neg_margin: f64,
    pub normalize: bool,
}

impl Criterion for Contrastive {
    fn name(&self) -> &'static str {
        "contrastive"
    }

    fn forward(&mut self, features: &Tensor, labels: &[i64], _rng: &mut Rng) -> Result<LossOutput> {
        let x = if self.normalize {
            l2_normalize(features)?
        } else {
            features.shallow_clone()
        };
        let d = pairwise_dist(&x, &x)?;
        let (pos, neg) = pair_masks(labels, features)?;
        let (posf, negf) = (pos.f_to_kind(d.kind())?, neg.f_to_kind(d.kind())?);
        let pos_l = d.f_sub_scalar(self.pos_margin)?.f_relu()?.f_mul(&posf)?;
        let neg_l = d
            .f_neg()?
            .f_add_scalar(self.neg_margin)?
            .f_relu()?
            .f_mul(&negf)?;
        let avg_non_zero = |l: &Tensor| -> Result<Tensor> {
            let n = l.f_gt(0.0)?.f_sum(Kind::Float)?.f_clamp_min(1.0)?;
            Ok(l.f_sum(None::<Kind>)?.f_div(&n)?)
        };
        let loss = avg_non_zero(&pos_l)?.f_add(&avg_non_zero(&neg_l)?)?;
        let logs = tch::no_grad(|| -> Result<Logs> {
            let mut logs = Logs::new();
            let share = |l: &Tensor, m: &Tensor| -> Result<f64> {
                let n = m.f_sum(Kind::Float)?.f_double_value(&[])?;
                Ok(l.f_gt(0.0)?.f_sum(Kind::Float)?.f_double_value(&[])? / n)
            };
            let mean_d = |m: &Tensor| -> Result<f64> {
                let n = m.f_sum(Kind::Float)?.f_double_value(&[])?;
                Ok(d.f_mul(m)?.f_sum(Kind::Float)?.f_double_value(&[])? / n)
            };
            logs.insert("active_pos".into(), share(&pos_l, &posf)?);
            logs.insert("active_neg".into(), share(&neg_l, &negf)?);
            logs.insert("pos_dist".into(), mean_d(&posf)?);
            logs.insert("neg_dist".into(), mean_d(&negf)?);
            Ok(logs)
        })?;
        Ok(LossOutput { loss, logs })
    }
}
