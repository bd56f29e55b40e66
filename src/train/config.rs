//! The training config: one TOML file holding every choice, `--set key=value` overrides, and
//! errors that name the key (its dotted path) and, for a misspelt key, the nearest valid one.
//! The resolved config (defaults filled in) is what the model folder records.
use crate::error::{Error, Result};
use crate::image::{Preprocess, ResizeMode, IMAGENET_MEAN, IMAGENET_STD};
use crate::model::pairwise::{Fusion, PairwiseHead};
use crate::model::{ArchSpec, Pool};
use crate::train::loss::LossConfig;
use crate::train::sampler::SamplerConfig;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The whole config (`schemas/train.md` lists every key).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Seeds the weights' initialisation, the sampler, the miners and the augmentations.
    #[serde(default)]
    pub seed: u64,
    /// Epochs to train (an epoch is what the sampler calls one: `L // n_labels` batches for
    /// `balance`).
    pub epochs: usize,
    /// Validate every this many epochs, and after the last (0: after the last only).
    #[serde(default = "one")]
    pub valid_period: usize,
    /// Also validate the untrained network before the first step (the learning curve's start).
    #[serde(default)]
    pub valid_at_start: bool,
    /// The validation key that chooses the best checkpoint.
    #[serde(default = "d_metric")]
    pub metric_for_checkpointing: String,
    #[serde(default)]
    pub mode_for_checkpointing: Mode,
    /// The backbone (everything but the projection head and the loss's parameters) is frozen
    /// for the first N epochs.
    #[serde(default)]
    pub freeze_n_epochs: usize,
    /// Clip the global gradient norm to this (0 = off).
    #[serde(default)]
    pub grad_clip_norm: f64,
    /// Clip every gradient element to +- this (0 = off).
    #[serde(default)]
    pub grad_clip_value: f64,
    /// Batch size of the validation forward passes.
    #[serde(default = "d_bs_val")]
    pub batch_size_val: usize,
    /// Also write `checkpoints/last` every N steps inside an epoch (0: at epoch ends only).
    #[serde(default)]
    pub checkpoint_every_steps: usize,
    pub model: ModelConfig,
    #[serde(default)]
    pub augment: AugmentConfig,
    #[serde(default)]
    pub data: DataConfig,
    pub sampler: SamplerConfig,
    /// Extractor training: the loss (with its miner). A config has this or `[pairwise]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<LossConfig>,
    #[serde(default)]
    pub optimizer: OptimizerConfig,
    #[serde(default)]
    pub schedule: ScheduleConfig,
    /// Pairwise training (OML's postprocessor): a re-ranker on pairs, BCE, no `[loss]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pairwise: Option<PairwiseConfig>,
}

/// `[pairwise]`: what pairwise training adds (`schemas/train.md`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairwiseConfig {
    /// The extractor whose embeddings mine the pairs and give the validation neighbours: a
    /// model folder or zoo key.
    pub extractor: String,
    /// How the two images meet: `stack` (OML's ConcatSiamese) or `siamese` (each image on its
    /// own, the head sees `[|a - b|, a * b]`). Unset: `stack` for ViTs, `siamese` otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fusion: Option<Fusion>,
    /// Hidden widths of the MLP head (OML's `mlp_hidden_dims`).
    #[serde(default = "d_hidden")]
    pub mlp_hidden: Vec<i64>,
    #[serde(default = "d_dropout")]
    pub dropout: f64,
    /// Inference averages both orders of a pair (OML's `use_tta`); recorded in the model.
    #[serde(default)]
    pub swap_average: bool,
    /// `hard` (OML's `hard_pairs_mining: true`) or `all`.
    #[serde(default)]
    pub mining: PairMining,
    /// Validation re-ranks the first `top_n` neighbours (OML's `PairwiseReranker.top_n`).
    #[serde(default = "d_top_n")]
    pub top_n: usize,
    /// Validate on this many validation queries (drawn once with the seed; 0: all).
    #[serde(default)]
    pub val_queries: usize,
}

/// How pairs are mined from a batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PairMining {
    #[default]
    Hard,
    All,
}

fn d_hidden() -> Vec<i64> {
    vec![192]
}
fn d_dropout() -> f64 {
    0.5
}
fn d_top_n() -> usize {
    5
}

fn one() -> usize {
    1
}
fn d_metric() -> String {
    "OVERALL/cmc/1".into()
}
fn d_bs_val() -> usize {
    256
}

/// Whether a larger validation value is better.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Max,
    Min,
}

