//! `simile-prepare`: the CSV importer's validation rules, a good round trip, the folder and
//! fonts importers, and the shard/manifest conventions on a toy artifact.
use crate::common;
use crate::common::{check_against_schema, listing, run};
use simile::dataset::{Dataset, Split};
use std::path::Path;

const BIN: &str = env!("CARGO_BIN_EXE_simile-prepare");

/// A folder with `n` small 32 x 24 images named img/0.png .. and a CSV body.
fn fixture(csv: &str, n_images: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("img")).unwrap();
    for i in 0..n_images {
        image::RgbImage::from_pixel(32, 24, image::Rgb([i as u8 * 20, 100, 50]))
            .save(dir.path().join(format!("img/{i}.png")))
            .unwrap();
    }
    std::fs::write(dir.path().join("df.csv"), csv).unwrap();
    dir
}

fn prepare(dir: &Path, extra: &[&str]) -> common::Run {
    let csv = dir.join("df.csv");
    let out = dir.join("dataset.parquet");
    let mut args = vec![
        "csv",
        "--csv",
        csv.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run(BIN, &args)
}

/// Runs a bad CSV: exit 2, every expected fragment in stderr, no output file.
fn expect_bad(csv: &str, n_images: usize, fragments: &[&str]) {
    let dir = fixture(csv, n_images);
    let r = prepare(dir.path(), &[]);
    assert_eq!(r.code, 2, "stderr: {}", r.stderr);
    for f in fragments {
        assert!(r.stderr.contains(f), "expected {f:?} in:\n{}", r.stderr);
    }
    assert!(!dir.path().join("dataset.parquet").exists());
    assert!(
        !listing(dir.path()).iter().any(|f| f.ends_with(".tmp")),
        "temp file left: {:?}",
        listing(dir.path())
    );
}

const HEAD: &str = "label,path,split,is_query,is_gallery\n";

fn good_rows() -> String {
    // Line 2.. : two train labels, two validation labels with 2 samples each.
    "0,img/0.png,train,,\n0,img/1.png,train,,\n1,img/2.png,train,,\n1,img/3.png,train,,\n\
     2,img/4.png,validation,True,True\n2,img/5.png,validation,True,True\n\
     3,img/6.png,validation,True,True\n3,img/7.png,validation,True,True\n"
        .to_string()
}

#[test]
fn good_csv_round_trip_with_bbox_category_sequence() {
    let csv = "label,path,split,is_query,is_gallery,category,sequence,x_1,x_2,y_1,y_2\n\
        0,img/0.png,train,,,shoes,,1,10,2,20\n\
        0,img/1.png,train,,,shoes,s1,,,,\n\
        1,img/2.png,train,,,bags,s1,0,5.0,0,5\n\
        1,img/3.png,train,,,bags,,,,,\n\
        2,img/4.png,validation,True,False,shoes,q7,,,,\n\
        2,img/5.png,validation,False,True,shoes,,3,4,5,6\n\
        3,img/6.png,validation,1,1,bags,,,,,\n\
        3,img/7.png,validation,0,1,bags,,,,,\n";
    let dir = fixture(csv, 8);
    let r = prepare(dir.path(), &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let out = dir.path().join("dataset.parquet");
    check_against_schema(&out, "dataset");
    assert!(dir.path().join("dataset.parquet.manifest.json").exists());
    let ds = Dataset::read(&out).unwrap();
    assert_eq!(ds.ids, (0..8).collect::<Vec<i64>>());
    assert_eq!(ds.label[3], Some(1));
    assert_eq!(ds.split[4], Split::Validation);
    assert_eq!(ds.is_query[4], Some(true));
    assert_eq!(ds.is_gallery[4], Some(false));
    assert_eq!(ds.is_query[6], Some(true));
    assert_eq!(ds.is_query[0], None);
    assert_eq!(ds.bbox[0], Some([1, 10, 2, 20]));
    assert_eq!(ds.bbox[1], None);
    assert_eq!(ds.bbox[2], Some([0, 5, 0, 5]));
    assert_eq!(ds.category[2].as_deref(), Some("bags"));
    assert_eq!(ds.sequence[1].as_deref(), Some("s1"));
    assert_eq!(ds.sequence[0], None);
    // The root is recorded relative to the dataset's folder, so the folder can move.
    assert_eq!(ds.meta.root, ".");
    let moved = tempfile::tempdir().unwrap();
    let dest = moved.path().join("copy");
    std::fs::rename(dir.path(), &dest).unwrap_or_else(|_| {
        copy_dir(dir.path(), &dest);
    });
    let ds2 = Dataset::read(&dest.join("dataset.parquet")).unwrap();
    assert!(ds2.resolve_path(0, None).unwrap().is_file());
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let t = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &t);
        } else {
            std::fs::copy(e.path(), t).unwrap();
        }
    }
}

