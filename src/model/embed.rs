//! The embed stage: dataset + model -> `emb.npy` + `emb.ids.npy` + manifest.
//!
//! 1. The rows (a split, or all) in id order; with `--shard i/n`, the shard's range of them.
//! 2. Every image is decoded, cropped and resized in parallel (rayon) *before* the model runs,
//!    so a corrupt, missing or truncated file is reported with all the others at once and no
//!    work is lost late. Prepared images are kept (as u8) when they fit the cache budget;
//!    otherwise they are decoded again during inference, a batch ahead of the model on a
//!    producer thread (a bounded channel), so the device never waits on decoding.
//! 3. Batches run through the model; rows are written as they come (atomically: nothing
//!    appears under the output name until the whole file is complete).
use super::{Compute, Model};
use crate::dataset::{Dataset, Split};
use crate::device::{self, DeviceArg};
use crate::error::{Error, Result};
use crate::image::{self, Preprocess};
use crate::manifest::ManifestBuilder;
use crate::npy::{self, DType, NpyWriter};
use crate::shard::ShardSpec;
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What to do with an image that cannot be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnBadImage {
    Error,
    Skip,
}

impl std::str::FromStr for OnBadImage {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "error" => Ok(OnBadImage::Error),
            "skip" => Ok(OnBadImage::Skip),
            _ => Err(format!("'{s}': expected error or skip")),
        }
    }
}

#[derive(Clone, Debug)]
pub struct EmbedOptions {
    pub dataset: PathBuf,
    pub model: String,
    pub out: PathBuf,
    /// None: every row.
    pub split: Option<Split>,
    pub batch_size: usize,
    pub device: DeviceArg,
    pub compute: Compute,
    pub out_dtype: DType,
    pub shard: Option<ShardSpec>,
    pub on_bad_image: OnBadImage,
    /// Overrides the dataset's recorded image root.
    pub root: Option<PathBuf>,
    /// Prepared images are kept in memory up to this many MiB (else decoded twice).
    pub cache_mib: usize,
}

#[derive(Debug)]
pub struct EmbedSummary {
    pub out: PathBuf,
    pub ids: PathBuf,
    pub rows: usize,
    pub dim: usize,
    pub skipped: usize,
    pub skipped_list: Option<PathBuf>,
    pub device: String,
    pub seconds: f64,
    pub decode_seconds: f64,
}

/// `<stem>.skipped.tsv` beside an embeddings file.
pub fn skipped_path(emb: &Path) -> PathBuf {
    let stem = emb
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    emb.with_file_name(format!("{stem}.skipped.tsv"))
}

struct Item {
    id: i64,
    path: PathBuf,
    bbox: Option<[i32; 4]>,
}

