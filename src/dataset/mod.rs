//! The canonical dataset table (`dataset.parquet`): reading, writing, and the importers
//! (OML's CSV format, an image folder), with OML's validation rules and more.
//!
//! Every row has an `id` (int64); every artifact refers to rows by these ids. From a CSV the
//! id is the 0-based row position; from a folder (and Font-ID) the position after sorting by
//! (label, path).
use crate::error::{Error, Result};
use crate::table::{self, Meta};
use arrow::array::{
    Array, ArrayRef, BooleanArray, BooleanBuilder, Int32Array, Int32Builder, Int64Array,
    Int64Builder, RecordBatch, StringArray, StringBuilder,
};
use arrow::datatypes::{DataType, Field, Schema};
use rayon::prelude::*;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

pub const SCHEMA_VERSION: &str = "1";

pub mod columns;
pub use columns::{read_sides, read_sides_and_ids, SideFlag, SidePick, SideRows};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Split {
    Train,
    Validation,
    Inference,
}

crate::named!(Split { Train => "train", Validation => "validation", Inference => "inference" });

/// What a dataset's rows (and a model's inputs) are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Modality {
    Image,
    Text,
}

impl Modality {
    pub fn as_str(self) -> &'static str {
        match self {
            Modality::Image => "image",
            Modality::Text => "text",
        }
    }
}

/// Footer metadata of `dataset.parquet` (keys `simile.*`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DatasetMeta {
    /// The image root as recorded: relative to the parquet file's folder when it can be,
    /// else absolute.
    pub root: String,
    /// What the dataset was made from (a CSV path, a folder, a font folder).
    pub source: String,
    /// `csv`, `unlabeled-csv`, `folder` or `fonts`.
    pub source_kind: String,
    /// Content fingerprint of the source (see `io::Fingerprint::hash`).
    pub source_fingerprint: String,
    /// `image` or `text`.
    pub modality: String,
    /// Names of labels when the source has them (folder names, font files).
    pub label_names: Option<Vec<String>>,
}

/// The dataset, one vector per column, rows in id order.
#[derive(Clone, Debug, Default)]
pub struct Dataset {
    pub ids: Vec<i64>,
    pub label: Vec<Option<i64>>,
    pub path: Vec<Option<String>>,
    pub text: Vec<Option<String>>,
    pub split: Vec<Split>,
    pub is_query: Vec<Option<bool>>,
    pub is_gallery: Vec<Option<bool>>,
    pub category: Vec<Option<String>>,
    pub sequence: Vec<Option<String>>,
    /// `[x_1, x_2, y_1, y_2]`: left, right (exclusive), top, bottom (exclusive), pixels.
    pub bbox: Vec<Option<[i32; 4]>>,
    pub meta: DatasetMeta,
    /// The absolute root image paths resolve against (set by `read`).
    pub root_dir: PathBuf,
    /// Where it was read from (set by `read`).
    pub file: PathBuf,
}

pub const COLUMNS: [&str; 13] = [
    "id",
    "label",
    "path",
    "text",
    "split",
    "is_query",
    "is_gallery",
    "category",
    "sequence",
    "x_1",
    "x_2",
    "y_1",
    "y_2",
];

pub fn arrow_schema() -> Schema {
    Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("label", DataType::Int64, true),
        Field::new("path", DataType::Utf8, true),
        Field::new("text", DataType::Utf8, true),
        Field::new("split", DataType::Utf8, false),
        Field::new("is_query", DataType::Boolean, true),
        Field::new("is_gallery", DataType::Boolean, true),
        Field::new("category", DataType::Utf8, true),
        Field::new("sequence", DataType::Utf8, true),
        Field::new("x_1", DataType::Int32, true),
        Field::new("x_2", DataType::Int32, true),
        Field::new("y_1", DataType::Int32, true),
        Field::new("y_2", DataType::Int32, true),
    ])
}

