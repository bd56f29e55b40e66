//! The pairwise re-ranker. A pair of images gives one logit, "the pair shows different labels";
//! `sigmoid(logit)` is the new "distance" of the pair (`simile-rerank --method pairwise`). Two
//! ways to bring the two images together (`fusion`, `schemas/model.md`):
//!
//! - `stack`: OML's `ConcatSiamese`. The two `S x S` images are stacked along the height into
//!   one `2S x S` input, run through a backbone (`arch`), and an MLP head on its output ends in
//!   the logit. Right for ViTs, whose attention mixes the halves.
//! - `siamese` (simile's default for convolutional backbones): each image runs through the
//!   backbone on its own (features `a`, `b`) and the MLP sees `[|a - b|, a * b]`. A CNN with a
//!   global average pool turns a stacked pair into roughly the mean of the two images' own
//!   features, a symmetric sum from which "same label or not" is nearly undecidable (on
//!   Font-ID the stacked model stays at chance); comparing `a` with `b` keeps what differs.
//!   The comparison is symmetric, so the two orders score the same, and an image's features
//!   do not depend on its partner, so [`score_pairs`] computes them once per image.
//!
//! With `swap_average`, stacked inference averages the scores of both orders.
//!
//! A pairwise model folder is an ordinary model folder (`model.json` + `model.safetensors`)
//! with `kind = "pairwise"` and a `pairwise` section (`schemas/model.md`); its weights are
//! named as OML's module: `extractor.<backbone names>` and `head.<i>.weight|bias` (torchvision
//! `MLP` indices: Linear, Sigmoid, Dropout per hidden layer, then the last Linear).
use super::{ArchSpec, ModelKind, ModelSpec, Net, SealedFolder, MODEL_JSON};
use crate::error::{Error, IoContext, Result};
use crate::image::Preprocess;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::{nn, Device, Kind, Tensor};

/// How the two images of a pair meet (module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fusion {
    /// OML's ConcatSiamese: stacked along the height, one backbone pass. The default when
    /// `model.json` does not say (folders written before the option were stacked).
    #[default]
    Stack,
    /// One backbone pass per image; the head sees `[|a - b|, a * b]`.
    Siamese,
}

impl Fusion {
    /// The default for a backbone: `stack` for ViTs (OML's design), `siamese` for the
    /// convolutional ones, whose pooled features cannot tell the two stacked images apart.
    pub fn default_for(arch: &str) -> Fusion {
        if arch.starts_with("vit") {
            Fusion::Stack
        } else {
            Fusion::Siamese
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Fusion::Stack => "stack",
            Fusion::Siamese => "siamese",
        }
    }
}

/// `model.json`'s `pairwise` section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairwiseHead {
    #[serde(default)]
    pub fusion: Fusion,
    /// Widths of the MLP's hidden layers (each Linear + Sigmoid + Dropout); then one logit.
    pub mlp_hidden: Vec<i64>,
    /// Dropout after each hidden layer while training (OML: 0.5).
    pub dropout: f64,
    /// Inference averages the scores of (x1, x2) and (x2, x1) (OML's `use_tta`).
    pub swap_average: bool,
}

impl PairwiseHead {
    pub fn validate(&self) -> Result<()> {
        if let Some(w) = self
            .mlp_hidden
            .iter()
            .find(|&&w| !(1..=crate::model::arch::MAX_WIDTH).contains(&w))
        {
            return Err(Error::input(format!(
                "pairwise mlp_hidden: width {w} must be 1 to {}",
                crate::model::arch::MAX_WIDTH
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::input(format!(
                "pairwise dropout: {} must be in [0, 1)",
                self.dropout
            )));
        }
        Ok(())
    }
}

/// A pairwise model folder's `model.json`: the common fields plus `pairwise`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PairwiseSpec {
    /// `kind = "pairwise"`; `architecture` is the backbone, `embedding_dim` its output width
    /// (the MLP's input), `input` the preprocessing of each of the two images.
    #[serde(flatten)]
    pub model: ModelSpec,
    pub pairwise: PairwiseHead,
}

impl PairwiseSpec {
    pub fn new(
        arch: ArchSpec,
        normalise: bool,
        input: Preprocess,
        head: PairwiseHead,
    ) -> Result<PairwiseSpec> {
        head.validate()?;
        let mut model = ModelSpec::new(arch, normalise, input)?;
        model.kind = ModelKind::Pairwise;
        Ok(PairwiseSpec {
            model,
            pairwise: head,
        })
    }

