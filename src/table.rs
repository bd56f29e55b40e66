//! Parquet tables: atomic writing with key-value metadata, reading with typed column access
//! whose errors name the file, the column and the type expected.
use crate::error::{Error, Result};
use crate::io::{AtomicFile, Sealed};
use arrow::array::{Array, ArrayRef, RecordBatch, RecordBatchReader};
use arrow::datatypes::{DataType, SchemaRef};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Key-value metadata stored in a Parquet footer.
pub type Meta = BTreeMap<String, String>;

/// Writer properties every simile table uses: snappy (read by pandas, polars, DuckDB),
/// row groups of 1M rows, footer metadata from `meta`.
fn props(meta: &Meta) -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(1 << 20))
        .set_key_value_metadata(Some(
            meta.iter()
                .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
                .collect(),
        ))
        .build()
}

/// A Parquet file being written in batches, renamed into place by [`TableWriter::finish`].
pub struct TableWriter {
    writer: ArrowWriter<File>,
    file: AtomicFile,
    dest: PathBuf,
}

impl TableWriter {
    pub fn create(dest: impl AsRef<Path>, schema: SchemaRef, meta: &Meta) -> Result<Self> {
        let dest = dest.as_ref().to_path_buf();
        let mut file = AtomicFile::create(&dest)?;
        let f = file.file().try_clone().map_err(|e| Error::io(&dest, e))?;
        let writer = ArrowWriter::try_new(f, schema, Some(props(meta)))
            .map_err(|e| Error::internal(format!("{}: {e}", dest.display())))?;
        Ok(TableWriter { writer, file, dest })
    }

    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        self.writer
            .write(batch)
            .map_err(|e| write_error(&self.dest, e))
    }

    /// Completes the file and renames it into place.
    pub fn finish(self) -> Result<()> {
        self.seal()?.persist()
    }

    /// Completes the file under its temporary name (see `io::Sealed`).
    pub fn seal(self) -> Result<Sealed> {
        let TableWriter {
            writer, file, dest, ..
        } = self;
        writer.close().map_err(|e| write_error(&dest, e))?;
        file.seal()
    }
}

/// A Parquet writer's failure: an I/O error (a full disk) is an I/O error on the file.
fn write_error(dest: &Path, e: parquet::errors::ParquetError) -> Error {
    match e {
        parquet::errors::ParquetError::External(b) => match b.downcast::<std::io::Error>() {
            Ok(io) => Error::io(dest, *io),
            Err(b) => Error::internal(format!("{}: {b}", dest.display())),
        },
        e => Error::internal(format!("{}: {e}", dest.display())),
    }
}

/// Writes one batch as a Parquet file, atomically.
pub fn write_parquet(dest: impl AsRef<Path>, batch: &RecordBatch, meta: &Meta) -> Result<()> {
    seal_parquet(dest, batch, meta)?.persist()
}

/// Writes one batch as a Parquet file under its temporary name (see `io::Sealed`).
pub fn seal_parquet(dest: impl AsRef<Path>, batch: &RecordBatch, meta: &Meta) -> Result<Sealed> {
    let mut w = TableWriter::create(dest, batch.schema(), meta)?;
    w.write(batch)?;
    w.seal()
}

/// A whole Parquet file in memory, as one batch, with its footer metadata.
pub struct Table {
    pub path: PathBuf,
    pub batch: RecordBatch,
    pub meta: Meta,
}

/// Reads a Parquet file's footer metadata only.
pub fn read_meta(path: impl AsRef<Path>) -> Result<Meta> {
    let path = path.as_ref();
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let b = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| Error::format(path, format!("not a readable Parquet file: {e}")))?;
    Ok(kv_of(b.metadata().file_metadata().key_value_metadata()))
}

fn kv_of(kv: Option<&Vec<KeyValue>>) -> Meta {
    kv.map(|kv| {
        kv.iter()
            .filter_map(|k| k.value.clone().map(|v| (k.key.clone(), v)))
            .collect()
    })
    .unwrap_or_default()
}

/// Reads a whole Parquet file (only the named columns when `columns` is given).
pub fn read_parquet(path: impl AsRef<Path>, columns: Option<&[&str]>) -> Result<Table> {
    let path = path.as_ref();
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut b = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| Error::format(path, format!("not a readable Parquet file: {e}")))?
        .with_batch_size(1 << 16);
    let meta = kv_of(b.metadata().file_metadata().key_value_metadata());
    if let Some(cols) = columns {
        let schema = b.schema().clone();
        let mut idx = Vec::new();
        for c in cols {
            match schema.index_of(c) {
                Ok(i) => idx.push(i),
                Err(_) => {
                    return Err(Error::input(format!(
                        "{}: no column '{c}' (columns: {})",
                        path.display(),
                        schema
                            .fields()
                            .iter()
                            .map(|f| f.name().as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )))
                }
            }
        }
        let mask = parquet::arrow::ProjectionMask::roots(b.parquet_schema(), idx);
        b = b.with_projection(mask);
    }
    let reader = b
        .build()
        .map_err(|e| Error::format(path, format!("cannot read: {e}")))?;
    let schema = reader.schema();
    let mut batches = Vec::new();
    for batch in reader {
        batches.push(batch.map_err(|e| Error::format(path, format!("cannot read: {e}")))?);
    }
    let batch = arrow::compute::concat_batches(&schema, &batches)
        .map_err(|e| Error::internal(format!("{}: {e}", path.display())))?;
    Ok(Table {
        path: path.to_path_buf(),
        batch,
        meta,
    })
}

impl Table {
    /// The column `name`, required to exist with type `ty`.
    /// Column `name` as its concrete array type `A` (of Arrow type `ty`).
    pub fn typed<A: 'static>(&self, name: &str, ty: &DataType) -> Result<&A> {
        self.column(name, ty)?
            .as_any()
            .downcast_ref::<A>()
            .ok_or_else(|| {
                Error::internal(format!(
                    "{}: column '{name}' is not the array type of {ty}",
                    self.path.display()
                ))
            })
    }

    pub fn column(&self, name: &str, ty: &DataType) -> Result<&ArrayRef> {
        let col = self.batch.column_by_name(name).ok_or_else(|| {
            Error::input(format!(
                "{}: missing column '{name}' (expected {ty})",
                self.path.display()
            ))
        })?;
        if col.data_type() != ty {
            return Err(Error::input(format!(
                "{}: column '{name}' has type {}, expected {ty}",
                self.path.display(),
                col.data_type()
            )));
        }
        Ok(col)
    }

    pub fn optional_column(&self, name: &str, ty: &DataType) -> Result<Option<&ArrayRef>> {
        if self.batch.column_by_name(name).is_none() {
            return Ok(None);
        }
        self.column(name, ty).map(Some)
    }

    /// A non-nullable column: refuses nulls, naming the first bad row.
    pub fn require_no_nulls(&self, name: &str, col: &dyn Array) -> Result<()> {
        if col.null_count() > 0 {
            let row = (0..col.len()).find(|&i| col.is_null(i)).unwrap_or(0);
            return Err(Error::input(format!(
                "{}: row {row}: column '{name}' is null; it must always have a value",
                self.path.display()
            )));
        }
        Ok(())
    }

    pub fn rows(&self) -> usize {
        self.batch.num_rows()
    }
}