impl Dataset {
    /// Images or texts: a dataset with texts (OML's `text` column) is a text dataset.
    pub fn modality(&self) -> Modality {
        if self.meta.modality == "text" || self.text.iter().any(Option::is_some) {
            Modality::Text
        } else {
            Modality::Image
        }
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Row position of an id (ids are sorted).
    pub fn position_of(&self, id: i64) -> Option<usize> {
        self.ids.binary_search(&id).ok()
    }

    pub fn rows_of_split(&self, split: Split) -> Vec<usize> {
        (0..self.len())
            .filter(|&i| self.split[i] == split)
            .collect()
    }

    pub fn has_category(&self) -> bool {
        self.category.iter().any(|c| c.is_some())
    }

    pub fn has_sequence(&self) -> bool {
        self.sequence.iter().any(|c| c.is_some())
    }

    /// The file of row `row`, against `root` when given (`--root`), else the recorded root.
    pub fn resolve_path(&self, row: usize, root: Option<&Path>) -> Option<PathBuf> {
        let p = Path::new(self.path[row].as_deref()?);
        if p.is_absolute() {
            return Some(p.to_path_buf());
        }
        Some(root.unwrap_or(&self.root_dir).join(p))
    }

    /// Count of each split's rows, for summaries.
    pub fn split_counts(&self) -> BTreeMap<Split, usize> {
        let mut m = BTreeMap::new();
        for s in &self.split {
            *m.entry(*s).or_default() += 1;
        }
        m
    }

    /// Distinct labels of a split.
    pub fn labels_of_split(&self, split: Split) -> BTreeSet<i64> {
        (0..self.len())
            .filter(|&i| self.split[i] == split)
            .filter_map(|i| self.label[i])
            .collect()
    }

    fn to_batch(&self) -> Result<RecordBatch> {
        let n = self.len();
        let mut label = Int64Builder::with_capacity(n);
        let mut path = StringBuilder::new();
        let mut text = StringBuilder::new();
        let mut split = StringBuilder::new();
        let mut q = BooleanBuilder::with_capacity(n);
        let mut g = BooleanBuilder::with_capacity(n);
        let mut cat = StringBuilder::new();
        let mut seq = StringBuilder::new();
        let mut bb: [Int32Builder; 4] = std::array::from_fn(|_| Int32Builder::with_capacity(n));
        for i in 0..n {
            label.append_option(self.label[i]);
            path.append_option(self.path[i].as_deref());
            text.append_option(self.text[i].as_deref());
            split.append_value(self.split[i].as_str());
            q.append_option(self.is_query[i]);
            g.append_option(self.is_gallery[i]);
            cat.append_option(self.category[i].as_deref());
            seq.append_option(self.sequence[i].as_deref());
            for (k, b) in bb.iter_mut().enumerate() {
                b.append_option(self.bbox[i].map(|v| v[k]));
            }
        }
        let [b0, b1, b2, b3] = bb;
        let cols: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from(self.ids.clone())),
            Arc::new(label.finish()),
            Arc::new(path.finish()),
            Arc::new(text.finish()),
            Arc::new(split.finish()),
            Arc::new(q.finish()),
            Arc::new(g.finish()),
            Arc::new(cat.finish()),
            Arc::new(seq.finish()),
            Arc::new({ b0 }.finish()),
            Arc::new({ b1 }.finish()),
            Arc::new({ b2 }.finish()),
            Arc::new({ b3 }.finish()),
        ];
        RecordBatch::try_new(Arc::new(arrow_schema()), cols)
            .map_err(|e| Error::internal(e.to_string()))
    }

    fn meta_kv(&self) -> Meta {
        let mut m = Meta::new();
        m.insert("simile.artifact".into(), "dataset".into());
        m.insert("simile.schema_version".into(), SCHEMA_VERSION.into());
        m.insert("simile.root".into(), self.meta.root.clone());
        m.insert("simile.source".into(), self.meta.source.clone());
        m.insert("simile.source_kind".into(), self.meta.source_kind.clone());
        m.insert(
            "simile.source_fingerprint".into(),
            self.meta.source_fingerprint.clone(),
        );
        m.insert("simile.modality".into(), self.meta.modality.clone());
        if let Some(names) = &self.meta.label_names {
            m.insert(
                "simile.label_names".into(),
                serde_json::to_string(names).unwrap_or_default(),
            );
        }
        m
    }

    /// Writes `dataset.parquet` atomically. `root_dir` (absolute) is recorded relative to
    /// the file's folder when possible, so the folder can move as a whole.
    pub fn write(&mut self, dest: &Path, root_dir: &Path) -> Result<()> {
        self.seal(dest, root_dir)?.persist()
    }

    /// [`write`](Self::write) under the temporary name, for a set committed with its manifest.
    pub fn seal(&mut self, dest: &Path, root_dir: &Path) -> Result<crate::io::Sealed> {
        let dest_dir = absolute(dest.parent().unwrap_or(Path::new(".")));
        self.meta.root = relative_to(&absolute(root_dir), &dest_dir)
            .map(|p| {
                let s = p.display().to_string();
                if s.is_empty() {
                    ".".to_string()
                } else {
                    s
                }
            })
            .unwrap_or_else(|| absolute(root_dir).display().to_string());
        self.root_dir = absolute(root_dir);
        let batch = self.to_batch()?;
        let sealed = table::seal_parquet(dest, &batch, &self.meta_kv())?;
        self.file = dest.to_path_buf();
        Ok(sealed)
    }

    /// Reads and checks `dataset.parquet`.
    pub fn read(path: &Path) -> Result<Dataset> {
        crate::manifest::verify(path)?;
        let t = table::read_parquet(path, None)?;
        if t.meta.get("simile.artifact").map(String::as_str) != Some("dataset") {
            return Err(Error::input(format!(
                "{}: not a simile dataset (no simile.artifact=dataset in its metadata); make one with simile-prepare",
                path.display()
            )));
        }
        if let Some(v) = t.meta.get("simile.schema_version") {
            if v != SCHEMA_VERSION {
                return Err(Error::input(format!(
                    "{}: dataset schema version {v}, this simile reads version {SCHEMA_VERSION}; re-run simile-prepare",
                    path.display()
                )));
            }
        }
        let i64c = |n: &str| t.typed::<Int64Array>(n, &DataType::Int64);
        let strc = |n: &str| t.typed::<StringArray>(n, &DataType::Utf8);
        let boolc = |n: &str| t.typed::<BooleanArray>(n, &DataType::Boolean);
        let i32c = |n: &str| t.typed::<Int32Array>(n, &DataType::Int32);
        let ids = i64c("id")?;
        t.require_no_nulls("id", ids)?;
        let split_c = strc("split")?;
        t.require_no_nulls("split", split_c)?;
        let opt_i64 = |a: &Int64Array| -> Vec<Option<i64>> { a.iter().collect() };
        let opt_str = |a: &StringArray| -> Vec<Option<String>> {
            a.iter().map(|v| v.map(str::to_string)).collect()
        };
        let mut split = Vec::with_capacity(t.rows());
        for (i, s) in split_c.iter().enumerate() {
            split.push(s.unwrap().parse::<Split>().map_err(|e| {
                Error::input(format!("{}: row {i}: column 'split': {e}", path.display()))
            })?);
        }
        let bx = [i32c("x_1")?, i32c("x_2")?, i32c("y_1")?, i32c("y_2")?];
        let bbox = (0..t.rows())
            .map(|i| {
                if bx.iter().all(|c| c.is_valid(i)) {
                    Some([
                        bx[0].value(i),
                        bx[1].value(i),
                        bx[2].value(i),
                        bx[3].value(i),
                    ])
                } else {
                    None
                }
            })
            .collect();
        let ids: Vec<i64> = ids.values().to_vec();
        if let Some(w) = ids.windows(2).position(|w| w[0] >= w[1]) {
            return Err(Error::input(format!(
                "{}: row {}: ids must be unique and sorted ascending, found {} after {}",
                path.display(),
                w + 1,
                ids[w + 1],
                ids[w]
            )));
        }
        let root = t
            .meta
            .get("simile.root")
            .cloned()
            .unwrap_or_else(|| ".".into());
        let here = absolute(path.parent().unwrap_or(Path::new(".")));
        let root_dir = if Path::new(&root).is_absolute() {
            PathBuf::from(&root)
        } else {
            normalize(&here.join(&root))
        };
        let meta = DatasetMeta {
            root,
            source: t.meta.get("simile.source").cloned().unwrap_or_default(),
            source_kind: t
                .meta
                .get("simile.source_kind")
                .cloned()
                .unwrap_or_default(),
            source_fingerprint: t
                .meta
                .get("simile.source_fingerprint")
                .cloned()
                .unwrap_or_default(),
            modality: t.meta.get("simile.modality").cloned().unwrap_or_default(),
            label_names: t
                .meta
                .get("simile.label_names")
                .and_then(|s| serde_json::from_str(s).ok()),
        };
        Ok(Dataset {
            ids,
            label: opt_i64(i64c("label")?),
            path: opt_str(strc("path")?),
            text: opt_str(strc("text")?),
            split,
            is_query: boolc("is_query")?.iter().collect(),
            is_gallery: boolc("is_gallery")?.iter().collect(),
            category: opt_str(strc("category")?),
            sequence: opt_str(strc("sequence")?),
            bbox,
            meta,
            root_dir,
            file: path.to_path_buf(),
        })
    }
}

