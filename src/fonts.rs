//! Font-ID: a demo metric-learning dataset built from installed display fonts.
//!
//! Each font is an identity (a label); its 62 glyphs `A-Z a-z 0-9`, each rendered black on
//! white into a `size` x `size` grayscale image, are its samples. [`build_font_id`] lists the
//! fonts of a folder (Debian's `fonts-aenigma` is the intended source), renders them in
//! parallel, drops the fonts that cannot serve as identities (missing glyphs, "picture fonts"
//! whose letters are all the same picture), groups the cuts of one design (outline, shadow,
//! 'O'/'R' variants) so that a group never straddles the train/validation split, drops a font
//! whose glyphs are mostly the same pictures as an earlier font's (a duplicate), and writes
//! `images/<font>/<glyph>.png` plus an OML-style `df.csv`.
//!
//! Everything is deterministic: the same fonts, options and crate give the same bytes.
use crate::error::{Error, IoContext, Result};
use ab_glyph::{point, Font, FontRef, OutlinedGlyph, PxScaleFactor};
use rayon::prelude::*;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// The characters rendered for every font, in this order.
pub const GLYPH_CHARS: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
/// How many glyphs each kept font has.
pub const GLYPHS_PER_FONT: usize = 62;

/// A font is a picture font when at least this many of its 62 glyphs are the same picture...
const PICTURE_MIN_SAME: usize = 31;
/// ...two glyphs being the same picture when their ink thumbnails differ by at most this mean
/// absolute difference (ink 0-1). On fonts-aenigma no font has more than 18 glyphs this close.
const PICTURE_SAME_MAX_DIFF: f32 = 0.01;
/// A font is also a picture font when the ink common to 90% of its glyphs is at least this
/// fraction of a glyph's ink. On fonts-aenigma the 20 fonts at or above it (0.45 to 0.82) are
/// all letters-in-a-picture fonts (`xmaslght`, `graze`, `tearful`, `hearts`, `bin01st`, ...)
/// or dingbats (`90stars`, `fauxsnow`, `symmetry`); the next ones (`zurklezs` 0.41, `revert`
/// 0.40) are heavy display letters.
const PICTURE_MIN_COMMON: f32 = 0.45;
/// A font is a duplicate of an earlier one (by file name) when at least this many of its 62
/// glyphs are the same picture as the earlier font's glyph of the same character: two labels
/// that cannot be told apart are not two identities. On fonts-aenigma 19 pairs have 33 to 62
/// (`1015sn`/`1015snr`, `draggle`/`draggleo`, `compc2s`/`compc3s`, ...; 8 of them were in
/// validation, where 8% of the queries then had their own picture under another label); the
/// next closest pair has 27, a real design variant (`quantflt`/`quantrnd`: flat or round
/// terminals), and stays.
const DUPLICATE_MIN_SAME: usize = 31;
/// Side of the thumbnails the picture-font detector compares.
const THUMB: usize = 16;
/// Cuts whose families share the first word and whose file names share this many leading
/// characters are one design (`kataacti`/`katainac`, `supragc`/`supragl`).
const STEM_PREFIX_MIN: usize = 4;

const MIN_SIZE: u32 = 16;
const MAX_SIZE: u32 = 1024;

/// Options of [`build_font_id`].
#[derive(Clone, Debug, PartialEq)]
pub struct FontIdOptions {
    /// Side of the square glyph images, in pixels.
    pub size: u32,
    /// Fraction of the fonts that go to validation (by whole groups, so approximately).
    pub val_fraction: f64,
    /// Seed of the group shuffle that decides the split.
    pub seed: u64,
    /// For tiny test/demo datasets: keep only the first font groups, in the order of their
    /// first font file name, that fit in this many fonts (whole groups only). `None`: all.
    pub max_fonts: Option<usize>,
}

impl Default for FontIdOptions {
    fn default() -> Self {
        FontIdOptions {
            size: 64,
            val_fraction: 0.3,
            seed: 0,
            max_fonts: None,
        }
    }
}

/// What [`build_font_id`] found and wrote.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FontIdSummary {
    /// Font files (`*.ttf`, `*.otf`) in the folder.
    pub fonts_found: usize,
    /// Fonts written to the dataset (labels `0..fonts_kept`).
    pub fonts_kept: usize,
    /// Fonts left out: (file name, reason), sorted by file name.
    pub dropped: Vec<(String, String)>,
    /// Design groups among the kept fonts.
    pub groups: usize,
    pub train_fonts: usize,
    pub val_fonts: usize,
    /// Images written (`fonts_kept * 62`).
    pub images: usize,
}

/// The image file name (without `.png`) of a character: `upper_A`, `lower_a`, `digit_0`, so
/// that names never clash on case-insensitive file systems.
pub fn glyph_name(c: char) -> String {
    if c.is_ascii_uppercase() {
        format!("upper_{c}")
    } else if c.is_ascii_lowercase() {
        format!("lower_{c}")
    } else if c.is_ascii_digit() {
        format!("digit_{c}")
    } else {
        format!("u{:04x}", c as u32)
    }
}

