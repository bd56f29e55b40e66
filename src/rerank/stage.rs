//! The rerank stage: a neighbours file (+ the dataset, embeddings or a model) in, a
//! re-ranked neighbours file with the same schema and its manifest out.
use crate::dataset::{Dataset, Split};
use crate::error::{Error, Result};
use crate::io::Fingerprint;
use crate::knn::rows::Rows;
use crate::knn::stage::side_map;
use crate::knn::{Engine, Metric};
use crate::manifest::{self, ManifestBuilder};
use crate::neighbors::{Neighbors, NeighborsMeta, NeighborsWriter};
use crate::npy::Npy;
use crate::rerank::kreciprocal::{self, Graph, Rerank};
use crate::rerank::qe::{self, Expansion, Matrix, Searcher};
use crate::rerank::threshold;
use crate::retrieval::{QueryGallery, SequenceRule, Side, NO_SEQUENCE};
use std::path::{Path, PathBuf};

/// A query id and its list of (gallery id, distance).
type IdList = (i64, Vec<(i64, f32)>);

/// Defaults: the literature's (measured on Font-ID in `docs/rerank.md`).
pub const AQE_K: usize = 2;
pub const ALPHA_QE_K: usize = 2;
pub const ALPHA: f64 = 3.0;
pub const DBA_K: usize = 2;
pub const K1: usize = 20;
pub const K2: usize = 6;
pub const LAMBDA: f64 = 0.3;

/// A method and its parameters.
#[derive(Clone, Debug, PartialEq)]
pub enum Method {
    /// Average query expansion over the input lists' top `k`.
    Aqe {
        k: usize,
    },
    /// Alpha-weighted query expansion.
    AlphaQe {
        k: usize,
        alpha: f64,
    },
    /// Database-side augmentation; `qe`: also expand the queries (top k, alpha).
    Dba {
        k: usize,
        alpha: f64,
        qe: Option<(usize, f64)>,
    },
    KReciprocal(kreciprocal::Params),
    /// OML's ConstantThresholding: keep `distance < th`.
    Constant {
        th: f32,
    },
    /// OML's AdaptiveThresholding.
    Adaptive {
        n_std: f64,
    },
    /// OML's PairwiseReranker with a model folder of kind `pairwise`.
    Pairwise {
        model: PathBuf,
        top_n: usize,
        device: tch::Device,
        batch_size: usize,
    },
}

