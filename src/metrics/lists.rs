//! Scoring a neighbours file in one pass: row groups are decoded, checked and scored in
//! parallel, each list while its rows are still in cache.
//!
//! `neighbors::Neighbors::read` keeps every column as i64/i32/f32 vectors (24 bytes a row,
//! after a concatenated copy); scoring needs none of them after a list is scored, so memory
//! is a row group per thread plus one row of metric values per query (plus the distances,
//! only for FNMR from an exhaustive file). The file's metadata is parsed and shard parts are
//! refused by the `neighbors` and `shard` modules, as every reader does.
use super::aggregate::{eval_row, Relevance};
use super::ranking::Metric;
use crate::error::{Error, Result};
use crate::retrieval::{QueryGallery, NO_SEQUENCE};
use arrow::array::{Array, Float32Array, Int32Array, Int64Array};
use arrow::datatypes::DataType;
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder,
};
use parquet::arrow::ProjectionMask;
use rayon::prelude::*;
use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

/// Id to position, for one side's ids (sorted ascending): arithmetic when the ids are a
/// contiguous range, a dense table when they are compact, else a binary search.
pub enum IdIndex<'a> {
    Range { min: i64, len: usize },
    Dense { min: i64, table: Vec<u32> },
    Sorted(&'a [i64]),
}

impl<'a> IdIndex<'a> {
    pub fn new(ids: &'a [i64]) -> Self {
        if let (Some(&min), Some(&max)) = (ids.first(), ids.last()) {
            let span = max.wrapping_sub(min) as u64;
            if max >= min && span.checked_add(1) == Some(ids.len() as u64) {
                return IdIndex::Range {
                    min,
                    len: ids.len(),
                };
            }
            if max >= min && span < 4 * ids.len() as u64 + 1024 && ids.len() < u32::MAX as usize {
                let mut table = vec![u32::MAX; span as usize + 1];
                for (i, &id) in ids.iter().enumerate() {
                    table[(id - min) as usize] = i as u32;
                }
                return IdIndex::Dense { min, table };
            }
        }
        IdIndex::Sorted(ids)
    }

    /// Appends the positions of `ids` to `out`; on an unknown id, the index of the first.
    pub fn map_into(&self, ids: &[i64], out: &mut Vec<u32>) -> Option<usize> {
        let n0 = out.len();
        let mut bad = false;
        if let IdIndex::Range { min, len } = self {
            // Branch-free, so it vectorises: the common case of contiguous ids.
            out.extend(ids.iter().map(|&id| {
                let off = id.wrapping_sub(*min) as u64;
                bad |= off >= *len as u64;
                off as u32
            }));
        } else {
            out.extend(ids.iter().map(|&id| {
                let p = self.get(id);
                bad |= p.is_none();
                p.map_or(u32::MAX, |p| p as u32)
            }));
        }
        if !bad {
            return None;
        }
        out.truncate(n0);
        ids.iter().position(|&id| self.get(id).is_none())
    }

    #[inline]
    pub fn get(&self, id: i64) -> Option<usize> {
        match self {
            IdIndex::Range { min, len } => {
                let off = id.checked_sub(*min)?;
                (off >= 0 && (off as u64) < *len as u64).then_some(off as usize)
            }
            IdIndex::Dense { min, table } => {
                let off = id.checked_sub(*min)?;
                if off < 0 {
                    return None;
                }
                match table.get(off as usize) {
                    Some(&p) if p != u32::MAX => Some(p as usize),
                    _ => None,
                }
            }
            IdIndex::Sorted(ids) => ids.binary_search(&id).ok(),
        }
    }
}

/// Code of a missing label (gallery side) or of a query label no gallery row has.
const NO_LABEL: u32 = u32::MAX;

/// Row checks and hit flags, with a fast path that reads no per-row memory.
///
/// The exclusion rule and the positives are `QueryGallery::is_excluded`/`is_positive`; they
/// are called for every row that could be excluded or positive. A row can only be either if
/// its gallery label equals the query's, except through a sequence: an excluded row is the
/// query itself (same dataset row, so same label) or shares the query's non-missing
/// sequence. So for a query with a known label and no sequence code, a row outside the
/// gallery rows of its label is neither; those rows (a class, sorted) are small and in cache,
/// where a per-row lookup into a gallery-sized table would miss the cache on every row.
pub struct Checker<'a> {
    qg: &'a QueryGallery,
    /// Gallery positions grouped by label code (CSR): class c is
    /// `members[start[c]..start[c + 1]]`, ascending.
    start: Vec<u32>,
    members: Vec<u32>,
    qlab: Vec<u32>,
}

