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
//! The loop, optimiser, schedule, checkpoints, logs and resume are the trainer's
//! (`trainer`); this file is the task behind it. Randomness: sampler batches from `rng::seeded(seed, epoch)`,
//! augmentations from `data::image_rng`, dropout from `tch::manual_seed` reseeded per step, so
//! a run is a function of the seed and a resumed run repeats the uninterrupted one.
use super::checkpoint::Checkpoint;
use super::config::{PairMining, TrainConfig};
use super::data::{self, ImageCache, Input};
use super::distributed::Dist;
use super::loss::Logs;
use super::miner::{AllTriplets, HardTriplets};
use super::optim::Param;
use super::sampler::rng;
use super::task::{self, Best, Plan, Setup, Task, TaskState};
use crate::dataset::{Dataset, Split};
use crate::error::{Error, Result};
use crate::knn::search;
use crate::manifest::ManifestBuilder;
use crate::metrics::{self, AggregateOptions, Relevance, Scores};
use crate::model::pairwise::{self as pw, Fusion, PairwiseNet, PairwiseSpec};
use crate::model::{self, Model};
use crate::npy::{self, DType, Npy};
use crate::rerank::pairwise::{merge, MERGE_EPS};
use crate::retrieval::{QueryGallery, SequenceRule};
use std::collections::BTreeSet;
use std::path::Path;
use std::time::Instant;
use tch::{nn, Device, Kind, Reduction, Tensor};

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
    /// The key whose interval is reported (the checkpointing metric).
    ci_key: String,
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
        // The checkpointing metric's interval beside it, as in extractor validation.
        let labels: Vec<Option<i64>> = self
            .queries
            .iter()
            .map(|&q| self.qg.queries.labels[q])
            .collect();
        metrics::confidence::evaluate_with_interval(
            &rel,
            self.categories.as_deref(),
            &labels,
            &metrics::default_metric_set(),
            AggregateOptions::default(),
            &metrics::confidence::CiOptions::default(),
            &self.ci_key,
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
            // A cache file of another shape or type is not ours: computed again.
            if n.expect_matrix().is_ok() && n.rows() == rows.len() && n.cols() == dim {
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
        let buf = data::batch(cache, chunk, pre, None, 0);
        let x = Tensor::f_from_slice(&buf)?.f_view([chunk.len() as i64, 3, s, s])?;
        let y = ext.embed(&x)?.f_contiguous()?;
        out.extend(Vec::<f32>::try_from(y.f_flatten(0, -1)?)?);
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    Ok(out)
}

fn build_val<'e>(
    ds: &Dataset,
    emb_of: &dyn Fn(usize) -> Result<&'e [f32]>,
    dim: usize,
    cfg: &TrainConfig,
    dev: Device,
) -> Result<Option<Val>> {
    let Some(pc) = cfg.pairwise.as_ref() else {
        return Ok(None);
    };
    if ds.rows_of_split(Split::Validation).is_empty() {
        return Ok(None);
    }
    let qg = QueryGallery::from_dataset(ds, Split::Validation, SequenceRule::default())?;
    let (rows, q_map, g_map) = qg.union_rows();
    let mut emb: Vec<f32> = Vec::with_capacity(rows.len() * dim);
    for &r in &rows {
        emb.extend_from_slice(emb_of(r)?);
    }
    let k = metrics::default_metric_set().max_k().max(pc.top_n);
    let nq = qg.queries.len();
    let mut all: Vec<Vec<(i64, f32)>> = vec![Vec::new(); nq];
    search::search_matrix(&emb, dim, &qg, &q_map, &g_map, k, dev, |q, list| {
        all[q] = list.iter().map(|&(p, d)| (p as i64, d)).collect();
        Ok(())
    })?;
    let chosen: Vec<usize> = if pc.val_queries > 0 && pc.val_queries < nq {
        // A stream of its own: apart from the sampler's (epoch) and miner's (2^32 + step).
        let mut g = rng::seeded(cfg.seed, 3 << 32);
        let mut v = rng::choose_positions(&mut g, nq, pc.val_queries);
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
        ci_key: cfg.metric_for_checkpointing.clone(),
    };
    v.baseline = v.scores(&v.lists)?;
    Ok(Some(v))
}

