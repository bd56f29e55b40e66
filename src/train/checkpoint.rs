//! Checkpoints: `checkpoints/last` and `checkpoints/best`, each a folder of
//! - `model.safetensors`: the network (parameters and BatchNorm statistics), fp32;
//! - `criterion.safetensors`: the loss's own parameters (ArcFace's class matrix), if any;
//! - `optimizer.safetensors`: the optimiser's moments (`m.<param>`, `v.<param>`), if any;
//! - `bank.safetensors`: a memory-bank miner's bank tensors, if any;
//! - `state.json`: counters, the schedule and plateau state, the optimiser's step counts,
//!   the sampler state, how every generator is derived, the best value, the bank's scalars,
//!   the resolved config.
//!
//! A folder is written under a temporary name and swapped in by renames, so `last` is always
//! a complete checkpoint (after a crash between the two renames, `.last.old` is the complete
//! previous one and is used).
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
    std::fs::create_dir_all(root).at(root)?;
    let dest = root.join(name);
    // Folders of killed runs (`.<name>.<pid>-<n>.tmp`) go first.
    crate::io::remove_dead_temps(&dest);
    let tmp = crate::io::temp_path_for(&dest);
    std::fs::create_dir_all(&tmp).at(&tmp)?;
    write_tensors(&tmp, NET, &ckpt.net)?;
    write_tensors(&tmp, CRITERION, &ckpt.criterion)?;
    write_tensors(&tmp, OPTIMIZER, &ckpt.optimizer)?;
    write_tensors(&tmp, BANK, &ckpt.bank)?;
    let json =
        serde_json::to_vec_pretty(&ckpt.state).map_err(|e| Error::internal(e.to_string()))?;
    std::fs::write(tmp.join(STATE), json).at(tmp.join(STATE))?;
    for f in std::fs::read_dir(&tmp).at(&tmp)?.flatten() {
        std::fs::File::open(f.path())
            .and_then(|f| f.sync_all())
            .at(f.path())?;
    }
    let old = root.join(format!(".{name}.old"));
    if old.exists() {
        std::fs::remove_dir_all(&old).at(&old)?;
    }
    if dest.exists() {
        std::fs::rename(&dest, &old).at(&dest)?;
    }
    std::fs::rename(&tmp, &dest).at(&dest)?;
    crate::io::sync_dir(root)?;
    if old.exists() {
        std::fs::remove_dir_all(&old).at(&old)?;
    }
    Ok(())
}

/// The folder of checkpoint `name` that holds a complete checkpoint, if any.
pub fn find(root: &Path, name: &str) -> Option<PathBuf> {
    [root.join(name), root.join(format!(".{name}.old"))]
        .into_iter()
        .find(|d| d.join(STATE).is_file())
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
