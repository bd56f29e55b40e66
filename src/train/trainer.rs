//! The training loop, once for every kind of training: resume, the epoch loop, the NaN stop,
//! clip/step/zero, checkpoints, keep-best, the logs, the manifest and the summary. What differs
//! between an extractor and a pairwise re-ranker (the network, the loss, validation and the
//! model folder) sits behind [`Task`] (`task.rs`; `extractor.rs`, `pairwise.rs`).
use super::checkpoint::{self, Checkpoint};
use super::config::TrainConfig;
use super::data::{self, HostBatch, ImageCache, Source};
use super::distributed::Dist;
use super::log::{self, TRAIN_LOG, VAL_METRICS};
use super::loss::Logs;
use super::monitor::Monitor;
use super::optim::{self, LossScaler, Optimizer, Schedule};
use super::sampler::{rng, BatchSampler};
use super::task::{self, Best, Plan, Setup, Task, TrainSet};
use super::{extractor, pairwise, utilisation, TrainOptions, TrainSummary};
use crate::dataset::{Dataset, Split};
use crate::device;
use crate::error::{Error, Result};
use crate::io::Fingerprint;
use crate::manifest::ManifestBuilder;
use crate::metrics::Scores;
use crate::model::{self, Compute};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Mutable progress of a run: what a checkpoint restores.
#[derive(Default)]
struct Progress {
    /// Completed epochs.
    epoch: usize,
    /// Batches done in the current epoch.
    batch_in_epoch: usize,
    /// Steps done in total.
    step: usize,
    best: Best,
    train_rows: Vec<log::Row>,
    val_rows: Vec<log::Row>,
    /// fp16 training's loss scale.
    scaler: Option<LossScaler>,
}

