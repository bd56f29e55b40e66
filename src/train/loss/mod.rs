//! Training losses: triplet (with a miner), ArcFace (and with an MLP), surrogate
//! precision@k (OML's `oml/losses/*.py`), contrastive and multi-similarity
//! (pytorch-metric-learning's definitions), in-batch negatives (sentence-transformers'
//! MultipleNegativesRankingLoss, for text encoders). See `docs/training.md`.
//!
//! A loss with parameters (ArcFace's class matrix, the MLP) creates them under the
//! `tch::nn::Path` it is built on, so the trainer can give that path its own learning rate
//! and leave it out of the exported model.
use crate::error::{Error, Result};
use crate::train::miner::{MinerConfig, MinerState};
use crate::train::sampler::Rng;
use serde::{Deserialize, Serialize};
use tch::{nn, Kind, Tensor};

pub use crate::train::miner::Logs;

/// How per-item losses become the loss: OML's `reduction`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reduction {
    #[default]
    Mean,
    Sum,
    None,
}

impl Reduction {
    pub fn apply(self, t: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Reduction::Mean => t.f_mean(None::<Kind>)?,
            Reduction::Sum => t.f_sum(None::<Kind>)?,
            Reduction::None => t.shallow_clone(),
        })
    }

    fn torch(self) -> tch::Reduction {
        match self {
            Reduction::Mean => tch::Reduction::Mean,
            Reduction::Sum => tch::Reduction::Sum,
            Reduction::None => tch::Reduction::None,
        }
    }
}

/// A loss value and its logs (`active_tri`, `pos_dist`, `accuracy`, ...).
#[derive(Debug)]
pub struct LossOutput {
    pub loss: Tensor,
    pub logs: Logs,
}

/// A training criterion on a batch of embeddings `[B, D]` and their labels.
pub trait Criterion: Send {
    /// The registry name (`triplet`, `arcface`, ...).
    fn name(&self) -> &'static str;
    /// The loss of a batch. ArcFace-type losses need labels remapped to `0..num_classes`.
    fn forward(&mut self, features: &Tensor, labels: &[i64], rng: &mut Rng) -> Result<LossOutput>;
    /// State to checkpoint besides parameters (a miner's memory bank).
    fn state(&self) -> Result<MinerState> {
        Ok(MinerState::default())
    }
    fn load_state(&mut self, _state: MinerState) -> Result<()> {
        Ok(())
    }
}

fn host(t: &Tensor) -> Result<Vec<f32>> {
    let t = t
        .f_detach()?
        .f_to_device(tch::Device::Cpu)?
        .f_to_kind(Kind::Float)?
        .f_contiguous()?
        .f_view([-1])?;
    Ok(Vec::<f32>::try_from(&t)?)
}

fn mean_of(v: impl Iterator<Item = f64>) -> f64 {
    let (mut s, mut n) = (0.0, 0usize);
    for x in v {
        s += x;
        n += 1;
    }
    if n == 0 {
        f64::NAN
    } else {
        s / n as f64
    }
}

fn labels_tensor(labels: &[i64], like: &Tensor) -> Result<Tensor> {
    Ok(Tensor::f_from_slice(labels)?.f_to_device(like.device())?)
}

/// Rows scaled to unit L2 norm (`F.normalize`, eps 1e-12).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let n = x
        .f_norm_scalaropt_dim(2.0, [1i64], true)?
        .f_clamp_min(1e-12)?;
    Ok(x.f_div(&n)?)
}

mod arcface;
mod contrastive;
mod in_batch_negatives;
mod multi_similarity;
mod surrogate_precision;
mod triplet;

pub use arcface::{label_smoothing, ArcFace, ArcFaceWithMlp};
pub use contrastive::Contrastive;
pub use in_batch_negatives::InBatchNegatives;
pub use multi_similarity::MultiSimilarity;
pub use surrogate_precision::{surrogate_precision, SurrogatePrecision};
pub use triplet::{Margin, TripletLoss, TripletTerms, TripletWithMiner};

fn pair_masks(labels: &[i64], like: &Tensor) -> Result<(Tensor, Tensor)> {
    let y = labels_tensor(labels, like)?;
    let same = y.f_unsqueeze(1)?.f_eq_tensor(&y.f_unsqueeze(0)?)?;
    let eye = Tensor::f_eye(labels.len() as i64, (Kind::Bool, like.device()))?;
    let pos = same.f_logical_and(&eye.f_logical_not()?)?;
    let neg = same.f_logical_not()?;
    Ok((pos, neg))
}

// ------------------------------------------------------------------------------------------

fn d_m() -> f64 {
    0.5
}
fn d_s() -> f64 {
    64.0
}
fn d_t1() -> f64 {
    1.0
}
fn d_t2() -> f64 {
    0.01
}
fn d_neg_margin() -> f64 {
    1.0
}
fn d_alpha() -> f64 {
    2.0
}
fn d_beta() -> f64 {
    50.0
}
fn yes() -> bool {
    true
}
fn d_ibn_scale() -> f64 {
    20.0
}

