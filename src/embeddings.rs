//! Embeddings artifacts: `emb.npy` ([M, D] float32/float16) with `emb.ids.npy` (int64 dataset
//! ids, in id order) and, when rows were left out, `emb.skipped.tsv`; joining shard parts into
//! one file.
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
    /// Rows the parts left out (unreadable images), listed in `skipped_list`.
    pub skipped: usize,
    pub skipped_list: Option<PathBuf>,
}

/// `<stem>.skipped.tsv` beside an embeddings file: the rows `--on-bad-image skip` left out.
pub fn skipped_path(emb: &Path) -> PathBuf {
    let stem = emb
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    emb.with_file_name(format!("{stem}.skipped.tsv"))
}

/// The header line of a `.skipped.tsv` file.
pub const SKIPPED_HEADER: &str = "id\tpath\treason";

/// Writes `<stem>.skipped.tsv` for `emb` from `(id, path, reason)` rows, or removes a stale
/// one when nothing was skipped. Returns its path when written.
pub fn write_skipped(emb: &Path, rows: &[(i64, String, String)]) -> Result<Option<PathBuf>> {
    // One row per line whatever the path or message holds.
    let clean = |s: &str| s.replace(['\t', '\n', '\r'], " ");
    let lines: Vec<String> = rows
        .iter()
        .map(|(id, p, why)| format!("{id}\t{}\t{}", clean(p), clean(why)))
        .collect();
    write_skipped_lines(emb, &lines)
}

fn write_skipped_lines(emb: &Path, lines: &[String]) -> Result<Option<PathBuf>> {
    let path = skipped_path(emb);
    if lines.is_empty() {
        if path.exists() {
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        }
        return Ok(None);
    }
    let mut text = format!("{SKIPPED_HEADER}\n");
    for l in lines {
        text.push_str(l);
        text.push('\n');
    }
    crate::io::atomic_write_bytes(&path, text.as_bytes())?;
    Ok(Some(path))
}

/// Reads a part's `.skipped.tsv`: (id, line) for each data line, after checking the header.
fn read_skipped(path: &Path) -> Result<Vec<(i64, String)>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut lines = text.lines();
    if lines.next() != Some(SKIPPED_HEADER) {
        return Err(Error::input(format!(
            "{}: line 1: expected the header '{}'",
            path.display(),
            SKIPPED_HEADER.replace('\t', "<tab>")
        )));
    }
    let mut out = Vec::new();
    for (i, line) in lines.enumerate() {
        let id = line
            .split('\t')
            .next()
            .and_then(|s| s.parse::<i64>().ok())
            .ok_or_else(|| {
                Error::input(format!(
                    "{}: line {}, column id: expected an integer id",
                    path.display(),
                    i + 2
                ))
            })?;
        out.push((id, line.to_string()));
    }
    Ok(out)
}

/// Joins the parts of `out` (found beside it, or `given`) into `out`, its ids file and, when
/// parts left rows out, its `.skipped.tsv`, after checking they are exactly parts 0..n-1 of
/// one run (see `shard::validate`).
pub fn merge_parts(out: &Path, given: &[PathBuf]) -> Result<MergeSummary> {
    let paths = shard::discover(out, given)?;
    let parts = shard::validate(&paths)?;
    let first = &parts.manifests[0];
    let mut m = ManifestBuilder::new(&first.stage, first.params.clone());
    for (role, rec) in &first.inputs {
        m.input_record(role, rec.clone());
    }
    let ids_out = npy::ids_path(out);
    m.companion(&ids_out);
    m.skip_if_done(out)?;
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
    // The parts' skipped rows, joined in part (hence id) order. A part whose manifest counts
    // skipped rows must still have its list.
    let mut skipped_lines = Vec::new();
    for (p, man) in parts.paths.iter().zip(&parts.manifests) {
        let sp = skipped_path(p);
        let expected = man.rows.get("skipped").copied().unwrap_or(0) as usize;
        let lines = if sp.exists() {
            read_skipped(&sp)?
        } else {
            Vec::new()
        };
        if lines.len() != expected {
            return Err(Error::input(format!(
                "{}: its manifest counts {expected} skipped rows but {} lists {}",
                p.display(),
                sp.display(),
                lines.len()
            )));
        }
        if let Some((id, _)) = lines.iter().find(|(id, _)| ids.binary_search(id).is_ok()) {
            return Err(Error::input(format!(
                "{}: id {id} is listed as skipped but has an embedding",
                sp.display()
            )));
        }
        skipped_lines.extend(lines);
    }
    let dim = arrays[0].cols();
    let rows = ids.len();
    let mut w = NpyWriter::create(out, arrays[0].dtype, &[rows, dim])?;
    for a in &arrays {
        w.write_raw(a.data())?;
    }
    npy::write_i64(&ids_out, &ids)?;
    let lines: Vec<String> = skipped_lines.into_iter().map(|(_, l)| l).collect();
    let skipped_list = write_skipped_lines(out, &lines)?;
    w.finish()?;
    m.rows("rows", rows as u64)
        .rows("skipped", lines.len() as u64);
    if let Some(s) = &skipped_list {
        m.companion(s);
    }
    m.write(out)?;
    Ok(MergeSummary {
        parts: parts.count,
        rows,
        dim,
        skipped: lines.len(),
        skipped_list,
    })
}