/// Builds the Font-ID dataset from the fonts in `font_dir` into `out_dir`.
///
/// Writes `out_dir/images/<font file stem>/<glyph name>.png` and `out_dir/df.csv`
/// (`label,path,split,is_query,is_gallery,category`). The images are rendered into a
/// temporary folder inside `out_dir` and replace `out_dir/images` only when all are written;
/// `df.csv` is written atomically afterwards.
pub fn build_font_id(
    font_dir: &Path,
    out_dir: &Path,
    opts: &FontIdOptions,
) -> Result<FontIdSummary> {
    if !(MIN_SIZE..=MAX_SIZE).contains(&opts.size) {
        return Err(Error::input(format!(
            "font-id image size {} is out of range: use {MIN_SIZE} to {MAX_SIZE} pixels",
            opts.size
        )));
    }
    if !(opts.val_fraction.is_finite() && (0.0..=1.0).contains(&opts.val_fraction)) {
        return Err(Error::input(format!(
            "font-id validation fraction {} is out of range: use a number from 0 to 1",
            opts.val_fraction
        )));
    }
    if opts.max_fonts == Some(0) {
        return Err(Error::input("font-id max fonts must be at least 1"));
    }

    let files = list_font_files(font_dir)?;
    let fonts_found = files.len();
    let mut dropped: Vec<(String, String)> = Vec::new();

    // Parse every font (the grouping needs all the family names).
    let parsed: Vec<std::result::Result<ParsedFont, (String, String)>> = files
        .into_par_iter()
        .map(parse_font)
        .collect::<Result<_>>()?;
    let mut fonts: Vec<ParsedFont> = Vec::with_capacity(parsed.len());
    let mut stems_seen: HashMap<String, String> = HashMap::new();
    for p in parsed {
        match p {
            Ok(f) => {
                // `images/<stem>` must be unique, also on case-insensitive file systems.
                let folded = f.stem.to_lowercase();
                if let Some(first) = stems_seen.get(&folded) {
                    dropped.push((
                        f.file_name.clone(),
                        format!("its image folder name clashes with {first}'s"),
                    ));
                } else {
                    stems_seen.insert(folded, f.file_name.clone());
                    fonts.push(f);
                }
            }
            Err(d) => dropped.push(d),
        }
    }

    let group_of = {
        let names: Vec<(&str, &str)> = fonts
            .iter()
            .map(|f| (f.stem.as_str(), f.family.as_str()))
            .collect();
        group_keys(&names)
    };
    // Groups in the order of their first font file name (fonts are sorted by file name).
    let mut group_order: Vec<String> = Vec::new();
    let mut members: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, g) in group_of.iter().enumerate() {
        let m = members.entry(g.as_str()).or_default();
        if m.is_empty() {
            group_order.push(g.clone());
        }
        m.push(i);
    }

    std::fs::create_dir_all(out_dir).at(out_dir)?;
    let images_dir = out_dir.join("images");
    // Written whole and swapped in (io::AtomicDir); what killed runs left is removed first.
    crate::io::remove_any(&crate::io::AtomicDir::old_path(&images_dir))?;
    let tmp = crate::io::AtomicDir::create(&images_dir)?;
    let size = opts.size;

    // Render, check and write: every font at once, or group by group until max_fonts.
    let mut kept: Vec<usize> = Vec::new();
    match opts.max_fonts {
        None => {
            let verdicts: Vec<std::result::Result<Thumbs, String>> = fonts
                .par_iter()
                .map(|f| -> Result<std::result::Result<Thumbs, String>> {
                    match check_font(f, size) {
                        Ok(images) => {
                            write_font_images(tmp.path(), &f.stem, &images, size)?;
                            Ok(Ok(thumbnails(&images, size)))
                        }
                        Err(reason) => Ok(Err(reason)),
                    }
                })
                .collect::<Result<_>>()?;
            let mut kept_thumbs: Vec<(usize, Thumbs)> = Vec::new();
            for (i, v) in verdicts.into_iter().enumerate() {
                match v {
                    Ok(thumbs) => match duplicate_reason(&thumbs, &kept_thumbs, &fonts) {
                        None => kept_thumbs.push((i, thumbs)),
                        Some(reason) => {
                            crate::io::remove_any(&tmp.path().join(&fonts[i].stem))?;
                            dropped.push((fonts[i].file_name.clone(), reason));
                        }
                    },
                    Err(reason) => dropped.push((fonts[i].file_name.clone(), reason)),
                }
            }
            kept = kept_thumbs.into_iter().map(|(i, _)| i).collect();
        }
        Some(max) => {
            let mut room = max;
            let mut kept_thumbs: Vec<(usize, Thumbs)> = Vec::new();
            for g in &group_order {
                if room == 0 {
                    break;
                }
                let idx = &members[g.as_str()];
                let checked: Vec<_> = idx
                    .par_iter()
                    .map(|&i| check_font(&fonts[i], size))
                    .collect();
                // Duplicates (of earlier groups or of earlier members) do not take room.
                let n_before = kept_thumbs.len();
                let mut verdicts = Vec::with_capacity(idx.len());
                for (&i, c) in idx.iter().zip(checked) {
                    verdicts.push(match c {
                        Ok(images) => {
                            let thumbs = thumbnails(&images, size);
                            match duplicate_reason(&thumbs, &kept_thumbs, &fonts) {
                                None => {
                                    kept_thumbs.push((i, thumbs));
                                    Ok(images)
                                }
                                Some(reason) => Err(reason),
                            }
                        }
                        Err(reason) => Err(reason),
                    });
                }
                if kept_thumbs.len() - n_before > room {
                    // The group does not fit whole: skip it (unreported) and try the next.
                    kept_thumbs.truncate(n_before);
                    continue;
                }
                room -= kept_thumbs.len() - n_before;
                for (&i, v) in idx.iter().zip(verdicts) {
                    match v {
                        Ok(images) => {
                            write_font_images(tmp.path(), &fonts[i].stem, &images, size)?;
                            kept.push(i);
                        }
                        Err(reason) => dropped.push((fonts[i].file_name.clone(), reason)),
                    }
                }
            }
        }
    }
    kept.sort_unstable();
    dropped.sort();
    if kept.is_empty() {
        return Err(Error::input(format!(
            "no usable font in {}: all {} font files were dropped",
            font_dir.display(),
            fonts_found
        )));
    }

    // Split by groups of kept fonts.
    let mut group_sizes: BTreeMap<&str, usize> = BTreeMap::new();
    for &i in &kept {
        *group_sizes.entry(group_of[i].as_str()).or_default() += 1;
    }
    let group_list: Vec<(String, usize)> = group_sizes
        .iter()
        .map(|(k, n)| (k.to_string(), *n))
        .collect();
    let val_groups = split_groups(&group_list, opts.val_fraction, opts.seed);

    // df.csv: labels over the kept fonts sorted by file name; rows sorted by (label, path).
    let mut glyph_files: Vec<String> = GLYPH_CHARS
        .chars()
        .map(|c| format!("{}.png", glyph_name(c)))
        .collect();
    glyph_files.sort();
    let mut csv = String::from("label,path,split,is_query,is_gallery,category\n");
    let (mut train_fonts, mut val_fonts) = (0, 0);
    for (label, &i) in kept.iter().enumerate() {
        let f = &fonts[i];
        let group = &group_of[i];
        let val = val_groups.contains(group);
        if val {
            val_fonts += 1;
        } else {
            train_fonts += 1;
        }
        let (split, flag) = if val {
            ("validation", "True")
        } else {
            ("train", "")
        };
        for g in &glyph_files {
            let path = format!("images/{}/{g}", f.stem);
            csv.push_str(&format!(
                "{label},{},{split},{flag},{flag},{}\n",
                csv_field(&path),
                csv_field(group)
            ));
        }
    }

    // Publish: images first (swapped in whole), then df.csv (atomic write).
    tmp.persist()?;
    crate::io::atomic_write_bytes(out_dir.join("df.csv"), csv.as_bytes())?;

    Ok(FontIdSummary {
        fonts_found,
        fonts_kept: kept.len(),
        dropped,
        groups: group_sizes.len(),
        train_fonts,
        val_fonts,
        images: kept.len() * GLYPHS_PER_FONT,
    })
}

