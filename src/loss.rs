//! Training losses: triplet (with a miner), ArcFace (and with an MLP), surrogate
//! precision@k (OML's `oml/losses/*.py`), contrastive and multi-similarity
//! (pytorch-metric-learning's definitions). See `docs/training.md`.
//!
//! A loss with parameters (ArcFace's class matrix, the MLP) creates them under the
//! `tch::nn::Path` it is built on, so the trainer can give that path its own learning rate
//! and leave it out of the exported model.
use crate::error::{Error, Result};
use crate::miner::{elementwise_dist, pairwise_dist, Miner, MinerConfig, MinerState};
use crate::sampler::Rng;
use serde::{Deserialize, Serialize};
use tch::{nn, Kind, Tensor};

pub use crate::miner::Logs;

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

// ------------------------------------------------------------------------------------------

/// A triplet margin, or the soft form (`margin = "soft"` in a config; OML's `margin: null`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "MarginRepr", into = "MarginRepr")]
pub enum Margin {
    Value(f64),
    Soft,
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum MarginRepr {
    Value(f64),
    Word(String),
}

impl TryFrom<MarginRepr> for Margin {
    type Error = String;
    fn try_from(r: MarginRepr) -> std::result::Result<Self, String> {
        match r {
            MarginRepr::Value(v) if v > 0.0 => Ok(Margin::Value(v)),
            MarginRepr::Value(v) => Err(format!("margin must be > 0 (or \"soft\"), got {v}")),
            MarginRepr::Word(w) if w == "soft" => Ok(Margin::Soft),
            MarginRepr::Word(w) => Err(format!(
                "margin must be a number > 0 or \"soft\", got \"{w}\""
            )),
        }
    }
}

impl From<Margin> for MarginRepr {
    fn from(m: Margin) -> Self {
        match m {
            Margin::Value(v) => MarginRepr::Value(v),
            Margin::Soft => MarginRepr::Word("soft".into()),
        }
    }
}

/// OML's `TripletLoss`: `d_p = ||a - p||`, `d_n = ||a - n||` (Euclidean, not squared);
/// `relu(margin + d_p - d_n)`, or with the soft margin `log1p(exp(d_p - d_n))`.
#[derive(Debug, Clone, Copy)]
pub struct TripletLoss {
    pub margin: Margin,
    pub reduction: Reduction,
}

/// Per-triplet values of a triplet loss.
pub struct TripletTerms {
    pub loss: Tensor,
    pub d_pos: Tensor,
    pub d_neg: Tensor,
}

impl TripletLoss {
    pub fn new(margin: Margin, reduction: Reduction) -> Result<TripletLoss> {
        if let Margin::Value(v) = margin {
            if v.is_nan() || v <= 0.0 {
                return Err(Error::input(format!(
                    "triplet loss: margin must be > 0, got {v}"
                )));
            }
        }
        Ok(TripletLoss { margin, reduction })
    }

    pub fn terms(&self, a: &Tensor, p: &Tensor, n: &Tensor) -> Result<TripletTerms> {
        self.terms_of_distances(elementwise_dist(a, p)?, elementwise_dist(a, n)?)
    }

    /// The terms from the `[T]` anchor-positive and anchor-negative distances.
    pub fn terms_of_distances(&self, d_pos: Tensor, d_neg: Tensor) -> Result<TripletTerms> {
        let diff = d_pos.f_sub(&d_neg)?;
        let loss = match self.margin {
            Margin::Value(m) => diff.f_add_scalar(m)?.f_relu()?,
            Margin::Soft => diff.f_exp()?.f_log1p()?,
        };
        Ok(TripletTerms { loss, d_pos, d_neg })
    }

    /// The reduced loss with OML's logs `active_tri`, `pos_dist`, `neg_dist`.
    pub fn forward(&self, a: &Tensor, p: &Tensor, n: &Tensor) -> Result<LossOutput> {
        let t = self.terms(a, p, n)?;
        let logs = triplet_logs(&t, None)?;
        Ok(LossOutput {
            loss: self.reduction.apply(&t.loss)?,
            logs,
        })
    }
}

/// `active_tri`, `pos_dist`, `neg_dist`, and with `is_original` (a memory-bank miner) the
/// same split into the batch's own triplets (`orig`) and those drawn with the bank (`bank`).
fn triplet_logs(t: &TripletTerms, is_original: Option<&[bool]>) -> Result<Logs> {
    let (l, dp, dn) = (host(&t.loss)?, host(&t.d_pos)?, host(&t.d_neg)?);
    let mut logs = Logs::new();
    let all = |_: usize| true;
    let mut put = |suffix: &str, keep: &dyn Fn(usize) -> bool, active: &str| {
        let idx = || (0..l.len()).filter(|&i| keep(i));
        logs.insert(
            active.into(),
            mean_of(idx().map(|i| (l[i] > 0.0) as u8 as f64)),
        );
        logs.insert(
            format!("pos_dist{suffix}"),
            mean_of(idx().map(|i| dp[i] as f64)),
        );
        logs.insert(
            format!("neg_dist{suffix}"),
            mean_of(idx().map(|i| dn[i] as f64)),
        );
    };
    put("", &all, "active_tri");
    if let Some(orig) = is_original {
        put("_orig", &|i| orig[i], "orig_active_tri");
        put("_bank", &|i| !orig[i], "bank_active_tri");
    }
    Ok(logs)
}

/// OML's `TripletLossWithMiner` (registry `triplet`): mines triplets, then the triplet
/// loss. The miner's logs are merged into the loss's.
pub struct TripletWithMiner {
    pub loss: TripletLoss,
    pub miner: Box<dyn Miner>,
}

impl Criterion for TripletWithMiner {
    fn name(&self) -> &'static str {
        "triplet"
    }

