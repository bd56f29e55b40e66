//! Shards: `--shard i/n` (0-based) computes a contiguous range of rows in id order; parts
//! are named `<stem>.part-<i>-of-<n>.<ext>`, each with its own manifest. This module is the
//! names and ranges (which need no manifest); `parts` checks and merges sets of parts and
//! refuses an unmerged part as an input.
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShardSpec {
    pub index: usize,
    pub count: usize,
}

/// The environment variable `--shard auto/N` takes the index from: a Kubernetes Indexed Job
/// sets it in each pod (0..completions-1).
pub const INDEX_ENV: &str = "JOB_COMPLETION_INDEX";

impl std::str::FromStr for ShardSpec {
    type Err = String;
    /// `i/n`, or `auto/n`: the index from `JOB_COMPLETION_INDEX` (a Kubernetes Indexed Job).
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("'{s}': expected i/n with 0 <= i < n (e.g. 0/4), or auto/n");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let count: usize = n.trim().parse().map_err(|_| bad())?;
        let index: usize = if i.trim() == "auto" {
            let v = std::env::var(INDEX_ENV).map_err(|_| {
                format!("'{s}': auto takes the shard index from {INDEX_ENV}, which is not set (a Kubernetes Indexed Job sets it)")
            })?;
            let index = v.trim().parse().map_err(|_| {
                format!("'{s}': {INDEX_ENV}={v:?} is not a shard index (0, 1, ...)")
            })?;
            if count > 0 && index >= count {
                return Err(format!(
                    "'{s}': {INDEX_ENV}={index} is not below the shard count {count} (the Job's completions must equal n)"
                ));
            }
            index
        } else {
            i.trim().parse().map_err(|_| bad())?
        };
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
        // In u128: n * index overflows a usize for large shard counts (a flag).
        let at = |i: usize| (n as u128 * i as u128 / self.count as u128) as usize;
        (at(self.index), at(self.index + 1))
    }

    /// `dir/emb.npy` -> `dir/emb.part-1-of-4.npy`; `a/b.ids.npy` keeps `.ids.npy` as extension.
    pub fn part_path(&self, out: &Path) -> PathBuf {
        self.path_with(out, PART)
    }

    /// `dir/nn.parquet` -> `dir/nn.qpart-1-of-4.parquet`: a query range of the merged gallery
    /// parts of `out` (`simile-distance merge --query-shard`), joined by
    /// `merge --query-parts`.
    pub fn qpart_path(&self, out: &Path) -> PathBuf {
        self.path_with(out, QPART)
    }

    fn path_with(&self, out: &Path, infix: &str) -> PathBuf {
        let (stem, ext) = split_name(out);
        out.with_file_name(format!(
            "{stem}.{infix}-{}-of-{}{ext}",
            self.index, self.count
        ))
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

/// The infixes of part names: a shard's part, a query range of merged gallery parts.
pub const PART: &str = "part";
pub const QPART: &str = "qpart";

/// If `path` is named like a shard part (or a query range of merged parts), the (index,
/// count) in its name.
pub fn part_of_name(path: &Path) -> Option<(usize, usize)> {
    let name = path.file_name()?.to_string_lossy().into_owned();
    let (i, len) = [".part-", ".qpart-"]
        .iter()
        .find_map(|m| name.find(m).map(|i| (i, m.len())))?;
    let rest = &name[i + len..];
    let (a, rest) = rest.split_once("-of-")?;
    let b: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Finds the parts of `out` (`<stem>.part-*-of-*<ext>` beside it) when `given` is empty.
pub fn discover(out: &Path, given: &[PathBuf]) -> Result<Vec<PathBuf>> {
    discover_named(out, given, PART)
}

/// [`discover`] for parts named with `infix` ([`PART`] or [`QPART`]).
pub fn discover_named(out: &Path, given: &[PathBuf], infix: &str) -> Result<Vec<PathBuf>> {
    if !given.is_empty() {
        return Ok(given.to_vec());
    }
    let (stem, ext) = split_name(out);
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let prefix = format!("{stem}.{infix}-");
    let mut found = Vec::new();
    for e in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
        let e = e.map_err(|e| Error::io(&dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(&prefix) && name.ends_with(&ext) {
            let p = e.path();
            if let Some((i, n)) = part_of_name(&p) {
                if name == format!("{stem}.{infix}-{i}-of-{n}{ext}") {
                    found.push(p);
                }
            }
        }
    }
    if found.is_empty() {
        return Err(Error::input(format!(
            "no parts of {} found in {} (expected files named {stem}.{infix}-<i>-of-<n>{ext})",
            out.display(),
            dir.display()
        )));
    }
    found.sort();
    Ok(found)
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
        // auto/n: the index of a Kubernetes Indexed Job's pod.
        std::env::set_var(INDEX_ENV, "2");
        assert_eq!(
            "auto/4".parse::<ShardSpec>().unwrap(),
            ShardSpec { index: 2, count: 4 }
        );
        assert!("auto/2"
            .parse::<ShardSpec>()
            .unwrap_err()
            .contains("not below the shard count 2"));
        std::env::set_var(INDEX_ENV, "x");
        assert!("auto/4"
            .parse::<ShardSpec>()
            .unwrap_err()
            .contains("not a shard index"));
        std::env::remove_var(INDEX_ENV);
        assert!("auto/4"
            .parse::<ShardSpec>()
            .unwrap_err()
            .contains("not set"));
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
    }
}
