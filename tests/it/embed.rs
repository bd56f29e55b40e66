//! simile-embed end to end: the real binary on tiny generated images in temp folders; parity
//! with PyTorch on identical input tensors; the ImageNet check of the zoo's EfficientNet-Lite0.
use crate::common;

use image::{DynamicImage, ImageBuffer, Luma, Rgb, RgbImage, Rgba};
use simile::npy::Npy;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const EMBED: &str = env!("CARGO_BIN_EXE_simile-embed");
const PREPARE: &str = env!("CARGO_BIN_EXE_simile-prepare");

fn run(args: &[&str], cache: &Path) -> common::Run {
    let out = std::process::Command::new(EMBED)
        .args(args)
        .env("SIMILE_CACHE", cache)
        .output()
        .unwrap();
    common::Run::from(out)
}

/// One zoo cache for the whole test binary (the smallcnn folder is built once, in a temp dir).
fn zoo_cache() -> &'static Path {
    static C: OnceLock<tempfile::TempDir> = OnceLock::new();
    C.get_or_init(|| tempfile::tempdir().unwrap()).path()
}

fn python() -> &'static Path {
    common::pyextras_python()
}

fn pattern(w: u32, h: u32, seed: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        Rgb([
            ((x * (3 + seed) + y) % 256) as u8,
            ((y * (5 + seed)) % 256) as u8,
            ((x ^ y).wrapping_mul(seed + 1) % 256) as u8,
        ])
    })
}

/// Inserts an EXIF APP1 segment with the given orientation after a JPEG's SOI marker.
fn with_exif_orientation(jpeg: &[u8], orientation: u16) -> Vec<u8> {
    let mut tiff = Vec::new();
    tiff.extend_from_slice(b"MM\x00\x2a\x00\x00\x00\x08"); // big-endian TIFF, IFD at 8
    tiff.extend_from_slice(&1u16.to_be_bytes()); // one entry
    tiff.extend_from_slice(&0x0112u16.to_be_bytes()); // Orientation
    tiff.extend_from_slice(&3u16.to_be_bytes()); // SHORT
    tiff.extend_from_slice(&1u32.to_be_bytes()); // count
    tiff.extend_from_slice(&orientation.to_be_bytes());
    tiff.extend_from_slice(&[0, 0]);
    tiff.extend_from_slice(&0u32.to_be_bytes()); // no next IFD
    let mut app1 = b"Exif\x00\x00".to_vec();
    app1.extend_from_slice(&tiff);
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(&app1);
    out.extend_from_slice(&jpeg[2..]);
    out
}

fn encode(img: &DynamicImage, fmt: image::ImageFormat) -> Vec<u8> {
    let mut v = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut v), fmt)
        .unwrap();
    v
}