    /// Reads `dir/model.json`; a folder of another kind is an input error naming it.
    pub fn read(dir: &Path) -> Result<PairwiseSpec> {
        let base = ModelSpec::read(dir)?;
        let p = dir.join(MODEL_JSON);
        if base.kind != ModelKind::Pairwise {
            return Err(Error::input(format!(
                "{}: an {} model (kind = \"{}\"), not a pairwise re-ranker: train one with simile-train and a config with a [pairwise] table (pipelines/configs/fontid_pairwise.toml)",
                dir.display(),
                kind_name(base.kind),
                kind_name(base.kind)
            )));
        }
        let text = std::fs::read(&p).at(&p)?;
        let spec: PairwiseSpec = serde_json::from_slice(&text).map_err(|e| {
            Error::input(format!(
                "{}: kind is pairwise but the pairwise section is missing or wrong: {e}",
                p.display()
            ))
        })?;
        spec.pairwise
            .validate()
            .map_err(|e| Error::input(format!("{}: {e}", p.display())))?;
        if base.is_torchscript() {
            return Err(Error::input(format!(
                "{}: a pairwise model needs one of simile's architectures, not torchscript",
                p.display()
            )));
        }
        Ok(spec)
    }
}

fn kind_name(k: ModelKind) -> &'static str {
    match k {
        ModelKind::Extractor => "extractor",
        ModelKind::Pairwise => "pairwise",
    }
}

/// A pairwise model folder's weights and `model.json`, sealed (see `model::seal_folder`).
pub fn seal_folder(dir: &Path, spec: &PairwiseSpec, vs: &nn::VarStore) -> Result<SealedFolder> {
    super::seal_folder(dir, spec, &spec.model.weights, vs)
}

/// Saves a pairwise model folder with no manifest (tests): the weights first, `model.json` last.
#[cfg(test)]
fn save_folder(dir: &Path, spec: &PairwiseSpec, vs: &nn::VarStore) -> Result<()> {
    let f = seal_folder(dir, spec, vs)?;
    f.weights.persist()?;
    f.json.persist()
}

/// The network: a backbone under `extractor`, the MLP under `head`.
#[derive(Debug)]
pub struct PairwiseNet {
    pub backbone: Net,
    /// Hidden layers, then the last (bias-free) layer.
    head: Vec<nn::Linear>,
    dropout: f64,
    fusion: Fusion,
    /// `siamese`: the factor on the backbone's output (`sqrt(D)` for L2-normalised features,
    /// whose coordinates are otherwise ~`1/sqrt(D)`, far too small for the head's init).
    scale: f64,
    /// `siamese`: `head.dist`, a logit term `w * mean((a - b)^2) + c` (`w` > 0 at the start).
    dist: Option<nn::Linear>,
}

