//! The embed stage: dataset + model -> `emb.npy` + `emb.ids.npy` + manifest.
//!
//! 1. The rows (a split, or all) in id order; with `--shard i/n`, the shard's range of them.
//! 2. A producer thread decodes, crops and resizes the images in order, each batch in parallel
//!    on the rayon pool, ahead of the model (a channel between them), so decoding and the
//!    forward pass overlap. Every bad image (corrupt, missing, truncated) is reported together
//!    once decoding has seen them all, and the model stops at the first (see `run` for the two
//!    plans, by whether the prepared images fit `--cache-mib`).
//! 3. Batches run through the model; rows are written atomically: nothing appears under the
//!    output name until the whole file is complete.
use super::{Compute, Model};
use crate::dataset::{Dataset, Split};
use crate::device::{self, DeviceArg};
use crate::error::{Error, Result};
use crate::image::{self, Preprocess};
use crate::manifest::ManifestBuilder;
use crate::npy::{self, DType, NpyWriter};
use crate::shard::ShardSpec;
use rayon::prelude::*;
use std::path::PathBuf;
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
    /// Text models: int8 linear layers (`Model::quantize`).
    pub quantize: super::Quantize,
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
    pub times: PhaseTimes,
    pub modality: crate::dataset::Modality,
}

use crate::npy::skipped_path;

/// An image that cannot be used: (id, path, why).
pub type Bad = (i64, PathBuf, String);

struct Item {
    id: i64,
    path: PathBuf,
    bbox: Option<[i32; 4]>,
}

/// The largest `--batch-size` (buffers of two batches are allocated up front).
pub const MAX_BATCH: usize = 65536;

