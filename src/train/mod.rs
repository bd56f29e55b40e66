//! The train stage: dataset + config -> a model folder `simile-embed` reads, with
//! checkpoints, logs and validation metrics. See `docs/training.md` and `schemas/train.md`.
//!
//! The data flow, in the order of the submodules:
//! - [`config`]: the TOML config, `--set` overrides, errors naming the key.
//! - [`data`]: the decoded-image cache and the augmented batches (built ahead of the step).
//! - [`optim`]: optimisers and schedules, with their state.
//! - the loop (here): sampler -> batch -> network -> criterion (`loss`, with its miner) ->
//!   gradients -> optimiser; validation every `valid_period` epochs ([`validate`]);
//!   [`checkpoint`]s and the [`log`] tables.
//!
//! Randomness: the weights' initialisation comes from `tch::manual_seed(seed)`; the sampler's
//! batches of epoch e from `rng::seeded(seed, e)`; the miner's draws at step s from
//! `rng::seeded(seed, 2^32 + s)`; each image's augmentation from (seed, step, position). So a
//! checkpoint needs no generator state, and a resumed run draws what the uninterrupted one
//! would have.
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod log;
pub mod loss;
pub mod miner;
pub mod monitor;
pub mod optim;
pub mod pairwise;
pub mod sampler;
pub mod tensorboard;
pub mod validate;

use crate::dataset::{Dataset, Split};
use crate::device::{self, DeviceArg};
use crate::error::{Error, Result};
use crate::train::loss::Criterion;
use crate::manifest::ManifestBuilder;
use crate::metrics::Scores;
use crate::train::miner::MinerState;
use crate::model::{self, Compute, ModelSpec, Net};
use crate::train::sampler::{rng, BatchSampler};
use checkpoint::Checkpoint;
use config::TrainConfig;
use optim::{Optimizer, Param, Schedule};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{nn, Device, Kind, Tensor};

pub use config::TrainConfig as Config;

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
    /// (key, value, epoch) of the best validation.
    pub best: Option<(String, f64, usize)>,
    pub last_scores: Option<Scores>,
    /// Stopped by `stop_after_steps`.
    pub stopped: bool,
    pub resumed_from: Option<usize>,
}

/// The network being trained, and in bf16 mode its low-precision working copy.
struct Nets {
    vs: nn::VarStore,
    net: Net,
    /// bf16 copy: forward and backward run here; the fp32 master weights (above) are updated.
    low: Option<(nn::VarStore, Net)>,
}

impl Nets {
    fn compute_net(&self) -> &Net {
        self.low.as_ref().map(|(_, n)| n).unwrap_or(&self.net)
    }

    fn compute_kind(&self) -> Kind {
        if self.low.is_some() {
            Kind::BFloat16
        } else {
            Kind::Float
        }
    }

    /// Master weights -> working copy (before a step).
    fn sync_down(&self) -> Result<()> {
        let Some((low, _)) = &self.low else {
            return Ok(());
        };
        let master = self.vs.variables();
        tch::no_grad(|| -> Result<()> {
            for (name, mut t) in low.variables() {
                let src = master
                    .get(&name)
                    .ok_or_else(|| Error::internal(format!("no master variable {name}")))?;
                t.f_copy_(src)?;
            }
            Ok(())
        })
    }

    /// Working copy's running statistics (BatchNorm) -> master (after a step).
    fn sync_buffers_up(&self) -> Result<()> {
        let Some((low, _)) = &self.low else {
            return Ok(());
        };
        let master = self.vs.variables();
        tch::no_grad(|| -> Result<()> {
            for (name, t) in low.variables() {
                if !t.requires_grad() {
                    if let Some(m) = master.get(&name) {
                        m.shallow_clone().f_copy_(&t)?;
                    }
                }
            }
            Ok(())
        })
    }
}

