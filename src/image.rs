//! Images for the models: decode (JPEG, PNG; grayscale, RGBA, 16-bit; EXIF orientation), the
//! dataset's bbox crop, resize as the model folder says, normalise, batch.
//!
//! Decoding follows OML's `imread_pillow` (`Image.open(...).convert("RGB")`): grayscale is
//! replicated to three channels, an alpha channel is dropped, and 16-bit samples become 8 bits
//! as Pillow makes them: 16-bit grey (Pillow's mode I;16) is clipped to 255, 16-bit colour and
//! grey + alpha keep their high byte. The bbox is `[x_1, x_2, y_1, y_2]` with exclusive right
//! and bottom edges, applied before the resize, like OML. The three resize modes are OML's
//! transforms:
//! - `pad` (`norm_resize_albu`): longest side to `size`, aspect kept, centred on white;
//! - `stretch` (`norm_resize_torch`): both sides to `size`, aspect not kept;
//! - `crop` (`norm_resize_hypvit_torch`'s geometry; it resizes bicubic, this bilinear): shorter
//!   side to `size / crop_ratio`, centre crop.
//!
//! A prepared image is kept as `u8` CHW (3 x size x size): a quarter of the memory of the
//! float tensor, normalised only when a batch is assembled.
use crate::error::{Error, Result};
use fast_image_resize as fir;
use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};
use serde::{Deserialize, Serialize};
use std::io::Cursor;
use std::path::Path;

/// How an image is brought to the model's square input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResizeMode {
    /// Longest side to `size`, aspect ratio kept, padded white to a square (OML's default).
    Pad,
    /// Both sides to `size` (aspect ratio distorted).
    Stretch,
    /// Shorter side to `size / crop_ratio`, then the centre `size x size` crop.
    Crop,
}

crate::named!(ResizeMode { Pad => "pad", Stretch => "stretch", Crop => "crop" });

fn default_crop_ratio() -> f64 {
    0.875
}

/// A model's input preprocessing, as recorded in `model.json` (`input`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Preprocess {
    /// Side of the square input, in pixels.
    pub size: u32,
    pub resize: ResizeMode,
    /// For `crop`: the shorter side is resized to `size / crop_ratio` (224 / 0.875 = 256).
    #[serde(default = "default_crop_ratio")]
    pub crop_ratio: f64,
    /// Per-channel mean and std on the 0..1 scale: `x = (v / 255 - mean) / std`.
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

