//! `simile-distance merge`: joins shard parts into the result of the unsharded run.
//!
//! Query-shard parts hold disjoint queries: they are concatenated in part order (which is id
//! order). Gallery-shard parts hold, for every query, its top-k within one slice of the
//! gallery: per query, the lists are merged by (distance, gallery id) and cut at k. Distances
//! are exact and computed the same way in every part, so the result is the unsharded one.
//! Parts are streamed, never loaded whole.
use crate::error::{Error, Result};

use crate::manifest::{Manifest, ManifestBuilder};
use crate::neighbors::{NeighborsMeta, NeighborsWriter};
use crate::shard::{self, ShardSpec};
use crate::table;
use arrow::array::{Array, Float32Array, Int64Array};
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use std::fs::File;
use std::path::{Path, PathBuf};

/// What a merge did.
#[derive(Clone, Debug)]
pub struct MergeSummary {
    pub out: PathBuf,
    pub parts: usize,
    pub kind: String,
    pub queries: usize,
    pub gallery: usize,
    pub rows: u64,
    pub seconds: f64,
}

impl std::fmt::Display for MergeSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "simile-distance merge: {} {}-shard parts, {} queries x {} gallery: {:.2} s ({} rows -> {})",
            self.parts,
            self.kind,
            self.queries,
            self.gallery,
            self.seconds,
            self.rows,
            self.out.display()
        )
    }
}

/// Streams one part's rows, query by query.
struct Cursor {
    path: PathBuf,
    reader: ParquetRecordBatchReader,
    q: Vec<i64>,
    g: Vec<i64>,
    d: Vec<f32>,
    i: usize,
    last_q: Option<i64>,
}

impl Cursor {
    fn open(path: &Path) -> Result<Cursor> {
        Self::open_ids(path, None)
    }

    /// A cursor over the rows whose query id is in `ids` (inclusive) only: row groups whose
    /// query ids (from the footer's statistics) lie outside are not read.
    fn open_ids(path: &Path, ids: Option<(i64, i64)>) -> Result<Cursor> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let mut b = ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| Error::format(path, format!("not a readable Parquet file: {e}")))?
            .with_batch_size(1 << 16);
        if let Some((lo, hi)) = ids {
            let col = b.schema().index_of("query_id").map_err(|_| {
                Error::input(format!(
                    "{}: no query_id column; not a neighbours file",
                    path.display()
                ))
            })?;
            let groups: Vec<usize> = b
                .metadata()
                .row_groups()
                .iter()
                .enumerate()
                .filter(|(_, g)| match g.column(col).statistics() {
                    Some(parquet::file::statistics::Statistics::Int64(st)) => {
                        st.min_opt().is_none_or(|&m| m <= hi)
                            && st.max_opt().is_none_or(|&m| m >= lo)
                    }
                    _ => true,
                })
                .map(|(i, _)| i)
                .collect();
            b = b.with_row_groups(groups);
        }
        let reader = b
            .build()
            .map_err(|e| Error::format(path, format!("cannot read: {e}")))?;
        Ok(Cursor {
            path: path.to_path_buf(),
            reader,
            q: Vec::new(),
            g: Vec::new(),
            d: Vec::new(),
            i: 0,
            last_q: None,
        })
    }

    fn column<'a, T: 'static>(
        &self,
        b: &'a arrow::array::RecordBatch,
        name: &str,
    ) -> Result<&'a T> {
        b.column_by_name(name)
            .and_then(|c| c.as_any().downcast_ref::<T>())
            .ok_or_else(|| {
                Error::input(format!(
                    "{}: column '{name}' missing or of the wrong type; not a neighbours file",
                    self.path.display()
                ))
            })
    }

    /// The next row's query id, reading the next batch when needed.
    fn peek(&mut self) -> Result<Option<i64>> {
        while self.i >= self.q.len() {
            let Some(b) = self.reader.next() else {
                return Ok(None);
            };
            let b = b.map_err(|e| Error::format(&self.path, format!("cannot read: {e}")))?;
            let q = self.column::<Int64Array>(&b, "query_id")?;
            let g = self.column::<Int64Array>(&b, "gallery_id")?;
            let d = self.column::<Float32Array>(&b, "distance")?;
            if q.null_count() + g.null_count() + d.null_count() > 0 {
                return Err(Error::input(format!(
                    "{}: null values in a neighbours file",
                    self.path.display()
                )));
            }
            self.q = q.values().to_vec();
            self.g = g.values().to_vec();
            self.d = d.values().to_vec();
            self.i = 0;
        }
        let q = self.q[self.i];
        if let Some(last) = self.last_q {
            if q < last {
                return Err(Error::input(format!(
                    "{}: not sorted by query_id (query {q} after {last})",
                    self.path.display()
                )));
            }
        }
        Ok(Some(q))
    }

    /// Appends the rows of query `qid` (which must be next) to `out`.
    fn take(&mut self, qid: i64, out: &mut Vec<(f32, i64)>) -> Result<()> {
        while self.peek()? == Some(qid) {
            out.push((self.d[self.i], self.g[self.i]));
            self.i += 1;
            self.last_q = Some(qid);
        }
        Ok(())
    }
}