/// A dataset of every kind of image, plus (when `bad`) a corrupt, a truncated and a missing
/// file. Returns (folder, dataset path, number of rows).
fn image_dataset(bad: bool) -> (tempfile::TempDir, PathBuf, usize) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("img")).unwrap();
    let png = image::ImageFormat::Png;
    let jpg = image::ImageFormat::Jpeg;
    let base = pattern(48, 40, 1);
    let write =
        |name: &str, bytes: Vec<u8>| std::fs::write(d.join("img").join(name), bytes).unwrap();
    write(
        "rgb.png",
        encode(&DynamicImage::ImageRgb8(base.clone()), png),
    );
    write(
        "photo.jpg",
        encode(&DynamicImage::ImageRgb8(pattern(60, 30, 2)), jpg),
    );
    let gray = ImageBuffer::from_fn(30, 50, |x, y| Luma([((x * 8 + y * 3) % 256) as u8]));
    write("gray.png", encode(&DynamicImage::ImageLuma8(gray), png));
    let rgba = ImageBuffer::from_fn(40, 40, |x, y| {
        Rgba([(x * 6) as u8, (y * 6) as u8, 90, (x + y) as u8])
    });
    write("rgba.png", encode(&DynamicImage::ImageRgba8(rgba), png));
    let deep: ImageBuffer<Rgb<u16>, Vec<u16>> = ImageBuffer::from_fn(32, 24, |x, y| {
        Rgb([(x * 2000) as u16, (y * 2500) as u16, 40000])
    });
    write("deep16.png", encode(&DynamicImage::ImageRgb16(deep), png));
    let rot = encode(&DynamicImage::ImageRgb8(pattern(50, 20, 3)), jpg);
    write("rotated.jpg", with_exif_orientation(&rot, 6));
    // The same picture as rgb.png, inside a larger canvas: its bbox crop must embed the same.
    let mut canvas = RgbImage::from_pixel(80, 70, Rgb([10, 200, 30]));
    image::imageops::replace(&mut canvas, &base, 20, 10);
    write("canvas.png", encode(&DynamicImage::ImageRgb8(canvas), png));
    let mut rows = vec![
        ("0", "img/rgb.png", ""),
        ("0", "img/canvas.png", "20,68,10,50"),
        ("1", "img/photo.jpg", ""),
        ("1", "img/gray.png", ""),
        ("2", "img/rgba.png", ""),
        ("2", "img/deep16.png", ""),
        ("3", "img/rotated.jpg", ""),
        ("3", "img/rgb.png", "0,24,0,40"),
    ];
    if bad {
        write(
            "corrupt.png",
            b"\x89PNG\r\n\x1a\nthis is not really a png".to_vec(),
        );
        let full = encode(&DynamicImage::ImageRgb8(pattern(64, 64, 4)), jpg);
        write("truncated.jpg", full[..full.len() / 2].to_vec());
        // One bad row in the middle (id 3), so shards of a run each have their own.
        rows.insert(3, ("4", "img/corrupt.png", ""));
        rows.push(("4", "img/truncated.jpg", ""));
        rows.push(("4", "img/missing.png", ""));
    }
    let mut csv = String::from("label,path,split,is_query,is_gallery,x_1,x_2,y_1,y_2\n");
    for (label, path, bbox) in &rows {
        let b: Vec<&str> = if bbox.is_empty() {
            vec![""; 4]
        } else {
            bbox.split(',').collect()
        };
        csv.push_str(&format!(
            "{label},{path},validation,True,True,{}\n",
            b.join(",")
        ));
    }
    std::fs::write(d.join("df.csv"), csv).unwrap();
    let ds = d.join("dataset.parquet");
    let r = common::run(
        PREPARE,
        &[
            "csv",
            "--csv",
            d.join("df.csv").to_str().unwrap(),
            "--out",
            ds.to_str().unwrap(),
            "--skip-file-check",
        ],
    );
    assert_eq!(r.code, 0, "prepare failed: {}", r.stderr);
    (dir, ds, rows.len())
}

fn read_f32(p: &Path) -> (Vec<f32>, usize) {
    let n = Npy::open(p).unwrap();
    let (rows, cols) = n.expect_matrix().unwrap();
    let mut v = Vec::new();
    n.read_rows_f32(0, rows, &mut v);
    (v, cols)
}

fn ids(p: &Path) -> Vec<i64> {
    Npy::open(simile::npy::ids_path(p))
        .unwrap()
        .to_i64_vec()
        .unwrap()
}

#[test]
fn every_kind_of_image_embeds_deterministically() {
    let (dir, ds, n) = image_dataset(false);
    let out = dir.path().join("out/emb.npy");
    let args = [
        "--dataset",
        ds.to_str().unwrap(),
        "--model",
        "smallcnn",
        "--out",
        out.to_str().unwrap(),
        "--batch-size",
        "3",
        "--device",
        "cpu",
    ];
    let r = run(&args, zoo_cache());
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("device: cpu"), "{}", r.stderr);
    assert!(r.stdout.contains(&format!("({n} x 128)")), "{}", r.stdout);
    assert_eq!(ids(&out), (0..n as i64).collect::<Vec<_>>());
    let (v, d) = read_f32(&out);
    assert_eq!(d, 128);
    // The bbox crop of the canvas is exactly rgb.png.
    let row = |i: usize| &v[i * d..(i + 1) * d];
    let diff = row(0)
        .iter()
        .zip(row(1))
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-6, "bbox crop differs from the original by {diff}");
    // Unit norm (smallcnn normalises).
    for i in 0..n {
        let norm: f32 = row(i).iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4);
    }
    // Same input, batch size, threads: the same bytes.
    let first = std::fs::read(&out).unwrap();
    let r = run(&args, zoo_cache());
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        first,
        std::fs::read(&out).unwrap(),
        "a re-run changed the bytes"
    );
    let m: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("out/emb.npy.manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(m["stage"], "embed");
    for role in ["dataset", "model", "weights"] {
        assert!(
            m["inputs"][role]["fingerprint"]["hash"].is_string(),
            "{role} missing in {m}"
        );
    }
    assert!(m["companions"]["emb.ids.npy"].is_object());
    // f16 output and bf16 compute stay close to fp32.
    let o16 = dir.path().join("out/e16.npy");
    let mut a16 = args.to_vec();
    a16[5] = o16.to_str().unwrap();
    a16.extend(["--out-dtype", "f16", "--compute", "bf16"]);
    let r = run(&a16, zoo_cache());
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(Npy::open(&o16).unwrap().dtype, simile::npy::DType::F16);
    let (w, _) = read_f32(&o16);
    for i in 0..n {
        let cos: f32 = row(i)
            .iter()
            .zip(&w[i * d..(i + 1) * d])
            .map(|(a, b)| a * b)
            .sum();
        assert!(cos > 0.99, "bf16 row {i}: cosine {cos}");
    }
}