/// An absolute version of `p` (without resolving symlinks when the path does not exist).
pub fn absolute(p: &Path) -> PathBuf {
    if let Ok(c) = p.canonicalize() {
        return c;
    }
    let p = if p.as_os_str().is_empty() {
        Path::new(".")
    } else {
        p
    };
    normalize(&std::env::current_dir().unwrap_or_default().join(p))
}

fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// `target` relative to `base` (both absolute), with `..` steps where needed.
fn relative_to(target: &Path, base: &Path) -> Option<PathBuf> {
    let t: Vec<_> = target.components().collect();
    let b: Vec<_> = base.components().collect();
    let common = t.iter().zip(&b).take_while(|(a, b)| a == b).count();
    if common == 0 {
        return None;
    }
    let mut out = PathBuf::new();
    for _ in common..b.len() {
        out.push("..");
    }
    for c in &t[common..] {
        out.push(c.as_os_str());
    }
    Some(out)
}

// ---------------------------------------------------------------------------------------
// Import from OML's CSV format.

/// What an import found besides errors: warnings with counts, for the summary.
#[derive(Debug, Default)]
pub struct ImportReport {
    pub warnings: Vec<String>,
}

/// Options of the CSV importer.
#[derive(Clone, Debug, Default)]
pub struct CsvOptions {
    /// Where relative paths resolve; default: the CSV's folder.
    pub root: Option<PathBuf>,
    /// A CSV of `path` alone: an inference set (null labels, split `inference`).
    pub unlabeled: bool,
    /// Skip the check that image files exist (for datasets whose images are elsewhere).
    pub skip_file_check: bool,
}

/// pandas' default missing-value strings (what OML sees as NaN).
fn is_missing(s: &str) -> bool {
    matches!(
        s.trim(),
        "" | "NaN"
            | "nan"
            | "NA"
            | "N/A"
            | "n/a"
            | "NULL"
            | "null"
            | "None"
            | "<NA>"
            | "#N/A"
            | "-NaN"
            | "-nan"
    )
}