/// What a merge joins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum What {
    /// The shard parts of `out` (`<stem>.part-<i>-of-<n>`): the complete result.
    Parts,
    /// Query range `i/n` of the gallery-shard parts of `out`: its queries' merged lists, as a
    /// query-range part `<stem>.qpart-<i>-of-<n>` (one merge task per range, in parallel).
    QueryRange(ShardSpec),
    /// The query-range parts `<stem>.qpart-<i>-of-<n>`: the complete result.
    QueryParts,
}

/// Merges the parts of `out` (found beside it when `parts` is empty) into `out`.
pub fn merge(out: &Path, parts: &[PathBuf]) -> Result<MergeSummary> {
    merge_what(out, parts, What::Parts)
}

/// The query side's ids of window `q` (sorted), its first position and the side's size, read
/// from the query dataset the parts were made from (what a query-shard run would search).
fn query_window(m: &Manifest, first: &Path, q: ShardSpec) -> Result<(Vec<i64>, usize)> {
    use crate::dataset::{read_sides, SideFlag, SidePick, Split};
    let rec = m.inputs.get("dataset").ok_or_else(|| {
        Error::input(format!(
            "{}: its manifest records no dataset",
            first.display()
        ))
    })?;
    let ds = PathBuf::from(&rec.path);
    let now = crate::io::Fingerprint::of(&ds).map_err(|e| {
        Error::input(format!(
            "{}: the parts were made from {}, which cannot be read now ({e}); a query-range merge reads the queries from it (run it where that path is valid)",
            first.display(),
            ds.display()
        ))
    })?;
    if !now.same_content(&rec.fingerprint) {
        return Err(Error::input(format!(
            "{} changed since the parts were made from it: re-run the shards",
            ds.display()
        )));
    }
    let p = |k: &str| m.params.get(k).and_then(|v| v.as_str());
    let two = p("form") == Some("two-sided");
    let split: Option<Split> = p(if two { "query_split" } else { "split" })
        .map(|s| s.parse())
        .transpose()
        .map_err(|e: String| Error::input(format!("{}: split: {e}", first.display())))?;
    let side = read_sides(
        &ds,
        &[SidePick {
            split,
            flag: if two { SideFlag::Any } else { SideFlag::Query },
            window: Some(q),
        }],
    )?
    .pop()
    .unwrap_or_default();
    Ok((side.ids, side.start))
}

