//! What the report reads from the neighbours file, streamed batch by batch so a large file
//! never sits in memory whole: the distance range (pass 1, the distance column only), then
//! the histograms of correct and wrong neighbours and the lists of the queries it draws
//! (pass 2). The file was already checked by the score stage.
use super::charts::Hist;
use crate::error::{Error, Result};
use crate::retrieval::QueryGallery;
use arrow::array::{Array, Float32Array, Int64Array, RecordBatch};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::Path;

/// Bins of the distance histograms.
pub const BINS: usize = 40;

/// One retrieved row of a drawn query: gallery position, distance, whether it is correct.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Retrieved {
    pub gallery: usize,
    pub distance: f32,
    pub hit: bool,
}

pub struct ScanOut {
    pub pos: Hist,
    pub neg: Hist,
    /// The histograms' range; `None` when the file has no finite distance.
    pub range: Option<(f64, f64)>,
    /// Lists of the wanted queries (query position -> rows in rank order).
    pub lists: BTreeMap<usize, Vec<Retrieved>>,
}

fn batches(
    path: &Path,
    columns: &[&str],
    mut each: impl FnMut(&RecordBatch) -> Result<()>,
) -> Result<()> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let b = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| Error::format(path, format!("not a readable Parquet file: {e}")))?
        .with_batch_size(1 << 16);
    let schema = b.schema().clone();
    let idx = columns
        .iter()
        .map(|c| {
            schema
                .index_of(c)
                .map_err(|_| Error::format(path, format!("no column '{c}'")))
        })
        .collect::<Result<Vec<_>>>()?;
    let mask = ProjectionMask::roots(b.parquet_schema(), idx);
    let reader = b
        .with_projection(mask)
        .build()
        .map_err(|e| Error::format(path, format!("cannot read: {e}")))?;
    for batch in reader {
        each(&batch.map_err(|e| Error::format(path, format!("cannot read: {e}")))?)?;
    }
    Ok(())
}

fn col<'b, T: 'static>(b: &'b RecordBatch, name: &str, path: &Path) -> Result<&'b T> {
    b.column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| Error::format(path, format!("column '{name}' missing or of another type")))
}

/// Reads the file twice (see the module comment); `wanted` are the query positions whose
/// lists are kept.
pub fn scan(path: &Path, qg: &QueryGallery, wanted: &BTreeSet<usize>) -> Result<ScanOut> {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    batches(path, &["distance"], |b| {
        let d = col::<Float32Array>(b, "distance", path)?;
        for &v in d.values() {
            if v.is_finite() {
                lo = lo.min(v as f64);
                hi = hi.max(v as f64);
            }
        }
        Ok(())
    })?;
    // One distinct distance: a unit-wide range around it keeps the bins finite.
    let range = (lo <= hi).then_some(if hi > lo {
        (lo, hi)
    } else {
        (lo - 0.5, hi + 0.5)
    });
    let (rlo, rhi) = range.unwrap_or((0.0, 1.0));
    let mut out = ScanOut {
        pos: Hist::new(BINS),
        neg: Hist::new(BINS),
        range,
        lists: BTreeMap::new(),
    };
    // Rows are sorted by query id, so the query's position is looked up once per list.
    let mut last: Option<(i64, Option<usize>)> = None;
    batches(path, &["query_id", "gallery_id", "distance"], |b| {
        let q = col::<Int64Array>(b, "query_id", path)?;
        let g = col::<Int64Array>(b, "gallery_id", path)?;
        let d = col::<Float32Array>(b, "distance", path)?;
        for i in 0..b.num_rows() {
            let qid = q.value(i);
            let qpos = match last {
                Some((id, p)) if id == qid => p,
                _ => {
                    let p = qg.query_pos(qid);
                    last = Some((qid, p));
                    p
                }
            };
            let (Some(qp), Some(gp)) = (qpos, qg.gallery_pos(g.value(i))) else {
                continue;
            };
            let hit = qg.is_positive(qp, gp);
            let dist = d.value(i);
            if dist.is_finite() {
                let h = if hit { &mut out.pos } else { &mut out.neg };
                h.add(dist as f64, rlo, rhi);
            }
            if wanted.contains(&qp) {
                out.lists.entry(qp).or_default().push(Retrieved {
                    gallery: gp,
                    distance: dist,
                    hit,
                });
            }
        }
        Ok(())
    })?;
    Ok(out)
}