    fn forward(&mut self, features: &Tensor, labels: &[i64], rng: &mut Rng) -> Result<LossOutput> {
        let mined = self.miner.mine(features, labels, rng)?;
        let (d_pos, d_neg) = mined.distances()?;
        let t = self.loss.terms_of_distances(d_pos, d_neg)?;
        let mut logs = triplet_logs(&t, mined.is_original.as_deref())?;
        logs.extend(mined.logs);
        Ok(LossOutput {
            loss: self.loss.reduction.apply(&t.loss)?,
            logs,
        })
    }

    fn state(&self) -> Result<MinerState> {
        self.miner.state()
    }

    fn load_state(&mut self, state: MinerState) -> Result<()> {
        self.miner.load_state(state)
    }
}

// ------------------------------------------------------------------------------------------

/// OML's `label_smoothing`: without categories `(1-eps) onehot(y) + eps/C`; with a category
/// per class, `(1-eps) onehot(y) + eps/|classes in y's category|` on the classes of y's
/// category and 0 elsewhere. `y` int64 `[B]`; `categories` int64 `[C]`. Returns `[B, C]`.
pub fn label_smoothing(
    y: &Tensor,
    num_classes: i64,
    epsilon: f64,
    categories: Option<&Tensor>,
) -> Result<Tensor> {
    let onehot = y.f_one_hot(num_classes)?.f_to_kind(Kind::Float)?;
    let hard = onehot.f_mul_scalar(1.0 - epsilon)?;
    Ok(match categories {
        None => hard.f_add_scalar(epsilon / num_classes as f64)?,
        Some(cats) => {
            let cat_of_y = cats.f_index_select(0, y)?; // [B]
            let same = cat_of_y
                .f_unsqueeze(1)?
                .f_eq_tensor(&cats.f_unsqueeze(0)?)?
                .f_to_kind(Kind::Float)?; // [B, C]
            let n_same = same.f_sum_dim_intlist(1i64, true, None::<Kind>)?;
            hard.f_add(&same.f_div(&n_same)?.f_mul_scalar(epsilon)?)?
        }
    })
}

/// OML's `ArcFaceLoss`: `W [C, d]` (Xavier-uniform), `cos = normalize(x) normalize(W)^T`,
/// the margin `m` added to the angle of the true class (`cos(theta + m)` while
/// `cos > cos(pi - m)`, else `cos - m sin(m)`), scaled by `s`, then cross-entropy against
/// the class (or its label-smoothed distribution). Logs `accuracy` (argmax of `cos`,
/// before the margin).
pub struct ArcFace {
    pub weight: Tensor,
    pub num_classes: i64,
    pub m: f64,
    pub s: f64,
    pub smoothing_epsilon: f64,
    /// Category of each class, 0..K-1 (categories remapped in sorted order), when given.
    pub categories: Option<Vec<i64>>,
    pub reduction: Reduction,
}

/// The per-class category strings remapped to `0..K-1` in sorted order (OML's rule).
fn category_codes(class_categories: &[String]) -> Vec<i64> {
    let sorted: std::collections::BTreeSet<&String> = class_categories.iter().collect();
    let code: std::collections::BTreeMap<&String, i64> = sorted
        .into_iter()
        .enumerate()
        .map(|(i, c)| (c, i as i64))
        .collect();
    class_categories.iter().map(|c| code[c]).collect()
}

impl ArcFace {
    /// `class_categories[c]` is class c's category; used for label smoothing when given.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        path: &nn::Path,
        in_features: i64,
        num_classes: i64,
        m: f64,
        s: f64,
        smoothing_epsilon: f64,
        class_categories: Option<&[String]>,
        reduction: Reduction,
    ) -> Result<ArcFace> {
        if !(0.0..1.0).contains(&smoothing_epsilon) {
            return Err(Error::input(format!(
                "arcface: smoothing_epsilon must be in [0, 1), got {smoothing_epsilon}"
            )));
        }
        if num_classes < 2 || in_features < 1 {
            return Err(Error::input(format!(
                "arcface needs >= 2 classes and >= 1 feature, got {num_classes} classes of {in_features} features"
            )));
        }
        if let Some(c) = class_categories {
            if c.len() as i64 != num_classes {
                return Err(Error::internal(format!(
                    "arcface: {} class categories for {num_classes} classes",
                    c.len()
                )));
            }
        }
        let bound = (6.0 / (in_features + num_classes) as f64).sqrt();
        let weight = path.f_var(
            "weight",
            &[num_classes, in_features],
            nn::Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?;
        Ok(ArcFace {
            weight,
            num_classes,
            m,
            s,
            smoothing_epsilon,
            categories: class_categories.map(category_codes),
            reduction,
        })
    }

    /// `(logits, cos)`, both `[B, C]`.
    pub fn logits(&self, x: &Tensor, y: &Tensor) -> Result<(Tensor, Tensor)> {
        let x = x.f_to_kind(self.weight.kind())?;
        let cos = l2_normalize(&x)?.f_matmul(&l2_normalize(&self.weight)?.f_tr()?)?;
        // OML takes sqrt(1 - cos^2) unclamped (NaN when rounding puts |cos| above 1); the
        // clamp keeps it finite, and its lower bound keeps the gradient finite at |cos| = 1.
        let sin = cos
            .f_square()?
            .f_neg()?
            .f_add_scalar(1.0)?
            .f_clamp(1e-12, 1.0)?
            .f_sqrt()?;
        let (cm, sm) = (self.m.cos(), self.m.sin());
        let phi = cos.f_mul_scalar(cm)?.f_sub(&sin.f_mul_scalar(sm)?)?;
        let th = -cm; // cos(pi - m)
        let phi = phi.f_where_self(&cos.f_gt(th)?, &cos.f_sub_scalar(sm * self.m)?)?;
        let onehot = y.f_one_hot(self.num_classes)?.f_to_kind(Kind::Bool)?;
        let logits = phi.f_where_self(&onehot, &cos)?.f_mul_scalar(self.s)?;
        Ok((logits, cos))
    }

    fn check_labels(&self, labels: &[i64]) -> Result<()> {
        if let Some(l) = labels.iter().find(|&&l| l < 0 || l >= self.num_classes) {
            return Err(Error::internal(format!(
                "arcface: label {l} is outside 0..{} (train labels must be remapped to 0..C-1)",
                self.num_classes
            )));
        }
        Ok(())
    }

    fn loss(&self, x: &Tensor, labels: &[i64]) -> Result<LossOutput> {
        self.check_labels(labels)?;
        let y = labels_tensor(labels, x)?;
        let (logits, cos) = self.logits(x, &y)?;
        let loss = if self.smoothing_epsilon == 0.0 {
            logits.f_cross_entropy_loss::<Tensor>(&y, None, self.reduction.torch(), -100, 0.0)?
        } else {
            let cats = match &self.categories {
                Some(c) => Some(labels_tensor(c, x)?),
                None => None,
            };
            let target =
                label_smoothing(&y, self.num_classes, self.smoothing_epsilon, cats.as_ref())?;
            let per = target
                .f_mul(&logits.f_log_softmax(1, None::<Kind>)?)?
                .f_sum_dim_intlist(1i64, false, None::<Kind>)?
                .f_neg()?;
            self.reduction.apply(&per)?
        };
        let acc = tch::no_grad(|| -> Result<f64> {
            Ok(cos
                .f_argmax(1, false)?
                .f_eq_tensor(&y)?
                .f_to_kind(Kind::Float)?
                .f_mean(None::<Kind>)?
                .f_double_value(&[])?)
        })?;
        let mut logs = Logs::new();
        logs.insert("accuracy".into(), acc);
        Ok(LossOutput { loss, logs })
    }
}

