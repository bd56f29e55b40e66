//! Reading only what a search needs of `dataset.parquet`: the columns of one side (queries or
//! gallery), streamed in record batches, keeping only the side's rows and of those only a
//! shard's window. A gallery-shard worker thus holds its own rows and no others: its memory
//! does not grow with the gallery (and when the side is every row, the row groups outside its
//! window are not even decoded).
use super::{Dataset, Split, SCHEMA_VERSION};
use crate::error::{Error, Result};
use crate::shard::ShardSpec;
use arrow::array::{Array, ArrayRef, BooleanArray, Int64Array, RecordBatch, StringArray};
use parquet::arrow::arrow_reader::{ParquetRecordBatchReaderBuilder, RowSelection, RowSelector};
use std::path::Path;

/// Which flag a side's rows carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SideFlag {
    /// Every row of the split (a two-sided search's side, an inference set).
    Any,
    Query,
    Gallery,
}

/// One side of a search: the rows of `split` (every row for `None`) with `flag`, in id order,
/// and of those the positions in `window` (a shard) only.
#[derive(Clone, Copy, Debug)]
pub struct SidePick {
    pub split: Option<Split>,
    pub flag: SideFlag,
    pub window: Option<ShardSpec>,
}

/// The rows of one side that were read: a window of the side, with the columns a search and
/// its exclusion rule need.
#[derive(Clone, Debug, Default)]
pub struct SideRows {
    /// How many rows the whole side has.
    pub total: usize,
    /// The window's first position in the whole side.
    pub start: usize,
    /// Row positions in the dataset.
    pub rows: Vec<usize>,
    pub ids: Vec<i64>,
    pub labels: Vec<Option<i64>>,
    pub sequence: Vec<Option<String>>,
    pub category: Vec<Option<String>>,
}

const COLUMNS: [&str; 7] = [
    "id",
    "label",
    "split",
    "is_query",
    "is_gallery",
    "category",
    "sequence",
];

fn col<'a, T: 'static>(b: &'a RecordBatch, path: &Path, c: &str) -> Result<&'a T> {
    let a: &ArrayRef = b
        .column_by_name(c)
        .ok_or_else(|| Error::input(format!("{}: missing column '{c}'", path.display())))?;
    a.as_any().downcast_ref::<T>().ok_or_else(|| {
        Error::input(format!(
            "{}: column '{c}' has type {}, not the dataset schema's",
            path.display(),
            a.data_type()
        ))
    })
}

/// Whether row `i` of a batch belongs to `pick`'s side (its split and flag).
fn belongs(
    pick: &SidePick,
    split: &StringArray,
    q: &BooleanArray,
    g: &BooleanArray,
    i: usize,
    row: usize,
    path: &Path,
) -> Result<bool> {
    let s = split.value(i);
    let sp: Split = s.parse().map_err(|e| {
        Error::input(format!(
            "{}: row {row}: column 'split': {e}",
            path.display()
        ))
    })?;
    if pick.split.is_some_and(|want| want != sp) {
        return Ok(false);
    }
    let flag = |a: &BooleanArray| a.is_valid(i) && a.value(i);
    Ok(match pick.flag {
        _ if sp == Split::Inference => true,
        SideFlag::Any => true,
        SideFlag::Query => flag(q),
        SideFlag::Gallery => flag(g),
    })
}

/// Reads the sides `picks` of the dataset at `path` in one or two streaming passes (a first
/// pass over the split and flag columns counts a side whose window needs its total). Checks
/// what the full reader checks of these columns: the artifact, ids sorted and unique, split
/// values, no nulls in `id` and `split`.
pub fn read_sides(path: &Path, picks: &[SidePick]) -> Result<Vec<SideRows>> {
    Ok(read_sides_and_ids(path, picks, false)?.0)
}

/// [`read_sides`], and with `all_ids` every id of the dataset too (for checking that an
/// embeddings file lists none it does not have; a shard worker, which reads a window, does not
/// ask for them).
pub fn read_sides_and_ids(
    path: &Path,
    picks: &[SidePick],
    all_ids: bool,
) -> Result<(Vec<SideRows>, Vec<i64>)> {
    crate::parts::refuse_part(path)?;
    let meta = crate::table::read_meta(path)?;
    if meta.get("simile.artifact").map(String::as_str) != Some("dataset")
        || meta
            .get("simile.schema_version")
            .is_some_and(|v| v != SCHEMA_VERSION)
    {
        // Not a dataset this version reads: the full reader says why.
        Dataset::read(path)?;
        return Err(Error::internal(format!(
            "{}: not read as a dataset",
            path.display()
        )));
    }
    let n_rows = num_rows(path)?;
    // Each side's total: known when it is every row, else counted.
    let mut totals: Vec<Option<usize>> = picks
        .iter()
        .map(|p| (p.split.is_none() && p.flag == SideFlag::Any).then_some(n_rows))
        .collect();
    if picks
        .iter()
        .zip(&totals)
        .any(|(p, t)| p.window.is_some() && t.is_none())
    {
        let counted = count(path, picks)?;
        for (t, c) in totals.iter_mut().zip(counted) {
            t.get_or_insert(c);
        }
    }
    // Each side's window of positions.
    let windows: Vec<(usize, usize)> = picks
        .iter()
        .zip(&totals)
        .map(|(p, t)| match (p.window, t) {
            (Some(w), Some(t)) => w.range(*t),
            _ => (0, usize::MAX),
        })
        .collect();
    // Every side is every row with a window: decode only the rows of the windows.
    let selection = (!all_ids
        && picks
            .iter()
            .all(|p| p.split.is_none() && p.flag == SideFlag::Any))
    .then(|| {
        let lo = windows.iter().map(|w| w.0).min().unwrap_or(0);
        let hi = windows
            .iter()
            .map(|w| w.1.min(n_rows))
            .max()
            .unwrap_or(n_rows);
        (lo, hi.max(lo))
    });
    let mut out: Vec<SideRows> = picks.iter().map(|_| SideRows::default()).collect();
    let mut seen = vec![0usize; picks.len()];
    let (first_row, reader) = open(path, &COLUMNS, selection)?;
    let mut row = first_row;
    let mut last_id: Option<i64> = None;
    let mut every = Vec::new();
    for batch in reader {
        let b = batch.map_err(|e| Error::format(path, format!("cannot read: {e}")))?;
        let id = col::<Int64Array>(&b, path, "id")?;
        let label = col::<Int64Array>(&b, path, "label")?;
        let split = col::<StringArray>(&b, path, "split")?;
        let (q, g) = (
            col::<BooleanArray>(&b, path, "is_query")?,
            col::<BooleanArray>(&b, path, "is_gallery")?,
        );
        let (cat, seq) = (
            col::<StringArray>(&b, path, "category")?,
            col::<StringArray>(&b, path, "sequence")?,
        );
        for i in 0..b.num_rows() {
            if id.is_null(i) || split.is_null(i) {
                return Err(Error::input(format!(
                    "{}: row {row}: column '{}' is null",
                    path.display(),
                    if id.is_null(i) { "id" } else { "split" }
                )));
            }
            let this = id.value(i);
            if let Some(prev) = last_id.filter(|&p| p >= this) {
                return Err(Error::input(format!(
                    "{}: row {row}: ids must be unique and sorted ascending, found {this} after {prev}",
                    path.display()
                )));
            }
            last_id = Some(this);
            if all_ids {
                every.push(this);
            }
            for (k, pick) in picks.iter().enumerate() {
                // With a row selection the position is the row itself.
                let member = selection.is_some() || belongs(pick, split, q, g, i, row, path)?;
                if !member {
                    continue;
                }
                let pos = if selection.is_some() { row } else { seen[k] };
                seen[k] += 1;
                let (lo, hi) = windows[k];
                if pos < lo || pos >= hi {
                    continue;
                }
                let o = &mut out[k];
                o.rows.push(row);
                o.ids.push(this);
                o.labels.push(label.is_valid(i).then(|| label.value(i)));
                o.category
                    .push(cat.is_valid(i).then(|| cat.value(i).to_string()));
                o.sequence
                    .push(seq.is_valid(i).then(|| seq.value(i).to_string()));
            }
            row += 1;
        }
    }
    for (k, o) in out.iter_mut().enumerate() {
        o.total = totals[k].unwrap_or(seen[k]);
        o.start = windows[k].0.min(o.total);
    }
    Ok((out, every))
}

/// The dataset's row count, from the Parquet footer.
fn num_rows(path: &Path) -> Result<usize> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let b = ParquetRecordBatchReaderBuilder::try_new(f)
        .map_err(|e| Error::format(path, format!("not a readable Parquet file: {e}")))?;
    Ok(b.metadata().file_metadata().num_rows().max(0) as usize)
}