/// Runs the stage; `on_device` gets the chosen device's description first.
pub fn run(opts: &TrainOptions, on_device: impl FnOnce(&str)) -> Result<TrainSummary> {
    let t0 = Instant::now();
    // A rank of a data-parallel job joins the others first (bounded by the job's timeout), on
    // its own GPU (cuda:LOCAL_RANK) where it trains on CUDA.
    let job = opts.launch.as_ref().filter(|l| l.joins_job());
    let dev = device::resolve_for_rank(opts.device, job.map(|l| l.local_rank))?;
    let dist = match job {
        Some(l) => Some(Dist::connect(l, dev)?),
        None => None,
    };
    let dist = dist.as_ref();
    let main = dist.is_none_or(|d| d.is_main());
    let cfg = TrainConfig::load(&opts.config, &opts.sets)?;
    let is_pairwise = cfg.pairwise.is_some();
    if let Some(f) = opts.out.ancestors().find(|a| a.is_file()) {
        return Err(Error::input(format!(
            "--out {}: {} is a file; simile-train writes a model folder there",
            opts.out.display(),
            f.display()
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
    let ds = Dataset::read(&opts.dataset)?;
    let texts = ds.modality() == crate::dataset::Modality::Text;
    if texts != cfg.model.is_text() {
        return Err(Error::input(if texts {
            format!(
                "{}: a text dataset, but the config's model.arch is {}, an image network: fine-tune a text encoder with arch = \"bert\" and model.init = \"minilm-l6-v2\" (or a folder from `simile-embed import --hf`)",
                opts.dataset.display(),
                cfg.model.arch
            )
        } else {
            format!(
                "{}: an image dataset, but the config's model.arch is bert, a text encoder: use an image architecture (resnet18, vits16, ...)",
                opts.dataset.display()
            )
        }));
    }
    let ds_fp = Fingerprint::of(&opts.dataset)?;
    let ts = train_set(&ds, &cfg)?;
    let mut sampler = cfg
        .sampler
        .build(&ts.row_labels(), ts.label2category.as_ref())?;
    if sampler.is_empty() {
        return Err(Error::input(format!(
            "the {} sampler yields no batch per epoch on {} train rows of {} labels",
            cfg.sampler.name(),
            ts.rows.len(),
            ts.labels.len()
        )));
    }
    if let Some(d) = dist {
        d.agree(&[
            (
                "simile versions",
                format!("{} {}", crate::manifest::VERSION, crate::manifest::COMMIT),
            ),
            ("world sizes", d.world_size.to_string()),
            ("configs (--config and --set)", cfg.to_json().to_string()),
            ("datasets", format!("{} ({} bytes)", ds_fp.hash, ds_fp.size)),
            ("--compute", opts.compute.to_string()),
            ("--resume", opts.resume.to_string()),
        ])?;
        let bs = sampler.batch_size();
        if !is_pairwise && bs % d.world_size != 0 {
            return Err(Error::input(format!(
                "the {} sampler's batch of {bs} does not split over {} ranks: make the batch a multiple of the world size",
                cfg.sampler.name(),
                d.world_size
            )));
        }
    }
    opts.compute.check_device(dev)?;
    if let Some(w) = opts.compute.slow_on(dev).filter(|_| main) {
        eprintln!("simile-train: {w}");
    }
    // What the task reads besides the dataset, known before anything is built, so that a
    // finished run is recognised at once.
    let plan: Box<dyn Plan> = if is_pairwise {
        Box::new(pairwise::plan(&cfg, &ds, dev)?)
    } else {
        Box::new(extractor::plan(&ds, &cfg)?)
    };
    let tokenizer = plan.tokenizer();

    // Every image training reads (train and validation rows): their bytes are an input, and
    // the image cache's key. A text dataset has no images: its texts are in the dataset.
    let mut cache_rows: Vec<usize> = Vec::new();
    if !texts {
        cache_rows.extend(&ts.rows);
        cache_rows.extend(plan.validation_rows());
    }
    cache_rows.sort_unstable();
    cache_rows.dedup();
    let images_fp = Fingerprint::of_files(&data::row_paths(&ds, &cache_rows));
    let cfg_json = cfg.to_json();
    let mut finish = manifest_plan(
        opts,
        &cfg,
        &cfg_json,
        &device::describe(dev),
        &images_fp,
        &cache_rows,
    )?;
    plan.manifest(&mut finish, &opts.out)?;
    // Only rank 0 touches the output; the others follow its word (train, up to date, refused).
    let prepared = if !main {
        Ok(())
    } else if opts.resume {
        finish.lock(&opts.out.join(model::WEIGHTS))
    } else {
        start_over(opts, &mut finish, last_dir.is_some())
    };
    if let Some(d) = dist {
        follow_main(d, "start", &prepared)?;
    }
    prepared?;
    let last_dir = if opts.resume { last_dir } else { None };
    on_device(&device::describe(dev));

    // Images.
    let pre = cfg.model.preprocess();
    let cache_dir = opts
        .cache_dir
        .clone()
        .unwrap_or_else(data::default_cache_dir);
    let tc = Instant::now();
    // Rank 0 prepares the image cache; the others then read it (one machine) or prepare their
    // own (another machine's cache folder).
    let open_cache = || {
        ImageCache::open(
            &ds,
            &cache_rows,
            &pre,
            (cfg.data.cache && !texts).then_some(cache_dir.as_path()),
            &images_fp,
        )
    };
    let cache = if main {
        open_cache()
    } else {
        Err(Error::internal("not yet"))
    };
    if let Some(d) = dist {
        follow_main(
            d,
            "images",
            &cache.as_ref().map(|_| ()).map_err(clone_error),
        )?;
    }
    let cache = if main { cache? } else { open_cache()? };
    let cache_seconds = tc.elapsed().as_secs_f64();
    if main && !texts {
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
    }
    if main {
        std::fs::create_dir_all(&opts.out).map_err(|e| Error::io(&opts.out, e))?;
        crate::io::atomic_write_bytes(opts.out.join("config.toml"), cfg.to_toml()?.as_bytes())?;
    }

    // The task: its network (seeded), loss and validation.
    tch::manual_seed(cfg.seed as i64);
    let setup = Setup {
        cfg: &cfg,
        opts,
        ds: &ds,
        ds_fp: &ds_fp,
        ts: &ts,
        dev,
        cache: &cache,
        cache_rows: &cache_rows,
        images_fp: &images_fp,
        cache_dir: &cache_dir,
        tokenizer: tokenizer.as_deref(),
    };
    let mut task = plan.build(&setup)?;
    let mut optimizer = Optimizer::new(&cfg.optimizer, task.params().len());
    // Utilisation: the network's FLOPs, and (rank 0, which reports it) the device's peak.
    let flops_per_image = task.flops_per_image()?;
    if let Some(f) = flops_per_image.filter(|_| main) {
        eprintln!(
            "simile-train: {} at {} px: {:.3} GFLOP per image (forward + backward)",
            cfg.model.arch,
            pre.size,
            f / 1e9
        );
    }
    let peak = match flops_per_image {
        Some(_) if main => match utilisation::peak(dev, opts.compute) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("simile-train: warning: no peak measurement, so no utilisation: {e}");
                None
            }
        },
        _ => None,
    };
    let steps_per_epoch = sampler.len();
    let mut schedule = Schedule::new(&cfg.schedule, steps_per_epoch, cfg.epochs);
    let ctx = Ctx {
        cfg: &cfg,
        cfg_json: &cfg_json,
        opts,
        ds_fp: &ds_fp,
        ckpt_root: &ckpt_root,
        train_rows: &ts.rows,
        dev,
        dist,
        flops_per_image,
    };

    // Resume.
    let mut prog = Progress {
        scaler: (opts.compute == Compute::Fp16).then(LossScaler::default),
        ..Progress::default()
    };
    let mut resumed_from = None;
    if let Some(dir) = &last_dir {
        let ck = checkpoint::load(dir)?;
        let st = &ck.state;
        let saved_cfg = st.get("config").unwrap_or(&serde_json::Value::Null);
        let saved = strip_resumable(saved_cfg);
        let now = strip_resumable(&cfg_json);
        if saved != now {
            return Err(Error::input(format!(
                "--resume: {} was written with another config (only {} may change); differing keys: {}",
                dir.display(),
                RESUMABLE_KEYS.join(", "),
                diff_keys(&saved, &now, "").join(", ")
            )));
        }
        // Changed learning rates (after a diverging loss): said here, recorded in the
        // manifest; the log's lr columns show them from this step on.
        if let Some(saved_fp) = st.pointer("/dataset/fingerprint") {
            let same = serde_json::from_value::<Fingerprint>(saved_fp.clone())
                .is_ok_and(|f| f.same_content(&ds_fp));
            if !same {
                return Err(Error::input(format!(
                    "--resume: {} was written while training on {} ({} bytes); --dataset {} is another file ({} bytes, other contents). Resume with the dataset the run started with, or start over with --force",
                    dir.display(),
                    st.pointer("/dataset/path").and_then(|v| v.as_str()).unwrap_or("another dataset"),
                    saved_fp.get("size").and_then(|v| v.as_u64()).unwrap_or(0),
                    opts.dataset.display(),
                    ds_fp.size
                )));
            }
        }
        let at_step = st.get("step").and_then(|v| v.as_u64()).unwrap_or(0);
        let mut changes = serde_json::Map::new();
        for k in diff_keys(saved_cfg, &cfg_json, "") {
            let at = |v: &serde_json::Value| {
                v.pointer(&format!("/{}", k.replace('.', "/")))
                    .cloned()
                    .unwrap_or_default()
            };
            let (from, to) = (at(saved_cfg), at(&cfg_json));
            eprintln!("simile-train: resuming at step {at_step} with {k} = {to} (was {from})");
            changes.insert(
                k,
                serde_json::json!({"from": from, "to": to, "at_step": at_step}),
            );
        }
        if !changes.is_empty() {
            finish.note("resume_changes", changes.into());
        }
        let compute = st.get("compute").and_then(|v| v.as_str()).unwrap_or("fp32");
        if compute != opts.compute.to_string() {
            eprintln!(
                "warning: the checkpoint was trained with --compute {compute}, this run uses {}",
                opts.compute
            );
        }
        if prog.scaler.is_some() {
            if let Some(v) = st.get("loss_scaler").filter(|v| !v.is_null()) {
                prog.scaler =
                    Some(serde_json::from_value(v.clone()).map_err(|e| {
                        Error::input(format!("{}: loss_scaler: {e}", dir.display()))
                    })?);
            }
        }
        task.restore(&ck)?;
        let steps: Vec<(String, u64)> =
            serde_json::from_value(st.pointer("/optimizer/steps").cloned().unwrap_or_default())
                .map_err(|e| Error::input(format!("{}: optimizer steps: {e}", dir.display())))?;
        optimizer.load_state(task.params(), &ck.optimizer, &steps)?;
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
            (TRAIN_LOG, &mut prog.train_rows),
            (VAL_METRICS, &mut prog.val_rows),
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

    // Every rank starts from rank 0's weights and buffers (equal by the seed, and by the
    // checkpoint on resume: this makes sure).
    if let Some(d) = dist {
        d.broadcast(&task.sync_tensors())?;
    }
    // Only rank 0 reports (log lines, bar, TensorBoard).
    let mut mon = Monitor::new(
        if main {
            opts.log_every
        } else {
            Some(super::monitor::LogEvery::Off)
        },
        opts.tensorboard.as_deref().filter(|_| main),
        cfg.epochs,
        cfg.epochs.saturating_mul(steps_per_epoch),
        prog.step,
    )?;
    if !main {
        mon.hide_bar();
    }
    if texts {
        mon.counting("texts");
    }
    let outcome = {
        let mut run = Run {
            ctx: &ctx,
            task: &mut *task,
            optimizer: &mut optimizer,
            schedule: &mut schedule,
            sampler: &mut *sampler,
            prog: &mut prog,
            mon,
        };
        let source = match tokenizer.as_deref() {
            Some(tok) => Source::Texts { tok, ds: &ds },
            None => Source::Images {
                cache: &cache,
                pre: &pre,
                aug: (!cfg.augment.is_off()).then_some((&cfg.augment, cfg.seed)),
            },
        };
        let o = run.fit(&source)?;
        run.mon.finish();
        o
    };

    let images_per_s = outcome.images as f64 / outcome.train_seconds.max(1e-9);
    let world = dist.map_or(1, |d| d.world_size);
    let util = flops_per_image.map(|f| {
        utilisation::Utilisation::of(
            f,
            images_per_s,
            peak.as_ref().map(|p| p.gflop_s * world as f64),
        )
    });
    if !outcome.stopped && main {
        write_logs(&ctx, &prog)?;
        let mut m = finish;
        m.rows("train_rows", ts.rows.len() as u64)
            .rows("classes", ts.labels.len() as u64)
            .rows("steps", prog.step as u64)
            .rows("epochs", prog.epoch as u64);
        m.timing("image_cache", cache_seconds);
        for (k, v) in task.timings() {
            m.timing(k, v);
        }
        m.timing("train", outcome.train_seconds)
            .timing("total", t0.elapsed().as_secs_f64());
        if let Some(d) = dist {
            let n = outcome.reduce_steps.max(1) as f64;
            m.note(
                "data_parallel",
                serde_json::json!({
                    "world_size": d.world_size,
                    "backend": d.backend.name(),
                    "allreduce_mib_per_step": outcome.reduced_bytes as f64 / n / (1 << 20) as f64,
                    "allreduce_s_per_step": outcome.reduced_seconds / n,
                }),
            );
            m.timing("allreduce", outcome.reduced_seconds);
        }
        if let Some(u) = &util {
            m.note(
                "utilisation",
                serde_json::json!({
                    "flops_per_image": u.flops_per_image,
                    "flops_counted": "libtorch profiler (with_flops), one forward pass x 3 for forward + backward",
                    "gflop_s": u.gflop_s,
                    "peak_gflop_s": u.peak_gflop_s,
                    "share_of_peak": u.share(),
                    "peak_probe": peak,
                    "ranks": world,
                }),
            );
        }
        // The model folder appears only now, with its manifest: the best validated weights
        // (kept in checkpoints/best while training), or the last ones without validation.
        let best_net = match prog.best {
            Some(_) => checkpoint::find(&ckpt_root, "best")
                .map(|d| checkpoint::load(&d))
                .transpose()?
                .map(|c| c.net),
            None => None,
        };
        let provenance = serde_json::json!({
            "simile_version": crate::manifest::VERSION,
            "commit": crate::manifest::COMMIT,
            "dataset": { "path": opts.dataset.display().to_string(), "fingerprint": ds_fp },
            "config": cfg_json,
            "sets": opts.sets,
            "compute": opts.compute.to_string(),
            "device": device::describe(dev),
            "weights": match prog.best {
                Some((v, e, s)) => serde_json::json!({
                    "chosen_by": cfg.metric_for_checkpointing, "value": v, "epoch": e, "step": s}),
                None => serde_json::json!({"chosen_by": "last (no validation split)"}),
            },
        });
        let folder = task.seal(best_net.as_deref(), prog.best, provenance)?;
        model::commit_folder(m, folder, task.seal_extra()?)?;
    }
    Ok(TrainSummary {
        out: opts.out.clone(),
        device: device::describe(dev),
        epochs: prog.epoch,
        steps: prog.step,
        images: outcome.images,
        seconds: t0.elapsed().as_secs_f64(),
        train_seconds: outcome.train_seconds,
        images_per_s,
        unit: if texts { "texts" } else { "images" },
        utilisation: util,
        best: prog
            .best
            .map(|(v, e, _)| (cfg.metric_for_checkpointing.clone(), v, e)),
        last_scores: outcome.last_scores,
        stopped: outcome.stopped,
        resumed_from,
    })
}

/// What the helpers below need that does not change during a run.
struct Ctx<'a> {
    /// This rank's job (data-parallel training); `None` for one process.
    dist: Option<&'a Dist>,
    cfg: &'a TrainConfig,
    cfg_json: &'a serde_json::Value,
    opts: &'a TrainOptions,
    ds_fp: &'a Fingerprint,
    ckpt_root: &'a Path,
    /// Dataset row of each train-set position.
    train_rows: &'a [usize],
    dev: Device,
    /// Forward + backward FLOPs per image, when the task knows them.
    flops_per_image: Option<f64>,
}

impl Ctx<'_> {
    /// Whether this process writes the outputs (one process, or rank 0).
    fn is_main(&self) -> bool {
        self.dist.is_none_or(|d| d.is_main())
    }
}

/// The loop's state.
struct Run<'r, 't> {
    ctx: &'r Ctx<'r>,
    task: &'r mut (dyn Task + 't),
    optimizer: &'r mut Optimizer,
    schedule: &'r mut Schedule,
    sampler: &'r mut dyn BatchSampler,
    prog: &'r mut Progress,
    mon: Monitor,
}