impl Criterion for ArcFace {
    fn name(&self) -> &'static str {
        "arcface"
    }

    fn forward(&mut self, features: &Tensor, labels: &[i64], _rng: &mut Rng) -> Result<LossOutput> {
        self.loss(features, labels)
    }
}

/// OML's `ArcFaceLossWithMLP`: torchvision's `MLP(in_features, mlp_features)` (linear
/// layers with ReLU between them, the last one linear; PyTorch's default `Linear`
/// initialisation), then [`ArcFace`] on its output.
pub struct ArcFaceWithMlp {
    pub layers: Vec<nn::Linear>,
    pub arcface: ArcFace,
}

impl ArcFaceWithMlp {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        path: &nn::Path,
        in_features: i64,
        num_classes: i64,
        mlp_features: &[i64],
        m: f64,
        s: f64,
        smoothing_epsilon: f64,
        class_categories: Option<&[String]>,
        reduction: Reduction,
    ) -> Result<ArcFaceWithMlp> {
        if mlp_features.is_empty() || mlp_features.iter().any(|&f| f < 1) {
            return Err(Error::input(format!(
                "mlp_arcface: mlp_features must be a non-empty list of sizes >= 1, got {mlp_features:?}"
            )));
        }
        let mlp = path / "mlp";
        let mut layers = Vec::new();
        let mut prev = in_features;
        for (i, &f) in mlp_features.iter().enumerate() {
            // PyTorch's nn.Linear default: weight and bias U(-1/sqrt(in), 1/sqrt(in)).
            let b = 1.0 / (prev as f64).sqrt();
            let init = nn::Init::Uniform { lo: -b, up: b };
            let cfg = nn::LinearConfig {
                ws_init: init,
                bs_init: Some(init),
                bias: true,
            };
            layers.push(nn::linear(&mlp / (i * 2).to_string(), prev, f, cfg));
            prev = f;
        }
        let arcface = ArcFace::new(
            &(path / "arcface"),
            prev,
            num_classes,
            m,
            s,
            smoothing_epsilon,
            class_categories,
            reduction,
        )?;
        Ok(ArcFaceWithMlp { layers, arcface })
    }

    pub fn mlp(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.shallow_clone();
        for (i, l) in self.layers.iter().enumerate() {
            h = h.f_linear(&l.ws, l.bs.as_ref())?;
            if i + 1 < self.layers.len() {
                h = h.f_relu()?;
            }
        }
        Ok(h)
    }
}

impl Criterion for ArcFaceWithMlp {
    fn name(&self) -> &'static str {
        "mlp_arcface"
    }

    fn forward(&mut self, features: &Tensor, labels: &[i64], _rng: &mut Rng) -> Result<LossOutput> {
        let h = self.mlp(&features.f_to_kind(self.arcface.weight.kind())?)?;
        self.arcface.loss(&h, labels)
    }
}

// ------------------------------------------------------------------------------------------

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

// ------------------------------------------------------------------------------------------

fn pair_masks(labels: &[i64], like: &Tensor) -> Result<(Tensor, Tensor)> {
    let y = labels_tensor(labels, like)?;
    let same = y.f_unsqueeze(1)?.f_eq_tensor(&y.f_unsqueeze(0)?)?;
    let eye = Tensor::f_eye(labels.len() as i64, (Kind::Bool, like.device()))?;
    let pos = same.f_logical_and(&eye.f_logical_not()?)?;
    let neg = same.f_logical_not()?;
    Ok((pos, neg))
}

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

/// The `[loss]` table of a training config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "snake_case", deny_unknown_fields)]
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
        match self {
            LossConfig::Triplet { .. } => "triplet",
            LossConfig::Arcface { .. } => "arcface",
            LossConfig::MlpArcface { .. } => "mlp_arcface",
            LossConfig::SurrogatePrecision { .. } => "surrogate_precision",
            LossConfig::Contrastive { .. } => "contrastive",
            LossConfig::MultiSimilarity { .. } => "multi_similarity",
        }
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
mod tests {
    use super::*;
    use crate::sampler::rng;
    use tch::Device;

    fn t2(rows: &[&[f32]]) -> Tensor {
        let d = rows[0].len() as i64;
        let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_slice(&flat).view([-1, d])
    }

