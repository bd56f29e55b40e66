//! docs/architecture.md names every file under src/: a new module without a line there fails.
use std::path::Path;

fn rs_files(dir: &Path, out: &mut Vec<String>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p.to_string_lossy().replace('\\', "/"));
        }
    }
}

#[test]
fn the_module_table_names_every_source_file() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("docs/architecture.md")).unwrap();
    let mut files = Vec::new();
    rs_files(&root.join("src"), &mut files);
    assert!(files.len() > 50, "{files:?}");
    // A table cell names a file by its path (`src/knn/search.rs`) or, after the first file
    // of its folder in the same cell, by its name alone (`arcface.rs`).
    let missing: Vec<String> = files
        .iter()
        .map(|f| f[f.find("src/").unwrap()..].to_string())
        .filter(|rel| {
            let name = rel.rsplit('/').next().unwrap();
            let folder = &rel[..rel.len() - name.len()];
            !doc.contains(&format!("`{rel}`"))
                && !doc.lines().any(|l| {
                    l.starts_with("| `") && l.contains(folder) && l.contains(&format!("`{name}`"))
                })
        })
        .collect();
    assert!(
        missing.is_empty(),
        "docs/architecture.md does not name {missing:?}"
    );
}