fn sorted_vars(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn trainable_sorted(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    sorted_vars(vs)
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect()
}

fn cpu_copies(v: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    v.iter()
        .map(|(n, t)| (n.clone(), t.detach().to_device(Device::Cpu).copy()))
        .collect()
}

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

/// Training rows, labels and their classes.
struct TrainSet {
    rows: Vec<usize>,
    /// Class (0..C-1) of each training row.
    classes: Vec<i64>,
    /// The label of each class, ascending.
    labels: Vec<i64>,
    class_categories: Option<Vec<String>>,
    label2category: Option<BTreeMap<i64, String>>,
}

fn train_set(ds: &Dataset, cfg: &TrainConfig) -> Result<TrainSet> {
    let rows = ds.rows_of_split(Split::Train);
    if rows.is_empty() {
        return Err(Error::input(format!(
            "{}: no train rows (split = 'train'); training needs labelled train rows",
            ds.file.display()
        )));
    }
    let unlabelled: Vec<i64> = rows
        .iter()
        .filter(|&&r| ds.label[r].is_none())
        .map(|&r| ds.ids[r])
        .collect();
    if !unlabelled.is_empty() {
        return Err(Error::input(format!(
            "{}: {} train row(s) have no label (ids {:?}{}); every train row needs one",
            ds.file.display(),
            unlabelled.len(),
            &unlabelled[..unlabelled.len().min(5)],
            if unlabelled.len() > 5 { ", ..." } else { "" }
        )));
    }
    let mut labels: Vec<i64> = rows.iter().map(|&r| ds.label[r].unwrap_or(0)).collect();
    labels.sort_unstable();
    labels.dedup();
    let classes: Vec<i64> = rows
        .iter()
        .map(|&r| labels.binary_search(&ds.label[r].unwrap_or(0)).unwrap_or(0) as i64)
        .collect();
    if labels.len() < 2 {
        return Err(Error::input(format!(
            "{}: the train split has {} label(s); metric learning needs at least 2",
            ds.file.display(),
            labels.len()
        )));
    }
    let needs = cfg.sampler.needs_categories();
    if needs && !ds.has_category() {
        return Err(Error::input(format!(
            "{}: the {} sampler works with categories, but the dataset has no category column values; use the balance sampler or add categories",
            ds.file.display(),
            cfg.sampler.name()
        )));
    }
    let (label2category, class_categories) = if ds.has_category() {
        let mut m: BTreeMap<i64, String> = BTreeMap::new();
        for &r in &rows {
            let l = ds.label[r].unwrap_or(0);
            match (&ds.category[r], m.get(&l)) {
                (None, _) => {
                    if needs {
                        return Err(Error::input(format!(
                            "{}: train row id {} (label {l}) has no category; the {} sampler needs one on every train row",
                            ds.file.display(),
                            ds.ids[r],
                            cfg.sampler.name()
                        )));
                    }
                }
                (Some(c), Some(prev)) if prev != c => {
                    return Err(Error::input(format!(
                        "{}: label {l} has two categories ('{prev}' and '{c}'); a label belongs to one category",
                        ds.file.display()
                    )))
                }
                (Some(c), _) => {
                    m.insert(l, c.clone());
                }
            }
        }
        let cc = if m.len() == labels.len() {
            Some(labels.iter().map(|l| m[l].clone()).collect())
        } else {
            None
        };
        (Some(m), cc)
    } else {
        (None, None)
    };
    Ok(TrainSet {
        rows,
        classes,
        labels,
        class_categories,
        label2category,
    })
}

/// Mutable progress of a run: what a checkpoint restores.
#[derive(Default)]
struct Progress {
    /// Completed epochs.
    epoch: usize,
    /// Batches done in the current epoch.
    batch_in_epoch: usize,
    /// Steps done in total.
    step: usize,
    best: Option<(f64, usize, usize)>,
    train_rows: Vec<log::Row>,
    val_rows: Vec<log::Row>,
}

/// Runs the stage; `on_device` gets the chosen device's description first.
pub fn run(opts: &TrainOptions, on_device: impl FnOnce(&str)) -> Result<TrainSummary> {
    if pairwise::selected(&opts.config, &opts.sets)? {
        return pairwise::run(opts, on_device);
    }
    let t0 = Instant::now();
    let cfg = TrainConfig::load(&opts.config, &opts.sets)?;
    if opts.compute == Compute::Fp16 {
        return Err(Error::input(
            "--compute fp16 is not supported for training; use fp32 or bf16",
        ));
    }
    let ckpt_root = opts.out.join("checkpoints");
    let last_dir = checkpoint::find(&ckpt_root, "last");
    if opts.resume && last_dir.is_none() {
        return Err(Error::input(format!(
            "--resume: {} has no checkpoint (checkpoints/last); start without --resume",
            opts.out.display()
        )));
    }
    let ds = Dataset::read(&opts.dataset)?;
    let ts = train_set(&ds, &cfg)?;
    let row_labels: Vec<i64> = ts.classes.iter().map(|&c| ts.labels[c as usize]).collect();
    let mut sampler = cfg.sampler.build(&row_labels, ts.label2category.as_ref())?;
    if sampler.is_empty() {
        return Err(Error::input(format!(
            "the {} sampler yields no batch per epoch on {} train rows of {} labels",
            cfg.sampler.name(),
            ts.rows.len(),
            ts.labels.len()
        )));
    }
    let validator = validate::Validator::new(&ds)?;
    let dev = device::resolve(opts.device)?;

    // Every image training reads: their bytes are an input (and the image cache's key).
    let mut cache_rows: Vec<usize> = ts.rows.clone();
    if let Some(v) = &validator {
        cache_rows.extend(&v.rows);
    }
    cache_rows.sort_unstable();
    cache_rows.dedup();
    let images_fp = crate::io::Fingerprint::of_files(&data::row_paths(&ds, &cache_rows));
    let mut finish = manifest_plan(
        opts,
        &cfg.to_json(),
        &device::describe(dev),
        serde_json::Map::new(),
        &images_fp,
        cache_rows.len(),
    )?;
    let last_dir = if opts.resume {
        finish.lock(&opts.out.join(model::WEIGHTS))?;
        last_dir
    } else {
        start_over(opts, &mut finish, last_dir.is_some())?;
        None
    };
    on_device(&device::describe(dev));

    // The network (seeded), the loss's parameters, the parameter groups.
    tch::manual_seed(cfg.seed as i64);
    let arch = cfg.model.arch_spec();
    let vs = nn::VarStore::new(dev);
    let net = Net::new(&vs.root(), &arch, cfg.model.normalise)?;
    if let Some(init) = &cfg.model.init {
        load_init(&vs, init, &arch)?;
    }
    let crit_vs = nn::VarStore::new(dev);
    let mut criterion: Box<dyn Criterion> = cfg.loss.build(
        &crit_vs.root(),
        net.dim,
        ts.labels.len() as i64,
        ts.class_categories.as_deref(),
    )?;
    let low = if opts.compute == Compute::Bf16 {
        let mut lvs = nn::VarStore::new(dev);
        let lnet = Net::new(&lvs.root(), &arch, cfg.model.normalise)?;
        lvs.bfloat16();
        Some((lvs, lnet))
    } else {
        None
    };
    let nets = Nets { vs, net, low };
    nets.sync_down()?;
    let master: Vec<(String, Tensor)> = trainable_sorted(&nets.vs);
    let work: Vec<(String, Tensor)> = match &nets.low {
        Some((lvs, _)) => trainable_sorted(lvs),
        None => master.clone_shallow(),
    };
    let mut params: Vec<Param> = master
        .iter()
        .map(|(n, t)| Param {
            name: n.clone(),
            group: if n.starts_with("proj.") { 1 } else { 0 },
            tensor: t.shallow_clone(),
        })
        .collect();
    let mut work_params: Vec<Tensor> = work.iter().map(|(_, t)| t.shallow_clone()).collect();
    for (n, t) in trainable_sorted(&crit_vs) {
        params.push(Param {
            name: format!("criterion.{n}"),
            group: 2,
            tensor: t.shallow_clone(),
        });
        work_params.push(t);
    }
    let mut optimizer = Optimizer::new(&cfg.optimizer, params.len());
    let steps_per_epoch = sampler.len();
    let mut schedule = Schedule::new(&cfg.schedule, steps_per_epoch, cfg.epochs);

    // Images.
    let pre = cfg.model.preprocess();
    let cache_dir = opts
        .cache_dir
        .clone()
        .unwrap_or_else(data::default_cache_dir);
    let tc = Instant::now();
    let cache = data::ImageCache::open(
        &ds,
        &cache_rows,
        &pre,
        cfg.data.cache.then_some(cache_dir.as_path()),
        &images_fp,
    )?;
    let cache_seconds = tc.elapsed().as_secs_f64();
    eprintln!(
        "simile-train: {} images {} ({:.1} s){}",
        cache_rows.len(),
        if cache.built {
            "prepared"
        } else {
            "from the cache"
        },
        cache_seconds,
        cache
            .file
            .as_ref()
            .map(|f| format!(", {}", f.display()))
            .unwrap_or_default()
    );

    std::fs::create_dir_all(&opts.out).map_err(|e| Error::io(&opts.out, e))?;
    let cfg_json = cfg.to_json();
    crate::io::atomic_write_bytes(opts.out.join("config.toml"), cfg.to_toml()?.as_bytes())?;
    let ds_fp = crate::io::Fingerprint::of(&opts.dataset)?;

    // Resume.
    let mut prog = Progress::default();
    let mut resumed_from = None;
    if let Some(dir) = &last_dir {
        let ck = checkpoint::load(dir)?;
        let st = &ck.state;
        let mut saved_cfg = st.get("config").cloned().unwrap_or_default();
        let mut now_cfg = cfg_json.clone();
        for c in [&mut saved_cfg, &mut now_cfg] {
            if let Some(o) = c.as_object_mut() {
                o.remove("epochs");
            }
        }
        if saved_cfg != now_cfg {
            return Err(Error::input(format!(
                "--resume: {} was written with another config (only `epochs` may change); differing keys: {}",
                dir.display(),
                diff_keys(&saved_cfg, &now_cfg, "").join(", ")
            )));
        }
        let compute = st.get("compute").and_then(|v| v.as_str()).unwrap_or("fp32");
        if compute != opts.compute.to_string() {
            eprintln!(
                "warning: the checkpoint was trained with --compute {compute}, this run uses {}",
                opts.compute
            );
        }
        load_into(&nets.vs, &ck.net, "network")?;
        load_into(&crit_vs, &ck.criterion, "loss parameters")?;
        nets.sync_down()?;
        let steps: Vec<(String, u64)> =
            serde_json::from_value(st.pointer("/optimizer/steps").cloned().unwrap_or_default())
                .map_err(|e| Error::input(format!("{}: optimizer steps: {e}", dir.display())))?;
        optimizer.load_state(&params, &ck.optimizer, &steps)?;
        schedule = serde_json::from_value(st.get("schedule").cloned().unwrap_or_default())
            .map_err(|e| Error::input(format!("{}: schedule: {e}", dir.display())))?;
        sampler.load_state(st.get("sampler").unwrap_or(&serde_json::Value::Null))?;
        criterion.load_state(MinerState {
            meta: st.get("criterion").cloned().unwrap_or_default(),
            tensors: ck
                .bank
                .iter()
                .map(|(n, t)| (n.clone(), t.to_device(dev)))
                .collect(),
        })?;
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
        let tl = opts.out.join("train_log.parquet");
        if tl.exists() {
            prog.train_rows = log::read(&tl, &["epoch", "step"])?
                .into_iter()
                .filter(|r| r.int("step").unwrap_or(0) as usize <= prog.step)
                .collect();
        }
        let vm = opts.out.join("val_metrics.parquet");
        if vm.exists() {
            prog.val_rows = log::read(&vm, &["epoch", "step"])?
                .into_iter()
                .filter(|r| r.int("step").unwrap_or(0) as usize <= prog.step)
                .collect();
        }
        resumed_from = Some(prog.step);
        eprintln!(
            "simile-train: resuming from {} (epoch {}, step {})",
            dir.display(),
            prog.epoch,
            prog.step
        );
    }

    let ctx = Ctx {
        cfg: &cfg,
        cfg_json: &cfg_json,
        opts,
        ds: &ds,
        ds_fp: &ds_fp,
        ts: &ts,
        pre: &pre,
        dev,
        ckpt_root: &ckpt_root,
    };

    let total_steps = cfg.epochs * steps_per_epoch;
    let mut mon = monitor::Monitor::new(
        opts.log_every,
        opts.tensorboard.as_deref(),
        cfg.epochs,
        total_steps,
        prog.step,
    )?;

    // Validation before training, if asked (the learning curve's first point).
    if cfg.valid_at_start && prog.step == 0 && prog.val_rows.is_empty() {
        if let Some(v) = &validator {
            let s = validate_and_record(
                &ctx,
                v,
                &cache,
                &mut prog,
                &nets,
                &crit_vs,
                &optimizer,
                &params,
                &schedule,
                &*sampler,
                &*criterion,
            )?;
            let line = format!(
                "simile-train: before training: {}",
                short_scores(&s, &cfg.metric_for_checkpointing)
            );
            mon.validation(prog.val_rows.last(), &line)?;
        }
    }

    let mut images: u64 = 0;
    let mut train_seconds = 0.0;
    let mut last_scores = None;
    let mut stopped = false;

    'epochs: while prog.epoch < cfg.epochs {
        let epoch = prog.epoch;
        let batches = sampler.epoch(&mut rng::seeded(cfg.seed, epoch as u64));
        let frozen = epoch < cfg.freeze_n_epochs;
        for (p, w) in params.iter().zip(&work_params) {
            let train = !(frozen && p.group == 0);
            let _ = w.set_requires_grad(train);
        }
        let skip = prog.batch_in_epoch;
        let todo: Vec<Vec<usize>> = batches[skip.min(batches.len())..]
            .iter()
            .map(|b| b.iter().map(|&i| ts.rows[i]).collect())
            .collect();
        let first_step = prog.step;
        let aug = (!cfg.augment.is_off()).then_some(&cfg.augment);
        let result: Result<bool> = std::thread::scope(|scope| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<f32>>(cfg.data.prefetch);
            let cache = &cache;
            let pre = &pre;
            let todo_ref = &todo;
            scope.spawn(move || {
                for (i, rows) in todo_ref.iter().enumerate() {
                    let buf =
                        data::batch(cache, rows, pre, aug.map(|a| (a, cfg.seed, first_step + i)));
                    if tx.send(buf).is_err() {
                        return;
                    }
                }
            });
            for (i, rows) in todo.iter().enumerate() {
                let ts0 = Instant::now();
                let buf = rx
                    .recv()
                    .map_err(|_| Error::internal("the batch thread stopped"))?;
                let prof = std::env::var_os("SIMILE_TRAIN_PROFILE").is_some();
                let tp = Instant::now();
                let mut marks: Vec<(&str, f64)> = Vec::new();
                let mut mark = |n: &'static str| {
                    if prof {
                        marks.push((n, tp.elapsed().as_secs_f64()));
                    }
                };
                mark("recv");
                let step = prog.step;
                let factor = schedule.factor(step, epoch);
                let base = cfg.optimizer.group_lrs();
                let lrs = [base[0] * factor, base[1] * factor, base[2] * factor];
                let labels: Vec<i64> = batches[skip + i].iter().map(|&p| ts.classes[p]).collect();
                let s = pre.size as i64;
                let x = Tensor::f_from_slice(&buf)?
                    .f_view([rows.len() as i64, 3, s, s])?
                    .f_to_device(dev)?
                    .f_to_kind(nets.compute_kind())?;
                nets.sync_down()?;
                let emb = nets
                    .compute_net()
                    .forward_t(&x, true)
                    .f_to_kind(Kind::Float)?;
                mark("forward");
                let mut mrng = rng::seeded(cfg.seed, (1u64 << 32) + step as u64);
                let out = criterion.forward(&emb, &labels, &mut mrng)?;
                let loss_t = if out.loss.dim() == 0 {
                    out.loss
                } else {
                    out.loss.f_mean(Kind::Float)?
                };
                let loss = loss_t.f_double_value(&[])?;
                mark("loss");
                if !loss.is_finite() {
                    let kept = checkpoint::find(ctx.ckpt_root, "last")
                        .map(|d| format!("the last good checkpoint, {}, is kept (resume from it with a lower learning rate: --resume --set optimizer.lr=...)", d.display()))
                        .unwrap_or_else(|| "no checkpoint had been written yet".into());
                    // Keep the log up to here for the diagnosis.
                    let mut row = step_row(epoch, step + 1, loss, &lrs, &out.logs, 0.0);
                    row.values.push(("nonfinite".into(), Some(1.0)));
                    prog.train_rows.push(row);
                    write_logs(&ctx, &prog)?;
                    return Err(Error::input(format!(
                        "training stopped: the loss became {loss} at epoch {epoch}, step {} (learning rate {:.3e}); {kept}",
                        step + 1,
                        lrs[0]
                    )));
                }
                loss_t.f_backward()?;
                mark("backward");
                let mut grads: Vec<Option<Tensor>> = work_params
                    .iter()
                    .map(|w| {
                        let g = w.grad();
                        (w.requires_grad() && g.defined()).then(|| {
                            if nets.low.is_some() {
                                g.to_kind(Kind::Float)
                            } else {
                                g
                            }
                        })
                    })
                    .collect();
                let gnorm = optim::clip(&mut grads, cfg.grad_clip_norm, cfg.grad_clip_value)?;
                optimizer.step(&params, &grads, &lrs)?;
                drop(grads);
                for w in &work_params {
                    let mut g = w.grad();
                    if g.defined() {
                        let _ = g.f_zero_()?;
                    }
                }
                nets.sync_buffers_up()?;
                mark("optim");
                if prof {
                    eprintln!("step {step}: {marks:?}");
                }
                prog.step += 1;
                prog.batch_in_epoch += 1;
                let dt = ts0.elapsed().as_secs_f64();
                train_seconds += dt;
                images += rows.len() as u64;
                let ips = rows.len() as f64 / dt.max(1e-9);
                let mut row = step_row(epoch, prog.step, loss, &lrs, &out.logs, ips);
                row.values.push(("grad_norm".into(), Some(gnorm)));
                mon.step(&row, rows.len(), dt)?;
                prog.train_rows.push(row);
                let stop_now = opts.stop_after_steps == Some(prog.step);
                let every = cfg.checkpoint_every_steps;
                let mid = prog.batch_in_epoch < batches.len();
                if mid && (stop_now || (every > 0 && prog.step % every == 0)) {
                    save_ckpt(
                        &ctx,
                        "last",
                        &prog,
                        &nets,
                        &crit_vs,
                        &optimizer,
                        &params,
                        &schedule,
                        &*sampler,
                        &*criterion,
                    )?;
                    write_logs(&ctx, &prog)?;
                }
                if stop_now && mid {
                    return Ok(true);
                }
            }
            Ok(false)
        });
        if result? {
            stopped = true;
            break 'epochs;
        }
        // End of the epoch.
        prog.epoch += 1;
        prog.batch_in_epoch = 0;
        let last = prog.epoch == cfg.epochs;
        let validate_now = validator.is_some()
            && ((cfg.valid_period > 0 && prog.epoch % cfg.valid_period == 0) || last);
        if validate_now {
            let v = validator.as_ref().expect("checked");
            mon.status(format!("e{}/{} validating", prog.epoch, cfg.epochs));
            let s = validate_and_record(
                &ctx,
                v,
                &cache,
                &mut prog,
                &nets,
                &crit_vs,
                &optimizer,
                &params,
                &schedule,
                &*sampler,
                &*criterion,
            )?;
            let monitor = schedule
                .monitor(&cfg.metric_for_checkpointing)
                .map(str::to_string);
            if let Some(key) = monitor {
                let value = s.get(&key).flatten();
                schedule.observe(value, cfg.mode_for_checkpointing);
            }
            let line = format!(
                "simile-train: epoch {}/{} step {}: {}",
                prog.epoch,
                cfg.epochs,
                prog.step,
                short_scores(&s, &cfg.metric_for_checkpointing)
            );
            mon.validation(prog.val_rows.last(), &line)?;
            last_scores = Some(s);
        }
        save_ckpt(
            &ctx,
            "last",
            &prog,
            &nets,
            &crit_vs,
            &optimizer,
            &params,
            &schedule,
            &*sampler,
            &*criterion,
        )?;
        write_logs(&ctx, &prog)?;
        if opts.stop_after_steps.is_some_and(|s| s == prog.step) && !last {
            stopped = true;
            break;
        }
    }
    mon.finish();

    if !stopped {
        write_logs(&ctx, &prog)?;
        let mut m = finish;
        m.rows("train_rows", ts.rows.len() as u64)
            .rows("classes", ts.labels.len() as u64)
            .rows("steps", prog.step as u64)
            .rows("epochs", prog.epoch as u64);
        m.timing("image_cache", cache_seconds)
            .timing("train", train_seconds)
            .timing("total", t0.elapsed().as_secs_f64());
        // The model folder appears only now, with its manifest: the best validated weights
        // (kept in checkpoints/best while training), or the last ones without validation.
        let best_net = match prog.best {
            Some(_) => checkpoint::find(&ckpt_root, "best")
                .map(|d| checkpoint::load(&d))
                .transpose()?
                .map(|c| c.net),
            None => None,
        };
        let folder = seal_model(&ctx, &nets.vs, best_net.as_deref(), prog.best)?;
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

/// A finished run's manifest parameters and inputs (`extra`: further parameters, e.g. the
/// pairwise mode), known before training so a finished run is recognised.
pub(crate) fn manifest_plan(
    opts: &TrainOptions,
    cfg_json: &serde_json::Value,
    device: &str,
    extra: serde_json::Map<String, serde_json::Value>,
    images: &crate::io::Fingerprint,
    n_images: usize,
) -> Result<ManifestBuilder> {
    let mut params = serde_json::json!({
        "config": cfg_json,
        "sets": opts.sets,
        "device": device,
        "compute": opts.compute.to_string(),
    });
    if let Some(o) = params.as_object_mut() {
        o.extend(extra);
    }
    let mut m = ManifestBuilder::new("train", params);
    m.input("dataset", &opts.dataset)?;
    m.input("config", &opts.config)?;
    m.input_record(
        "images",
        crate::manifest::InputRecord {
            path: format!("{n_images} images of the dataset's train and validation rows"),
            fingerprint: images.clone(),
            companions: Default::default(),
        },
    );
    m.companion(&opts.out.join(model::MODEL_JSON));
    for f in COMPANIONS {
        m.companion(&opts.out.join(f));
    }
    Ok(m)
}

/// The files of a finished run's folder that its manifest records beside `model.json`.
pub(crate) const COMPANIONS: [&str; 3] =
    ["config.toml", "train_log.parquet", "val_metrics.parquet"];

/// A run without `--resume`: a finished run with the same config, dataset and version is done
/// (`Error::UpToDate`, unless `--force`); an unfinished one (checkpoints, no finished manifest)
/// is refused, as it may be wanted with `--resume`, unless `--force`; a finished run made from
/// other inputs or parameters, like any stale output, is replaced: training starts over.
pub(crate) fn start_over(
    opts: &TrainOptions,
    m: &mut ManifestBuilder,
    has_last: bool,
) -> Result<()> {
    let weights = opts.out.join(model::WEIGHTS);
    m.skip_if_done(&weights)?;
    let manifest = crate::manifest::manifest_path(&weights);
    if has_last && !opts.force && !manifest.is_file() {
        return Err(Error::input(format!(
            "{} holds an unfinished training run (checkpoints/last); continue it with --resume, start it over with --force, or choose another --out",
            opts.out.display()
        )));
    }
    if has_last || manifest.is_file() {
        let why = m.stale(&weights)?.unwrap_or_else(|| "--force".into());
        eprintln!(
            "simile-train: {} is out of date ({why}): training it again from scratch",
            opts.out.display()
        );
        // The old run's manifest goes first, then its model: from here on the folder is an
        // unfinished run, which no reader takes for a model.
        for f in [manifest, opts.out.join(model::MODEL_JSON), weights] {
            if f.is_file() {
                std::fs::remove_file(&f).map_err(|e| Error::io(&f, e))?;
            }
        }
        let ckpt = opts.out.join("checkpoints");
        if ckpt.exists() {
            std::fs::remove_dir_all(&ckpt).map_err(|e| Error::io(&ckpt, e))?;
        }
    }
    Ok(())
}

trait CloneShallow {
    fn clone_shallow(&self) -> Self;
}

impl CloneShallow for Vec<(String, Tensor)> {
    fn clone_shallow(&self) -> Self {
        self.iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect()
    }
}

/// Everything the helpers below need that does not change during a run.
struct Ctx<'a> {
    cfg: &'a TrainConfig,
    cfg_json: &'a serde_json::Value,
    opts: &'a TrainOptions,
    ds: &'a Dataset,
    ds_fp: &'a crate::io::Fingerprint,
    ts: &'a TrainSet,
    pre: &'a crate::image::Preprocess,
    dev: Device,
    ckpt_root: &'a Path,
}