/// Merges as `what` says (see [`What`]).
pub fn merge_what(out: &Path, parts: &[PathBuf], what: What) -> Result<MergeSummary> {
    let started = std::time::Instant::now();
    let infix = if what == What::QueryParts {
        shard::QPART
    } else {
        shard::PART
    };
    let paths = shard::discover_named(out, parts, infix)?;
    let set = crate::parts::validate(&paths)?;
    let m0 = &set.manifests[0];
    if m0.stage != "distance" {
        return Err(Error::input(format!(
            "{} was written by simile-{}, not simile-distance",
            set.paths[0].display(),
            m0.stage
        )));
    }
    let kind = m0
        .params
        .get("shard")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .ok_or_else(|| {
            Error::input(format!(
                "{}: its manifest names no shard kind (query or gallery)",
                set.paths[0].display()
            ))
        })?;
    let range = match what {
        What::QueryRange(q) => {
            if kind != "gallery" {
                return Err(Error::input(format!(
                    "--query-shard merges gallery-shard parts; {} is a {kind}-shard part",
                    set.paths[0].display()
                )));
            }
            Some((q, query_window(m0, &set.paths[0], q)?))
        }
        _ => None,
    };
    let dest = match &range {
        Some((q, _)) => q.qpart_path(out),
        None => out.to_path_buf(),
    };
    let mut params = m0.params.clone();
    params["shard"] = match range {
        Some(_) => "query".into(),
        None => serde_json::Value::Null,
    };
    let mut mb = ManifestBuilder::new("distance", params);
    for (role, rec) in set.merged_inputs()? {
        mb.input_record(&role, rec);
    }
    for p in &set.paths {
        mb.reads("a part", p);
    }
    if let Some((q, (ids, start))) = &range {
        mb.shard(*q, *start, start + ids.len());
    }
    mb.skip_if_done(&dest)?;
    let metas: Vec<NeighborsMeta> = set
        .paths
        .iter()
        .map(|p| NeighborsMeta::from_kv(p, &table::read_meta(p)?))
        .collect::<Result<_>>()?;
    let mut meta = metas[0].clone();
    meta.complete = range.is_none();
    meta.extra.remove("simile.shard");
    // The counts come from the parts' footers: added without overflow.
    let total = |f: fn(&NeighborsMeta) -> usize| {
        metas
            .iter()
            .try_fold(0usize, |a, m| a.checked_add(f(m)))
            .ok_or_else(|| {
                Error::input("the parts' query or gallery counts overflow: not parts of one search")
            })
    };
    match kind.as_str() {
        "query" => meta.n_queries = total(|m| m.n_queries)?,
        "gallery" => meta.n_gallery = total(|m| m.n_gallery)?,
        other => {
            return Err(Error::input(format!(
                "{}: unknown shard kind '{other}'",
                set.paths[0].display()
            )))
        }
    }
    // A query range: its queries only, read from the parts' row groups that hold them.
    let bounds = range
        .as_ref()
        .map(|(_, (ids, _))| (ids.first().copied(), ids.last().copied()));
    if let Some((q, (ids, _))) = &range {
        meta.n_queries = ids.len();
        meta.extra
            .insert("simile.shard".into(), format!("query {q}"));
    }
    let k = meta.k;
    let mut writer = NeighborsWriter::create(&dest, &meta)?;
    let mut cursors: Vec<Cursor> = match bounds {
        // An empty window of queries: nothing to read.
        Some((None, _)) | Some((_, None)) => Vec::new(),
        Some((Some(lo), Some(hi))) => set
            .paths
            .iter()
            .map(|p| Cursor::open_ids(p, Some((lo, hi))))
            .collect::<Result<_>>()?,
        None => set
            .paths
            .iter()
            .map(|p| Cursor::open(p))
            .collect::<Result<_>>()?,
    };
    let in_range = |q: i64| match bounds {
        Some((Some(lo), Some(hi))) => q >= lo && q <= hi,
        _ => true,
    };
    let mut list: Vec<(f32, i64)> = Vec::new();
    let mut ids: Vec<i64> = Vec::new();
    let mut dists: Vec<f32> = Vec::new();
    let mut emit = |qid: i64, list: &mut Vec<(f32, i64)>, cut: bool| -> Result<()> {
        if cut {
            list.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            list.truncate(k);
        }
        ids.clear();
        dists.clear();
        for &(d, g) in list.iter() {
            ids.push(g);
            dists.push(d);
        }
        writer.push(qid, &ids, &dists)
    };
    if kind == "query" {
        let mut last: Option<i64> = None;
        for c in cursors.iter_mut() {
            while let Some(q) = c.peek()? {
                if last.is_some_and(|l| q <= l) {
                    return Err(Error::input(format!(
                        "{}: query {q} also appears in an earlier part; query-shard parts must hold disjoint queries",
                        c.path.display()
                    )));
                }
                list.clear();
                c.take(q, &mut list)?;
                emit(q, &mut list, false)?;
                last = Some(q);
            }
        }
    } else {
        loop {
            let mut next: Option<i64> = None;
            for c in cursors.iter_mut() {
                if let Some(q) = c.peek()? {
                    next = Some(next.map_or(q, |n: i64| n.min(q)));
                }
            }
            let Some(q) = next else { break };
            list.clear();
            for c in cursors.iter_mut() {
                c.take(q, &mut list)?;
            }
            // Rows of a row group that holds queries of the range and others.
            if in_range(q) {
                emit(q, &mut list, true)?;
            }
        }
    }
    let (sealed, rows) = writer.seal()?;
    mb.rows("queries", meta.n_queries as u64)
        .rows("gallery", meta.n_gallery as u64)
        .rows("neighbors", rows)
        .rows("parts", set.count as u64);
    mb.commit(sealed, Vec::new())?;
    Ok(MergeSummary {
        out: dest,
        parts: set.count,
        kind,
        queries: meta.n_queries,
        gallery: meta.n_gallery,
        rows,
        seconds: started.elapsed().as_secs_f64(),
    })
}