/// How the loop ended.
struct Outcome {
    images: u64,
    train_seconds: f64,
    last_scores: Option<Scores>,
    /// Stopped by `stop_after_steps`.
    stopped: bool,
    /// Data-parallel: gradient bytes all-reduced, the seconds it took, over `reduce_steps`.
    reduced_bytes: u64,
    reduced_seconds: f64,
    reduce_steps: u64,
}

impl Run<'_, '_> {
    fn fit(&mut self, source: &Source) -> Result<Outcome> {
        let cfg = self.ctx.cfg;
        let opts = self.ctx.opts;
        let mut out = Outcome {
            images: 0,
            train_seconds: 0.0,
            last_scores: None,
            stopped: false,
            reduced_bytes: 0,
            reduced_seconds: 0.0,
            reduce_steps: 0,
        };
        // Validation before training, if asked (the learning curve's first point).
        if cfg.valid_at_start
            && self.prog.step == 0
            && self.prog.val_rows.is_empty()
            && self.task.can_validate()
        {
            let s = self.validate()?;
            let line = format!(
                "simile-train: before training: {}",
                task::short_scores(&s, &cfg.metric_for_checkpointing)
            );
            self.mon.validation(self.prog.val_rows.last(), &line)?;
        }
        let rows_of_train = self.ctx.train_rows;
        while self.prog.epoch < cfg.epochs {
            let epoch = self.prog.epoch;
            let batches = self.sampler.epoch(&mut rng::seeded(cfg.seed, epoch as u64));
            let frozen = epoch < cfg.freeze_n_epochs;
            for p in self.task.params() {
                let _ = p.tensor.set_requires_grad(!(frozen && p.group == 0));
            }
            let skip = self.prog.batch_in_epoch.min(batches.len());
            // Each rank decodes and forwards its slice of the batch (position `first` on).
            let (rank, world) = match self.ctx.dist {
                Some(d) if self.task.shards_rows() => (d.rank, d.world_size),
                _ => (0, 1),
            };
            let todo: Vec<(usize, Vec<usize>)> = batches[skip..]
                .iter()
                .map(|b| {
                    let share = b.len() / world;
                    let first = rank * share;
                    let rows = b[first..first + share]
                        .iter()
                        .map(|&i| rows_of_train[i])
                        .collect();
                    (first, rows)
                })
                .collect();
            if let Some(b) = batches.iter().find(|b| b.len() % world != 0) {
                return Err(Error::input(format!(
                    "a batch of {} does not split over {world} ranks (the {} sampler's last batch?): use a batch size and drop_last that give whole shares",
                    b.len(),
                    cfg.sampler.name()
                )));
            }
            let first_step = self.prog.step;
            let stopped: Result<bool> = std::thread::scope(|scope| {
                // The next batches' inputs are built while the network runs.
                let (tx, rx) =
                    std::sync::mpsc::sync_channel::<Result<HostBatch>>(cfg.data.prefetch);
                let todo_ref = &todo;
                scope.spawn(move || {
                    for (i, (first, rows)) in todo_ref.iter().enumerate() {
                        let buf = source.make(rows, *first, first_step + i);
                        let failed = buf.is_err();
                        if tx.send(buf).is_err() || failed {
                            return;
                        }
                    }
                });
                for (i, _) in todo.iter().enumerate() {
                    let buf = rx
                        .recv()
                        .map_err(|_| Error::internal("the batch thread stopped"))??;
                    self.step(epoch, &batches[skip + i], &buf, &mut out)?;
                    let stop_now = opts.stop_after_steps == Some(self.prog.step);
                    let every = cfg.checkpoint_every_steps;
                    let mid = self.prog.batch_in_epoch < batches.len();
                    if mid && (stop_now || (every > 0 && self.prog.step.is_multiple_of(every))) {
                        self.save_ckpt("last")?;
                        write_logs(self.ctx, self.prog)?;
                    }
                    if stop_now && mid {
                        return Ok(true);
                    }
                }
                Ok(false)
            });
            if stopped? {
                out.stopped = true;
                return Ok(out);
            }
            // End of the epoch.
            self.prog.epoch += 1;
            self.prog.batch_in_epoch = 0;
            let last = self.prog.epoch == cfg.epochs;
            let validate_now = self.task.can_validate()
                && ((cfg.valid_period > 0 && self.prog.epoch.is_multiple_of(cfg.valid_period))
                    || last);
            if validate_now {
                self.mon
                    .status(format!("e{}/{} validating", self.prog.epoch, cfg.epochs));
                let s = self.validate()?;
                let monitor = self
                    .schedule
                    .monitor(&cfg.metric_for_checkpointing)
                    .map(str::to_string);
                if let Some(key) = monitor {
                    self.schedule
                        .observe(s.get(&key).flatten(), cfg.mode_for_checkpointing);
                }
                let line = format!(
                    "simile-train: epoch {}/{} step {}: {}",
                    self.prog.epoch,
                    cfg.epochs,
                    self.prog.step,
                    task::short_scores(&s, &cfg.metric_for_checkpointing)
                );
                self.mon.validation(self.prog.val_rows.last(), &line)?;
                out.last_scores = Some(s);
            }
            self.save_ckpt("last")?;
            write_logs(self.ctx, self.prog)?;
            if opts.stop_after_steps == Some(self.prog.step) && !last {
                out.stopped = true;
                return Ok(out);
            }
        }
        Ok(out)
    }

