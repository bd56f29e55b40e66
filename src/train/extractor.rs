//! Extractor training, the trainer's default task: the network (`model::Net` for images, a
//! BERT-family `TextNet` for texts) and the criterion (`loss`, with its miner) on the
//! sampler's batches; validation through the stages' search and metrics
//! ([`validate`](super::validate)); the model folder `simile-embed` reads.
use super::checkpoint::Checkpoint;
use super::config::TrainConfig;
use super::data::Input;
use super::distributed::Dist;
use super::loss::{Criterion, Logs};
use super::miner::MinerState;
use super::optim::Param;
use super::sampler::rng;
use super::task::{self, Best, Plan, Setup, Task, TaskState};
use super::validate::Validator;
use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::manifest::ManifestBuilder;
use crate::metrics::Scores;
use crate::model::bert::TextNet;
use crate::model::{self, ModelSpec, Net, TextInput};
use crate::tokenize::{TextTokenizer, TOKENIZER_JSON};
use rand_chacha::rand_core::RngCore;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::{nn, Device, Tensor};

/// Extractor training before its network exists.
pub(crate) struct ExtractorPlan {
    validator: Option<Validator>,
    text: Option<TextPlan>,
}

/// A text encoder's starting point: the init model folder, its spec with the run's pooling
/// and max length, and its tokenizer.
struct TextPlan {
    dir: PathBuf,
    spec: ModelSpec,
    tok: Arc<TextTokenizer>,
}

/// `cfg.metric_for_checkpointing` is the metric whose interval validation reports.
pub(crate) fn plan(ds: &Dataset, cfg: &TrainConfig) -> Result<ExtractorPlan> {
    let validator = Validator::new(ds, &cfg.metric_for_checkpointing)?;
    let text = if cfg.model.is_text() {
        let t = text_plan(cfg)?;
        let mut rows = ds.rows_of_split(crate::dataset::Split::Train);
        rows.extend(validator.iter().flat_map(|v| v.rows.iter().copied()));
        check_texts(&t.tok, ds, &rows)?;
        Some(t)
    } else {
        None
    };
    Ok(ExtractorPlan { validator, text })
}

/// Tokenizes every text training and validation read, before anything is written: the texts
/// with no token but the special ones are refused, all named, rather than one at its step.
fn check_texts(tok: &TextTokenizer, ds: &Dataset, rows: &[usize]) -> Result<()> {
    let texts: Vec<&str> = rows
        .iter()
        .map(|&r| ds.text[r].as_deref().unwrap_or(""))
        .collect();
    let name = |k: usize| format!("id {} (column 'text')", ds.ids[rows[k]]);
    tok.check_all(&texts, &name, &mut |_| {})?;
    Ok(())
}

/// Reads the text model `model.init` names (a folder or zoo key): its architecture and
/// tokenizer, with the config's pooling and max length in place of the model's.
fn text_plan(cfg: &TrainConfig) -> Result<TextPlan> {
    let init = cfg
        .model
        .init
        .as_deref()
        .ok_or_else(|| Error::internal("a text config without model.init"))?;
    let dir = task::init_dir(init)?;
    let mut spec =
        ModelSpec::read(&dir).map_err(|e| Error::input(format!("config key 'model.init': {e}")))?;
    let Some(text) = spec.text.as_mut() else {
        return Err(Error::input(format!(
            "config key 'model.init': {} holds an image model ({}); arch = \"bert\" starts from a text model (minilm-l6-v2, or a folder from `simile-embed import --hf`)",
            dir.display(),
            spec.architecture.name
        )));
    };
    if let Some(p) = cfg.model.pooling {
        text.pooling = p;
    }
    if let Some(m) = cfg.model.max_length {
        let limit = spec
            .architecture
            .bert
            .as_ref()
            .map_or(0, |b| b.max_position_embeddings as usize);
        if m > limit {
            return Err(Error::input(format!(
                "config key 'model.max_length': {m} exceeds the model's {limit} positions ({})",
                dir.display()
            )));
        }
        text.max_length = m;
    }
    spec.normalise = cfg.model.normalise;
    let tp = dir.join(&text.tokenizer);
    let tok = TextTokenizer::load(&tp, text.max_length)?;
    let bert = spec
        .architecture
        .bert
        .as_ref()
        .ok_or_else(|| Error::internal("a text model without its sizes"))?;
    model::bert::check_vocab(&tok, bert, &tp)?;
    Ok(TextPlan {
        dir,
        spec,
        tok: Arc::new(tok),
    })
}

