//! The multi-similarity loss (pytorch-metric-learning's `MultiSimilarityLoss`).
use super::{l2_normalize, pair_masks, Criterion, Logs, LossOutput};
use crate::error::Result;
use crate::train::sampler::Rng;
use tch::{Kind, Tensor};

/// pytorch-metric-learning's `MultiSimilarityLoss` over all pairs: with cosine similarity
/// `S` of the L2-normalised embeddings, per anchor
/// `(1/alpha) log(1 + sum_pos exp(-alpha (S - base))) + (1/beta) log(1 + sum_neg exp(beta (S - base)))`,
/// averaged over the anchors (a term without pairs is 0).
pub struct MultiSimilarity {
    pub alpha: f64,
    pub beta: f64,
    pub base: f64,
}

impl Criterion for MultiSimilarity {
    fn name(&self) -> &'static str {
        "multi_similarity"
    }

    fn forward(&mut self, features: &Tensor, labels: &[i64], _rng: &mut Rng) -> Result<LossOutput> {
        let x = l2_normalize(features)?;
        let s = x.f_matmul(&x.f_tr()?)?;
        let (pos, neg) = pair_masks(labels, features)?;
        // log(1 + sum_{mask} exp(v)) as a logsumexp with a zero column.
        let log1p_sum_exp = |v: Tensor, mask: &Tensor| -> Result<Tensor> {
            let v = v.f_masked_fill(&mask.f_logical_not()?, f64::NEG_INFINITY)?;
            let zero = Tensor::f_zeros([v.size()[0], 1], (v.kind(), v.device()))?;
            Ok(Tensor::f_cat(&[v, zero], 1)?.f_logsumexp(1i64, false)?)
        };
        let pos_t = log1p_sum_exp(s.f_sub_scalar(self.base)?.f_mul_scalar(-self.alpha)?, &pos)?
            .f_div_scalar(self.alpha)?;
        let neg_t = log1p_sum_exp(s.f_sub_scalar(self.base)?.f_mul_scalar(self.beta)?, &neg)?
            .f_div_scalar(self.beta)?;
        let loss = pos_t.f_add(&neg_t)?.f_mean(None::<Kind>)?;
        let logs = tch::no_grad(|| -> Result<Logs> {
            let mean_s = |m: &Tensor| -> Result<f64> {
                let mf = m.f_to_kind(s.kind())?;
                let n = mf.f_sum(Kind::Float)?.f_double_value(&[])?;
                Ok(s.f_mul(&mf)?.f_sum(Kind::Float)?.f_double_value(&[])? / n)
            };
            let mut logs = Logs::new();
            logs.insert("pos_sim".into(), mean_s(&pos)?);
            logs.insert("neg_sim".into(), mean_s(&neg)?);
            Ok(logs)
        })?;
        Ok(LossOutput { loss, logs })
    }
}
