//! Embeddings artifacts: `emb.npy` ([M, D] float32/float16) with `emb.ids.npy` (int64 dataset
//! ids, in id order) and, when rows were left out, `emb.skipped.tsv`; joining shard parts into
//! one file.
use crate::dataset::{Dataset, Split};
use crate::error::{Error, Result};
use crate::io::Sealed;
use crate::manifest::ManifestBuilder;
use crate::npy::{self, Npy, NpyWriter};
use crate::shard;
use std::path::{Path, PathBuf};

/// Opens an embeddings file, the one way every stage reads one (distance, rerank, score): a complete (merged) float matrix of dimension > 0,
/// whose set (with `emb.ids.npy`) matches its manifest and was made from `dataset`.
pub fn open(path: &Path, dataset: &Path) -> Result<Npy> {
    let n = open_matrix(path)?;
    crate::parts::refuse_part(path)?;
    crate::manifest::check_upstream(path, "dataset", dataset)?;
    Ok(n)
}

/// A complete (not a shard part) float matrix of dimension > 0; its manifest is checked by
/// the caller (whole, or in the ranges it reads).
pub fn open_matrix(path: &Path) -> Result<Npy> {
    if let Some((i, n)) = shard::part_of_name(path) {
        return Err(Error::input(format!(
            "{} is shard part {i} of {n}, not a complete result; join the parts first with the stage's `merge` subcommand",
            path.display()
        )));
    }
    let n = Npy::open(path)?;
    n.expect_matrix()?;
    if n.cols() == 0 {
        return Err(Error::input(format!(
            "{}: embeddings of dimension 0",
            path.display()
        )));
    }
    Ok(n)
}

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

use crate::npy::skipped_path;

/// The header line of a `.skipped.tsv` file.
pub const SKIPPED_HEADER: &str = "id\tpath\treason";

/// `<stem>.skipped.tsv` for `emb` from `(id, path, reason)` rows, sealed for its set, or
/// `None` when nothing was skipped (the set's commit then removes an earlier list).
pub fn seal_skipped(emb: &Path, rows: &[(i64, String, String)]) -> Result<Option<Sealed>> {
    // One row per line whatever the path or message holds.
    let clean = |s: &str| s.replace(['\t', '\n', '\r'], " ");
    let lines: Vec<String> = rows
        .iter()
        .map(|(id, p, why)| format!("{id}\t{}\t{}", clean(p), clean(why)))
        .collect();
    seal_skipped_lines(emb, &lines)
}

fn seal_skipped_lines(emb: &Path, lines: &[String]) -> Result<Option<Sealed>> {
    if lines.is_empty() {
        return Ok(None);
    }
    let mut text = format!("{SKIPPED_HEADER}\n");
    for l in lines {
        text.push_str(l);
        text.push('\n');
    }
    Ok(Some(crate::io::seal_bytes(
        skipped_path(emb),
        text.as_bytes(),
    )?))
}