fn parse_bool(s: &str) -> Option<bool> {
    match s.trim() {
        "True" | "true" | "TRUE" | "1" | "1.0" => Some(true),
        "False" | "false" | "FALSE" | "0" | "0.0" => Some(false),
        _ => None,
    }
}

/// An integer, also written as an integer-valued float (`12.0`, as pandas writes NaN-able ints).
fn parse_int_like(s: &str) -> Option<i64> {
    let s = s.trim();
    if let Ok(v) = s.parse::<i64>() {
        return Some(v);
    }
    let f: f64 = s.parse().ok()?;
    (f.fract() == 0.0 && f.is_finite() && f.abs() < 9.0e15).then_some(f as i64)
}

/// Collects errors per rule, keeping the first few lines of each and a count.
struct Problems {
    file: String,
    rules: BTreeMap<usize, (String, Vec<String>, usize)>,
    order: usize,
}

const SHOW_PER_RULE: usize = 20;

impl Problems {
    fn new(file: &Path) -> Self {
        Problems {
            file: file.display().to_string(),
            rules: BTreeMap::new(),
            order: 0,
        }
    }
    /// `rule` groups messages; `line` is the 1-based CSV line.
    fn add(&mut self, rule: &str, line: u64, msg: String) {
        let key = self
            .rules
            .iter()
            .find(|(_, (r, _, _))| r == rule)
            .map(|(k, _)| *k);
        let key = key.unwrap_or_else(|| {
            self.order += 1;
            self.rules
                .insert(self.order, (rule.to_string(), Vec::new(), 0));
            self.order
        });
        let e = self.rules.get_mut(&key).unwrap();
        e.2 += 1;
        if e.1.len() < SHOW_PER_RULE {
            e.1.push(format!("{}:{line}: {msg}", self.file));
        }
    }
    fn into_result(self) -> Result<()> {
        if self.rules.is_empty() {
            return Ok(());
        }
        let mut out = Vec::new();
        for (_, (rule, shown, count)) in self.rules {
            out.extend(shown.iter().cloned());
            if count > shown.len() {
                out.push(format!(
                    "{}: ... and {} more rows with the same problem ({rule}); {count} in all",
                    self.file,
                    count - shown.len()
                ));
            }
        }
        Err(Error::InputMany(out))
    }
}

/// What the file check found wrong with a row's image.
enum FileProblem {
    Missing,
    /// The bounding box reaches past the image's (width, height).
    BoxOutside(u32, u32),
    Unreadable(String),
}

/// Line numbers of byte offsets in a text, right for LF and CRLF endings and for quoted
/// fields that span lines (the csv crate's own count is one short after a CRLF).
struct LineIndex<'a> {
    text: &'a [u8],
    newlines: Vec<usize>,
}

impl<'a> LineIndex<'a> {
    fn new(text: &'a [u8]) -> Self {
        let newlines = text
            .iter()
            .enumerate()
            .filter(|(_, &b)| b == b'\n')
            .map(|(i, _)| i)
            .collect();
        LineIndex { text, newlines }
    }

    /// The 1-based line of the first character at or after `byte` that is not a line ending
    /// (a record's position may point at the end of the previous line).
    fn line(&self, byte: u64) -> u64 {
        let mut b = byte as usize;
        while b < self.text.len() && matches!(self.text[b], b'\r' | b'\n') {
            b += 1;
        }
        1 + self.newlines.partition_point(|&n| n < b) as u64
    }
}