#[test]
fn exif_orientation_gray_rgba_and_16_bit_decode() {
    let (dir, _, _) = image_dataset(false);
    let img = |n: &str| simile::image::decode_file(&dir.path().join("img").join(n)).unwrap();
    // Orientation 6 (rotate 90 clockwise): the 50x20 picture comes out 20x50.
    assert_eq!(img("rotated.jpg").dimensions(), (20, 50));
    let g = img("gray.png");
    assert_eq!(g.get_pixel(3, 2).0, [30, 30, 30]);
    assert_eq!(img("rgba.png").get_pixel(5, 7).0, [30, 42, 90]);
    let deep = img("deep16.png");
    assert_eq!(deep.get_pixel(0, 0).0[2], (40000f64 / 257.0).round() as u8);
}

#[test]
fn bad_images_are_all_listed_before_anything_runs_or_skipped() {
    let (dir, ds, n) = image_dataset(true);
    let out = dir.path().join("emb.npy");
    let base = [
        "--dataset",
        ds.to_str().unwrap(),
        "--model",
        "smallcnn",
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
    ];
    let r = run(&base, zoo_cache());
    assert_eq!(r.code, 2, "{}", r.stderr);
    for f in [
        "corrupt.png",
        "truncated.jpg",
        "missing.png",
        "3 of 11 images",
    ] {
        assert!(r.stderr.contains(f), "{f} not in: {}", r.stderr);
    }
    assert!(
        !out.exists() && !simile::npy::ids_path(&out).exists(),
        "a failed run left output"
    );
    assert!(!common::listing(dir.path())
        .iter()
        .any(|f| f.ends_with(".tmp")));
    let mut skip = base.to_vec();
    skip.extend(["--on-bad-image", "skip"]);
    let r = run(&skip, zoo_cache());
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("skipped 3"), "{}", r.stdout);
    let good: Vec<i64> = (0..n as i64).filter(|i| ![3, 9, 10].contains(i)).collect();
    assert_eq!(ids(&out), good);
    let list = std::fs::read_to_string(dir.path().join("emb.skipped.tsv")).unwrap();
    assert_eq!(list.lines().count(), 4, "{list}");
    assert!(
        list.contains("\tfile not found") && list.contains("truncated"),
        "{list}"
    );
}