impl PairwiseNet {
    /// Creates the variables under `p` (PyTorch's default `Linear` initialisation for the
    /// head: weights and biases uniform in `+-1/sqrt(fan_in)`).
    pub fn new(
        p: &nn::Path,
        arch: &ArchSpec,
        normalise: bool,
        head: &PairwiseHead,
    ) -> Result<PairwiseNet> {
        head.validate()?;
        let backbone = Net::new(&(p / "extractor"), arch, normalise)?;
        let scale = if normalise {
            (backbone.dim as f64).sqrt()
        } else {
            1.0
        };
        let hp = p / "head";
        let mut layers = Vec::new();
        let mut fan_in = match head.fusion {
            Fusion::Stack => backbone.dim,
            Fusion::Siamese => 2 * backbone.dim,
        };
        let widths: Vec<i64> = head.mlp_hidden.iter().copied().chain([1]).collect();
        for (i, &w) in widths.iter().enumerate() {
            let b = 1.0 / (fan_in as f64).sqrt();
            let last = i + 1 == widths.len();
            // siamese: the MLP's last layer starts at zero, so the first logits are the
            // distance term's alone and the first ranking is the extractor's (module docs).
            let zero = last && head.fusion == Fusion::Siamese;
            let cfg = nn::LinearConfig {
                ws_init: if zero {
                    nn::Init::Const(0.0)
                } else {
                    nn::Init::Uniform { lo: -b, up: b }
                },
                bs_init: Some(nn::Init::Uniform { lo: -b, up: b }),
                bias: !last,
            };
            // torchvision's MLP: Linear, activation, Dropout per hidden layer.
            layers.push(nn::linear(&hp / (3 * i).to_string(), fan_in, w, cfg));
            fan_in = w;
        }
        // A squared distance of L2-normalised embeddings lies in [0, 4]: sigmoid(4 d - 4) goes
        // from 0.02 (same image) through 0.5 (d = 1) to 1 (opposite).
        let dist = (head.fusion == Fusion::Siamese).then(|| {
            let cfg = nn::LinearConfig {
                ws_init: nn::Init::Const(4.0),
                bs_init: Some(nn::Init::Const(-4.0)),
                bias: true,
            };
            nn::linear(&hp / "dist", 1, 1, cfg)
        });
        Ok(PairwiseNet {
            backbone,
            head: layers,
            dropout: head.dropout,
            fusion: head.fusion,
            scale,
            dist,
        })
    }

    pub fn fusion(&self) -> Fusion {
        self.fusion
    }

    /// The logits `[B]` of pairs `(x1[i], x2[i])`, each `[B, 3, S, S]`.
    pub fn logits_t(&self, x1: &Tensor, x2: &Tensor, train: bool) -> Tensor {
        match self.fusion {
            Fusion::Stack => {
                let x = Tensor::cat(&[x1, x2], 2);
                self.mlp_t(&self.backbone.forward_t(&x, train), train)
            }
            Fusion::Siamese => {
                // One pass over both sides, so batch norm sees them as one batch.
                let f = self.features_t(&Tensor::cat(&[x1, x2], 0), train);
                let n = x1.size()[0];
                self.pair_logits_t(&f.narrow(0, 0, n), &f.narrow(0, n, n), train)
            }
        }
    }

    /// `siamese`: the backbone's output for each image `[B, D]` (times `sqrt(D)` when it is
    /// L2-normalised).
    pub fn features_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let f = self.backbone.forward_t(xs, train);
        if self.scale == 1.0 {
            f
        } else {
            f * self.scale
        }
    }

    /// `siamese`: the logits `[B]` of feature pairs `(a[i], b[i])`: the MLP on
    /// `[|a - b|, a * b]` plus `head.dist` on their mean squared difference (the squared
    /// distance of the normalised embeddings when the backbone normalises: at the start,
    /// before the MLP's zero last layer has learnt anything, the pairs rank as the extractor
    /// ranks them). Symmetric in `a` and `b`.
    pub fn pair_logits_t(&self, a: &Tensor, b: &Tensor, train: bool) -> Tensor {
        let diff = a - b;
        let h = Tensor::cat(&[diff.abs(), a * b], 1);
        let logit = self.mlp_t(&h, train);
        match &self.dist {
            Some(l) => {
                let d2 = (&diff * &diff).mean_dim([1i64].as_slice(), true, diff.kind());
                logit + d2.apply(l).squeeze_dim(-1)
            }
            None => logit,
        }
    }

    fn mlp_t(&self, x: &Tensor, train: bool) -> Tensor {
        let mut h = x.shallow_clone();
        let last = self.head.len() - 1;
        for (i, l) in self.head.iter().enumerate() {
            h = h.apply(l);
            if i < last {
                h = h.sigmoid().dropout(self.dropout, train);
            }
        }
        h.squeeze_dim(-1)
    }

    /// Inference (eval mode, no gradients): `sigmoid` of the logit; with `swap_average` the
    /// mean of both orders' sigmoids (OML's `predict` with `use_tta`).
    pub fn predict(&self, x1: &Tensor, x2: &Tensor, swap_average: bool) -> Tensor {
        tch::no_grad(|| {
            let p = self.logits_t(x1, x2, false).to_kind(Kind::Float).sigmoid();
            // A siamese score is symmetric already.
            if swap_average && self.fusion == Fusion::Stack {
                let q = self.logits_t(x2, x1, false).to_kind(Kind::Float).sigmoid();
                (p + q) * 0.5
            } else {
                p
            }
        })
    }
}