/// The rows `simile-embed --on-bad-image skip` left out of `emb` (its `.skipped.tsv`, if any):
/// (id, the list's line).
pub fn skipped_rows(emb: &Path) -> Result<Vec<(i64, String)>> {
    let p = skipped_path(emb);
    if p.is_file() {
        read_skipped(&p)
    } else {
        Ok(Vec::new())
    }
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
/// one run (see `parts::validate`).
pub fn merge_parts(out: &Path, given: &[PathBuf]) -> Result<MergeSummary> {
    let paths = shard::discover(out, given)?;
    let parts = crate::parts::validate(&paths)?;
    let first = &parts.manifests[0];
    let mut m = ManifestBuilder::new(&first.stage, first.params.clone());
    for (role, rec) in parts.merged_inputs()? {
        m.input_record(&role, rec);
    }
    let ids_out = npy::ids_path(out);
    m.companion(&ids_out);
    m.optional_companion(&skipped_path(out));
    for p in &parts.paths {
        m.reads("a part", p);
    }
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
    let mut sealed = vec![npy::seal_i64(&ids_out, &ids)?];
    let lines: Vec<String> = skipped_lines.into_iter().map(|(_, l)| l).collect();
    let skipped = seal_skipped_lines(out, &lines)?;
    let skipped_list = skipped.as_ref().map(|s| s.dest().to_path_buf());
    sealed.extend(skipped);
    m.rows("rows", rows as u64)
        .rows("skipped", lines.len() as u64);
    m.commit(w.seal()?, sealed)?;
    Ok(MergeSummary {
        parts: parts.count,
        rows,
        dim,
        skipped: lines.len(),
        skipped_list,
    })
}

/// The `.npy` row of every dataset row of `ds` (`usize::MAX` where it has none): the one rule
/// every reader of an embeddings file follows. With `<stem>.ids.npy` beside it, its ids say
/// (each must be a dataset id, and appear once); without, the rows must be those of `split` in
/// id order, or of the whole dataset.
pub fn rows_of_dataset(
    ds: &Dataset,
    ds_path: &Path,
    emb: &Npy,
    emb_path: &Path,
    split: Option<Split>,
) -> Result<Vec<usize>> {
    let m = emb.rows();
    let mut of_row = vec![usize::MAX; ds.len()];
    let ids_path = npy::ids_path(emb_path);
    if ids_path.exists() {
        let ids = Npy::open(&ids_path)?.to_i64_vec()?;
        if ids.len() != m {
            return Err(Error::input(format!(
                "{}: {} ids, but {} has {m} rows; they must match row for row",
                ids_path.display(),
                ids.len(),
                emb_path.display()
            )));
        }
        for (e, &id) in ids.iter().enumerate() {
            let r = ds.position_of(id).ok_or_else(|| {
                Error::input(format!(
                    "{}: row {e}: id {id} is not in {}; were these embeddings made from another dataset?",
                    ids_path.display(),
                    ds_path.display()
                ))
            })?;
            if of_row[r] != usize::MAX {
                return Err(Error::input(format!(
                    "{}: row {e}: id {id} appears twice (first at row {})",
                    ids_path.display(),
                    of_row[r]
                )));
            }
            of_row[r] = e;
        }
        return Ok(of_row);
    }
    let split_rows = split.map(|s| ds.rows_of_split(s));
    match &split_rows {
        Some(rows) if rows.len() == m => {
            for (e, &r) in rows.iter().enumerate() {
                of_row[r] = e;
            }
        }
        _ if ds.len() == m => {
            for (r, v) in of_row.iter_mut().enumerate() {
                *v = r;
            }
        }
        _ => {
            let expected = match (&split_rows, split) {
                (Some(rows), Some(s)) => format!(
                    "{} (the rows of split '{s}', in id order) or {} (all rows of {})",
                    rows.len(),
                    ds.len(),
                    ds_path.display()
                ),
                _ => format!("{} (all rows of {})", ds.len(), ds_path.display()),
            };
            return Err(Error::input(format!(
                "{}: {m} rows and no {} beside it to say which ids they are; expected {expected}",
                emb_path.display(),
                ids_path.display()
            )));
        }
    }
    Ok(of_row)
}

/// The dataset ids of an embeddings file's rows, for finding the row of an id: `<stem>.ids.npy`
/// memory-mapped and searched in place when its ids are sorted and unique (every file simile
/// writes), so a reader that needs a few rows of a large file holds none of the others in
/// memory; an unsorted file (another program's) is indexed in memory, duplicates refused.
pub struct IdRows {
    ids: Npy,
    index: Option<std::collections::HashMap<i64, usize>>,
}

impl IdRows {
    /// Opens the ids file beside `emb` (`None` when there is none), checking it has one id per
    /// row of `emb` and no id twice.
    pub fn open(emb: &Npy) -> Result<Option<IdRows>> {
        let path = npy::ids_path(emb.path());
        if !path.exists() {
            return Ok(None);
        }
        let ids = Npy::open(&path)?;
        if ids.dtype != npy::DType::I64 || ids.shape.len() != 1 {
            return Err(Error::input(format!(
                "{}: expected a 1-d int64 array of ids, found dtype {} with shape {:?}",
                path.display(),
                ids.dtype.descr(),
                ids.shape
            )));
        }
        if ids.rows() != emb.rows() {
            // A set half-replaced by a killed run says so (its manifest no longer matches).
            crate::manifest::verify(emb.path())?;
            return Err(Error::input(format!(
                "{}: {} ids, but {} has {} rows; they must match row for row",
                path.display(),
                ids.rows(),
                emb.path().display(),
                emb.rows()
            )));
        }
        let mut r = IdRows { ids, index: None };
        let sorted = (1..r.len()).all(|i| r.id(i - 1) < r.id(i));
        if !sorted {
            let mut index = std::collections::HashMap::with_capacity(r.len());
            for e in 0..r.len() {
                if let Some(first) = index.insert(r.id(e), e) {
                    return Err(Error::input(format!(
                        "{}: row {e}: id {} appears twice (first at row {first})",
                        path.display(),
                        r.id(e)
                    )));
                }
            }
            r.index = Some(index);
        }
        Ok(Some(r))
    }

    pub fn len(&self) -> usize {
        self.ids.rows()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The id of row `e`.
    pub fn id(&self, e: usize) -> i64 {
        let b = &self.ids.data()[e * 8..e * 8 + 8];
        i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
    }

    /// The row of `id`, if the file lists it.
    pub fn row_of(&self, id: i64) -> Option<usize> {
        if let Some(ix) = &self.index {
            return ix.get(&id).copied();
        }
        let (mut lo, mut hi) = (0, self.len());
        while lo < hi {
            let mid = (lo + hi) / 2;
            match self.id(mid).cmp(&id) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Some(mid),
            }
        }
        None
    }

    /// The path of the ids file.
    pub fn path(&self) -> &Path {
        self.ids.path()
    }

    /// The byte offset of row `e`'s id in the file (for fingerprinting a range of it).
    pub fn byte_of(&self, e: usize) -> u64 {
        (self.ids.data_offset() + e * 8) as u64
    }
}