/// A font file that parsed.
struct ParsedFont {
    file_name: String,
    stem: String,
    family: String,
    data: Vec<u8>,
}

struct FontFile {
    path: PathBuf,
    file_name: String,
}

/// The font files Font-ID renders from `dir` (its inputs), sorted by file name.
pub fn font_paths(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(list_font_files(dir)?.into_iter().map(|f| f.path).collect())
}

/// `*.ttf` / `*.otf` (any case) in `dir`, sorted by file name.
fn list_font_files(dir: &Path) -> Result<Vec<FontFile>> {
    let missing = || {
        Error::input(format!(
            "no fonts found in {}: the Font-ID dataset renders TrueType/OpenType fonts from \
             this folder; install Debian's fonts-aenigma (apt-get install fonts-aenigma) or \
             name a folder holding .ttf/.otf files",
            dir.display()
        ))
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(missing()),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.at(dir)?;
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue; // not UTF-8: cannot be named in df.csv
        };
        let lower = name.to_ascii_lowercase();
        if !(lower.ends_with(".ttf") || lower.ends_with(".otf")) || name.len() <= 4 {
            continue;
        }
        // Follows symlinks: a linked font is a font.
        if !std::fs::metadata(&path).at(&path)?.is_file() {
            continue;
        }
        files.push(FontFile {
            path,
            file_name: name,
        });
    }
    if files.is_empty() {
        return Err(missing());
    }
    files.sort_by(|a, b| a.file_name.cmp(&b.file_name));
    Ok(files)
}

/// Reads and parses one font; `Err((file name, reason))` when it is not a usable font.
fn parse_font(f: FontFile) -> Result<std::result::Result<ParsedFont, (String, String)>> {
    let data = std::fs::read(&f.path).at(&f.path)?;
    if let Err(e) = FontRef::try_from_slice(&data) {
        return Ok(Err((f.file_name, format!("cannot be parsed: {e}"))));
    }
    let stem = f.file_name[..f.file_name.len() - 4].to_string();
    let family = family_name(&data).unwrap_or_else(|| stem.clone());
    Ok(Ok(ParsedFont {
        file_name: f.file_name,
        stem,
        family,
        data,
    }))
}

/// The family name from the font's name table: the typographic family (name ID 16) if any,
/// else the family (ID 1); English (US) and Unicode records first.
pub(crate) fn family_name(data: &[u8]) -> Option<String> {
    use ttf_parser::{name_id, Language, PlatformId};
    let face = ttf_parser::Face::parse(data, 0).ok()?;
    let mut best: Option<((u8, u8, u8), String)> = None;
    for name in face.names() {
        let id_rank = match name.name_id {
            name_id::TYPOGRAPHIC_FAMILY => 0,
            name_id::FAMILY => 1,
            _ => continue,
        };
        let (text, platform_rank) = if name.is_unicode() {
            (name.to_string(), 0)
        } else if name.platform_id == PlatformId::Macintosh && name.encoding_id == 0 {
            // Mac Roman: ASCII is all the grouping needs.
            let s = name
                .name
                .iter()
                .map(|&b| if b.is_ascii() { b as char } else { '\u{fffd}' })
                .collect();
            (Some(s), 1)
        } else {
            continue;
        };
        let Some(text) = text.filter(|t| !t.trim().is_empty()) else {
            continue;
        };
        let lang_rank = u8::from(name.language() != Language::English_UnitedStates);
        let rank = (id_rank, lang_rank, platform_rank);
        if best.as_ref().is_none_or(|(r, _)| rank < *r) {
            best = Some((rank, text.trim().to_string()));
        }
    }
    best.map(|(_, t)| t)
}

/// Renders the 62 glyphs of a font and decides whether it is kept: `Ok(images)`, or
/// `Err(reason)` to drop it.
fn check_font(f: &ParsedFont, size: u32) -> std::result::Result<Vec<Vec<u8>>, String> {
    let font = FontRef::try_from_slice(&f.data).map_err(|e| format!("cannot be parsed: {e}"))?;
    let rendered: Vec<Option<Vec<u8>>> = GLYPH_CHARS
        .chars()
        .map(|c| render_glyph(&font, c, size))
        .collect();
    let missing: String = GLYPH_CHARS
        .chars()
        .zip(&rendered)
        .filter(|(_, r)| r.is_none())
        .map(|(c, _)| c)
        .collect();
    if !missing.is_empty() {
        let n = GLYPHS_PER_FONT - missing.chars().count();
        return Err(if n == 0 {
            "renders none of the 62 glyphs A-Z a-z 0-9".to_string()
        } else {
            format!("renders {n} of the 62 glyphs A-Z a-z 0-9 (empty or missing: {missing})")
        });
    }
    let images: Vec<Vec<u8>> = rendered.into_iter().flatten().collect();
    match picture_font_reason(&images, size) {
        Some(reason) => Err(reason),
        None => Ok(images),
    }
}