impl Method {
    pub fn name(&self) -> &'static str {
        match self {
            Method::Aqe { .. } => "aqe",
            Method::AlphaQe { .. } => "alpha-qe",
            Method::Dba { .. } => "dba",
            Method::KReciprocal(_) => "k-reciprocal",
            Method::Constant { .. } | Method::Adaptive { .. } => "threshold",
            Method::Pairwise { .. } => "pairwise",
        }
    }

    fn needs_embeddings(&self) -> bool {
        matches!(
            self,
            Method::Aqe { .. }
                | Method::AlphaQe { .. }
                | Method::Dba { .. }
                | Method::KReciprocal(_)
        )
    }

    /// The parameters, as recorded in the metadata and the manifest.
    pub fn params(&self) -> serde_json::Value {
        use serde_json::json;
        match self {
            Method::Aqe { k } => json!({"qe_k": k}),
            Method::AlphaQe { k, alpha } => json!({"qe_k": k, "alpha": alpha}),
            Method::Dba { k, alpha, qe } => json!({
                "dba_k": k, "alpha": alpha,
                "dba_qe": qe.is_some(),
                "qe_k": qe.map(|x| x.0), "qe_alpha": qe.map(|x| x.1),
            }),
            Method::KReciprocal(p) => json!({"k1": p.k1, "k2": p.k2, "lambda": p.lambda}),
            Method::Constant { th } => json!({"mode": "constant", "threshold": th}),
            Method::Adaptive { n_std } => json!({"mode": "adaptive", "n_std": n_std}),
            Method::Pairwise {
                model,
                top_n,
                batch_size,
                ..
            } => {
                json!({"model": model.display().to_string(), "top_n": top_n, "batch_size": batch_size})
            }
        }
    }

    /// Range checks (exit 2 with the flag's name).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::input(m));
        let alpha_ok = |a: f64, flag: &str| -> Result<()> {
            if !(a.is_finite() && a >= 0.0) {
                return bad(format!("{flag} must be a finite number >= 0, got {a}"));
            }
            Ok(())
        };
        match self {
            Method::Aqe { k } | Method::AlphaQe { k, .. } if *k == 0 => {
                bad("--qe-k must be at least 1".into())
            }
            Method::AlphaQe { alpha, .. } => alpha_ok(*alpha, "--alpha"),
            Method::Dba { k, alpha, qe } => {
                if *k == 0 {
                    return bad("--dba-k must be at least 1".into());
                }
                alpha_ok(*alpha, "--alpha")?;
                if let Some((qk, qa)) = qe {
                    if *qk == 0 {
                        return bad("--qe-k must be at least 1".into());
                    }
                    alpha_ok(*qa, "--alpha")?;
                }
                Ok(())
            }
            Method::KReciprocal(p) => {
                if p.k1 == 0 {
                    return bad("--k1 must be at least 1".into());
                }
                if p.k2 == 0 || p.k2 > p.k1 + 1 {
                    return bad(format!(
                        "--k2 must be between 1 and k1 + 1 = {}, got {}",
                        p.k1 + 1,
                        p.k2
                    ));
                }
                if !(0.0..=1.0).contains(&p.lambda) {
                    return bad(format!("--lambda must be in [0, 1], got {}", p.lambda));
                }
                Ok(())
            }
            Method::Constant { th } if !th.is_finite() => {
                bad(format!("--threshold must be finite, got {th}"))
            }
            Method::Adaptive { n_std } if !(n_std.is_finite() && *n_std >= 0.0) => {
                bad(format!("--n-std must be a finite number >= 0, got {n_std}"))
            }
            Method::Pairwise {
                top_n, batch_size, ..
            } => {
                if *top_n < 2 {
                    return bad(format!(
                        "--top-n must be at least 2 (one item has nothing to re-rank), got {top_n}"
                    ));
                }
                if *batch_size == 0 {
                    return bad("--batch-size must be at least 1".into());
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Options {
    pub dataset: PathBuf,
    pub neighbors: PathBuf,
    pub out: PathBuf,
    pub embeddings: Option<PathBuf>,
    pub method: Method,
    /// Neighbours kept per query (search methods and k-reciprocal; default: the input's k).
    pub top_k: Option<usize>,
    /// Where the re-searches run.
    pub engine: Engine,
    /// Bytes for one query chunk of a re-search.
    pub memory_budget: usize,
}

/// What a run did, for the one-line summary.
#[derive(Clone, Debug)]
pub struct Summary {
    pub out: PathBuf,
    pub method: String,
    pub queries: usize,
    pub rows_in: usize,
    pub rows_out: u64,
    pub k: usize,
    pub seconds: f64,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "simile-rerank: {} on {} queries, k={}: {} rows in, {} rows out, {:.2} s -> {}",
            self.method,
            self.queries,
            self.k,
            self.rows_in,
            self.rows_out,
            self.seconds,
            self.out.display()
        )
    }
}

/// Refuses neighbours made from another dataset than the one given.
fn check_dataset(neighbors: &Path, meta: &NeighborsMeta, dataset: &Path) -> Result<()> {
    let now = Fingerprint::of(dataset)?.hash;
    if meta.dataset_fingerprint != now {
        return Err(Error::input(format!(
            "{} was computed from a different dataset: its metadata records {} (fingerprint {}), but {} is {now}; give the dataset it was made from, or re-run simile-distance",
            neighbors.display(),
            meta.dataset,
            if meta.dataset_fingerprint.is_empty() { "none" } else { &meta.dataset_fingerprint },
            dataset.display()
        )));
    }
    manifest::check_upstream(neighbors, "dataset", dataset)
}

/// Each query's list in the input, by query position (gallery positions, distances).
fn lists_by_position(
    nb: &Neighbors,
    path: &Path,
    qg: &QueryGallery,
) -> Result<Vec<Vec<(u32, f32)>>> {
    let mut out = vec![Vec::new(); qg.queries.len()];
    for (qid, s, e) in nb.groups() {
        let q = qg.query_pos(qid).ok_or_else(|| {
            Error::input(format!(
                "{}: query id {qid} is not a query of the dataset's split; was it made from another dataset or split?",
                path.display()
            ))
        })?;
        for i in s..e {
            let g = qg.gallery_pos(nb.gallery_id[i]).ok_or_else(|| {
                Error::input(format!(
                    "{}: row {i}: gallery id {} is not a gallery row of the dataset's split",
                    path.display(),
                    nb.gallery_id[i]
                ))
            })?;
            out[q].push((g as u32, nb.distance[i]));
        }
    }
    Ok(out)
}

/// The image paths of every dataset row a neighbours file names (queries and neighbours),
/// in id order; rows without a path or unknown ids are left to the scoring, which reports them.
fn listed_images(dataset: &Path, neighbors: &Path) -> Result<Vec<PathBuf>> {
    let ds = Dataset::read(dataset)?;
    let nb = Neighbors::read(neighbors)?;
    let mut ids: Vec<i64> = nb.query_id.iter().chain(&nb.gallery_id).copied().collect();
    ids.sort_unstable();
    ids.dedup();
    Ok(ids
        .into_iter()
        .filter_map(|id| ds.position_of(id))
        .filter_map(|r| ds.resolve_path(r, None))
        .collect())
}

/// The model folder's `kind`, read from its `model.json` without loading anything else.
fn model_kind(dir: &Path) -> Result<String> {
    let p = dir.join(crate::model::MODEL_JSON);
    let text = std::fs::read(&p).map_err(|e| Error::io(&p, e))?;
    let v: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| Error::input(format!("{}: not a simile model.json: {e}", p.display())))?;
    Ok(v.get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or("")
        .to_string())
}