fn step_row(
    epoch: usize,
    step: usize,
    loss: f64,
    lrs: &[f64; 3],
    logs: &crate::train::loss::Logs,
    ips: f64,
) -> log::Row {
    let mut values = vec![
        ("loss".to_string(), Some(loss)),
        ("lr".to_string(), Some(lrs[0])),
        ("lr_head".to_string(), Some(lrs[1])),
        ("lr_loss".to_string(), Some(lrs[2])),
        ("images_per_s".to_string(), Some(ips)),
    ];
    for (k, v) in logs {
        values.push((k.clone(), v.is_finite().then_some(*v)));
    }
    log::Row {
        ints: vec![("epoch".into(), epoch as i64), ("step".into(), step as i64)],
        values,
    }
}

fn short_scores(s: &Scores, key: &str) -> String {
    let mut parts: Vec<String> = s
        .entries
        .iter()
        .filter(|(k, _)| k.starts_with("OVERALL/") && !k.contains("n_queries"))
        .map(|(k, v)| {
            format!(
                "{}={}",
                k.trim_start_matches("OVERALL/"),
                v.map(|x| format!("{x:.4}")).unwrap_or_else(|| "-".into())
            )
        })
        .collect();
    if !key.starts_with("OVERALL/") {
        if let Some(v) = s.get(key) {
            parts.push(format!(
                "{key}={}",
                v.map(|x| format!("{x:.4}")).unwrap_or_default()
            ));
        }
    }
    parts.join(" ")
}

