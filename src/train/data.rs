//! The training inputs: the decoded-image cache and the augmented batches, or a text
//! dataset's token batches.
//!
//! **Cache.** Every train and validation image is decoded, cropped to its bbox and resized to
//! the model's input once (`image::prepare_file`, the same code as `simile-embed`), and kept as
//! `u8` in one file, memory-mapped: `<cache>/images/<key>.u8` plus `<key>.json`. The key
//! hashes the dataset's fingerprint, the image files' paths, sizes and modification times,
//! the rows and the input geometry (size, resize mode, crop ratio), so a later run on the same
//! data and input reuses it and a changed image rebuilds it. When every image is grey (R = G =
//! B, as Font-ID's glyphs) one plane is stored instead of three. Built into a temporary file
//! and renamed: a killed build leaves nothing half-written under the key.
//!
//! **Batches.** A producer thread assembles each step's batch ahead of the step (a bounded
//! channel, `data.prefetch` deep); the images of a batch are augmented and normalised in
//! parallel (rayon). Every random draw of an image comes from a generator seeded by
//! (seed, step, position in the batch), so batches do not depend on thread timing and a
//! resumed run sees the same pixels.
//!
//! **Texts.** A text dataset has no cache: the producer thread tokenizes each batch's texts
//! (padded to the batch's longest, truncated at the model's `max_length`), which takes
//! microseconds beside the encoder's step.
use super::config::AugmentConfig;
use crate::dataset::Dataset;
use crate::error::{Error, IoContext, Result};
use crate::image::{self, Preprocess};
use crate::train::sampler::{rng, Rng};
use memmap2::Mmap;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

enum Store {
    Mapped(Mmap),
    Memory(Vec<u8>),
}

/// Prepared `u8` images of some dataset rows.
pub struct ImageCache {
    store: Store,
    /// 1 (grey) or 3 planes per image.
    pub channels: usize,
    pub size: usize,
    /// Position in the store of each dataset row (`u32::MAX`: not cached).
    slot: Vec<u32>,
    /// Where it lives (None: in memory).
    pub file: Option<PathBuf>,
    /// Whether this run built it (false: reused).
    pub built: bool,
}

#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct CacheMeta {
    simile_image_cache: u32,
    key: String,
    rows: Vec<u32>,
    channels: usize,
    size: usize,
    dataset: String,
    /// The content hash of the `.u8` file (`io::Fingerprint`), checked before every reuse:
    /// a cache changed on disk would silently train a different model.
    #[serde(default)]
    data_hash: String,
}

/// `${SIMILE_CACHE:-${XDG_CACHE_HOME:-~/.cache}/simile}/images`.
pub fn default_cache_dir() -> PathBuf {
    crate::io::cache_root().join("images")
}