/// Re-ranks the validation lists with the network (eval mode) and scores them.
fn validate(
    val: &Val,
    net: &PairwiseNet,
    cache: &ImageCache,
    cfg: &TrainConfig,
    dev: Device,
) -> Result<Scores> {
    let pc = cfg
        .pairwise
        .as_ref()
        .ok_or_else(|| Error::internal("pairwise validation without [pairwise]"))?;
    let pre = cfg.model.preprocess();
    // The pairs' images, each once: dataset rows, ascending.
    let mut pairs: Vec<(usize, usize)> = Vec::new();
    for (&q, l) in val.queries.iter().zip(&val.lists) {
        let qr = val.qg.queries.rows[q];
        for (g, _) in l.iter().take(pc.top_n) {
            pairs.push((qr, val.qg.gallery.rows[*g as usize]));
        }
    }
    let mut items: Vec<usize> = pairs.iter().flat_map(|&(a, b)| [a, b]).collect();
    items.sort_unstable();
    items.dedup();
    // `items` holds both rows of every pair (built from them above).
    let at = |r: usize| items.binary_search(&r).unwrap_or(0);
    let pairs: Vec<(usize, usize)> = pairs.iter().map(|&(a, b)| (at(a), at(b))).collect();
    let s = pre.size as i64;
    let images = |idx: &[usize]| -> Result<Tensor> {
        let rows: Vec<usize> = idx.iter().map(|&i| items[i]).collect();
        Ok(
            Tensor::f_from_slice(&data::batch(cache, &rows, &pre, None, 0))?.f_view([
                rows.len() as i64,
                3,
                s,
                s,
            ])?,
        )
    };
    let scores = pw::score_pairs(
        net,
        pc.swap_average,
        items.len(),
        &pairs,
        &images,
        cfg.batch_size_val,
        dev,
        false,
    )?;
    if scores.iter().any(|x| !x.is_finite()) {
        return Err(Error::input(
            "validation: the pairwise network produced NaN or infinite scores (the weights have diverged; lower the learning rate)",
        ));
    }
    let mut lists = val.lists.clone();
    let mut at = 0;
    for l in &mut lists {
        let n = l.len().min(pc.top_n);
        merge(l, &scores[at..at + n], MERGE_EPS);
        at += n;
    }
    val.scores(&lists)
}

/// Pairwise training before its network exists: the extractor, loaded now so that a finished
/// run made with the same one is recognised.
pub(crate) struct PairwisePlan {
    ext: Model,
    val_rows: Vec<usize>,
}

pub(crate) fn plan(cfg: &TrainConfig, ds: &Dataset, dev: Device) -> Result<PairwisePlan> {
    let p = cfg
        .pairwise
        .as_ref()
        .ok_or_else(|| Error::internal("pairwise training without [pairwise]"))?;
    let ext = Model::load(&p.extractor, dev)
        .map_err(|e| Error::input(format!("config key 'pairwise.extractor': {e}")))?;
    if ext.spec.kind != model::ModelKind::Extractor {
        return Err(Error::input(format!(
            "config key 'pairwise.extractor': {} is not an extractor",
            p.extractor
        )));
    }
    Ok(PairwisePlan {
        ext,
        val_rows: ds.rows_of_split(Split::Validation),
    })
}

impl Plan for PairwisePlan {
    fn validation_rows(&self) -> Vec<usize> {
        self.val_rows.clone()
    }

    fn manifest(&self, m: &mut ManifestBuilder, out: &Path) -> Result<()> {
        task::refuse_same_folder("pairwise.extractor", &self.ext.dir, out)?;
        m.param("mode", "pairwise".into());
        m.input("extractor", &self.ext.dir.join(model::MODEL_JSON))?;
        m.input("extractor_weights", &self.ext.weights_path())?;
        Ok(())
    }