#[test]
fn missing_required_column() {
    expect_bad(
        "label,path,split,is_query\n0,img/0.png,train,\n",
        1,
        &["df.csv:1", "missing column(s) is_gallery"],
    );
}

#[test]
fn neither_path_nor_text() {
    expect_bad(
        "label,split,is_query,is_gallery\n0,train,,\n",
        0,
        &["df.csv:1", "'path'", "'text'"],
    );
}

#[test]
fn bad_split_value() {
    let csv = format!("{HEAD}{}0,img/0.png,test,,\n", good_rows());
    expect_bad(&csv, 8, &["df.csv:10", "column 'split'", "'test'"]);
}

#[test]
fn flags_on_train_rows() {
    let csv = format!("{HEAD}0,img/0.png,train,1,\n{}", good_rows());
    expect_bad(&csv, 8, &["df.csv:2", "column 'is_query'", "train rows"]);
}

#[test]
fn bad_flags_on_validation_rows() {
    for bad in ["asd", "123", ""] {
        let csv = format!("{HEAD}{}2,img/0.png,validation,{bad},True\n", good_rows());
        expect_bad(&csv, 8, &["df.csv:10", "column 'is_query'", "True/False"]);
    }
}

#[test]
fn validation_row_neither_query_nor_gallery() {
    let csv = format!("{HEAD}{}2,img/0.png,validation,False,False\n", good_rows());
    expect_bad(&csv, 8, &["df.csv:10", "is_gallery", "both are False"]);
}

#[test]
fn non_integer_label() {
    for bad in ["1.5", "abc", ""] {
        let csv = format!("{HEAD}{}{bad},img/0.png,train,,\n", good_rows());
        expect_bad(&csv, 8, &["df.csv:10", "column 'label'", "integer"]);
    }
}

#[test]
fn query_label_not_in_gallery() {
    let csv = format!("{HEAD}{}9,img/0.png,validation,True,False\n", good_rows());
    expect_bad(&csv, 8, &["df.csv:10", "query label 9"]);
}