    fn scalar(t: &Tensor) -> f64 {
        t.double_value(&[])
    }

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    fn r() -> Rng {
        rng::seeded(0, 0)
    }

    fn assert_grads_finite(x: &Tensor) {
        let g = Vec::<f32>::try_from(&x.grad().view([-1])).unwrap();
        assert!(g.iter().all(|v| v.is_finite()), "{g:?}");
        assert!(g.iter().any(|v| *v != 0.0), "no gradient reached the input");
    }

    #[test]
    fn triplet_hand_computed() {
        let a = t2(&[&[0.0, 0.0], &[0.0, 0.0]]);
        let p = t2(&[&[3.0, 4.0], &[1.0, 0.0]]);
        let n = t2(&[&[0.0, 1.0], &[0.0, 3.0]]);
        // d_p = [5, 1], d_n = [1, 3].
        let l = TripletLoss::new(Margin::Value(0.2), Reduction::Mean).unwrap();
        let out = l.forward(&a, &p, &n).unwrap();
        assert!(close(scalar(&out.loss), 2.1, 1e-5));
        assert_eq!(out.logs["active_tri"], 0.5);
        assert!(close(out.logs["pos_dist"], 3.0, 1e-6) && close(out.logs["neg_dist"], 2.0, 1e-6));
        let sum = TripletLoss::new(Margin::Value(0.2), Reduction::Sum).unwrap();
        assert!(close(
            scalar(&sum.forward(&a, &p, &n).unwrap().loss),
            4.2,
            1e-5
        ));
        let none = TripletLoss::new(Margin::Value(0.2), Reduction::None).unwrap();
        let v = Vec::<f32>::try_from(&none.forward(&a, &p, &n).unwrap().loss).unwrap();
        assert!(close(v[0] as f64, 4.2, 1e-5) && v[1] == 0.0);
        let soft = TripletLoss::new(Margin::Soft, Reduction::None).unwrap();
        let out = soft.forward(&a, &p, &n).unwrap();
        let v = Vec::<f32>::try_from(&out.loss).unwrap();
        assert!(close(v[0] as f64, 4f64.exp().ln_1p(), 1e-5));
        assert!(close(v[1] as f64, (-2f64).exp().ln_1p(), 1e-6));
        assert_eq!(out.logs["active_tri"], 1.0);
        assert!(TripletLoss::new(Margin::Value(0.0), Reduction::Mean).is_err());
    }

