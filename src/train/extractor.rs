//! Extractor training, the trainer's default task: the network (`model::Net`) and the
//! criterion (`loss`, with its miner) on the sampler's batches; validation through the stages'
//! search and metrics ([`validate`](super::validate)); the model folder `simile-embed` reads.
use super::checkpoint::Checkpoint;
use super::distributed::Dist;
use super::loss::{Criterion, Logs};
use super::miner::MinerState;
use super::optim::Param;
use super::sampler::rng;
use super::trainer::{self, Best, Plan, Setup, Task, TaskState};
use super::validate::Validator;
use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::metrics::Scores;
use crate::model::{self, ModelSpec, Net};
use tch::{nn, Device, Tensor};

/// Extractor training before its network exists.
pub(crate) struct ExtractorPlan {
    validator: Option<Validator>,
}

/// `ci_key`: the metric whose interval validation reports (the checkpointing metric).
pub(crate) fn plan(ds: &Dataset, ci_key: &str) -> Result<ExtractorPlan> {
    Ok(ExtractorPlan {
        validator: Validator::new(ds, ci_key)?,
    })
}

impl Plan for ExtractorPlan {
    fn validation_rows(&self) -> Vec<usize> {
        self.validator
            .as_ref()
            .map(|v| v.rows.clone())
            .unwrap_or_default()
    }

    fn build<'a>(self: Box<Self>, s: &Setup<'a>) -> Result<Box<dyn Task + 'a>> {
        let cfg = s.cfg;
        let loss = cfg
            .loss
            .as_ref()
            .ok_or_else(|| Error::internal("extractor training without [loss]"))?;
        let arch = cfg.model.arch_spec();
        let vs = nn::VarStore::new(s.dev);
        let net = Net::new(&vs.root(), &arch, cfg.model.normalise)?;
        if let Some(init) = &cfg.model.init {
            load_init(&vs, init, &arch)?;
        }
        let crit_vs = nn::VarStore::new(s.dev);
        let criterion = loss.build(
            &crit_vs.root(),
            net.dim,
            s.ts.labels.len() as i64,
            s.ts.class_categories.as_deref(),
        )?;
        // Groups: backbone 0, projection head 1, the loss's parameters 2.
        let mut params: Vec<Param> = trainer::trainable_sorted(&vs)
            .into_iter()
            .map(|(n, t)| Param {
                group: if n.starts_with("proj.") { 1 } else { 0 },
                name: n,
                tensor: t,
            })
            .collect();
        for (n, t) in trainer::trainable_sorted(&crit_vs) {
            params.push(Param {
                name: format!("criterion.{n}"),
                group: 2,
                tensor: t,
            });
        }
        Ok(Box::new(Extractor {
            s: *s,
            validator: self.validator,
            vs,
            net,
            crit_vs,
            criterion,
            params,
        }))
    }
}

struct Extractor<'a> {
    s: Setup<'a>,
    validator: Option<Validator>,
    vs: nn::VarStore,
    net: Net,
    crit_vs: nn::VarStore,
    criterion: Box<dyn Criterion>,
    params: Vec<Param>,
}