    fn build<'a>(self: Box<Self>, s: &Setup<'a>) -> Result<Box<dyn Task + 'a>> {
        let cfg = s.cfg;
        let pc = cfg
            .pairwise
            .as_ref()
            .ok_or_else(|| Error::internal("pairwise training without [pairwise]"))?;
        let ext = self.ext;
        // The network (seeded) and its parameter groups: backbone 0, MLP head 1.
        let arch = cfg.model.arch_spec();
        let head = cfg.head();
        let vs = nn::VarStore::new(s.dev);
        let net = PairwiseNet::new(&vs.root(), &arch, cfg.model.normalise, &head)?;
        if let Some(init) = &cfg.model.init {
            let dir = task::init_dir(init)?;
            let mut missing = pw::init_backbone(&vs, &dir, &arch)
                .map_err(|e| Error::input(format!("config key 'model.init': {e}")))?;
            task::report_missing("backbone ", &mut missing, &dir);
        }
        let params: Vec<Param> = task::trainable_sorted(&vs)
            .into_iter()
            .map(|(n, t)| Param {
                group: if n.starts_with("head.") { 1 } else { 0 },
                name: n,
                tensor: t,
            })
            .collect();

        // The extractor's embeddings: train rows (mining), validation lists. At the
        // extractor's own input, a second image cache when its geometry differs.
        let pre = cfg.model.preprocess();
        let ext_pre = ext.spec.input.clone();
        let te = Instant::now();
        let same_geometry = ext_pre.size == pre.size
            && ext_pre.resize == pre.resize
            && ext_pre.crop_ratio == pre.crop_ratio;
        let ext_cache = if same_geometry {
            None
        } else {
            Some(ImageCache::open(
                s.ds,
                s.cache_rows,
                &ext_pre,
                cfg.data.cache.then_some(s.cache_dir),
                s.images_fp,
            )?)
        };
        let (all_emb, emb_cached) = extractor_embeddings(
            &ext,
            ext_cache.as_ref().unwrap_or(s.cache),
            s.cache_rows,
            &ext_pre,
            cfg.batch_size_val,
            &s.ds_fp.hash,
            cfg.data.cache.then_some(s.cache_dir),
        )?;
        let d = ext.spec.embedding_dim as usize;
        // Every train and validation row is in `cache_rows` (built from them).
        let emb_of = |r: usize| -> Result<&[f32]> {
            let i = s.cache_rows.binary_search(&r).map_err(|_| {
                Error::internal(format!("dataset row {r} has no extractor embedding"))
            })?;
            Ok(&all_emb[i * d..(i + 1) * d])
        };
        let mut train_emb: Vec<f32> = Vec::with_capacity(s.ts.rows.len() * d);
        for &r in &s.ts.rows {
            train_emb.extend_from_slice(emb_of(r)?);
        }
        let val = build_val(s.ds, &emb_of, d, cfg, s.dev)?;
        let embed_seconds = te.elapsed().as_secs_f64();
        eprintln!(
            "simile-train: pairwise: {} by {} in {embed_seconds:.1} s",
            if emb_cached {
                "embeddings read from the cache"
            } else {
                "embedded"
            },
            pc.extractor
        );
        if let Some(v) = &val {
            eprintln!(
                "simile-train: the extractor on {} validation queries: {}",
                v.queries.len(),
                task::short_scores(&v.baseline, &cfg.metric_for_checkpointing)
            );
        }
        let spec = PairwiseSpec::new(arch, cfg.model.normalise, pre, head)?;
        Ok(Box::new(Pairwise {
            s: *s,
            ext_dir: ext.dir.clone(),
            spec,
            vs,
            net,
            params,
            train_emb,
            dim: d,
            val,
            embed_seconds,
        }))
    }
}

struct Pairwise<'a> {
    s: Setup<'a>,
    ext_dir: std::path::PathBuf,
    spec: PairwiseSpec,
    vs: nn::VarStore,
    net: PairwiseNet,
    params: Vec<Param>,
    /// The extractor's embeddings of the train rows, row-major `[rows, dim]`.
    train_emb: Vec<f32>,
    dim: usize,
    val: Option<Val>,
    embed_seconds: f64,
}