impl<'a> Checker<'a> {
    pub fn new(qg: &'a QueryGallery) -> Self {
        let mut codes: HashMap<i64, u32> = HashMap::new();
        let glab: Vec<u32> = qg
            .gallery
            .labels
            .iter()
            .map(|l| match l {
                Some(l) => {
                    let n = codes.len() as u32;
                    *codes.entry(*l).or_insert(n)
                }
                None => NO_LABEL,
            })
            .collect();
        let mut start = vec![0u32; codes.len() + 1];
        for &c in glab.iter().filter(|&&c| c != NO_LABEL) {
            start[c as usize + 1] += 1;
        }
        for i in 0..codes.len() {
            start[i + 1] += start[i];
        }
        let mut fill = start.clone();
        let mut members = vec![0u32; start[codes.len()] as usize];
        for (g, &c) in glab.iter().enumerate().filter(|(_, &c)| c != NO_LABEL) {
            members[fill[c as usize] as usize] = g as u32;
            fill[c as usize] += 1;
        }
        let qlab = qg
            .queries
            .labels
            .iter()
            .map(|l| l.and_then(|l| codes.get(&l).copied()).unwrap_or(NO_LABEL))
            .collect();
        Checker {
            qg,
            start,
            members,
            qlab,
        }
    }

    /// Checks one query's list (no gallery row twice, none the exclusion rule removes) and
    /// writes its hit flags.
    /// Every query's number of positives over the whole gallery (`QueryGallery::
    /// positive_counts`, in parallel): the rule applied to the gallery rows of its label.
    pub fn positive_counts(&self) -> Vec<usize> {
        let qg = self.qg;
        (0..qg.queries.len())
            .into_par_iter()
            .map(|q| {
                let ql = self.qlab[q];
                if ql == NO_LABEL {
                    return 0;
                }
                self.class(ql)
                    .iter()
                    .filter(|&&g| qg.is_positive(q, g as usize))
                    .count()
            })
            .collect()
    }

    fn class(&self, code: u32) -> &[u32] {
        &self.members[self.start[code as usize] as usize..self.start[code as usize + 1] as usize]
    }

    pub(crate) fn check(
        &self,
        q: usize,
        gs: &[u32],
        hits: &mut [bool],
        seen: &mut GallerySet,
    ) -> Result<(), String> {
        let qg = self.qg;
        let ql = self.qlab[q];
        let class: Option<&[u32]> =
            (ql != NO_LABEL && qg.queries.seq[q] == NO_SEQUENCE).then(|| self.class(ql));
        seen.fit(qg.gallery.len());
        // Marking a class costs its size; a class much larger than the list is searched.
        let marked: &[u32] = match class {
            Some(c) if c.len() <= 4 * gs.len().max(16) => c,
            _ => &[],
        };
        seen.mark_class(marked);
        let r = self.check_inner(q, gs, hits, seen, class, !marked.is_empty());
        seen.clear(gs, marked);
        r
    }

    fn check_inner(
        &self,
        q: usize,
        gs: &[u32],
        hits: &mut [bool],
        seen: &mut GallerySet,
        class: Option<&[u32]>,
        marked: bool,
    ) -> Result<(), String> {
        let qg = self.qg;
        for (i, &g) in gs.iter().enumerate() {
            if !seen.insert(g) {
                return Err(format!(
                    "query_id {}: gallery_id {} appears twice in its list",
                    qg.queries.ids[q], qg.gallery.ids[g as usize]
                ));
            }
            if let Some(class) = class {
                let same = if marked {
                    seen.in_class(g)
                } else {
                    class.binary_search(&g).is_ok()
                };
                if !same {
                    hits[i] = false;
                    continue;
                }
            }
            let g = g as usize;
            if qg.is_excluded(q, g) {
                return Err(format!(
                    "query_id {}: gallery_id {} (rank {}) is excluded for this query (itself or the same sequence); the file was made with another exclusion rule",
                    qg.queries.ids[q],
                    qg.gallery.ids[g],
                    i + 1
                ));
            }
            hits[i] = qg.is_positive(q, g);
        }
        Ok(())
    }
}

/// Two bits per gallery position: "seen in this list" for duplicate detection, and "in the
/// query's class" for the label test. A list sets its bits and clears them after, so the
/// sets are reused without being cleared whole; their accesses are predictable and, for
/// galleries up to millions, stay in the L2 cache.
#[derive(Default)]
pub(crate) struct GallerySet {
    seen: Vec<u64>,
    class: Vec<u64>,
}

impl GallerySet {
    fn fit(&mut self, n: usize) {
        let words = n.div_ceil(64);
        if self.seen.len() < words {
            self.seen.resize(words, 0);
            self.class.resize(words, 0);
        }
    }

    /// Inserts `g` into the seen set; false if it was already there.
    #[inline]
    fn insert(&mut self, g: u32) -> bool {
        let (w, b) = ((g >> 6) as usize, 1u64 << (g & 63));
        let had = self.seen[w] & b != 0;
        self.seen[w] |= b;
        !had
    }

    #[inline]
    fn in_class(&self, g: u32) -> bool {
        self.class[(g >> 6) as usize] & (1u64 << (g & 63)) != 0
    }

    fn mark_class(&mut self, members: &[u32]) {
        for &g in members {
            self.class[(g >> 6) as usize] |= 1u64 << (g & 63);
        }
    }