impl ImageCache {
    /// The images of `rows` (dataset rows, ascending), from the cache in `dir` when it has
    /// them, else prepared now (and stored there when `dir` is given).
    /// `images`: the fingerprint of the images' bytes (`Fingerprint::of_files` of the rows'
    /// paths), part of the cache key, so a changed picture rebuilds the cache.
    pub fn open(
        ds: &Dataset,
        rows: &[usize],
        pre: &Preprocess,
        dir: Option<&Path>,
        images: &crate::io::Fingerprint,
    ) -> Result<ImageCache> {
        let mut paths = Vec::with_capacity(rows.len());
        let mut missing = Vec::new();
        for &r in rows {
            match ds.resolve_path(r, None) {
                Some(p) => paths.push(p),
                None => missing.push(ds.ids[r]),
            }
        }
        if !missing.is_empty() {
            return Err(Error::input(format!(
                "{}: {} train/validation row(s) have no image path (ids {:?}{}): training needs an image per row",
                ds.file.display(),
                missing.len(),
                &missing[..missing.len().min(5)],
                if missing.len() > 5 { ", ..." } else { "" }
            )));
        }
        let mut slot = vec![u32::MAX; ds.len()];
        for (i, &r) in rows.iter().enumerate() {
            slot[r] = i as u32;
        }
        let size = pre.size as usize;
        let key = cache_key(ds, rows, &paths, pre, images)?;
        if let Some(dir) = dir {
            let data = dir.join(format!("{key}.u8"));
            let meta_p = dir.join(format!("{key}.json"));
            if let Some(c) = try_reuse(&data, &meta_p, &key, rows, size)? {
                return Ok(ImageCache {
                    store: Store::Mapped(c.0),
                    channels: c.1,
                    size,
                    slot,
                    file: Some(data),
                    built: false,
                });
            }
            std::fs::create_dir_all(dir).at(dir)?;
            let channels = build(&paths, rows, ds, pre, Some(&data))?.0;
            let data_hash = crate::io::Fingerprint::of(&data)?.hash;
            let meta = CacheMeta {
                data_hash,
                simile_image_cache: 1,
                key: key.clone(),
                rows: rows.iter().map(|&r| r as u32).collect(),
                channels,
                size,
                dataset: ds.file.display().to_string(),
            };
            crate::io::atomic_write_bytes(
                &meta_p,
                &serde_json::to_vec(&meta).map_err(|e| Error::internal(e.to_string()))?,
            )?;
            let f = std::fs::File::open(&data).at(&data)?;
            // SAFETY: read-only map of a file simile renamed into place and never rewrites.
            let m = unsafe { Mmap::map(&f) }.at(&data)?;
            return Ok(ImageCache {
                store: Store::Mapped(m),
                channels,
                size,
                slot,
                file: Some(data),
                built: true,
            });
        }
        let (channels, buf) = build(&paths, rows, ds, pre, None)?;
        Ok(ImageCache {
            store: Store::Memory(buf.unwrap_or_default()),
            channels,
            size,
            slot,
            file: None,
            built: true,
        })
    }

    fn bytes(&self) -> &[u8] {
        match &self.store {
            Store::Mapped(m) => m,
            Store::Memory(v) => v,
        }
    }

    /// The stored planes of dataset row `row` (`channels x size x size`).
    pub fn get(&self, row: usize) -> &[u8] {
        let n = self.channels * self.size * self.size;
        let s = self.slot[row] as usize;
        &self.bytes()[s * n..(s + 1) * n]
    }
}

fn cache_key(
    ds: &Dataset,
    rows: &[usize],
    paths: &[PathBuf],
    pre: &Preprocess,
    images: &crate::io::Fingerprint,
) -> Result<String> {
    let fp = crate::io::Fingerprint::of(&ds.file)?;
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(fp.hash.as_bytes());
    h.update(&fp.size.to_le_bytes());
    h.update(images.hash.as_bytes());
    for (r, p) in rows.iter().zip(paths) {
        h.update(&(*r as u64).to_le_bytes());
        h.update(p.to_string_lossy().as_bytes());
    }
    Ok(format!(
        "{:016x}-{}px-{}-{}",
        h.digest(),
        pre.size,
        pre.resize,
        pre.crop_ratio
    ))
}

/// The image paths of dataset rows (rows without one are left out; `ImageCache::open`
/// reports them).
pub fn row_paths(ds: &Dataset, rows: &[usize]) -> Vec<PathBuf> {
    rows.iter()
        .filter_map(|&r| ds.resolve_path(r, None))
        .collect()
}

fn try_reuse(
    data: &Path,
    meta_p: &Path,
    key: &str,
    rows: &[usize],
    size: usize,
) -> Result<Option<(Mmap, usize)>> {
    let (Ok(text), true) = (std::fs::read(meta_p), data.is_file()) else {
        return Ok(None);
    };
    let Ok(meta) = serde_json::from_slice::<CacheMeta>(&text) else {
        return Ok(None);
    };
    let same_rows =
        meta.rows.len() == rows.len() && meta.rows.iter().zip(rows).all(|(a, &b)| *a as usize == b);
    if meta.key != key || !same_rows || meta.size != size || !matches!(meta.channels, 1 | 3) {
        return Ok(None);
    }
    let f = std::fs::File::open(data).at(data)?;
    // SAFETY: as above: a complete cache file is never rewritten in place.
    let m = unsafe { Mmap::map(&f) }.at(data)?;
    if m.len() != rows.len() * meta.channels * size * size {
        return Ok(None);
    }
    if crate::io::Fingerprint::of(data)?.hash != meta.data_hash {
        eprintln!(
            "simile-train: the image cache {} does not match its record (changed on disk); preparing the images again",
            data.display()
        );
        return Ok(None);
    }
    Ok(Some((m, meta.channels)))
}

