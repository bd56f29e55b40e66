//! What the trainer asks of a kind of training ([`Plan`] before the network exists, [`Task`]
//! after: `extractor.rs`, `pairwise.rs`), what it gives one ([`Setup`]), and the var-store
//! helpers both kinds share. Its own module so that the trainer and the tasks each depend on it
//! and not on each other's internals.

use super::checkpoint::Checkpoint;
use super::config::TrainConfig;
use super::data::{ImageCache, Input};
use super::distributed::Dist;
use super::loss::Logs;
use super::optim::Param;
use super::TrainOptions;
use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::io::Fingerprint;
use crate::manifest::ManifestBuilder;
use crate::metrics::Scores;
use crate::model;
use std::collections::BTreeMap;
use std::path::Path;
use tch::{nn, Device, Tensor};

/// The best validation so far: (value, epoch, step).
pub(crate) type Best = Option<(f64, usize, usize)>;

/// One kind of training, built on the trainer's [`Setup`]. Its randomness must be a function
/// of the seed and the step, so that a resumed run repeats the uninterrupted one.
pub(crate) trait Task {
    /// The parameters the optimiser updates (fp32 in every compute mode), in a fixed order; group 0
    /// is the backbone (frozen for `freeze_n_epochs`).
    fn params(&self) -> &[Param];
    /// The loss of one batch (`x`: its inputs on the device, images `[B, 3, S, S]` float32 or
    /// token ids and mask; `batch`: positions in the train set), with what the log records
    /// beside it. In a data-parallel job (`dist`), `x` holds this rank's share of the batch
    /// (rank r: positions `r * B/W ..`), `batch` the whole batch, and the loss is the whole
    /// batch's.
    fn loss(
        &mut self,
        x: &Input,
        batch: &[usize],
        step: usize,
        dist: Option<&Dist>,
    ) -> Result<(Tensor, Logs)>;
    /// Data-parallel: whether each rank gets its share of the batch's rows (`loss`'s `x`), or
    /// the whole batch (a task that shares out other work, the pairwise re-ranker its pairs).
    fn shards_rows(&self) -> bool {
        true
    }
    /// Data-parallel: whether `loss` returns this rank's part of the batch's loss (the
    /// parts add up to it), rather than the whole batch's loss on every rank.
    fn loss_is_partial(&self) -> bool {
        false
    }
    /// Every tensor of the task's state that all ranks must hold equal (parameters and
    /// buffers of the network and of the loss), in a fixed order.
    fn sync_tensors(&self) -> Vec<Tensor>;
    /// The network's buffers (BatchNorm's running statistics), in a fixed order.
    fn buffers(&self) -> Vec<Tensor>;
    /// Whether the dataset has a validation split.
    fn can_validate(&self) -> bool;
    /// Validation scores of the weights now (eval mode); in a data-parallel job every rank
    /// embeds its share of the rows and every rank gets the scores.
    fn validate(&mut self, dist: Option<&Dist>) -> Result<Scores>;
    /// What a checkpoint holds beyond the trainer's own state.
    fn save(&self) -> Result<TaskState>;
    fn restore(&mut self, ck: &Checkpoint) -> Result<()>;
    /// The model folder's files: from `net` (the best checkpoint's tensors) when given, else
    /// from the weights now.
    fn seal(
        &self,
        net: Option<&[(String, Tensor)]>,
        best: Best,
        provenance: serde_json::Value,
    ) -> Result<model::SealedFolder>;
    /// Files the model folder holds besides the weights and `model.json` (a text model's
    /// tokenizer), sealed, committed with them.
    fn seal_extra(&self) -> Result<Vec<crate::io::Sealed>> {
        Ok(Vec::new())
    }
    /// Forward + backward FLOPs per training image (None where it is not a fixed number).
    fn flops_per_image(&self) -> Result<Option<f64>> {
        Ok(None)
    }
    /// Timings the manifest records beside `image_cache`, `train` and `total`.
    fn timings(&self) -> Vec<(&'static str, f64)> {
        Vec::new()
    }
}

/// A task's part of a checkpoint.
pub(crate) struct TaskState {
    pub net: Vec<(String, Tensor)>,
    pub criterion: Vec<(String, Tensor)>,
    pub bank: Vec<(String, Tensor)>,
    /// Keys added to the checkpoint's state (`mode`, `criterion`).
    pub state: serde_json::Map<String, serde_json::Value>,
    /// Its random streams, for the checkpoint's `rng` record.
    pub rng: serde_json::Map<String, serde_json::Value>,
}

/// Training rows, labels and their classes.
pub(crate) struct TrainSet {
    pub rows: Vec<usize>,
    /// Class (0..C-1) of each training row.
    pub classes: Vec<i64>,
    /// The label of each class, ascending.
    pub labels: Vec<i64>,
    pub class_categories: Option<Vec<String>>,
    pub label2category: Option<BTreeMap<i64, String>>,
}

impl TrainSet {
    /// The label of each training row.
    pub fn row_labels(&self) -> Vec<i64> {
        self.classes
            .iter()
            .map(|&c| self.labels[c as usize])
            .collect()
    }
}

/// What every task is built from.
#[derive(Clone, Copy)]
pub(crate) struct Setup<'a> {
    pub cfg: &'a TrainConfig,
    pub opts: &'a TrainOptions,
    pub ds: &'a Dataset,
    pub ds_fp: &'a Fingerprint,
    pub ts: &'a TrainSet,
    pub dev: Device,
    /// The decoded images of `cache_rows` at the config's input.
    pub cache: &'a ImageCache,
    pub cache_rows: &'a [usize],
    pub images_fp: &'a Fingerprint,
    pub cache_dir: &'a Path,
    /// A text encoder's tokenizer (text datasets).
    pub tokenizer: Option<&'a crate::tokenize::TextTokenizer>,
}

