//! `train_log.parquet` (one row per step) and `val_metrics.parquet` (one row per validation):
//! fixed leading columns, then one float column per log or metric key (the union over rows;
//! null where a row has no value). Written whole and atomically at every checkpoint; read
//! back on `--resume`. Columns: `schemas/train.md`.
use crate::error::{Error, Result};
use crate::table::{self, Meta};
use arrow::array::{Array, ArrayRef, Float64Array, Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

/// The file names in a `simile-train --out` folder.
pub const TRAIN_LOG: &str = "train_log.parquet";
pub const VAL_METRICS: &str = "val_metrics.parquet";

/// One row: integer columns (in order) and float values by key.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Row {
    pub ints: Vec<(String, i64)>,
    pub values: Vec<(String, Option<f64>)>,
}

impl Row {
    pub fn int(&self, k: &str) -> Option<i64> {
        self.ints.iter().find(|(n, _)| n == k).map(|(_, v)| *v)
    }
    pub fn value(&self, k: &str) -> Option<f64> {
        self.values
            .iter()
            .find(|(n, _)| n == k)
            .and_then(|(_, v)| *v)
    }
}

/// Writes rows; the float columns keep the order of first appearance.
pub fn write(path: &Path, rows: &[Row], meta: &Meta) -> Result<()> {
    let int_names: Vec<String> = rows
        .first()
        .map(|r| r.ints.iter().map(|(n, _)| n.clone()).collect())
        .unwrap_or_default();
    let mut names: Vec<String> = Vec::new();
    let mut seen = BTreeSet::new();
    for r in rows {
        for (k, _) in &r.values {
            if seen.insert(k.clone()) {
                names.push(k.clone());
            }
        }
    }
    let mut fields = Vec::new();
    let mut cols: Vec<ArrayRef> = Vec::new();
    for n in &int_names {
        fields.push(Field::new(n, DataType::Int64, false));
        cols.push(Arc::new(Int64Array::from(
            rows.iter()
                .map(|r| r.int(n).unwrap_or(0))
                .collect::<Vec<_>>(),
        )));
    }
    for n in &names {
        fields.push(Field::new(n, DataType::Float64, true));
        cols.push(Arc::new(Float64Array::from(
            rows.iter()
                .map(|r| r.values.iter().find(|(k, _)| k == n).and_then(|(_, v)| *v))
                .collect::<Vec<_>>(),
        )));
    }
    let schema = Arc::new(Schema::new(fields));
    let batch = if cols.is_empty() {
        RecordBatch::new_empty(schema)
    } else {
        RecordBatch::try_new(schema, cols).map_err(|e| Error::internal(e.to_string()))?
    };
    table::write_parquet(path, &batch, meta)
}

/// Reads a table written by [`write`] (`int_names` are its integer columns).
pub fn read(path: &Path, int_names: &[&str]) -> Result<Vec<Row>> {
    let t = table::read_parquet(path, None)?;
    let n = t.rows();
    let mut rows = vec![Row::default(); n];
    for field in t.batch.schema().fields() {
        let name = field.name();
        let col = t
            .batch
            .column_by_name(name)
            .expect("column of its own schema");
        if int_names.contains(&name.as_str()) {
            let a = col
                .as_any()
                .downcast_ref::<Int64Array>()
                .ok_or_else(|| Error::format(path, format!("column '{name}' is not int64")))?;
            for (i, r) in rows.iter_mut().enumerate() {
                r.ints.push((name.clone(), a.value(i)));
            }
        } else {
            let a = col
                .as_any()
                .downcast_ref::<Float64Array>()
                .ok_or_else(|| Error::format(path, format!("column '{name}' is not float64")))?;
            for (i, r) in rows.iter_mut().enumerate() {
                let v = (!a.is_null(i)).then(|| a.value(i));
                r.values.push((name.clone(), v));
            }
        }
    }
    Ok(rows)
}

/// Footer metadata of both tables.
pub fn meta(kind: &str) -> Meta {
    let mut m = BTreeMap::new();
    m.insert("simile.table".into(), kind.into());
    m.insert("simile.version".into(), crate::manifest::VERSION.into());
    m
}