impl Preprocess {
    /// OML's default for extractors: pad to `size` with ImageNet mean/std.
    pub fn imagenet(size: u32, resize: ResizeMode) -> Self {
        Preprocess {
            size,
            resize,
            crop_ratio: default_crop_ratio(),
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.size == 0 || self.size > 4096 {
            return Err(Error::input(format!(
                "input size {} out of range 1..=4096",
                self.size
            )));
        }
        if self.std.iter().any(|s| *s <= 0.0 || !s.is_finite()) {
            return Err(Error::input(format!(
                "std {:?}: every value must be > 0",
                self.std
            )));
        }
        if !(self.crop_ratio > 0.0 && self.crop_ratio <= 1.0) {
            return Err(Error::input(format!(
                "crop ratio {} out of range (0, 1]",
                self.crop_ratio
            )));
        }
        Ok(())
    }

    /// Elements of one prepared image (3 x size x size).
    pub fn numel(&self) -> usize {
        3 * self.size as usize * self.size as usize
    }
}

/// Decodes an image file to 8-bit RGB, applying its EXIF orientation.
pub fn decode_file(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_bytes(&bytes).map_err(|m| Error::input(format!("{}: {m}", path.display())))
}

/// Decodes bytes to 8-bit RGB; the error says what is wrong (corrupt, truncated, unknown format).
pub fn decode_bytes(bytes: &[u8]) -> std::result::Result<RgbImage, String> {
    if bytes.is_empty() {
        return Err("empty file".into());
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| e.to_string())?;
    let format = reader.format();
    if format == Some(image::ImageFormat::Jpeg) && !jpeg_has_end(bytes) {
        // zune-jpeg fills a truncated scan with grey instead of failing: check the end marker.
        return Err("truncated JPEG (no end-of-image marker)".into());
    }
    let mut decoder = reader.into_decoder().map_err(describe)?;
    let orientation = decoder.orientation().map_err(describe)?;
    let mut img = DynamicImage::from_decoder(decoder).map_err(describe)?;
    img.apply_orientation(orientation);
    Ok(match img {
        DynamicImage::ImageRgb8(rgb) => rgb,
        DynamicImage::ImageLuma16(g) => rgb8_from_16(g.width(), g.height(), g.as_raw(), 1, clip8),
        DynamicImage::ImageLumaA16(g) => {
            // Grey with a tRNS colour also decodes to grey + alpha: Pillow reads it as I;16.
            let to8 = if png_colour_type(bytes) == Some(0) {
                clip8
            } else {
                high8
            };
            rgb8_from_16(g.width(), g.height(), g.as_raw(), 2, to8)
        }
        DynamicImage::ImageRgb16(c) => rgb8_from_16(c.width(), c.height(), c.as_raw(), 3, high8),
        DynamicImage::ImageRgba16(c) => rgb8_from_16(c.width(), c.height(), c.as_raw(), 4, high8),
        other => other.to_rgb8(),
    })
}

/// 16-bit grey as Pillow's `convert("RGB")` of mode I;16: the value clipped to 255 (not scaled).
fn clip8(v: u16) -> u8 {
    v.min(255) as u8
}

/// 16-bit colour (or grey + alpha) as Pillow's PNG decoder unpacks it: the high byte.
fn high8(v: u16) -> u8 {
    (v >> 8) as u8
}

/// 8-bit RGB from 16-bit samples (`channels` per pixel: grey, grey + alpha, RGB, RGBA; alpha
/// dropped), each sample through `to8`.
fn rgb8_from_16(w: u32, h: u32, raw: &[u16], channels: usize, to8: fn(u16) -> u8) -> RgbImage {
    let mut out = Vec::with_capacity(3 * raw.len() / channels);
    for px in raw.chunks_exact(channels) {
        if channels < 3 {
            let v = to8(px[0]);
            out.extend_from_slice(&[v, v, v]);
        } else {
            out.extend_from_slice(&[to8(px[0]), to8(px[1]), to8(px[2])]);
        }
    }
    RgbImage::from_raw(w, h, out).expect("three samples per pixel")
}

/// A PNG's colour type (0 grey, 2 RGB, 3 palette, 4 grey + alpha, 6 RGBA), from its IHDR.
fn png_colour_type(bytes: &[u8]) -> Option<u8> {
    (bytes.len() > 25 && bytes.starts_with(b"\x89PNG\r\n\x1a\n") && &bytes[12..16] == b"IHDR")
        .then(|| bytes[25])
}

fn describe(e: image::ImageError) -> String {
    match e {
        image::ImageError::Unsupported(u) => format!("unsupported image: {u}"),
        image::ImageError::Decoding(d) => format!("corrupt or truncated image: {d}"),
        other => other.to_string(),
    }
}

/// A JPEG is complete when an EOI marker (FF D9) ends it, give or take trailing padding.
fn jpeg_has_end(bytes: &[u8]) -> bool {
    let tail = &bytes[bytes.len().saturating_sub(4096)..];
    tail.windows(2).any(|w| w == [0xFF, 0xD9])
}

/// Crops to the dataset's bbox `[x_1, x_2, y_1, y_2]` (right and bottom exclusive), clamped to
/// the image. An empty crop is an error naming the box and the image size.
pub fn crop_bbox(img: RgbImage, bbox: Option<[i32; 4]>) -> std::result::Result<RgbImage, String> {
    let Some([x1, x2, y1, y2]) = bbox else {
        return Ok(img);
    };
    let (w, h) = (img.width() as i64, img.height() as i64);
    let cx1 = (x1 as i64).clamp(0, w);
    let cx2 = (x2 as i64).clamp(0, w);
    let cy1 = (y1 as i64).clamp(0, h);
    let cy2 = (y2 as i64).clamp(0, h);
    if cx2 <= cx1 || cy2 <= cy1 {
        return Err(format!(
            "bbox [x_1={x1}, x_2={x2}, y_1={y1}, y_2={y2}] is empty inside the {w}x{h} image"
        ));
    }
    if (cx1, cy1, cx2, cy2) == (0, 0, w, h) {
        return Ok(img);
    }
    Ok(image::imageops::crop_imm(
        &img,
        cx1 as u32,
        cy1 as u32,
        (cx2 - cx1) as u32,
        (cy2 - cy1) as u32,
    )
    .to_image())
}

/// Resizes `img`, or the box `(left, top, width, height)` of it (in source pixels, may be
/// fractional), to `w x h` with Pillow's bilinear filter (a triangle whose support widens with
/// the downscale factor, so no aliasing): what torchvision's `Resize` runs on PIL images.
/// Pixels outside the box but inside the image feed the filter at the box's edges, so
/// resizing a box equals resizing the whole and cropping the result.
fn resize(img: &RgbImage, region: Option<(f64, f64, f64, f64)>, w: u32, h: u32) -> RgbImage {
    let (w, h) = (w.max(1), h.max(1));
    if region.is_none() && img.width() == w && img.height() == h {
        return img.clone();
    }
    let src = fir::images::ImageRef::new(img.width(), img.height(), img.as_raw(), PIXEL)
        .expect("an RgbImage's buffer fits its size");
    let mut dst = fir::images::Image::new(w, h, PIXEL);
    let mut opts = fir::ResizeOptions::new()
        .resize_alg(fir::ResizeAlg::Convolution(fir::FilterType::Bilinear));
    if let Some((left, top, cw, ch)) = region {
        // Rounding can put the box's far edge a hair past the image (29 px at crop ratio 1:
        // 29.000000000000004); the resizer refuses that, so clamp it to the image.
        let (iw, ih) = (img.width() as f64, img.height() as f64);
        let (left, top) = (left.clamp(0.0, iw), top.clamp(0.0, ih));
        opts = opts.crop(left, top, cw.min(iw - left), ch.min(ih - top));
    }
    RESIZER
        .with(|r| r.borrow_mut().resize(&src, &mut dst, &opts))
        .expect("same pixel types, a crop box inside the image");
    RgbImage::from_raw(w, h, dst.into_vec()).expect("the resizer's buffer fits its size")
}

const PIXEL: fir::PixelType = fir::PixelType::U8x3;

thread_local! {
    // One per decoding thread: it keeps its scratch buffers between images.
    static RESIZER: std::cell::RefCell<fir::Resizer> = std::cell::RefCell::new(fir::Resizer::new());
}

/// Resizes to the model's square input as `p.resize` says; returns a `size x size` RGB image.
pub fn fit(img: &RgbImage, p: &Preprocess) -> RgbImage {
    let s = p.size;
    let (w, h) = (img.width(), img.height());
    match p.resize {
        ResizeMode::Stretch => resize(img, None, s, s),
        ResizeMode::Pad => {
            // albumentations LongestMaxSize + PadIfNeeded(BORDER_CONSTANT, white), centred with
            // the odd pixel at the bottom/right.
            let scale = s as f64 / w.max(h) as f64;
            let nw = ((w as f64 * scale).round() as u32).clamp(1, s);
            let nh = ((h as f64 * scale).round() as u32).clamp(1, s);
            let r = resize(img, None, nw, nh);
            if nw == s && nh == s {
                return r;
            }
            let mut canvas = RgbImage::from_pixel(s, s, image::Rgb([255, 255, 255]));
            image::imageops::replace(
                &mut canvas,
                &r,
                ((s - nw) / 2) as i64,
                ((s - nh) / 2) as i64,
            );
            canvas
        }
        ResizeMode::Crop => {
            // torchvision Resize(int) on the shorter side (the longer truncated), then
            // CenterCrop(size) with Python's round (half to even). Only the kept square is
            // computed: the matching box of the source is resized straight to size x size.
            let short_to = ((s as f64 / p.crop_ratio).round() as u32).max(s);
            // The longer side saturates (an extreme aspect ratio): it only moves the box.
            let longer = |a: u32, b: u32| {
                u32::try_from(short_to as u64 * a as u64 / b as u64).unwrap_or(u32::MAX)
            };
            let (nw, nh) = if w <= h {
                (short_to, longer(h, w))
            } else {
                (longer(w, h), short_to)
            };
            let (nw, nh) = (nw.max(s), nh.max(s));
            let left = ((nw - s) as f64 / 2.0).round_ties_even();
            let top = ((nh - s) as f64 / 2.0).round_ties_even();
            let (sx, sy) = (w as f64 / nw as f64, h as f64 / nh as f64);
            let region = (left * sx, top * sy, s as f64 * sx, s as f64 * sy);
            resize(img, Some(region), s, s)
        }
    }
}

/// Decodes, crops and resizes one image to `u8` CHW (3 x size x size).
pub fn prepare_file(
    path: &Path,
    bbox: Option<[i32; 4]>,
    p: &Preprocess,
) -> std::result::Result<Vec<u8>, String> {
    let bytes = std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => "file not found".to_string(),
        _ => e.to_string(),
    })?;
    let img = decode_bytes(&bytes)?;
    let img = crop_bbox(img, bbox)?;
    Ok(to_chw(&fit(&img, p)))
}

