//! The train stage: dataset + config -> a model folder `simile-embed` reads, with
//! checkpoints, logs and validation metrics. See `docs/training.md` and `schemas/train.md`.
//!
//! The data flow, in the order of the submodules:
//! - [`config`]: the TOML config, `--set` overrides, errors naming the key.
//! - [`data`]: the decoded-image cache and the augmented batches (built ahead of the step).
//! - [`sampler`]: the batches of an epoch; [`miner`] and [`loss`]: the criterion.
//! - [`trainer`]: the one loop (sampler -> batch -> task's loss -> gradients -> [`optim`]),
//!   validation every `valid_period` epochs, [`checkpoint`]s, the [`log`] tables, [`monitor`]
//!   lines and [`tensorboard`] events, resume, keep-best, the manifest.
//! - the tasks behind it: [`extractor`] (network + criterion, validated by [`validate`]) and
//!   [`pairwise`] (a re-ranker on mined pairs).
//!
//! Randomness: the weights' initialisation comes from `tch::manual_seed(seed)`; the sampler's
//! batches of epoch e from `rng::seeded(seed, e)`; the miner's draws at step s from
//! `rng::seeded(seed, 2^32 + s)`; each image's augmentation from (seed, step, position); a text
//! encoder's dropout at step s from libtorch's generator, seeded from `rng::seeded(seed,
//! 3 * 2^32 + s)` and the rank. So a checkpoint needs no generator state, and a resumed run
//! draws what the uninterrupted one would have.
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod distributed;
pub mod extractor;
pub mod launch;
pub mod log;
pub mod loss;
pub mod miner;
pub mod monitor;
pub mod optim;
pub mod pairwise;
pub mod sampler;
pub mod task;
pub mod tensorboard;
pub mod trainer;
pub mod utilisation;
pub mod validate;

use crate::device::DeviceArg;
use crate::metrics::Scores;
use crate::model::Compute;
use std::path::PathBuf;

pub use config::TrainConfig as Config;
pub use trainer::run;

/// What `simile-train` was asked to do.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub dataset: PathBuf,
    pub config: PathBuf,
    /// `--set key=value` overrides, in order.
    pub sets: Vec<String>,
    pub out: PathBuf,
    pub resume: bool,
    pub device: DeviceArg,
    pub compute: Compute,
    /// Where the decoded-image cache lives (default: the user cache folder).
    pub cache_dir: Option<PathBuf>,
    /// Test option: write `checkpoints/last` after this many steps in total and stop, as a
    /// kill right after a checkpoint would.
    pub stop_after_steps: Option<usize>,
    /// Start over even when `out` holds a finished up-to-date run or an unfinished one.
    pub force: bool,
    /// Log lines while training (`--log-every`; default: every 30 s unless stderr is a
    /// terminal).
    pub log_every: Option<monitor::LogEvery>,
    /// `--tensorboard DIR`: event files with the step and validation scalars.
    pub tensorboard: Option<PathBuf>,
    /// This process's place in a data-parallel job (torchrun's environment), if any.
    pub launch: Option<distributed::Launch>,
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct TrainSummary {
    pub out: PathBuf,
    pub device: String,
    pub epochs: usize,
    pub steps: usize,
    pub images: u64,
    pub seconds: f64,
    pub train_seconds: f64,
    pub images_per_s: f64,
    /// What `images` and `images_per_s` count: `images` or `texts`.
    pub unit: &'static str,
    /// Achieved FLOP/s and their share of the device's peak (extractor training).
    pub utilisation: Option<utilisation::Utilisation>,
    /// (key, value, epoch) of the best validation.
    pub best: Option<(String, f64, usize)>,
    pub last_scores: Option<Scores>,
    /// Stopped by `stop_after_steps`.
    pub stopped: bool,
    pub resumed_from: Option<usize>,
}