/// Prepares every image (in parallel, in chunks): into `dest` (temporary file renamed when
/// complete) or into memory. Tries one plane per image first and starts again with three at
/// the first image that is not grey.
fn build(
    paths: &[PathBuf],
    rows: &[usize],
    ds: &Dataset,
    pre: &Preprocess,
    dest: Option<&Path>,
) -> Result<(usize, Option<Vec<u8>>)> {
    match build_with(paths, rows, ds, pre, dest, 1)? {
        Some(v) => Ok((1, v)),
        None => Ok((
            3,
            build_with(paths, rows, ds, pre, dest, 3)?
                .ok_or_else(|| Error::internal("image cache build failed"))?,
        )),
    }
}

/// Ok(None): `channels == 1` and an image is not grey.
#[allow(clippy::type_complexity)]
fn build_with(
    paths: &[PathBuf],
    rows: &[usize],
    ds: &Dataset,
    pre: &Preprocess,
    dest: Option<&Path>,
    channels: usize,
) -> Result<Option<Option<Vec<u8>>>> {
    let plane = pre.numel() / 3;
    let mut file = match dest {
        Some(d) => Some(crate::io::AtomicFile::create(d)?),
        None => None,
    };
    let mut mem = Vec::new();
    let pb = crate::progress::bar(paths.len() as u64, "cache");
    const CHUNK: usize = 2048;
    for (ci, chunk) in paths.chunks(CHUNK).enumerate() {
        let prepared: Vec<std::result::Result<Vec<u8>, String>> = chunk
            .par_iter()
            .enumerate()
            .map(|(i, p)| {
                let r = rows[ci * CHUNK + i];
                let v = image::prepare_file(p, ds.bbox[r], pre)?;
                pb.inc(1);
                Ok(v)
            })
            .collect();
        let mut bad = Vec::new();
        for (i, r) in prepared.iter().enumerate() {
            if let Err(why) = r {
                bad.push(format!(
                    "  {} (id {}): {why}",
                    chunk[i].display(),
                    ds.ids[rows[ci * CHUNK + i]]
                ));
            }
        }
        if !bad.is_empty() {
            pb.finish_and_clear();
            let mut lines = vec![format!(
                "{} image(s) cannot be used for training (fix or drop their rows):",
                bad.len()
            )];
            lines.extend(bad);
            return Err(Error::InputMany(lines));
        }
        for v in prepared.into_iter().flatten() {
            let out: &[u8] = if channels == 1 {
                let (r, rest) = v.split_at(plane);
                let (g, b) = rest.split_at(plane);
                if r != g || r != b {
                    pb.finish_and_clear();
                    return Ok(None);
                }
                r
            } else {
                &v
            };
            match &mut file {
                Some(f) => {
                    let p = f.path().to_path_buf();
                    f.file().write_all(out).at(p)?
                }
                None => mem.extend_from_slice(out),
            }
        }
    }
    pb.finish_and_clear();
    match file {
        Some(f) => {
            f.commit()?;
            Ok(Some(None))
        }
        None => Ok(Some(Some(mem))),
    }
}

/// Per-channel lookup tables `u8 -> (v / 255 - mean) / std`.
fn luts(pre: &Preprocess) -> [[f32; 256]; 3] {
    let mut lut = [[0f32; 256]; 3];
    for (c, table) in lut.iter_mut().enumerate() {
        for (v, t) in table.iter_mut().enumerate() {
            *t = (v as f32 / 255.0 - pre.mean[c]) / pre.std[c];
        }
    }
    lut
}