    /// Clears the seen bits of `gs` and the class bits of `members`.
    fn clear(&mut self, gs: &[u32], members: &[u32]) {
        for &g in gs {
            self.seen[(g >> 6) as usize] = 0;
        }
        for &g in members {
            self.class[(g >> 6) as usize] = 0;
        }
    }
}

/// What scoring needs from a neighbours file: per query, its list length and its value of
/// every metric; and, when asked, the distances of positive and negative rows.
pub struct Scan {
    pub n_retrieved: Vec<usize>,
    /// Row-major `[query][metric]`; queries without rows hold the empty-list values.
    pub values: Vec<f64>,
    pub rows: usize,
    pub pos: Vec<f32>,
    pub neg: Vec<f32>,
}

/// What to scan for.
pub struct ScanSpec<'a> {
    pub qg: &'a QueryGallery,
    /// Built once from `qg` (it also gives `n_gt`).
    pub checker: &'a Checker<'a>,
    /// How the query and gallery sets are named in messages.
    pub sides: (&'a str, &'a str),
    pub metrics: &'a [Metric],
    /// Positives of each query over the whole gallery.
    pub n_gt: &'a [usize],
    /// Keep the distances of every row (FNMR from an exhaustive file).
    pub keep_distance: bool,
}

/// OML's sortedness tolerance: a decrease smaller than 10 float32 epsilons is a tie
/// (`is_sorted_tensor`).
const SORT_TOL: f32 = 10.0 * f32::EPSILON;

/// A run of one query's rows inside a row group.
struct Run {
    q: u32,
    /// Global row of its first row.
    start: usize,
    len: usize,
    first_rank: i32,
    last_rank: i32,
    first_dist: f32,
    last_dist: f32,
    /// Set when its list may continue in a neighbouring row group: its rows are kept and
    /// the list is checked and scored after the row groups are joined.
    piece: Option<(Vec<u32>, Vec<f32>)>,
}

/// A row group's results: its runs, the values of the lists it held whole, and distances.
#[derive(Default)]
struct RgOut {
    runs: Vec<Run>,
    done_q: Vec<u32>,
    done_values: Vec<f64>,
    pos: Vec<f32>,
    neg: Vec<f32>,
}

/// A problem, with the global row it was found at, so the first one in the file is reported.
type RowError = (usize, String);

fn sorted_msg(qid: i64, rank: i32, d: f32, prev: f32) -> String {
    format!(
        "query_id {qid}: distances are not sorted ascending: {d} at rank {rank} after {prev} at rank {}",
        rank - 1
    )
}

/// Reusable buffers of one worker.
#[derive(Default)]
struct Scratch {
    hits: Vec<bool>,
    seen: GallerySet,
}

/// A worker's buffers, kept between row groups (and runs), so large allocations are not
/// returned to the system and faulted in again for every row group.
#[derive(Default)]
struct Bufs {
    gpos: Vec<u32>,
    dist: Vec<f32>,
    scratch: Scratch,
}

thread_local! {
    static BUFS: std::cell::RefCell<Bufs> = std::cell::RefCell::new(Bufs::default());
}

/// Checks one whole list, then appends its metric values to `values` and (when kept) its
/// distances to `pos`/`neg`.
#[allow(clippy::too_many_arguments)]
fn finish_list(
    spec: &ScanSpec,
    checker: &Checker,
    q: usize,
    gs: &[u32],
    ds: &[f32],
    scratch: &mut Scratch,
    values: &mut Vec<f64>,
    pos: &mut Vec<f32>,
    neg: &mut Vec<f32>,
) -> Result<(), String> {
    scratch.hits.clear();
    scratch.hits.resize(gs.len(), false);
    checker.check(q, gs, &mut scratch.hits, &mut scratch.seen)?;
    let at = values.len();
    values.resize(at + spec.metrics.len(), 0.0);
    let rel = Relevance {
        hits: &scratch.hits,
        n_gt: spec.n_gt[q],
    };
    eval_row(spec.metrics, rel, &mut values[at..]);
    for (&h, &d) in scratch.hits.iter().zip(ds) {
        if h {
            pos.push(d);
        } else {
            neg.push(d);
        }
    }
    Ok(())
}

/// What every row-group worker shares.
struct RgCtx<'a> {
    path: &'a Path,
    amd: &'a ArrowReaderMetadata,
    mask: &'a ProjectionMask,
    offsets: &'a [usize],
    spec: &'a ScanSpec<'a>,
    qidx: &'a IdIndex<'a>,
    gidx: &'a IdIndex<'a>,
    checker: &'a Checker<'a>,
}

/// Rows a batch decodes at a time: its gallery positions stay in the L2 cache until its
/// lists are scored. (Tiny in unit tests, so lists cross batch edges.)
#[cfg(not(test))]
const BATCH: usize = 1 << 16;
#[cfg(test)]
const BATCH: usize = 7;

