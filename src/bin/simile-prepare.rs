//! simile-prepare: builds `dataset.parquet` from OML's CSV format, an image folder, or fonts.
use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use simile::dataset::{self, CsvOptions, Dataset, FolderOptions, ImportReport};
use simile::manifest::ManifestBuilder;
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(
    name = "simile-prepare",
    version,
    about = "Build dataset.parquet, the table every other stage reads",
    after_help = "Examples:
  simile-prepare csv --csv data/df.csv --out data/dataset.parquet
  simile-prepare csv --csv photos.csv --root /mnt/photos --out dataset.parquet
  simile-prepare csv --csv new_batch.csv --unlabeled --out inference.parquet
  simile-prepare folder --images data/by_label --val-fraction 0.3 --out dataset.parquet
  simile-prepare fonts --out work/fontid          # the built-in Font-ID dataset

Exit codes: 0 ok, 2 bad input (the message names file, line and column), 1 internal failure."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Import a CSV in OML's format (label, path|text, split, is_query, is_gallery; optional
    /// category, sequence, x_1, x_2, y_1, y_2), validating every row.
    Csv(CsvArgs),
    /// Import a folder with one sub-folder of images per label; split by label.
    Folder(FolderArgs),
    /// Build the Font-ID dataset: each font a label, its 62 glyphs A-Z a-z 0-9 the samples.
    /// Fonts missing glyphs, picture fonts (letters all one picture) and duplicates (at least
    /// half the glyphs the same pictures as an earlier font's) are dropped and listed; the cuts
    /// of one design share a category and a side of the train/validation split.
    Fonts(FontsArgs),
    /// Print a dataset's summary (labels, samples, splits).
    Info {
        /// The dataset.parquet to describe.
        #[arg(long)]
        dataset: PathBuf,
    },
}

#[derive(Args)]
struct CsvArgs {
    /// The CSV file.
    #[arg(long)]
    csv: PathBuf,
    /// Folder that relative paths resolve against (default: the CSV's folder).
    #[arg(long)]
    root: Option<PathBuf>,
    /// A CSV of `path` alone: an inference set (null labels, split `inference`).
    #[arg(long)]
    unlabeled: bool,
    /// Don't check that image files exist.
    #[arg(long)]
    skip_file_check: bool,
    /// Output dataset.parquet.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    force: simile::cli::ForceArg,
}

#[derive(Args)]
struct FolderArgs {
    /// Folder with one sub-folder per label.
    #[arg(long)]
    images: PathBuf,
    /// Share of labels held out for validation (query and gallery, 1-vs-rest).
    #[arg(long, default_value_t = 0.3)]
    val_fraction: f64,
    /// Seed of the label split.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output dataset.parquet.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    force: simile::cli::ForceArg,
}

#[derive(Args)]
struct FontsArgs {
    /// Folder of TrueType fonts (Debian's fonts-aenigma).
    #[arg(long, default_value = "/usr/share/fonts/truetype/aenigma")]
    font_dir: PathBuf,
    /// Output folder: images/, df.csv and dataset.parquet are written there.
    #[arg(long)]
    out: PathBuf,
    /// Glyph image size in pixels.
    #[arg(long, default_value_t = 64)]
    size: u32,
    /// Share of fonts held out for validation.
    #[arg(long, default_value_t = 0.3)]
    val_fraction: f64,
    /// Seed of the split.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep only the first N font groups (small datasets for tests and quick runs).
    #[arg(long)]
    max_fonts: Option<usize>,
    #[command(flatten)]
    force: simile::cli::ForceArg,
}

fn main() {
    simile::cli::run(|| {
        let cli = simile::cli::parse::<Cli>();
        match cli.cmd {
            Cmd::Csv(a) => {
                a.force.apply();
                csv(a)
            }
            Cmd::Folder(a) => {
                a.force.apply();
                folder(a)
            }
            Cmd::Fonts(a) => {
                a.force.apply();
                fonts(a)
            }
            Cmd::Info { dataset } => {
                let ds = Dataset::read(&dataset)?;
                summary(&ds, &ImportReport::default(), &dataset);
                Ok(())
            }
        }
    })
}

fn csv(a: CsvArgs) -> anyhow::Result<()> {
    let params = serde_json::json!({
        "source": "csv", "unlabeled": a.unlabeled, "root": a.root, "skip_file_check": a.skip_file_check,
    });
    let mut m = ManifestBuilder::new("prepare", params);
    // A missing CSV is left to the import, which reports it properly.
    if a.csv.is_file() {
        m.input("csv", &a.csv)?;
        m.skip_if_done(&a.out)?;
    } else {
        simile::manifest::refuse_overlap(&[("CSV", &a.csv)], &[&a.out])?;
    }
    let opts = CsvOptions {
        root: a.root.clone(),
        unlabeled: a.unlabeled,
        skip_file_check: a.skip_file_check,
    };
    let (mut ds, report) = dataset::import_csv(&a.csv, &opts)?;
    let root = ds.root_dir.clone();
    write(&mut ds, &a.out, &root, m)?;
    summary(&ds, &report, &a.out);
    Ok(())
}