impl Mode {
    /// Whether `new` is better than `old`.
    pub fn better(self, new: f64, old: Option<f64>) -> bool {
        match old {
            None => new.is_finite(),
            Some(o) => match self {
                Mode::Max => new > o,
                Mode::Min => new < o,
            },
        }
    }
}

/// `[model]`: the architecture (see `docs/models.md`) and its input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub arch: String,
    /// `smallcnn`: channels of the first block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<i64>,
    /// A linear projection to this many dimensions (the "head").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dim: Option<i64>,
    #[serde(default)]
    pub pool: Pool,
    #[serde(default = "d_gem")]
    pub gem_p: f64,
    #[serde(default = "yes")]
    pub normalise: bool,
    /// Side of the square input, pixels (image architectures; texts have none).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: u32,
    #[serde(default = "d_resize")]
    pub resize: ResizeMode,
    #[serde(default = "d_crop")]
    pub crop_ratio: f64,
    #[serde(default = "d_mean")]
    pub mean: [f32; 3],
    #[serde(default = "d_std")]
    pub std: [f32; 3],
    /// Start from these weights: a model folder or a zoo key (its architecture must match;
    /// entries it lacks, such as a new projection, keep their random initialisation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<String>,
    /// Text encoders (`arch = "bert"`): pooling of the token states; default: the init
    /// model's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pooling: Option<crate::model::bert::TextPool>,
    /// Text encoders: tokens per text at most, special tokens included; default: the init
    /// model's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_length: Option<usize>,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

fn d_gem() -> f64 {
    3.0
}
fn yes() -> bool {
    true
}
fn d_resize() -> ResizeMode {
    ResizeMode::Pad
}
fn d_crop() -> f64 {
    0.875
}
fn d_mean() -> [f32; 3] {
    IMAGENET_MEAN
}
fn d_std() -> [f32; 3] {
    IMAGENET_STD
}

impl ModelConfig {
    pub fn arch_spec(&self) -> ArchSpec {
        let mut a = ArchSpec::new(&self.arch);
        a.width = self.width;
        a.proj_dim = self.dim;
        a.pool = self.pool;
        a.gem_p = self.gem_p;
        a
    }

    /// A text encoder (`arch = "bert"`): its sizes, tokenizer and weights come from `init`.
    pub fn is_text(&self) -> bool {
        self.arch == "bert"
    }

    /// The `[model]` keys of a text encoder: `init` is required (a text model folder or zoo
    /// key: the sizes and tokenizer are its), image keys are refused.
    fn validate_text(&self) -> Result<()> {
        if self.init.is_none() {
            return Err(Error::input(
                "config table [model]: arch = \"bert\" fine-tunes a text model: set model.init to a text model folder or zoo key (minilm-l6-v2, or a folder from `simile-embed import --hf`)",
            ));
        }
        if self.size != 0 || self.dim.is_some() || self.width.is_some() {
            return Err(Error::input(
                "config table [model]: arch = \"bert\" reads texts: model.size, model.dim and model.width are image settings; leave them out",
            ));
        }
        if self.max_length.is_some_and(|m| m < 3) {
            return Err(Error::input(
                "config key 'model.max_length': must be at least 3 (two special tokens and one word)",
            ));
        }
        Ok(())
    }

    pub fn preprocess(&self) -> Preprocess {
        Preprocess {
            size: self.size,
            resize: self.resize,
            crop_ratio: self.crop_ratio,
            mean: self.mean,
            std: self.std,
        }
    }
}

/// `[augment]`: training-time augmentations on the cached `size x size` images. All off by
/// default (horizontal flips would change glyphs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentConfig {
    /// Random resized crop: the crop's area as a share of the image, `[min, max]`
    /// (`[1, 1]` = off).
    pub crop_scale: [f64; 2],
    /// The crop's aspect ratio range (log-uniform), as torchvision's `RandomResizedCrop`.
    pub crop_ratio: [f64; 2],
    /// Probability of a horizontal flip.
    pub hflip: f64,
    /// Colour jitter factors, each drawn from `[1 - x, 1 + x]` (torchvision's `ColorJitter`).
    pub brightness: f64,
    pub contrast: f64,
    pub saturation: f64,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        AugmentConfig {
            crop_scale: [1.0, 1.0],
            crop_ratio: [3.0 / 4.0, 4.0 / 3.0],
            hflip: 0.0,
            brightness: 0.0,
            contrast: 0.0,
            saturation: 0.0,
        }
    }
}

impl AugmentConfig {
    pub fn is_off(&self) -> bool {
        self.crop_scale == [1.0, 1.0]
            && self.hflip == 0.0
            && self.brightness == 0.0
            && self.contrast == 0.0
            && self.saturation == 0.0
    }