/// Validates the master weights (fp32, the weights the model folder gets) and records the
/// result.
#[allow(clippy::too_many_arguments)]
fn validate_and_record(
    ctx: &Ctx,
    v: &validate::Validator,
    cache: &data::ImageCache,
    prog: &mut Progress,
    nets: &Nets,
    crit_vs: &nn::VarStore,
    optimizer: &Optimizer,
    params: &[Param],
    schedule: &Schedule,
    sampler: &dyn BatchSampler,
    criterion: &dyn Criterion,
) -> Result<Scores> {
    let s = v.run(
        &nets.net,
        cache,
        ctx.pre,
        ctx.dev,
        Kind::Float,
        ctx.cfg.batch_size_val,
        &ctx.opts.out,
    )?;
    record_validation(
        ctx, prog, &s, nets, crit_vs, optimizer, params, schedule, sampler, criterion,
    )?;
    Ok(s)
}

#[allow(clippy::too_many_arguments)]
fn record_validation(
    ctx: &Ctx,
    prog: &mut Progress,
    s: &Scores,
    nets: &Nets,
    crit_vs: &nn::VarStore,
    optimizer: &Optimizer,
    params: &[Param],
    schedule: &Schedule,
    sampler: &dyn BatchSampler,
    criterion: &dyn Criterion,
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
        save_ckpt(
            ctx, "best", prog, nets, crit_vs, optimizer, params, schedule, sampler, criterion,
        )?;
    }
    write_logs(ctx, prog)
}