/// Scores ("different labels", in [0, 1]) of item pairs `(i, j)` by a pairwise network in
/// eval mode, batch by batch: the one scorer of `simile-rerank` and of pairwise validation.
/// A siamese network takes each of the `n_items` items' features once (a query with its
/// `top_n` neighbours costs `top_n + 1` backbone passes, not `2 * top_n`), then the head on
/// every pair; a stacked one runs once per pair. `images(items)` gives the items' normalised
/// images `[n, 3, S, S]` (float32). `progress`: bars on stderr.
#[allow(clippy::too_many_arguments)]
pub fn score_pairs(
    net: &PairwiseNet,
    swap_average: bool,
    n_items: usize,
    pairs: &[(usize, usize)],
    images: &dyn Fn(&[usize]) -> Result<Tensor>,
    batch_size: usize,
    device: Device,
    progress: bool,
) -> Result<Vec<f32>> {
    let bs = batch_size.max(1);
    let bar = |n: usize, what: &str| {
        if progress {
            crate::progress::bar(n as u64, what)
        } else {
            indicatif::ProgressBar::hidden()
        }
    };
    let mut scores: Vec<f32> = Vec::with_capacity(pairs.len());
    match net.fusion {
        Fusion::Siamese => {
            let pb = bar(n_items, "features");
            let items: Vec<usize> = (0..n_items).collect();
            let mut parts = Vec::new();
            for chunk in items.chunks(bs) {
                let x = images(chunk)?.f_to_device(device)?;
                parts.push(tch::no_grad(|| net.features_t(&x, false)).f_to_kind(Kind::Float)?);
                pb.inc(chunk.len() as u64);
            }
            pb.finish_and_clear();
            let feats = Tensor::f_cat(&parts, 0)?;
            drop(parts);
            // The head is small: many pairs per call.
            for chunk in pairs.chunks(bs.saturating_mul(16)) {
                let i1: Vec<i64> = chunk.iter().map(|&(i, _)| i as i64).collect();
                let i2: Vec<i64> = chunk.iter().map(|&(_, j)| j as i64).collect();
                let a =
                    feats.f_index_select(0, &Tensor::f_from_slice(&i1)?.f_to_device(device)?)?;
                let b =
                    feats.f_index_select(0, &Tensor::f_from_slice(&i2)?.f_to_device(device)?)?;
                let p = tch::no_grad(|| net.pair_logits_t(&a, &b, false).sigmoid());
                scores.extend(Vec::<f32>::try_from(
                    p.f_to_device(Device::Cpu)?.f_flatten(0, -1)?,
                )?);
            }
        }
        Fusion::Stack => {
            let pb = bar(pairs.len(), "pairs");
            for chunk in pairs.chunks(bs) {
                let (a, b): (Vec<usize>, Vec<usize>) = chunk.iter().copied().unzip();
                let x1 = images(&a)?.f_to_device(device)?;
                let x2 = images(&b)?.f_to_device(device)?;
                let p = net
                    .predict(&x1, &x2, swap_average)
                    .f_to_device(Device::Cpu)?;
                scores.extend(Vec::<f32>::try_from(p.f_flatten(0, -1)?)?);
                pb.inc(chunk.len() as u64);
            }
            pb.finish_and_clear();
        }
    }
    Ok(scores)
}