/// The network being trained.
enum Encoder {
    Image(Net),
    Text(Box<TextNet>),
}

impl Encoder {
    fn dim(&self) -> i64 {
        match self {
            Encoder::Image(n) => n.dim,
            Encoder::Text(t) => t.bert.config().hidden_size,
        }
    }
}

impl Plan for ExtractorPlan {
    fn validation_rows(&self) -> Vec<usize> {
        self.validator
            .as_ref()
            .map(|v| v.rows.clone())
            .unwrap_or_default()
    }

    fn tokenizer(&self) -> Option<Arc<TextTokenizer>> {
        self.text.as_ref().map(|t| t.tok.clone())
    }

    fn manifest(&self, m: &mut ManifestBuilder, out: &Path) -> Result<()> {
        if let Some(t) = &self.text {
            let tok = t.spec.text.as_ref().map(|x| x.tokenizer.as_str());
            m.input("init_tokenizer", &t.dir.join(tok.unwrap_or(TOKENIZER_JSON)))?;
            m.companion(&out.join(TOKENIZER_JSON));
        }
        Ok(())
    }

    fn build<'a>(self: Box<Self>, s: &Setup<'a>) -> Result<Box<dyn Task + 'a>> {
        let cfg = s.cfg;
        let loss = cfg
            .loss
            .as_ref()
            .ok_or_else(|| Error::internal("extractor training without [loss]"))?;
        let vs = nn::VarStore::new(s.dev);
        let net = match &self.text {
            Some(t) => {
                let pool = t.spec.text.as_ref().map(|x| x.pooling).unwrap_or_default();
                let net = TextNet::new(&vs.root(), &t.spec.architecture, pool, t.spec.normalise)?;
                load_init(&vs, &t.dir, &t.spec.architecture)?;
                Encoder::Text(Box::new(net))
            }
            None => {
                let arch = cfg.model.arch_spec();
                let net = Net::new(&vs.root(), &arch, cfg.model.normalise)?;
                if let Some(init) = &cfg.model.init {
                    load_init(&vs, &task::init_dir(init)?, &arch)?;
                }
                Encoder::Image(net)
            }
        };
        let crit_vs = nn::VarStore::new(s.dev);
        let criterion = loss.build(
            &crit_vs.root(),
            net.dim(),
            s.ts.labels.len() as i64,
            s.ts.class_categories.as_deref(),
        )?;
        // Groups: backbone 0, projection head 1, the loss's parameters 2.
        let mut params: Vec<Param> = task::trainable_sorted(&vs)
            .into_iter()
            .map(|(n, t)| Param {
                group: if n.starts_with("proj.") { 1 } else { 0 },
                name: n,
                tensor: t,
            })
            .collect();
        for (n, t) in task::trainable_sorted(&crit_vs) {
            params.push(Param {
                name: format!("criterion.{n}"),
                group: 2,
                tensor: t,
            });
        }
        Ok(Box::new(Extractor {
            s: *s,
            validator: self.validator,
            text: self.text,
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
    text: Option<TextPlan>,
    vs: nn::VarStore,
    net: Encoder,
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
        x: &Input,
        batch: &[usize],
        step: usize,
        dist: Option<&Dist>,
    ) -> Result<(Tensor, Logs)> {
        let (compute, dev) = (self.s.opts.compute, self.s.dev);
        let emb = match (&self.net, x) {
            (Encoder::Image(n), Input::Images(x)) => n.forward_in(x, true, compute, dev)?,
            (Encoder::Text(n), Input::Tokens { ids, mask }) => {
                // Dropout draws from libtorch's global generator: seeded by (seed, step,
                // rank) so that a resumed run draws what the uninterrupted one would have.
                let rank = dist.map_or(0, |d| d.rank) as u64;
                let mut r = rng::seeded(self.s.cfg.seed, (3u64 << 32) + step as u64);
                tch::manual_seed((r.next_u64() ^ rank) as i64 & i64::MAX);
                n.forward_in(ids, mask, true, compute, dev)?
            }
            _ => return Err(Error::internal("the batch does not fit the network")),
        };
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
        task::sorted_vars(&self.vs)
            .into_iter()
            .chain(task::sorted_vars(&self.crit_vs))
            .map(|(_, t)| t)
            .collect()
    }

    fn buffers(&self) -> Vec<Tensor> {
        task::buffers(&self.vs)
    }

    fn flops_per_image(&self) -> Result<Option<f64>> {
        // A text batch's work depends on its lengths: no fixed number per text.
        let Encoder::Image(net) = &self.net else {
            return Ok(None);
        };
        let f = super::utilisation::forward_flops(
            net,
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
        let at = (self.s.dev, self.s.opts.compute);
        let bs = self.s.cfg.batch_size_val;
        match &self.net {
            Encoder::Image(net) => v.run(
                net,
                self.s.cache,
                &self.s.cfg.model.preprocess(),
                at,
                bs,
                dist,
            ),
            Encoder::Text(net) => {
                let tok = self
                    .s
                    .tokenizer
                    .ok_or_else(|| Error::internal("a text network without its tokenizer"))?;
                v.run_texts(net, tok, self.s.ds, at, bs, dist)
            }
        }
    }

    fn save(&self) -> Result<TaskState> {
        let bank = self.criterion.state()?;
        let mut state = serde_json::Map::new();
        state.insert("criterion".into(), bank.meta);
        let mut rng = serde_json::Map::new();
        rng.insert("miner".into(), "rng::seeded(seed, 2^32 + step)".into());
        Ok(TaskState {
            net: task::cpu_copies(&task::sorted_vars(&self.vs)),
            criterion: task::cpu_copies(&task::sorted_vars(&self.crit_vs)),
            bank: task::cpu_copies(&bank.tensors),
            state,
            rng,
        })
    }

    fn restore(&mut self, ck: &Checkpoint) -> Result<()> {
        task::load_into(&self.vs, &ck.net, "network")?;
        task::load_into(&self.crit_vs, &ck.criterion, "loss parameters")?;
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
        let mut spec = match &self.text {
            Some(t) => {
                let text = t
                    .spec
                    .text
                    .as_ref()
                    .ok_or_else(|| Error::internal("a text model without its text section"))?;
                ModelSpec::new_text(
                    t.spec.architecture.clone(),
                    t.spec.normalise,
                    TextInput {
                        tokenizer: TOKENIZER_JSON.into(),
                        tokenizer_hash: crate::io::Fingerprint::of(self.init_tokenizer())?.hash,
                        ..text.clone()
                    },
                )?
            }
            None => ModelSpec::new(
                cfg.model.arch_spec(),
                cfg.model.normalise,
                cfg.model.preprocess(),
            )?,
        };
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
        match &self.net {
            Encoder::Image(_) => {
                Net::new(&cpu.root(), &spec.architecture, spec.normalise)?;
            }
            Encoder::Text(n) => {
                TextNet::new(&cpu.root(), &spec.architecture, n.pool, spec.normalise)?;
            }
        }
        match net {
            Some(t) => task::load_into(&cpu, t, "best checkpoint")?,
            None => cpu.copy(&self.vs)?,
        }
        model::seal_folder(&self.s.opts.out, &spec, &spec.weights, &cpu)
    }

    /// A text model carries the tokenizer it was trained with.
    fn seal_extra(&self) -> Result<Vec<crate::io::Sealed>> {
        if self.text.is_none() {
            return Ok(Vec::new());
        }
        let src = self.init_tokenizer();
        let bytes = std::fs::read(&src).map_err(|e| Error::io(&src, e))?;
        Ok(vec![crate::io::seal_bytes(
            self.s.opts.out.join(TOKENIZER_JSON),
            &bytes,
        )?])
    }
}

impl Extractor<'_> {
    /// The init text model's tokenizer file.
    fn init_tokenizer(&self) -> PathBuf {
        match &self.text {
            Some(t) => t.dir.join(
                t.spec
                    .text
                    .as_ref()
                    .map_or(TOKENIZER_JSON, |x| x.tokenizer.as_str()),
            ),
            None => PathBuf::new(),
        }
    }
}

/// Loads starting weights from a model folder or zoo key (missing entries keep their
/// initialisation and are listed).
fn load_init(vs: &nn::VarStore, dir: &Path, arch: &crate::model::ArchSpec) -> Result<()> {
    let spec = ModelSpec::read(dir)?;
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
    task::report_missing("", &mut missing, dir);
    Ok(())
}
