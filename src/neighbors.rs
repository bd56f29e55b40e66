//! The neighbours table (`neighbors.parquet`): what `simile-distance` and `simile-rerank`
//! write and `simile-score` reads. Columns `query_id` (int64), `rank` (int32, from 1),
//! `gallery_id` (int64), `distance` (float32), sorted by query id then rank. Schema and
//! metadata keys in `schemas/neighbors.md`.
use crate::error::{Error, Result};
use crate::table::{self, Meta, TableWriter};
use arrow::array::{Array, ArrayRef, Float32Array, Int32Array, Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};
use std::path::Path;
use std::sync::Arc;

pub const SCHEMA_VERSION: &str = "1";

pub fn arrow_schema() -> Schema {
    Schema::new(vec![
        Field::new("query_id", DataType::Int64, false),
        Field::new("rank", DataType::Int32, false),
        Field::new("gallery_id", DataType::Int64, false),
        Field::new("distance", DataType::Float32, false),
    ])
}

/// Footer metadata of a neighbours file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NeighborsMeta {
    /// `l2`, `cosine` or `dot`.
    pub metric: String,
    /// The k searched for (lists can be shorter).
    pub k: usize,
    /// The split searched (one-dataset form); `None` for the two-sided form.
    pub split: Option<String>,
    /// Path and content hash of the (query) dataset.
    pub dataset: String,
    pub dataset_fingerprint: String,
    /// Two-sided form: the gallery dataset and its hash.
    pub gallery_dataset: Option<String>,
    pub gallery_dataset_fingerprint: Option<String>,
    /// Two-sided form: the splits the queries and the gallery were taken from (`None`: every
    /// row of their dataset).
    pub query_split: Option<String>,
    pub gallery_split: Option<String>,
    pub n_queries: usize,
    pub n_gallery: usize,
    /// Exclusions applied, e.g. `self,sequence`.
    pub exclusions: String,
    /// False for a shard part.
    pub complete: bool,
    /// Further keys (`simile.*`) written by later stages (rerank method and parameters).
    pub extra: Meta,
}

impl NeighborsMeta {
    /// A two-sided file's query and gallery splits, parsed (`None`: every row).
    pub fn two_sided_splits(
        &self,
        path: &Path,
    ) -> Result<(Option<crate::dataset::Split>, Option<crate::dataset::Split>)> {
        let parse = |key: &str, v: &Option<String>| {
            v.as_deref()
                .map(|s| {
                    s.parse().map_err(|e: String| {
                        Error::input(format!("{}: metadata simile.{key}: {e}", path.display()))
                    })
                })
                .transpose()
        };
        Ok((
            parse("query_split", &self.query_split)?,
            parse("gallery_split", &self.gallery_split)?,
        ))
    }

    pub fn to_kv(&self) -> Meta {
        let mut m = self.extra.clone();
        let mut put = |k: &str, v: String| {
            m.insert(format!("simile.{k}"), v);
        };
        put("artifact", "neighbors".into());
        put("schema_version", SCHEMA_VERSION.into());
        put("metric", self.metric.clone());
        put("k", self.k.to_string());
        put("split", self.split.clone().unwrap_or_default());
        put("dataset", self.dataset.clone());
        put("dataset_fingerprint", self.dataset_fingerprint.clone());
        if let Some(g) = &self.gallery_dataset {
            put("gallery_dataset", g.clone());
        }
        if let Some(g) = &self.gallery_dataset_fingerprint {
            put("gallery_dataset_fingerprint", g.clone());
        }
        if let Some(q) = &self.query_split {
            put("query_split", q.clone());
        }
        if let Some(g) = &self.gallery_split {
            put("gallery_split", g.clone());
        }
        put("n_queries", self.n_queries.to_string());
        put("n_gallery", self.n_gallery.to_string());
        put("exclusions", self.exclusions.clone());
        put("complete", self.complete.to_string());
        m
    }