/// Writes the normalised `3 x S x S` floats of one cached image into `out`, augmented when
/// `aug` is given (with its generator).
pub fn render(
    cache: &ImageCache,
    row: usize,
    pre: &Preprocess,
    lut: &[[f32; 256]; 3],
    aug: Option<(&AugmentConfig, &mut Rng)>,
    out: &mut [f32],
) {
    let s = cache.size;
    let plane = s * s;
    let src = cache.get(row);
    let chan = |c: usize| -> &[u8] {
        let c = if cache.channels == 1 { 0 } else { c };
        &src[c * plane..(c + 1) * plane]
    };
    let Some((a, rng)) = aug else {
        for c in 0..3 {
            for (o, v) in out[c * plane..(c + 1) * plane].iter_mut().zip(chan(c)) {
                *o = lut[c][*v as usize];
            }
        }
        return;
    };
    // Geometry: a random resized crop (torchvision's RandomResizedCrop sampling, 10 tries
    // then the whole image), bilinear back to S x S, then a flip.
    let (x0, y0, cw, ch) = crop_box(a, s, rng);
    let flip = a.hflip > 0.0 && rng::unit(rng) < a.hflip;
    let b = jitter(a.brightness, rng);
    let ct = jitter(a.contrast, rng);
    let sat = jitter(a.saturation, rng);
    let mut px = vec![0f32; 3 * plane];
    let identity = (x0, y0, cw, ch) == (0.0, 0.0, s as f64, s as f64);
    for c in 0..3 {
        let p = chan(c);
        let dst = &mut px[c * plane..(c + 1) * plane];
        for y in 0..s {
            for x in 0..s {
                let xs = if flip { s - 1 - x } else { x };
                dst[y * s + x] = if identity {
                    p[y * s + xs] as f32
                } else {
                    // Pixel centres, as a bilinear resize (align_corners = false).
                    let fx = x0 + (xs as f64 + 0.5) * cw / s as f64 - 0.5;
                    let fy = y0 + (y as f64 + 0.5) * ch / s as f64 - 0.5;
                    bilinear(p, s, fx, fy)
                };
            }
        }
    }
    // Colour: brightness, contrast, saturation (torchvision's order when all are set, on
    // 0..255 floats, clamped after each).
    if b != 1.0 {
        px.iter_mut().for_each(|v| *v = (*v * b).clamp(0.0, 255.0));
    }
    if ct != 1.0 {
        let mean = grey_mean(&px, plane);
        px.iter_mut()
            .for_each(|v| *v = (mean + (*v - mean) * ct).clamp(0.0, 255.0));
    }
    if sat != 1.0 {
        for i in 0..plane {
            let g = 0.299 * px[i] + 0.587 * px[plane + i] + 0.114 * px[2 * plane + i];
            for c in 0..3 {
                let v = &mut px[c * plane + i];
                *v = (g + (*v - g) * sat).clamp(0.0, 255.0);
            }
        }
    }
    for c in 0..3 {
        let (m, sd) = (pre.mean[c], pre.std[c]);
        for (o, v) in out[c * plane..(c + 1) * plane]
            .iter_mut()
            .zip(&px[c * plane..(c + 1) * plane])
        {
            *o = (v / 255.0 - m) / sd;
        }
    }
}

fn jitter(x: f64, rng: &mut Rng) -> f32 {
    if x <= 0.0 {
        1.0
    } else {
        (1.0 - x + 2.0 * x * rng::unit(rng)) as f32
    }
}

fn grey_mean(px: &[f32], plane: usize) -> f32 {
    let mut s = 0f64;
    for i in 0..plane {
        s += (0.299 * px[i] + 0.587 * px[plane + i] + 0.114 * px[2 * plane + i]) as f64;
    }
    (s / plane as f64) as f32
}

