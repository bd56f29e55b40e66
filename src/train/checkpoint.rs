//! Checkpoints: `checkpoints/last` and `checkpoints/best`, each a folder of
//! - `model.safetensors`: the network (parameters and BatchNorm statistics), fp32;
//! - `criterion.safetensors`: the loss's own parameters (ArcFace's class matrix), if any;
//! - `optimizer.safetensors`: the optimiser's moments (`m.<param>`, `v.<param>`), if any;
//! - `bank.safetensors`: a memory-bank miner's bank tensors, if any;
//! - `state.json`: counters, the schedule and plateau state, the optimiser's step counts,
//!   the sampler state, how every generator is derived, the best value, the bank's scalars,
//!   the resolved config.
//!
//! A folder is written under a temporary name and swapped in by renames (`io::AtomicDir`), so
//! `last` is always a complete checkpoint (after a crash between the two renames, `.last.old`
//! is the complete previous one and is used).
use crate::error::{Error, IoContext, Result};
use std::path::{Path, PathBuf};
use tch::Tensor;

pub const STATE: &str = "state.json";
pub const NET: &str = "model.safetensors";
pub const CRITERION: &str = "criterion.safetensors";
pub const OPTIMIZER: &str = "optimizer.safetensors";
pub const BANK: &str = "bank.safetensors";

/// What a checkpoint folder holds, in memory.
pub struct Checkpoint {
    pub state: serde_json::Value,
    pub net: Vec<(String, Tensor)>,
    pub criterion: Vec<(String, Tensor)>,
    pub optimizer: Vec<(String, Tensor)>,
    pub bank: Vec<(String, Tensor)>,
}

fn write_tensors(dir: &Path, name: &str, t: &[(String, Tensor)]) -> Result<()> {
    if t.is_empty() {
        return Ok(());
    }
    let named: Vec<(&str, &Tensor)> = t.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let p = dir.join(name);
    Tensor::write_safetensors(&named, &p).map_err(|e| crate::model::write_error(&p, e))
}

fn read_tensors(dir: &Path, name: &str) -> Result<Vec<(String, Tensor)>> {
    let p = dir.join(name);
    if !p.exists() {
        return Ok(Vec::new());
    }
    Tensor::read_safetensors(&p).map_err(|e| {
        Error::input(format!(
            "{}: unreadable checkpoint tensors: {e}",
            p.display()
        ))
    })
}

/// Writes `ckpt` as `root/<name>` (atomically, as the module says).
pub fn save(root: &Path, name: &str, ckpt: &Checkpoint) -> Result<()> {
    let dir = crate::io::AtomicDir::create(root.join(name))?;
    write_tensors(dir.path(), NET, &ckpt.net)?;
    write_tensors(dir.path(), CRITERION, &ckpt.criterion)?;
    write_tensors(dir.path(), OPTIMIZER, &ckpt.optimizer)?;
    write_tensors(dir.path(), BANK, &ckpt.bank)?;
    let json =
        serde_json::to_vec_pretty(&ckpt.state).map_err(|e| Error::internal(e.to_string()))?;
    let state = dir.path().join(STATE);
    std::fs::write(&state, json).at(&state)?;
    dir.persist()
}

/// The folder of checkpoint `name` that holds a complete checkpoint, if any.
pub fn find(root: &Path, name: &str) -> Option<PathBuf> {
    let dest = root.join(name);
    let old = crate::io::AtomicDir::old_path(&dest);
    [dest, old].into_iter().find(|d| d.join(STATE).is_file())
}

pub fn load(dir: &Path) -> Result<Checkpoint> {
    let sp = dir.join(STATE);
    let text = std::fs::read(&sp).at(&sp)?;
    let state: serde_json::Value = serde_json::from_slice(&text).map_err(|e| {
        Error::input(format!(
            "{}: not a simile checkpoint state: {e}",
            sp.display()
        ))
    })?;
    if state.get("simile_checkpoint").and_then(|v| v.as_u64()) != Some(1) {
        return Err(Error::input(format!(
            "{}: not a simile checkpoint (format 1)",
            sp.display()
        )));
    }
    Ok(Checkpoint {
        state,
        net: read_tensors(dir, NET)?,
        criterion: read_tensors(dir, CRITERION)?,
        optimizer: read_tensors(dir, OPTIMIZER)?,
        bank: read_tensors(dir, BANK)?,
    })
}