/// Decodes, checks and scores one row group. Lists are scored batch by batch, as soon as
/// the next list starts; the row group's first list and its last may continue in the
/// neighbouring row groups, so they are returned as pieces for the join.
fn scan_row_group(ctx: &RgCtx, rg: usize, bufs: &mut Bufs) -> std::result::Result<RgOut, RowError> {
    let spec = ctx.spec;
    let Bufs {
        gpos,
        dist,
        scratch,
    } = bufs;
    gpos.clear();
    dist.clear();
    let base = ctx.offsets[rg];
    let fail = |row: usize, m: String| (base + row, m);
    let f = File::open(ctx.path).map_err(|e| fail(0, e.to_string()))?;
    let reader = ParquetRecordBatchReaderBuilder::new_with_metadata(f, ctx.amd.clone())
        .with_row_groups(vec![rg])
        .with_projection(ctx.mask.clone())
        .with_batch_size(BATCH)
        .build()
        .map_err(|e| fail(0, format!("cannot read: {e}")))?;
    let mut out = RgOut::default();
    // Rows `at..` of the row group are read; `gpos`/`dist` hold rows `buf_at..at`.
    let mut at = 0usize;
    let mut buf_at = 0usize;
    // Runs before `pending` are scored or kept as pieces.
    let mut pending = 0usize;
    for batch in reader {
        let batch = batch.map_err(|e| fail(at, format!("cannot read: {e}")))?;
        let col = |n: &str| batch.column_by_name(n).expect("projected column");
        let qc = col("query_id")
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap();
        let rc = col("rank").as_any().downcast_ref::<Int32Array>().unwrap();
        let gc = col("gallery_id")
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap();
        let dc = col("distance")
            .as_any()
            .downcast_ref::<Float32Array>()
            .unwrap();
        for (name, c) in [
            ("query_id", qc as &dyn Array),
            ("rank", rc),
            ("gallery_id", gc),
            ("distance", dc),
        ] {
            if c.null_count() > 0 {
                let r = (0..c.len()).find(|&i| c.is_null(i)).unwrap_or(0);
                return Err(fail(at + r, format!("column '{name}' is null")));
            }
        }
        let (qv, rv, gv, dv) = (qc.values(), rc.values(), gc.values(), dc.values());
        if spec.keep_distance {
            dist.extend_from_slice(dv);
        }
        if let Some(i) = ctx.gidx.map_into(gv, gpos) {
            return Err(fail(
                at + i,
                format!(
                    "gallery_id {} is not a gallery row of {}",
                    gv[i], spec.sides.1
                ),
            ));
        }
        segment(ctx, qv, rv, dv, base, at, &mut out.runs)?;
        at += qv.len();
        // Score every run but the last (it may continue in the next batch).
        let last = out.runs.len().saturating_sub(1);
        for j in pending..last {
            settle(ctx, &mut out, j, j == 0, gpos, dist, base + buf_at, scratch)?;
        }
        pending = pending.max(last);
        // Keep only the rows of the unsettled run.
        if let Some(r) = out.runs.get(pending) {
            let keep_from = r.start - base - buf_at;
            gpos.drain(..keep_from);
            if spec.keep_distance {
                dist.drain(..keep_from);
            }
            buf_at += keep_from;
        }
    }
    // The last run may continue in the next row group: a piece.
    let n_runs = out.runs.len();
    for j in pending..n_runs {
        settle(ctx, &mut out, j, true, gpos, dist, base + buf_at, scratch)?;
    }
    Ok(out)
}

/// Splits a batch into runs of one query id and checks each run's ranks and distances.
fn segment(
    ctx: &RgCtx,
    qv: &[i64],
    rv: &[i32],
    dv: &[f32],
    base: usize,
    at: usize,
    runs: &mut Vec<Run>,
) -> std::result::Result<(), RowError> {
    let spec = ctx.spec;
    let fail = |row: usize, m: String| (base + row, m);
    // The checks of a run are tight loops without data-dependent branches; a failing run
    // is searched again for the row.
    let n = qv.len();
    let mut i = 0;
    while i < n {
        let qid = qv[i];
        let mut j = i + 1;
        while j < n && qv[j] == qid {
            j += 1;
        }
        let (rs, ds) = (&rv[i..j], &dv[i..j]);
        let ranks_ok = rs.windows(2).all(|w| w[1] == w[0].wrapping_add(1));
        // NaN fails every comparison, so it fails here too.
        let dists_ok = !ds[0].is_nan() && ds.windows(2).all(|w| w[1] - w[0] >= -SORT_TOL);
        if !(ranks_ok && dists_ok) {
            for t in i..j {
                let (rank, d) = (rv[t], dv[t]);
                if d.is_nan() {
                    return Err(fail(
                        at + t,
                        format!("query_id {qid}: distance at rank {rank} is NaN"),
                    ));
                }
                if t > i && rank != rv[t - 1].wrapping_add(1) {
                    return Err(fail(at + t, rank_msg(qid, rank, rv[t - 1])));
                }
                if t > i && d - dv[t - 1] < -SORT_TOL {
                    return Err(fail(at + t, sorted_msg(qid, rank, d, dv[t - 1])));
                }
            }
        }
        let (rank, d) = (rs[0], ds[0]);
        match runs.last_mut() {
            Some(r) if spec.qg.queries.ids[r.q as usize] == qid => {
                // The same query across a batch boundary.
                if rank != r.last_rank.wrapping_add(1) {
                    return Err(fail(at + i, rank_msg(qid, rank, r.last_rank)));
                }
                if d - r.last_dist < -SORT_TOL {
                    return Err(fail(at + i, sorted_msg(qid, rank, d, r.last_dist)));
                }
                r.len += j - i;
            }
            _ => {
                let q = ctx.qidx.get(qid).ok_or_else(|| {
                    fail(
                        at + i,
                        format!("query_id {qid} is not a query of {}", spec.sides.0),
                    )
                })?;
                runs.push(Run {
                    q: q as u32,
                    start: base + at + i,
                    len: j - i,
                    first_rank: rank,
                    last_rank: rank,
                    first_dist: d,
                    last_dist: d,
                    piece: None,
                });
            }
        }
        let r = runs.last_mut().expect("pushed above");
        r.last_rank = rs[rs.len() - 1];
        r.last_dist = ds[ds.len() - 1];
        i = j;
    }
    Ok(())
}