#[test]
fn shards_merge_to_the_unsharded_result() {
    let (dir, ds, n) = image_dataset(false);
    let d = dir.path();
    let whole = d.join("whole.npy");
    let sharded = d.join("emb.npy");
    let common_args = |out: &Path| -> Vec<String> {
        [
            "--dataset",
            ds.to_str().unwrap(),
            "--model",
            "smallcnn",
            "--out",
            out.to_str().unwrap(),
            "--batch-size",
            "2",
            "--device",
            "cpu",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let a = common_args(&whole);
    let r = run(
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
        zoo_cache(),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    for i in 0..3 {
        let mut a = common_args(&sharded);
        a.extend(["--shard".into(), format!("{i}/3")]);
        let r = run(
            &a.iter().map(String::as_str).collect::<Vec<_>>(),
            zoo_cache(),
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert!(d.join(format!("emb.part-{i}-of-3.npy")).exists());
    }
    let r = run(&["merge", "--out", sharded.to_str().unwrap()], zoo_cache());
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(ids(&sharded), ids(&whole));
    assert_eq!(ids(&whole).len(), n);
    let (x, _) = read_f32(&whole);
    let (y, _) = read_f32(&sharded);
    let diff = x
        .iter()
        .zip(&y)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-5, "merged shards differ by {diff}");
}

#[test]
fn merge_joins_the_parts_skipped_lists() {
    let (dir, ds, n) = image_dataset(true);
    let d = dir.path();
    let whole = d.join("whole.npy");
    let sharded = d.join("emb.npy");
    let args = |out: &Path, shard: Option<String>| -> Vec<String> {
        let mut a: Vec<String> = [
            "--dataset",
            ds.to_str().unwrap(),
            "--model",
            "smallcnn",
            "--out",
            out.to_str().unwrap(),
            "--device",
            "cpu",
            "--on-bad-image",
            "skip",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(s) = shard {
            a.extend(["--shard".into(), s]);
        }
        a
    };
    let go = |a: Vec<String>| {
        let r = run(
            &a.iter().map(String::as_str).collect::<Vec<_>>(),
            zoo_cache(),
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
    };
    go(args(&whole, None));
    // 11 rows in 2 parts: [0, 5) holds bad id 3, [5, 11) bad ids 9 and 10.
    for i in 0..2 {
        go(args(&sharded, Some(format!("{i}/2"))));
        assert!(d.join(format!("emb.part-{i}-of-2.skipped.tsv")).exists());
    }
    // A stale list from an earlier run must not survive the merge: here it is replaced.
    std::fs::write(d.join("emb.skipped.tsv"), "stale").unwrap();
    let r = run(&["merge", "--out", sharded.to_str().unwrap()], zoo_cache());
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("3 rows were skipped"), "{}", r.stderr);
    assert_eq!(ids(&sharded), ids(&whole));
    assert_eq!(ids(&whole).len(), n - 3);
    let merged = std::fs::read_to_string(d.join("emb.skipped.tsv")).unwrap();
    assert_eq!(
        merged,
        std::fs::read_to_string(d.join("whole.skipped.tsv")).unwrap()
    );
    let listed: Vec<&str> = merged
        .lines()
        .skip(1)
        .map(|l| l.split('\t').next().unwrap())
        .collect();
    assert_eq!(listed, ["3", "9", "10"]);
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("emb.npy.manifest.json")).unwrap()).unwrap();
    assert_eq!(m["rows"]["skipped"], 3);
    assert!(m["companions"]["emb.skipped.tsv"].is_object(), "{m}");
    // A part whose list went missing is refused (its manifest counts skipped rows); --force,
    // as the merged output is otherwise up to date.
    std::fs::remove_file(d.join("emb.part-1-of-2.skipped.tsv")).unwrap();
    let r = run(
        &["merge", "--out", sharded.to_str().unwrap(), "--force"],
        zoo_cache(),
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("emb.part-1-of-2"), "{}", r.stderr);
}

#[test]
fn check_only_lists_bad_images_and_writes_nothing() {
    let (dir, ds, n) = image_dataset(true);
    let base = [
        "--dataset",
        ds.to_str().unwrap(),
        "--model",
        "smallcnn",
        "--check-only",
        "--threads",
        "1",
    ];
    let r = run(&base, zoo_cache());
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!("3 of {n} images")),
        "{}",
        r.stderr
    );
    let mut skip = base.to_vec();
    skip.extend(["--on-bad-image", "skip"]);
    let r = run(&skip, zoo_cache());
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains(&format!("checked {n} images"))
            && r.stdout.contains("3 unreadable")
            && r.stdout.contains("corrupt.png"),
        "{}",
        r.stdout
    );
    // Nothing was written beside the dataset.
    assert!(!common::listing(dir.path())
        .iter()
        .any(|f| f.ends_with(".npy") || f.ends_with(".tsv")));
}

#[test]
fn user_errors_exit_2() {
    let (dir, ds, _) = image_dataset(false);
    let out = dir.path().join("e.npy");
    let o = out.to_str().unwrap();
    let d = ds.to_str().unwrap();
    for (args, want) in [
        (
            vec!["--dataset", d, "--model", "nosuchmodel", "--out", o],
            "not a zoo key",
        ),
        (
            vec![
                "--dataset",
                d,
                "--model",
                "smallcnn",
                "--out",
                o,
                "--device",
                "cuda:7",
            ],
            "cuda",
        ),
        (
            vec![
                "--dataset",
                d,
                "--model",
                "smallcnn",
                "--out",
                o,
                "--compute",
                "fp16",
                "--device",
                "cpu",
            ],
            "fp16",
        ),
        (
            vec![
                "--dataset",
                d,
                "--model",
                "smallcnn",
                "--out",
                o,
                "--split",
                "test",
            ],
            "--split",
        ),
        (vec!["--dataset", d, "--model", "smallcnn"], "--out"),
        (
            vec![
                "--dataset",
                d,
                "--model",
                "smallcnn",
                "--out",
                o,
                "--threads",
                "0",
            ],
            "--threads",
        ),
    ] {
        let r = run(&args, zoo_cache());
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains(want), "{args:?}: {}", r.stderr);
    }
    let r = run(&["--help"], zoo_cache());
    assert!(r.stdout.contains("Examples:") && r.stdout.contains("efficientnet-lite0-imagenet"));
}