    /// One optimiser step on a batch (`batch`: train-set positions, `buf`: their inputs); a
    /// non-finite loss stops training with an error, the log kept up to it.
    fn step(
        &mut self,
        epoch: usize,
        batch: &[usize],
        buf: &HostBatch,
        out: &mut Outcome,
    ) -> Result<()> {
        let cfg = self.ctx.cfg;
        let ts0 = Instant::now();
        let prof = std::env::var_os("SIMILE_TRAIN_PROFILE").is_some();
        let tp = Instant::now();
        let mut marks: Vec<(&str, f64)> = Vec::new();
        let mut mark = |name: &'static str| {
            if prof {
                marks.push((name, tp.elapsed().as_secs_f64()));
            }
        };
        mark("recv");
        let step = self.prog.step;
        let factor = self.schedule.factor(step, epoch);
        let base = cfg.optimizer.group_lrs();
        let lrs = [base[0] * factor, base[1] * factor, base[2] * factor];
        let x = buf.to_device(self.ctx.dev)?;
        if let Some(d) = self.ctx.dist {
            // BatchNorm's running statistics are rank 0's before each forward (DDP's default).
            d.broadcast(&self.task.buffers())?;
        }
        let (loss_t, logs) = self.task.loss(&x, batch, step, self.ctx.dist)?;
        let loss_t = if loss_t.dim() == 0 {
            loss_t
        } else {
            loss_t.f_mean(Kind::Float)?
        };
        let loss = match self.ctx.dist {
            // Each rank holds its part of the loss: the log and the NaN check need the sum.
            Some(d) if self.task.loss_is_partial() => {
                let total = loss_t.f_detach()?.f_to_kind(Kind::Float)?.f_view([1])?;
                d.sum(&total)?;
                total.f_double_value(&[0])?
            }
            _ => loss_t.f_double_value(&[])?,
        };
        mark("loss");
        if !loss.is_finite() {
            let kept = nonfinite_advice(self.ctx.ckpt_root, step);
            // Keep the log up to here for the diagnosis.
            let mut row = step_row(epoch, step + 1, loss, &lrs, &logs, 0.0);
            row.values.push(("nonfinite".into(), Some(1.0)));
            self.prog.train_rows.push(row);
            write_logs(self.ctx, self.prog)?;
            return Err(Error::input(format!(
                "training stopped: the loss became {loss} at epoch {epoch}, step {} (learning rate {:.3e}); {kept}",
                step + 1,
                lrs[0]
            )));
        }
        match &self.prog.scaler {
            Some(sc) => loss_t.f_mul_scalar(sc.scale)?.f_backward()?,
            None => loss_t.f_backward()?,
        }
        mark("backward");
        let mut grads: Vec<Option<Tensor>> = self
            .task
            .params()
            .iter()
            .map(|p| {
                let g = p.tensor.grad();
                (p.tensor.requires_grad() && g.defined()).then_some(g)
            })
            .collect();
        let mut reduced = None;
        if let Some(d) = self.ctx.dist {
            // Gradients are dropped after each step, so a parameter that this rank's part of
            // the loss did not reach has none: zeros, so that every rank all-reduces the same
            // tensors (as DDP does for unused parameters).
            for (g, p) in grads.iter_mut().zip(self.task.params()) {
                if g.is_none() && p.tensor.requires_grad() {
                    *g = Some(p.tensor.f_zeros_like()?);
                }
            }
            // Each rank's gradients flow through its own rows of the gathered batch: their sum
            // is the whole batch's. A loss's own parameters see the whole gathered batch on
            // every rank, so theirs are equal everywhere: averaged.
            let average: Vec<bool> = self.task.params().iter().map(|p| p.group == 2).collect();
            let t = Instant::now();
            let bytes = d.all_reduce_grads(&mut grads, &average)?;
            reduced = Some((bytes, t.elapsed().as_secs_f64()));
            mark("all_reduce");
        }
        // fp16: the gradients of the scaled loss, back to the loss's scale (every rank holds
        // the same sums, so every rank takes or skips the step alike).
        let scale = self.prog.scaler.as_ref().map(|sc| sc.scale);
        let finite = match &mut self.prog.scaler {
            Some(sc) => sc.unscale(&grads)?,
            None => true,
        };
        let gnorm = optim::clip(&mut grads, cfg.grad_clip_norm, cfg.grad_clip_value)?;
        mark("clip");
        if finite {
            self.optimizer.step(self.task.params(), &grads, &lrs)?;
        }
        mark("step");
        drop(grads);
        // As PyTorch's zero_grad(set_to_none=True): a parameter without a gradient at the next
        // step (unused by that batch's loss) is not stepped, rather than stepped with zeros.
        let ts: Vec<Tensor> = self
            .task
            .params()
            .iter()
            .map(|p| p.tensor.shallow_clone())
            .collect();
        crate::torch_ext::clear_grads(&ts)?;
        mark("optim");
        if prof {
            eprintln!("step {step}: {marks:?}");
        }
        self.prog.step += 1;
        self.prog.batch_in_epoch += 1;
        let dt = ts0.elapsed().as_secs_f64();
        out.train_seconds += dt;
        // The whole batch, over every rank.
        out.images += batch.len() as u64;
        let mut row = step_row(
            epoch,
            self.prog.step,
            loss,
            &lrs,
            &logs,
            batch.len() as f64 / dt.max(1e-9),
        );
        row.values.push(("grad_norm".into(), Some(gnorm)));
        if let Some(f) = self.ctx.flops_per_image {
            let gflop_s = batch.len() as f64 * f / dt.max(1e-9) / 1e9;
            row.values.push(("gflop_s".into(), Some(gflop_s)));
        }
        if let Some(scale) = scale {
            row.values.push(("loss_scale".into(), Some(scale)));
            row.values
                .push(("skipped".into(), Some(f64::from(u8::from(!finite)))));
        }
        if let Some((bytes, secs)) = reduced {
            out.reduced_bytes += bytes;
            out.reduced_seconds += secs;
            out.reduce_steps += 1;
            row.values.push((
                "allreduce_mib".into(),
                Some(bytes as f64 / (1 << 20) as f64),
            ));
            row.values.push(("allreduce_s".into(), Some(secs)));
        }
        self.mon.step(&row, batch.len(), dt)?;
        trace_batch(self.prog.step, epoch, batch, self.ctx.train_rows)?;
        // Test hook: SIMILE_TEST_FAULT=kill-after:step-N kills this process after step N.
        crate::manifest::fault(&format!("step-{}", self.prog.step));
        self.prog.train_rows.push(row);
        Ok(())
    }

    /// Validates, records the scores and keeps the best checkpoint.
    fn validate(&mut self) -> Result<Scores> {
        let s = self.task.validate(self.ctx.dist)?;
        let key = &self.ctx.cfg.metric_for_checkpointing;
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
        self.prog.val_rows.push(log::Row {
            ints: vec![
                ("epoch".into(), self.prog.epoch as i64),
                ("step".into(), self.prog.step as i64),
            ],
            values: s.entries.clone(),
        });
        let improved = value.is_some_and(|v| {
            self.ctx
                .cfg
                .mode_for_checkpointing
                .better(v, self.prog.best.map(|b| b.0))
        });
        if improved {
            self.prog.best = Some((value.unwrap_or(f64::NAN), self.prog.epoch, self.prog.step));
            self.save_ckpt("best")?;
        }
        write_logs(self.ctx, self.prog)?;
        Ok(s)
    }

    fn save_ckpt(&self, name: &str) -> Result<()> {
        let ctx = self.ctx;
        if !ctx.is_main() {
            return Ok(());
        }
        let prog = &*self.prog;
        let params = self.task.params();
        let (opt_tensors, opt_steps) = self.optimizer.state(params);
        let t = self.task.save()?;
        let mut rng = serde_json::json!({
            "seed": ctx.cfg.seed,
            "weights_init": "tch::manual_seed(seed)",
            "sampler": "rng::seeded(seed, epoch)",
            "augment": "data::image_rng(seed, step, position)",
        });
        if let Some(o) = rng.as_object_mut() {
            o.extend(t.rng);
        }
        let mut state = serde_json::json!({
            "simile_checkpoint": 1,
            "epoch": prog.epoch,
            "batch_in_epoch": prog.batch_in_epoch,
            "step": prog.step,
            "best": prog.best.map(|(v, e, s)| serde_json::json!({
                "key": ctx.cfg.metric_for_checkpointing, "value": v, "epoch": e, "step": s})),
            "optimizer": { "name": ctx.cfg.optimizer.name(), "steps": opt_steps },
            "schedule": &*self.schedule,
            "sampler": self.sampler.state(),
            "rng": rng,
            "compute": ctx.opts.compute.to_string(),
            "loss_scaler": prog.scaler,
            "dataset": { "path": ctx.opts.dataset.display().to_string(), "fingerprint": ctx.ds_fp },
            "train_log_rows": prog.train_rows.len(),
            "val_rows": prog.val_rows.len(),
            "config": ctx.cfg_json,
        });
        if let Some(o) = state.as_object_mut() {
            o.extend(t.state);
        }
        let ck = Checkpoint {
            state,
            net: t.net,
            criterion: t.criterion,
            optimizer: opt_tensors,
            bank: t.bank,
        };
        checkpoint::save(ctx.ckpt_root, name, &ck)
    }
}