/// Reads and validates a CSV in OML's format (every rule of OML's
/// `check_retrieval_dataframe_format` and more); all problems are reported together.
pub fn import_csv(csv_path: &Path, opts: &CsvOptions) -> Result<(Dataset, ImportReport)> {
    let bytes = std::fs::read(csv_path).map_err(|e| Error::io(csv_path, e))?;
    let line_of = LineIndex::new(&bytes);
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(false)
        .from_reader(bytes.as_slice());
    let headers = rdr
        .headers()
        .map_err(|e| {
            Error::input(format!(
                "{}:1: cannot read the header: {e}",
                csv_path.display()
            ))
        })?
        .clone();
    let found = headers.iter().collect::<Vec<_>>().join(", ");
    let file_s = csv_path.display().to_string();
    let mut cols: HashMap<String, usize> = HashMap::new();
    for (i, h) in headers.iter().enumerate() {
        if let Some(first) = cols.insert(h.trim().to_string(), i) {
            return Err(Error::input(format!(
                "{file_s}:1: column '{}' appears twice in the header (columns {} and {}); found columns: {found}",
                h.trim(),
                first + 1,
                i + 1
            )));
        }
    }
    let has = |c: &str| cols.contains_key(c);
    // Header-level rules.
    let required: &[&str] = if opts.unlabeled {
        &[]
    } else {
        &["label", "split", "is_query", "is_gallery"]
    };
    let missing: Vec<&str> = required.iter().copied().filter(|c| !has(c)).collect();
    if !missing.is_empty() {
        return Err(Error::input(format!(
            "{file_s}:1: missing column(s) {}: OML's format needs label, split, is_query, is_gallery and path (or text); found columns: {found}",
            missing.join(", ")
        )));
    }
    if !has("path") && !has("text") {
        return Err(Error::input(format!(
            "{file_s}:1: no 'path' column (images) and no 'text' column (texts): one of them is required; found columns: {found}"
        )));
    }
    if has("path") && has("text") {
        return Err(Error::input(format!(
            "{file_s}:1: both a 'path' column (images) and a 'text' column (texts): a dataset is one or the other (OML's rule); drop one of them"
        )));
    }
    let bbox_cols = ["x_1", "x_2", "y_1", "y_2"];
    let present_bbox: Vec<&str> = bbox_cols.iter().copied().filter(|c| has(c)).collect();
    if !present_bbox.is_empty() && present_bbox.len() != 4 {
        let absent: Vec<&str> = bbox_cols.iter().copied().filter(|c| !has(c)).collect();
        return Err(Error::input(format!(
            "{file_s}:1: bounding boxes need all four columns x_1, x_2, y_1, y_2; missing {}",
            absent.join(", ")
        )));
    }
    let col = |rec: &csv::StringRecord, c: &str| -> Option<String> {
        cols.get(c).and_then(|&i| rec.get(i)).map(|s| s.to_string())
    };
    let mut p = Problems::new(csv_path);
    let mut ds = Dataset::default();
    let mut lines: Vec<u64> = Vec::new();
    let mut bad_split = false;
    for (row, rec) in rdr.records().enumerate() {
        let rec = match rec {
            Ok(r) => r,
            Err(e) => {
                let line = e.position().map(|p| line_of.line(p.byte())).unwrap_or(0);
                return Err(Error::input(format!("{file_s}:{line}: malformed CSV: {e}")));
            }
        };
        let line = rec
            .position()
            .map(|p| line_of.line(p.byte()))
            .unwrap_or(row as u64 + 2);
        lines.push(line);
        ds.ids.push(row as i64);
        // label
        let label = if opts.unlabeled {
            None
        } else {
            let v = col(&rec, "label").unwrap_or_default();
            match v.trim().parse::<i64>() {
                Ok(l) => Some(l),
                Err(_) => {
                    p.add(
                        "label",
                        line,
                        format!("column 'label': expected an integer label, found '{v}'"),
                    );
                    None
                }
            }
        };
        ds.label.push(label);
        // split
        let split = if opts.unlabeled {
            if let Some(s) = col(&rec, "split").filter(|s| !is_missing(s)) {
                if s.trim() != "inference" {
                    p.add("split", line, format!("column 'split': an --unlabeled CSV holds only inference rows, found '{s}'"));
                }
            }
            Split::Inference
        } else {
            let s = col(&rec, "split").unwrap_or_default();
            match s.trim() {
                "train" => Split::Train,
                "validation" => Split::Validation,
                other => {
                    p.add(
                        "split",
                        line,
                        format!(
                            "column 'split': expected 'train' or 'validation', found '{other}'"
                        ),
                    );
                    bad_split = true;
                    Split::Train
                }
            }
        };
        ds.split.push(split);
        // is_query / is_gallery (not judged on a row whose split is itself wrong: one error)
        let mut flags = [None, None];
        if !opts.unlabeled && !std::mem::take(&mut bad_split) {
            for (k, name) in ["is_query", "is_gallery"].iter().enumerate() {
                let v = col(&rec, name).unwrap_or_default();
                if split == Split::Train {
                    if !is_missing(&v) {
                        p.add(
                            "flags on train rows",
                            line,
                            format!("column '{name}': must be empty on train rows, found '{v}'"),
                        );
                    }
                } else {
                    match parse_bool(&v) {
                        Some(b) => flags[k] = Some(b),
                        None => p.add(
                            "flags on validation rows",
                            line,
                            format!("column '{name}': expected True/False (or 1/0) on validation rows, found '{v}'"),
                        ),
                    }
                }
            }
            if split == Split::Validation && flags == [Some(false), Some(false)] {
                p.add(
                    "neither query nor gallery",
                    line,
                    "columns 'is_query', 'is_gallery': a validation row must be a query, a gallery item or both; both are False".into(),
                );
            }
        }
        ds.is_query.push(flags[0]);
        ds.is_gallery.push(flags[1]);
        // path / text
        let path = col(&rec, "path").filter(|s| !is_missing(s));
        if has("path") && !has("text") && path.is_none() {
            p.add("path", line, "column 'path': empty".into());
        }
        ds.path.push(path);
        let text = if has("text") {
            let t = col(&rec, "text").unwrap_or_default();
            if t.is_empty() {
                p.add("text", line, "column 'text': empty text".into());
                None
            } else if t.trim().is_empty() {
                // A text model would see no token at all: refused here, where the line is known.
                p.add(
                    "text",
                    line,
                    "column 'text': only whitespace; a text needs at least one word".into(),
                );
                None
            } else {
                Some(t)
            }
        } else {
            None
        };
        ds.text.push(text);
        let opt_str = |c: &str| {
            col(&rec, c)
                .filter(|s| !is_missing(s))
                .map(|s| s.trim().to_string())
        };
        ds.category.push(opt_str("category"));
        ds.sequence.push(opt_str("sequence"));
        // bbox
        let bbox = if present_bbox.len() == 4 {
            let vals: Vec<(String, Option<String>)> = bbox_cols
                .iter()
                .map(|c| (c.to_string(), col(&rec, c).filter(|s| !is_missing(s))))
                .collect();
            let n_set = vals.iter().filter(|(_, v)| v.is_some()).count();
            if n_set == 0 {
                None
            } else if n_set < 4 {
                let empty: Vec<&str> = vals
                    .iter()
                    .filter(|(_, v)| v.is_none())
                    .map(|(c, _)| c.as_str())
                    .collect();
                p.add(
                    "partial bbox",
                    line,
                    format!(
                        "column(s) {}: a bounding box needs all four of x_1, x_2, y_1, y_2 or none",
                        empty.join(", ")
                    ),
                );
                None
            } else {
                let mut b = [0i32; 4];
                let mut ok = true;
                for (k, (c, v)) in vals.iter().enumerate() {
                    let v = v.as_deref().unwrap();
                    match parse_int_like(v) {
                        Some(x) if x < 0 => {
                            p.add(
                                "negative bbox",
                                line,
                                format!("column '{c}': expected a coordinate >= 0, found {x}"),
                            );
                            ok = false;
                        }
                        Some(x) if x > i32::MAX as i64 => {
                            p.add(
                                "bbox range",
                                line,
                                format!("column '{c}': {x} is too large"),
                            );
                            ok = false;
                        }
                        Some(x) => b[k] = x as i32,
                        None => {
                            p.add(
                                "bbox not integer",
                                line,
                                format!("column '{c}': expected an integer pixel coordinate, found '{v}'"),
                            );
                            ok = false;
                        }
                    }
                }
                if ok && b[0] >= b[1] {
                    p.add(
                        "x_1 >= x_2",
                        line,
                        format!(
                            "columns 'x_1', 'x_2': expected x_1 < x_2, found x_1={} x_2={}",
                            b[0], b[1]
                        ),
                    );
                    ok = false;
                }
                if ok && b[2] >= b[3] {
                    p.add(
                        "y_1 >= y_2",
                        line,
                        format!(
                            "columns 'y_1', 'y_2': expected y_1 < y_2, found y_1={} y_2={}",
                            b[2], b[3]
                        ),
                    );
                    ok = false;
                }
                ok.then_some(b)
            }
        } else {
            None
        };
        ds.bbox.push(bbox);
    }
    if ds.is_empty() {
        return Err(Error::input(format!("{file_s}: no data rows")));
    }
    // Query labels must all occur among gallery labels (OML's rule 7).
    if !opts.unlabeled {
        let gallery: BTreeSet<i64> = (0..ds.len())
            .filter(|&i| ds.is_gallery[i] == Some(true))
            .filter_map(|i| ds.label[i])
            .collect();
        for (i, &line) in lines.iter().enumerate() {
            if ds.is_query[i] == Some(true) {
                if let Some(l) = ds.label[i] {
                    if !gallery.contains(&l) {
                        p.add(
                            "query label not in gallery",
                            line,
                            format!("column 'label': query label {l} has no gallery row (is_gallery=True) with the same label"),
                        );
                    }
                }
            }
        }
    }
    // Files must exist.
    let root = match &opts.root {
        Some(r) => absolute(r),
        None => absolute(csv_path.parent().unwrap_or(Path::new("."))),
    };
    if !opts.skip_file_check {
        // Each file must exist, and a box must lie inside its image (read from the header).
        let found: Vec<(usize, FileProblem)> = (0..ds.len())
            .into_par_iter()
            .filter_map(|i| {
                let pth = ds.path[i].as_deref()?;
                let pp = Path::new(pth);
                let full = if pp.is_absolute() {
                    pp.to_path_buf()
                } else {
                    root.join(pp)
                };
                if !full.is_file() {
                    return Some((i, FileProblem::Missing));
                }
                let b = ds.bbox[i]?;
                match image::image_dimensions(&full) {
                    Ok((w, h)) if b[1] as u64 > w as u64 || b[3] as u64 > h as u64 => {
                        Some((i, FileProblem::BoxOutside(w, h)))
                    }
                    Ok(_) => None,
                    Err(e) => Some((i, FileProblem::Unreadable(e.to_string()))),
                }
            })
            .collect();
        for (i, what) in found {
            let name = ds.path[i].as_deref().unwrap_or("");
            match what {
                FileProblem::Missing => p.add(
                    "missing file",
                    lines[i],
                    format!(
                        "column 'path': file '{name}' does not exist under root {}",
                        root.display()
                    ),
                ),
                FileProblem::BoxOutside(w, h) => {
                    let b = ds.bbox[i].unwrap_or_default();
                    p.add(
                        "bbox outside the image",
                        lines[i],
                        format!(
                            "columns 'x_2', 'y_2': the box x_1={} x_2={} y_1={} y_2={} reaches outside '{name}', which is {w} x {h} pixels (x_2 <= width and y_2 <= height)",
                            b[0], b[1], b[2], b[3]
                        ),
                    )
                }
                FileProblem::Unreadable(e) => p.add(
                    "unreadable image",
                    lines[i],
                    format!(
                        "column 'path': '{name}' has a bounding box but its size cannot be read: {e}"
                    ),
                ),
            }
        }
    }
    p.into_result()?;
    // Warnings.
    let mut report = ImportReport::default();
    let mut l2c: HashMap<i64, BTreeSet<&str>> = HashMap::new();
    for i in 0..ds.len() {
        if let (Some(l), Some(c)) = (ds.label[i], ds.category[i].as_deref()) {
            l2c.entry(l).or_default().insert(c);
        }
    }
    let multi = l2c.values().filter(|s| s.len() > 1).count();
    if multi > 0 {
        report.warnings.push(format!(
            "{multi} label(s) map to more than one category: the label-to-category mapping is not a function (category samplers and per-category metrics take one category per label)"
        ));
    }
    // The same picture twice (same path and box) is two rows OML accepts, but rarely meant.
    let mut first_of: HashMap<(&str, Option<[i32; 4]>), usize> = HashMap::new();
    let mut repeats: Vec<usize> = Vec::new();
    for i in 0..ds.len() {
        if let Some(path) = ds.path[i].as_deref() {
            if first_of.insert((path, ds.bbox[i]), i).is_some() {
                repeats.push(i);
            }
        }
    }
    if let Some(&i) = repeats.first() {
        report.warnings.push(format!(
            "{} row(s) repeat the image (path and box) of an earlier row, e.g. line {} ('{}'): the same picture is counted as two samples",
            repeats.len(),
            lines[i],
            ds.path[i].as_deref().unwrap_or("")
        ));
    }
    // Validation queries without a positive: no other gallery row with their label, or only
    // rows of their own sequence (which the exclusion rule takes out).
    let mut val_counts: HashMap<i64, usize> = HashMap::new();
    let mut seq_counts: HashMap<(i64, &str), usize> = HashMap::new();
    for i in 0..ds.len() {
        if ds.split[i] == Split::Validation && ds.is_gallery[i] == Some(true) {
            if let Some(l) = ds.label[i] {
                *val_counts.entry(l).or_default() += 1;
                if let Some(sq) = ds.sequence[i].as_deref() {
                    *seq_counts.entry((l, sq)).or_default() += 1;
                }
            }
        }
    }
    let (mut lone, mut by_sequence) = (0, 0);
    for i in 0..ds.len() {
        if ds.split[i] != Split::Validation || ds.is_query[i] != Some(true) {
            continue;
        }
        let l = ds.label[i].unwrap_or(i64::MIN);
        let all = val_counts.get(&l).copied().unwrap_or(0);
        let self_in_gallery = usize::from(ds.is_gallery[i] == Some(true));
        let excluded = match ds.sequence[i].as_deref() {
            Some(sq) => seq_counts
                .get(&(l, sq))
                .copied()
                .unwrap_or(0)
                .max(self_in_gallery),
            None => self_in_gallery,
        };
        if all <= self_in_gallery {
            lone += 1;
        } else if all <= excluded {
            by_sequence += 1;
        }
    }
    if lone > 0 {
        report.warnings.push(format!(
            "{lone} validation query row(s) have no other gallery row with their label: they have no positive (CMC and MAP score 0 there)"
        ));
    }
    if by_sequence > 0 {
        report.warnings.push(format!(
            "{by_sequence} validation query row(s) have positives only in their own sequence, which the exclusion rule leaves out: they have no positive (CMC and MAP score 0 there)"
        ));
    }
    ds.meta = DatasetMeta {
        root: String::new(),
        source: csv_path.display().to_string(),
        source_kind: if opts.unlabeled {
            "unlabeled-csv"
        } else {
            "csv"
        }
        .into(),
        source_fingerprint: crate::io::Fingerprint::of(csv_path)?.hash,
        modality: if has("path") { "image" } else { "text" }.into(),
        label_names: None,
    };
    ds.root_dir = root;
    Ok((ds, report))
}