#[allow(clippy::too_many_arguments)]
fn save_ckpt(
    ctx: &Ctx,
    name: &str,
    prog: &Progress,
    nets: &Nets,
    crit_vs: &nn::VarStore,
    optimizer: &Optimizer,
    params: &[Param],
    schedule: &Schedule,
    sampler: &dyn BatchSampler,
    criterion: &dyn Criterion,
) -> Result<()> {
    let (opt_tensors, opt_steps) = optimizer.state(params);
    let bank = criterion.state()?;
    let state = serde_json::json!({
        "simile_checkpoint": 1,
        "epoch": prog.epoch,
        "batch_in_epoch": prog.batch_in_epoch,
        "step": prog.step,
        "best": prog.best.map(|(v, e, s)| serde_json::json!({
            "key": ctx.cfg.metric_for_checkpointing, "value": v, "epoch": e, "step": s})),
        "optimizer": { "name": optimizer_name(ctx.cfg), "steps": opt_steps },
        "schedule": schedule,
        "sampler": sampler.state(),
        "rng": {
            "seed": ctx.cfg.seed,
            "weights_init": "tch::manual_seed(seed)",
            "sampler": "rng::seeded(seed, epoch)",
            "miner": "rng::seeded(seed, 2^32 + step)",
            "augment": "data::image_rng(seed, step, position)",
        },
        "criterion": bank.meta,
        "compute": ctx.opts.compute.to_string(),
        "dataset": { "path": ctx.opts.dataset.display().to_string(), "fingerprint": ctx.ds_fp },
        "train_log_rows": prog.train_rows.len(),
        "val_rows": prog.val_rows.len(),
        "config": ctx.cfg_json,
    });
    let ck = Checkpoint {
        state,
        net: cpu_copies(&sorted_vars(&nets.vs)),
        criterion: cpu_copies(&sorted_vars(crit_vs)),
        optimizer: opt_tensors,
        bank: cpu_copies(&bank.tensors),
    };
    checkpoint::save(ctx.ckpt_root, name, &ck)
}

