//! Pairwise mode of `simile-train` (a config with a `[pairwise]` table): OML's postprocessor
//! training (`train_postprocessor.py`, oml.md 7.4). It trains a `ConcatSiamese` re-ranker
//! (`model::pairwise`) on pairs mined from the sampler's batches:
//!
//! 1. The given extractor (`pairwise.extractor`) embeds the train and validation images once.
//! 2. Each batch (the same samplers as extractor training) yields pairs by OML's `PairsMiner`:
//!    `hard` (default) runs the hard-triplet miner on the extractor's embeddings (per anchor
//!    the farthest positive and the nearest negative) and splits the triplets into unique
//!    unordered positive and negative pairs; `all` takes every pair of the batch.
//! 3. Loss: BCE-with-logits of the pair's logit against "is a different label".
//! 4. Validation: the extractor's top-k neighbours of the validation queries (the search
//!    `simile-distance` runs, L2), the first `top_n` re-scored by the model and merged by
//!    OML's rule (`rerank::pairwise::merge`), scored with the default metric set: the numbers
//!    `simile-rerank --method pairwise` + `simile-score` give (on a query subset when
//!    `pairwise.val_queries` is set).
//!
//! Optimiser, schedule, checkpoints, logs and resume are the extractor trainer's
//! (`optim`, `checkpoint`, `log`); randomness: sampler batches from `rng::seeded(seed, epoch)`,
//! augmentations from `data::image_rng`, dropout from `tch::manual_seed` reseeded per step, so
//! a run is a function of the seed and a resumed run repeats the uninterrupted one.
use super::config::{
    apply_set, explain_in, AugmentConfig, DataConfig, Mode, ModelConfig, OptimizerConfig,
    ScheduleConfig,
};
use super::optim::{self, Optimizer, Param, Schedule};
use super::{checkpoint, data, log, TrainOptions, TrainSummary};
use crate::dataset::{Dataset, Split};
use crate::device;
use crate::error::{Error, Result};
use crate::knn::rows::Rows;
use crate::knn::search::{self, Job};
use crate::knn::{Backend, Compute as KnnCompute, Engine, Metric};
use crate::metrics::{self, AggregateOptions, Relevance, Scores};
use crate::train::miner::{AllTriplets, HardTriplets};
use crate::model::pairwise::{self as pw, Fusion, PairwiseHead, PairwiseNet, PairwiseSpec};
use crate::model::{self, Compute, Model};
use crate::npy::{self, DType, Npy};
use crate::rerank::pairwise::{merge, MERGE_EPS};
use crate::retrieval::{QueryGallery, SequenceRule};
use crate::train::sampler::{rng, SamplerConfig};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Instant;
use tch::{nn, Device, Reduction, Tensor};

/// The pairwise training config: the extractor trainer's keys without `[loss]`, plus
/// `[pairwise]` (`schemas/train.md`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairwiseTrainConfig {
    #[serde(default)]
    pub seed: u64,
    pub epochs: usize,
    #[serde(default = "one")]
    pub valid_period: usize,
    #[serde(default)]
    pub valid_at_start: bool,
    #[serde(default = "d_metric")]
    pub metric_for_checkpointing: String,
    #[serde(default)]
    pub mode_for_checkpointing: Mode,
    /// The backbone (`extractor.*`) gets no updates for the first N epochs (OML's
    /// `freeze_n_epochs`): only the MLP head trains.
    #[serde(default)]
    pub freeze_n_epochs: usize,
    #[serde(default)]
    pub grad_clip_norm: f64,
    #[serde(default)]
    pub grad_clip_value: f64,
    /// Batch size of the extractor's embedding passes and of the validation pair scoring.
    #[serde(default = "d_bs_val")]
    pub batch_size_val: usize,
    #[serde(default)]
    pub checkpoint_every_steps: usize,
    /// The backbone (`arch`, `width`, `dim`, `pool`, `normalise`), the input of each of the
    /// two images, and `init`: an extractor folder to start the backbone from.
    pub model: ModelConfig,
    #[serde(default)]
    pub augment: AugmentConfig,
    #[serde(default)]
    pub data: DataConfig,
    pub sampler: SamplerConfig,
    #[serde(default)]
    pub optimizer: OptimizerConfig,
    #[serde(default)]
    pub schedule: ScheduleConfig,
    pub pairwise: PairwiseConfig,
}

/// `[pairwise]`.
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

fn one() -> usize {
    1
}
fn d_metric() -> String {
    "OVERALL/cmc/1".into()
}
fn d_bs_val() -> usize {
    256
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

/// The config file after `--set`, as a TOML table.
fn read_table(path: &Path, sets: &[String]) -> Result<toml::Table> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut table: toml::Table = toml::from_str(&text)
        .map_err(|e| Error::input(format!("{}: not valid TOML: {e}", path.display())))?;
    for s in sets {
        apply_set(&mut table, s)?;
    }
    Ok(table)
}

/// Whether the config selects pairwise training (it has a `[pairwise]` table).
pub fn selected(path: &Path, sets: &[String]) -> Result<bool> {
    Ok(read_table(path, sets)?.contains_key("pairwise"))
}

impl PairwiseTrainConfig {
    pub fn load(path: &Path, sets: &[String]) -> Result<Self> {
        let table = read_table(path, sets)?;
        Self::from_table(table, &path.display().to_string())
    }

    pub fn parse(text: &str, sets: &[String], source: &str) -> Result<Self> {
        let mut table: toml::Table = toml::from_str(text)
            .map_err(|e| Error::input(format!("{source}: not valid TOML: {e}")))?;
        for s in sets {
            apply_set(&mut table, s)?;
        }
        Self::from_table(table, source)
    }

    fn from_table(table: toml::Table, source: &str) -> Result<Self> {
        let cfg: PairwiseTrainConfig =
            serde_path_to_error::deserialize(toml::Value::Table(table.clone())).map_err(|e| {
                let m = explain_in(&e, &table);
                let hint = if m.contains("'loss'") {
                    " (a [pairwise] config trains a re-ranker with BCE on pairs: it takes no [loss] table)"
                } else {
                    ""
                };
                Error::input(format!("{source}: {m}{hint}"))
            })?;
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
        self.model
            .arch_spec()
            .embedding_dim()
            .map_err(|e| Error::input(format!("config key 'model.arch': {e}")))?;
        self.model
            .preprocess()
            .validate()
            .map_err(|e| Error::input(format!("config table [model]: {e}")))?;
        self.augment.validate()?;
        self.optimizer.validate()?;
        self.schedule.validate()?;
        self.head()
            .validate()
            .map_err(|e| Error::input(format!("config table [pairwise]: {e}")))?;
        if self.pairwise.top_n < 2 {
            return Err(Error::input(format!(
                "config key 'pairwise.top_n': {} must be at least 2 (OML's PairwiseReranker asserts top_n > 1)",
                self.pairwise.top_n
            )));
        }
        Ok(())
    }

