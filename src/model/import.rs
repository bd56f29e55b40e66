//! Bringing weights from PyTorch into model folders.
//!
//! A state dict (`.safetensors` read directly; `.pth`/`.pt`/`.ckpt` pickles read through
//! the torch Python, see `to_safetensors.py`) is matched to one of simile's architectures the
//! way OML's checkpoint loader does: the prefix before a trial key (`layer4.0.conv1.weight`
//! for ResNet, `norm.bias` for ViT) is stripped (`model.`, `module.`, `backbone.` ...), entries
//! outside that prefix (a loss's `criterion.weight`, an ArcFace head) and entries the
//! architecture does not have (torchvision's `fc`, timm's `head`, BN's `num_batches_tracked`)
//! are dropped and listed; every parameter of the architecture must be found, with its shape.
//! A TorchScript file is copied as is, with the preprocessing given by the user.
use super::{ModelSpec, TORCHSCRIPT};
use crate::error::{Error, IoContext, Result};
use crate::image::Preprocess;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use tch::{nn, Device, Kind, Tensor};

/// What an import did with the checkpoint's entries.
#[derive(Debug, Default)]
pub struct ImportReport {
    /// The prefix stripped from every name ("" when none).
    pub prefix: String,
    pub loaded: usize,
    /// Entries left out, with the reason.
    pub dropped: Vec<String>,
}

/// Reads every tensor of a checkpoint file.
pub fn read_checkpoint(path: &Path) -> Result<Vec<(String, Tensor)>> {
    if !path.is_file() {
        return Err(Error::input(format!("{}: no such file", path.display())));
    }
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if ext == "safetensors" {
        return Tensor::read_safetensors(path).map_err(|e| {
            Error::input(format!(
                "{}: not a readable safetensors file: {e}",
                path.display()
            ))
        });
    }
    let tmp = tempfile::Builder::new()
        .suffix(".safetensors")
        .tempfile()
        .map_err(|e| Error::io(std::env::temp_dir(), e))?;
    super::run_python(
        include_str!("to_safetensors.py"),
        &[path.as_os_str(), tmp.path().as_os_str()],
    )
    .map_err(|e| {
        Error::input(format!(
            "{}: cannot read this checkpoint: {e}",
            path.display()
        ))
    })?;
    Tensor::read_safetensors(tmp.path()).map_err(Error::from)
}

/// Loads `tensors` into the variables of `vs` (built for an architecture whose trial key is
/// `trial`), stripping the prefix and dropping what does not belong.
pub fn load_into(
    vs: &nn::VarStore,
    tensors: Vec<(String, Tensor)>,
    trial: &str,
    source: &Path,
) -> Result<ImportReport> {
    let prefix = tensors
        .iter()
        .filter_map(|(k, _)| k.strip_suffix(trial))
        .filter(|p| p.is_empty() || p.ends_with('.'))
        .min_by_key(|p| p.len())
        .map(str::to_string)
        .ok_or_else(|| {
            Error::input(format!(
                "{}: no entry named like '{trial}': not a checkpoint of this architecture (first names: {})",
                source.display(),
                tensors.iter().take(5).map(|(k, _)| k.as_str()).collect::<Vec<_>>().join(", ")
            ))
        })?;
    let mut report = ImportReport {
        prefix: prefix.clone(),
        ..Default::default()
    };
    let mut by_name: HashMap<String, Tensor> = HashMap::new();
    for (k, t) in tensors {
        match k.strip_prefix(&prefix) {
            Some(rest) => {
                by_name.insert(rest.to_string(), t);
            }
            None => report
                .dropped
                .push(format!("{k} (outside the model's prefix '{prefix}')")),
        }
    }
    let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    let mut missing = Vec::new();
    let mut shape_errors = Vec::new();
    for (name, var) in &vars {
        match by_name.remove(name) {
            Some(src) if src.size() == var.size() => {
                tch::no_grad(|| {
                    let mut v = var.shallow_clone();
                    v.copy_(&src.to_kind(var.kind()).to_device(var.device()))
                });
                report.loaded += 1;
            }
            Some(src) => shape_errors.push(format!(
                "{prefix}{name}: shape {:?}, the architecture needs {:?}",
                src.size(),
                var.size()
            )),
            None => missing.push(format!("{prefix}{name}")),
        }
    }
    if !missing.is_empty() || !shape_errors.is_empty() {
        let mut lines = vec![format!(
            "{}: does not fit the architecture ({} parameters missing, {} of the wrong shape)",
            source.display(),
            missing.len(),
            shape_errors.len()
        )];
        lines.extend(shape_errors);
        lines.extend(missing.iter().take(20).map(|m| format!("missing: {m}")));
        if missing.len() > 20 {
            lines.push(format!("... and {} more missing", missing.len() - 20));
        }
        return Err(Error::InputMany(lines));
    }
    // BatchNorm's step counter is training state, not a weight: left out without a mention.
    let mut rest: Vec<String> = by_name
        .into_keys()
        .filter(|k| !k.ends_with("num_batches_tracked"))
        .collect();
    rest.sort();
    report.dropped.extend(
        rest.into_iter()
            .map(|k| format!("{prefix}{k} (not a parameter of the architecture)")),
    );
    Ok(report)
}