    pub fn validate(&self) -> Result<()> {
        let [a, b] = self.crop_scale;
        if !(a > 0.0 && a <= b && b <= 1.0) {
            return Err(Error::input(format!(
                "config key 'augment.crop_scale': [{a}, {b}] must satisfy 0 < min <= max <= 1"
            )));
        }
        let [r0, r1] = self.crop_ratio;
        if !(r0 > 0.0 && r0 <= r1) {
            return Err(Error::input(format!(
                "config key 'augment.crop_ratio': [{r0}, {r1}] must satisfy 0 < min <= max"
            )));
        }
        if !(0.0..=1.0).contains(&self.hflip) {
            return Err(Error::input(format!(
                "config key 'augment.hflip': {} is a probability, expected 0..=1",
                self.hflip
            )));
        }
        for (k, v) in [
            ("brightness", self.brightness),
            ("contrast", self.contrast),
            ("saturation", self.saturation),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(Error::input(format!(
                    "config key 'augment.{k}': {v} out of range 0..=1"
                )));
            }
        }
        Ok(())
    }
}

/// `[data]`: the decoded-image cache and the loader.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Keep decoded images in a memory-mapped file built once per dataset and input geometry
    /// (`false`: decode into memory at every start).
    pub cache: bool,
    /// Batches prepared ahead of the step.
    pub prefetch: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            cache: true,
            prefetch: 2,
        }
    }
}

/// `[optimizer]`: `lr` is the learning rate of every group unless `lr_backbone`, `lr_head`
/// (the projection) or `lr_loss` (a loss's own parameters) say otherwise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "snake_case", deny_unknown_fields)]
pub enum OptimizerConfig {
    Adam {
        lr: f64,
        #[serde(default = "d_betas")]
        betas: [f64; 2],
        #[serde(default = "d_eps")]
        eps: f64,
        #[serde(default)]
        weight_decay: f64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lr_backbone: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lr_head: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lr_loss: Option<f64>,
    },
    Adamw {
        lr: f64,
        #[serde(default = "d_betas")]
        betas: [f64; 2],
        #[serde(default = "d_eps")]
        eps: f64,
        #[serde(default = "d_wd_adamw")]
        weight_decay: f64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lr_backbone: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lr_head: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lr_loss: Option<f64>,
    },
    Sgd {
        lr: f64,
        #[serde(default)]
        momentum: f64,
        #[serde(default)]
        dampening: f64,
        #[serde(default)]
        nesterov: bool,
        #[serde(default)]
        weight_decay: f64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lr_backbone: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lr_head: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lr_loss: Option<f64>,
    },
}

fn d_betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn d_eps() -> f64 {
    1e-8
}
fn d_wd_adamw() -> f64 {
    0.01
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig::Adam {
            lr: 1e-3,
            betas: d_betas(),
            eps: d_eps(),
            weight_decay: 0.0,
            lr_backbone: None,
            lr_head: None,
            lr_loss: None,
        }
    }
}

