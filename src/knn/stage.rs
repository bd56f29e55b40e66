//! The distance stage: datasets and embeddings in, `neighbors.parquet` and its manifest out.
//!
//! Embedding rows map to dataset ids through the sibling `<stem>.ids.npy`; without one, the
//! `.npy` must have exactly the rows of the split (in id order) or of the whole dataset.
use crate::dataset::{Dataset, Split};
use crate::error::{Error, Result};
use crate::io::Fingerprint;
use crate::knn::rows::Rows;
use crate::knn::search::{self, Job};
use crate::knn::{Compute, Engine, Metric};
use crate::manifest::{self, ManifestBuilder};
use crate::neighbors::{NeighborsMeta, NeighborsWriter};
use crate::npy::{self, Npy};
use crate::retrieval::{QueryGallery, SequenceRule};
use crate::shard::{self, ShardSpec};
use std::path::{Path, PathBuf};

/// Where queries and gallery come from.
#[derive(Clone, Debug)]
pub enum Inputs {
    /// One dataset: queries are the split's `is_query` rows, the gallery its `is_gallery` rows.
    One {
        dataset: PathBuf,
        embeddings: PathBuf,
        split: Split,
    },
    /// Two datasets searched one against the other (no self-exclusion); each side is the
    /// given split's rows, or all rows.
    Two {
        query_dataset: PathBuf,
        query_embeddings: PathBuf,
        query_split: Option<Split>,
        gallery_dataset: PathBuf,
        gallery_embeddings: PathBuf,
        gallery_split: Option<Split>,
    },
}

/// Which side a shard part splits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShardKind {
    Query,
    Gallery,
}

impl ShardKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ShardKind::Query => "query",
            ShardKind::Gallery => "gallery",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Options {
    pub inputs: Inputs,
    pub out: PathBuf,
    pub k: usize,
    pub metric: Metric,
    pub compute: Compute,
    pub engine: Engine,
    pub shard: Option<(ShardKind, ShardSpec)>,
    /// Bytes for one query chunk's rows and candidate buffers.
    pub memory_budget: usize,
}

/// What a run did, for the one-line summary.
#[derive(Clone, Debug)]
pub struct Summary {
    pub out: PathBuf,
    pub queries: usize,
    pub gallery: usize,
    pub k: usize,
    pub metric: Metric,
    pub compute: Compute,
    pub engine: String,
    pub rows: u64,
    pub seconds: f64,
    pub stats: search::Stats,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "simile-distance: {} queries x {} gallery, k={}, {}, {}, {}: {:.2} s ({} rows -> {})",
            self.queries,
            self.gallery,
            self.k,
            self.metric,
            self.compute,
            self.engine,
            self.seconds,
            self.rows,
            self.out.display()
        )
    }
}

/// `.npy` rows of a side's dataset rows; every side row must have one.
pub fn side_map(
    of_row: &[usize],
    side_rows: &[usize],
    ds: &Dataset,
    ds_path: &Path,
    emb_path: &Path,
    role: &str,
) -> Result<Vec<usize>> {
    side_rows
        .iter()
        .map(|&r| {
            let e = of_row[r];
            if e == usize::MAX {
                Err(Error::input(format!(
                    "{}: id {} (a {role} row) has no embedding: {} does not list it",
                    ds_path.display(),
                    ds.ids[r],
                    npy::ids_path(emb_path).display()
                )))
            } else {
                Ok(e)
            }
        })
        .collect()
}

pub fn open_embeddings(path: &Path, dataset: &Path) -> Result<Npy> {
    shard::refuse_part(path)?;
    let n = Npy::open(path)?;
    n.expect_matrix()?;
    if n.cols() == 0 {
        return Err(Error::input(format!(
            "{}: embeddings of dimension 0",
            path.display()
        )));
    }
    manifest::check_upstream(path, "dataset", dataset)?;
    Ok(n)
}