/// Writes a model folder from a PyTorch state dict for one of simile's architectures.
pub fn import_state_dict(
    checkpoint: &Path,
    mut spec: ModelSpec,
    out: &Path,
) -> Result<ImportReport> {
    crate::io::create_folder(out, "--out")?;
    crate::manifest::refuse_overlap(
        &[("checkpoint", checkpoint)],
        &[&out.join(&spec.weights), &out.join(super::MODEL_JSON)],
    )?;
    let tensors = read_checkpoint(checkpoint)?;
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    super::Net::new(&vs.root(), &spec.architecture, spec.normalise)?;
    let report = load_into(&vs, tensors, spec.architecture.trial_key(), checkpoint)?;
    let fp = crate::io::Fingerprint::of(checkpoint)?;
    spec.provenance = serde_json::json!({
        "import": {
            "source": crate::dataset::absolute(checkpoint).display().to_string(),
            "source_fingerprint": fp,
            "prefix_stripped": report.prefix,
            "dropped": report.dropped,
        },
        "simile_version": crate::manifest::VERSION,
        "commit": crate::manifest::COMMIT,
    });
    let f = super::seal_folder(out, &spec, &spec.weights, &vs)?;
    super::commit_folder(import_manifest(checkpoint, out, &spec)?, f, Vec::new())?;
    Ok(report)
}

/// Writes a model folder around a TorchScript file; the embedding size is found by running it
/// once on a zero image of the given input size.
pub fn import_torchscript(
    file: &Path,
    input: Preprocess,
    normalise: bool,
    out: &Path,
) -> Result<ModelSpec> {
    input.validate()?;
    crate::io::create_folder(out, "--out")?;
    let m = tch::CModule::load(file).map_err(|e| {
        Error::input(format!(
            "{}: not a loadable TorchScript file: {e}",
            file.display()
        ))
    })?;
    let s = input.size as i64;
    let y =
        tch::no_grad(|| m.forward_ts(&[Tensor::zeros([2, 3, s, s], (Kind::Float, Device::Cpu))]))
            .map_err(|e| {
            Error::input(format!(
                "{}: running it on a [2, 3, {s}, {s}] batch failed: {e}",
                file.display()
            ))
        })?;
    if y.dim() != 2 || y.size()[0] != 2 {
        return Err(Error::input(format!(
            "{}: returns shape {:?} for a batch of 2; an extractor returns [batch, dim]",
            file.display(),
            y.size()
        )));
    }
    crate::manifest::refuse_overlap(
        &[("TorchScript file", file)],
        &[&out.join(TORCHSCRIPT), &out.join(super::MODEL_JSON)],
    )?;
    crate::io::create_folder(out, "--out")?;
    let bytes = std::fs::read(file).at(file)?;
    let weights = crate::io::seal_bytes(out.join(TORCHSCRIPT), &bytes)?;
    let fp = crate::io::Fingerprint::of(file)?;
    let spec = ModelSpec {
        simile_model: super::FORMAT_VERSION,
        kind: super::ModelKind::Extractor,
        architecture: super::ArchSpec::new("torchscript"),
        embedding_dim: y.size()[1],
        normalise,
        input,
        text: None,
        weights: TORCHSCRIPT.into(),
        head: None,
        provenance: serde_json::json!({
            "import": {
                "source": crate::dataset::absolute(file).display().to_string(),
                "source_fingerprint": fp,
                "format": "torchscript",
            },
            "simile_version": crate::manifest::VERSION,
            "commit": crate::manifest::COMMIT,
        }),
    };
    let json = serde_json::to_vec_pretty(&spec).map_err(|e| Error::internal(e.to_string()))?;
    let f = super::SealedFolder {
        weights,
        json: crate::io::seal_bytes(out.join(super::MODEL_JSON), &json)?,
    };
    super::commit_folder(import_manifest(file, out, &spec)?, f, Vec::new())?;
    Ok(spec)
}

/// `simile-embed import --hf`'s choices; `None`: what the folder's sentence-transformers
/// files say (`sentence_bert_config.json`'s `max_seq_length`, `1_Pooling/config.json`'s mode,
/// a `Normalize` module in `modules.json`), else mean pooling, 512 tokens (at most the
/// position table), no normalisation.
#[derive(Clone, Debug, Default)]
pub struct HfTextOptions {
    pub pooling: Option<super::bert::TextPool>,
    pub max_length: Option<usize>,
    pub normalise: Option<bool>,
}