fn crop_box(a: &AugmentConfig, s: usize, rng: &mut Rng) -> (f64, f64, f64, f64) {
    let sf = s as f64;
    if a.crop_scale == [1.0, 1.0] {
        return (0.0, 0.0, sf, sf);
    }
    let area = sf * sf;
    let (lr0, lr1) = (a.crop_ratio[0].ln(), a.crop_ratio[1].ln());
    for _ in 0..10 {
        let target =
            area * (a.crop_scale[0] + (a.crop_scale[1] - a.crop_scale[0]) * rng::unit(rng));
        let ratio = (lr0 + (lr1 - lr0) * rng::unit(rng)).exp();
        let w = (target * ratio).sqrt();
        let h = (target / ratio).sqrt();
        if w <= sf && h <= sf && w >= 1.0 && h >= 1.0 {
            let x = (sf - w) * rng::unit(rng);
            let y = (sf - h) * rng::unit(rng);
            return (x, y, w, h);
        }
    }
    (0.0, 0.0, sf, sf)
}

#[inline]
fn bilinear(p: &[u8], s: usize, fx: f64, fy: f64) -> f32 {
    let fx = fx.clamp(0.0, (s - 1) as f64);
    let fy = fy.clamp(0.0, (s - 1) as f64);
    let (x0, y0) = (fx.floor() as usize, fy.floor() as usize);
    let (x1, y1) = ((x0 + 1).min(s - 1), (y0 + 1).min(s - 1));
    let (dx, dy) = ((fx - x0 as f64) as f32, (fy - y0 as f64) as f32);
    let v = |x: usize, y: usize| p[y * s + x] as f32;
    let top = v(x0, y0) * (1.0 - dx) + v(x1, y0) * dx;
    let bot = v(x0, y1) * (1.0 - dx) + v(x1, y1) * dx;
    top * (1.0 - dy) + bot * dy
}

/// The generator of image `i` of global step `step`.
pub fn image_rng(seed: u64, step: usize, i: usize) -> Rng {
    // Stream 2^40 + ...: apart from the sampler's (epoch) and miner's (step) streams.
    rng::seeded(
        seed ^ 0x5151_1e0a_a0c0_ffee,
        (1u64 << 40) + ((step as u64) << 16) + i as u64,
    )
}

/// The normalised float data of a batch `[n, 3, S, S]`, images prepared in parallel.
pub fn batch(
    cache: &ImageCache,
    rows: &[usize],
    pre: &Preprocess,
    aug: Option<(&AugmentConfig, u64, usize)>,
    first: usize,
) -> Vec<f32> {
    let n3 = 3 * cache.size * cache.size;
    let lut = luts(pre);
    let mut buf = vec![0f32; rows.len() * n3];
    buf.par_chunks_mut(n3)
        .zip(rows.par_iter())
        .enumerate()
        .for_each(|(i, (out, &r))| match aug {
            Some((a, seed, step)) if !a.is_off() => {
                // Seeded by the position in the whole batch (`first`: a rank's share's start),
                // so a data-parallel run augments as one process would.
                let mut g = image_rng(seed, step, first + i);
                render(cache, r, pre, &lut, Some((a, &mut g)), out)
            }
            _ => render(cache, r, pre, &lut, None, out),
        });
    buf
}

/// Where a training batch's inputs come from.
pub(crate) enum Source<'a> {
    Images {
        cache: &'a ImageCache,
        pre: &'a Preprocess,
        /// Augmentation and the run's seed (None: off).
        aug: Option<(&'a AugmentConfig, u64)>,
    },
    Texts {
        tok: &'a crate::tokenize::TextTokenizer,
        ds: &'a Dataset,
    },
}

/// A batch's inputs on the host, built ahead of its step.
pub(crate) enum HostBatch {
    /// `[n, 3, size, size]` normalised floats.
    Images {
        data: Vec<f32>,
        n: usize,
        size: usize,
    },
    Tokens(crate::tokenize::TokenBatch),
}

/// A batch's inputs on the device: what a task's loss reads.
pub(crate) enum Input {
    /// `[B, 3, S, S]` float32.
    Images(tch::Tensor),
    /// Token ids and attention mask, `[B, L]` int64.
    Tokens { ids: tch::Tensor, mask: tch::Tensor },
}