/// Reads only the columns a search needs (ids, split, flags, sequence, label, category),
/// streaming record batches into the vectors: a 2M-row gallery's dataset then costs tens
/// of MB, where `Dataset::read` materialises every column (paths, texts, boxes) at once.
/// The result is a `Dataset` with `path`, `text` and `bbox` left empty; the checks that
/// matter here (artifact, sorted unique ids, split values, nulls) are the same.
fn read_dataset(path: &Path) -> Result<Dataset> {
    use arrow::array::{Array, BooleanArray, Int64Array, StringArray};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    shard::refuse_part(path)?;
    let meta = crate::table::read_meta(path)?;
    if meta.get("simile.artifact").map(String::as_str) != Some("dataset")
        || meta
            .get("simile.schema_version")
            .is_some_and(|v| v != crate::dataset::SCHEMA_VERSION)
    {
        // Not a dataset this version reads: the full reader says why.
        return Dataset::read(path);
    }
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let b = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| Error::format(path, format!("not a readable Parquet file: {e}")))?;
    let wanted = [
        "id",
        "label",
        "split",
        "is_query",
        "is_gallery",
        "category",
        "sequence",
    ];
    let schema = b.schema().clone();
    let mut idx = Vec::new();
    for c in wanted {
        idx.push(
            schema
                .index_of(c)
                .map_err(|_| Error::input(format!("{}: missing column '{c}'", path.display())))?,
        );
    }
    let mask = parquet::arrow::ProjectionMask::roots(b.parquet_schema(), idx);
    let reader = b
        .with_projection(mask)
        .with_batch_size(1 << 16)
        .build()
        .map_err(|e| Error::format(path, format!("cannot read: {e}")))?;
    let n = reader_rows_hint(path);
    let mut ds = Dataset {
        ids: Vec::with_capacity(n),
        label: Vec::with_capacity(n),
        split: Vec::with_capacity(n),
        is_query: Vec::with_capacity(n),
        is_gallery: Vec::with_capacity(n),
        category: Vec::with_capacity(n),
        sequence: Vec::with_capacity(n),
        file: path.to_path_buf(),
        ..Dataset::default()
    };
    let typed = |b: &arrow::array::RecordBatch, c: &str| -> Result<arrow::array::ArrayRef> {
        b.column_by_name(c)
            .cloned()
            .ok_or_else(|| Error::input(format!("{}: missing column '{c}'", path.display())))
    };
    fn cast<'a, T: 'static>(a: &'a arrow::array::ArrayRef, path: &Path, c: &str) -> Result<&'a T> {
        a.as_any().downcast_ref::<T>().ok_or_else(|| {
            Error::input(format!(
                "{}: column '{c}' has type {}, not the dataset schema's",
                path.display(),
                a.data_type()
            ))
        })
    }
    for batch in reader {
        let batch = batch.map_err(|e| Error::format(path, format!("cannot read: {e}")))?;
        let (id_a, label_a, split_a) = (
            typed(&batch, "id")?,
            typed(&batch, "label")?,
            typed(&batch, "split")?,
        );
        let (q_a, g_a) = (typed(&batch, "is_query")?, typed(&batch, "is_gallery")?);
        let (cat_a, seq_a) = (typed(&batch, "category")?, typed(&batch, "sequence")?);
        let id = cast::<Int64Array>(&id_a, path, "id")?;
        let split = cast::<StringArray>(&split_a, path, "split")?;
        if id.null_count() > 0 || split.null_count() > 0 {
            // The full reader names the row.
            return Dataset::read(path);
        }
        ds.ids.extend_from_slice(id.values());
        ds.label
            .extend(cast::<Int64Array>(&label_a, path, "label")?.iter());
        for s in split.iter() {
            let row = ds.split.len();
            ds.split
                .push(s.unwrap_or_default().parse::<Split>().map_err(|e| {
                    Error::input(format!(
                        "{}: row {row}: column 'split': {e}",
                        path.display()
                    ))
                })?);
        }
        ds.is_query
            .extend(cast::<BooleanArray>(&q_a, path, "is_query")?.iter());
        ds.is_gallery
            .extend(cast::<BooleanArray>(&g_a, path, "is_gallery")?.iter());
        ds.category.extend(
            cast::<StringArray>(&cat_a, path, "category")?
                .iter()
                .map(|v| v.map(str::to_string)),
        );
        ds.sequence.extend(
            cast::<StringArray>(&seq_a, path, "sequence")?
                .iter()
                .map(|v| v.map(str::to_string)),
        );
    }
    if let Some(w) = ds.ids.windows(2).position(|w| w[0] >= w[1]) {
        return Err(Error::input(format!(
            "{}: row {}: ids must be unique and sorted ascending, found {} after {}",
            path.display(),
            w + 1,
            ds.ids[w + 1],
            ds.ids[w]
        )));
    }
    Ok(ds)
}

/// The row count from the Parquet footer, to size the vectors once.
fn reader_rows_hint(path: &Path) -> usize {
    std::fs::File::open(path)
        .ok()
        .and_then(|f| parquet::file::reader::SerializedFileReader::new(f).ok())
        .map(|r| {
            use parquet::file::reader::FileReader;
            r.metadata().file_metadata().num_rows().max(0) as usize
        })
        .unwrap_or(0)
}