/// PyTorch's reference checkpoints, inputs and outputs (tests/fixtures_py/parity.py), once.
fn parity_fixtures() -> &'static Path {
    static D: OnceLock<tempfile::TempDir> = OnceLock::new();
    D.get_or_init(|| {
        let d = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(python())
            .arg(common::repo_root().join("tests/fixtures_py/parity.py"))
            .arg(d.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "parity.py: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        d
    })
    .path()
}

fn check_parity(case: &str, import_args: &[&str]) {
    let fx = parity_fixtures();
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join(case);
    let mut args = vec!["import", "--out", folder.to_str().unwrap()];
    args.extend_from_slice(import_args);
    let r = common::run(EMBED, &args);
    assert_eq!(r.code, 0, "import {case}: {}", r.stderr);
    let model = simile::model::Model::load_dir(&folder, tch::Device::Cpu).unwrap();
    let x = tch::Tensor::read_npy(fx.join(format!("{case}.x.npy"))).unwrap();
    let want = tch::Tensor::read_npy(fx.join(format!("{case}.y.npy"))).unwrap();
    let got = model.embed(&x).unwrap();
    assert_eq!(got.size(), want.size());
    let diff = f64::try_from((got - &want).abs().max()).unwrap();
    let scale = f64::try_from(want.abs().max()).unwrap();
    assert!(
        diff <= 1e-5 * scale.max(1.0),
        "{case}: max |simile - pytorch| = {diff} (scale {scale})"
    );
}

#[test]
fn parity_resnet18_torchvision_state_dict() {
    let w = parity_fixtures().join("resnet18.pth");
    check_parity(
        "resnet18",
        &[
            "--arch",
            "resnet18",
            "--weights",
            w.to_str().unwrap(),
            "--size",
            "64",
        ],
    );
}

#[test]
fn parity_vits16_timm_lightning_checkpoint() {
    let w = parity_fixtures().join("vits16.ckpt");
    check_parity(
        "vits16",
        &["--arch", "vits16", "--weights", w.to_str().unwrap()],
    );
}

/// Position embeddings interpolated for a smaller and a larger input than the native 224 px
/// (DINO's bicubic interpolation with its +0.1 offset, as OML's ViTExtractor runs it).
#[test]
fn parity_vits16_at_non_native_sizes() {
    let w = parity_fixtures().join("vits16.ckpt");
    for side in ["160", "288"] {
        check_parity(
            &format!("vits16_{side}"),
            &[
                "--arch",
                "vits16",
                "--weights",
                w.to_str().unwrap(),
                "--size",
                side,
            ],
        );
    }
}

#[test]
fn parity_vits14_dinov2_safetensors() {
    let w = parity_fixtures().join("vits14.safetensors");
    check_parity(
        "vits14",
        &[
            "--arch",
            "vits14",
            "--weights",
            w.to_str().unwrap(),
            "--size",
            "518",
        ],
    );
}

#[test]
fn parity_torchscript_trace() {
    let w = parity_fixtures().join("traced.pt");
    check_parity(
        "traced",
        &["--torchscript", w.to_str().unwrap(), "--size", "32"],
    );
}

#[test]
fn efficientnet_lite0_imagenet_classifies_skimage_photos() {
    let py = python();
    let out = std::process::Command::new(py)
        .args([
            "-c",
            "import os, skimage; print(os.path.join(os.path.dirname(skimage.__file__), 'data'))",
        ])
        .output()
        .unwrap();
    let data = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let cat = data.join("chelsea.png");
    let coffee = data.join("coffee.png");
    let r = run(
        &[
            "classify",
            "--model",
            "efficientnet-lite0-imagenet",
            "--top",
            "3",
            cat.to_str().unwrap(),
            coffee.to_str().unwrap(),
        ],
        zoo_cache(),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let top1: Vec<i64> = r
        .stdout
        .lines()
        .map(|l| {
            l.split('\t')
                .nth(1)
                .unwrap()
                .split(':')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    // chelsea: a tabby cat (ImageNet 281 tabby .. 285 Egyptian cat); coffee: 967 espresso / 968 cup.
    assert!(
        (281..=285).contains(&top1[0]),
        "chelsea.png top-1 {}: {}",
        top1[0],
        r.stdout
    );
    assert!(
        [967, 968].contains(&top1[1]),
        "coffee.png top-1 {}: {}",
        top1[1],
        r.stdout
    );
    let spec = simile::model::ModelSpec::read(&zoo_cache().join("zoo/efficientnet-lite0-imagenet"))
        .unwrap();
    assert_eq!(spec.embedding_dim, 1280);
    assert_eq!(spec.head.unwrap().classes, 1000);
}
