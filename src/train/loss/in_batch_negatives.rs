//! In-batch negatives: sentence-transformers' `MultipleNegativesRankingLoss` on labelled
//! batches, the loss text encoders are usually fine-tuned with.
use super::{l2_normalize, pair_masks, Criterion, Logs, LossOutput};
use crate::error::{Error, Result};
use crate::train::sampler::Rng;
use tch::{Kind, Tensor};

/// Cross-entropy over the batch's scaled cosine similarities, with every text an anchor:
/// for each ordered pair `(i, j)` of two texts of one label,
/// `-log(exp(s_ij) / (exp(s_ij) + sum_k exp(s_ik)))` over the texts `k` of other labels,
/// `s = scale * cos`; the loss is the mean over those pairs. sentence-transformers'
/// `MultipleNegativesRankingLoss` is this with one positive per anchor and the candidates
/// on one side of (anchor, positive) pairs; a balance sampler's batch has no sides, so every
/// text of another label is a negative and no two texts of one label are negatives of each
/// other (a batch of the same verse in three translations must not push them apart). Logs
/// `accuracy` (the share of pairs whose positive beats every negative of its anchor),
/// `pos_sim` and `neg_sim` (mean cosines).
pub struct InBatchNegatives {
    pub scale: f64,
}

impl Criterion for InBatchNegatives {
    fn name(&self) -> &'static str {
        "in_batch_negatives"
    }

    fn forward(&mut self, features: &Tensor, labels: &[i64], _rng: &mut Rng) -> Result<LossOutput> {
        let (pos, neg) = pair_masks(labels, features)?;
        let n_pos = pos.f_sum(Kind::Int64)?.f_int64_value(&[])?;
        if n_pos == 0 {
            return Err(Error::input(format!(
                "in_batch_negatives: a batch of {} texts with no two of one label; use the balance sampler with n_instances >= 2",
                labels.len()
            )));
        }
        if neg.f_sum(Kind::Int64)?.f_int64_value(&[])? == 0 {
            return Err(Error::input(format!(
                "in_batch_negatives: a batch of {} texts of one label has no negatives; use the balance sampler with n_labels >= 2",
                labels.len()
            )));
        }
        let x = l2_normalize(&features.f_to_kind(Kind::Float)?)?;
        let cos = x.f_matmul(&x.f_tr()?)?;
        let s = cos.f_mul_scalar(self.scale)?;
        // log sum_k exp(s_ik) over row i's negatives (-inf where there are none); the pair's
        // term is then log(1 + exp(neg_lse_i - s_ij)) = softplus(neg_lse_i - s_ij).
        let neg_lse = s
            .f_masked_fill(&neg.f_logical_not()?, f64::NEG_INFINITY)?
            .f_logsumexp([1i64], true)?;
        let terms = neg_lse.f_sub(&s)?.f_softplus()?;
        let loss = terms.f_masked_select(&pos)?.f_mean(Kind::Float)?;
        let logs = tch::no_grad(|| -> Result<Logs> {
            let mut logs = Logs::new();
            let posf = pos.f_to_kind(Kind::Float)?;
            let negf = neg.f_to_kind(Kind::Float)?;
            let mean = |m: &Tensor| -> Result<f64> {
                let n = m.f_sum(Kind::Float)?.f_double_value(&[])?;
                Ok(cos.f_mul(m)?.f_sum(Kind::Float)?.f_double_value(&[])? / n.max(1.0))
            };
            let hardest = cos
                .f_masked_fill(&neg.f_logical_not()?, f64::NEG_INFINITY)?
                .f_amax([1i64], true)?;
            let wins = cos.f_gt_tensor(&hardest)?.f_logical_and(&pos)?;
            logs.insert(
                "accuracy".into(),
                wins.f_sum(Kind::Float)?.f_double_value(&[])? / n_pos as f64,
            );
            logs.insert("pos_sim".into(), mean(&posf)?);
            logs.insert("neg_sim".into(), mean(&negf)?);
            Ok(logs)
        })?;
        Ok(LossOutput { loss, logs })
    }
}
