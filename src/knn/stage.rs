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
use crate::shard::ShardSpec;
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
                Err(no_embedding(ds_path, ds.ids[r], emb_path, role))
            } else {
                Ok(e)
            }
        })
        .collect()
}

fn no_embedding(ds_path: &Path, id: i64, emb_path: &Path, role: &str) -> Error {
    let skipped = crate::embeddings::skipped_rows(emb_path).unwrap_or_default();
    if let Some((_, line)) = skipped.iter().find(|(i, _)| *i == id) {
        return Error::input(format!(
            "{}: id {id} (a {role} row) has no embedding: simile-embed left it out (--on-bad-image skip), as {} says ({} rows in all; this one: {}). A search needs every query and gallery row: repair or replace those images and re-run simile-embed, or leave the rows out of the dataset (remove them from the CSV or folder and re-run simile-prepare)",
            ds_path.display(),
            crate::npy::skipped_path(emb_path).display(),
            skipped.len(),
            line.replace('\t', " | ")
        ));
    }
    Error::input(format!(
        "{}: id {id} (a {role} row) has no embedding: {} does not list it",
        ds_path.display(),
        npy::ids_path(emb_path).display()
    ))
}

/// The `.npy` rows of a side's ids: through the ids file (searched in place, see
/// `embeddings::IdRows`), or, for a file without one, the dataset's rule
/// (`embeddings::rows_of_dataset`, which reads the dataset).
fn side_rows_of(
    side: &crate::retrieval::Side,
    emb: &Npy,
    ids: Option<&crate::embeddings::IdRows>,
    ds_path: &Path,
    split: Option<Split>,
    role: &str,
) -> Result<Vec<usize>> {
    match ids {
        Some(ids) => side
            .ids
            .iter()
            .map(|&id| {
                ids.row_of(id)
                    .ok_or_else(|| no_embedding(ds_path, id, emb.path(), role))
            })
            .collect(),
        None => {
            let ds = Dataset::read(ds_path)?;
            let of_row = crate::embeddings::rows_of_dataset(&ds, ds_path, emb, emb.path(), split)?;
            side_map(&of_row, &side.rows, &ds, ds_path, emb.path(), role)
        }
    }
}

/// The byte ranges of an embeddings file and its ids that rows `map` occupy (first to last),
/// for fingerprinting and checking only what a shard worker reads.
fn ranges_of(
    emb: &Npy,
    ids: Option<&crate::embeddings::IdRows>,
    map: &[usize],
) -> Vec<(PathBuf, u64, u64)> {
    let (Some(&lo), Some(&hi)) = (map.iter().min(), map.iter().max()) else {
        return vec![(emb.path().to_path_buf(), 0, 1)];
    };
    let rb = (emb.cols() * emb.dtype.size()) as u64;
    let off = emb.data_offset() as u64;
    let mut v = vec![(
        emb.path().to_path_buf(),
        off + lo as u64 * rb,
        off + (hi as u64 + 1) * rb,
    )];
    if let Some(ids) = ids {
        v.push((
            ids.path().to_path_buf(),
            ids.byte_of(lo),
            ids.byte_of(hi + 1),
        ));
    }
    v
}

/// Refuses an ids file that lists an id the dataset does not have (embeddings of another
/// dataset); `all` is every dataset id, sorted (empty: not checked, a shard worker's case).
fn check_listed(ids: &crate::embeddings::IdRows, all: &[i64], ds_path: &Path) -> Result<()> {
    if all.is_empty() {
        return Ok(());
    }
    for e in 0..ids.len() {
        let id = ids.id(e);
        if all.binary_search(&id).is_err() {
            return Err(Error::input(format!(
                "{}: row {e}: id {id} is not in {}; were these embeddings made from another dataset?",
                ids.path().display(),
                ds_path.display()
            )));
        }
    }
    Ok(())
}

fn fingerprint(path: &Path) -> Result<String> {
    Ok(Fingerprint::of(path)?.hash)
}

