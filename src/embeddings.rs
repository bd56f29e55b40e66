//! Embeddings artifacts: `emb.npy` ([M, D] float32/float16) with `emb.ids.npy` (int64 dataset
//! ids, in id order), and joining shard parts into one file.
use crate::error::{Error, Result};
use crate::manifest::ManifestBuilder;
use crate::npy::{self, Npy, NpyWriter};
use crate::shard;
use std::path::{Path, PathBuf};

/// What a merge produced.
#[derive(Debug)]
pub struct MergeSummary {
    pub parts: usize,
    pub rows: usize,
    pub dim: usize,
}

/// Joins the parts of `out` (found beside it, or `given`) into `out` and its ids file, after
/// checking they are exactly parts 0..n-1 of one run (see `shard::validate`).
pub fn merge_parts(out: &Path, given: &[PathBuf]) -> Result<MergeSummary> {
    let paths = shard::discover(out, given)?;
    let parts = shard::validate(&paths)?;
    let mut arrays = Vec::new();
    let mut ids = Vec::new();
    for p in &parts.paths {
        let a = Npy::open(p)?;
        a.expect_matrix()?;
        let pid = Npy::open(npy::ids_path(p))?.to_i64_vec()?;
        if pid.len() != a.rows() {
            return Err(Error::input(format!(
                "{}: {} rows but its ids file has {}",
                p.display(),
                a.rows(),
                pid.len()
            )));
        }
        if let Some(first) = arrays.first() {
            let first: &Npy = first;
            if a.cols() != first.cols() || a.dtype != first.dtype {
                return Err(Error::input(format!(
                    "{}: shape [.., {}] {:?} differs from {}: [.., {}] {:?}",
                    p.display(),
                    a.cols(),
                    a.dtype,
                    first.path().display(),
                    first.cols(),
                    first.dtype
                )));
            }
        }
        ids.extend(pid);
        arrays.push(a);
    }
    if let Some(w) = ids.windows(2).position(|w| w[0] >= w[1]) {
        return Err(Error::input(format!(
            "the parts' ids are not strictly increasing (id {} follows {}): parts overlap",
            ids[w + 1],
            ids[w]
        )));
    }
    let dim = arrays[0].cols();
    let rows = ids.len();
    let mut w = NpyWriter::create(out, arrays[0].dtype, &[rows, dim])?;
    for a in &arrays {
        w.write_raw(a.data())?;
    }
    let ids_out = npy::ids_path(out);
    npy::write_i64(&ids_out, &ids)?;
    w.finish()?;
    let first = &parts.manifests[0];
    let mut m = ManifestBuilder::new(&first.stage, first.params.clone());
    for (role, rec) in &first.inputs {
        m.input_record(role, rec.clone());
    }
    m.rows("rows", rows as u64).companion(&ids_out);
    m.write(out)?;
    Ok(MergeSummary {
        parts: parts.count,
        rows,
        dim,
    })
}