/// Scores run `j` (whose rows start at global row `buf_row` in `gpos`/`dist`), or keeps it
/// as a piece when it may be part of a longer list.
#[allow(clippy::too_many_arguments)]
fn settle(
    ctx: &RgCtx,
    out: &mut RgOut,
    j: usize,
    edge: bool,
    gpos: &[u32],
    dist: &[f32],
    buf_row: usize,
    scratch: &mut Scratch,
) -> std::result::Result<(), RowError> {
    let r = &out.runs[j];
    let rows = r.start - buf_row..r.start - buf_row + r.len;
    let ds = if ctx.spec.keep_distance {
        &dist[rows.clone()]
    } else {
        &[][..]
    };
    if edge || r.first_rank != 1 {
        let piece = (gpos[rows].to_vec(), ds.to_vec());
        out.runs[j].piece = Some(piece);
        return Ok(());
    }
    finish_list(
        ctx.spec,
        ctx.checker,
        r.q as usize,
        &gpos[rows],
        ds,
        scratch,
        &mut out.done_values,
        &mut out.pos,
        &mut out.neg,
    )
    .map_err(|m| (r.start, m))?;
    out.done_q.push(r.q);
    Ok(())
}

fn rank_msg(qid: i64, rank: i32, prev: i32) -> String {
    format!(
        "query_id {qid} has rank {rank} after rank {prev}; rows must be sorted by query_id then rank, ranks 1, 2, 3, ..."
    )
}