/// Records one side's embeddings as an input: a two-sided shard's windowed side is checked
/// and fingerprinted in its rows' byte range only, anything else whole.
#[allow(clippy::too_many_arguments)]
fn embeddings_input(
    mb: &mut ManifestBuilder,
    role: &str,
    npy: &Npy,
    ids: Option<&crate::embeddings::IdRows>,
    map: &[usize],
    partial: bool,
    dataset: &Path,
) -> Result<()> {
    if partial {
        let ranges = ranges_of(npy, ids, map);
        crate::parts::refuse_part_ranges(npy.path(), &ranges)?;
        manifest::check_upstream_part(npy.path(), &ranges, "dataset", dataset)?;
        mb.input_part(role, npy.path(), &ranges)?;
    } else {
        crate::parts::refuse_part(npy.path())?;
        manifest::check_upstream(npy.path(), "dataset", dataset)?;
        mb.input(role, npy.path())?;
    }
    Ok(())
}

/// Runs the stage.
///
/// Each side is read from its dataset with only the columns a search needs
/// (`dataset::read_sides`), a shard's side only its window of rows; embeddings rows are found
/// through the memory-mapped ids, and a two-sided shard's side fingerprinted in its rows' byte
/// range only: a gallery-shard worker's memory and start-up are its shard's, not the gallery's.
pub fn run(opts: &Options) -> Result<Summary> {
    use crate::dataset::{read_sides_and_ids, SideFlag, SidePick};
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
    let window = |kind: ShardKind| match opts.shard {
        Some((k, s)) if k == kind => Some(s),
        _ => None,
    };
    let (q_win, g_win) = (window(ShardKind::Query), window(ShardKind::Gallery));

    // The sides (and with them the exclusion rule): only a shard's window of its side.
    let two = matches!(opts.inputs, Inputs::Two { .. });
    // Every dataset id, for an unsharded run only (see `check_listed`).
    let (q_all, g_all): (Vec<i64>, Vec<i64>);
    let (q_side, g_side, q_split, g_split) = match &opts.inputs {
        Inputs::One { split, .. } => {
            if *split == Split::Train {
                return Err(Error::input(format!(
                    "{}: split 'train' has no query/gallery flags (they are empty on train rows); use --split validation",
                    q_ds_path.display()
                )));
            }
            let pick = |flag, window| SidePick {
                split: Some(*split),
                flag,
                window,
            };
            let (mut v, all) = read_sides_and_ids(
                q_ds_path,
                &[pick(SideFlag::Query, q_win), pick(SideFlag::Gallery, g_win)],
                opts.shard.is_none(),
            )?;
            let g = v.pop().unwrap_or_default();
            let q = v.pop().unwrap_or_default();
            q_all = all.clone();
            g_all = all;
            for (side, what, flag) in [(&q, "query", "is_query"), (&g, "gallery", "is_gallery")] {
                if side.total == 0 {
                    return Err(Error::input(format!(
                        "{}: split '{split}' has no {what} rows ({flag}=True)",
                        q_ds_path.display()
                    )));
                }
            }
            (q, g, Some(*split), Some(*split))
        }
        Inputs::Two {
            query_split,
            gallery_split,
            ..
        } => {
            let one = |path: &Path,
                       split: Option<Split>,
                       window: Option<ShardSpec>,
                       what: &str|
             -> Result<_> {
                let (mut v, all) = read_sides_and_ids(
                    path,
                    &[SidePick {
                        split,
                        flag: SideFlag::Any,
                        window,
                    }],
                    window.is_none() && opts.shard.is_none(),
                )?;
                let side = v.pop().unwrap_or_default();
                if side.total == 0 {
                    return Err(Error::input(format!(
                        "{}: no {what} rows{}",
                        path.display(),
                        split
                            .map(|s| format!(" in split '{s}'"))
                            .unwrap_or_default()
                    )));
                }
                Ok((side, all))
            };
            let (q, qa) = one(q_ds_path, *query_split, q_win, "query")?;
            let (g, ga) = one(g_ds_path, *gallery_split, g_win, "gallery")?;
            (q_all, g_all) = (qa, ga);
            (q, g, *query_split, *gallery_split)
        }
    };
    let (q_total, q_start, g_total, g_start) =
        (q_side.total, q_side.start, g_side.total, g_side.start);
    let qg = QueryGallery::from_sides(q_side, g_side, !two, SequenceRule::default());

    // Embeddings: each side's rows through its ids file.
    let q_npy = crate::embeddings::open_matrix(q_emb_path)?;
    let g_npy_owned = if g_emb_path == q_emb_path {
        None
    } else {
        Some(crate::embeddings::open_matrix(g_emb_path)?)
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
    let q_ids = crate::embeddings::IdRows::open(&q_npy)?;
    let g_ids_owned = match &g_npy_owned {
        Some(g) => crate::embeddings::IdRows::open(g)?,
        None => None,
    };
    let g_ids = if g_npy_owned.is_some() {
        g_ids_owned.as_ref()
    } else {
        q_ids.as_ref()
    };
    if let Some(ids) = &q_ids {
        check_listed(ids, &q_all, q_ds_path)?;
    }
    if let Some(ids) = g_ids.filter(|_| g_npy_owned.is_some()) {
        check_listed(ids, &g_all, g_ds_path)?;
    }
    let q_map = side_rows_of(
        &qg.queries,
        &q_npy,
        q_ids.as_ref(),
        q_ds_path,
        q_split,
        "query",
    )?;
    let g_map = side_rows_of(&qg.gallery, g_npy, g_ids, g_ds_path, g_split, "gallery")?;
    let (q_ds_fp, g_ds_fp) = (fingerprint(q_ds_path)?, fingerprint(g_ds_path)?);
    let queries = Rows::new(&q_npy, &q_map, &qg.queries.ids);
    let gallery = Rows::new(g_npy, &g_map, &qg.gallery.ids);

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
        query_split: query_split_str(&opts.inputs).map(String::from),
        gallery_split: gallery_split_str(&opts.inputs).map(String::from),
        n_queries: queries.len(),
        n_gallery: gallery.len(),
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
    embeddings_input(
        &mut mb,
        "embeddings",
        &q_npy,
        q_ids.as_ref(),
        &q_map,
        two && q_win.is_some(),
        q_ds_path,
    )?;
    if two {
        mb.input("gallery_dataset", g_ds_path)?;
        embeddings_input(
            &mut mb,
            "gallery_embeddings",
            g_npy,
            g_ids,
            &g_map,
            g_win.is_some(),
            g_ds_path,
        )?;
    }
    if let Some((kind, spec)) = opts.shard {
        let (start, n) = match kind {
            ShardKind::Query => (q_start, queries.len()),
            ShardKind::Gallery => (g_start, gallery.len()),
        };
        mb.shard(spec, start, start + n);
    }
    mb.note("queries_total", q_total.into())
        .note("gallery_total", g_total.into());
    // Recorded before the search so an up-to-date output is not computed again.
    mb.skip_if_done(&out)?;
    let mut writer = NeighborsWriter::create(&out, &meta)?;
    let job = Job {
        queries: &queries,
        gallery: &gallery,
        q_range: 0..queries.len(),
        g_range: 0..gallery.len(),
        k: opts.k,
        metric: opts.metric,
        compute: opts.compute,
        engine: opts.engine,
        qg: &qg,
        memory_budget: opts.memory_budget,
    };
    // A list holds at most the gallery: k (a flag) can be far larger.
    let cap = opts.k.min(gallery.len());
    let mut ids: Vec<i64> = Vec::with_capacity(cap);
    let mut dists: Vec<f32> = Vec::with_capacity(cap);
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

    mb.rows("queries", queries.len() as u64)
        .rows("gallery", gallery.len() as u64)
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
        queries: queries.len(),
        gallery: gallery.len(),
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