/// Runs the stage; `on_device` is called with the chosen device's description first.
pub fn run(opts: &EmbedOptions, on_device: impl FnOnce(&str)) -> Result<EmbedSummary> {
    let t0 = Instant::now();
    if opts.batch_size == 0 || opts.batch_size > MAX_BATCH {
        return Err(Error::input(format!(
            "--batch-size {}: expected 1 to {MAX_BATCH}",
            opts.batch_size
        )));
    }
    let ds = Dataset::read(&opts.dataset)?;
    let (rows, start, end) = select_rows(opts, &ds)?;

    let dev = device::resolve(opts.device)?;
    let mut model = Model::load(&opts.model, dev)?;
    if model.spec.kind != super::ModelKind::Extractor {
        return Err(Error::input(format!(
            "--model {}: a {:?} model, not an extractor",
            opts.model, model.spec.kind
        )));
    }
    check_modality(&ds, &model, opts)?;
    model.set_compute(opts.compute)?;
    model.quantize(opts.quantize)?;
    if let Some(w) = opts.compute.slow_on(dev) {
        eprintln!("simile-embed: {w}");
    }
    if model.spec.modality() == super::Modality::Text {
        let job = super::embed_text::Job {
            opts,
            ds: &ds,
            rows: &rows[start..end],
            range: (start, end),
            model: &model,
            t0,
        };
        return job.run(on_device);
    }
    let items = image_items(opts, &ds, &rows[start..end])?;
    drop(ds);
    let pre = model.spec.input.clone();

    let (out, mut params) = output_and_params(opts, &model);
    let (dim, bs) = (model.spec.embedding_dim as usize, opts.batch_size);
    params.insert("input".into(), serde_json::json!(model.spec.input));
    params.insert(
        "on_bad_image".into(),
        serde_json::json!(if opts.on_bad_image == OnBadImage::Skip {
            "skip"
        } else {
            "error"
        }),
    );
    params.insert(
        "root".into(),
        serde_json::json!(opts.root.as_ref().map(|r| r.display().to_string())),
    );
    let params = serde_json::Value::Object(params);
    let mut m = ManifestBuilder::new("embed", params);
    m.input("dataset", &opts.dataset)?;
    m.input("model", &model.dir.join(super::MODEL_JSON))?;
    m.input("weights", &model.weights_path())?;
    // Every byte of every image: a changed picture makes the output stale.
    let paths: Vec<PathBuf> = items.iter().map(|it| it.path.clone()).collect();
    m.input_files_at(
        "images",
        &format!("{} images", paths.len()),
        start as u64,
        &paths,
    )?;
    drop(paths);
    if let Some(s) = opts.shard {
        m.shard(s, start, end);
    }
    let ids_path = npy::ids_path(&out);
    m.companion(&ids_path);
    m.optional_companion(&skipped_path(&out));
    // Recorded before the work so an up-to-date output is not computed again.
    m.skip_if_done(&out)?;
    on_device(&device::describe(dev));
    let mut t = PhaseTimes::default();

    // Two plans, by whether every prepared image fits the cache (`--cache-mib`):
    // - it fits: one decoding pass, run ahead of the model on a producer thread as fast as it
    //   goes (never waiting for the model), while the model starts on the first batch. A bad
    //   image stops the model at once (`error`) and decoding goes on to list every bad file,
    //   so the report comes when decoding ends, as early as a separate check pass would give
    //   it. Embeddings are held in memory (far smaller than the images) and written at the end.
    // - it does not fit: a check pass decodes every image and keeps none (so bad files are
    //   still all reported before the model runs); then the producer decodes again, a bounded
    //   two batches ahead of the model, and rows are written as they come.
    let keep = items.len().saturating_mul(pre.numel()) <= opts.cache_mib << 20;
    let mut bad: Vec<Bad> = Vec::new();
    let work: Vec<Item> = if keep {
        items
    } else {
        let (good, found, seconds) = check_pass(items, &pre);
        bad = found;
        t.check = seconds;
        if !bad.is_empty() && opts.on_bad_image == OnBadImage::Error {
            return Err(bad_images_error(&bad, good.len()));
        }
        good
    };

    let total = work.len();
    let chunks = total.div_ceil(bs);
    let (tx, rx) = std::sync::mpsc::sync_channel::<Decoded>(if keep { chunks.max(1) } else { 2 });
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let jobs: Vec<(PathBuf, Option<[i32; 4]>)> =
        work.iter().map(|it| (it.path.clone(), it.bbox)).collect();
    let producer = {
        let (pre, stop) = (pre.clone(), stop.clone());
        std::thread::spawn(move || {
            for chunk in jobs.chunks(bs) {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                let td = Instant::now();
                let images = chunk
                    .par_iter()
                    .map(|(p, b)| image::prepare_file(p, *b, &pre))
                    .collect();
                let seconds = td.elapsed().as_secs_f64();
                if tx.send(Decoded { images, seconds }).is_err() {
                    return;
                }
            }
        })
    };
    // Stop the producer early however this function returns.
    let _stop_guard = StopOnDrop(stop.clone());

    let pb = crate::progress::bar(total as u64, "embed");
    let mut sink = if keep {
        Sink::Memory(Vec::new())
    } else {
        Sink::File(NpyWriter::create(&out, opts.out_dtype, &[total, dim])?)
    };
    let mut pending: Vec<(usize, Vec<u8>)> = Vec::with_capacity(2 * bs);
    let mut embedded: Vec<usize> = Vec::with_capacity(total);
    for ci in 0..chunks {
        let tw = Instant::now();
        let d = rx
            .recv()
            .map_err(|_| Error::internal("the image decoding thread stopped"))?;
        t.wait += tw.elapsed().as_secs_f64();
        t.decode += d.seconds;
        for (k, r) in d.images.into_iter().enumerate() {
            let i = ci * bs + k;
            match r {
                Ok(img) => pending.push((i, img)),
                Err(why) if keep => bad.push((work[i].id, work[i].path.clone(), why)),
                Err(why) => {
                    return Err(Error::input(format!(
                        "{}: {why} (it was readable moments ago)",
                        work[i].path.display()
                    )))
                }
            }
        }
        if !bad.is_empty() && opts.on_bad_image == OnBadImage::Error {
            // Nothing will be written: keep decoding only, to list every bad file.
            pending.clear();
            continue;
        }
        let last = ci + 1 == chunks;
        while pending.len() >= bs || (last && !pending.is_empty()) {
            let batch: Vec<(usize, Vec<u8>)> = pending.drain(..pending.len().min(bs)).collect();
            let tt = Instant::now();
            let refs: Vec<&[u8]> = batch.iter().map(|(_, v)| v.as_slice()).collect();
            // TorchScript code may `view` its activations, which needs the standard layout.
            let x = if model.spec.is_torchscript() {
                image::batch_tensor(&refs, &pre)
            } else {
                image::batch_tensor_channels_last(&refs, &pre)
            };
            t.tensor += tt.elapsed().as_secs_f64();
            let tf = Instant::now();
            let y = model.embed(&x)?;
            let v: Vec<f32> = Vec::try_from(y.flatten(0, -1)).map_err(Error::from)?;
            t.forward += tf.elapsed().as_secs_f64();
            match &mut sink {
                Sink::Memory(m) => m.extend_from_slice(&v),
                Sink::File(w) => w.write_f32(&v)?,
            }
            embedded.extend(batch.iter().map(|(i, _)| *i));
        }
        pb.set_position((ci * bs + bs).min(total) as u64);
    }
    producer
        .join()
        .map_err(|_| Error::internal("the image decoding thread panicked"))?;
    pb.finish_and_clear();
    if !bad.is_empty() && opts.on_bad_image == OnBadImage::Error {
        return Err(bad_images_error(&bad, total - bad.len()));
    }

    let n = embedded.len();
    let writer = match sink {
        Sink::File(w) => w,
        Sink::Memory(v) => {
            let mut w = NpyWriter::create(&out, opts.out_dtype, &[n, dim])?;
            w.write_f32(&v)?;
            w
        }
    };
    let ids: Vec<i64> = embedded.iter().map(|&i| work[i].id).collect();
    let mut sealed = vec![npy::seal_i64(&ids_path, &ids)?];
    // Bad rows in id order, whichever pass found them.
    bad.sort_by_key(|b| b.0);
    let skipped_rows: Vec<(i64, String, String)> = bad
        .iter()
        .map(|(id, p, why)| (*id, p.display().to_string(), why.clone()))
        .collect();
    let skipped = crate::embeddings::seal_skipped(&out, &skipped_rows)?;
    let skipped_list = skipped.as_ref().map(|s| s.dest().to_path_buf());
    sealed.extend(skipped);
    let main = writer.seal()?;

    m.rows("rows", n as u64).rows("skipped", bad.len() as u64);
    let seconds = t0.elapsed().as_secs_f64();
    m.timing("check", t.check)
        .timing("decode", t.decode)
        .timing("wait", t.wait)
        .timing("tensor", t.tensor)
        .timing("inference", t.forward)
        .timing("total", seconds);
    m.commit(main, sealed)?;
    Ok(EmbedSummary {
        out,
        ids: ids_path,
        rows: n,
        dim,
        skipped: bad.len(),
        skipped_list,
        device: device::describe(dev),
        seconds,
        times: t,
        modality: crate::dataset::Modality::Image,
    })
}