/// Margin around the glyph box, in pixels (4 at 64).
fn margin(size: u32) -> u32 {
    (size / 16).max(1)
}

/// Renders character `c` of `font` into a `size` x `size` 8-bit grayscale image (row-major,
/// 255 = white background, 0 = full ink): the glyph's outline bounding box is scaled to fit
/// inside the image less a margin, keeping its aspect ratio, and centred.
/// `None` when the font has no glyph for `c` or the glyph leaves no ink.
pub(crate) fn render_glyph(font: &FontRef<'_>, c: char, size: u32) -> Option<Vec<u8>> {
    let id = font.glyph_id(c);
    if id.0 == 0 {
        return None;
    }
    let outline = font.outline(id)?;
    // ab_glyph's unscaled bounds: min = (x_min, y_max), max = (x_max, y_min), y up.
    let (x0, x1) = (outline.bounds.min.x, outline.bounds.max.x);
    let (y0, y1) = (outline.bounds.max.y, outline.bounds.min.y);
    let (w, h) = (x1 - x0, y1 - y0);
    if !(w.is_finite() && h.is_finite()) || w.max(h) <= 0.0 {
        return None;
    }
    let side = size as f32;
    let scale = (side - 2.0 * margin(size) as f32) / w.max(h);
    // Glyph origin so that the box centre lands on the image centre (screen y points down).
    let position = point(
        side / 2.0 - (x0 + x1) / 2.0 * scale,
        side / 2.0 + (y0 + y1) / 2.0 * scale,
    );
    let glyph = id.with_scale_and_position(scale, position);
    let outlined = OutlinedGlyph::new(
        glyph,
        outline,
        PxScaleFactor {
            horizontal: scale,
            vertical: scale,
        },
    );
    let bounds = outlined.px_bounds();
    let (ox, oy) = (bounds.min.x as i64, bounds.min.y as i64);
    let n = size as i64;
    let mut img = vec![255u8; (size * size) as usize];
    let mut ink = false;
    outlined.draw(|x, y, coverage| {
        let (px, py) = (ox + x as i64, oy + y as i64);
        if px < 0 || py < 0 || px >= n || py >= n {
            return;
        }
        let v = (coverage.clamp(0.0, 1.0) * 255.0).round() as u8;
        if v > 0 {
            ink = true;
            img[(py * n + px) as usize] = 255 - v;
        }
    });
    ink.then_some(img)
}

/// A `THUMB` x `THUMB` ink thumbnail (block means, 0 = white, 1 = full ink) of a
/// `size` x `size` image.
fn ink_thumbnail(img: &[u8], size: u32) -> [f32; THUMB * THUMB] {
    let n = size as usize;
    let mut sum = [0u32; THUMB * THUMB];
    let mut count = [0u32; THUMB * THUMB];
    for y in 0..n {
        let row = y * THUMB / n * THUMB;
        for x in 0..n {
            let t = row + x * THUMB / n;
            sum[t] += 255 - img[y * n + x] as u32;
            count[t] += 1;
        }
    }
    let mut out = [0f32; THUMB * THUMB];
    for i in 0..THUMB * THUMB {
        out[i] = sum[i] as f32 / (255.0 * count[i].max(1) as f32);
    }
    out
}

/// Why a font whose glyphs render as `images` is a picture font, if it is one:
/// - at least [`PICTURE_MIN_SAME`] of its glyphs are the same image (near-identical
///   thumbnails: many characters mapped to one picture), or
/// - its glyphs are one shared picture with the letter as a detail: the ink that at least
///   90% of the glyphs have in common (pixelwise) is at least [`PICTURE_MIN_COMMON`] of an
///   average glyph's ink (a frame, a bulb, a tear drop around a small letter; dingbats).
pub(crate) fn picture_font_reason(images: &[Vec<u8>], size: u32) -> Option<String> {
    let thumbs = thumbnails(images, size);
    let same = largest_same_picture(&thumbs);
    if same >= PICTURE_MIN_SAME {
        return Some(format!(
            "picture font: {same} of its {} glyphs are the same picture",
            images.len()
        ));
    }
    let common = common_picture_share(&thumbs);
    if common >= PICTURE_MIN_COMMON {
        return Some(format!(
            "picture font: its glyphs share one picture ({:.0}% of a glyph's ink is common \
             to 90% of them)",
            common * 100.0
        ));
    }
    None
}

/// A font's glyph thumbnails, in [`GLYPH_CHARS`] order.
type Thumbs = Vec<[f32; THUMB * THUMB]>;

fn thumbnails(images: &[Vec<u8>], size: u32) -> Thumbs {
    images.iter().map(|i| ink_thumbnail(i, size)).collect()
}

/// Two thumbnails show the same picture: mean absolute difference within
/// [`PICTURE_SAME_MAX_DIFF`].
fn same_picture(a: &[f32; THUMB * THUMB], b: &[f32; THUMB * THUMB]) -> bool {
    let d = a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f32>() / (THUMB * THUMB) as f32;
    d <= PICTURE_SAME_MAX_DIFF
}

/// How many characters of two fonts are the same picture, counted until the count can no
/// longer reach [`DUPLICATE_MIN_SAME`] (then some number below it).
pub(crate) fn same_glyphs(a: &[[f32; THUMB * THUMB]], b: &[[f32; THUMB * THUMB]]) -> usize {
    let allowed_misses = a.len().saturating_sub(DUPLICATE_MIN_SAME);
    let (mut same, mut missed) = (0, 0);
    for (x, y) in a.iter().zip(b) {
        if same_picture(x, y) {
            same += 1;
        } else {
            missed += 1;
            if missed > allowed_misses {
                break;
            }
        }
    }
    same
}