impl Task for Pairwise<'_> {
    fn params(&self) -> &[Param] {
        &self.params
    }

    fn loss(
        &mut self,
        x: &Input,
        batch: &[usize],
        step: usize,
        dist: Option<&Dist>,
    ) -> Result<(Tensor, Logs)> {
        let x = x.images()?;
        let (cfg, d) = (self.s.cfg, self.dim);
        let mining = cfg.pairwise.as_ref().map(|p| p.mining).unwrap_or_default();
        let labels: Vec<i64> = batch
            .iter()
            .map(|&i| self.s.ts.labels[self.s.ts.classes[i] as usize])
            .collect();
        // Pairs from the extractor's (fixed) embeddings of the batch.
        let mut e = Vec::with_capacity(batch.len() * d);
        for &i in batch {
            e.extend_from_slice(&self.train_emb[i * d..(i + 1) * d]);
        }
        let et = Tensor::f_from_slice(&e)?.f_view([batch.len() as i64, d as i64])?;
        let dmat = Vec::<f32>::try_from(super::miner::pairwise_dist(&et, &et)?.f_flatten(0, -1)?)?;
        let pairs = mine_pairs(&dmat, &labels, mining);
        let n_neg = pairs.iter().filter(|p| p.2).count();
        if pairs.is_empty() || n_neg == 0 || n_neg == pairs.len() {
            return Err(Error::input(format!(
                "step {}: the batch gave {} positive and {n_neg} negative pairs; the sampler must put at least 2 labels with at least 2 rows each in a batch (use the balance sampler)",
                step + 1,
                pairs.len() - n_neg
            )));
        }
        // Data-parallel: every rank has the whole batch and mines the same pairs; rank r scores
        // its share of them, and its loss is its share's sum over all pairs' count, so the
        // ranks' gradients add up to the whole batch's mean.
        let n_pairs = pairs.len();
        let pairs = match dist {
            Some(dd) => pairs[dd.share(n_pairs)].to_vec(),
            None => pairs,
        };
        let dev = self.s.dev;
        let i1 = Tensor::f_from_slice(&pairs.iter().map(|p| p.0 as i64).collect::<Vec<_>>())?
            .f_to_device(dev)?;
        let i2 = Tensor::f_from_slice(&pairs.iter().map(|p| p.1 as i64).collect::<Vec<_>>())?
            .f_to_device(dev)?;
        let target: Vec<f32> = pairs.iter().map(|p| p.2 as u8 as f32).collect();
        let y = Tensor::f_from_slice(&target)?.f_to_device(dev)?;
        // Dropout draws from torch's generator: reseeded per step so a resumed run repeats
        // them.
        tch::manual_seed((cfg.seed as i64) ^ ((step as i64 + 1) << 20));
        let net = &self.net;
        // bf16/fp16: the backbone and the head under autocast, the logits back in fp32 for the
        // loss (validation, as simile-rerank, scores in fp32).
        let amp = self.s.opts.compute.autocast(dev)?;
        let logits = match net.fusion() {
            // One backbone pass per image of the batch, however many pairs it gives.
            Fusion::Siamese => {
                let f = net.features_t(x, true);
                net.pair_logits_t(&f.f_index_select(0, &i1)?, &f.f_index_select(0, &i2)?, true)
            }
            Fusion::Stack => {
                net.logits_t(&x.f_index_select(0, &i1)?, &x.f_index_select(0, &i2)?, true)
            }
        };
        drop(amp);
        let logits = logits.f_to_kind(Kind::Float)?;
        let loss = logits
            .f_binary_cross_entropy_with_logits(
                &y,
                None::<&Tensor>,
                None::<&Tensor>,
                Reduction::Sum,
            )?
            .f_div_scalar(n_pairs as f64)?;
        let lv = Vec::<f32>::try_from(&logits.detach().to_device(Device::Cpu))?;
        let mut logs = Logs::new();
        let correct = lv
            .iter()
            .zip(&target)
            .filter(|(l, t)| (**l > 0.0) == (**t > 0.5))
            .count();
        logs.insert("pair_accuracy".into(), correct as f64 / lv.len() as f64);
        logs.insert("n_pos_pairs".into(), (n_pairs - n_neg) as f64);
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
        Ok((loss, logs))
    }

    fn shards_rows(&self) -> bool {
        false
    }

    fn loss_is_partial(&self) -> bool {
        true
    }

    fn can_validate(&self) -> bool {
        self.val.is_some()
    }

    fn sync_tensors(&self) -> Vec<Tensor> {
        task::sorted_vars(&self.vs)
            .into_iter()
            .map(|(_, t)| t)
            .collect()
    }

    fn buffers(&self) -> Vec<Tensor> {
        task::buffers(&self.vs)
    }

    fn validate(&mut self, _dist: Option<&Dist>) -> Result<Scores> {
        let v = self
            .val
            .as_ref()
            .ok_or_else(|| Error::internal("validation without a validation split"))?;
        validate(v, &self.net, self.s.cache, self.s.cfg, self.s.dev)
    }

    fn save(&self) -> Result<TaskState> {
        let mut state = serde_json::Map::new();
        state.insert("mode".into(), "pairwise".into());
        let mut rng = serde_json::Map::new();
        rng.insert(
            "dropout".into(),
            "tch::manual_seed(seed ^ ((step + 1) << 20)) before each step".into(),
        );
        rng.insert("val_queries".into(), "rng::seeded(seed, 3 * 2^32)".into());
        Ok(TaskState {
            net: task::cpu_copies(&task::sorted_vars(&self.vs)),
            criterion: Vec::new(),
            bank: Vec::new(),
            state,
            rng,
        })
    }

    fn restore(&mut self, ck: &Checkpoint) -> Result<()> {
        task::load_into(&self.vs, &ck.net, "network")
    }

    fn seal(
        &self,
        net: Option<&[(String, Tensor)]>,
        _best: Best,
        mut provenance: serde_json::Value,
    ) -> Result<model::SealedFolder> {
        let mut spec = self.spec.clone();
        if let Some(o) = provenance.as_object_mut() {
            o.insert("trained_by".into(), "simile-train (pairwise)".into());
            o.insert(
                "extractor".into(),
                self.ext_dir.display().to_string().into(),
            );
            o.insert(
                "extractor_validation".into(),
                self.val
                    .as_ref()
                    .map(|v| v.baseline.to_json())
                    .unwrap_or_default(),
            );
        }
        spec.model.provenance = provenance;
        let mut cpu = nn::VarStore::new(Device::Cpu);
        PairwiseNet::new(
            &cpu.root(),
            &spec.model.architecture,
            spec.model.normalise,
            &spec.pairwise,
        )?;
        match net {
            Some(t) => task::load_into(&cpu, t, "best checkpoint")?,
            None => cpu.copy(&self.vs)?,
        }
        pw::seal_folder(&self.s.opts.out, &spec, &cpu)
    }

    fn timings(&self) -> Vec<(&'static str, f64)> {
        vec![("extractor_embeddings", self.embed_seconds)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
