//! Shards: `--shard i/n` (0-based) computes a contiguous range of rows in id order; parts
//! are named `<stem>.part-<i>-of-<n>.<ext>`, each with its own manifest; `merge` joins them
//! after checking for gaps, duplicates and parts made from different inputs; every consumer
//! refuses an unmerged part.
use crate::error::{Error, Result};
use crate::manifest::{self, Manifest};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShardSpec {
    pub index: usize,
    pub count: usize,
}

impl std::str::FromStr for ShardSpec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("'{s}': expected i/n with 0 <= i < n, e.g. 0/4");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let index: usize = i.trim().parse().map_err(|_| bad())?;
        let count: usize = n.trim().parse().map_err(|_| bad())?;
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(ShardSpec { index, count })
    }
}

impl std::fmt::Display for ShardSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl ShardSpec {
    /// The half-open range of positions `[start, end)` this shard covers among `n` items.
    pub fn range(&self, n: usize) -> (usize, usize) {
        let start = n * self.index / self.count;
        let end = n * (self.index + 1) / self.count;
        (start, end)
    }

    /// `dir/emb.npy` -> `dir/emb.part-1-of-4.npy`; `a/b.ids.npy` keeps `.ids.npy` as extension.
    pub fn part_path(&self, out: &Path) -> PathBuf {
        let (stem, ext) = split_name(out);
        out.with_file_name(format!("{stem}.part-{}-of-{}{ext}", self.index, self.count))
    }
}

/// Splits a file name into a stem and an extension that keeps compound suffixes
/// (`.ids.npy`, `.manifest.json`) together with the last one.
fn split_name(p: &Path) -> (String, String) {
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match name.find('.') {
        Some(i) if i > 0 => (name[..i].to_string(), name[i..].to_string()),
        _ => (name, String::new()),
    }
}