/// Copies an extractor folder's backbone weights into `extractor.*` of a pairwise network
/// (OML's postprocessing recipe starts from the trained extractor). The architecture must
/// match; variables the folder lacks keep their initialisation and are returned.
pub fn init_backbone(vs: &nn::VarStore, dir: &Path, arch: &ArchSpec) -> Result<Vec<String>> {
    let spec = ModelSpec::read(dir)?;
    if spec.kind != ModelKind::Extractor
        || spec.is_torchscript()
        || spec.architecture.name != arch.name
    {
        return Err(Error::input(format!(
            "{}: a {} {} model; the pairwise backbone is {} and starts from an extractor of that architecture",
            dir.display(),
            kind_name(spec.kind),
            spec.architecture.name,
            arch.name
        )));
    }
    let wpath = dir.join(&spec.weights);
    let tensors: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(&wpath)?.into_iter().collect();
    let mut missing = Vec::new();
    tch::no_grad(|| -> Result<()> {
        for (name, var) in vs.variables() {
            let Some(inner) = name.strip_prefix("extractor.") else {
                continue;
            };
            match tensors.get(inner) {
                Some(t) if t.size() == var.size() => {
                    var.shallow_clone().f_copy_(t)?;
                }
                _ => missing.push(name),
            }
        }
        Ok(())
    })?;
    missing.sort();
    Ok(missing)
}

/// A loaded pairwise model, ready for inference on one device.
#[derive(Debug)]
pub struct PairwiseModel {
    pub spec: PairwiseSpec,
    pub dir: PathBuf,
    pub device: Device,
    _vs: nn::VarStore,
    net: PairwiseNet,
}

impl PairwiseModel {
    pub fn load(dir: &Path, device: Device) -> Result<PairwiseModel> {
        if !dir.is_dir() {
            return Err(Error::input(format!(
                "{}: no such model folder (a folder with model.json of kind pairwise)",
                dir.display()
            )));
        }
        let spec = PairwiseSpec::read(dir)?;
        let wpath = dir.join(&spec.model.weights);
        if !wpath.is_file() {
            return Err(Error::input(format!(
                "{}: model.json names weights {} but the file is missing",
                dir.display(),
                wpath.display()
            )));
        }
        let mut vs = nn::VarStore::new(device);
        let net = PairwiseNet::new(
            &vs.root(),
            &spec.model.architecture,
            spec.model.normalise,
            &spec.pairwise,
        )?;
        vs.load(&wpath).map_err(|e| {
            Error::input(format!(
                "{}: weights do not fit the pairwise {} model: {e}",
                wpath.display(),
                spec.model.architecture.name
            ))
        })?;
        vs.freeze();
        Ok(PairwiseModel {
            spec,
            dir: dir.to_path_buf(),
            device,
            _vs: vs,
            net,
        })
    }

    /// Scores `[B]` (float32, on the CPU, in [0, 1]: "different labels") of normalised
    /// `[B, 3, S, S]` batches.
    pub fn predict(&self, x1: &Tensor, x2: &Tensor) -> Result<Tensor> {
        let (a, b) = (x1.size(), x2.size());
        if a != b || a.len() != 4 {
            return Err(Error::internal(format!(
                "pairwise predict needs two [B, 3, S, S] batches of one shape, got {a:?} and {b:?}"
            )));
        }
        let p = self.net.predict(
            &x1.to_device(self.device),
            &x2.to_device(self.device),
            self.spec.pairwise.swap_average,
        );
        Ok(p.to_device(Device::Cpu))
    }

    pub fn fusion(&self) -> Fusion {
        self.net.fusion
    }

    /// The network (eval mode, frozen), for [`score_pairs`].
    pub fn net(&self) -> &PairwiseNet {
        &self.net
    }