// ---------------------------------------------------------------------------------------
// Import from an image folder.

pub const IMAGE_EXTENSIONS: [&str; 7] = ["jpg", "jpeg", "png", "bmp", "webp", "gif", "tif"];

/// Options of the folder importer.
#[derive(Clone, Debug)]
pub struct FolderOptions {
    pub val_fraction: f64,
    pub seed: u64,
}

/// One sub-folder per label; a deterministic split by label so validation labels are unseen
/// in training; validation rows are both query and gallery (1-vs-rest).
pub fn import_folder(images: &Path, opts: &FolderOptions) -> Result<(Dataset, ImportReport)> {
    if !(0.0..=1.0).contains(&opts.val_fraction) {
        return Err(Error::input(format!(
            "--val-fraction {}: expected a number in [0, 1]",
            opts.val_fraction
        )));
    }
    let hidden = |n: &std::ffi::OsStr| n.to_string_lossy().starts_with('.');
    let rd = std::fs::read_dir(images).map_err(|e| Error::io(images, e))?;
    let mut all_dirs: Vec<String> = Vec::new();
    for e in rd {
        let e = e.map_err(|e| Error::io(images, e))?;
        // Hidden folders (.git, .thumbnails, ...) are not labels.
        if e.path().is_dir() && !hidden(&e.file_name()) {
            all_dirs.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    all_dirs.sort();
    let mut report = ImportReport::default();
    let (mut empty, mut zero_byte) = (Vec::new(), 0usize);
    // Labels are numbered over the folders that hold images, so an empty folder shifts no
    // label and `label_names` stays aligned with the labels.
    let mut labelled: Vec<(String, Vec<String>)> = Vec::new();
    for name in all_dirs {
        let dir = images.join(&name);
        let mut files: Vec<String> = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
            let e = e.map_err(|e| Error::io(&dir, e))?;
            let p = e.path();
            let image_ext = p.extension().is_some_and(|x| {
                IMAGE_EXTENSIONS.contains(&x.to_string_lossy().to_lowercase().as_str())
            });
            if !p.is_file() || !image_ext || hidden(&e.file_name()) {
                continue;
            }
            // An empty file is no image (a placeholder, an interrupted copy).
            if std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0) == 0 {
                zero_byte += 1;
                continue;
            }
            files.push(format!("{name}/{}", e.file_name().to_string_lossy()));
        }
        if files.is_empty() {
            empty.push(name);
        } else {
            files.sort();
            labelled.push((name, files));
        }
    }
    let label_dirs: Vec<String> = labelled.iter().map(|(n, _)| n.clone()).collect();
    let rows: Vec<(i64, String)> = labelled
        .into_iter()
        .enumerate()
        .flat_map(|(li, (_, files))| files.into_iter().map(move |f| (li as i64, f)))
        .collect();
    if rows.is_empty() {
        return Err(Error::input(format!(
            "{}: no images found: expected one sub-folder per label holding {} files",
            images.display(),
            IMAGE_EXTENSIONS.join("/")
        )));
    }
    if !empty.is_empty() {
        report.warnings.push(format!(
            "{} label folder(s) hold no images and were left out ({}{})",
            empty.len(),
            empty.iter().take(5).cloned().collect::<Vec<_>>().join(", "),
            if empty.len() > 5 { ", ..." } else { "" }
        ));
    }
    if zero_byte > 0 {
        report.warnings.push(format!(
            "{zero_byte} empty (0-byte) image file(s) were left out"
        ));
    }
    let val_labels = split_labels(label_dirs.len(), opts.val_fraction, opts.seed);
    let mut ds = Dataset::default();
    for (i, (l, f)) in rows.into_iter().enumerate() {
        let val = val_labels.contains(&(l as usize));
        ds.ids.push(i as i64);
        ds.label.push(Some(l));
        ds.path.push(Some(f));
        ds.text.push(None);
        ds.split
            .push(if val { Split::Validation } else { Split::Train });
        ds.is_query.push(val.then_some(true));
        ds.is_gallery.push(val.then_some(true));
        ds.category.push(None);
        ds.sequence.push(None);
        ds.bbox.push(None);
    }
    let src_fp = {
        use xxhash_rust::xxh3::Xxh3;
        let mut h = Xxh3::new();
        for p in &ds.path {
            h.update(p.as_deref().unwrap_or("").as_bytes());
            h.update(b"\n");
        }
        format!("xxh3:{:016x}", h.digest())
    };
    ds.meta = DatasetMeta {
        root: String::new(),
        source: images.display().to_string(),
        source_kind: "folder".into(),
        source_fingerprint: src_fp,
        modality: "image".into(),
        label_names: Some(label_dirs),
    };
    ds.root_dir = absolute(images);
    Ok((ds, report))
}