/// A task before its network exists.
pub(crate) trait Plan {
    /// Dataset rows validation reads (their images are cached with the train rows').
    fn validation_rows(&self) -> Vec<usize>;
    /// A text encoder's tokenizer: the batches are token ids.
    fn tokenizer(&self) -> Option<std::sync::Arc<crate::tokenize::TextTokenizer>> {
        None
    }
    /// The task's own parameters and inputs of the finished run's manifest (`out`: the
    /// model folder the run writes).
    fn manifest(&self, _m: &mut ManifestBuilder, _out: &Path) -> Result<()> {
        Ok(())
    }
    fn build<'a>(self: Box<Self>, s: &Setup<'a>) -> Result<Box<dyn Task + 'a>>;
}

/// The `OVERALL/` scores (and the checkpointing key) on one line.
pub(crate) fn short_scores(s: &Scores, key: &str) -> String {
    // The checkpointing metric's interval, right after its value.
    let ci = |k: &str| match (
        s.get(&format!("{k}/ci_low")).flatten(),
        s.get(&format!("{k}/ci_high")).flatten(),
    ) {
        (Some(lo), Some(hi)) if k == key => format!(" [{lo:.4}, {hi:.4}]"),
        _ => String::new(),
    };
    let is_interval = |k: &str| k.ends_with("/ci_low") || k.ends_with("/ci_high");
    let mut parts: Vec<String> = s
        .entries
        .iter()
        .filter(|(k, _)| k.starts_with("OVERALL/") && !k.contains("n_queries") && !is_interval(k))
        .map(|(k, v)| {
            format!(
                "{}={}{}",
                k.trim_start_matches("OVERALL/"),
                v.map(|x| format!("{x:.4}")).unwrap_or_else(|| "-".into()),
                ci(k)
            )
        })
        .collect();
    if !key.starts_with("OVERALL/") {
        if let Some(v) = s.get(key) {
            parts.push(format!(
                "{key}={}{}",
                v.map(|x| format!("{x:.4}")).unwrap_or_default(),
                ci(key)
            ));
        }
    }
    parts.join(" ")
}

/// A var store's tensors sorted by name.
pub(crate) fn sorted_vars(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// A var store's buffers (tensors without gradient: BatchNorm's running statistics), sorted
/// by name.
pub(crate) fn buffers(vs: &nn::VarStore) -> Vec<Tensor> {
    sorted_vars(vs)
        .into_iter()
        .filter(|(_, t)| !t.requires_grad())
        .map(|(_, t)| t)
        .collect()
}

/// The trainable tensors of a var store, sorted by name.
pub(crate) fn trainable_sorted(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    sorted_vars(vs)
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect()
}

/// Detached CPU copies (what a checkpoint stores).
pub(crate) fn cpu_copies(v: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    v.iter()
        .map(|(n, t)| (n.clone(), t.detach().to_device(Device::Cpu).copy()))
        .collect()
}

/// Copies a checkpoint's tensors into a var store, every variable required, shapes checked.
pub(crate) fn load_into(vs: &nn::VarStore, tensors: &[(String, Tensor)], what: &str) -> Result<()> {
    let vars = vs.variables();
    tch::no_grad(|| -> Result<()> {
        for (name, var) in &vars {
            let src = tensors
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t)
                .ok_or_else(|| {
                    Error::input(format!("the checkpoint's {what} has no tensor '{name}'"))
                })?;
            if src.size() != var.size() {
                return Err(Error::input(format!(
                    "the checkpoint's {what} tensor '{name}' has shape {:?}, this run's {:?}",
                    src.size(),
                    var.size()
                )));
            }
            var.shallow_clone().f_copy_(src)?;
        }
        Ok(())
    })
}

/// `model.init`: a model folder, or a zoo key (fetched into the zoo).
pub(crate) fn init_dir(init: &str) -> Result<std::path::PathBuf> {
    let p = Path::new(init);
    if p.is_dir() {
        Ok(p.to_path_buf())
    } else if model::zoo::is_key(init) {
        model::zoo::ensure(init)
    } else {
        Err(Error::input(format!(
            "config key 'model.init': '{init}' is neither a model folder nor a zoo key ({})",
            model::zoo::KEYS.join(", ")
        )))
    }
}

/// Refuses (exit 2) an `--out` folder that is a model folder the run reads (`model.init`,
/// `pairwise.extractor`): training would replace the model it starts from.
pub(crate) fn refuse_same_folder(key: &str, input: &Path, out: &Path) -> Result<()> {
    let same = match (input.canonicalize(), out.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same {
        return Err(Error::input(format!(
            "config key '{key}': {} is also the --out folder; training would overwrite the model it reads. Train into another folder (and rename it afterwards if you want it in place)",
            input.display()
        )));
    }
    Ok(())
}

/// Lists the variables that kept their random initialisation after `model.init`.
pub(crate) fn report_missing(what: &str, missing: &mut [String], dir: &Path) {
    if !missing.is_empty() {
        missing.sort();
        eprintln!(
            "simile-train: {} {what}variable(s) not in {} keep their random initialisation: {}",
            missing.len(),
            dir.display(),
            missing.join(", ")
        );
    }
}