fn fingerprint(path: &Path) -> Result<String> {
    Ok(Fingerprint::of(path)?.hash)
}

/// Runs the stage.
pub fn run(opts: &Options) -> Result<Summary> {
    let started = std::time::Instant::now();
    if opts.k == 0 {
        return Err(Error::input("--top-k must be at least 1"));
    }
    let out = match opts.shard {
        Some((_, spec)) => spec.part_path(&opts.out),
        None => opts.out.clone(),
    };
    let (q_ds_path, q_emb_path, g_ds_path, g_emb_path) = match &opts.inputs {
        Inputs::One {
            dataset,
            embeddings,
            ..
        } => (dataset, embeddings, dataset, embeddings),
        Inputs::Two {
            query_dataset,
            query_embeddings,
            gallery_dataset,
            gallery_embeddings,
            ..
        } => (
            query_dataset,
            query_embeddings,
            gallery_dataset,
            gallery_embeddings,
        ),
    };

    // Datasets, the query/gallery sets (and with them the exclusion rule), embeddings.
    let q_ds = read_dataset(q_ds_path)?;
    let g_ds_owned;
    let (qg, q_split, g_split) = match &opts.inputs {
        Inputs::One { split, .. } => {
            g_ds_owned = None;
            (
                QueryGallery::from_dataset(&q_ds, *split, SequenceRule::default())?,
                Some(*split),
                Some(*split),
            )
        }
        Inputs::Two {
            query_split,
            gallery_split,
            ..
        } => {
            let g = read_dataset(g_ds_path)?;
            let qg = QueryGallery::two_sided(
                &q_ds,
                *query_split,
                &g,
                *gallery_split,
                SequenceRule::default(),
            )?;
            g_ds_owned = Some(g);
            (qg, *query_split, *gallery_split)
        }
    };
    let g_ds = g_ds_owned.as_ref().unwrap_or(&q_ds);
    let q_npy = open_embeddings(q_emb_path, q_ds_path)?;
    let g_npy_owned = if g_emb_path == q_emb_path {
        None
    } else {
        Some(open_embeddings(g_emb_path, g_ds_path)?)
    };
    let g_npy = g_npy_owned.as_ref().unwrap_or(&q_npy);
    if q_npy.cols() != g_npy.cols() {
        return Err(Error::input(format!(
            "dimension mismatch: {} has {} columns but {} has {}",
            q_emb_path.display(),
            q_npy.cols(),
            g_emb_path.display(),
            g_npy.cols()
        )));
    }
    let q_of_row =
        crate::embeddings::rows_of_dataset(&q_ds, q_ds_path, &q_npy, q_emb_path, q_split)?;
    let q_map = side_map(
        &q_of_row,
        &qg.queries.rows,
        &q_ds,
        q_ds_path,
        q_emb_path,
        "query",
    )?;
    let g_map = if g_npy_owned.is_none() && std::ptr::eq(g_ds, &q_ds) {
        side_map(
            &q_of_row,
            &qg.gallery.rows,
            g_ds,
            g_ds_path,
            g_emb_path,
            "gallery",
        )?
    } else {
        drop(q_of_row);
        let g_of_row =
            crate::embeddings::rows_of_dataset(g_ds, g_ds_path, g_npy, g_emb_path, g_split)?;
        side_map(
            &g_of_row,
            &qg.gallery.rows,
            g_ds,
            g_ds_path,
            g_emb_path,
            "gallery",
        )?
    };
    // The datasets are no longer needed (the sides hold what the search uses): free them
    // before the search, whose memory is bounded by its blocks.
    let (q_ds_fp, g_ds_fp) = (fingerprint(q_ds_path)?, fingerprint(g_ds_path)?);
    drop(g_ds_owned);
    drop(q_ds);
    let queries = Rows::new(&q_npy, &q_map, &qg.queries.ids);
    let gallery = Rows::new(g_npy, &g_map, &qg.gallery.ids);

    // Shards: a contiguous range of query or gallery positions (id order).
    let mut q_range = 0..queries.len();
    let mut g_range = 0..gallery.len();
    if let Some((kind, spec)) = opts.shard {
        let target = match kind {
            ShardKind::Query => &mut q_range,
            ShardKind::Gallery => &mut g_range,
        };
        let (a, b) = spec.range(target.end);
        *target = a..b;
    }

    let two = matches!(opts.inputs, Inputs::Two { .. });
    let exclusions = if two { "sequence" } else { "self,sequence" };
    let mut extra = crate::table::Meta::new();
    extra.insert("simile.compute".into(), opts.compute.as_str().into());
    if let Some((kind, spec)) = opts.shard {
        extra.insert("simile.shard".into(), format!("{} {spec}", kind.as_str()));
    }
    let meta = NeighborsMeta {
        metric: opts.metric.as_str().into(),
        k: opts.k,
        split: if two {
            None
        } else {
            q_split.map(|s| s.as_str().to_string())
        },
        dataset: q_ds_path.display().to_string(),
        dataset_fingerprint: q_ds_fp,
        gallery_dataset: two.then(|| g_ds_path.display().to_string()),
        gallery_dataset_fingerprint: two.then_some(g_ds_fp),
        n_queries: q_range.len(),
        n_gallery: g_range.len(),
        exclusions: exclusions.into(),
        complete: opts.shard.is_none(),
        extra,
    };
    let params = serde_json::json!({
        "form": if two { "two-sided" } else { "one-dataset" },
        "metric": opts.metric.as_str(),
        "k": opts.k,
        "split": if two { None } else { q_split.map(|s| s.as_str()) },
        "query_split": if two { query_split_str(&opts.inputs) } else { None },
        "gallery_split": if two { gallery_split_str(&opts.inputs) } else { None },
        "compute": opts.compute.as_str(),
        "exclusions": exclusions,
        "shard": opts.shard.map(|(k, _)| k.as_str()),
    });

    let mut mb = ManifestBuilder::new("distance", params);
    mb.input("dataset", q_ds_path)?;
    mb.input("embeddings", q_emb_path)?;
    if two {
        mb.input("gallery_dataset", g_ds_path)?;
        mb.input("gallery_embeddings", g_emb_path)?;
    }
    if let Some((kind, spec)) = opts.shard {
        let r = match kind {
            ShardKind::Query => &q_range,
            ShardKind::Gallery => &g_range,
        };
        mb.shard(spec, r.start, r.end);
    }
    // Recorded before the search so an up-to-date output is not computed again.
    mb.skip_if_done(&out)?;
    let mut writer = NeighborsWriter::create(&out, &meta)?;
    let job = Job {
        queries: &queries,
        gallery: &gallery,
        q_range: q_range.clone(),
        g_range: g_range.clone(),
        k: opts.k,
        metric: opts.metric,
        compute: opts.compute,
        engine: opts.engine,
        qg: &qg,
        memory_budget: opts.memory_budget,
    };
    let mut ids: Vec<i64> = Vec::with_capacity(opts.k);
    let mut dists: Vec<f32> = Vec::with_capacity(opts.k);
    let t_search = std::time::Instant::now();
    let stats = search::search(&job, |q, list| {
        ids.clear();
        dists.clear();
        for &(g, dist) in list {
            ids.push(qg.gallery.ids[g as usize]);
            dists.push(dist);
        }
        writer.push(qg.queries.ids[q], &ids, &dists)
    })?;
    let seconds_search = t_search.elapsed().as_secs_f64();
    let (sealed, rows) = writer.seal()?;

    mb.rows("queries", q_range.len() as u64)
        .rows("gallery", g_range.len() as u64)
        .rows("neighbors", rows)
        .rows("candidates_rescored", stats.candidates_rescored)
        .timing("search", seconds_search)
        .timing("scan", stats.seconds_scan)
        .timing("rescore", stats.seconds_rescore)
        .timing("scan_cpu", stats.cpu_scan)
        .timing("rescore_cpu", stats.cpu_rescore);
    mb.commit(sealed, Vec::new())?;
    Ok(Summary {
        out,
        queries: q_range.len(),
        gallery: g_range.len(),
        k: opts.k,
        metric: opts.metric,
        compute: opts.compute,
        engine: opts.engine.describe(),
        rows,
        seconds: started.elapsed().as_secs_f64(),
        stats,
    })
}

fn query_split_str(i: &Inputs) -> Option<&'static str> {
    match i {
        Inputs::Two { query_split, .. } => query_split.map(|s| s.as_str()),
        _ => None,
    }
}

fn gallery_split_str(i: &Inputs) -> Option<&'static str> {
    match i {
        Inputs::Two { gallery_split, .. } => gallery_split.map(|s| s.as_str()),
        _ => None,
    }
}