    pub fn from_kv(path: &Path, kv: &Meta) -> Result<Self> {
        if kv.get("simile.artifact").map(String::as_str) != Some("neighbors") {
            return Err(Error::input(format!(
                "{}: not a simile neighbours file (no simile.artifact=neighbors in its metadata)",
                path.display()
            )));
        }
        let get = |k: &str| kv.get(&format!("simile.{k}")).cloned();
        let num = |k: &str| -> Result<usize> {
            get(k).and_then(|v| v.parse().ok()).ok_or_else(|| {
                Error::input(format!(
                    "{}: metadata key simile.{k} missing or not a number",
                    path.display()
                ))
            })
        };
        let extra = kv
            .iter()
            .filter(|(k, _)| {
                k.starts_with("simile.")
                    && ![
                        "artifact",
                        "schema_version",
                        "metric",
                        "k",
                        "split",
                        "dataset",
                        "dataset_fingerprint",
                        "gallery_dataset",
                        "gallery_dataset_fingerprint",
                        "query_split",
                        "gallery_split",
                        "n_queries",
                        "n_gallery",
                        "exclusions",
                        "complete",
                    ]
                    .contains(&&k["simile.".len()..])
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Ok(NeighborsMeta {
            metric: get("metric").unwrap_or_default(),
            k: num("k")?,
            split: get("split").filter(|s| !s.is_empty()),
            dataset: get("dataset").unwrap_or_default(),
            dataset_fingerprint: get("dataset_fingerprint").unwrap_or_default(),
            gallery_dataset: get("gallery_dataset"),
            gallery_dataset_fingerprint: get("gallery_dataset_fingerprint"),
            query_split: get("query_split").filter(|s| !s.is_empty()),
            gallery_split: get("gallery_split").filter(|s| !s.is_empty()),
            n_queries: num("n_queries")?,
            n_gallery: num("n_gallery")?,
            exclusions: get("exclusions").unwrap_or_default(),
            complete: get("complete").as_deref() != Some("false"),
            extra,
        })
    }
}

/// Streams neighbour lists, query by query in id order, into a Parquet file, atomically.
pub struct NeighborsWriter {
    w: TableWriter,
    q: Vec<i64>,
    r: Vec<i32>,
    g: Vec<i64>,
    d: Vec<f32>,
    rows: u64,
}

const FLUSH_ROWS: usize = 1 << 20;

impl NeighborsWriter {
    pub fn create(dest: &Path, meta: &NeighborsMeta) -> Result<Self> {
        Ok(NeighborsWriter {
            w: TableWriter::create(dest, Arc::new(arrow_schema()), &meta.to_kv())?,
            q: Vec::new(),
            r: Vec::new(),
            g: Vec::new(),
            d: Vec::new(),
            rows: 0,
        })
    }

    /// Appends one query's list, already sorted by (distance, gallery id).
    pub fn push(&mut self, query_id: i64, gallery_ids: &[i64], distances: &[f32]) -> Result<()> {
        debug_assert_eq!(gallery_ids.len(), distances.len());
        for (i, (&g, &d)) in gallery_ids.iter().zip(distances).enumerate() {
            self.q.push(query_id);
            self.r.push(i as i32 + 1);
            self.g.push(g);
            self.d.push(d);
        }
        if self.q.len() >= FLUSH_ROWS {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.q.is_empty() {
            return Ok(());
        }
        self.rows += self.q.len() as u64;
        let cols: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from(std::mem::take(&mut self.q))),
            Arc::new(Int32Array::from(std::mem::take(&mut self.r))),
            Arc::new(Int64Array::from(std::mem::take(&mut self.g))),
            Arc::new(Float32Array::from(std::mem::take(&mut self.d))),
        ];
        let b = RecordBatch::try_new(Arc::new(arrow_schema()), cols)
            .map_err(|e| Error::internal(e.to_string()))?;
        self.w.write(&b)
    }

    /// Completes the file and renames it into place (a file with no manifest); returns the
    /// number of rows written.
    pub fn finish(self) -> Result<u64> {
        let (sealed, rows) = self.seal()?;
        sealed.persist()?;
        Ok(rows)
    }

    /// Completes the file under its temporary name (committed with its manifest); returns it
    /// and the number of rows written.
    pub fn seal(mut self) -> Result<(crate::io::Sealed, u64)> {
        self.flush()?;
        Ok((self.w.seal()?, self.rows))
    }
}

/// A whole neighbours file in memory, columnar.
pub struct Neighbors {
    pub query_id: Vec<i64>,
    pub rank: Vec<i32>,
    pub gallery_id: Vec<i64>,
    pub distance: Vec<f32>,
    pub meta: NeighborsMeta,
}

impl Neighbors {
    /// Reads a neighbours file; refuses shard parts.
    pub fn read(path: &Path) -> Result<Neighbors> {
        crate::parts::refuse_part(path)?;
        let t = table::read_parquet(path, None)?;
        let meta = NeighborsMeta::from_kv(path, &t.meta)?;
        if !meta.complete {
            return Err(Error::input(format!(
                "{} is a shard part (simile.complete=false); join the parts with `simile-distance merge` first",
                path.display()
            )));
        }
        let i64c = |n: &str| -> Result<Vec<i64>> {
            let c = t.column(n, &DataType::Int64)?;
            t.require_no_nulls(n, c.as_ref())?;
            Ok(c.as_any()
                .downcast_ref::<Int64Array>()
                .unwrap()
                .values()
                .to_vec())
        };
        let rank = {
            let c = t.column("rank", &DataType::Int32)?;
            t.require_no_nulls("rank", c.as_ref())?;
            c.as_any()
                .downcast_ref::<Int32Array>()
                .unwrap()
                .values()
                .to_vec()
        };
        let distance = {
            let c = t.column("distance", &DataType::Float32)?;
            t.require_no_nulls("distance", c.as_ref())?;
            c.as_any()
                .downcast_ref::<Float32Array>()
                .unwrap()
                .values()
                .to_vec()
        };
        Ok(Neighbors {
            query_id: i64c("query_id")?,
            rank,
            gallery_id: i64c("gallery_id")?,
            distance,
            meta,
        })
    }

    pub fn len(&self) -> usize {
        self.query_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.query_id.is_empty()
    }

    /// Row ranges of each query's list, in file order: (query_id, start, end).
    pub fn groups(&self) -> Vec<(i64, usize, usize)> {
        let mut out = Vec::new();
        let mut s = 0;
        for i in 1..=self.len() {
            if i == self.len() || self.query_id[i] != self.query_id[s] {
                out.push((self.query_id[s], s, i));
                s = i;
            }
        }
        out
    }
}