fn folder(a: FolderArgs) -> anyhow::Result<()> {
    let (mut ds, report) = dataset::import_folder(
        &a.images,
        &FolderOptions {
            val_fraction: a.val_fraction,
            seed: a.seed,
        },
    )?;
    let root = ds.root_dir.clone();
    let params = serde_json::json!({
        "source": "folder", "images": a.images, "val_fraction": a.val_fraction, "seed": a.seed,
    });
    // The folder's input is its files: their list (in the dataset) and their bytes.
    let files: Vec<PathBuf> = (0..ds.len())
        .filter_map(|r| ds.resolve_path(r, None))
        .collect();
    let mut m = ManifestBuilder::new("prepare", params);
    m.input_files(
        "images",
        &format!("{} files under {}", files.len(), a.images.display()),
        &files,
    )?;
    m.skip_if_done(&a.out)?;
    write(&mut ds, &a.out, &root, m)?;
    summary(&ds, &report, &a.out);
    Ok(())
}

fn fonts(a: FontsArgs) -> anyhow::Result<()> {
    let t = std::time::Instant::now();
    let params = serde_json::json!({
        "source": "fonts", "font_dir": a.font_dir, "size": a.size, "val_fraction": a.val_fraction,
        "seed": a.seed, "max_fonts": a.max_fonts,
    });
    let out = a.out.join("dataset.parquet");
    let df = a.out.join("df.csv");
    // The fonts are the input; df.csv lists the glyph images rendered from them.
    let plan = |params: serde_json::Value| -> anyhow::Result<ManifestBuilder> {
        let fonts = simile::fonts::font_paths(&a.font_dir)?;
        let mut m = ManifestBuilder::new("prepare", params);
        m.input_files(
            "fonts",
            &format!("{} fonts in {}", fonts.len(), a.font_dir.display()),
            &fonts,
        )?;
        m.input("csv", &df)?;
        Ok(m)
    };
    if df.is_file() && a.font_dir.is_dir() {
        plan(params.clone())?.skip_if_done(&out)?;
    }
    let opts = simile::fonts::FontIdOptions {
        size: a.size,
        val_fraction: a.val_fraction,
        seed: a.seed,
        max_fonts: a.max_fonts,
    };
    let s = simile::fonts::build_font_id(&a.font_dir, &a.out, &opts)?;
    eprintln!(
        "Font-ID: {} fonts found, {} kept in {} design groups ({} train, {} validation), {} dropped; {} glyph images in {:.1} s",
        s.fonts_found, s.fonts_kept, s.groups, s.train_fonts, s.val_fonts, s.dropped.len(), s.images,
        t.elapsed().as_secs_f64()
    );
    for (f, why) in s.dropped.iter().take(8) {
        eprintln!("  dropped {f}: {why}");
    }
    if s.dropped.len() > 8 {
        eprintln!("  ... and {} more dropped", s.dropped.len() - 8);
    }
    let (mut ds, report) = dataset::import_csv(
        &df,
        &CsvOptions {
            root: Some(a.out.clone()),
            ..Default::default()
        },
    )
    .context("validating the generated df.csv")?;
    ds.meta.source_kind = "fonts".into();
    ds.meta.source = a.font_dir.display().to_string();
    write(&mut ds, &out, &a.out, plan(params)?)?;
    summary(&ds, &report, &out);
    Ok(())
}

fn write(ds: &mut Dataset, out: &Path, root: &Path, mut m: ManifestBuilder) -> anyhow::Result<()> {
    let sealed = ds.seal(out, root)?;
    m.rows("rows", ds.len() as u64);
    for (s, n) in ds.split_counts() {
        m.rows(s.as_str(), n as u64);
    }
    m.commit(sealed, Vec::new())?;
    Ok(())
}

fn summary(ds: &Dataset, report: &ImportReport, out: &Path) {
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    let labels: std::collections::BTreeSet<i64> = ds.label.iter().flatten().copied().collect();
    println!(
        "{} ({} rows, {} labels, {}s, {} from {})",
        out.display(),
        ds.len(),
        labels.len(),
        ds.modality().as_str(),
        ds.meta.source_kind,
        ds.meta.source
    );
    for (s, n) in ds.split_counts() {
        let l = ds.labels_of_split(s).len();
        let q = (0..ds.len())
            .filter(|&i| ds.split[i] == s && ds.is_query[i] == Some(true))
            .count();
        let g = (0..ds.len())
            .filter(|&i| ds.split[i] == s && ds.is_gallery[i] == Some(true))
            .count();
        match s {
            dataset::Split::Validation => println!(
                "  {:<10} {n:>7} samples {l:>6} labels  {q} queries, {g} gallery",
                s.as_str()
            ),
            _ => println!("  {:<10} {n:>7} samples {l:>6} labels", s.as_str()),
        }
    }
    if ds.has_category() {
        let c: std::collections::BTreeSet<&str> =
            ds.category.iter().flatten().map(String::as_str).collect();
        println!("  categories: {}", c.len());
    }
}