/// HWC RGB -> planar CHW bytes.
pub fn to_chw(img: &RgbImage) -> Vec<u8> {
    let n = (img.width() * img.height()) as usize;
    let mut out = vec![0u8; 3 * n];
    let (r, rest) = out.split_at_mut(n);
    let (g, b) = rest.split_at_mut(n);
    for (i, px) in img.as_raw().chunks_exact(3).enumerate() {
        r[i] = px[0];
        g[i] = px[1];
        b[i] = px[2];
    }
    out
}

/// Normalises prepared `u8` CHW images into one `[n, 3, size, size]` float32 tensor.
pub fn batch_tensor(images: &[&[u8]], p: &Preprocess) -> tch::Tensor {
    let plane = p.size as usize * p.size as usize;
    let mut buf = vec![0f32; images.len() * 3 * plane];
    let lut = normalise_lut(p);
    for (img, out) in images.iter().zip(buf.chunks_exact_mut(3 * plane)) {
        for c in 0..3 {
            let src = &img[c * plane..(c + 1) * plane];
            let dst = &mut out[c * plane..(c + 1) * plane];
            for (d, s) in dst.iter_mut().zip(src) {
                *d = lut[c][*s as usize];
            }
        }
    }
    let s = p.size as i64;
    tch::Tensor::from_slice(&buf).view([images.len() as i64, 3, s, s])
}