/// Why a font with glyph thumbnails `thumbs` is dropped as a duplicate of one of the fonts
/// kept so far (`(index into fonts, thumbnails)`, in file name order: the first match is
/// named), if it is one.
fn duplicate_reason(
    thumbs: &Thumbs,
    kept: &[(usize, Thumbs)],
    fonts: &[ParsedFont],
) -> Option<String> {
    kept.par_iter().find_map_first(|(i, k)| {
        let n = same_glyphs(thumbs, k);
        (n >= DUPLICATE_MIN_SAME).then(|| {
            format!(
                "duplicate of {}: {n} of its {} glyphs are the same picture",
                fonts[*i].file_name,
                thumbs.len()
            )
        })
    })
}

/// The size of the largest set of near-identical thumbnails: the most thumbnails within
/// [`PICTURE_SAME_MAX_DIFF`] (mean absolute difference) of any one, itself included.
pub(crate) fn largest_same_picture(thumbs: &[[f32; THUMB * THUMB]]) -> usize {
    let mut near = vec![1usize; thumbs.len()];
    for i in 0..thumbs.len() {
        for j in i + 1..thumbs.len() {
            if same_picture(&thumbs[i], &thumbs[j]) {
                near[i] += 1;
                near[j] += 1;
            }
        }
    }
    near.into_iter().max().unwrap_or(0)
}

/// The ink that at least 90% of the thumbnails have in common (per pixel, the ink level that
/// 90% of them reach), as a fraction of their mean ink. 0 for no thumbnails or no ink.
pub(crate) fn common_picture_share(thumbs: &[[f32; THUMB * THUMB]]) -> f32 {
    let n = thumbs.len();
    if n == 0 {
        return 0.0;
    }
    let mean_ink = thumbs.iter().map(|t| t.iter().sum::<f32>()).sum::<f32>() / n as f32;
    if mean_ink <= 0.0 {
        return 0.0;
    }
    let rank = n / 10; // the 10th percentile: reached by 90% of the glyphs
    let mut column = vec![0f32; n];
    let mut common = 0f32;
    for k in 0..THUMB * THUMB {
        for (c, t) in column.iter_mut().zip(thumbs) {
            *c = t[k];
        }
        column.sort_unstable_by(f32::total_cmp);
        common += column[rank];
    }
    common / mean_ink
}

/// Words that name a cut rather than a design, stripped from the end of family names.
const CUT_WORDS: &[&str] = &[
    "brk",
    "tt",
    "ttf",
    "regular",
    "normal",
    "plain",
    "book",
    "bold",
    "italic",
    "italics",
    "oblique",
    "slant",
    "slanted",
    "outline",
    "outlined",
    "shadow",
    "solid",
    "hollow",
    "inline",
    "thick",
    "thin",
    "light",
    "heavy",
    "wide",
    "wyde",
    "tall",
    "narrow",
    "condensed",
    "expanded",
    "round",
    "rounded",
    "alt",
    "inverted",
];

/// The design words of a family name: lower-cased alphanumeric words, with trailing cut
/// markers stripped (cut words like "outline", "shadow", "bold", "BRK"; words of one or two
/// characters like "O", "R", "RO", "OL", "3D", "II"; words with a digit like "2", "OL1",
/// "TT2", "1o"). The first word is always kept.
pub(crate) fn family_words(family: &str) -> Vec<String> {
    let mut words: Vec<String> = family
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    while words.len() > 1 {
        let w = words.last().map(String::as_str).unwrap_or_default();
        let cut = CUT_WORDS.contains(&w)
            || w.chars().count() <= 2
            || w.chars().any(|c| c.is_ascii_digit());
        if !cut {
            break;
        }
        words.pop();
    }
    words
}