    /// The weights file (for fingerprints).
    pub fn weights_path(&self) -> PathBuf {
        self.dir.join(&self.spec.model.weights)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::ResizeMode;

    fn head() -> PairwiseHead {
        PairwiseHead {
            fusion: Fusion::Stack,
            mlp_hidden: vec![8],
            dropout: 0.5,
            swap_average: true,
        }
    }

    fn arch() -> ArchSpec {
        let mut a = ArchSpec::new("smallcnn");
        a.width = Some(4);
        a
    }

    #[test]
    fn names_follow_oml_and_shapes_stack_height() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = PairwiseNet::new(&vs.root(), &arch(), false, &head()).unwrap();
        let names: std::collections::BTreeSet<String> = vs.variables().into_keys().collect();
        assert!(
            names.contains("extractor.blocks.0.conv.weight"),
            "{names:?}"
        );
        assert!(names.contains("head.0.weight") && names.contains("head.0.bias"));
        assert!(names.contains("head.3.weight") && !names.contains("head.3.bias"));
        let x1 = Tensor::randn([3, 3, 16, 16], (Kind::Float, Device::Cpu));
        let x2 = Tensor::randn([3, 3, 16, 16], (Kind::Float, Device::Cpu));
        assert_eq!(net.logits_t(&x1, &x2, false).size(), vec![3]);
        // Swap averaging is symmetric in the two images.
        let a = net.predict(&x1, &x2, true);
        let b = net.predict(&x2, &x1, true);
        assert!(a.allclose(&b, 1e-6, 1e-6, false));
        let p: Vec<f32> = Vec::try_from(a).unwrap();
        assert!(p.iter().all(|v| (0.0..=1.0).contains(v)));
    }

    #[test]
    fn siamese_compares_each_image_on_its_own() {
        tch::manual_seed(0);
        let h = PairwiseHead {
            fusion: Fusion::Siamese,
            dropout: 0.0,
            ..head()
        };
        let vs = nn::VarStore::new(Device::Cpu);
        let net = PairwiseNet::new(&vs.root(), &arch(), true, &h).unwrap();
        // The head sees [|a - b|, a * b]: twice the backbone's width (smallcnn width 4: 32).
        let vars = vs.variables();
        assert_eq!(vars["head.0.weight"].size(), vec![8, 64]);
        assert_eq!(vars["head.dist.weight"].size(), vec![1, 1]);
        let x1 = Tensor::randn([3, 3, 16, 16], (Kind::Float, Device::Cpu));
        let x2 = Tensor::randn([3, 3, 16, 16], (Kind::Float, Device::Cpu));
        let l12 = tch::no_grad(|| net.logits_t(&x1, &x2, false));
        assert_eq!(l12.size(), vec![3]);
        // Symmetric under swapping the two images, without averaging.
        let l21 = tch::no_grad(|| net.logits_t(&x2, &x1, false));
        assert!(l12.allclose(&l21, 1e-5, 1e-5, false), "{l12} {l21}");
        // Each image's features are its own: the same as a pass of that image alone, so
        // pairing precomputed features gives the same logits.
        let (fa, fb) = tch::no_grad(|| (net.features_t(&x1, false), net.features_t(&x2, false)));
        let own =
            tch::no_grad(|| net.backbone.forward_t(&x1.narrow(0, 0, 1), false)) * 32f64.sqrt();
        assert!(fa.narrow(0, 0, 1).allclose(&own, 1e-5, 1e-5, false));
        let lf = tch::no_grad(|| net.pair_logits_t(&fa, &fb, false));
        assert!(lf.allclose(&l12, 1e-5, 1e-5, false));
        // Changing the partner changes nothing of the other side's features: replacing x2
        // with x1 makes every pair identical, |a - b| = 0.
        let same = tch::no_grad(|| net.pair_logits_t(&fa, &fa, false));
        let zero = Tensor::zeros([3, 32], (Kind::Float, Device::Cpu));
        let by_hand =
            tch::no_grad(|| net.mlp_t(&Tensor::cat(&[&zero, &(&fa * &fa)], 1), false)) - 4.0;
        assert!(same.allclose(&by_hand, 1e-6, 1e-6, false));
        // Untrained, the MLP's last layer is zero: the logit is 4 * (squared distance of the
        // normalised embeddings) - 4, so pairs rank as the extractor ranks them.
        let (ea, eb) = tch::no_grad(|| {
            (
                net.backbone.forward_t(&x1, false),
                net.backbone.forward_t(&x2, false),
            )
        });
        let d2 = (&ea - &eb)
            .square()
            .sum_dim_intlist([1i64].as_slice(), false, Kind::Float);
        assert!(l12.allclose(&(d2 * 4.0 - 4.0), 1e-4, 1e-4, false), "{l12}");
        // The saved folder says siamese and the loaded model scores features as the net.
        let dir = tempfile::tempdir().unwrap();
        let spec = PairwiseSpec::new(
            arch(),
            true,
            Preprocess::imagenet(16, ResizeMode::Pad),
            h.clone(),
        )
        .unwrap();
        save_folder(dir.path(), &spec, &vs).unwrap();
        let text = std::fs::read_to_string(dir.path().join(MODEL_JSON)).unwrap();
        assert!(text.contains("\"fusion\": \"siamese\""), "{text}");
        let m = PairwiseModel::load(dir.path(), Device::Cpu).unwrap();
        assert_eq!(m.fusion(), Fusion::Siamese);
        let both = Tensor::cat(&[&x1, &x2], 0);
        let n = x1.size()[0] as usize;
        let images = |idx: &[usize]| -> Result<Tensor> {
            let i: Vec<i64> = idx.iter().map(|&i| i as i64).collect();
            Ok(both.index_select(0, &Tensor::from_slice(&i)))
        };
        let pairs: Vec<(usize, usize)> = (0..n).map(|i| (i, n + i)).collect();
        let scores = score_pairs(
            m.net(),
            false,
            2 * n,
            &pairs,
            &images,
            3,
            Device::Cpu,
            false,
        )
        .unwrap();
        let p = Tensor::from_slice(&scores);
        assert!(p.allclose(&m.predict(&x1, &x2).unwrap(), 1e-5, 1e-5, false));
        assert!(p.allclose(&l12.sigmoid(), 1e-5, 1e-5, false));
    }