/// A HuggingFace BERT folder read into a model: its spec, weights, tokenizer file.
pub struct HfText {
    pub spec: ModelSpec,
    pub vs: nn::VarStore,
    pub tokenizer: std::path::PathBuf,
    pub weights: std::path::PathBuf,
    pub report: ImportReport,
}

/// Reads a HuggingFace-format BERT folder (`config.json`, `model.safetensors` or
/// `pytorch_model.bin`, `tokenizer.json`).
pub fn read_hf_text(src: &Path, o: &HfTextOptions) -> Result<HfText> {
    use super::bert::{self, BertConfig, TextPool};
    if !src.is_dir() {
        return Err(Error::input(format!(
            "--hf {}: not a folder (a HuggingFace model folder holds config.json, model.safetensors and tokenizer.json)",
            src.display()
        )));
    }
    let cfg = BertConfig::from_hf_json(&src.join("config.json"))?;
    let weights = ["model.safetensors", "pytorch_model.bin"]
        .iter()
        .map(|f| src.join(f))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::input(format!(
                "{}: no model.safetensors or pytorch_model.bin",
                src.display()
            ))
        })?;
    let tokenizer = src.join(crate::tokenize::TOKENIZER_JSON);
    if !tokenizer.is_file() {
        return Err(Error::input(format!(
            "{}: no tokenizer.json (simile reads HuggingFace fast tokenizers; write one with AutoTokenizer.from_pretrained(folder).save_pretrained(folder))",
            src.display()
        )));
    }
    let json = |p: &Path| -> Option<serde_json::Value> {
        serde_json::from_slice(&std::fs::read(p).ok()?).ok()
    };
    let st_max = json(&src.join("sentence_bert_config.json"))
        .and_then(|v| v.get("max_seq_length")?.as_u64())
        .map(|v| v as usize);
    let st_pool = json(&src.join("1_Pooling").join("config.json")).and_then(|v| {
        if v.get("pooling_mode_cls_token")?.as_bool()? {
            Some(TextPool::Cls)
        } else if v.get("pooling_mode_mean_tokens")?.as_bool()? {
            Some(TextPool::Mean)
        } else {
            None
        }
    });
    let st_norm = json(&src.join("modules.json")).map(|v| {
        v.as_array().is_some_and(|a| {
            a.iter().any(|m| {
                m.get("type")
                    .and_then(|t| t.as_str())
                    .is_some_and(|t| t.ends_with("Normalize"))
            })
        })
    });
    let positions = cfg.max_position_embeddings as usize;
    let max_length = o
        .max_length
        .or(st_max)
        .unwrap_or(512)
        .min(if o.max_length.is_some() {
            usize::MAX
        } else {
            positions
        });
    if !(3..=positions).contains(&max_length) {
        return Err(Error::input(format!(
            "--max-length {max_length}: must be 3 to the model's max_position_embeddings, {positions}"
        )));
    }
    let tok = crate::tokenize::TextTokenizer::load(&tokenizer, max_length)?;
    bert::check_vocab(&tok, &cfg, &tokenizer)?;
    let mut arch = super::ArchSpec::new("bert");
    arch.bert = Some(cfg);
    let text = super::TextInput {
        tokenizer: crate::tokenize::TOKENIZER_JSON.into(),
        tokenizer_hash: crate::io::Fingerprint::of(&tokenizer)?.hash,
        max_length,
        pooling: o.pooling.or(st_pool).unwrap_or_default(),
    };
    let mut spec = ModelSpec::new_text(arch, o.normalise.or(st_norm).unwrap_or(false), text)?;
    // Old BERT checkpoints name LayerNorm's parameters gamma and beta.
    let tensors: Vec<(String, Tensor)> = read_checkpoint(&weights)?
        .into_iter()
        .map(|(k, t)| {
            let k = match (
                k.strip_suffix("LayerNorm.gamma"),
                k.strip_suffix("LayerNorm.beta"),
            ) {
                (Some(p), _) => format!("{p}LayerNorm.weight"),
                (_, Some(p)) => format!("{p}LayerNorm.bias"),
                _ => k,
            };
            (k, t)
        })
        .collect();
    let vs = nn::VarStore::new(Device::Cpu);
    let text_spec = spec.text.as_ref().expect("set above");
    bert::TextNet::new(
        &vs.root(),
        &spec.architecture,
        text_spec.pooling,
        spec.normalise,
    )?;
    let mut report = load_into(&vs, tensors, spec.architecture.trial_key(), &weights)?;
    // position_ids is a buffer HuggingFace saves; the pooler is pretraining's head.
    report
        .dropped
        .retain(|d| !d.contains("position_ids") && !d.contains("pooler."));
    spec.provenance = serde_json::json!({
        "import": {
            "source": crate::dataset::absolute(src).display().to_string(),
            "weights_fingerprint": crate::io::Fingerprint::of(&weights)?,
            "format": "huggingface",
            "prefix_stripped": report.prefix,
            "dropped": report.dropped,
        },
        "simile_version": crate::manifest::VERSION,
        "commit": crate::manifest::COMMIT,
    });
    Ok(HfText {
        spec,
        vs,
        tokenizer,
        weights,
        report,
    })
}

