//! ArcFace (OML's `ArcFaceLoss`, `ArcFaceLossWithMLP`) and its label smoothing.
use super::{l2_normalize, labels_tensor, Criterion, Logs, LossOutput, Reduction};
use crate::error::{Error, Result};
use crate::train::sampler::Rng;
use tch::{nn, Kind, Tensor};

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
        if mlp_features.is_empty()
            || mlp_features
                .iter()
                .any(|f| !(1..=crate::model::arch::MAX_WIDTH).contains(f))
        {
            return Err(Error::input(format!(
                "mlp_arcface: mlp_features must be a non-empty list of sizes 1 to 65536, got {mlp_features:?}"
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