impl OptimizerConfig {
    /// The name a checkpoint records.
    pub fn name(&self) -> &'static str {
        match self {
            OptimizerConfig::Adam { .. } => "adam",
            OptimizerConfig::Adamw { .. } => "adamw",
            OptimizerConfig::Sgd { .. } => "sgd",
        }
    }

    /// Base learning rates of the groups: backbone, head, loss.
    pub fn group_lrs(&self) -> [f64; 3] {
        let (lr, b, h, l) = match self {
            OptimizerConfig::Adam {
                lr,
                lr_backbone,
                lr_head,
                lr_loss,
                ..
            }
            | OptimizerConfig::Adamw {
                lr,
                lr_backbone,
                lr_head,
                lr_loss,
                ..
            }
            | OptimizerConfig::Sgd {
                lr,
                lr_backbone,
                lr_head,
                lr_loss,
                ..
            } => (*lr, lr_backbone, lr_head, lr_loss),
        };
        [b.unwrap_or(lr), h.unwrap_or(lr), l.unwrap_or(lr)]
    }

    pub fn validate(&self) -> Result<()> {
        for (k, v) in ["lr_backbone", "lr_head", "lr_loss"]
            .iter()
            .zip(self.group_lrs())
        {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(Error::input(format!(
                    "config key 'optimizer.{k}' (or 'optimizer.lr'): {v} must be a finite number >= 0"
                )));
            }
        }
        match self {
            OptimizerConfig::Adam { betas, eps, .. }
            | OptimizerConfig::Adamw { betas, eps, .. } => {
                if !betas.iter().all(|b| (0.0..1.0).contains(b)) || *eps <= 0.0 {
                    return Err(Error::input(format!(
                        "config key 'optimizer.betas'/'optimizer.eps': betas {betas:?} must be in [0, 1) and eps {eps} > 0"
                    )));
                }
            }
            OptimizerConfig::Sgd {
                momentum,
                dampening,
                nesterov,
                ..
            } => {
                if *nesterov && (*momentum <= 0.0 || *dampening != 0.0) {
                    return Err(Error::input(
                        "config key 'optimizer.nesterov': Nesterov momentum needs momentum > 0 and dampening = 0",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// When a schedule's multiplier changes: after every epoch or after every step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interval {
    #[default]
    Epoch,
    Step,
}

/// `[schedule]`: a multiplier on every group's learning rate. `warmup_epochs` (any
/// schedule; a fraction is allowed) ramps it linearly from 0 at the first step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "snake_case", deny_unknown_fields)]
pub enum ScheduleConfig {
    Constant {
        #[serde(default)]
        warmup_epochs: f64,
    },
    /// Multiply by `gamma` every `step_size` epochs (or steps, with `interval = "step"`).
    Step {
        step_size: usize,
        #[serde(default = "d_gamma")]
        gamma: f64,
        #[serde(default)]
        interval: Interval,
        #[serde(default)]
        warmup_epochs: f64,
    },
    /// Multiply by `gamma` at each milestone (epochs, or steps with `interval = "step"`).
    MultiStep {
        milestones: Vec<usize>,
        #[serde(default = "d_gamma")]
        gamma: f64,
        #[serde(default)]
        interval: Interval,
        #[serde(default)]
        warmup_epochs: f64,
    },
    /// Cosine from 1 to `min_factor` over the training after the warm-up, per step.
    Cosine {
        #[serde(default)]
        warmup_epochs: f64,
        #[serde(default)]
        min_factor: f64,
    },
    /// Multiply by `factor` when the monitored validation key has not improved by more than
    /// `threshold` (relative) for `patience` validations.
    ReduceOnPlateau {
        #[serde(default = "d_gamma")]
        factor: f64,
        #[serde(default = "d_patience")]
        patience: usize,
        #[serde(default = "d_threshold")]
        threshold: f64,
        #[serde(default)]
        min_factor: f64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        monitor: Option<String>,
        #[serde(default)]
        warmup_epochs: f64,
    },
}

fn d_gamma() -> f64 {
    0.1
}
fn d_patience() -> usize {
    10
}
fn d_threshold() -> f64 {
    1e-4
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig::Constant { warmup_epochs: 0.0 }
    }
}

impl ScheduleConfig {
    pub fn name(&self) -> &'static str {
        match self {
            ScheduleConfig::Constant { .. } => "constant",
            ScheduleConfig::Step { .. } => "step",
            ScheduleConfig::MultiStep { .. } => "multi_step",
            ScheduleConfig::Cosine { .. } => "cosine",
            ScheduleConfig::ReduceOnPlateau { .. } => "reduce_on_plateau",
        }
    }

    pub fn warmup_epochs(&self) -> f64 {
        match self {
            ScheduleConfig::Constant { warmup_epochs }
            | ScheduleConfig::Step { warmup_epochs, .. }
            | ScheduleConfig::MultiStep { warmup_epochs, .. }
            | ScheduleConfig::Cosine { warmup_epochs, .. }
            | ScheduleConfig::ReduceOnPlateau { warmup_epochs, .. } => *warmup_epochs,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let w = self.warmup_epochs();
        if !(w >= 0.0 && w.is_finite()) {
            return Err(Error::input(format!(
                "config key 'schedule.warmup_epochs': {w} must be >= 0"
            )));
        }
        match self {
            ScheduleConfig::Step {
                step_size, gamma, ..
            } => {
                if *step_size == 0 || *gamma <= 0.0 {
                    return Err(Error::input(format!(
                        "config key 'schedule.step_size'/'schedule.gamma': step_size {step_size} must be >= 1 and gamma {gamma} > 0"
                    )));
                }
            }
            ScheduleConfig::MultiStep {
                milestones, gamma, ..
            } => {
                if milestones.windows(2).any(|w| w[0] >= w[1]) || *gamma <= 0.0 {
                    return Err(Error::input(format!(
                        "config key 'schedule.milestones': {milestones:?} must be increasing (and gamma {gamma} > 0)"
                    )));
                }
            }
            ScheduleConfig::Cosine { min_factor, .. } => {
                if !(0.0..=1.0).contains(min_factor) {
                    return Err(Error::input(format!(
                        "config key 'schedule.min_factor': {min_factor} out of range 0..=1"
                    )));
                }
            }
            ScheduleConfig::ReduceOnPlateau {
                factor, min_factor, ..
            } => {
                if !(*factor > 0.0 && *factor < 1.0 && (0.0..=1.0).contains(min_factor)) {
                    return Err(Error::input(format!(
                        "config key 'schedule.factor': {factor} must be in (0, 1), min_factor {min_factor} in [0, 1]"
                    )));
                }
            }
            ScheduleConfig::Constant { .. } => {}
        }
        Ok(())
    }
}

impl TrainConfig {
    /// Reads `path`, applies `--set` overrides, checks everything that can be checked without
    /// the dataset.
    pub fn load(path: &Path, sets: &[String]) -> Result<TrainConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text, sets, &path.display().to_string())
    }

    /// Parses config text (`source` names it in messages).
    pub fn parse(text: &str, sets: &[String], source: &str) -> Result<TrainConfig> {
        let mut table: toml::Table = toml::from_str(text)
            .map_err(|e| Error::input(format!("{source}: not valid TOML: {e}")))?;
        for s in sets {
            apply_set(&mut table, s)?;
        }
        if table.contains_key("pairwise") && table.contains_key("loss") {
            return Err(Error::input(format!(
                "{source}: a [pairwise] config trains a re-ranker with BCE on pairs: it takes no [loss] table"
            )));
        }
        let mut cfg: TrainConfig =
            serde_path_to_error::deserialize(toml::Value::Table(table.clone())).map_err(|e| {
                let why = explain_in(&e, &table);
                Error::input(format!("{}: {why}", blame(text, sets, source, &why)))
            })?;
        if cfg.loss.is_none() && cfg.pairwise.is_none() {
            return Err(Error::input(format!(
                "{source}: missing table [loss] (the loss an extractor trains with; or a [pairwise] table to train a re-ranker)"
            )));
        }
        // TOML integers stop at i64::MAX: that is "unlimited" in a resolved config.
        if let Some(LossConfig::Triplet {
            miner:
                crate::train::miner::MinerConfig::AllTriplets {
                    max_output_triplets,
                },
            ..
        }) = &mut cfg.loss
        {
            if *max_output_triplets >= i64::MAX as usize {
                *max_output_triplets = usize::MAX;
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0 {
            return Err(Error::input("config key 'epochs': must be at least 1"));
        }
        if self.batch_size_val == 0 {
            return Err(Error::input(
                "config key 'batch_size_val': must be at least 1",
            ));
        }
        if !(self.grad_clip_norm >= 0.0 && self.grad_clip_value >= 0.0) {
            return Err(Error::input(
                "config keys 'grad_clip_norm' / 'grad_clip_value': must be >= 0 (0 = off)",
            ));
        }
        if self.model.is_text() {
            self.model.validate_text()?;
            if !self.augment.is_off() {
                return Err(Error::input(
                    "config table [augment]: image augmentations on a text model (arch = \"bert\"); remove the table",
                ));
            }
            if self.pairwise.is_some() {
                return Err(Error::input(
                    "config table [pairwise]: pairwise re-rankers score pairs of images; a text model (arch = \"bert\") cannot be one",
                ));
            }
        } else {
            if self.model.size == 0 {
                return Err(Error::input(format!(
                    "config key 'model.size': missing; arch {} reads images of this side in pixels",
                    self.model.arch
                )));
            }
            if self.model.pooling.is_some() || self.model.max_length.is_some() {
                return Err(Error::input(format!(
                    "config table [model]: model.pooling and model.max_length are text-model keys (arch = \"bert\"), not for {}",
                    self.model.arch
                )));
            }
            let spec = self.model.arch_spec();
            spec.validate()
                .map_err(|e| Error::input(format!("config table [model]: {e}")))?;
            spec.check_size(self.model.size, "config key 'model.size'")?;
            self.model
                .preprocess()
                .validate()
                .map_err(|e| Error::input(format!("config table [model]: {e}")))?;
        }
        self.augment.validate()?;
        self.sampler.check_sizes()?;
        self.optimizer.validate()?;
        self.schedule.validate()?;
        // The prefetch channel allocates its slots up front.
        if !(1..=64).contains(&self.data.prefetch) {
            return Err(Error::input(format!(
                "config key 'data.prefetch': {} must be 1 to 64",
                self.data.prefetch
            )));
        }
        if let Some(p) = &self.pairwise {
            self.head()
                .validate()
                .map_err(|e| Error::input(format!("config table [pairwise]: {e}")))?;
            if p.top_n < 2 {
                return Err(Error::input(format!(
                    "config key 'pairwise.top_n': {} must be at least 2 (OML's PairwiseReranker asserts top_n > 1)",
                    p.top_n
                )));
            }
        }
        Ok(())
    }

    /// The pairwise head a `[pairwise]` config describes (defaults without one).
    pub fn head(&self) -> PairwiseHead {
        let p = self.pairwise.as_ref();
        PairwiseHead {
            fusion: p
                .and_then(|p| p.fusion)
                .unwrap_or_else(|| Fusion::default_for(&self.model.arch)),
            mlp_hidden: p.map(|p| p.mlp_hidden.clone()).unwrap_or_else(d_hidden),
            dropout: p.map(|p| p.dropout).unwrap_or_else(d_dropout),
            swap_average: p.is_some_and(|p| p.swap_average),
        }
    }

    /// The resolved config as TOML text (every default written out).
    pub fn to_toml(&self) -> Result<String> {
        let json = serde_json::to_value(self).map_err(|e| Error::internal(e.to_string()))?;
        let v = json_to_toml(&json).ok_or_else(|| Error::internal("config is not a table"))?;
        toml::to_string_pretty(&v).map_err(|e| Error::internal(format!("config to TOML: {e}")))
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

/// JSON -> TOML (nulls dropped; integers beyond i64, such as an unlimited triplet count,
/// saturate at i64::MAX, which reads back as the same "unlimited").
fn json_to_toml(v: &serde_json::Value) -> Option<toml::Value> {
    use serde_json::Value as J;
    Some(match v {
        J::Null => return None,
        J::Bool(b) => toml::Value::Boolean(*b),
        J::Number(n) => {
            if let Some(i) = n.as_i64() {
                toml::Value::Integer(i)
            } else if n.as_u64().is_some() {
                toml::Value::Integer(i64::MAX)
            } else {
                toml::Value::Float(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        J::String(s) => toml::Value::String(s.clone()),
        J::Array(a) => toml::Value::Array(a.iter().filter_map(json_to_toml).collect()),
        J::Object(o) => toml::Value::Table(
            o.iter()
                .filter_map(|(k, v)| json_to_toml(v).map(|t| (k.clone(), t)))
                .collect(),
        ),
    })
}

/// Applies one `--set a.b.c=value`: the value is read as a TOML value (`3`, `1e-4`, `true`,
/// `[1, 2]`, `"x"`), or taken as a string when it is not one (`--set sampler.name=balance`).
pub fn apply_set(table: &mut toml::Table, set: &str) -> Result<()> {
    let (key, raw) = set.split_once('=').ok_or_else(|| {
        Error::input(format!(
            "--set {set}: expected key=value, e.g. --set optimizer.lr=3e-4"
        ))
    })?;
    let key = key.trim();
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(Error::input(format!("--set {set}: bad key '{key}'")));
    }
    let value = match toml::from_str::<toml::Table>(&format!("v = {}", raw.trim())) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or(toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.trim().to_string()),
    };
    let mut cur = table;
    for (i, p) in parts[..parts.len() - 1].iter().enumerate() {
        let entry = cur
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = match entry {
            toml::Value::Table(t) => t,
            _ => {
                return Err(Error::input(format!(
                    "--set {set}: '{}' is a value, not a table",
                    parts[..=i].join(".")
                )))
            }
        };
    }
    cur.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

/// Where a config error comes from: an `--set` when the file alone is fine (the one whose key
/// the message names, if any), else the file.
fn blame(text: &str, sets: &[String], source: &str, why: &str) -> String {
    if sets.is_empty() {
        return source.to_string();
    }
    let file_alone = toml::from_str::<toml::Table>(text).is_ok_and(|t| {
        serde_path_to_error::deserialize::<_, TrainConfig>(toml::Value::Table(t)).is_ok()
    });
    if !file_alone {
        return source.to_string();
    }
    let key = |s: &String| {
        s.split_once('=')
            .map_or(s.as_str(), |(k, _)| k)
            .trim()
            .to_string()
    };
    match sets.iter().find(|s| why.contains(&format!("'{}", key(s)))) {
        Some(s) => format!("--set {s}"),
        None => format!("--set {}", sets.join(" --set ")),
    }
}

/// A deserialisation error as a message naming the key, and for an unknown key or name the
/// nearest valid one.
pub(crate) fn explain(e: &serde_path_to_error::Error<toml::de::Error>) -> String {
    let path = e.path().to_string();
    let path = if path == "." { String::new() } else { path };
    let msg = e.inner().message().trim().to_string();
    let join = |k: &str| {
        if path.is_empty() {
            k.to_string()
        } else {
            format!("{path}.{k}")
        }
    };
    if let Some((bad, valid)) = parse_unknown(&msg, "unknown field") {
        // The path may or may not already end with the unknown key.
        let parent = match path.rsplit_once('.') {
            Some((p, last)) if last == bad => p.to_string(),
            None if path == bad => String::new(),
            _ => path.clone(),
        };
        let join = |k: &str| {
            if parent.is_empty() {
                k.to_string()
            } else {
                format!("{parent}.{k}")
            }
        };
        let near = nearest(&bad, &valid);
        return format!(
            "unknown config key '{}'{}; valid keys here: {}",
            join(&bad),
            near.map(|n| format!(" (did you mean '{}'?)", join(&n)))
                .unwrap_or_default(),
            valid.join(", ")
        );
    }
    if let Some((bad, valid)) = parse_unknown(&msg, "unknown variant") {
        let near = nearest(&bad, &valid);
        // The path may already end with the tag key (`loss.name`).
        let at = if path.is_empty() || path == "name" || path.ends_with(".name") {
            if path.is_empty() {
                "name".to_string()
            } else {
                path.clone()
            }
        } else {
            format!("{path}.name")
        };
        return format!(
            "config key '{at}': unknown name '{bad}'{}; expected one of {}",
            near.map(|n| format!(" (did you mean '{n}'?)"))
                .unwrap_or_default(),
            valid.join(", ")
        );
    }
    if let Some(rest) = msg.strip_prefix("missing field `") {
        let f = rest.split('`').next().unwrap_or("");
        return format!("missing config key '{}'", join(f));
    }
    if path.is_empty() {
        msg
    } else {
        format!("config key '{path}': {msg}")
    }
}

/// [`explain`], naming the exact key of a value of the wrong type: inside a table chosen by
/// its `name` (an optimizer, a loss) serde reports only the table, so the key is found in
/// `table` by the value the message quotes; the expected type is said in words.
pub(crate) fn explain_in(
    e: &serde_path_to_error::Error<toml::de::Error>,
    table: &toml::Table,
) -> String {
    let msg = e.inner().message().trim().to_string();
    let path = e.path().to_string();
    let Some(rest) = msg.strip_prefix("invalid type: ") else {
        return explain(e);
    };
    let (got, expected) = rest.split_once(", expected ").unwrap_or((rest, ""));
    let words = match expected.trim() {
        "f64" | "f32" => "a number",
        "usize" | "u64" | "u32" | "i64" | "i32" | "u8" => "an integer",
        "a boolean" => "true or false",
        other => other,
    };
    let mut sub = Some(table);
    for part in path.split('.').filter(|p| !p.is_empty() && *p != ".") {
        sub = sub.and_then(|t| t.get(part)).and_then(|v| v.as_table());
    }
    let literal = |v: &toml::Value| match v {
        toml::Value::String(s) => format!("string {s:?}"),
        toml::Value::Integer(i) => format!("integer `{i}`"),
        toml::Value::Float(f) => format!("floating point `{f}`"),
        toml::Value::Boolean(b) => format!("boolean `{b}`"),
        _ => String::new(),
    };
    let keys: Vec<&String> = sub
        .map(|t| {
            t.iter()
                .filter(|(_, v)| literal(v) == got)
                .map(|(k, _)| k)
                .collect()
        })
        .unwrap_or_default();
    let at = match (keys.as_slice(), path.as_str()) {
        ([k], "" | ".") => k.to_string(),
        ([k], p) => format!("{p}.{k}"),
        (_, "" | ".") => return explain(e),
        (_, p) => p.to_string(),
    };
    format!("config key '{at}': expected {words}, found {got}")
}

/// `unknown field \`x\`, expected one of \`a\`, \`b\`` -> ("x", ["a", "b"]).
fn parse_unknown(msg: &str, what: &str) -> Option<(String, Vec<String>)> {
    let rest = msg.strip_prefix(what)?.trim_start();
    let mut ticks = rest.split('`').skip(1).step_by(2);
    let bad = ticks.next()?.to_string();
    let valid: Vec<String> = ticks.map(str::to_string).collect();
    Some((bad, valid))
}

/// The valid key closest to `bad` (edit distance at most half its length, at least 2).
pub fn nearest(bad: &str, valid: &[String]) -> Option<String> {
    let best = valid
        .iter()
        .map(|v| (strsim::levenshtein(bad, v), v))
        .min_by_key(|(d, _)| *d)?;
    let limit = (bad.len() / 2).max(2);
    (best.0 <= limit).then(|| best.1.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::pairwise::Fusion;

    const MINIMAL: &str = r#"
epochs = 2
[model]
arch = "smallcnn"
size = 32
[sampler]
name = "balance"
n_labels = 2
n_instances = 2
[loss]
name = "triplet"
margin = 0.2
"#;

    /// MINIMAL with `[pairwise]` in place of `[loss]`.
    fn pairwise_minimal() -> String {
        MINIMAL.replace(
            "[loss]\nname = \"triplet\"\nmargin = 0.2\n",
            "[pairwise]\nextractor = \"smallcnn\"\n",
        )
    }

    #[test]
    fn pairwise_config_defaults_round_trip_and_errors() {
        let c = TrainConfig::parse(&pairwise_minimal(), &[], "t.toml").unwrap();
        let p = c.pairwise.clone().unwrap();
        assert_eq!(p.mlp_hidden, vec![192]);
        assert_eq!(p.mining, PairMining::Hard);
        assert_eq!(p.top_n, 5);
        // The fusion follows the backbone unless the config names one.
        assert_eq!(p.fusion, None);
        assert_eq!(c.head().fusion, Fusion::Siamese);
        let v = TrainConfig::parse(&pairwise_minimal(), &["model.arch=\"vits16\"".into()], "t")
            .unwrap();
        assert_eq!(v.head().fusion, Fusion::Stack);
        let st = TrainConfig::parse(
            &pairwise_minimal(),
            &["pairwise.fusion=\"stack\"".into()],
            "t",
        )
        .unwrap();
        assert_eq!(st.head().fusion, Fusion::Stack);
        let text = toml::to_string_pretty(&c).unwrap();
        assert_eq!(TrainConfig::parse(&text, &[], "r").unwrap(), c);
        let e =
            TrainConfig::parse(&pairwise_minimal(), &["pairwise.top_n=1".into()], "t").unwrap_err();
        assert!(e.to_string().contains("pairwise.top_n"), "{e}");
        let e = TrainConfig::parse(
            &pairwise_minimal(),
            &["pairwise.minning=\"all\"".into()],
            "t",
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("did you mean 'pairwise.mining'"),
            "{e}"
        );
        let e = TrainConfig::parse(
            &format!("{}[loss]\nname = \"triplet\"\n", pairwise_minimal()),
            &[],
            "t",
        )
        .unwrap_err();
        assert!(e.to_string().contains("no [loss] table"), "{e}");
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn defaults_and_round_trip() {
        let c = TrainConfig::parse(MINIMAL, &[], "t.toml").unwrap();
        assert_eq!(c.metric_for_checkpointing, "OVERALL/cmc/1");
        assert_eq!(c.optimizer.group_lrs(), [1e-3; 3]);
        let text = c.to_toml().unwrap();
        let back = TrainConfig::parse(&text, &[], "resolved").unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn set_overrides_and_types() {
        let c = TrainConfig::parse(
            MINIMAL,
            &[
                "optimizer.name=sgd".into(),
                "optimizer.lr=0.5".into(),
                "optimizer.momentum=0.9".into(),
                "loss.miner.name=hard".into(),
                "epochs=3".into(),
            ],
            "t.toml",
        )
        .unwrap();
        assert_eq!(c.epochs, 3);
        assert_eq!(c.optimizer.group_lrs(), [0.5; 3]);
        let e = TrainConfig::parse(MINIMAL, &["epochs=\"x\"".into()], "t.toml").unwrap_err();
        assert!(e.to_string().contains("'epochs'"), "{e}");
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn unknown_keys_name_the_nearest() {
        let e = TrainConfig::parse(
            MINIMAL,
            &["optimizer.name=adam".into(), "optimizer.lrr=1".into()],
            "t.toml",
        )
        .unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("lrr") && m.contains("did you mean 'optimizer.lr'"),
            "{m}"
        );
        let e = TrainConfig::parse(&format!("epochz = 3\n{MINIMAL}"), &[], "t.toml").unwrap_err();
        assert!(e.to_string().contains("did you mean 'epochs'"), "{e}");
        let e =
            TrainConfig::parse(MINIMAL, &["sampler.name=balanse".into()], "t.toml").unwrap_err();
        assert!(e.to_string().contains("did you mean 'balance'"), "{e}");
        let e = TrainConfig::parse(MINIMAL, &["model.sise=3".into()], "t.toml").unwrap_err();
        assert!(e.to_string().contains("model.size"), "{e}");
    }
}
