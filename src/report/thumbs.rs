//! Thumbnails of dataset rows as `data:` URIs: the image decoded, cropped to its bbox and
//! padded to a square (`image::crop_bbox`, `image::fit` in `pad` mode: what the models see),
//! encoded as PNG or JPEG, whichever is smaller (PNG keeps glyphs and drawings crisp and
//! small; JPEG is smaller for photos).
use crate::dataset::Dataset;
use crate::image::{crop_bbox, decode_file, fit, Preprocess, ResizeMode};
use base64::Engine;
use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{ExtendedColorType, ImageEncoder, RgbImage};
use std::collections::HashMap;

/// What a row is shown as.
#[derive(Clone, Debug, PartialEq)]
pub enum Thumb {
    /// A `data:image/...;base64,...` URI.
    Image(String),
    /// A text row (the dataset's `text` column), shortened.
    Text(String),
    /// The image could not be read: why (the page shows it in place of the picture).
    Unavailable(String),
}

/// Most characters of a text row shown.
const TEXT_CHARS: usize = 120;

/// Thumbnails of the rows of one or two datasets, each made once.
pub struct Thumbs<'a> {
    datasets: Vec<&'a Dataset>,
    px: u32,
    cache: HashMap<(usize, usize), Thumb>,
    /// Rows whose image could not be read, for one warning.
    pub unavailable: Vec<String>,
}

impl<'a> Thumbs<'a> {
    /// `datasets[0]` holds the queries, `datasets[1]` (when given) the gallery.
    pub fn new(datasets: Vec<&'a Dataset>, px: u32) -> Self {
        Thumbs {
            datasets,
            px,
            cache: HashMap::new(),
            unavailable: Vec::new(),
        }
    }

    /// The thumbnail of dataset `which`'s row `row`.
    pub fn get(&mut self, which: usize, row: usize) -> Thumb {
        let which = which.min(self.datasets.len() - 1);
        if let Some(t) = self.cache.get(&(which, row)) {
            return t.clone();
        }
        let ds = self.datasets[which];
        let t = make(ds, row, self.px);
        if let Thumb::Unavailable(why) = &t {
            self.unavailable.push(why.clone());
        }
        self.cache.insert((which, row), t.clone());
        t
    }
}

fn make(ds: &Dataset, row: usize, px: u32) -> Thumb {
    let Some(path) = ds.resolve_path(row, None) else {
        let text = ds.text[row].as_deref().unwrap_or("");
        let mut short: String = text.chars().take(TEXT_CHARS).collect();
        if text.chars().count() > TEXT_CHARS {
            short.push('…');
        }
        return Thumb::Text(short);
    };
    let img = match decode_file(&path) {
        Ok(img) => img,
        Err(e) => return Thumb::Unavailable(format!("id {}: {e}", ds.ids[row])),
    };
    let img = match crop_bbox(img, ds.bbox[row]) {
        Ok(img) => img,
        Err(e) => {
            return Thumb::Unavailable(format!("id {}: {}: {e}", ds.ids[row], path.display()))
        }
    };
    let small = fit(&img, &Preprocess::imagenet(px, ResizeMode::Pad));
    match encode(&small) {
        Ok(uri) => Thumb::Image(uri),
        Err(e) => Thumb::Unavailable(format!("id {}: encoding the thumbnail: {e}", ds.ids[row])),
    }
}

/// The smaller of a PNG and a quality-85 JPEG of `img`, as a data URI.
pub fn encode(img: &RgbImage) -> Result<String, image::ImageError> {
    let (w, h) = img.dimensions();
    let mut png = Vec::new();
    PngEncoder::new_with_quality(&mut png, CompressionType::Best, FilterType::Adaptive)
        .write_image(img.as_raw(), w, h, ExtendedColorType::Rgb8)?;
    let mut jpg = Vec::new();
    JpegEncoder::new_with_quality(&mut jpg, 85).write_image(
        img.as_raw(),
        w,
        h,
        ExtendedColorType::Rgb8,
    )?;
    let (mime, bytes) = if png.len() <= jpg.len() {
        ("png", png)
    } else {
        ("jpeg", jpg)
    };
    Ok(format!(
        "data:image/{mime};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_pictures_are_png_and_noisy_ones_jpeg() {
        let flat = RgbImage::from_fn(80, 80, |x, _| {
            if x < 40 {
                image::Rgb([0, 0, 0])
            } else {
                image::Rgb([255, 255, 255])
            }
        });
        let uri = encode(&flat).unwrap();
        assert!(uri.starts_with("data:image/png;base64,"), "{uri}");
        let mut s = 7u32;
        let noisy = RgbImage::from_fn(80, 80, |x, y| {
            s = s.wrapping_mul(1103515245).wrapping_add(12345);
            let n = (s >> 16) as u8 / 4;
            image::Rgb([
                ((x * 3) as u8).wrapping_add(n),
                ((y * 3) as u8).wrapping_add(n),
                128 + n,
            ])
        });
        let uri = encode(&noisy).unwrap();
        assert!(uri.starts_with("data:image/jpeg;base64,"), "{}", &uri[..30]);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(uri.split_once(',').unwrap().1)
            .unwrap();
        assert_eq!(
            crate::image::decode_bytes(&bytes).unwrap().dimensions(),
            (80, 80)
        );
    }
}