/// A reader of `columns`, of rows `[lo, hi)` only when `rows` is given (the first row's
/// number returned with it).
fn open(
    path: &Path,
    columns: &[&str],
    rows: Option<(usize, usize)>,
) -> Result<(
    usize,
    parquet::arrow::arrow_reader::ParquetRecordBatchReader,
)> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let b = ParquetRecordBatchReaderBuilder::try_new(f)
        .map_err(|e| Error::format(path, format!("not a readable Parquet file: {e}")))?;
    let schema = b.schema().clone();
    let mut idx = Vec::new();
    for c in columns {
        idx.push(
            schema
                .index_of(c)
                .map_err(|_| Error::input(format!("{}: missing column '{c}'", path.display())))?,
        );
    }
    let mask = parquet::arrow::ProjectionMask::roots(b.parquet_schema(), idx);
    let mut b = b.with_projection(mask).with_batch_size(1 << 16);
    let first = match rows {
        Some((lo, hi)) => {
            b = b.with_row_selection(RowSelection::from(vec![
                RowSelector::skip(lo),
                RowSelector::select(hi - lo),
            ]));
            lo
        }
        None => 0,
    };
    let reader = b
        .build()
        .map_err(|e| Error::format(path, format!("cannot read: {e}")))?;
    Ok((first, reader))
}

/// How many rows each side has (a pass over the split and flag columns only).
fn count(path: &Path, picks: &[SidePick]) -> Result<Vec<usize>> {
    let (_, reader) = open(path, &["split", "is_query", "is_gallery"], None)?;
    let mut n = vec![0usize; picks.len()];
    let mut row = 0;
    for batch in reader {
        let b = batch.map_err(|e| Error::format(path, format!("cannot read: {e}")))?;
        let split = col::<StringArray>(&b, path, "split")?;
        let (q, g) = (
            col::<BooleanArray>(&b, path, "is_query")?,
            col::<BooleanArray>(&b, path, "is_gallery")?,
        );
        for i in 0..b.num_rows() {
            if split.is_null(i) {
                return Err(Error::input(format!(
                    "{}: row {row}: column 'split' is null",
                    path.display()
                )));
            }
            for (k, p) in picks.iter().enumerate() {
                if belongs(p, split, q, g, i, row, path)? {
                    n[k] += 1;
                }
            }
            row += 1;
        }
    }
    Ok(n)
}