    #[test]
    fn fusion_defaults() {
        assert_eq!(Fusion::default_for("smallcnn"), Fusion::Siamese);
        assert_eq!(Fusion::default_for("resnet50"), Fusion::Siamese);
        assert_eq!(Fusion::default_for("vits16"), Fusion::Stack);
        // A pairwise section without the key: stacked (folders written before it existed).
        let h: PairwiseHead =
            serde_json::from_str(r#"{"mlp_hidden": [4], "dropout": 0.5, "swap_average": false}"#)
                .unwrap();
        assert_eq!(h.fusion, Fusion::Stack);
    }

    #[test]
    fn spec_round_trips_and_embed_spec_sees_the_kind() {
        let dir = tempfile::tempdir().unwrap();
        let spec = PairwiseSpec::new(
            arch(),
            false,
            Preprocess::imagenet(16, ResizeMode::Pad),
            head(),
        )
        .unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        PairwiseNet::new(&vs.root(), &arch(), false, &head()).unwrap();
        save_folder(dir.path(), &spec, &vs).unwrap();
        assert_eq!(PairwiseSpec::read(dir.path()).unwrap(), spec);
        let base = ModelSpec::read(dir.path()).unwrap();
        assert_eq!(base.kind, ModelKind::Pairwise);
        let m = PairwiseModel::load(dir.path(), Device::Cpu).unwrap();
        let x = Tensor::zeros([2, 3, 16, 16], (Kind::Float, Device::Cpu));
        assert_eq!(m.predict(&x, &x).unwrap().size(), vec![2]);
    }

    #[test]
    fn bad_head_is_an_input_error() {
        let mut h = head();
        h.dropout = 1.0;
        assert_eq!(h.validate().unwrap_err().exit_code(), 2);
        h.dropout = 0.0;
        h.mlp_hidden = vec![0];
        assert_eq!(h.validate().unwrap_err().exit_code(), 2);
    }
}