    pub fn head(&self) -> PairwiseHead {
        PairwiseHead {
            fusion: self
                .pairwise
                .fusion
                .unwrap_or_else(|| Fusion::default_for(&self.model.arch)),
            mlp_hidden: self.pairwise.mlp_hidden.clone(),
            dropout: self.pairwise.dropout,
            swap_average: self.pairwise.swap_average,
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

/// OML's `PairsMiner` on one batch: `(i, j, is_negative)` with `i < j`, positives first, each
/// group sorted and unique. `hard`: pairs of the hard triplets mined on `dist` (row-major
/// `[B, B]` distances of the extractor's embeddings); `all`: every pair. Pairs of an item with
/// itself (a hard "positive" when a label has one row in the batch) are dropped.
pub fn mine_pairs(dist: &[f32], labels: &[i64], mining: PairMining) -> Vec<(usize, usize, bool)> {
    let (mut pos, mut neg) = (BTreeSet::new(), BTreeSet::new());
    let sorted = |a: i64, b: i64| (a.min(b) as usize, a.max(b) as usize);
    let ids = match mining {
        PairMining::Hard => HardTriplets::from_distances(dist, labels),
        PairMining::All => AllTriplets::enumerate(labels),
    };
    for i in 0..ids.len() {
        if ids.a[i] != ids.p[i] {
            pos.insert(sorted(ids.a[i], ids.p[i]));
        }
        neg.insert(sorted(ids.a[i], ids.n[i]));
    }
    pos.into_iter()
        .map(|(i, j)| (i, j, false))
        .chain(neg.into_iter().map(|(i, j)| (i, j, true)))
        .collect()
}

/// Train rows, their labels, and the label -> category map when the dataset has one.
struct TrainRows {
    rows: Vec<usize>,
    labels: Vec<i64>,
    n_labels: usize,
    label2category: Option<BTreeMap<i64, String>>,
}

fn train_rows(ds: &Dataset, sampler: &SamplerConfig) -> Result<TrainRows> {
    let rows = ds.rows_of_split(Split::Train);
    if rows.is_empty() {
        return Err(Error::input(format!(
            "{}: no train rows (split = 'train'); training needs labelled train rows",
            ds.file.display()
        )));
    }
    let mut labels = Vec::with_capacity(rows.len());
    for &r in &rows {
        match ds.label[r] {
            Some(l) => labels.push(l),
            None => {
                return Err(Error::input(format!(
                    "{}: train row id {} has no label; every train row needs one",
                    ds.file.display(),
                    ds.ids[r]
                )))
            }
        }
    }
    let n_labels = labels.iter().collect::<BTreeSet<_>>().len();
    if n_labels < 2 {
        return Err(Error::input(format!(
            "{}: the train split has {n_labels} label(s); pair training needs at least 2",
            ds.file.display()
        )));
    }
    let label2category = if sampler.needs_categories() {
        let mut m = BTreeMap::new();
        for (&r, &l) in rows.iter().zip(&labels) {
            let Some(c) = &ds.category[r] else {
                return Err(Error::input(format!(
                    "{}: train row id {} (label {l}) has no category; the {} sampler needs one on every train row",
                    ds.file.display(),
                    ds.ids[r],
                    sampler.name()
                )));
            };
            if let Some(prev) = m.insert(l, c.clone()) {
                if &prev != c {
                    return Err(Error::input(format!(
                        "{}: label {l} has two categories ('{prev}' and '{c}'); a label belongs to one category",
                        ds.file.display()
                    )));
                }
            }
        }
        Some(m)
    } else {
        None
    };
    Ok(TrainRows {
        rows,
        labels,
        n_labels,
        label2category,
    })
}

/// The validation queries' neighbour lists by the extractor, fixed for the run.
struct Val {
    qg: QueryGallery,
    /// Validated query positions (a subset when `val_queries` is set), ascending.
    queries: Vec<usize>,
    /// Per validated query: (gallery position, distance), ascending, `k` long at most.
    lists: Vec<Vec<(i64, f32)>>,
    n_gt: Vec<usize>,
    categories: Option<Vec<Option<String>>>,
    /// The extractor's own scores on these lists.
    baseline: Scores,
}

impl Val {
    fn scores(&self, lists: &[Vec<(i64, f32)>]) -> Result<Scores> {
        let hits: Vec<Vec<bool>> = self
            .queries
            .iter()
            .zip(lists)
            .map(|(&q, l)| {
                let g: Vec<usize> = l.iter().map(|(p, _)| *p as usize).collect();
                metrics::hits_of(&self.qg, q, &g)
            })
            .collect();
        let rel: Vec<Relevance> = hits
            .iter()
            .zip(&self.n_gt)
            .map(|(h, &n)| Relevance { hits: h, n_gt: n })
            .collect();
        metrics::evaluate(
            &rel,
            self.categories.as_deref(),
            &metrics::default_metric_set(),
            AggregateOptions::default(),
        )
    }
}

/// The extractor's embeddings of `rows` (row-major `[rows.len(), D]`), kept in `dir` as
/// `emb-<key>.npy` (OML's `embeddings_cache_dir`): the key hashes the extractor's weights and
/// input, the dataset and the rows, so a later run with the same extractor and data reads them
/// back instead of running the extractor over every image again. Returns whether it was read.
fn extractor_embeddings(
    ext: &Model,
    cache: &data::ImageCache,
    rows: &[usize],
    pre: &crate::image::Preprocess,
    bs: usize,
    dataset_hash: &str,
    dir: Option<&Path>,
) -> Result<(Vec<f32>, bool)> {
    let dim = ext.spec.embedding_dim as usize;
    let weights = crate::io::Fingerprint::of(ext.weights_path())?;
    let key_src = serde_json::json!({
        "weights": [weights.size, weights.hash],
        "spec": { "architecture": ext.spec.architecture, "normalise": ext.spec.normalise,
                  "input": ext.spec.input },
        "dataset": dataset_hash,
        "rows": rows,
    });
    let key = xxhash_rust::xxh3::xxh3_64(key_src.to_string().as_bytes());
    let file = dir.map(|d| d.join(format!("emb-{key:016x}.npy")));
    if let Some(f) = file.as_ref().filter(|f| f.is_file()) {
        if let Ok(n) = Npy::open(f) {
            if n.rows() == rows.len() && n.cols() == dim {
                let mut v = Vec::new();
                n.read_rows_f32(0, rows.len(), &mut v);
                return Ok((v, true));
            }
        }
    }
    let v = embed_rows(ext, cache, rows, pre, bs)?;
    if let (Some(f), Some(d)) = (&file, dir) {
        std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
        npy::write_f32_matrix(f, &v, dim, DType::F32)?;
    }
    Ok((v, false))
}

/// Extractor embeddings `[rows.len(), D]` (row-major) of dataset rows from the image cache.
fn embed_rows(
    ext: &Model,
    cache: &data::ImageCache,
    rows: &[usize],
    pre: &crate::image::Preprocess,
    bs: usize,
) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(rows.len() * ext.spec.embedding_dim as usize);
    let s = pre.size as i64;
    let pb = crate::progress::bar(rows.len() as u64, "embed");
    for chunk in rows.chunks(bs) {
        let buf = data::batch(cache, chunk, pre, None);
        let x = Tensor::f_from_slice(&buf)?.f_view([chunk.len() as i64, 3, s, s])?;
        let y = ext.embed(&x)?.f_contiguous()?;
        out.extend(Vec::<f32>::try_from(y.f_flatten(0, -1)?)?);
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn build_val<'e>(
    ds: &Dataset,
    emb_of: &dyn Fn(usize) -> Result<&'e [f32]>,
    dim: usize,
    cfg: &PairwiseTrainConfig,
    dev: Device,
    tmp_dir: &Path,
) -> Result<Option<Val>> {
    if ds.rows_of_split(Split::Validation).is_empty() {
        return Ok(None);
    }
    let qg = QueryGallery::from_dataset(ds, Split::Validation, SequenceRule::default())?;
    let (rows, q_map, g_map) = qg.union_rows();
    let mut emb: Vec<f32> = Vec::with_capacity(rows.len() * dim);
    for &r in &rows {
        emb.extend_from_slice(emb_of(r)?);
    }
    let tmp = tempfile::Builder::new()
        .prefix(".val-emb.")
        .suffix(".npy")
        .tempfile_in(tmp_dir)
        .map_err(|e| Error::io(tmp_dir, e))?;
    npy::write_f32_matrix(tmp.path(), &emb, dim, DType::F32)?;
    let file = Npy::open(tmp.path())?;
    let queries = Rows::new(&file, &q_map, &qg.queries.ids);
    let gallery = Rows::new(&file, &g_map, &qg.gallery.ids);
    let k = metrics::default_metric_set()
        .max_k()
        .max(cfg.pairwise.top_n);
    let nq = qg.queries.len();
    let mut all: Vec<Vec<(i64, f32)>> = vec![Vec::new(); nq];
    let job = Job {
        queries: &queries,
        gallery: &gallery,
        q_range: 0..nq,
        g_range: 0..qg.gallery.len(),
        k,
        metric: Metric::L2,
        compute: KnnCompute::Fp32,
        engine: Engine::resolve(Backend::Auto, dev)?,
        qg: &qg,
        memory_budget: 256 << 20,
    };
    search::search(&job, |q, list| {
        all[q] = list.iter().map(|&(p, d)| (p as i64, d)).collect();
        Ok(())
    })?;
    drop(file);
    let chosen: Vec<usize> = if cfg.pairwise.val_queries > 0 && cfg.pairwise.val_queries < nq {
        // A stream of its own: apart from the sampler's (epoch) and miner's (2^32 + step).
        let mut g = rng::seeded(cfg.seed, 3 << 32);
        let mut v = rng::choose_positions(&mut g, nq, cfg.pairwise.val_queries);
        v.sort_unstable();
        v
    } else {
        (0..nq).collect()
    };
    let counts = qg.positive_counts();
    let n_gt = chosen.iter().map(|&q| counts[q]).collect();
    let categories = ds.has_category().then(|| {
        chosen
            .iter()
            .map(|&q| qg.queries.category[q].clone())
            .collect()
    });
    let lists: Vec<Vec<(i64, f32)>> = chosen.iter().map(|&q| all[q].clone()).collect();
    let mut v = Val {
        qg,
        queries: chosen,
        lists,
        n_gt,
        categories,
        baseline: Scores::default(),
    };
    v.baseline = v.scores(&v.lists)?;
    Ok(Some(v))
}

/// Re-ranks the validation lists with the network (eval mode) and scores them.
fn validate(
    val: &Val,
    net: &PairwiseNet,
    cache: &data::ImageCache,
    pre: &crate::image::Preprocess,
    cfg: &PairwiseTrainConfig,
    dev: Device,
) -> Result<Scores> {
    let top_n = cfg.pairwise.top_n;
    let mut pairs: Vec<(usize, usize)> = Vec::new();
    for (&q, l) in val.queries.iter().zip(&val.lists) {
        let qr = val.qg.queries.rows[q];
        for (g, _) in l.iter().take(top_n) {
            pairs.push((qr, val.qg.gallery.rows[*g as usize]));
        }
    }
    let scores = match net.fusion() {
        Fusion::Stack => stacked_scores(net, &pairs, cache, pre, cfg, dev)?,
        Fusion::Siamese => siamese_scores(net, &pairs, cache, pre, cfg.batch_size_val, dev)?,
    };
    if scores.iter().any(|x| !x.is_finite()) {
        return Err(Error::input(
            "validation: the pairwise network produced NaN or infinite scores (the weights have diverged; lower the learning rate)",
        ));
    }
    let mut lists = val.lists.clone();
    let mut at = 0;
    for l in &mut lists {
        let n = l.len().min(top_n);
        merge(l, &scores[at..at + n], MERGE_EPS);
        at += n;
    }
    val.scores(&lists)
}

/// Scores of dataset-row pairs by a stacked network, batch by batch.
fn stacked_scores(
    net: &PairwiseNet,
    pairs: &[(usize, usize)],
    cache: &data::ImageCache,
    pre: &crate::image::Preprocess,
    cfg: &PairwiseTrainConfig,
    dev: Device,
) -> Result<Vec<f32>> {
    let s = pre.size as i64;
    let mut scores: Vec<f32> = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(cfg.batch_size_val) {
        let (a, b): (Vec<usize>, Vec<usize>) = chunk.iter().copied().unzip();
        let n = chunk.len() as i64;
        let x1 = Tensor::f_from_slice(&data::batch(cache, &a, pre, None))?
            .f_view([n, 3, s, s])?
            .f_to_device(dev)?;
        let x2 = Tensor::f_from_slice(&data::batch(cache, &b, pre, None))?
            .f_view([n, 3, s, s])?
            .f_to_device(dev)?;
        let p = net
            .predict(&x1, &x2, cfg.pairwise.swap_average)
            .f_to_device(Device::Cpu)?;
        scores.extend(Vec::<f32>::try_from(p)?);
    }
    Ok(scores)
}

/// Scores of dataset-row pairs by a siamese network: each image's features once, then the
/// head on the pairs.
fn siamese_scores(
    net: &PairwiseNet,
    pairs: &[(usize, usize)],
    cache: &data::ImageCache,
    pre: &crate::image::Preprocess,
    bs: usize,
    dev: Device,
) -> Result<Vec<f32>> {
    let mut rows: Vec<usize> = pairs.iter().flat_map(|&(a, b)| [a, b]).collect();
    rows.sort_unstable();
    rows.dedup();
    let s = pre.size as i64;
    let feats = tch::no_grad(|| -> Result<Tensor> {
        let mut parts = Vec::new();
        for chunk in rows.chunks(bs) {
            let x = Tensor::f_from_slice(&data::batch(cache, chunk, pre, None))?
                .f_view([chunk.len() as i64, 3, s, s])?
                .f_to_device(dev)?;
            parts.push(net.features_t(&x, false));
        }
        Ok(Tensor::f_cat(&parts, 0)?)
    })?;
    // `rows` holds both rows of every pair (built from them above).
    let at = |r: usize| -> Result<i64> {
        rows.binary_search(&r)
            .map(|i| i as i64)
            .map_err(|_| Error::internal(format!("pair row {r} has no features")))
    };
    let mut scores = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(bs.max(1) * 16) {
        let i1: Vec<i64> = chunk.iter().map(|p| at(p.0)).collect::<Result<_>>()?;
        let i2: Vec<i64> = chunk.iter().map(|p| at(p.1)).collect::<Result<_>>()?;
        let p = tch::no_grad(|| -> Result<Tensor> {
            let a = feats.f_index_select(0, &Tensor::f_from_slice(&i1)?.f_to_device(dev)?)?;
            let b = feats.f_index_select(0, &Tensor::f_from_slice(&i2)?.f_to_device(dev)?)?;
            Ok(net.pair_logits_t(&a, &b, false).sigmoid())
        })?;
        scores.extend(Vec::<f32>::try_from(p.f_to_device(Device::Cpu)?)?);
    }
    Ok(scores)
}

struct Progress {
    epoch: usize,
    batch_in_epoch: usize,
    step: usize,
    best: Option<(f64, usize, usize)>,
    train_rows: Vec<log::Row>,
    val_rows: Vec<log::Row>,
}

/// What the save helpers need.
struct Ctx<'a> {
    cfg: &'a PairwiseTrainConfig,
    cfg_json: &'a serde_json::Value,
    opts: &'a TrainOptions,
    ds_fp: &'a crate::io::Fingerprint,
    spec: PairwiseSpec,
    ckpt_root: &'a Path,
    baseline: Option<&'a Scores>,
    ext_dir: &'a Path,
}

/// Runs pairwise training (`train::run` dispatches here when the config has `[pairwise]`).
pub fn run(opts: &TrainOptions, on_device: impl FnOnce(&str)) -> Result<TrainSummary> {
    let t0 = Instant::now();
    let cfg = PairwiseTrainConfig::load(&opts.config, &opts.sets)?;
    if opts.compute != Compute::Fp32 {
        return Err(Error::input(format!(
            "--compute {}: pairwise training runs in fp32",
            opts.compute
        )));
    }
    let ckpt_root = opts.out.join("checkpoints");
    let last_dir = checkpoint::find(&ckpt_root, "last");
    if opts.resume && last_dir.is_none() {
        return Err(Error::input(format!(
            "--resume: {} has no checkpoint (checkpoints/last); start without --resume",
            opts.out.display()
        )));
    }
    let dev = device::resolve(opts.device)?;
    // The extractor, loaded now so that a finished run made with the same one is recognised.
    let ext = Model::load(&cfg.pairwise.extractor, dev)
        .map_err(|e| Error::input(format!("config key 'pairwise.extractor': {e}")))?;
    if ext.spec.kind != model::ModelKind::Extractor {
        return Err(Error::input(format!(
            "config key 'pairwise.extractor': {} is not an extractor",
            cfg.pairwise.extractor
        )));
    }
    let cfg_json = cfg.to_json();
    let ds = Dataset::read(&opts.dataset)?;
    let tr = train_rows(&ds, &cfg.sampler)?;
    // Every image training reads (train rows, validation queries and gallery): their bytes
    // are an input, and the image cache's key.
    let val_rows: Vec<usize> = ds.rows_of_split(Split::Validation);
    let mut cache_rows: Vec<usize> = tr.rows.iter().chain(&val_rows).copied().collect();
    cache_rows.sort_unstable();
    cache_rows.dedup();
    let images_fp = crate::io::Fingerprint::of_files(&data::row_paths(&ds, &cache_rows));
    let mut finish = {
        let mut extra = serde_json::Map::new();
        extra.insert("mode".into(), "pairwise".into());
        let mut m = super::manifest_plan(
            opts,
            &cfg_json,
            &device::describe(dev),
            extra,
            &images_fp,
            cache_rows.len(),
        )?;
        m.input("extractor", &ext.dir.join(model::MODEL_JSON))?;
        m.input("extractor_weights", &ext.weights_path())?;
        m
    };
    // Without --resume: up to date, refused (unfinished) or started over, as extractor runs.
    let last_dir = if opts.resume {
        finish.lock(&opts.out.join(model::WEIGHTS))?;
        last_dir
    } else {
        super::start_over(opts, &mut finish, last_dir.is_some())?;
        None
    };
    let mut sampler = cfg.sampler.build(&tr.labels, tr.label2category.as_ref())?;
    if sampler.is_empty() {
        return Err(Error::input(format!(
            "the {} sampler yields no batch per epoch on {} train rows of {} labels",
            cfg.sampler.name(),
            tr.rows.len(),
            tr.n_labels
        )));
    }
    on_device(&device::describe(dev));

    // The network (seeded) and its parameter groups: backbone, MLP head.
    tch::manual_seed(cfg.seed as i64);
    let arch = cfg.model.arch_spec();
    let head = cfg.head();
    let vs = nn::VarStore::new(dev);
    let net = PairwiseNet::new(&vs.root(), &arch, cfg.model.normalise, &head)?;
    if let Some(init) = &cfg.model.init {
        let dir = if Path::new(init).is_dir() {
            Path::new(init).to_path_buf()
        } else if model::zoo::is_key(init) {
            model::zoo::ensure(init)?
        } else {
            return Err(Error::input(format!(
                "config key 'model.init': '{init}' is neither a model folder nor a zoo key"
            )));
        };
        let missing = pw::init_backbone(&vs, &dir, &arch)
            .map_err(|e| Error::input(format!("config key 'model.init': {e}")))?;
        if !missing.is_empty() {
            eprintln!(
                "simile-train: {} backbone variable(s) not in {} keep their random initialisation: {}",
                missing.len(),
                dir.display(),
                missing.join(", ")
            );
        }
    }
    let params: Vec<Param> = super::trainable_sorted(&vs)
        .into_iter()
        .map(|(n, t)| Param {
            group: if n.starts_with("head.") { 1 } else { 0 },
            name: n,
            tensor: t,
        })
        .collect();
    let mut optimizer = Optimizer::new(&cfg.optimizer, params.len());
    let steps_per_epoch = sampler.len();
    let mut schedule = Schedule::new(&cfg.schedule, steps_per_epoch, cfg.epochs);

    // Images: the train rows and the validation queries and gallery, one cache.
    let pre = cfg.model.preprocess();
    let ext_pre = ext.spec.input.clone();
    let cache_dir = opts
        .cache_dir
        .clone()
        .unwrap_or_else(data::default_cache_dir);
    let tc = Instant::now();
    let open = |p: &crate::image::Preprocess| {
        data::ImageCache::open(
            &ds,
            &cache_rows,
            p,
            cfg.data.cache.then_some(cache_dir.as_path()),
            &images_fp,
        )
    };
    let cache = open(&pre)?;
    let same_geometry = ext_pre.size == pre.size
        && ext_pre.resize == pre.resize
        && ext_pre.crop_ratio == pre.crop_ratio;
    let ext_cache = if same_geometry {
        None
    } else {
        Some(open(&ext_pre)?)
    };
    let ext_cache_ref = ext_cache.as_ref().unwrap_or(&cache);
    let cache_seconds = tc.elapsed().as_secs_f64();

    // The extractor's embeddings: train rows (mining), validation lists.
    let te = Instant::now();
    std::fs::create_dir_all(&opts.out).map_err(|e| Error::io(&opts.out, e))?;
    let ds_fp = crate::io::Fingerprint::of(&opts.dataset)?;
    let (all_emb, emb_cached) = extractor_embeddings(
        &ext,
        ext_cache_ref,
        &cache_rows,
        &ext_pre,
        cfg.batch_size_val,
        &ds_fp.hash,
        cfg.data.cache.then_some(cache_dir.as_path()),
    )?;
    let dim = ext.spec.embedding_dim;
    let d = dim as usize;
    // Every train and validation row is in `cache_rows` (built from them above).
    let all_emb: &[f32] = &all_emb;
    let emb_of = |r: usize| -> Result<&[f32]> {
        let i = cache_rows
            .binary_search(&r)
            .map_err(|_| Error::internal(format!("dataset row {r} has no extractor embedding")))?;
        Ok(&all_emb[i * d..(i + 1) * d])
    };
    let mut train_emb: Vec<f32> = Vec::with_capacity(tr.rows.len() * d);
    for &r in &tr.rows {
        train_emb.extend_from_slice(emb_of(r)?);
    }
    let val = build_val(&ds, &emb_of, d, &cfg, dev, &opts.out)?;
    let embed_seconds = te.elapsed().as_secs_f64();
    eprintln!(
        "simile-train: pairwise: {} images prepared in {cache_seconds:.1} s, {} by {} in {embed_seconds:.1} s",
        cache_rows.len(),
        if emb_cached { "embeddings read from the cache" } else { "embedded" },
        cfg.pairwise.extractor
    );
    if let Some(v) = &val {
        eprintln!(
            "simile-train: the extractor on {} validation queries: {}",
            v.queries.len(),
            super::short_scores(&v.baseline, &cfg.metric_for_checkpointing)
        );
    }

    crate::io::atomic_write_bytes(
        opts.out.join("config.toml"),
        toml::to_string_pretty(&cfg)
            .map_err(|e| Error::internal(format!("config to TOML: {e}")))?
            .as_bytes(),
    )?;
    let spec = PairwiseSpec::new(arch.clone(), cfg.model.normalise, pre.clone(), head.clone())?;
    let ctx = Ctx {
        cfg: &cfg,
        cfg_json: &cfg_json,
        opts,
        ds_fp: &ds_fp,
        spec,
        ckpt_root: &ckpt_root,
        baseline: val.as_ref().map(|v| &v.baseline),
        ext_dir: &ext.dir,
    };

    let mut prog = Progress {
        epoch: 0,
        batch_in_epoch: 0,
        step: 0,
        best: None,
        train_rows: Vec::new(),
        val_rows: Vec::new(),
    };
    let mut resumed_from = None;
    if let Some(dir) = &last_dir {
        let ck = checkpoint::load(dir)?;
        let st = &ck.state;
        let strip = |v: &serde_json::Value| {
            let mut v = v.clone();
            if let Some(o) = v.as_object_mut() {
                o.remove("epochs");
            }
            v
        };
        let saved = strip(st.get("config").unwrap_or(&serde_json::Value::Null));
        let now = strip(&cfg_json);
        if saved != now {
            return Err(Error::input(format!(
                "--resume: {} was written with another config (only `epochs` may change); differing keys: {}",
                dir.display(),
                super::diff_keys(&saved, &now, "").join(", ")
            )));
        }
        super::load_into(&vs, &ck.net, "network")?;
        let steps: Vec<(String, u64)> =
            serde_json::from_value(st.pointer("/optimizer/steps").cloned().unwrap_or_default())
                .map_err(|e| Error::input(format!("{}: optimizer steps: {e}", dir.display())))?;
        optimizer.load_state(&params, &ck.optimizer, &steps)?;
        schedule = serde_json::from_value(st.get("schedule").cloned().unwrap_or_default())
            .map_err(|e| Error::input(format!("{}: schedule: {e}", dir.display())))?;
        sampler.load_state(st.get("sampler").unwrap_or(&serde_json::Value::Null))?;
        let get = |k: &str| st.get(k).and_then(|v| v.as_u64()).unwrap_or(0) as usize;
        prog.epoch = get("epoch");
        prog.batch_in_epoch = get("batch_in_epoch");
        prog.step = get("step");
        prog.best = st.get("best").and_then(|b| {
            Some((
                b.get("value")?.as_f64()?,
                b.get("epoch")?.as_u64()? as usize,
                b.get("step")?.as_u64()? as usize,
            ))
        });
        for (name, rows) in [
            ("train_log.parquet", &mut prog.train_rows),
            ("val_metrics.parquet", &mut prog.val_rows),
        ] {
            let p = opts.out.join(name);
            if p.exists() {
                *rows = log::read(&p, &["epoch", "step"])?
                    .into_iter()
                    .filter(|r| r.int("step").unwrap_or(0) as usize <= prog.step)
                    .collect();
            }
        }
        resumed_from = Some(prog.step);
        eprintln!(
            "simile-train: resuming from {} (epoch {}, step {})",
            dir.display(),
            prog.epoch,
            prog.step
        );
    }

    let total_steps = cfg.epochs * steps_per_epoch;
    let mut mon = super::monitor::Monitor::new(
        opts.log_every,
        opts.tensorboard.as_deref(),
        cfg.epochs,
        total_steps,
        prog.step,
    )?;
    let mut last_scores = None;
    if cfg.valid_at_start && prog.step == 0 && prog.val_rows.is_empty() {
        if let Some(v) = &val {
            let s = validate(v, &net, &cache, &pre, &cfg, dev)?;
            record_validation(
                &ctx, &mut prog, &s, &vs, &optimizer, &params, &schedule, &*sampler,
            )?;
            let line = format!(
                "simile-train: before training: {}",
                super::short_scores(&s, &cfg.metric_for_checkpointing)
            );
            mon.validation(prog.val_rows.last(), &line)?;
        }
    }

    let mut images: u64 = 0;
    let mut train_seconds = 0.0;
    let mut stopped = false;
    let s = pre.size as i64;

    'epochs: while prog.epoch < cfg.epochs {
        let epoch = prog.epoch;
        let batches = sampler.epoch(&mut rng::seeded(cfg.seed, epoch as u64));
        let frozen = epoch < cfg.freeze_n_epochs;
        for p in &params {
            let _ = p.tensor.set_requires_grad(!(frozen && p.group == 0));
        }
        let aug = (!cfg.augment.is_off()).then_some(&cfg.augment);
        while prog.batch_in_epoch < batches.len() {
            let ts0 = Instant::now();
            let batch = &batches[prog.batch_in_epoch];
            let rows: Vec<usize> = batch.iter().map(|&i| tr.rows[i]).collect();
            let labels: Vec<i64> = batch.iter().map(|&i| tr.labels[i]).collect();
            let step = prog.step;
            // Pairs from the extractor's (fixed) embeddings of the batch.
            let mut e = Vec::with_capacity(batch.len() * d);
            for &i in batch {
                e.extend_from_slice(&train_emb[i * d..(i + 1) * d]);
            }
            let et = Tensor::f_from_slice(&e)?.f_view([batch.len() as i64, dim])?;
            let dist =
                Vec::<f32>::try_from(crate::train::miner::pairwise_dist(&et, &et)?.f_flatten(0, -1)?)?;
            let pairs = mine_pairs(&dist, &labels, cfg.pairwise.mining);
            let n_neg = pairs.iter().filter(|p| p.2).count();
            if pairs.is_empty() || n_neg == 0 || n_neg == pairs.len() {
                return Err(Error::input(format!(
                    "epoch {epoch}, step {}: the batch gave {} positive and {n_neg} negative pairs; the sampler must put at least 2 labels with at least 2 rows each in a batch (use the balance sampler)",
                    step + 1,
                    pairs.len() - n_neg
                )));
            }
            let buf = data::batch(&cache, &rows, &pre, aug.map(|a| (a, cfg.seed, step)));
            let x = Tensor::f_from_slice(&buf)?
                .f_view([rows.len() as i64, 3, s, s])?
                .f_to_device(dev)?;
            let i1 = Tensor::f_from_slice(&pairs.iter().map(|p| p.0 as i64).collect::<Vec<_>>())?
                .f_to_device(dev)?;
            let i2 = Tensor::f_from_slice(&pairs.iter().map(|p| p.1 as i64).collect::<Vec<_>>())?
                .f_to_device(dev)?;
            let target: Vec<f32> = pairs.iter().map(|p| p.2 as u8 as f32).collect();
            let y = Tensor::f_from_slice(&target)?.f_to_device(dev)?;
            let factor = schedule.factor(step, epoch);
            let base = cfg.optimizer.group_lrs();
            let lrs = [base[0] * factor, base[1] * factor, base[2] * factor];
            // Dropout draws from torch's generator: reseeded per step so a resumed run
            // repeats them.
            tch::manual_seed((cfg.seed as i64) ^ ((step as i64 + 1) << 20));
            let logits = match net.fusion() {
                // One backbone pass per image of the batch, however many pairs it gives.
                Fusion::Siamese => {
                    let f = net.features_t(&x, true);
                    net.pair_logits_t(&f.f_index_select(0, &i1)?, &f.f_index_select(0, &i2)?, true)
                }
                Fusion::Stack => {
                    net.logits_t(&x.f_index_select(0, &i1)?, &x.f_index_select(0, &i2)?, true)
                }
            };
            let loss_t = logits.f_binary_cross_entropy_with_logits(
                &y,
                None::<&Tensor>,
                None::<&Tensor>,
                Reduction::Mean,
            )?;
            let loss = loss_t.f_double_value(&[])?;
            if !loss.is_finite() {
                let kept = checkpoint::find(&ckpt_root, "last")
                    .map(|d| format!("the last good checkpoint, {}, is kept (resume from it with a lower learning rate: --resume --set optimizer.lr=...)", d.display()))
                    .unwrap_or_else(|| "no checkpoint had been written yet".into());
                write_logs(&ctx, &prog)?;
                return Err(Error::input(format!(
                    "training stopped: the loss became {loss} at epoch {epoch}, step {} (learning rate {:.3e}); {kept}",
                    step + 1,
                    lrs[0]
                )));
            }
            loss_t.f_backward()?;
            let mut grads: Vec<Option<Tensor>> = params
                .iter()
                .map(|p| {
                    let g = p.tensor.grad();
                    (p.tensor.requires_grad() && g.defined()).then_some(g)
                })
                .collect();
            let gnorm = optim::clip(&mut grads, cfg.grad_clip_norm, cfg.grad_clip_value)?;
            optimizer.step(&params, &grads, &lrs)?;
            drop(grads);
            for p in &params {
                let mut g = p.tensor.grad();
                if g.defined() {
                    let _ = g.f_zero_()?;
                }
            }
            let mut logs = crate::train::miner::Logs::new();
            let lg = logits.detach().to_device(Device::Cpu);
            let lv = Vec::<f32>::try_from(&lg)?;
            let correct = lv
                .iter()
                .zip(&target)
                .filter(|(l, t)| (**l > 0.0) == (**t > 0.5))
                .count();
            logs.insert("pair_accuracy".into(), correct as f64 / lv.len() as f64);
            logs.insert("n_pos_pairs".into(), (pairs.len() - n_neg) as f64);
            logs.insert("n_neg_pairs".into(), n_neg as f64);
            let mean_p = |neg: bool| {
                let v: Vec<f64> = lv
                    .iter()
                    .zip(&target)
                    .filter(|(_, t)| (**t > 0.5) == neg)
                    .map(|(l, _)| 1.0 / (1.0 + (-*l as f64).exp()))
                    .collect();
                v.iter().sum::<f64>() / v.len().max(1) as f64
            };
            logs.insert("pos_prob".into(), mean_p(false));
            logs.insert("neg_prob".into(), mean_p(true));
            prog.step += 1;
            prog.batch_in_epoch += 1;
            let dt = ts0.elapsed().as_secs_f64();
            train_seconds += dt;
            images += rows.len() as u64;
            let mut row = super::step_row(
                epoch,
                prog.step,
                loss,
                &lrs,
                &logs,
                rows.len() as f64 / dt.max(1e-9),
            );
            row.values.push(("grad_norm".into(), Some(gnorm)));
            mon.step(&row, rows.len(), dt)?;
            prog.train_rows.push(row);
            let stop_now = opts.stop_after_steps == Some(prog.step);
            let every = cfg.checkpoint_every_steps;
            let mid = prog.batch_in_epoch < batches.len();
            if mid && (stop_now || (every > 0 && prog.step.is_multiple_of(every))) {
                save_ckpt(
                    &ctx, "last", &prog, &vs, &optimizer, &params, &schedule, &*sampler,
                )?;
                write_logs(&ctx, &prog)?;
            }
            if stop_now && mid {
                stopped = true;
                break 'epochs;
            }
        }
        prog.epoch += 1;
        prog.batch_in_epoch = 0;
        let last = prog.epoch == cfg.epochs;
        if let Some(v) = &val {
            if (cfg.valid_period > 0 && prog.epoch.is_multiple_of(cfg.valid_period)) || last {
                mon.status(format!("e{}/{} validating", prog.epoch, cfg.epochs));
                let sc = validate(v, &net, &cache, &pre, &cfg, dev)?;
                record_validation(
                    &ctx, &mut prog, &sc, &vs, &optimizer, &params, &schedule, &*sampler,
                )?;
                let monitor = schedule
                    .monitor(&cfg.metric_for_checkpointing)
                    .map(str::to_string);
                if let Some(key) = monitor {
                    schedule.observe(sc.get(&key).flatten(), cfg.mode_for_checkpointing);
                }
                let line = format!(
                    "simile-train: epoch {}/{} step {}: {}",
                    prog.epoch,
                    cfg.epochs,
                    prog.step,
                    super::short_scores(&sc, &cfg.metric_for_checkpointing)
                );
                mon.validation(prog.val_rows.last(), &line)?;
                last_scores = Some(sc);
            }
        }
        save_ckpt(
            &ctx, "last", &prog, &vs, &optimizer, &params, &schedule, &*sampler,
        )?;
        write_logs(&ctx, &prog)?;
        if opts.stop_after_steps == Some(prog.step) && !last {
            stopped = true;
            break;
        }
    }
    mon.finish();

    if !stopped {
        write_logs(&ctx, &prog)?;
        let mut m = finish;
        m.rows("train_rows", tr.rows.len() as u64)
            .rows("labels", tr.n_labels as u64)
            .rows("steps", prog.step as u64)
            .rows("epochs", prog.epoch as u64);
        m.timing("image_cache", cache_seconds)
            .timing("extractor_embeddings", embed_seconds)
            .timing("train", train_seconds)
            .timing("total", t0.elapsed().as_secs_f64());
        // The model folder appears only now (see `train::run`): the best validated weights,
        // or the last ones without validation.
        let best_net = match prog.best {
            Some(_) => checkpoint::find(&ckpt_root, "best")
                .map(|d| checkpoint::load(&d))
                .transpose()?
                .map(|c| c.net),
            None => None,
        };
        let folder = seal_model(&ctx, &vs, best_net.as_deref(), prog.best)?;
        model::commit_folder(m, folder, Vec::new())?;
    }
    Ok(TrainSummary {
        out: opts.out.clone(),
        device: device::describe(dev),
        epochs: prog.epoch,
        steps: prog.step,
        images,
        seconds: t0.elapsed().as_secs_f64(),
        train_seconds,
        images_per_s: images as f64 / train_seconds.max(1e-9),
        best: prog
            .best
            .map(|(v, e, _)| (cfg.metric_for_checkpointing.clone(), v, e)),
        last_scores,
        stopped,
        resumed_from,
    })
}

#[allow(clippy::too_many_arguments)]
fn record_validation(
    ctx: &Ctx,
    prog: &mut Progress,
    s: &Scores,
    vs: &nn::VarStore,
    optimizer: &Optimizer,
    params: &[Param],
    schedule: &Schedule,
    sampler: &dyn crate::train::sampler::BatchSampler,
) -> Result<()> {
    let key = &ctx.cfg.metric_for_checkpointing;
    let Some(value) = s.get(key) else {
        return Err(Error::input(format!(
            "config key 'metric_for_checkpointing': '{key}' is not a validation key; the keys are: {}",
            s.entries
                .iter()
                .map(|(k, _)| k.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    };
    prog.val_rows.push(log::Row {
        ints: vec![
            ("epoch".into(), prog.epoch as i64),
            ("step".into(), prog.step as i64),
        ],
        values: s.entries.clone(),
    });
    let improved = value.is_some_and(|v| {
        ctx.cfg
            .mode_for_checkpointing
            .better(v, prog.best.map(|b| b.0))
    });
    if improved {
        prog.best = Some((value.unwrap_or(f64::NAN), prog.epoch, prog.step));
        save_ckpt(ctx, "best", prog, vs, optimizer, params, schedule, sampler)?;
    }
    write_logs(ctx, prog)
}

#[allow(clippy::too_many_arguments)]
fn save_ckpt(
    ctx: &Ctx,
    name: &str,
    prog: &Progress,
    vs: &nn::VarStore,
    optimizer: &Optimizer,
    params: &[Param],
    schedule: &Schedule,
    sampler: &dyn crate::train::sampler::BatchSampler,
) -> Result<()> {
    let (opt_tensors, opt_steps) = optimizer.state(params);
    let state = serde_json::json!({
        "simile_checkpoint": 1,
        "mode": "pairwise",
        "epoch": prog.epoch,
        "batch_in_epoch": prog.batch_in_epoch,
        "step": prog.step,
        "best": prog.best.map(|(v, e, s)| serde_json::json!({
            "key": ctx.cfg.metric_for_checkpointing, "value": v, "epoch": e, "step": s})),
        "optimizer": { "steps": opt_steps },
        "schedule": schedule,
        "sampler": sampler.state(),
        "rng": {
            "seed": ctx.cfg.seed,
            "weights_init": "tch::manual_seed(seed)",
            "sampler": "rng::seeded(seed, epoch)",
            "dropout": "tch::manual_seed(seed ^ ((step + 1) << 20)) before each step",
            "augment": "data::image_rng(seed, step, position)",
            "val_queries": "rng::seeded(seed, 3 * 2^32)",
        },
        "compute": "fp32",
        "dataset": { "path": ctx.opts.dataset.display().to_string(), "fingerprint": ctx.ds_fp },
        "train_log_rows": prog.train_rows.len(),
        "val_rows": prog.val_rows.len(),
        "config": ctx.cfg_json,
    });
    let ck = checkpoint::Checkpoint {
        state,
        net: super::cpu_copies(&super::sorted_vars(vs)),
        criterion: Vec::new(),
        optimizer: opt_tensors,
        bank: Vec::new(),
    };
    checkpoint::save(ctx.ckpt_root, name, &ck)
}

/// Writes the model folder (kind pairwise) from the weights now.
/// The model folder's files, sealed: from `net` (the best checkpoint's tensors) when given,
/// else from the current weights.
fn seal_model(
    ctx: &Ctx,
    vs: &nn::VarStore,
    net: Option<&[(String, Tensor)]>,
    best: Option<(f64, usize, usize)>,
) -> Result<model::SealedFolder> {
    let mut spec = ctx.spec.clone();
    spec.model.provenance = serde_json::json!({
        "trained_by": "simile-train (pairwise)",
        "simile_version": crate::manifest::VERSION,
        "commit": crate::manifest::COMMIT,
        "dataset": { "path": ctx.opts.dataset.display().to_string(), "fingerprint": ctx.ds_fp },
        "extractor": ctx.ext_dir.display().to_string(),
        "config": ctx.cfg_json,
        "sets": ctx.opts.sets,
        "extractor_validation": ctx.baseline.map(|s| s.to_json()),
        "weights": match best {
            Some((v, e, s)) => serde_json::json!({
                "chosen_by": ctx.cfg.metric_for_checkpointing, "value": v, "epoch": e, "step": s}),
            None => serde_json::json!({"chosen_by": "last (no validation split)"}),
        },
    });
    let mut cpu = nn::VarStore::new(Device::Cpu);
    PairwiseNet::new(
        &cpu.root(),
        &spec.model.architecture,
        spec.model.normalise,
        &spec.pairwise,
    )?;
    match net {
        Some(t) => super::load_into(&cpu, t, "best checkpoint")?,
        None => cpu.copy(vs)?,
    }
    pw::seal_folder(&ctx.opts.out, &spec, &cpu)
}

fn write_logs(ctx: &Ctx, prog: &Progress) -> Result<()> {
    log::write(
        &ctx.opts.out.join("train_log.parquet"),
        &prog.train_rows,
        &log::meta("train_log"),
    )?;
    if !prog.val_rows.is_empty() {
        log::write(
            &ctx.opts.out.join("val_metrics.parquet"),
            &prog.val_rows,
            &log::meta("val_metrics"),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
epochs = 1
[model]
arch = "smallcnn"
size = 16
[sampler]
name = "balance"
n_labels = 2
n_instances = 2
[pairwise]
extractor = "smallcnn"
"#;

    #[test]
    fn config_defaults_round_trip_and_errors() {
        let c = PairwiseTrainConfig::parse(MINIMAL, &[], "t.toml").unwrap();
        assert_eq!(c.pairwise.mlp_hidden, vec![192]);
        assert_eq!(c.pairwise.mining, PairMining::Hard);
        assert_eq!(c.pairwise.top_n, 5);
        // The fusion follows the backbone unless the config names one.
        assert_eq!(c.pairwise.fusion, None);
        assert_eq!(c.head().fusion, Fusion::Siamese);
        let v =
            PairwiseTrainConfig::parse(MINIMAL, &["model.arch=\"vits16\"".into()], "t").unwrap();
        assert_eq!(v.head().fusion, Fusion::Stack);
        let st = PairwiseTrainConfig::parse(MINIMAL, &["pairwise.fusion=\"stack\"".into()], "t")
            .unwrap();
        assert_eq!(st.head().fusion, Fusion::Stack);
        let text = toml::to_string_pretty(&c).unwrap();
        assert_eq!(PairwiseTrainConfig::parse(&text, &[], "r").unwrap(), c);
        let e = PairwiseTrainConfig::parse(MINIMAL, &["pairwise.top_n=1".into()], "t").unwrap_err();
        assert!(e.to_string().contains("pairwise.top_n"), "{e}");
        let e = PairwiseTrainConfig::parse(MINIMAL, &["pairwise.minning=\"all\"".into()], "t")
            .unwrap_err();
        assert!(
            e.to_string().contains("did you mean 'pairwise.mining'"),
            "{e}"
        );
        let e =
            PairwiseTrainConfig::parse(&format!("{MINIMAL}[loss]\nname = \"triplet\"\n"), &[], "t")
                .unwrap_err();
        assert!(e.to_string().contains("no [loss] table"), "{e}");
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn pairs_miner_follows_oml() {
        // oml.md 3: labels [0,0,1,1] with this distance matrix mine the hard triplets
        // {(0,1,2),(1,0,2),(2,3,0),(3,2,0)}: positive pairs (0,1), (2,3); negative pairs
        // (0,2), (1,2), (0,3), each sorted and unique.
        let dist = [
            0.0, 0.3, 0.2, 0.4, 0.3, 0.0, 0.4, 0.8, 0.2, 0.4, 0.0, 0.5, 0.4, 0.8, 0.5, 0.0,
        ];
        let p = mine_pairs(&dist, &[0, 0, 1, 1], PairMining::Hard);
        assert_eq!(
            p,
            vec![
                (0, 1, false),
                (2, 3, false),
                (0, 2, true),
                (0, 3, true),
                (1, 2, true)
            ]
        );
        let all = mine_pairs(&dist, &[0, 0, 1, 1], PairMining::All);
        assert_eq!(
            all,
            vec![
                (0, 1, false),
                (2, 3, false),
                (0, 2, true),
                (0, 3, true),
                (1, 2, true),
                (1, 3, true)
            ]
        );
        // A label alone in the batch: its only "positive" is itself, dropped.
        let d3 = [0.0, 0.1, 0.2, 0.1, 0.0, 0.3, 0.2, 0.3, 0.0];
        let p = mine_pairs(&d3, &[0, 0, 1], PairMining::Hard);
        assert_eq!(p, vec![(0, 1, false), (0, 2, true), (1, 2, true)]);
    }
}