/// Reads a neighbours file (its metadata already parsed and checked by the caller) and
/// scores every list. Refuses ids that are not queries or gallery rows of the sets, files
/// not sorted by query then rank, unsorted or NaN distances, a gallery row twice in a list
/// and rows the exclusion rule removes. Row groups are decoded, checked and scored in
/// parallel; memory is the per-query values plus a row group per thread (plus the
/// distances when kept).
pub fn scan(path: &Path, spec: &ScanSpec) -> Result<Scan> {
    let qg = spec.qg;
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let amd = ArrowReaderMetadata::load(&file, ArrowReaderOptions::new())
        .map_err(|e| Error::format(path, format!("not a readable Parquet file: {e}")))?;
    let schema = amd.schema().clone();
    let want = [
        ("query_id", DataType::Int64),
        ("rank", DataType::Int32),
        ("gallery_id", DataType::Int64),
        ("distance", DataType::Float32),
    ];
    let mut idx = Vec::new();
    for (name, ty) in &want {
        let i = schema.index_of(name).map_err(|_| {
            Error::input(format!(
                "{}: missing column '{name}' (expected {ty}); not a neighbours table",
                path.display()
            ))
        })?;
        let f = schema.field(i);
        if f.data_type() != ty {
            return Err(Error::input(format!(
                "{}: column '{name}' has type {}, expected {ty}",
                path.display(),
                f.data_type()
            )));
        }
        idx.push(i);
    }
    let md = amd.metadata().clone();
    let mask = ProjectionMask::roots(md.file_metadata().schema_descr(), idx);
    let n_rg = md.num_row_groups();
    let mut offsets = Vec::with_capacity(n_rg + 1);
    offsets.push(0usize);
    for i in 0..n_rg {
        // The footer's row count is the file's word: a negative one is a broken file.
        let rows = usize::try_from(md.row_group(i).num_rows()).map_err(|_| {
            Error::format(
                path,
                format!("row group {i} has a negative row count in the footer"),
            )
        })?;
        offsets.push(offsets[i] + rows);
    }
    let qidx = IdIndex::new(&qg.queries.ids);
    let gidx = IdIndex::new(&qg.gallery.ids);
    let checker = spec.checker;
    let m = spec.metrics.len();

    let ctx = RgCtx {
        path,
        amd: &amd,
        mask: &mask,
        offsets: &offsets,
        spec,
        qidx: &qidx,
        gidx: &gidx,
        checker,
    };
    let outs: Vec<std::result::Result<RgOut, RowError>> = (0..n_rg)
        .into_par_iter()
        .map(|rg| BUFS.with(|b| scan_row_group(&ctx, rg, &mut b.borrow_mut())))
        .collect();

    // Join the row groups: check the order across their edges, then score the lists that
    // touched an edge, from their pieces.
    let n_q = qg.queries.len();
    let mut values = vec![f64::NAN; n_q * m];
    let mut n_retrieved = vec![0usize; n_q];
    let mut seen_q = vec![false; n_q];
    let mut pos = Vec::new();
    let mut neg = Vec::new();
    let mut first_err: Option<RowError> = None;
    let keep = |e: RowError, first: &mut Option<RowError>| {
        if first.as_ref().is_none_or(|f| e.0 < f.0) {
            *first = Some(e);
        }
    };
    // The list being assembled from pieces: (query, first row, gallery, distances).
    let mut cur: Option<(usize, usize, Vec<u32>, Vec<f32>)> = None;
    let mut scratch = Scratch::default();
    let mut one = Vec::with_capacity(m);
    let mut finish = |cur: &mut Option<(usize, usize, Vec<u32>, Vec<f32>)>,
                      values: &mut Vec<f64>,
                      pos: &mut Vec<f32>,
                      neg: &mut Vec<f32>|
     -> std::result::Result<(), RowError> {
        if let Some((q, start, gs, ds)) = cur.take() {
            one.clear();
            finish_list(spec, checker, q, &gs, &ds, &mut scratch, &mut one, pos, neg)
                .map_err(|msg| (start, msg))?;
            values[q * m..(q + 1) * m].copy_from_slice(&one);
        }
        Ok(())
    };
    let mut prev: Option<(u32, i32, f32)> = None;
    let mut rows = 0usize;
    'groups: for (rg, res) in outs.into_iter().enumerate() {
        let out = match res {
            Ok(o) => o,
            Err(e) => {
                keep(e, &mut first_err);
                break 'groups;
            }
        };
        rows = offsets[rg + 1];
        for (j, &q) in out.done_q.iter().enumerate() {
            values[q as usize * m..(q as usize + 1) * m]
                .copy_from_slice(&out.done_values[j * m..(j + 1) * m]);
        }
        pos.extend_from_slice(&out.pos);
        neg.extend_from_slice(&out.neg);
        for r in out.runs {
            let q = r.q as usize;
            let qid = qg.queries.ids[q];
            let continues = prev.is_some_and(|(pq, _, _)| pq == r.q);
            if continues {
                let (_, prank, pd) = prev.expect("checked");
                if r.first_rank != prank.wrapping_add(1) {
                    keep((r.start, format!("query_id {qid} has rank {} after rank {prank}; rows must be sorted by query_id then rank, ranks 1, 2, 3, ...", r.first_rank)), &mut first_err);
                    break 'groups;
                }
                if r.first_dist - pd < -SORT_TOL {
                    keep(
                        (r.start, sorted_msg(qid, r.first_rank, r.first_dist, pd)),
                        &mut first_err,
                    );
                    break 'groups;
                }
            } else {
                if let Err(e) = finish(&mut cur, &mut values, &mut pos, &mut neg) {
                    keep(e, &mut first_err);
                    break 'groups;
                }
                if seen_q[q] {
                    keep((r.start, format!("query_id {qid} appears again after other queries; rows must be sorted by query_id then rank")), &mut first_err);
                    break 'groups;
                }
                if r.first_rank != 1 {
                    keep(
                        (
                            r.start,
                            format!(
                                "query_id {qid} starts at rank {}; ranks start at 1",
                                r.first_rank
                            ),
                        ),
                        &mut first_err,
                    );
                    break 'groups;
                }
                seen_q[q] = true;
            }
            n_retrieved[q] += r.len;
            if let Some((gs, ds)) = r.piece {
                match &mut cur {
                    Some((cq, _, cg, cd)) if *cq == q => {
                        cg.extend_from_slice(&gs);
                        cd.extend_from_slice(&ds);
                    }
                    _ => cur = Some((q, r.start, gs, ds)),
                }
            }
            prev = Some((r.q, r.last_rank, r.last_dist));
        }
    }
    if first_err.is_none() {
        if let Err(e) = finish(&mut cur, &mut values, &mut pos, &mut neg) {
            keep(e, &mut first_err);
        }
    }
    if let Some((row, msg)) = first_err {
        return Err(Error::input(format!(
            "{}: row {row}: {msg}",
            path.display()
        )));
    }
    // Queries without rows: the empty-list values (OML's edge rules).
    for q in (0..n_q).filter(|&q| !seen_q[q]) {
        let rel = Relevance {
            hits: &[],
            n_gt: spec.n_gt[q],
        };
        eval_row(spec.metrics, rel, &mut values[q * m..(q + 1) * m]);
    }
    Ok(Scan {
        n_retrieved,
        values,
        rows,
        pos,
        neg,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gallery_set_finds_duplicates_and_clears() {
        let mut s = GallerySet::default();
        s.fit(1000 * 7919);
        for n in [0u32, 1, 7, 100, 1000] {
            let gs: Vec<u32> = (0..n).map(|g| g * 7919).collect();
            s.mark_class(&gs[..gs.len() / 2]);
            for (i, &g) in gs.iter().enumerate() {
                assert!(s.insert(g));
                assert_eq!(s.in_class(g), i < gs.len() / 2);
            }
            for &g in &gs {
                assert!(!s.insert(g));
            }
            s.clear(&gs, &gs[..gs.len() / 2]);
            assert!(s.seen.iter().chain(&s.class).all(|&w| w == 0));
        }
    }

    use crate::dataset::{Dataset, Split};
    use crate::retrieval::SequenceRule;
    use parquet::arrow::ArrowWriter;
    use parquet::file::properties::WriterProperties;
    use std::sync::Arc;

    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 33) % n as u64) as usize
        }
    }

    /// A validation split with missing labels, sequences (some missing) and random flags.
    fn random_qg(rng: &mut Rng, n: usize) -> QueryGallery {
        let mut ds = Dataset::default();
        for i in 0..n {
            ds.ids.push(3 * i as i64 + 1);
            ds.label
                .push((rng.below(10) > 0).then(|| rng.below(6) as i64));
            ds.sequence
                .push((rng.below(3) == 0).then(|| format!("s{}", rng.below(5))));
            ds.category.push(None);
            ds.split.push(Split::Validation);
            ds.is_query.push(Some(i % 5 != 4 || rng.below(2) == 0));
            ds.is_gallery.push(Some(i % 7 != 3 || rng.below(2) == 0));
        }
        QueryGallery::from_dataset(&ds, Split::Validation, SequenceRule::default()).unwrap()
    }

    type Lists = Vec<(usize, Vec<(usize, f32)>)>;

    /// Valid lists: random non-excluded gallery rows, sorted distances with ties; some
    /// queries have none.
    fn random_lists(rng: &mut Rng, qg: &QueryGallery) -> Lists {
        let mut out = Vec::new();
        for q in 0..qg.queries.len() {
            if rng.below(6) == 0 {
                continue;
            }
            let mut gs: Vec<usize> = (0..qg.gallery.len())
                .filter(|&g| !qg.is_excluded(q, g))
                .collect();
            for i in (1..gs.len()).rev() {
                gs.swap(i, rng.below(i + 1));
            }
            gs.truncate(rng.below(14));
            let mut d = 0f32;
            let l = gs
                .into_iter()
                .map(|g| {
                    d += rng.below(3) as f32 * 0.25;
                    (g, d)
                })
                .collect();
            out.push((q, l));
        }
        out
    }

    fn write(path: &Path, qg: &QueryGallery, lists: &Lists, rg_rows: usize) {
        let (mut q, mut r, mut g, mut d) = (vec![], vec![], vec![], vec![]);
        for (qq, l) in lists {
            for (i, &(gg, dd)) in l.iter().enumerate() {
                q.push(qg.queries.ids[*qq]);
                r.push(i as i32 + 1);
                g.push(qg.gallery.ids[gg]);
                d.push(dd);
            }
        }
        let schema = Arc::new(crate::neighbors::arrow_schema());
        let batch = arrow::array::RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from(q)),
                Arc::new(Int32Array::from(r)),
                Arc::new(Int64Array::from(g)),
                Arc::new(Float32Array::from(d)),
            ],
        )
        .unwrap();
        let props = WriterProperties::builder()
            .set_max_row_group_row_count(Some(rg_rows))
            .build();
        let mut w = ArrowWriter::try_new(File::create(path).unwrap(), schema, Some(props)).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
    }

    fn metrics() -> Vec<Metric> {
        vec![
            Metric::Cmc(1),
            Metric::Precision(3),
            Metric::Map(5),
            Metric::Ndcg(4),
            Metric::Mrr,
        ]
    }

    fn run(path: &Path, qg: &QueryGallery, keep: bool) -> Result<Scan> {
        let checker = Checker::new(qg);
        let n_gt = checker.positive_counts();
        // The parallel count over classes is the library's count.
        assert_eq!(n_gt, qg.positive_counts());
        let m = metrics();
        scan(
            path,
            &ScanSpec {
                qg,
                checker: &checker,
                sides: ("Q", "G"),
                metrics: &m,
                n_gt: &n_gt,
                keep_distance: keep,
            },
        )
    }

    /// The scan (row groups and batches of a few rows, so lists cross both edges) against
    /// the rule applied row by row.
    #[test]
    #[allow(clippy::needless_range_loop)]
    fn scan_matches_the_rule_row_by_row() {
        let mut rng = Rng(11);
        let dir = tempfile::tempdir().unwrap();
        for case in 0..40 {
            let n = 30 + rng.below(40);
            let qg = random_qg(&mut rng, n);
            let lists = random_lists(&mut rng, &qg);
            let path = dir.path().join(format!("n{case}.parquet"));
            write(&path, &qg, &lists, 1 + rng.below(40));
            let got = run(&path, &qg, true).unwrap();
            let n_gt = qg.positive_counts();
            let m = metrics();
            let (mut pos, mut neg) = (vec![], vec![]);
            for q in 0..qg.queries.len() {
                let l = lists
                    .iter()
                    .find(|(qq, _)| *qq == q)
                    .map(|x| x.1.clone())
                    .unwrap_or_default();
                let hits: Vec<bool> = l.iter().map(|&(g, _)| qg.is_positive(q, g)).collect();
                for (&(_, d), &h) in l.iter().zip(&hits) {
                    if h {
                        pos.push(d)
                    } else {
                        neg.push(d)
                    }
                }
                assert_eq!(got.n_retrieved[q], l.len());
                for (j, mm) in m.iter().enumerate() {
                    let want = mm.eval(&hits, n_gt[q]);
                    let v = got.values[q * m.len() + j];
                    assert!(
                        v == want || (v.is_nan() && want.is_nan()),
                        "case {case} q {q} {mm:?}: {v} vs {want}"
                    );
                }
            }
            let sort = |v: &mut Vec<f32>| v.sort_by(f32::total_cmp);
            let (mut gp, mut gn) = (got.pos.clone(), got.neg.clone());
            sort(&mut pos);
            sort(&mut neg);
            sort(&mut gp);
            sort(&mut gn);
            assert_eq!((gp, gn), (pos, neg), "case {case}");
            assert_eq!(got.rows, lists.iter().map(|l| l.1.len()).sum::<usize>());
        }
    }

    /// Bad lists are refused wherever the bad row falls (row-group and batch edges).
    #[test]
    fn scan_refuses_bad_lists() {
        let mut rng = Rng(5);
        let dir = tempfile::tempdir().unwrap();
        let mut seen = [0usize; 5];
        for case in 0..200 {
            let qg = random_qg(&mut rng, 40);
            let mut lists = random_lists(&mut rng, &qg);
            lists.retain(|l| l.1.len() >= 2);
            if lists.is_empty() {
                continue;
            }
            let li = rng.below(lists.len());
            let q = lists[li].0;
            let kind = case % 5;
            let l = &mut lists[li].1;
            let i = 1 + rng.below(l.len() - 1);
            let want = match kind {
                0 => {
                    l[i].0 = l[i - 1].0;
                    "appears twice"
                }
                1 => {
                    l[i].1 = l[i - 1].1 - 1.0;
                    "not sorted ascending"
                }
                2 => {
                    let Some(g) = (0..qg.gallery.len()).find(|&g| qg.is_excluded(q, g)) else {
                        continue;
                    };
                    l[i].0 = g;
                    "is excluded for this query"
                }
                3 => {
                    l[i].1 = f32::NAN;
                    "is NaN"
                }
                _ => {
                    // Two runs of one query: it appears again after another.
                    let other = lists.iter().position(|x| x.0 != q).unwrap_or(li);
                    if other == li {
                        continue;
                    }
                    // Placed right after itself, it is one list with ranks restarting.
                    let copy = lists[li].clone();
                    lists.push(copy);
                    if li + 1 == lists.len() - 1 {
                        "has rank 1 after rank"
                    } else {
                        "appears again"
                    }
                }
            };
            seen[kind] += 1;
            let path = dir.path().join(format!("bad{case}.parquet"));
            write(&path, &qg, &lists, 1 + rng.below(30));
            let e = match run(&path, &qg, false) {
                Ok(_) => panic!("case {case}: expected {want:?}"),
                Err(e) => e.to_string(),
            };
            assert!(e.contains(want), "case {case}: expected {want:?} in {e}");
        }
        assert!(seen.iter().all(|&n| n > 10), "{seen:?}");
    }

    #[test]
    fn id_index_kinds() {
        let range = [5i64, 6, 7];
        let dense = [1i64, 3, 4, 9];
        let sparse = [-5i64, 1 << 40];
        for ids in [&range[..], &dense, &sparse] {
            let ix = IdIndex::new(ids);
            for (i, &id) in ids.iter().enumerate() {
                assert_eq!(ix.get(id), Some(i));
            }
            for id in [i64::MIN, -6, 0, 2, 8, 10, i64::MAX] {
                assert_eq!(ix.get(id), ids.binary_search(&id).ok(), "{id}");
            }
        }
        assert!(matches!(IdIndex::new(&range), IdIndex::Range { .. }));
        assert!(matches!(IdIndex::new(&dense), IdIndex::Dense { .. }));
        assert!(matches!(IdIndex::new(&sparse), IdIndex::Sorted(_)));
    }
}