/// Like [`batch_tensor`], but the tensor is stored channels-last (NHWC strides under the same
/// logical `[n, 3, size, size]` shape). libtorch's oneDNN CPU convolutions then run on the
/// activations as they are instead of reordering them to and from a blocked layout around
/// every convolution (measured: resnet18 bf16 1.6x, the small CNN 1.5x on this CPU).
pub fn batch_tensor_channels_last(images: &[&[u8]], p: &Preprocess) -> tch::Tensor {
    let plane = p.size as usize * p.size as usize;
    let mut buf = vec![0f32; images.len() * 3 * plane];
    let lut = normalise_lut(p);
    for (img, out) in images.iter().zip(buf.chunks_exact_mut(3 * plane)) {
        let (r, rest) = img.split_at(plane);
        let (g, b) = rest.split_at(plane);
        for (i, px) in out.chunks_exact_mut(3).enumerate() {
            px[0] = lut[0][r[i] as usize];
            px[1] = lut[1][g[i] as usize];
            px[2] = lut[2][b[i] as usize];
        }
    }
    let s = p.size as i64;
    tch::Tensor::from_slice(&buf)
        .view([images.len() as i64, s, s, 3])
        .permute([0, 3, 1, 2])
}

/// Per channel: x = v * (1 / (255 std)) - mean / std, a lookup table of 256 values.
fn normalise_lut(p: &Preprocess) -> [[f32; 256]; 3] {
    let mut lut = [[0f32; 256]; 3];
    for (c, table) in lut.iter_mut().enumerate() {
        for (v, t) in table.iter_mut().enumerate() {
            *t = (v as f32 / 255.0 - p.mean[c]) / p.std[c];
        }
    }
    lut
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checker(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 5) as u8, 100]))
    }

    #[test]
    fn pad_keeps_aspect_and_pads_white() {
        let p = Preprocess::imagenet(32, ResizeMode::Pad);
        let out = fit(&checker(64, 32), &p);
        assert_eq!((out.width(), out.height()), (32, 32));
        // 64x32 -> 32x16 centred: rows 0..8 and 24..32 are white.
        assert_eq!(out.get_pixel(5, 2).0, [255, 255, 255]);
        assert_eq!(out.get_pixel(5, 30).0, [255, 255, 255]);
        assert_ne!(out.get_pixel(5, 16).0, [255, 255, 255]);
    }

    #[test]
    fn crop_and_stretch_sizes() {
        let mut p = Preprocess::imagenet(24, ResizeMode::Crop);
        assert_eq!(fit(&checker(40, 90), &p).dimensions(), (24, 24));
        p.resize = ResizeMode::Stretch;
        assert_eq!(fit(&checker(40, 90), &p).dimensions(), (24, 24));
    }

    #[test]
    fn crop_resizes_only_the_kept_box_with_the_same_result() {
        // 90x60 -> shorter side 27 (24 / 0.875 rounded): 40x27, centre 24x24 at (8, 2) ...
        let img = RgbImage::from_fn(90, 60, |x, y| {
            image::Rgb([(x * 2) as u8, (y * 4) as u8, ((x * y) % 251) as u8])
        });
        let p = Preprocess::imagenet(24, ResizeMode::Crop);
        let fused = fit(&img, &p);
        // ... the same as resizing the whole image and cropping (PyTorch's order).
        let whole = resize(&img, None, 40, 27);
        let want = image::imageops::crop_imm(&whole, 8, 2, 24, 24).to_image();
        let diff = fused
            .as_raw()
            .iter()
            .zip(want.as_raw())
            .map(|(a, b)| (*a as i32 - *b as i32).abs())
            .max()
            .unwrap();
        assert!(diff <= 1, "fused crop differs by {diff}");
    }

    #[test]
    fn bbox_is_exclusive_and_checked() {
        let img = checker(10, 8);
        let c = crop_bbox(img.clone(), Some([2, 5, 1, 4])).unwrap();
        assert_eq!(c.dimensions(), (3, 3));
        assert_eq!(c.get_pixel(0, 0), img.get_pixel(2, 1));
        assert!(crop_bbox(img, Some([5, 5, 0, 3])).is_err());
    }

    #[test]
    fn normalise_matches_formula() {
        let p = Preprocess::imagenet(1, ResizeMode::Stretch);
        let t = batch_tensor(&[&[0u8, 128, 255]], &p);
        let v: Vec<f32> = Vec::try_from(t.flatten(0, -1)).unwrap();
        for (c, raw) in [0f32, 128.0, 255.0].iter().enumerate() {
            let want = (raw / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
            assert!((v[c] - want).abs() < 1e-6);
        }
    }

    #[test]
    fn channels_last_batch_has_the_same_values() {
        let p = Preprocess::imagenet(5, ResizeMode::Pad);
        let a: Vec<u8> = (0..75).map(|i| (i * 37 % 256) as u8).collect();
        let b: Vec<u8> = (0..75).map(|i| (i * 11 % 256) as u8).collect();
        let plain = batch_tensor(&[&a, &b], &p);
        let cl = batch_tensor_channels_last(&[&a, &b], &p);
        assert_eq!(cl.size(), plain.size());
        // Channels-last strides: the channel is the innermost dimension.
        assert_eq!(cl.stride(), vec![75, 1, 15, 3]);
        let d = f64::try_from((cl - plain).abs().max()).unwrap();
        assert_eq!(d, 0.0);
    }

    fn png(img: DynamicImage) -> Vec<u8> {
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    }

    #[test]
    fn sixteen_bit_pngs_become_8_bits_as_pillow_makes_them() {
        // Pillow (what OML's imread_pillow reads with): I;16 grey converts to RGB clipped at
        // 255; 16-bit RGB, RGBA and grey + alpha are unpacked to their high byte.
        let v = [0u16, 1, 255, 256, 1000, 0x80ff, 65535];
        let grey = image::ImageBuffer::<image::Luma<u16>, _>::from_raw(7, 1, v.to_vec()).unwrap();
        let got = decode_bytes(&png(DynamicImage::ImageLuma16(grey))).unwrap();
        let want = [0u8, 1, 255, 255, 255, 255, 255];
        for (x, w) in want.iter().enumerate() {
            assert_eq!(got.get_pixel(x as u32, 0).0, [*w; 3], "grey {}", v[x]);
        }
        let rgb: Vec<u16> = v.iter().flat_map(|&a| [a, 65535 - a, a / 2]).collect();
        let rgb = image::ImageBuffer::<image::Rgb<u16>, _>::from_raw(7, 1, rgb).unwrap();
        let got = decode_bytes(&png(DynamicImage::ImageRgb16(rgb))).unwrap();
        for (x, &a) in v.iter().enumerate() {
            let hi = |s: u16| (s >> 8) as u8;
            assert_eq!(
                got.get_pixel(x as u32, 0).0,
                [hi(a), hi(65535 - a), hi(a / 2)]
            );
        }
        let la: Vec<u16> = v.iter().flat_map(|&a| [a, 65535 - a]).collect();
        let la = image::ImageBuffer::<image::LumaA<u16>, _>::from_raw(7, 1, la).unwrap();
        let bytes = png(DynamicImage::ImageLumaA16(la));
        assert_eq!(png_colour_type(&bytes), Some(4));
        let got = decode_bytes(&bytes).unwrap();
        for (x, &a) in v.iter().enumerate() {
            assert_eq!(got.get_pixel(x as u32, 0).0, [(a >> 8) as u8; 3]);
        }
        assert_eq!(png_colour_type(b"not a png at all, not a png at all"), None);
    }

    #[test]
    fn corrupt_bytes_are_reported() {
        assert!(decode_bytes(b"").is_err());
        assert!(decode_bytes(b"definitely not an image").is_err());
        let mut png = Vec::new();
        DynamicImage::ImageRgb8(checker(16, 16))
            .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        assert!(decode_bytes(&png).is_ok());
        assert!(decode_bytes(&png[..png.len() / 2]).is_err());
    }
}