impl Source<'_> {
    /// The inputs of dataset `rows` at positions `first..` of step `step`'s batch.
    pub fn make(&self, rows: &[usize], first: usize, step: usize) -> Result<HostBatch> {
        Ok(match self {
            Source::Images { cache, pre, aug } => HostBatch::Images {
                data: batch(
                    cache,
                    rows,
                    pre,
                    aug.map(|(a, seed)| (a, seed, step)),
                    first,
                ),
                n: rows.len(),
                size: pre.size as usize,
            },
            Source::Texts { tok, ds } => {
                let texts: Vec<&str> = rows
                    .iter()
                    .map(|&r| ds.text[r].as_deref().unwrap_or(""))
                    .collect();
                HostBatch::Tokens(tok.batch(&texts, &|k| {
                    format!("train text id {} (column 'text')", ds.ids[rows[k]])
                })?)
            }
        })
    }
}

impl HostBatch {
    pub fn to_device(&self, dev: tch::Device) -> Result<Input> {
        Ok(match self {
            HostBatch::Images { data, n, size } => {
                let s = *size as i64;
                Input::Images(
                    tch::Tensor::f_from_slice(data)?
                        .f_view([*n as i64, 3, s, s])?
                        .f_to_device(dev)?,
                )
            }
            HostBatch::Tokens(t) => Input::Tokens {
                ids: t.ids.f_to_device(dev)?,
                mask: t.mask.f_to_device(dev)?,
            },
        })
    }
}

impl Input {
    /// The images of an image batch; an error for a task that reads images only.
    pub fn images(&self) -> Result<&tch::Tensor> {
        match self {
            Input::Images(x) => Ok(x),
            Input::Tokens { .. } => Err(Error::internal("an image task got a token batch")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(size: usize, channels: usize) -> ImageCache {
        let n = channels * size * size;
        let data: Vec<u8> = (0..2 * n).map(|i| (i * 7 % 251) as u8).collect();
        ImageCache {
            store: Store::Memory(data),
            channels,
            size,
            slot: vec![0, 1],
            file: None,
            built: true,
        }
    }

    #[test]
    fn plain_render_matches_batch_tensor() {
        let c = fake(4, 3);
        let pre = Preprocess::imagenet(4, image::ResizeMode::Pad);
        let got = batch(&c, &[1], &pre, None, 0);
        let want = image::batch_tensor(&[c.get(1)], &pre);
        let want: Vec<f32> = Vec::try_from(want.flatten(0, -1)).unwrap();
        assert_eq!(got, want);
    }

    #[test]
    fn augmentation_is_seeded_and_bounded() {
        let c = fake(8, 1);
        let pre = Preprocess::imagenet(8, image::ResizeMode::Pad);
        let a = AugmentConfig {
            crop_scale: [0.5, 1.0],
            hflip: 0.5,
            brightness: 0.3,
            contrast: 0.3,
            saturation: 0.3,
            ..Default::default()
        };
        let x = batch(&c, &[0, 1], &pre, Some((&a, 7, 3)), 0);
        let y = batch(&c, &[0, 1], &pre, Some((&a, 7, 3)), 0);
        let z = batch(&c, &[0, 1], &pre, Some((&a, 7, 4)), 0);
        assert_eq!(x, y);
        assert_ne!(x, z);
        let lo = (0.0 - 0.485) / 0.229 - 1e-4;
        let hi = (1.0 - 0.406) / 0.225 + 1e-4;
        assert!(x.iter().all(|v| *v >= lo as f32 && *v <= hi as f32));
    }

    #[test]
    fn flip_mirrors() {
        let c = fake(4, 1);
        let pre = Preprocess::imagenet(4, image::ResizeMode::Pad);
        let a = AugmentConfig {
            hflip: 1.0,
            ..Default::default()
        };
        let plain = batch(&c, &[0], &pre, None, 0);
        let f = batch(&c, &[0], &pre, Some((&a, 1, 0)), 0);
        for y in 0..4 {
            for x in 0..4 {
                assert_eq!(f[y * 4 + x], plain[y * 4 + 3 - x]);
            }
        }
    }
}