/// Parity hook (issue 24's whole-run harness): with `SIMILE_TRAIN_TRACE=FILE`, every step
/// appends one JSON line `{"step" (1-based), "epoch", "rows"}` to FILE: the dataset rows of the batch, in
/// the order the network saw them, so that a reference can train on the same batch sequence.
fn trace_batch(step: usize, epoch: usize, batch: &[usize], train_rows: &[usize]) -> Result<()> {
    let Some(path) = std::env::var_os("SIMILE_TRAIN_TRACE") else {
        return Ok(());
    };
    let rows: Vec<usize> = batch.iter().map(|&p| train_rows[p]).collect();
    let line = serde_json::json!({"step": step, "epoch": epoch, "rows": rows}).to_string();
    let path = std::path::PathBuf::from(path);
    use std::io::Write;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| writeln!(f, "{line}"))
        .map_err(|e| Error::io(&path, e))
}

fn write_logs(ctx: &Ctx, prog: &Progress) -> Result<()> {
    if !ctx.is_main() {
        return Ok(());
    }
    log::write(
        &ctx.opts.out.join(TRAIN_LOG),
        &prog.train_rows,
        &log::meta("train_log"),
    )?;
    if !prog.val_rows.is_empty() {
        log::write(
            &ctx.opts.out.join(VAL_METRICS),
            &prog.val_rows,
            &log::meta("val_metrics"),
        )?;
    }
    Ok(())
}