/// Writes a text model folder (`model.json`, `model.safetensors`, `tokenizer.json`) from a
/// HuggingFace BERT folder, with its manifest.
pub fn import_hf_text(src: &Path, o: &HfTextOptions, out: &Path) -> Result<HfText> {
    let tok_dest = out.join(crate::tokenize::TOKENIZER_JSON);
    crate::manifest::refuse_overlap(
        &[("HuggingFace folder", src)],
        &[
            &out.join(super::WEIGHTS),
            &out.join(super::MODEL_JSON),
            &tok_dest,
        ],
    )?;
    // Read and checked before the folder exists: a refused import leaves nothing behind.
    let h = read_hf_text(src, o)?;
    crate::io::create_folder(out, "--out")?;
    let tok = crate::io::seal_bytes(&tok_dest, &std::fs::read(&h.tokenizer).at(&h.tokenizer)?)?;
    let f = super::seal_folder(out, &h.spec, &h.spec.weights, &h.vs)?;
    let mut m = import_manifest(&h.weights, out, &h.spec)?;
    m.input("tokenizer", &h.tokenizer)?;
    m.companion(&tok_dest);
    super::commit_folder(m, f, vec![tok])?;
    Ok(h)
}

/// Writes a text model folder without a manifest (a zoo model built in a temporary folder):
/// tokenizer and weights first, `model.json` last.
pub fn save_hf_text(h: &HfText, out: &Path) -> Result<()> {
    let tok = &h.tokenizer;
    crate::io::seal_bytes(
        out.join(crate::tokenize::TOKENIZER_JSON),
        &std::fs::read(tok).at(tok)?,
    )?
    .persist()?;
    super::save_folder(out, &h.spec, &h.vs)
}

/// The manifest of an imported model folder (stage `import`): its source file and spec.
fn import_manifest(
    source: &Path,
    out: &Path,
    spec: &ModelSpec,
) -> Result<crate::manifest::ManifestBuilder> {
    let mut m = crate::manifest::ManifestBuilder::new(
        "import",
        serde_json::json!({
            "architecture": spec.architecture,
            "normalise": spec.normalise,
            "input": spec.input,
            "text": spec.text,
        }),
    );
    m.input("source", source)?;
    m.companion(&out.join(super::MODEL_JSON));
    m.refuse_overlap(&out.join(&spec.weights))?;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ArchSpec, Net};

    #[test]
    fn strips_prefix_and_drops_heads() {
        let dir = tempfile::tempdir().unwrap();
        let src = nn::VarStore::new(Device::Cpu);
        Net::new(&(src.root() / "model"), &ArchSpec::new("smallcnn"), false).unwrap();
        let mut tensors: Vec<(String, Tensor)> = src
            .variables()
            .into_iter()
            .map(|(k, v)| (k, v.detach().copy()))
            .collect();
        tensors.push((
            "criterion.weight".into(),
            Tensor::zeros([10, 256], (Kind::Float, Device::Cpu)),
        ));
        tensors.push((
            "model.fc.weight".into(),
            Tensor::zeros([3], (Kind::Float, Device::Cpu)),
        ));
        let dst = nn::VarStore::new(Device::Cpu);
        Net::new(&dst.root(), &ArchSpec::new("smallcnn"), false).unwrap();
        let r = load_into(&dst, tensors, "blocks.3.conv.weight", Path::new("x.ckpt")).unwrap();
        assert_eq!(r.prefix, "model.");
        assert_eq!(r.dropped.len(), 2, "{:?}", r.dropped);
        let a = src.variables()["model.blocks.0.conv.weight"].shallow_clone();
        let b = dst.variables()["blocks.0.conv.weight"].shallow_clone();
        assert!(a.equal(&b));
        // A checkpoint of another architecture names what is missing.
        let other = nn::VarStore::new(Device::Cpu);
        Net::new(&other.root(), &ArchSpec::new("resnet18"), false).unwrap();
        let t: Vec<(String, Tensor)> = src.variables().into_iter().collect();
        let e = load_into(&other, t, "layer4.0.conv1.weight", Path::new("x.ckpt")).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let _ = dir;
    }
}