fn optimizer_name(cfg: &TrainConfig) -> &'static str {
    match cfg.optimizer {
        config::OptimizerConfig::Adam { .. } => "adam",
        config::OptimizerConfig::Adamw { .. } => "adamw",
        config::OptimizerConfig::Sgd { .. } => "sgd",
    }
}

/// The model folder's files (`model.safetensors` + `model.json`), sealed: from `net` (the best
/// checkpoint's tensors) when given, else from the master weights.
fn seal_model(
    ctx: &Ctx,
    vs: &nn::VarStore,
    net: Option<&[(String, Tensor)]>,
    best: Option<(f64, usize, usize)>,
) -> Result<model::SealedFolder> {
    let mut spec = ModelSpec::new(
        ctx.cfg.model.arch_spec(),
        ctx.cfg.model.normalise,
        ctx.pre.clone(),
    )?;
    let label_names = ctx.ds.meta.label_names.as_ref().map(|names| {
        ctx.ts
            .labels
            .iter()
            .map(|&l| names.get(l as usize).cloned().unwrap_or_default())
            .collect::<Vec<_>>()
    });
    spec.provenance = serde_json::json!({
        "trained_by": "simile-train",
        "simile_version": crate::manifest::VERSION,
        "commit": crate::manifest::COMMIT,
        "dataset": { "path": ctx.opts.dataset.display().to_string(), "fingerprint": ctx.ds_fp },
        "config": ctx.cfg_json,
        "sets": ctx.opts.sets,
        "compute": ctx.opts.compute.to_string(),
        "device": device::describe(ctx.dev),
        "label_map": {
            "classes": ctx.ts.labels.len(),
            "labels": ctx.ts.labels,
            "label_names": label_names,
            "categories": ctx.ts.class_categories,
        },
        "weights": match best {
            Some((v, e, s)) => serde_json::json!({
                "chosen_by": ctx.cfg.metric_for_checkpointing, "value": v, "epoch": e, "step": s}),
            None => serde_json::json!({"chosen_by": "last (no validation split)"}),
        },
    });
    let mut cpu = nn::VarStore::new(Device::Cpu);
    Net::new(&cpu.root(), &spec.architecture, spec.normalise)?;
    match net {
        Some(t) => load_into(&cpu, t, "best checkpoint")?,
        None => cpu.copy(vs)?,
    }
    model::seal_folder(&ctx.opts.out, &spec, &spec.weights, &cpu)
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

/// Loads starting weights from a model folder or zoo key (missing entries keep their
/// initialisation and are listed).
fn load_init(vs: &nn::VarStore, init: &str, arch: &crate::model::ArchSpec) -> Result<()> {
    let p = Path::new(init);
    let dir = if p.is_dir() {
        p.to_path_buf()
    } else if model::zoo::is_key(init) {
        model::zoo::ensure(init)?
    } else {
        return Err(Error::input(format!(
            "config key 'model.init': '{init}' is neither a model folder nor a zoo key ({})",
            model::zoo::KEYS.join(", ")
        )));
    };
    let spec = ModelSpec::read(&dir)?;
    if spec.architecture.name != arch.name || spec.is_torchscript() {
        return Err(Error::input(format!(
            "config key 'model.init': {} holds a {} model, but model.arch is {}",
            dir.display(),
            spec.architecture.name,
            arch.name
        )));
    }
    let tensors = Tensor::read_safetensors(dir.join(&spec.weights))?;
    let vars = vs.variables();
    let mut missing = Vec::new();
    tch::no_grad(|| -> Result<()> {
        for (name, var) in &vars {
            match tensors.iter().find(|(n, _)| n == name) {
                Some((_, t)) if t.size() == var.size() => {
                    var.shallow_clone().f_copy_(t)?;
                }
                _ => missing.push(name.clone()),
            }
        }
        Ok(())
    })?;
    if !missing.is_empty() {
        missing.sort();
        eprintln!(
            "simile-train: {} variable(s) not in {} keep their random initialisation: {}",
            missing.len(),
            dir.display(),
            missing.join(", ")
        );
    }
    Ok(())
}

/// Dotted keys where two JSON values differ.
fn diff_keys(a: &serde_json::Value, b: &serde_json::Value, prefix: &str) -> Vec<String> {
    use serde_json::Value as J;
    match (a, b) {
        (J::Object(x), J::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter()
                .flat_map(|k| {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    diff_keys(
                        x.get(k).unwrap_or(&J::Null),
                        y.get(k).unwrap_or(&J::Null),
                        &p,
                    )
                })
                .collect()
        }
        _ if a == b => Vec::new(),
        _ => vec![prefix.to_string()],
    }
}