impl Task for Extractor<'_> {
    fn params(&self) -> &[Param] {
        &self.params
    }

    fn loss(
        &mut self,
        x: &Tensor,
        batch: &[usize],
        step: usize,
        dist: Option<&Dist>,
    ) -> Result<(Tensor, Logs)> {
        let emb = self
            .net
            .forward_in(x, true, self.s.opts.compute, self.s.dev)?;
        // The miner and the loss see the whole batch: every rank's rows, gathered (as
        // pytorch-metric-learning's DistributedLossWrapper), this rank's with their gradient.
        let emb = match dist {
            Some(d) => d.gather_rows(&emb)?,
            None => emb,
        };
        let labels: Vec<i64> = batch.iter().map(|&p| self.s.ts.classes[p]).collect();
        let mut mrng = rng::seeded(self.s.cfg.seed, (1u64 << 32) + step as u64);
        let out = self.criterion.forward(&emb, &labels, &mut mrng)?;
        Ok((out.loss, out.logs))
    }

    fn sync_tensors(&self) -> Vec<Tensor> {
        trainer::sorted_vars(&self.vs)
            .into_iter()
            .chain(trainer::sorted_vars(&self.crit_vs))
            .map(|(_, t)| t)
            .collect()
    }

    fn buffers(&self) -> Vec<Tensor> {
        trainer::buffers(&self.vs)
    }

    fn flops_per_image(&self) -> Result<Option<f64>> {
        let f = super::utilisation::forward_flops(
            &self.net,
            self.s.cfg.model.preprocess().size as usize,
            self.s.opts.compute,
            self.s.dev,
        )?;
        Ok(Some(f * super::utilisation::TRAIN_FLOPS_PER_FORWARD))
    }

    fn can_validate(&self) -> bool {
        self.validator.is_some()
    }

    /// Validates the weights now, in the run's compute mode (as `simile-embed --compute`).
    fn validate(&mut self, dist: Option<&Dist>) -> Result<Scores> {
        let v = self
            .validator
            .as_ref()
            .ok_or_else(|| Error::internal("validation without a validation split"))?;
        v.run(
            &self.net,
            self.s.cache,
            &self.s.cfg.model.preprocess(),
            (self.s.dev, self.s.opts.compute),
            self.s.cfg.batch_size_val,
            dist,
        )
    }

    fn save(&self) -> Result<TaskState> {
        let bank = self.criterion.state()?;
        let mut state = serde_json::Map::new();
        state.insert("criterion".into(), bank.meta);
        let mut rng = serde_json::Map::new();
        rng.insert("miner".into(), "rng::seeded(seed, 2^32 + step)".into());
        Ok(TaskState {
            net: trainer::cpu_copies(&trainer::sorted_vars(&self.vs)),
            criterion: trainer::cpu_copies(&trainer::sorted_vars(&self.crit_vs)),
            bank: trainer::cpu_copies(&bank.tensors),
            state,
            rng,
        })
    }

    fn restore(&mut self, ck: &Checkpoint) -> Result<()> {
        trainer::load_into(&self.vs, &ck.net, "network")?;
        trainer::load_into(&self.crit_vs, &ck.criterion, "loss parameters")?;
        self.criterion.load_state(MinerState {
            meta: ck.state.get("criterion").cloned().unwrap_or_default(),
            tensors: ck
                .bank
                .iter()
                .map(|(n, t)| (n.clone(), t.to_device(self.s.dev)))
                .collect(),
        })
    }

    fn seal(
        &self,
        net: Option<&[(String, Tensor)]>,
        _best: Best,
        mut provenance: serde_json::Value,
    ) -> Result<model::SealedFolder> {
        let (cfg, ts) = (self.s.cfg, self.s.ts);
        let mut spec = ModelSpec::new(
            cfg.model.arch_spec(),
            cfg.model.normalise,
            cfg.model.preprocess(),
        )?;
        let label_names = self.s.ds.meta.label_names.as_ref().map(|names| {
            ts.labels
                .iter()
                .map(|&l| names.get(l as usize).cloned().unwrap_or_default())
                .collect::<Vec<_>>()
        });
        if let Some(o) = provenance.as_object_mut() {
            o.insert("trained_by".into(), "simile-train".into());
            o.insert(
                "label_map".into(),
                serde_json::json!({
                    "classes": ts.labels.len(),
                    "labels": ts.labels,
                    "label_names": label_names,
                    "categories": ts.class_categories,
                }),
            );
        }
        spec.provenance = provenance;
        let mut cpu = nn::VarStore::new(Device::Cpu);
        Net::new(&cpu.root(), &spec.architecture, spec.normalise)?;
        match net {
            Some(t) => trainer::load_into(&cpu, t, "best checkpoint")?,
            None => cpu.copy(&self.vs)?,
        }
        model::seal_folder(&self.s.opts.out, &spec, &spec.weights, &cpu)
    }
}

/// Loads starting weights from a model folder or zoo key (missing entries keep their
/// initialisation and are listed).
fn load_init(vs: &nn::VarStore, init: &str, arch: &crate::model::ArchSpec) -> Result<()> {
    let dir = trainer::init_dir(init)?;
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
    trainer::report_missing("", &mut missing, &dir);
    Ok(())
}