/// Runs the stage.
pub fn run(opts: &Options) -> Result<Summary> {
    let started = std::time::Instant::now();
    opts.method.validate()?;
    if opts.top_k == Some(0) {
        return Err(Error::input("--top-k must be at least 1"));
    }
    if opts.method.needs_embeddings() && opts.embeddings.is_none() {
        return Err(Error::input(format!(
            "--method {} needs the embeddings the neighbours were computed from: give --embeddings emb.npy",
            opts.method.name()
        )));
    }
    if !opts.method.needs_embeddings() && opts.embeddings.is_some() {
        return Err(Error::input(format!(
            "--method {} does not use --embeddings; leave it out",
            opts.method.name()
        )));
    }

    // The manifest's parameters and inputs first: an output they already describe is kept.
    let params = opts.method.params();
    let mut full = serde_json::json!({"method": opts.method.name(), "top_k": opts.top_k});
    if let (Some(o), serde_json::Value::Object(p)) = (full.as_object_mut(), params.clone()) {
        o.extend(p);
    }
    let mut mb = ManifestBuilder::new("rerank", full);
    mb.input("dataset", &opts.dataset)?;
    mb.input("neighbors", &opts.neighbors)?;
    if let Some(e) = &opts.embeddings {
        mb.input("embeddings", e)?;
    }
    if let Method::Pairwise { model, .. } = &opts.method {
        mb.input("model", &model.join(crate::model::MODEL_JSON))?;
        let weights = model.join(crate::model::WEIGHTS);
        if weights.is_file() {
            mb.input("model_weights", &weights)?;
        }
        // The pictures it scores: every row the neighbours name (a superset of the top-n).
        let paths = listed_images(&opts.dataset, &opts.neighbors)?;
        mb.input_files("images", &format!("{} images", paths.len()), &paths)?;
    }
    mb.skip_if_done(&opts.out)?;

    let nb = Neighbors::read(&opts.neighbors)?;
    check_dataset(&opts.neighbors, &nb.meta, &opts.dataset)?;
    let metric: Metric = nb.meta.metric.parse().map_err(|e: String| {
        Error::input(format!(
            "{}: metadata simile.metric: {e}",
            opts.neighbors.display()
        ))
    })?;
    let in_k = nb.meta.k;
    let groups = nb.groups();

    let rows_in = nb.len();

    // Lists to write, by query id (sorted, as the input).
    let (out_lists, out_k): (Vec<IdList>, usize) = match &opts.method {
        Method::Constant { .. } | Method::Adaptive { .. } | Method::Pairwise { .. } => {
            let query_ids: Vec<i64> = groups.iter().map(|g| g.0).collect();
            let mut lists: Vec<Vec<(i64, f32)>> = groups
                .iter()
                .map(|&(_, s, e)| (s..e).map(|i| (nb.gallery_id[i], nb.distance[i])).collect())
                .collect();
            match &opts.method {
                Method::Constant { th } => threshold::constant(&mut lists, *th),
                Method::Adaptive { n_std } => {
                    let gaps = lists.iter().map(|l| l.len().saturating_sub(1) as u64).sum();
                    mb.rows("gaps_averaged", gaps);
                    let avg = threshold::adaptive(&mut lists, *n_std);
                    mb.note("avg_gap", serde_json::json!(avg));
                }
                Method::Pairwise {
                    model,
                    top_n,
                    device,
                    batch_size,
                } => {
                    if metric == Metric::Dot {
                        return Err(Error::input(format!(
                            "{}: --method pairwise needs l2 or cosine neighbours (OML's merge rule assumes non-negative distances); this file has dot",
                            opts.neighbors.display()
                        )));
                    }
                    if *top_n > in_k {
                        return Err(Error::input(format!(
                            "--top-n {top_n} is larger than the k of {} ({in_k}); re-run simile-distance with --top-k >= {top_n}",
                            opts.neighbors.display()
                        )));
                    }
                    let kind = model_kind(model)?;
                    if kind != "pairwise" {
                        return Err(Error::input(format!(
                            "{}: a model of kind '{kind}', but --method pairwise needs a model of kind 'pairwise' (trained by simile-train's pairwise mode)",
                            model.display()
                        )));
                    }
                    let ds = Dataset::read(&opts.dataset)?;
                    if ds.modality() == crate::dataset::Modality::Text {
                        return Err(Error::input(format!(
                            "{}: a text dataset, but the pairwise re-ranker scores pairs of images; re-rank texts with aqe, alpha-qe, dba, k-reciprocal or threshold",
                            opts.dataset.display()
                        )));
                    }
                    crate::rerank::pairwise::rescore(
                        model,
                        &ds,
                        &mut lists,
                        &query_ids,
                        *top_n,
                        *device,
                        *batch_size,
                    )?;
                }
                _ => unreachable!(),
            }
            (query_ids.into_iter().zip(lists).collect(), in_k)
        }
        _ => {
            let emb_path = opts.embeddings.as_deref().unwrap();
            let split = one_dataset_split(&opts.neighbors, &nb.meta, opts.method.name())?;
            let top_k = opts.top_k.unwrap_or(in_k);
            let ds = Dataset::read(&opts.dataset)?;
            let qg = QueryGallery::from_dataset(&ds, split, SequenceRule::default())?;
            if qg.queries.len() != nb.meta.n_queries || qg.gallery.len() != nb.meta.n_gallery {
                return Err(Error::input(format!(
                    "{}: searched {} queries x {} gallery rows, but split '{split}' of {} has {} x {}; was it made from another dataset?",
                    opts.neighbors.display(),
                    nb.meta.n_queries,
                    nb.meta.n_gallery,
                    opts.dataset.display(),
                    qg.queries.len(),
                    qg.gallery.len()
                )));
            }
            let emb = crate::embeddings::open(emb_path, &opts.dataset)?;
            manifest::check_upstream(&opts.neighbors, "embeddings", emb_path)?;
            let of_row = crate::embeddings::rows_of_dataset(
                &ds,
                &opts.dataset,
                &emb,
                emb_path,
                Some(split),
            )?;
            let input = lists_by_position(&nb, &opts.neighbors, &qg)?;
            let lists = match &opts.method {
                Method::KReciprocal(p) => k_reciprocal(
                    &ds,
                    &qg,
                    &of_row,
                    &emb,
                    emb_path,
                    &opts.dataset,
                    &input,
                    p,
                    top_k,
                    opts,
                )?,
                m => {
                    let how = match *m {
                        Method::Aqe { k } => Expansion::Query { k, alpha: 0.0 },
                        Method::AlphaQe { k, alpha } => Expansion::Query { k, alpha },
                        Method::Dba { k, alpha, qe } => Expansion::Dba { k, alpha, qe },
                        _ => unreachable!(),
                    };
                    if let Expansion::Query { k, .. } = how {
                        if k > in_k {
                            return Err(Error::input(format!(
                                "--qe-k {k} is larger than the k of {} ({in_k}); re-run simile-distance with --top-k >= {k}",
                                opts.neighbors.display()
                            )));
                        }
                    }
                    let q_map = side_map(
                        &of_row,
                        &qg.queries.rows,
                        &ds,
                        &opts.dataset,
                        emb_path,
                        "query",
                    )?;
                    let g_map = side_map(
                        &of_row,
                        &qg.gallery.rows,
                        &ds,
                        &opts.dataset,
                        emb_path,
                        "gallery",
                    )?;
                    let norm = qe::normalises(metric);
                    let q = Matrix::from_rows(&Rows::new(&emb, &q_map, &qg.queries.ids), norm);
                    let g = Matrix::from_rows(&Rows::new(&emb, &g_map, &qg.gallery.ids), norm);
                    let searcher = Searcher {
                        engine: opts.engine,
                        metric,
                        memory_budget: opts.memory_budget,
                    };
                    let (lists, report) = qe::run(&q, &g, &input, &qg, how, &searcher, top_k)?;
                    for (name, s) in report.searches {
                        mb.timing(&format!("search_{name}"), s);
                    }
                    lists
                }
            };
            let out = (0..qg.queries.len())
                .map(|q| {
                    let l = lists[q]
                        .iter()
                        .map(|&(g, d)| (qg.gallery.ids[g as usize], d))
                        .collect();
                    (qg.queries.ids[q], l)
                })
                .collect();
            (out, top_k)
        }
    };

    // Output: the input's metadata, the new k, and the method's keys.
    let mut meta = nb.meta.clone();
    meta.k = out_k;
    meta.extra.retain(|k, _| !k.starts_with("simile.rerank."));
    let neighbors_fp = Fingerprint::of(&opts.neighbors)?.hash;
    let mut put = |k: &str, v: String| {
        meta.extra.insert(format!("simile.rerank.{k}"), v);
    };
    put("method", opts.method.name().into());
    put("params", params.to_string());
    put("neighbors", opts.neighbors.display().to_string());
    put("neighbors_fingerprint", neighbors_fp);
    if let Some(e) = &opts.embeddings {
        put("embeddings", e.display().to_string());
        put("embeddings_fingerprint", Fingerprint::of(e)?.hash);
    }
    if let Method::Pairwise { model, .. } = &opts.method {
        put("model", model.display().to_string());
    }
    let mut w = NeighborsWriter::create(&opts.out, &meta)?;
    let (mut ids, mut dists) = (Vec::new(), Vec::new());
    for (qid, l) in &out_lists {
        if l.is_empty() {
            continue;
        }
        ids.clear();
        dists.clear();
        for &(g, d) in l {
            ids.push(g);
            dists.push(d);
        }
        w.push(*qid, &ids, &dists)?;
    }
    let (sealed, rows_out) = w.seal()?;
    mb.note("metric", serde_json::json!(metric.as_str()))
        .note("input_k", serde_json::json!(in_k))
        .note("k", serde_json::json!(out_k));
    mb.rows("queries", nb.meta.n_queries as u64)
        .rows("neighbors_in", rows_in as u64)
        .rows("neighbors", rows_out);
    mb.commit(sealed, Vec::new())?;
    Ok(Summary {
        out: opts.out.clone(),
        method: opts.method.name().into(),
        queries: nb.meta.n_queries,
        rows_in,
        rows_out,
        k: out_k,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn one_dataset_split(path: &Path, meta: &NeighborsMeta, method: &str) -> Result<Split> {
    match (&meta.split, &meta.gallery_dataset) {
        (Some(s), None) => s.parse().map_err(|e: String| {
            Error::input(format!("{}: metadata simile.split: {e}", path.display()))
        }),
        _ => Err(Error::input(format!(
            "{}: a two-sided neighbours file (query and gallery datasets); --method {method} works on one-dataset files only",
            path.display()
        ))),
    }
}

/// k-reciprocal re-ranking: the node graph (queries and gallery rows) searched against itself
/// in cosine geometry, then [`kreciprocal`] over the lists.
#[allow(clippy::too_many_arguments)]
fn k_reciprocal(
    ds: &Dataset,
    qg: &QueryGallery,
    of_row: &[usize],
    emb: &Npy,
    emb_path: &Path,
    ds_path: &Path,
    input: &[Vec<(u32, f32)>],
    p: &kreciprocal::Params,
    top_k: usize,
    opts: &Options,
) -> Result<Vec<Vec<(u32, f32)>>> {
    // Nodes: every query or gallery row once, in id order, with the sides' sequence codes.
    let mut rows: Vec<(usize, u32)> = qg
        .queries
        .rows
        .iter()
        .zip(&qg.queries.seq)
        .chain(qg.gallery.rows.iter().zip(&qg.gallery.seq))
        .map(|(&r, &s)| (r, s))
        .collect();
    rows.sort_unstable();
    rows.dedup_by_key(|x| x.0);
    let node_of_row = |r: usize| rows.binary_search_by_key(&r, |x| x.0).unwrap() as u32;
    let query_nodes: Vec<u32> = qg.queries.rows.iter().map(|&r| node_of_row(r)).collect();
    let gallery_nodes: Vec<u32> = qg.gallery.rows.iter().map(|&r| node_of_row(r)).collect();
    let side = Side {
        rows: rows.iter().map(|x| x.0).collect(),
        ids: rows.iter().map(|x| ds.ids[x.0]).collect(),
        labels: rows.iter().map(|x| ds.label[x.0]).collect(),
        seq: rows.iter().map(|x| x.1).collect(),
        category: vec![None; rows.len()],
    };
    let map = side_map(
        of_row,
        &side.rows,
        ds,
        ds_path,
        emb_path,
        "query or gallery",
    )?;
    let nodes = QueryGallery {
        queries: side.clone(),
        gallery: side,
        same_dataset: true,
        rule: qg.rule,
    };
    let node_rows = Rows::new(emb, &map, &nodes.queries.ids);
    let (lists, _) = qe::search_rows(
        &node_rows,
        &node_rows,
        &nodes,
        kreciprocal::depth(p),
        Metric::Cosine,
        opts.engine,
        opts.memory_budget,
    )?;
    let vecs = Matrix::from_rows(&node_rows, false);
    let seq = &nodes.queries.seq;
    let dist = |a: usize, b: usize| -> f32 {
        if seq[a] != NO_SEQUENCE && seq[a] == seq[b] && a != b {
            f32::INFINITY
        } else {
            crate::knn::exact::distance(Metric::Cosine, vecs.row(a), vecs.row(b))
        }
    };
    let graph = Graph {
        lists: &lists,
        dist,
    };
    let v = graph.encode(p);
    let shortlists: Vec<Vec<u32>> = input
        .iter()
        .map(|l| l.iter().map(|x| x.0).collect())
        .collect();
    let rr = Rerank {
        query_nodes: &query_nodes,
        gallery_nodes: &gallery_nodes,
        shortlists: &shortlists,
        excluded: |q: usize, g: usize| qg.is_excluded(q, g),
        top_k,
    };
    Ok(rr.run(&graph, &v, p))
}