fn step_row(
    epoch: usize,
    step: usize,
    loss: f64,
    lrs: &[f64; 3],
    logs: &Logs,
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

/// The train split's rows, their labels and classes, checked.
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

/// A finished run's manifest parameters and inputs, known before training so a finished run
/// is recognised.
fn manifest_plan(
    opts: &TrainOptions,
    cfg: &TrainConfig,
    cfg_json: &serde_json::Value,
    device: &str,
    images: &Fingerprint,
    image_rows: &[usize],
) -> Result<ManifestBuilder> {
    let params = serde_json::json!({
        "config": cfg_json,
        "sets": opts.sets,
        "device": device,
        "compute": opts.compute.to_string(),
    });
    let mut m = ManifestBuilder::new("train", params);
    m.input("dataset", &opts.dataset)?;
    m.input("config", &opts.config)?;
    // The starting weights are an input like any other: a changed init model makes the run
    // stale, and an --out that is the init folder is refused before anything is touched.
    if let Some(init) = &cfg.model.init {
        let dir = task::init_dir(init)?;
        task::refuse_same_folder("model.init", &dir, &opts.out)?;
        let spec = model::ModelSpec::read(&dir)
            .map_err(|e| Error::input(format!("config key 'model.init': {e}")))?;
        m.input("init", &dir.join(model::MODEL_JSON))?;
        m.input("init_weights", &dir.join(&spec.weights))?;
    }
    m.input_record(
        "images",
        crate::manifest::InputRecord {
            path: format!(
                "{} images of the dataset's train and validation rows",
                image_rows.len()
            ),
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
pub(crate) const COMPANIONS: [&str; 3] = ["config.toml", TRAIN_LOG, VAL_METRICS];

/// A run without `--resume`: a finished run with the same config, dataset and version is done
/// (`Error::UpToDate`, unless `--force`); an unfinished one (checkpoints, no finished manifest)
/// is refused, as it may be wanted with `--resume`, unless `--force`; a finished run made from
/// other inputs or parameters, like any stale output, is replaced: training starts over.
fn start_over(opts: &TrainOptions, m: &mut ManifestBuilder, has_last: bool) -> Result<()> {
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

/// What to do after a non-finite loss at step index `step` (0-based): resume from the last
/// checkpoint with a lower rate when it is older than the weights that gave the loss; when it
/// holds exactly those weights (written right before this step), resuming would compute the
/// same loss again, so start over.
fn nonfinite_advice(ckpt_root: &Path, step: usize) -> String {
    let Some(dir) = checkpoint::find(ckpt_root, "last") else {
        return "no checkpoint had been written yet; start over with a lower learning rate (--force --set optimizer.lr=...)".into();
    };
    let ck_step = std::fs::read(dir.join(checkpoint::STATE))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v.get("step")?.as_u64());
    match ck_step {
        Some(s) if s as usize == step => format!(
            "the last checkpoint, {}, holds the weights that gave this loss (it was written after the step that diverged), so resuming from it would meet the same loss: start over with a lower learning rate (--force --set optimizer.lr=...), or checkpoint less often",
            dir.display()
        ),
        _ => format!(
            "the last good checkpoint, {} (after step {}), is kept: resume from it with a lower learning rate (--resume --set optimizer.lr=...)",
            dir.display(),
            ck_step.unwrap_or(0)
        ),
    }
}

/// The config keys `--resume` lets change: the epoch count, and the learning rates (the
/// advice after a diverging loss is to resume from the last good checkpoint with a lower one).
const RESUMABLE_KEYS: [&str; 5] = [
    "epochs",
    "optimizer.lr",
    "optimizer.lr_backbone",
    "optimizer.lr_head",
    "optimizer.lr_loss",
];

/// A config without the keys `--resume` lets change.
fn strip_resumable(v: &serde_json::Value) -> serde_json::Value {
    let mut v = v.clone();
    for k in RESUMABLE_KEYS {
        let mut parts: Vec<&str> = k.split('.').collect();
        let last = parts.pop().unwrap_or(k);
        let mut o = Some(&mut v);
        for p in parts {
            o = o.and_then(|x| x.get_mut(p));
        }
        if let Some(obj) = o.and_then(|x| x.as_object_mut()) {
            obj.remove(last);
        }
    }
    v
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

/// Rank 0's outcome of a step every rank must take together (`what`), followed by the
/// others: an up-to-date output or a refusal on rank 0 ends every rank the same way.
fn follow_main(d: &Dist, what: &str, outcome: &Result<()>) -> Result<()> {
    let word = d.is_main().then(|| match outcome {
        Ok(()) => serde_json::json!({ "go": true }),
        Err(Error::UpToDate(m)) => serde_json::json!({ "up_to_date": m }),
        Err(e) => serde_json::json!({ "error": e.to_string(), "code": e.exit_code() }),
    });
    let w = d.from_main(what, word.as_ref(), true)?;
    if d.is_main() {
        return Ok(());
    }
    if let Some(m) = w.get("up_to_date").and_then(|v| v.as_str()) {
        return Err(Error::UpToDate(m.to_string()));
    }
    if let Some(m) = w.get("error").and_then(|v| v.as_str()) {
        let m = format!("rank {}: rank 0 stopped: {m}", d.rank);
        return Err(match w.get("code").and_then(|v| v.as_i64()) {
            Some(2) => Error::input(m),
            _ => Error::Distributed(m),
        });
    }
    Ok(())
}

/// An error's message and exit code, kept where the error itself must be kept too.
fn clone_error(e: &Error) -> Error {
    match e.exit_code() {
        2 => Error::input(e.to_string()),
        0 => Error::UpToDate(e.to_string()),
        _ => Error::internal(e.to_string()),
    }
}