/// The `[loss]` table of a training config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, strum::IntoStaticStr)]
#[serde(tag = "name", rename_all = "snake_case", deny_unknown_fields)]
#[strum(serialize_all = "snake_case")]
pub enum LossConfig {
    /// Triplet loss over mined triplets (OML's `triplet_with_miner`).
    #[serde(alias = "triplet_with_miner")]
    Triplet {
        margin: Margin,
        #[serde(default)]
        reduction: Reduction,
        #[serde(default)]
        miner: MinerConfig,
    },
    Arcface {
        #[serde(default = "d_m")]
        m: f64,
        #[serde(default = "d_s")]
        s: f64,
        #[serde(default)]
        smoothing_epsilon: f64,
        #[serde(default)]
        reduction: Reduction,
    },
    MlpArcface {
        mlp_features: Vec<i64>,
        #[serde(default = "d_m")]
        m: f64,
        #[serde(default = "d_s")]
        s: f64,
        #[serde(default)]
        smoothing_epsilon: f64,
        #[serde(default)]
        reduction: Reduction,
    },
    SurrogatePrecision {
        k: usize,
        #[serde(default = "d_t1")]
        temperature1: f64,
        #[serde(default = "d_t2")]
        temperature2: f64,
        #[serde(default)]
        reduction: Reduction,
    },
    Contrastive {
        #[serde(default)]
        pos_margin: f64,
        #[serde(default = "d_neg_margin")]
        neg_margin: f64,
        #[serde(default = "yes")]
        normalize: bool,
    },
    /// sentence-transformers' MultipleNegativesRankingLoss on labelled batches.
    #[serde(alias = "multiple_negatives_ranking")]
    InBatchNegatives {
        #[serde(default = "d_ibn_scale")]
        scale: f64,
    },
    MultiSimilarity {
        #[serde(default = "d_alpha")]
        alpha: f64,
        #[serde(default = "d_beta")]
        beta: f64,
        #[serde(default = "d_m")]
        base: f64,
    },
}

impl LossConfig {
    pub fn name(&self) -> &'static str {
        self.into()
    }

    /// ArcFace-type losses own parameters and need labels remapped to `0..num_classes`.
    pub fn is_classifier(&self) -> bool {
        matches!(
            self,
            LossConfig::Arcface { .. } | LossConfig::MlpArcface { .. }
        )
    }

    /// Builds the loss. Parameters (if any) are created under `path`; `in_features` is the
    /// embedding size, `num_classes` the number of train labels and `class_categories[c]`
    /// the category of class c (when the dataset has categories: ArcFace's label smoothing
    /// then stays within the category, as OML's pipeline does).
    pub fn build(
        &self,
        path: &nn::Path,
        in_features: i64,
        num_classes: i64,
        class_categories: Option<&[String]>,
    ) -> Result<Box<dyn Criterion>> {
        Ok(match self {
            LossConfig::Triplet {
                margin,
                reduction,
                miner,
            } => Box::new(TripletWithMiner {
                loss: TripletLoss::new(*margin, *reduction)?,
                miner: miner.build()?,
            }),
            LossConfig::Arcface {
                m,
                s,
                smoothing_epsilon,
                reduction,
            } => Box::new(ArcFace::new(
                path,
                in_features,
                num_classes,
                *m,
                *s,
                *smoothing_epsilon,
                class_categories,
                *reduction,
            )?),
            LossConfig::MlpArcface {
                mlp_features,
                m,
                s,
                smoothing_epsilon,
                reduction,
            } => Box::new(ArcFaceWithMlp::new(
                path,
                in_features,
                num_classes,
                mlp_features,
                *m,
                *s,
                *smoothing_epsilon,
                class_categories,
                *reduction,
            )?),
            LossConfig::SurrogatePrecision {
                k,
                temperature1,
                temperature2,
                reduction,
            } => {
                if *k < 1 || *temperature1 <= 0.0 || *temperature2 <= 0.0 {
                    return Err(Error::input(format!(
                        "surrogate_precision needs k >= 1 and temperatures > 0, got k={k}, temperature1={temperature1}, temperature2={temperature2}"
                    )));
                }
                Box::new(SurrogatePrecision {
                    k: *k,
                    temperature1: *temperature1,
                    temperature2: *temperature2,
                    reduction: *reduction,
                })
            }
            LossConfig::Contrastive {
                pos_margin,
                neg_margin,
                normalize,
            } => Box::new(Contrastive {
                pos_margin: *pos_margin,
                neg_margin: *neg_margin,
                normalize: *normalize,
            }),
            LossConfig::InBatchNegatives { scale } => {
                if !(*scale > 0.0 && scale.is_finite()) {
                    return Err(Error::input(format!(
                        "in_batch_negatives needs scale > 0, got {scale}"
                    )));
                }
                Box::new(InBatchNegatives { scale: *scale })
            }
            LossConfig::MultiSimilarity { alpha, beta, base } => {
                if *alpha <= 0.0 || *beta <= 0.0 {
                    return Err(Error::input(format!(
                        "multi_similarity needs alpha > 0 and beta > 0, got alpha={alpha}, beta={beta}"
                    )));
                }
                Box::new(MultiSimilarity {
                    alpha: *alpha,
                    beta: *beta,
                    base: *base,
                })
            }
        })
    }
}

#[cfg(test)]
mod tests;