/// If `path` is named like a shard part, the (index, count) in its name.
pub fn part_of_name(path: &Path) -> Option<(usize, usize)> {
    let name = path.file_name()?.to_string_lossy().into_owned();
    let i = name.find(".part-")?;
    let rest = &name[i + 6..];
    let (a, rest) = rest.split_once("-of-")?;
    let b: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Every consumer calls this on its inputs: an unmerged part is refused, and so is a file that
/// does not match its manifest (`manifest::verify`).
pub fn refuse_part(path: &Path) -> Result<()> {
    let by_manifest = manifest::verify(path)?.and_then(|m| m.shard.map(|s| (s.index, s.count)));
    if let Some((i, n)) = part_of_name(path).or(by_manifest) {
        return Err(Error::input(format!(
            "{} is shard part {i} of {n}, not a complete result; join the parts first with the stage's `merge` subcommand",
            path.display()
        )));
    }
    Ok(())
}

/// A validated, ordered set of parts of one artifact.
pub struct Parts {
    pub paths: Vec<PathBuf>,
    pub manifests: Vec<Manifest>,
    pub count: usize,
}

impl Parts {
    /// The inputs of the whole run: the parts' shared inputs, and each list of files (the
    /// images) summed over the parts, as the unsharded run records them.
    pub fn merged_inputs(&self) -> std::collections::BTreeMap<String, manifest::InputRecord> {
        let mut inputs = self.manifests[0].inputs.clone();
        for (role, rec) in inputs.iter_mut() {
            if let Some(fp) = crate::io::Fingerprint::sum(
                self.manifests
                    .iter()
                    .filter_map(|m| m.inputs.get(role).map(|r| &r.fingerprint)),
            ) {
                rec.fingerprint = fp;
                rec.path = format!("{} (all parts)", rec.path);
            }
        }
        inputs
    }
}

/// Finds the parts of `out` (`<stem>.part-*-of-*<ext>` beside it) when `given` is empty.
pub fn discover(out: &Path, given: &[PathBuf]) -> Result<Vec<PathBuf>> {
    if !given.is_empty() {
        return Ok(given.to_vec());
    }
    let (stem, ext) = split_name(out);
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let prefix = format!("{stem}.part-");
    let mut found = Vec::new();
    for e in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
        let e = e.map_err(|e| Error::io(&dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(&prefix) && name.ends_with(&ext) {
            let p = e.path();
            if let Some((i, n)) = part_of_name(&p) {
                if name == format!("{stem}.part-{i}-of-{n}{ext}") {
                    found.push(p);
                }
            }
        }
    }
    if found.is_empty() {
        return Err(Error::input(format!(
            "no parts of {} found in {} (expected files named {stem}.part-<i>-of-<n>{ext})",
            out.display(),
            dir.display()
        )));
    }
    found.sort();
    Ok(found)
}

/// Checks that `paths` are exactly the parts 0..n-1 of one sharded run: same n, no gap, no
/// duplicate, each with a manifest, all made from the same inputs and parameters, and with
/// ranges that tile the whole without overlap.
pub fn validate(paths: &[PathBuf]) -> Result<Parts> {
    let mut items = Vec::new();
    for p in paths {
        let m = manifest::verify(p)?.ok_or_else(|| {
            Error::input(format!(
                "{}: no manifest describing this part ({} missing or stale); re-run that shard",
                p.display(),
                manifest::manifest_path(p).display()
            ))
        })?;
        let s = m.shard.clone().ok_or_else(|| {
            Error::input(format!(
                "{}: its manifest says it is a complete result, not a shard part",
                p.display()
            ))
        })?;
        items.push((s, p.clone(), m));
    }
    if items.is_empty() {
        return Err(Error::input("no parts given to merge"));
    }
    let n = items[0].0.count;
    if let Some((s, p, _)) = items.iter().find(|(s, _, _)| s.count != n) {
        return Err(Error::input(format!(
            "{} is part {} of {}, but {} is part {} of {n}: parts of different shardings",
            p.display(),
            s.index,
            s.count,
            items[0].1.display(),
            items[0].0.index
        )));
    }
    items.sort_by_key(|(s, _, _)| s.index);
    for w in items.windows(2) {
        if w[0].0.index == w[1].0.index {
            return Err(Error::input(format!(
                "duplicate part {}: {} and {}",
                w[0].0.index,
                w[0].1.display(),
                w[1].1.display()
            )));
        }
    }
    let have: Vec<usize> = items.iter().map(|(s, _, _)| s.index).collect();
    let missing: Vec<String> = (0..n)
        .filter(|i| !have.contains(i))
        .map(|i| i.to_string())
        .collect();
    if !missing.is_empty() {
        return Err(Error::input(format!(
            "missing part(s) {} of {n}: run those shards before merging",
            missing.join(", ")
        )));
    }
    let first = &items[0].2;
    for (s, p, m) in &items[1..] {
        // A part's list of files (its images) is its own; every other input is shared.
        let same_inputs = m.inputs.len() == first.inputs.len()
            && m.inputs.iter().all(|(role, rec)| {
                first.inputs.get(role).is_some_and(|r| {
                    (r.fingerprint.is_sum() && rec.fingerprint.is_sum())
                        || r.fingerprint.same_content(&rec.fingerprint)
                })
            });
        if !same_inputs || m.params != first.params || m.stage != first.stage {
            return Err(Error::input(format!(
                "{} (part {}) was made from different inputs or parameters than {} (part 0); re-run all parts from the same inputs",
                p.display(),
                s.index,
                items[0].1.display()
            )));
        }
    }
    for w in items.windows(2) {
        if w[0].0.end != w[1].0.start {
            return Err(Error::input(format!(
                "parts {} and {} do not tile: ranges [{}, {}) and [{}, {})",
                w[0].0.index, w[1].0.index, w[0].0.start, w[0].0.end, w[1].0.start, w[1].0.end
            )));
        }
    }
    Ok(Parts {
        paths: items.iter().map(|(_, p, _)| p.clone()).collect(),
        manifests: items.into_iter().map(|(_, _, m)| m).collect(),
        count: n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_ranges() {
        let s: ShardSpec = "1/3".parse().unwrap();
        assert_eq!(s, ShardSpec { index: 1, count: 3 });
        assert!("3/3".parse::<ShardSpec>().is_err());
        assert!("0/0".parse::<ShardSpec>().is_err());
        assert!("a/2".parse::<ShardSpec>().is_err());
        // Ranges tile 0..n for every n, with no gap or overlap.
        for n in [0usize, 1, 2, 7, 100] {
            for count in 1..6 {
                let mut next = 0;
                for index in 0..count {
                    let (a, b) = ShardSpec { index, count }.range(n);
                    assert_eq!(a, next);
                    next = b;
                }
                assert_eq!(next, n);
            }
        }
    }

    #[test]
    fn part_names() {
        let s = ShardSpec { index: 2, count: 5 };
        assert_eq!(
            s.part_path(Path::new("out/emb.npy")),
            PathBuf::from("out/emb.part-2-of-5.npy")
        );
        assert_eq!(
            s.part_path(Path::new("neighbors.parquet")),
            PathBuf::from("neighbors.part-2-of-5.parquet")
        );
        assert_eq!(
            part_of_name(Path::new("x/emb.part-2-of-5.npy")),
            Some((2, 5))
        );
        assert_eq!(part_of_name(Path::new("emb.npy")), None);
        assert!(refuse_part(Path::new("emb.part-0-of-2.npy")).is_err());
    }
}