/// The rows to embed, in id order (a split's, or all), and the shard's `[start, end)` among them.
pub(super) fn select_rows(opts: &EmbedOptions, ds: &Dataset) -> Result<(Vec<usize>, usize, usize)> {
    let rows: Vec<usize> = match opts.split {
        Some(s) => ds.rows_of_split(s),
        None => (0..ds.len()).collect(),
    };
    if rows.is_empty() {
        return Err(Error::input(format!(
            "{}: no rows in split {} (the dataset has {}): nothing to embed",
            opts.dataset.display(),
            opts.split.map(|s| s.as_str()).unwrap_or("all"),
            describe_splits(ds)
        )));
    }
    let (start, end) = match opts.shard {
        Some(s) => s.range(rows.len()),
        None => (0, rows.len()),
    };
    Ok((rows, start, end))
}

/// The output file (a shard's part name) and the manifest parameters both modalities share.
pub(super) fn output_and_params(
    opts: &EmbedOptions,
    model: &Model,
) -> (PathBuf, serde_json::Map<String, serde_json::Value>) {
    let out = match opts.shard {
        Some(s) => s.part_path(&opts.out),
        None => opts.out.clone(),
    };
    let params = serde_json::json!({
        "model": opts.model,
        "architecture": model.spec.architecture.name,
        "embedding_dim": model.spec.embedding_dim,
        "normalise": model.spec.normalise,
        "split": opts.split.map(|s| s.as_str()).unwrap_or("all"),
        "batch_size": opts.batch_size,
        "compute": opts.compute.to_string(),
        "out_dtype": if opts.out_dtype == DType::F16 { "f16" } else { "f32" },
    });
    let serde_json::Value::Object(mut map) = params else {
        unreachable!("a JSON object literal")
    };
    // Only when set: the fingerprints of unquantized runs stay what they were.
    if opts.quantize != super::Quantize::None {
        map.insert("quantize".into(), opts.quantize.as_str().into());
    }
    (out, map)
}