    #[test]
    fn soft_triplet_is_ln2_when_equal_and_gradient_is_finite() {
        let x = Tensor::randn([5, 8], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let soft = TripletLoss::new(Margin::Soft, Reduction::Mean).unwrap();
        let out = soft.forward(&x, &x, &x).unwrap();
        assert!(close(scalar(&out.loss), std::f64::consts::LN_2, 1e-7));
        out.loss.backward();
        let g = Vec::<f32>::try_from(&x.grad().view([-1])).unwrap();
        assert!(g.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn triplet_matches_torch_triplet_margin_loss() {
        let a = Tensor::randn([16, 6], (Kind::Float, Device::Cpu));
        let p = Tensor::randn([16, 6], (Kind::Float, Device::Cpu));
        let n = Tensor::randn([16, 6], (Kind::Float, Device::Cpu));
        for margin in [0.2, 0.5, 1.5] {
            for (red, tr) in [
                (Reduction::Mean, tch::Reduction::Mean),
                (Reduction::Sum, tch::Reduction::Sum),
                (Reduction::None, tch::Reduction::None),
            ] {
                let ours = TripletLoss::new(Margin::Value(margin), red)
                    .unwrap()
                    .forward(&a, &p, &n)
                    .unwrap()
                    .loss;
                let theirs = Tensor::triplet_margin_loss(&a, &p, &n, margin, 2.0, 1e-6, false, tr);
                assert!(
                    ours.allclose(&theirs, 1e-4, 1e-4, false),
                    "{margin} {red:?}"
                );
            }
        }
    }

    #[test]
    fn triplet_with_miner_logs_and_gradients() {
        let labels = vec![0, 0, 1, 1, 2, 2];
        let x = Tensor::randn([6, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let cfg: LossConfig = serde_json::from_str(
            r#"{"name":"triplet","margin":0.2,"miner":{"name":"hard_triplets"}}"#,
        )
        .unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        let mut c = cfg.build(&vs.root(), 4, 3, None).unwrap();
        let out = c.forward(&x, &labels, &mut r()).unwrap();
        out.loss.backward();
        for k in ["active_tri", "pos_dist", "neg_dist"] {
            assert!(out.logs.contains_key(k));
        }
        let g = Vec::<f32>::try_from(&x.grad().view([-1])).unwrap();
        assert!(g.iter().all(|v| v.is_finite()));
        assert!(
            vs.variables().is_empty(),
            "a triplet loss has no parameters"
        );
    }

    /// The triplet loss reads row-miner distances from a distance matrix; it must equal the
    /// loss of the gathered vectors (OML's elementwise form), value and gradient, also with
    /// duplicate rows (zero distances) and with a bank.
    #[test]
    fn triplet_distances_from_the_matrix_equal_the_gathered_vectors() {
        let labels = vec![0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3];
        let miners = [
            r#"{"name":"all_triplets"}"#,
            r#"{"name":"hard_triplets"}"#,
            r#"{"name":"n_hard_triplets","n_positive":2,"n_negative":[2,4]}"#,
            r#"{"name":"miner_with_bank","bank_size_in_batches":1,"n_negative":3}"#,
        ];
        for (mi, miner) in miners.iter().enumerate() {
            let mut m = MinerConfig::build(&serde_json::from_str(miner).unwrap()).unwrap();
            let loss = TripletLoss::new(Margin::Value(0.3), Reduction::Mean).unwrap();
            for step in 0..3 {
                tch::manual_seed((10 * mi + step) as i64);
                let base = Tensor::randn([12, 5], (Kind::Float, Device::Cpu));
                // Rows 1 and 2 coincide: a zero distance inside a label.
                base.get(2).copy_(&base.get(1));
                let x1 = base.copy().set_requires_grad(true);
                let x2 = base.copy().set_requires_grad(true);
                // miner_with_bank: the bank before this batch joins it.
                let bank = m.state().unwrap().tensors.first().map(|t| t.1.copy());
                let mined = m.mine(&x1, &labels, &mut r()).unwrap();
                let (dp, dn) = mined.distances().unwrap();
                let t = loss.terms_of_distances(dp, dn).unwrap();
                let ids = mined.ids.clone().unwrap();
                // The same triplets on the second copy, gathered; rows past the batch are the
                // bank's.
                let src = match bank {
                    Some(b) if ids.a.iter().chain(&ids.p).chain(&ids.n).any(|&i| i >= 12) => {
                        Tensor::cat(&[&x2, &b], 0)
                    }
                    _ => x2.shallow_clone(),
                };
                let (a, p, n) = ids.gather(&src).unwrap();
                let want = loss.terms(&a, &p, &n).unwrap();
                let (v1, v2) = (
                    scalar(&t.loss.mean(Kind::Float)),
                    scalar(&want.loss.mean(Kind::Float)),
                );
                assert!(close(v1, v2, 1e-5), "{miner} step {step}: {v1} vs {v2}");
                t.loss.mean(Kind::Float).backward();
                want.loss.mean(Kind::Float).backward();
                let g1 = Vec::<f32>::try_from(&x1.grad().view([-1])).unwrap();
                let g2 = Vec::<f32>::try_from(&x2.grad().view([-1])).unwrap();
                assert!(g1.iter().all(|v| v.is_finite()), "{miner}: {g1:?}");
                for (a, b) in g1.iter().zip(&g2) {
                    assert!((a - b).abs() < 1e-5, "{miner} step {step}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn triplet_with_memory_bank_logs_average_to_overall() {
        let cfg: LossConfig = serde_json::from_str(
            r#"{"name":"triplet","margin":"soft","miner":{"name":"triplets_with_memory","bank_size_in_batches":3,"tri_expand_k":3}}"#,
        )
        .unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        let mut c = cfg.build(&vs.root(), 4, 3, None).unwrap();
        let mut rg = r();
        let labels = vec![0, 0, 1, 1, 2, 2];
        for step in 0..4 {
            let x = Tensor::randn([6, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
            let out = c.forward(&x, &labels, &mut rg).unwrap();
            out.loss.backward();
            let l = &out.logs;
            let (no, nb) = (l["n_tri_orig"], l["n_tri_bank"]);
            assert_eq!(no, 24.0);
            for k in ["pos_dist", "neg_dist"] {
                let w = (l[&format!("{k}_orig")] * no + l[&format!("{k}_bank")] * nb) / (no + nb);
                assert!(close(w, l[k], 1e-5), "step {step} {k}");
            }
        }
        // The bank is in the criterion's state.
        let st = c.state().unwrap();
        assert_eq!(st.tensors.len(), 2);
    }

    #[test]
    fn label_smoothing_oml_cases() {
        let y = Tensor::from_slice(&[1i64, 0]);
        let check = |t: Tensor, want: &[f32]| {
            let v = Vec::<f32>::try_from(&t.view([-1])).unwrap();
            for (a, b) in v.iter().zip(want) {
                assert!((a - b).abs() < 1e-6, "{v:?} vs {want:?}");
            }
        };
        check(
            label_smoothing(&y, 2, 0.1, None).unwrap(),
            &[0.05, 0.95, 0.95, 0.05],
        );
        check(
            label_smoothing(&y, 3, 0.3, None).unwrap(),
            &[0.1, 0.8, 0.1, 0.8, 0.1, 0.1],
        );
        let c = Tensor::from_slice(&[0i64, 1, 1]);
        check(
            label_smoothing(&y, 3, 0.2, Some(&c)).unwrap(),
            &[0.0, 0.9, 0.1, 1.0, 0.0, 0.0],
        );
        let c = Tensor::from_slice(&[0i64, 0, 1]);
        check(
            label_smoothing(&y, 3, 0.2, Some(&c)).unwrap(),
            &[0.1, 0.9, 0.0, 0.9, 0.1, 0.0],
        );
    }

    /// ArcFace by the textbook: angles, margin on the true class's angle, softmax CE.
    fn arcface_reference(
        x: &Tensor,
        w: &Tensor,
        y: &[i64],
        m: f64,
        s: f64,
        target: Option<&[Vec<f64>]>,
    ) -> f64 {
        let xs = Vec::<Vec<f32>>::try_from(x).unwrap();
        let ws = Vec::<Vec<f32>>::try_from(w).unwrap();
        let norm = |v: &[f32]| v.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
        let mut total = 0.0;
        for (i, xi) in xs.iter().enumerate() {
            let logits: Vec<f64> = ws
                .iter()
                .enumerate()
                .map(|(j, wj)| {
                    let c = xi
                        .iter()
                        .zip(wj)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>()
                        / (norm(xi) * norm(wj));
                    if j as i64 == y[i] {
                        let theta = c.clamp(-1.0, 1.0).acos();
                        if theta + m < std::f64::consts::PI {
                            s * (theta + m).cos()
                        } else {
                            s * (c - m * m.sin())
                        }
                    } else {
                        s * c
                    }
                })
                .collect();
            let mx = logits.iter().cloned().fold(f64::MIN, f64::max);
            let lse = mx + logits.iter().map(|l| (l - mx).exp()).sum::<f64>().ln();
            total += match target {
                None => lse - logits[y[i] as usize],
                Some(t) => t[i].iter().zip(&logits).map(|(p, l)| p * (lse - l)).sum(),
            };
        }
        total / xs.len() as f64
    }

    #[test]
    fn arcface_matches_reference_formula() {
        tch::manual_seed(3);
        for (m, s) in [(0.4, 64.0), (0.5, 64.0), (0.5, 48.0)] {
            let vs = nn::VarStore::new(Device::Cpu);
            let mut a = ArcFace::new(&vs.root(), 8, 5, m, s, 0.0, None, Reduction::Mean).unwrap();
            // Xavier-uniform bound sqrt(6 / (8 + 5)).
            let wmax = scalar(&a.weight.abs().max());
            assert!(wmax <= (6.0f64 / 13.0).sqrt() + 1e-6);
            let x = Tensor::randn([7, 8], (Kind::Float, Device::Cpu)).set_requires_grad(true);
            let y = vec![0, 1, 2, 3, 4, 0, 2];
            let out = a.forward(&x, &y, &mut r()).unwrap();
            let want = arcface_reference(&x.detach(), &a.weight.detach(), &y, m, s, None);
            assert!(
                close(scalar(&out.loss), want, 1e-3 * want.max(1.0)),
                "{} vs {want}",
                scalar(&out.loss)
            );
            let acc = out.logs["accuracy"];
            assert!((0.0..=1.0).contains(&acc));
            out.loss.backward();
            assert_grads_finite(&x);
            assert_grads_finite(&a.weight);
        }
    }

    #[test]
    fn arcface_accuracy_and_smoothing() {
        let vs = nn::VarStore::new(Device::Cpu);
        let cats = vec!["b".to_string(), "a".into(), "a".into()];
        let mut a = ArcFace::new(
            &vs.root(),
            3,
            3,
            0.5,
            10.0,
            0.2,
            Some(&cats),
            Reduction::Mean,
        )
        .unwrap();
        assert_eq!(a.categories, Some(vec![1, 0, 0]));
        tch::no_grad(|| a.weight.copy_(&Tensor::eye(3, (Kind::Float, Device::Cpu))));
        let x = t2(&[&[1.0, 0.1, 0.0], &[0.0, 0.2, 1.0]]);
        let y = vec![0, 1];
        let out = a.forward(&x, &y, &mut r()).unwrap();
        assert_eq!(out.logs["accuracy"], 0.5); // row 0 -> class 0 (right), row 1 -> class 2 (wrong)
                                               // Category-aware targets: class 0 alone in "b"; classes 1, 2 share "a".
        let target = vec![vec![1.0, 0.0, 0.0], vec![0.0, 0.9, 0.1]];
        let want = arcface_reference(&x, &a.weight.detach(), &y, 0.5, 10.0, Some(&target));
        assert!(
            close(scalar(&out.loss), want, 1e-4),
            "{} vs {want}",
            scalar(&out.loss)
        );
        // Without categories: eps / C everywhere.
        let mut b = ArcFace::new(
            &(vs.root() / "b"),
            3,
            3,
            0.5,
            10.0,
            0.2,
            None,
            Reduction::Mean,
        )
        .unwrap();
        tch::no_grad(|| b.weight.copy_(&Tensor::eye(3, (Kind::Float, Device::Cpu))));
        let e = 0.2 / 3.0;
        let target = vec![vec![0.8 + e, e, e], vec![e, 0.8 + e, e]];
        let want = arcface_reference(&x, &b.weight.detach(), &y, 0.5, 10.0, Some(&target));
        let got = scalar(&b.forward(&x, &y, &mut r()).unwrap().loss);
        assert!(close(got, want, 1e-4), "{got} vs {want}");
        assert!(b.forward(&x, &[0, 3], &mut r()).is_err());
        assert!(ArcFace::new(
            &(vs.root() / "c"),
            3,
            3,
            0.5,
            10.0,
            1.0,
            None,
            Reduction::Mean
        )
        .is_err());
    }

    #[test]
    fn mlp_arcface_builds_params_and_trains() {
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg: LossConfig =
            serde_json::from_str(r#"{"name":"mlp_arcface","mlp_features":[16, 8],"s":16}"#)
                .unwrap();
        let mut c = cfg.build(&(vs.root() / "criterion"), 12, 4, None).unwrap();
        let names: std::collections::BTreeSet<String> = vs.variables().into_keys().collect();
        let want: std::collections::BTreeSet<String> = [
            "criterion.mlp.0.weight",
            "criterion.mlp.0.bias",
            "criterion.mlp.2.weight",
            "criterion.mlp.2.bias",
            "criterion.arcface.weight",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        assert_eq!(names, want);
        assert_eq!(
            vs.variables()["criterion.arcface.weight"].size(),
            vec![4, 8]
        );
        let x = Tensor::randn([6, 12], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let out = c.forward(&x, &[0, 1, 2, 3, 0, 1], &mut r()).unwrap();
        assert!(scalar(&out.loss).is_finite());
        out.loss.backward();
        assert_grads_finite(&x);
    }

    /// OML's exact retrieval case (T1): 6 items, labels [0,0,0,0,1,1], hit positions per query.
    fn exact_case() -> (Tensor, Tensor) {
        let labels = [0, 0, 0, 0, 1, 1];
        let positions: [&[usize]; 6] = [&[0, 1, 3], &[0, 3, 4], &[1, 2, 4], &[2, 3, 4], &[0], &[3]];
        let mut d = vec![0f32; 36];
        let mut m = vec![false; 36];
        for q in 0..6 {
            let rel: Vec<usize> = (0..6)
                .filter(|&g| g != q && labels[g] == labels[q])
                .collect();
            let irr: Vec<usize> = (0..6).filter(|&g| labels[g] != labels[q]).collect();
            let (mut ri, mut ii) = (rel.iter(), irr.iter());
            for pos in 0..5 {
                let hit = positions[q].contains(&pos);
                let g = *if hit { ri.next() } else { ii.next() }.unwrap();
                d[q * 6 + g] = pos as f32 + 1.0;
                m[q * 6 + g] = hit;
            }
            d[q * 6 + q] = 1_000_000.0; // self, as OML's test: far away and not a match
        }
        (
            Tensor::from_slice(&d).view([6, 6]),
            Tensor::from_slice(&m).view([6, 6]),
        )
    }

    #[test]
    fn surrogate_precision_equals_exact_precision_at_small_temperatures() {
        let (d, m) = exact_case();
        let expected: [(usize, [f64; 6]); 6] = [
            (1, [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]),
            (2, [1.0, 0.5, 0.5, 0.0, 1.0, 0.0]),
            (3, [2.0 / 3.0, 1.0 / 3.0, 2.0 / 3.0, 1.0 / 3.0, 1.0, 0.0]),
            (4, [1.0, 2.0 / 3.0, 2.0 / 3.0, 2.0 / 3.0, 1.0, 1.0]),
            (5, [1.0; 6]),
            (10, [1.0; 6]),
        ];
        for (k, want) in expected {
            let got = surrogate_precision(&d, &m, k, 1e-6, 1e-6, Reduction::None).unwrap();
            let got = Vec::<f32>::try_from(&got).unwrap();
            for (g, w) in got.iter().zip(want) {
                assert!(close(*g as f64, w, 1e-3), "k={k}: {got:?} vs {want:?}");
            }
        }
    }

    #[test]
    fn surrogate_precision_loss_is_one_minus_precision_with_self() {
        let mut rg = rng::seeded(21, 0);
        for _ in 0..10 {
            let labels: Vec<i64> = (0..10).map(|_| rng::below(&mut rg, 3) as i64).collect();
            let x = Tensor::randn([10, 4], (Kind::Float, Device::Cpu));
            for k in [1usize, 2, 4] {
                let mut c = SurrogatePrecision {
                    k,
                    temperature1: 1e-6,
                    temperature2: 1e-6,
                    reduction: Reduction::Mean,
                };
                let loss = scalar(&c.forward(&x, &labels, &mut rg).unwrap().loss);
                // Exact: the batch ranked by distance from each item (itself first), the
                // share of same-label items among the first k+1, over min(n_same, k+1).
                let d = Vec::<Vec<f32>>::try_from(&pairwise_dist(&x, &x).unwrap()).unwrap();
                let mut prec = 0.0;
                for q in 0..10 {
                    let mut order: Vec<usize> = (0..10).collect();
                    order.sort_by(|&a, &b| d[q][a].total_cmp(&d[q][b]));
                    assert_eq!(order[0], q);
                    let hits = order[..k + 1]
                        .iter()
                        .filter(|&&g| labels[g] == labels[q])
                        .count();
                    let n_same = labels.iter().filter(|&&l| l == labels[q]).count();
                    prec += hits as f64 / n_same.min(k + 1) as f64;
                }
                assert!(
                    close(loss, 1.0 - prec / 10.0, 1e-4),
                    "k={k}: {loss} vs {}",
                    1.0 - prec / 10.0
                );
            }
        }
        // Default temperatures: finite gradients.
        let x = Tensor::randn([8, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let mut c = SurrogatePrecision {
            k: 2,
            temperature1: 1.0,
            temperature2: 0.01,
            reduction: Reduction::Mean,
        };
        let out = c.forward(&x, &[0, 0, 1, 1, 2, 2, 3, 3], &mut r()).unwrap();
        out.loss.backward();
        assert_grads_finite(&x);
    }

    #[test]
    fn contrastive_hand_computed() {
        // x0=(0,0), x1=(0.6,0.8), x2=(0.3,0.4): d01 = 1, d02 = d12 = 0.5; labels [0,0,1].
        let x = t2(&[&[0.0, 0.0], &[0.6, 0.8], &[0.3, 0.4]]).set_requires_grad(true);
        let labels = [0, 0, 1];
        let mut c = Contrastive {
            pos_margin: 0.0,
            neg_margin: 1.0,
            normalize: false,
        };
        let out = c.forward(&x, &labels, &mut r()).unwrap();
        // Positives: relu(1 - 0) twice, averaged: 1. Negatives: relu(1 - 0.5) four times: 0.5.
        assert!(close(scalar(&out.loss), 1.5, 1e-5), "{}", scalar(&out.loss));
        assert!(close(out.logs["pos_dist"], 1.0, 1e-5) && close(out.logs["neg_dist"], 0.5, 1e-5));
        out.loss.backward();
        assert_grads_finite(&x);
        // No active negatives: the negative term is 0, not NaN.
        c.neg_margin = 0.4;
        assert!(close(
            scalar(&c.forward(&x, &labels, &mut r()).unwrap().loss),
            1.0,
            1e-5
        ));
        assert_eq!(
            c.forward(&x, &labels, &mut r()).unwrap().logs["active_neg"],
            0.0
        );
        // Non-zero averaging: pos_margin 0.5 leaves the positive pair at 0.5.
        c.pos_margin = 0.5;
        assert!(close(
            scalar(&c.forward(&x, &labels, &mut r()).unwrap().loss),
            0.5,
            1e-5
        ));
        // normalize (pml's default): (3,4) and (6,8) coincide after normalisation.
        let y = t2(&[&[3.0, 4.0], &[6.0, 8.0], &[-4.0, 3.0], &[-8.0, 6.0]]);
        let mut n = Contrastive {
            pos_margin: 0.0,
            neg_margin: 2.0,
            normalize: true,
        };
        let out = n.forward(&y, &[0, 0, 1, 1], &mut r()).unwrap();
        // Negatives at distance sqrt(2): relu(2 - 1.41421) = 0.58579; positives ~0.
        assert!(
            close(scalar(&out.loss), 2.0 - 2f64.sqrt(), 1e-4),
            "{}",
            scalar(&out.loss)
        );
    }

    #[test]
    fn multi_similarity_hand_computed() {
        let x = t2(&[&[1.0, 0.0], &[0.0, 2.0], &[3.0, 0.0]]).set_requires_grad(true);
        let labels = [0, 0, 1];
        let (a, b, base) = (2.0f64, 50.0f64, 0.5f64);
        let mut c = MultiSimilarity {
            alpha: a,
            beta: b,
            base,
        };
        let out = c.forward(&x, &labels, &mut r()).unwrap();
        // S01 = 0, S02 = 1, S12 = 0.
        let pos = |s: f64| (1.0 + (-a * (s - base)).exp()).ln() / a;
        let neg =
            |ss: &[f64]| (1.0 + ss.iter().map(|s| (b * (s - base)).exp()).sum::<f64>()).ln() / b;
        let rows = [
            pos(0.0) + neg(&[1.0]),
            pos(0.0) + neg(&[0.0]),
            neg(&[1.0, 0.0]),
        ];
        let want = rows.iter().sum::<f64>() / 3.0;
        assert!(
            close(scalar(&out.loss), want, 1e-5),
            "{} vs {want}",
            scalar(&out.loss)
        );
        out.loss.backward();
        assert_grads_finite(&x);
    }

    /// On a machine with CUDA: the losses and the memory-bank miner give the CPU's values.
    #[test]
    fn cuda_matches_cpu_when_available() {
        if !tch::Cuda::is_available() {
            return;
        }
        let cuda = Device::Cuda(0);
        let labels = vec![0, 0, 1, 1, 2, 2, 3, 3];
        let cfgs = [
            r#"{"name":"triplet","margin":0.2,"miner":{"name":"triplets_with_memory","bank_size_in_batches":2,"tri_expand_k":3}}"#,
            r#"{"name":"triplet","margin":"soft","miner":{"name":"miner_with_bank","bank_size_in_batches":1,"n_positive":1,"n_negative":[1,3]}}"#,
            r#"{"name":"triplet","margin":0.2,"miner":{"name":"hard_cluster"}}"#,
            r#"{"name":"surrogate_precision","k":2}"#,
            r#"{"name":"contrastive"}"#,
            r#"{"name":"multi_similarity"}"#,
            r#"{"name":"arcface","smoothing_epsilon":0.1}"#,
        ];
        for cfg in cfgs {
            let cfg: LossConfig = serde_json::from_str(cfg).unwrap();
            let (vs_c, vs_g) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(cuda));
            let mut c = cfg.build(&vs_c.root(), 6, 4, None).unwrap();
            let mut g = cfg.build(&vs_g.root(), 6, 4, None).unwrap();
            for (n, mut t) in vs_g.variables() {
                tch::no_grad(|| t.copy_(&vs_c.variables()[&n]));
            }
            let (mut r1, mut r2) = (rng::seeded(4, 0), rng::seeded(4, 0));
            for _ in 0..3 {
                let x = Tensor::randn([8, 6], (Kind::Float, Device::Cpu));
                let xg = x.to_device(cuda).set_requires_grad(true);
                let a = c.forward(&x, &labels, &mut r1).unwrap();
                let b = g.forward(&xg, &labels, &mut r2).unwrap();
                let (va, vb) = (scalar(&a.loss), scalar(&b.loss));
                assert!(
                    close(va, vb, 1e-4 * va.abs().max(1.0)),
                    "{cfg:?}: {va} vs {vb}"
                );
                b.loss.backward();
                assert_grads_finite(&xg);
            }
        }
    }

    #[test]
    fn config_parses_with_defaults() {
        let c: LossConfig = serde_json::from_str(r#"{"name":"arcface"}"#).unwrap();
        assert_eq!(
            c,
            LossConfig::Arcface {
                m: 0.5,
                s: 64.0,
                smoothing_epsilon: 0.0,
                reduction: Reduction::Mean
            }
        );
        let c: LossConfig = serde_json::from_str(
            r#"{"name":"triplet_with_miner","margin":"soft","reduction":"sum"}"#,
        )
        .unwrap();
        assert_eq!(
            c,
            LossConfig::Triplet {
                margin: Margin::Soft,
                reduction: Reduction::Sum,
                miner: MinerConfig::default()
            }
        );
        let c: LossConfig = serde_json::from_str(r#"{"name":"triplet","margin":1}"#).unwrap();
        assert!(matches!(c, LossConfig::Triplet { margin: Margin::Value(v), .. } if v == 1.0));
        let e = serde_json::from_str::<LossConfig>(r#"{"name":"triplet","margin":"hard"}"#)
            .unwrap_err();
        assert!(e.to_string().contains("soft"), "{e}");
        assert!(serde_json::from_str::<LossConfig>(r#"{"name":"triplet","margin":-1}"#).is_err());
        assert!(serde_json::from_str::<LossConfig>(r#"{"name":"triplet"}"#).is_err());
        let e =
            serde_json::from_str::<LossConfig>(r#"{"name":"arcface","margin":0.2}"#).unwrap_err();
        assert!(e.to_string().contains("margin"), "{e}");
        let c: LossConfig =
            serde_json::from_str(r#"{"name":"surrogate_precision","k":5}"#).unwrap();
        assert!(
            matches!(c, LossConfig::SurrogatePrecision { temperature1, temperature2, .. } if temperature1 == 1.0 && temperature2 == 0.01)
        );
        let c: LossConfig = serde_json::from_str(r#"{"name":"multi_similarity"}"#).unwrap();
        assert_eq!(
            c,
            LossConfig::MultiSimilarity {
                alpha: 2.0,
                beta: 50.0,
                base: 0.5
            }
        );
        let c: LossConfig = serde_json::from_str(r#"{"name":"contrastive"}"#).unwrap();
        assert_eq!(
            c,
            LossConfig::Contrastive {
                pos_margin: 0.0,
                neg_margin: 1.0,
                normalize: true
            }
        );
        // Round trip.
        let back: LossConfig = serde_json::from_value(serde_json::to_value(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }
}
