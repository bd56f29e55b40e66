//! Images for the models: decode (JPEG, PNG; grayscale, RGBA, 16-bit; EXIF orientation), the
//! dataset's bbox crop, resize as the model folder says, normalise, batch.
//!
//! Decoding follows OML's `imread_pillow` (`Image.open(...).convert("RGB")`): grayscale is
//! replicated to three channels, an alpha channel is dropped, 16-bit samples are scaled to
//! 8 bits. The bbox is `[x_1, x_2, y_1, y_2]` with exclusive right and bottom edges, applied
//! before the resize, like OML. The three resize modes are OML's transforms:
//! - `pad` (`norm_resize_albu`): longest side to `size`, aspect kept, centred on white;
//! - `stretch` (`norm_resize_torch`): both sides to `size`, aspect not kept;
//! - `crop` (`norm_resize_hypvit_torch`): shorter side to `size / crop_ratio`, centre crop.
//!
//! A prepared image is kept as `u8` CHW (3 x size x size): a quarter of the memory of the
//! float tensor, normalised only when a batch is assembled.
use crate::error::{Error, Result};
use image::{imageops::FilterType, DynamicImage, ImageDecoder, ImageReader, RgbImage};
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

impl std::str::FromStr for ResizeMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "pad" => Ok(ResizeMode::Pad),
            "stretch" => Ok(ResizeMode::Stretch),
            "crop" => Ok(ResizeMode::Crop),
            _ => Err(format!("'{s}': expected pad, stretch or crop")),
        }
    }
}

impl std::fmt::Display for ResizeMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ResizeMode::Pad => "pad",
            ResizeMode::Stretch => "stretch",
            ResizeMode::Crop => "crop",
        })
    }
}

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
        other => other.to_rgb8(),
    })
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

fn resize(img: &RgbImage, w: u32, h: u32) -> RgbImage {
    if img.width() == w && img.height() == h {
        return img.clone();
    }
    image::imageops::resize(img, w.max(1), h.max(1), FilterType::Triangle)
}

/// Resizes to the model's square input as `p.resize` says; returns a `size x size` RGB image.
pub fn fit(img: &RgbImage, p: &Preprocess) -> RgbImage {
    let s = p.size;
    let (w, h) = (img.width(), img.height());
    match p.resize {
        ResizeMode::Stretch => resize(img, s, s),
        ResizeMode::Pad => {
            // albumentations LongestMaxSize + PadIfNeeded(BORDER_CONSTANT, white), centred with
            // the odd pixel at the bottom/right.
            let scale = s as f64 / w.max(h) as f64;
            let nw = ((w as f64 * scale).round() as u32).clamp(1, s);
            let nh = ((h as f64 * scale).round() as u32).clamp(1, s);
            let r = resize(img, nw, nh);
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
            // torchvision Resize(int) on the shorter side (the longer truncated), CenterCrop.
            let short_to = ((s as f64 / p.crop_ratio).round() as u32).max(s);
            let (nw, nh) = if w <= h {
                (short_to, ((short_to as u64 * h as u64) / w as u64) as u32)
            } else {
                (((short_to as u64 * w as u64) / h as u64) as u32, short_to)
            };
            let r = resize(img, nw.max(s), nh.max(s));
            let left = ((r.width() - s) as f64 / 2.0).round() as u32;
            let top = ((r.height() - s) as f64 / 2.0).round() as u32;
            image::imageops::crop_imm(&r, left, top, s, s).to_image()
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
    // Per channel: x = v * (1 / (255 std)) - mean / std, a lookup table of 256 values.
    let mut lut = [[0f32; 256]; 3];
    for (c, table) in lut.iter_mut().enumerate() {
        for (v, t) in table.iter_mut().enumerate() {
            *t = (v as f32 / 255.0 - p.mean[c]) / p.std[c];
        }
    }
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