#[test]
fn missing_files_listed_with_count() {
    let mut csv = String::from(HEAD);
    for i in 0..30 {
        csv.push_str(&format!("{},img/{i}.png,train,,\n", i % 2));
    }
    // Only 5 of 30 images exist: 25 missing, 20 listed and a count.
    let dir = fixture(&csv, 5);
    let r = prepare(dir.path(), &[]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr
            .contains("df.csv:7: column 'path': file 'img/5.png' does not exist"),
        "{}",
        r.stderr
    );
    assert_eq!(
        r.stderr.matches("does not exist").count(),
        20,
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("5 more rows"), "{}", r.stderr);
    assert!(r.stderr.contains("25 in all"), "{}", r.stderr);
    assert!(!dir.path().join("dataset.parquet").exists());
    // --skip-file-check accepts them.
    let r = prepare(dir.path(), &["--skip-file-check"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

#[test]
fn bbox_rules() {
    let head = "label,path,split,is_query,is_gallery,x_1,x_2,y_1,y_2\n";
    let ok = "0,img/0.png,train,,,,,,\n0,img/1.png,train,,,,,,\n";
    expect_bad(
        "label,path,split,is_query,is_gallery,x_1,x_2,y_1\n0,img/0.png,train,,,1,2,3\n",
        1,
        &["df.csv:1", "missing y_2"],
    );
    expect_bad(
        &format!("{head}{ok}0,img/0.png,train,,,1,2,,\n"),
        2,
        &["df.csv:4", "y_1, y_2", "all four"],
    );
    expect_bad(
        &format!("{head}{ok}0,img/0.png,train,,,5,5,0,1\n"),
        2,
        &["df.csv:4", "x_1 < x_2"],
    );
    expect_bad(
        &format!("{head}{ok}0,img/0.png,train,,,0,5,4,1\n"),
        2,
        &["df.csv:4", "y_1 < y_2"],
    );
    expect_bad(
        &format!("{head}{ok}0,img/0.png,train,,,-1,5,0,1\n"),
        2,
        &["df.csv:4", "column 'x_1'", ">= 0"],
    );
    expect_bad(
        &format!("{head}{ok}0,img/0.png,train,,,a,5,0,1\n"),
        2,
        &["df.csv:4", "column 'x_1'", "integer"],
    );
    // All-empty bbox columns are valid (OML's test_all_coords_none).
    let dir = fixture(&format!("{head}{ok}"), 2);
    assert_eq!(prepare(dir.path(), &[]).code, 0);
}

#[test]
fn empty_text() {
    let csv = "label,text,split,is_query,is_gallery\n0,hello,train,,\n0,,train,,\n";
    expect_bad(csv, 0, &["df.csv:3", "column 'text'", "empty"]);
}

#[test]
fn several_problems_reported_together() {
    let csv = format!(
        "{HEAD}{}x,img/0.png,test,,\n2,img/99.png,validation,True,True\n",
        good_rows()
    );
    let dir = fixture(&csv, 8);
    let r = prepare(dir.path(), &[]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("df.csv:10: column 'label'"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("df.csv:10: column 'split'"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("df.csv:11: column 'path'"),
        "{}",
        r.stderr
    );
}

#[test]
fn warnings_for_category_mapping_and_lone_queries() {
    let csv = "label,path,split,is_query,is_gallery,category\n\
        0,img/0.png,train,,,a\n0,img/1.png,train,,,b\n\
        2,img/2.png,validation,True,True,a\n2,img/3.png,validation,True,True,a\n\
        3,img/4.png,validation,True,True,a\n";
    let dir = fixture(csv, 5);
    let r = prepare(dir.path(), &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("1 label(s) map to more than one category"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains("1 validation query row(s) have no other gallery row"),
        "{}",
        r.stderr
    );
}

#[test]
fn unlabeled_inference_set() {
    let dir = fixture("path\nimg/0.png\nimg/1.png\n", 2);
    let r = prepare(dir.path(), &["--unlabeled"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let ds = Dataset::read(&dir.path().join("dataset.parquet")).unwrap();
    assert_eq!(ds.label, vec![None, None]);
    assert_eq!(ds.split, vec![Split::Inference, Split::Inference]);
    assert_eq!(ds.meta.source_kind, "unlabeled-csv");
}

#[test]
fn folder_import_splits_by_label() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    for l in 0..10 {
        let d = images.join(format!("class{l:02}"));
        std::fs::create_dir_all(&d).unwrap();
        for j in 0..3 {
            std::fs::write(d.join(format!("{j}.jpg")), b"x").unwrap();
        }
        std::fs::write(d.join("notes.txt"), b"not an image").unwrap();
    }
    let out = dir.path().join("ds.parquet");
    let r = run(
        BIN,
        &[
            "folder",
            "--images",
            images.to_str().unwrap(),
            "--val-fraction",
            "0.3",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    check_against_schema(&out, "dataset");
    let ds = Dataset::read(&out).unwrap();
    assert_eq!(ds.len(), 30);
    // Sorted by (label, path): ids follow that order.
    assert_eq!(ds.path[0].as_deref(), Some("class00/0.jpg"));
    assert_eq!(ds.path[29].as_deref(), Some("class09/2.jpg"));
    let val = ds.labels_of_split(Split::Validation);
    let train = ds.labels_of_split(Split::Train);
    assert_eq!(val.len(), 3);
    assert!(val.is_disjoint(&train));
    for i in 0..ds.len() {
        let v = ds.split[i] == Split::Validation;
        assert_eq!(ds.is_query[i], v.then_some(true));
        assert_eq!(ds.is_gallery[i], v.then_some(true));
    }
    assert!(ds.resolve_path(5, None).unwrap().is_file());
}

#[test]
fn output_over_input_is_refused() {
    let dir = fixture(&format!("{HEAD}{}", good_rows()), 8);
    let csv = dir.path().join("df.csv");
    let r = run(
        BIN,
        &[
            "csv",
            "--csv",
            csv.to_str().unwrap(),
            "--out",
            csv.to_str().unwrap(),
        ],
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(std::fs::read_to_string(&csv).unwrap().starts_with("label"));
}

#[test]
fn fonts_dataset_is_deterministic() {
    let fonts = Path::new("/usr/share/fonts/truetype/aenigma");
    if !fonts.exists() {
        panic!(
            "fonts-aenigma is not installed: `make test` installs it (scripts/bootstrap-apt.sh)"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fontid");
    let args = ["fonts", "--out", out.to_str().unwrap(), "--max-fonts", "6"];
    let r = run(BIN, &args);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let ds_path = out.join("dataset.parquet");
    check_against_schema(&ds_path, "dataset");
    let ds = Dataset::read(&ds_path).unwrap();
    assert_eq!(ds.len() % 62, 0);
    assert!(ds.len() >= 62 * 5, "{} rows", ds.len());
    assert!(ds.resolve_path(0, None).unwrap().is_file());
    let first = (
        std::fs::read(out.join("df.csv")).unwrap(),
        std::fs::read(&ds_path).unwrap(),
    );
    let r = run(BIN, &args);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let second = (
        std::fs::read(out.join("df.csv")).unwrap(),
        std::fs::read(&ds_path).unwrap(),
    );
    assert!(first == second, "Font-ID is not byte-identical across runs");
    // `info` prints the summary.
    let r = run(BIN, &["info", "--dataset", ds_path.to_str().unwrap()]);
    assert_eq!(r.code, 0);
    assert!(r.stdout.contains("validation"), "{}", r.stdout);
}