/// Runs the stage; `on_device` is called with the chosen device's description first.
pub fn run(opts: &EmbedOptions, on_device: impl FnOnce(&str)) -> Result<EmbedSummary> {
    let t0 = Instant::now();
    if opts.batch_size == 0 {
        return Err(Error::input("--batch-size must be at least 1"));
    }
    let ds = Dataset::read(&opts.dataset)?;
    let rows: Vec<usize> = match opts.split {
        Some(s) => ds.rows_of_split(s),
        None => (0..ds.len()).collect(),
    };
    let (start, end) = match opts.shard {
        Some(s) => s.range(rows.len()),
        None => (0, rows.len()),
    };
    let mut items = Vec::with_capacity(end - start);
    let mut no_path = Vec::new();
    for &r in &rows[start..end] {
        match ds.resolve_path(r, opts.root.as_deref()) {
            Some(path) => items.push(Item {
                id: ds.ids[r],
                path,
                bbox: ds.bbox[r],
            }),
            None => no_path.push(format!("id {}", ds.ids[r])),
        }
    }
    if !no_path.is_empty() {
        return Err(Error::input(format!(
            "{}: {} row(s) have no image path ({}{}): embed needs an image per row",
            opts.dataset.display(),
            no_path.len(),
            no_path
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
            if no_path.len() > 5 { ", ..." } else { "" }
        )));
    }

    let dev = device::resolve(opts.device)?;
    on_device(&device::describe(dev));
    let mut model = Model::load(&opts.model, dev)?;
    if model.spec.kind != super::ModelKind::Extractor {
        return Err(Error::input(format!(
            "--model {}: a {:?} model, not an extractor",
            opts.model, model.spec.kind
        )));
    }
    model.set_compute(opts.compute)?;
    let pre = model.spec.input.clone();

    // Check every image before the model runs (and keep them when they fit).
    let td = Instant::now();
    let keep = items.len().saturating_mul(pre.numel()) <= opts.cache_mib << 20;
    let pb = crate::progress::bar(items.len() as u64, "check");
    let checked: Vec<std::result::Result<Option<Vec<u8>>, String>> = items
        .par_iter()
        .map(|it| {
            let r = image::prepare_file(&it.path, it.bbox, &pre).map(|v| keep.then_some(v));
            pb.inc(1);
            r
        })
        .collect();
    pb.finish_and_clear();
    let mut decode_seconds = td.elapsed().as_secs_f64();
    let mut bad = Vec::new();
    let mut good_items = Vec::with_capacity(items.len());
    let mut cache = Vec::with_capacity(items.len());
    for (it, r) in items.into_iter().zip(checked) {
        match r {
            Ok(buf) => {
                good_items.push(it);
                cache.push(buf);
            }
            Err(why) => bad.push((it.id, it.path, why)),
        }
    }
    let out = match opts.shard {
        Some(s) => s.part_path(&opts.out),
        None => opts.out.clone(),
    };
    let skipped_file = skipped_path(&out);
    if !bad.is_empty() && opts.on_bad_image == OnBadImage::Error {
        let mut lines = vec![format!(
            "{} of {} images cannot be used (nothing was embedded; --on-bad-image skip leaves them out):",
            bad.len(),
            bad.len() + good_items.len()
        )];
        lines.extend(
            bad.iter()
                .map(|(id, p, why)| format!("  {} (id {id}): {why}", p.display())),
        );
        return Err(Error::InputMany(lines));
    }

    // Embed.
    let dim = model.spec.embedding_dim as usize;
    let n = good_items.len();
    let mut writer = NpyWriter::create(&out, opts.out_dtype, &[n, dim])?;
    let pb = crate::progress::bar(n as u64, "embed");
    let bs = opts.batch_size;
    let (tx, rx) =
        std::sync::mpsc::sync_channel::<std::result::Result<(Vec<Vec<u8>>, f64), String>>(2);
    let paths: Vec<(PathBuf, Option<[i32; 4]>)> = good_items
        .iter()
        .map(|it| (it.path.clone(), it.bbox))
        .collect();
    let pre2 = pre.clone();
    let producer = std::thread::spawn(move || {
        let mut cache = cache;
        for (ci, chunk) in paths.chunks(bs).enumerate() {
            let t = Instant::now();
            let from = ci * bs;
            let batch: std::result::Result<Vec<Vec<u8>>, String> = if keep {
                Ok(cache[from..from + chunk.len()]
                    .iter_mut()
                    .map(|c| c.take().unwrap_or_default())
                    .collect())
            } else {
                chunk
                    .par_iter()
                    .map(|(p, b)| {
                        image::prepare_file(p, *b, &pre2).map_err(|e| {
                            format!("{}: {e} (it was readable moments ago)", p.display())
                        })
                    })
                    .collect()
            };
            let failed = batch.is_err();
            if tx
                .send(batch.map(|b| (b, t.elapsed().as_secs_f64())))
                .is_err()
                || failed
            {
                return;
            }
        }
    });
    let mut infer_seconds = 0.0;
    for _ in 0..n.div_ceil(bs) {
        let (imgs, dsec) = rx
            .recv()
            .map_err(|_| Error::internal("the image decoding thread stopped"))?
            .map_err(Error::input)?;
        if !keep {
            decode_seconds += dsec;
        }
        let ti = Instant::now();
        let refs: Vec<&[u8]> = imgs.iter().map(|v| v.as_slice()).collect();
        let x = image::batch_tensor(&refs, &pre);
        let y = model.embed(&x)?;
        let v: Vec<f32> = Vec::try_from(y.flatten(0, -1)).map_err(Error::from)?;
        infer_seconds += ti.elapsed().as_secs_f64();
        writer.write_f32(&v)?;
        pb.inc(imgs.len() as u64);
    }
    producer
        .join()
        .map_err(|_| Error::internal("the image decoding thread panicked"))?;
    pb.finish_and_clear();

    let ids: Vec<i64> = good_items.iter().map(|it| it.id).collect();
    let ids_path = npy::ids_path(&out);
    npy::write_i64(&ids_path, &ids)?;
    let skipped_list = if bad.is_empty() {
        if skipped_file.exists() {
            std::fs::remove_file(&skipped_file).map_err(|e| Error::io(&skipped_file, e))?;
        }
        None
    } else {
        let mut text = String::from("id\tpath\treason\n");
        for (id, p, why) in &bad {
            text.push_str(&format!(
                "{id}\t{}\t{}\n",
                p.display(),
                why.replace(['\t', '\n'], " ")
            ));
        }
        crate::io::atomic_write_bytes(&skipped_file, text.as_bytes())?;
        Some(skipped_file.clone())
    };
    writer.finish()?;

    let params = serde_json::json!({
        "model": opts.model,
        "architecture": model.spec.architecture.name,
        "embedding_dim": dim,
        "normalise": model.spec.normalise,
        "input": model.spec.input,
        "split": opts.split.map(|s| s.as_str()).unwrap_or("all"),
        "batch_size": bs,
        "compute": opts.compute.to_string(),
        "out_dtype": if opts.out_dtype == DType::F16 { "f16" } else { "f32" },
        "on_bad_image": if opts.on_bad_image == OnBadImage::Skip { "skip" } else { "error" },
        "root": opts.root.as_ref().map(|r| r.display().to_string()),
    });
    let mut m = ManifestBuilder::new("embed", params);
    m.input("dataset", &opts.dataset)?;
    m.input("model", &model.dir.join(super::MODEL_JSON))?;
    m.input("weights", &model.weights_path())?;
    m.rows("rows", n as u64).rows("skipped", bad.len() as u64);
    m.timing("decode", decode_seconds)
        .timing("total", t0.elapsed().as_secs_f64())
        .timing("inference", infer_seconds);
    if let Some(s) = opts.shard {
        m.shard(s, start, end);
    }
    m.companion(&ids_path);
    if let Some(s) = &skipped_list {
        m.companion(s);
    }
    m.write(&out)?;
    Ok(EmbedSummary {
        out,
        ids: ids_path,
        rows: n,
        dim,
        skipped: bad.len(),
        skipped_list,
        device: device::describe(dev),
        seconds: t0.elapsed().as_secs_f64(),
        decode_seconds,
    })
}

/// Top-k classes of image files through a model folder's classification head.
pub fn classify_files(model: &Model, files: &[PathBuf], k: i64) -> Result<Vec<Vec<(i64, f32)>>> {
    let pre: &Preprocess = &model.spec.input;
    let imgs: Vec<Vec<u8>> = files
        .iter()
        .map(|f| {
            image::prepare_file(f, None, pre)
                .map_err(|e| Error::input(format!("{}: {e}", f.display())))
        })
        .collect::<Result<_>>()?;
    let refs: Vec<&[u8]> = imgs.iter().map(|v| v.as_slice()).collect();
    let probs = model.classify(&image::batch_tensor(&refs, pre))?;
    let (v, ix) = probs.topk(k, -1, true, true);
    let mut out = Vec::new();
    for i in 0..files.len() as i64 {
        let vv: Vec<f32> = Vec::try_from(v.get(i)).map_err(Error::from)?;
        let ii: Vec<i64> = Vec::try_from(ix.get(i)).map_err(Error::from)?;
        out.push(ii.into_iter().zip(vv).collect());
    }
    Ok(out)
}