/// The group key (design) of each font, given `(file stem, family name)` per font.
///
/// 1. Each family is reduced to its design words ([`family_words`]).
/// 2. A family whose words start with another font's complete design words belongs to that
///    design ("Bocuma Angle Dent" and "Bocuma Batty" join "Bocuma"; "Ink Swipes" and "Ink
///    Tank" stay apart: there is no "Ink").
/// 3. Designs whose first words are equal and whose fonts' file names share at least
///    [`STEM_PREFIX_MIN`] leading characters are merged ("Katalyst active"/`kataacti` and
///    "Katalyst inactive"/`katainac`).
///
/// The key is the words all the group's designs share (the design's name), joined by `_`.
pub(crate) fn group_keys(fonts: &[(&str, &str)]) -> Vec<String> {
    let words: Vec<Vec<String>> = fonts
        .iter()
        .map(|(stem, family)| {
            let w = family_words(family);
            if w.is_empty() {
                family_words(stem)
            } else {
                w
            }
        })
        .collect();
    let known: BTreeSet<&[String]> = words.iter().map(|w| w.as_slice()).collect();
    // Step 2: the shortest known design that is a prefix of this one (itself at worst).
    let design: Vec<&[String]> = words
        .iter()
        .map(|w| {
            (1..=w.len())
                .map(|n| &w[..n])
                .find(|p| known.contains(p))
                .unwrap_or(w.as_slice())
        })
        .collect();
    // Step 3: union-find over fonts.
    let mut parent: Vec<usize> = (0..fonts.len()).collect();
    fn find(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    let stems: Vec<String> = fonts.iter().map(|(s, _)| s.to_lowercase()).collect();
    for i in 0..fonts.len() {
        for j in i + 1..fonts.len() {
            let same_design = design[i] == design[j];
            let related = !same_design
                && design[i].first() == design[j].first()
                && common_prefix(&stems[i], &stems[j]) >= STEM_PREFIX_MIN;
            if same_design || related {
                let (a, b) = (find(&mut parent, i), find(&mut parent, j));
                if a != b {
                    parent[a.max(b)] = a.min(b);
                }
            }
        }
    }
    // Key of each union: the words its designs have in common (at least the first word).
    let mut common: HashMap<usize, &[String]> = HashMap::new();
    for (i, d) in design.iter().enumerate() {
        let r = find(&mut parent, i);
        let e = common.entry(r).or_insert(d);
        let n = e.iter().zip(d.iter()).take_while(|(a, b)| a == b).count();
        *e = &e[..n];
    }
    (0..fonts.len())
        .map(|i| {
            let r = find(&mut parent, i);
            let key = common[&r].join("_");
            if key.is_empty() {
                "font".to_string()
            } else {
                key
            }
        })
        .collect()
}

fn common_prefix(a: &str, b: &str) -> usize {
    a.chars().zip(b.chars()).take_while(|(x, y)| x == y).count()
}

/// Decides which groups go to validation: groups `(key, font count)` are shuffled by
/// `xxh3(key, seed)` and taken in that order whenever taking one brings the validation font
/// count closer to `round(val_fraction * total)`. Returns the validation group keys.
pub(crate) fn split_groups(
    groups: &[(String, usize)],
    val_fraction: f64,
    seed: u64,
) -> BTreeSet<String> {
    let total: usize = groups.iter().map(|(_, n)| n).sum();
    let target = (val_fraction * total as f64).round() as usize;
    let mut order: Vec<(u64, &str, usize)> = groups
        .iter()
        .map(|(k, n)| {
            (
                xxhash_rust::xxh3::xxh3_64_with_seed(k.as_bytes(), seed),
                k.as_str(),
                *n,
            )
        })
        .collect();
    order.sort_unstable();
    let mut val = 0usize;
    let mut out = BTreeSet::new();
    for (_, k, n) in order {
        if (val + n).abs_diff(target) < val.abs_diff(target) {
            val += n;
            out.insert(k.to_string());
        }
    }
    out
}

/// Encodes a grayscale image as PNG (no metadata: the same pixels give the same bytes).
fn encode_png(img: &[u8], size: u32) -> std::result::Result<Vec<u8>, image::ImageError> {
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    use image::ImageEncoder;
    let mut out = Vec::with_capacity(1024);
    PngEncoder::new_with_quality(&mut out, CompressionType::Fast, FilterType::Adaptive)
        .write_image(img, size, size, image::ExtendedColorType::L8)?;
    Ok(out)
}

fn write_font_images(root: &Path, stem: &str, images: &[Vec<u8>], size: u32) -> Result<()> {
    let dir = root.join(stem);
    std::fs::create_dir_all(&dir).at(&dir)?;
    for (c, img) in GLYPH_CHARS.chars().zip(images) {
        let path = dir.join(format!("{}.png", glyph_name(c)));
        let bytes = encode_png(img, size)
            .map_err(|e| Error::internal(format!("encoding {}: {e}", path.display())))?;
        std::fs::write(&path, bytes).at(&path)?;
    }
    Ok(())
}

/// Quotes a CSV field when it needs it.
fn csv_field(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\"")).into()
    } else {
        s.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AENIGMA: &str = "/usr/share/fonts/truetype/aenigma";

    /// Real TrueType fonts: one from fonts-aenigma and DejaVu Sans, those installed.
    fn real_fonts() -> Vec<Vec<u8>> {
        [
            format!("{AENIGMA}/acidrefl.ttf"),
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf".to_string(),
        ]
        .iter()
        .filter_map(|p| std::fs::read(p).ok())
        .collect()
    }

    fn ink_box(img: &[u8], size: usize) -> (usize, usize, usize, usize) {
        let (mut x0, mut y0, mut x1, mut y1) = (size, size, 0, 0);
        for y in 0..size {
            for x in 0..size {
                if img[y * size + x] < 255 {
                    (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
                }
            }
        }
        (x0, y0, x1, y1)
    }

    #[test]
    fn glyph_renders_inked_fitted_and_centred() {
        let fonts = real_fonts();
        if fonts.is_empty() {
            eprintln!("skipped: no fonts-aenigma or DejaVu font installed");
            return;
        }
        for data in &fonts {
            let font = FontRef::try_from_slice(data).unwrap();
            for size in [64u32, 32] {
                let m = margin(size) as usize;
                let n = size as usize;
                for c in ['A', 'g', 'i', 'W', '0'] {
                    let img = render_glyph(&font, c, size).expect("glyph renders");
                    assert_eq!(img.len(), n * n);
                    let ink = img.iter().filter(|&&v| v < 128).count();
                    assert!(ink > n, "{c}: only {ink} dark pixels");
                    let (x0, y0, x1, y1) = ink_box(&img, n);
                    // Inside the margin...
                    assert!(x0 >= m - 1 && y0 >= m - 1, "{c}: ink at ({x0},{y0})");
                    assert!(x1 <= n - m && y1 <= n - m, "{c}: ink at ({x1},{y1})");
                    // ...filling it along the longer side...
                    let longest = (x1 - x0 + 1).max(y1 - y0 + 1);
                    assert!(longest >= n - 2 * m - 1, "{c}: glyph spans {longest} px");
                    // ...and centred.
                    let (cx, cy) = ((x0 + x1 + 1) as f32 / 2.0, (y0 + y1 + 1) as f32 / 2.0);
                    assert!((cx - n as f32 / 2.0).abs() <= 1.5, "{c}: centre x {cx}");
                    assert!((cy - n as f32 / 2.0).abs() <= 1.5, "{c}: centre y {cy}");
                }
            }
            // A character the font does not have renders nothing.
            assert!(render_glyph(&font, '\u{10fffd}', 64).is_none());
        }
    }

    /// A 64x64 white image with black rectangles `(x, y, w, h)`.
    fn picture(rects: &[(usize, usize, usize, usize)]) -> Vec<u8> {
        let mut img = vec![255u8; 64 * 64];
        for &(x, y, w, h) in rects {
            for yy in y..(y + h).min(64) {
                for xx in x..(x + w).min(64) {
                    img[yy * 64 + xx] = 0;
                }
            }
        }
        img
    }

    /// 62 "letters": a few strokes each, placed differently per glyph.
    fn letters() -> Vec<Vec<u8>> {
        let mut state = 12345u64;
        let mut next = |m: u64| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) % m) as usize
        };
        (0..62)
            .map(|_| {
                let rects: Vec<_> = (0..3)
                    .map(|_| {
                        if next(2) == 0 {
                            (4 + next(48), 4, 6, 56) // vertical stroke
                        } else {
                            (4, 4 + next(48), 56, 6) // horizontal stroke
                        }
                    })
                    .collect();
                picture(&rects)
            })
            .collect()
    }

    #[test]
    fn picture_font_detector() {
        // Distinct letter-like glyphs: not a picture font.
        let letters = letters();
        assert_eq!(picture_font_reason(&letters, 64), None);

        // 40 of 62 glyphs the same picture.
        let mut same = letters.clone();
        let star = picture(&[(10, 30, 44, 4), (30, 10, 4, 44), (20, 20, 24, 24)]);
        for img in same.iter_mut().take(40) {
            img.clone_from(&star);
        }
        let reason = picture_font_reason(&same, 64).expect("picture font");
        assert!(reason.contains("40 of its 62 glyphs"), "{reason}");
        // 30 of 62 is not most of them.
        let mut some = letters.clone();
        for img in some.iter_mut().take(30) {
            img.clone_from(&star);
        }
        assert_eq!(picture_font_reason(&some, 64), None);

        // Every glyph a heavy frame around a small, different letter.
        let framed: Vec<Vec<u8>> = (0..62)
            .map(|i| {
                picture(&[
                    (4, 4, 56, 8),
                    (4, 52, 56, 8),
                    (4, 4, 8, 56),
                    (52, 4, 8, 56),
                    (16 + i % 7 * 4, 16 + i / 7 * 3, 6, 6),
                ])
            })
            .collect();
        let reason = picture_font_reason(&framed, 64).expect("picture font");
        assert!(reason.contains("share one picture"), "{reason}");
    }

    #[test]
    fn family_words_strip_cut_markers() {
        let w = |s: &str| family_words(s).join(" ");
        for (name, words) in [
            ("8-bit Limit RO BRK", "8 bit limit"),
            ("Foreshadow OL BRK", "foreshadow"),
            ("Bend 2 Squares OL1 BRK", "bend 2 squares"),
            ("10.15 Saturday Night R BRK", "10 15 saturday night"),
            ("Conduit 2 Italics BRK", "conduit"),
            ("Compliant Confuse 1o BRK", "compliant confuse"),
            ("Visitor TT2 BRK", "visitor"),
            ("Corpulent Caps Shadow BRK", "corpulent caps"),
            ("Gyneric 3D BRK", "gyneric"),
            ("Ink Tank BRK", "ink tank"),
            ("O", "o"), // the first word always stays
            ("  --  ", ""),
        ] {
            assert_eq!(w(name), words);
        }
    }

    #[test]
    fn group_keys_join_cuts_of_one_design() {
        let fonts = [
            ("8bitlim", "8-bit Limit BRK"),
            ("8bitlimo", "8-bit Limit O BRK"),
            ("8bitlimr", "8-bit Limit R BRK"),
            ("8blimro", "8-bit Limit RO BRK"),
            ("4shadow", "Foreshadow BRK"),
            ("4shadowo", "Foreshadow OL BRK"),
            ("collecro", "Collective RO BRK"),
            ("collects", "Collective S BRK"),
            ("collecto", "Collective O BRK"),
            ("bocuma", "Bocuma BRK"),
            ("bocumaad", "Bocuma Angle Dent BRK"),
            ("bocumaba", "Bocuma Batty BRK"),
            ("inkswipe", "Ink Swipes BRK"),
            ("inktank", "Ink Tank BRK"),
            ("kataacti", "Katalyst active BRK"),
            ("katainac", "Katalyst inactive BRK"),
            ("minikott", "Mini Kaliber O TT BRK"),
            ("kaliberr", "Kaliber Round BRK"),
            ("kaliberx", "Kaliber Xtreme BRK"),
            ("jekyll", "Jekyll BRK"),
            ("hyde", "Hyde BRK"),
            ("nameless", ""),
        ];
        let keys = group_keys(&fonts);
        let key = |stem: &str| keys[fonts.iter().position(|f| f.0 == stem).unwrap()].as_str();
        for s in ["8bitlim", "8bitlimo", "8bitlimr", "8blimro"] {
            assert_eq!(key(s), "8_bit_limit");
        }
        assert_eq!(key("4shadow"), "foreshadow");
        assert_eq!(key("4shadowo"), "foreshadow");
        for s in ["collecro", "collects", "collecto"] {
            assert_eq!(key(s), "collective");
        }
        for s in ["bocuma", "bocumaad", "bocumaba"] {
            assert_eq!(key(s), "bocuma");
        }
        for (stem, group) in [
            ("inkswipe", "ink_swipes"),
            ("inktank", "ink_tank"),
            ("kataacti", "katalyst"),
            ("katainac", "katalyst"),
            ("minikott", "mini_kaliber"),
            ("kaliberr", "kaliber"),
            ("kaliberx", "kaliber"),
            ("jekyll", "jekyll"),
            ("hyde", "hyde"),
            ("nameless", "nameless"),
        ] {
            assert_eq!(key(stem), group);
        }
    }

    #[test]
    fn split_is_seeded_and_by_whole_groups() {
        let groups: Vec<(String, usize)> = (0..120)
            .map(|i| (format!("design_{i}"), 1 + i % 4))
            .collect();
        let total: usize = groups.iter().map(|g| g.1).sum();
        let val_fonts = |v: &BTreeSet<String>| -> usize {
            groups
                .iter()
                .filter(|g| v.contains(&g.0))
                .map(|g| g.1)
                .sum()
        };
        let a = split_groups(&groups, 0.3, 0);
        assert_eq!(a, split_groups(&groups, 0.3, 0));
        let b = split_groups(&groups, 0.3, 1);
        assert_ne!(a, b);
        for v in [&a, &b] {
            let target = (0.3 * total as f64).round() as usize;
            assert!(
                val_fonts(v).abs_diff(target) <= 2,
                "{} vs {target}",
                val_fonts(v)
            );
        }
        // The order of the input does not matter.
        let mut reversed = groups.clone();
        reversed.reverse();
        assert_eq!(a, split_groups(&reversed, 0.3, 0));
        assert!(split_groups(&groups, 0.0, 0).is_empty());
        assert_eq!(split_groups(&groups, 1.0, 0).len(), groups.len());
    }

    fn read_tree(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
        let mut out = BTreeMap::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    let rel = p.strip_prefix(root).unwrap().to_path_buf();
                    out.insert(rel, std::fs::read(&p).unwrap());
                }
            }
        }
        out
    }

    #[test]
    fn build_small_font_id_dataset() {
        if !Path::new(AENIGMA).is_dir() {
            eprintln!("skipped: fonts-aenigma is not installed");
            return;
        }
        let out = tempfile::tempdir().unwrap();
        let opts = FontIdOptions {
            max_fonts: Some(6),
            ..Default::default()
        };
        let summary = build_font_id(Path::new(AENIGMA), out.path(), &opts).unwrap();
        assert_eq!(summary.fonts_kept, 6);
        assert_eq!(summary.images, 6 * 62);
        assert_eq!(summary.train_fonts + summary.val_fonts, 6);
        assert!(summary.fonts_found >= 6);

        let first = read_tree(out.path());
        let pngs: Vec<&PathBuf> = first
            .keys()
            .filter(|p| p.extension().is_some_and(|e| e == "png"))
            .collect();
        assert_eq!(pngs.len(), 6 * 62);
        assert_eq!(first.len(), 6 * 62 + 1, "only images and df.csv");
        let img = image::load_from_memory(&first[pngs[0]]).unwrap();
        assert_eq!((img.width(), img.height()), (64, 64));
        assert_eq!(img.color(), image::ColorType::L8);

        let csv = String::from_utf8(first[Path::new("df.csv")].clone()).unwrap();
        let mut lines = csv.lines();
        assert_eq!(
            lines.next(),
            Some("label,path,split,is_query,is_gallery,category")
        );
        let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
        assert_eq!(rows.len(), 6 * 62);
        let keys: Vec<(usize, &str)> = rows.iter().map(|r| (r[0].parse().unwrap(), r[1])).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted, "rows sorted by (label, path)");
        let labels: BTreeSet<usize> = keys.iter().map(|k| k.0).collect();
        assert_eq!(labels, (0..6).collect());
        let mut split_of_category: HashMap<&str, &str> = HashMap::new();
        for r in &rows {
            assert_eq!(r.len(), 6);
            assert!(first.contains_key(Path::new(r[1])), "{} exists", r[1]);
            match r[2] {
                "train" => assert_eq!((r[3], r[4]), ("", "")),
                "validation" => assert_eq!((r[3], r[4]), ("True", "True")),
                other => panic!("split {other}"),
            }
            let s = split_of_category.entry(r[5]).or_insert(r[2]);
            assert_eq!(*s, r[2], "category {} straddles the split", r[5]);
        }
        assert!(rows[0][1].starts_with("images/1015sn/"), "{}", rows[0][1]);
        // 1015snr draws the same 62 glyphs as 1015sn: one identity, not two.
        let why = summary.dropped.iter().find(|d| d.0.starts_with("1015snr"));
        assert!(
            why.is_some_and(|d| d.1.starts_with("duplicate of 1015sn.")),
            "{:?}",
            summary.dropped
        );
        assert!(!first.keys().any(|p| p.starts_with("images/1015snr")));
        // Cuts of one design share a category.
        let cat = |stem: &str| {
            rows.iter()
                .find(|r| r[1].starts_with(&format!("images/{stem}/")))
                .map(|r| r[5])
        };
        if let (Some(a), Some(b)) = (cat("1015sn"), cat("1015snr")) {
            assert_eq!(a, b);
        }

        // A second run gives the same bytes, leaving nothing else behind (not even what a
        // killed run left: a temporary folder of a process that no longer exists).
        if Path::new("/proc/self").exists() {
            let stale = out.path().join(format!(".images.{}-0.tmp", u32::MAX));
            std::fs::create_dir_all(stale.join("x")).unwrap();
        }
        let again = build_font_id(Path::new(AENIGMA), out.path(), &opts).unwrap();
        assert_eq!(again, summary);
        assert!(read_tree(out.path()) == first, "second run differs");
    }

    #[test]
    fn missing_fonts_is_a_user_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("readme.txt"), "no fonts here").unwrap();
        let out = dir.path().join("out");
        let err = build_font_id(dir.path(), &out, &FontIdOptions::default()).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let msg = err.to_string();
        assert!(msg.contains("fonts-aenigma"), "{msg}");
        assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
        let err =
            build_font_id(&dir.path().join("absent"), &out, &FontIdOptions::default()).unwrap_err();
        assert!(err.to_string().contains("fonts-aenigma"));

        // A file that is not a font is dropped, not an error; with nothing left it is one.
        std::fs::write(dir.path().join("broken.ttf"), b"not a font").unwrap();
        let err = build_font_id(dir.path(), &out, &FontIdOptions::default()).unwrap_err();
        assert!(err.to_string().contains("no usable font"), "{err}");
        assert!(!out.join("images").exists() && !out.join("df.csv").exists());
    }
}