/// A text model for an image dataset, or the reverse: refused before any work.
fn check_modality(ds: &Dataset, model: &Model, opts: &EmbedOptions) -> Result<()> {
    let (d, m) = (ds.modality(), model.spec.modality());
    if d != m {
        let a = |m: super::Modality| match m {
            super::Modality::Image => "an image",
            super::Modality::Text => "a text",
        };
        return Err(Error::input(format!(
            "--model {}: {} model, but {} is {} dataset: embed {}s with {} model ({})",
            opts.model,
            a(m),
            opts.dataset.display(),
            a(d),
            d.as_str(),
            a(d),
            match d {
                super::Modality::Text => "minilm-l6-v2, a model trained on texts, or `simile-embed import --hf` of a HuggingFace BERT folder",
                super::Modality::Image => "smallcnn, efficientnet-lite0-imagenet, or a model trained on images",
            }
        )));
    }
    Ok(())
}

/// The image of each row (`rows`: dataset rows); every row must have one.
fn image_items(opts: &EmbedOptions, ds: &Dataset, rows: &[usize]) -> Result<Vec<Item>> {
    let mut items = Vec::with_capacity(rows.len());
    let mut no_path = Vec::new();
    for &r in rows {
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
    Ok(items)
}

/// "80 train, 20 validation rows" (or "no rows").
fn describe_splits(ds: &Dataset) -> String {
    let parts: Vec<String> = ds
        .split_counts()
        .into_iter()
        .map(|(s, n)| format!("{n} {}", s.as_str()))
        .collect();
    if parts.is_empty() {
        "no rows".into()
    } else {
        format!("{} rows", parts.join(", "))
    }
}

/// Decodes, crops and resizes every image in parallel, keeping nothing: (the good items, the
/// bad ones with the reason, seconds).
fn check_pass(items: Vec<Item>, pre: &Preprocess) -> (Vec<Item>, Vec<Bad>, f64) {
    let td = Instant::now();
    let pb = crate::progress::bar(items.len() as u64, "check");
    let checked: Vec<std::result::Result<(), String>> = items
        .par_iter()
        .map(|it| {
            let r = image::prepare_file(&it.path, it.bbox, pre).map(drop);
            pb.inc(1);
            r
        })
        .collect();
    pb.finish_and_clear();
    let mut good = Vec::with_capacity(items.len());
    let mut bad = Vec::new();
    for (it, r) in items.into_iter().zip(checked) {
        match r {
            Ok(()) => good.push(it),
            Err(why) => bad.push((it.id, it.path, why)),
        }
    }
    (good, bad, td.elapsed().as_secs_f64())
}

/// What `--check-only` found.
#[derive(Debug)]
pub struct CheckSummary {
    pub images: usize,
    /// Unreadable images: (id, path, why), in id order.
    pub bad: Vec<Bad>,
    /// Wall time of decoding, cropping and resizing them all.
    pub seconds: f64,
}

pub use super::embed_text::TextCheck;

/// What `--check-only` found: in images, or in texts.
#[derive(Debug)]
pub enum Check {
    Images(CheckSummary),
    Texts(TextCheck),
}

/// `--check-only`: decodes, crops and resizes every image the run would embed, as the model
/// folder's input says, and reports the bad ones (texts: tokenizes every text, see
/// `embed_text::check`); runs no model and writes nothing. With `--on-bad-image error` (the
/// default) bad images are an error, as in a real run.
pub fn check_only(opts: &EmbedOptions) -> Result<Check> {
    let ds = Dataset::read(&opts.dataset)?;
    let (rows, start, end) = select_rows(opts, &ds)?;
    let model = Model::load(&opts.model, tch::Device::Cpu)?;
    check_modality(&ds, &model, opts)?;
    if ds.modality() == super::Modality::Text {
        let c = super::embed_text::check(opts, &ds, &rows[start..end], &model)?;
        return Ok(Check::Texts(c));
    }
    let items = image_items(opts, &ds, &rows[start..end])?;
    let images = items.len();
    let (good, bad, seconds) = check_pass(items, &model.spec.input);
    if !bad.is_empty() && opts.on_bad_image == OnBadImage::Error {
        return Err(bad_images_error(&bad, good.len()));
    }
    Ok(Check::Images(CheckSummary {
        images,
        bad,
        seconds,
    }))
}

/// Where the time of a run went, in seconds of wall time. `decode` is the producer's time
/// (decode, crop, resize on the rayon pool), which overlaps the model; `wait` is how long the
/// model waited for it.
#[derive(Clone, Copy, Debug, Default)]
pub struct PhaseTimes {
    /// The separate check pass (only when the images do not fit the cache).
    pub check: f64,
    /// Images: decoding, cropping, resizing. Texts: tokenizing.
    pub decode: f64,
    pub wait: f64,
    /// Normalising `u8` images into the float batch tensor.
    pub tensor: f64,
    /// The forward pass, including the copy of the embeddings back.
    pub forward: f64,
}

/// One batch of prepared images (or why each could not be prepared) from the producer.
struct Decoded {
    images: Vec<std::result::Result<Vec<u8>, String>>,
    seconds: f64,
}

enum Sink {
    Memory(Vec<f32>),
    File(NpyWriter),
}

struct StopOnDrop(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn bad_images_error(bad: &[Bad], good: usize) -> Error {
    let mut bad: Vec<&Bad> = bad.iter().collect();
    bad.sort_by_key(|b| b.0);
    let mut lines = vec![format!(
        "{} of {} images cannot be used (nothing was embedded; --on-bad-image skip leaves them out):",
        bad.len(),
        bad.len() + good
    )];
    lines.extend(
        bad.iter()
            .map(|(id, p, why)| format!("  {} (id {id}): {why}", p.display())),
    );
    Error::InputMany(lines)
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
    let classes = probs.size().last().copied().unwrap_or(0);
    if !(1..=classes).contains(&k) {
        return Err(Error::input(format!(
            "--top {k}: the head has {classes} classes; give 1 to {classes}"
        )));
    }
    let (v, ix) = probs.f_topk(k, -1, true, true)?;
    let mut out = Vec::new();
    for i in 0..files.len() as i64 {
        let vv: Vec<f32> = Vec::try_from(v.get(i)).map_err(Error::from)?;
        let ii: Vec<i64> = Vec::try_from(ix.get(i)).map_err(Error::from)?;
        out.push(ii.into_iter().zip(vv).collect());
    }
    Ok(out)
}