/// Chooses round(n * fraction) labels for validation by a seeded shuffle that does not
/// depend on any crate's RNG (xxh3 of seed and label index).
pub fn split_labels(n: usize, fraction: f64, seed: u64) -> BTreeSet<usize> {
    let mut order: Vec<(u64, usize)> = (0..n)
        .map(|i| {
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&seed.to_le_bytes());
            b[8..].copy_from_slice(&(i as u64).to_le_bytes());
            (xxhash_rust::xxh3::xxh3_64(&b), i)
        })
        .collect();
    order.sort();
    let k = ((n as f64) * fraction).round() as usize;
    order.into_iter().take(k).map(|(_, i)| i).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_roots() {
        assert_eq!(
            relative_to(Path::new("/a/b/c"), Path::new("/a/b")),
            Some(PathBuf::from("c"))
        );
        assert_eq!(
            relative_to(Path::new("/a/x"), Path::new("/a/b")),
            Some(PathBuf::from("../x"))
        );
        assert_eq!(
            relative_to(Path::new("/a/b"), Path::new("/a/b")),
            Some(PathBuf::new())
        );
    }

    #[test]
    fn label_split_is_seeded_and_sized() {
        let a = split_labels(100, 0.3, 7);
        assert_eq!(a.len(), 30);
        assert_eq!(a, split_labels(100, 0.3, 7));
        assert_ne!(a, split_labels(100, 0.3, 8));
    }

    #[test]
    fn parsers() {
        assert_eq!(parse_int_like("12.0"), Some(12));
        assert_eq!(parse_int_like("12.5"), None);
        assert_eq!(parse_bool("True"), Some(true));
        assert_eq!(parse_bool("0"), Some(false));
        assert_eq!(parse_bool("asd"), None);
        assert!(is_missing(""));
        assert!(is_missing("NaN"));
    }
}
