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
        let start = n * self.index / self.count;
        let end = n * (self.index + 1) / self.count;
        (start, end)
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

/// Every consumer calls this on its inputs: an unmerged part is refused, and so is a file that
/// does not match its manifest (`manifest::verify`).
pub fn refuse_part(path: &Path) -> Result<()> {
    refuse_part_ranges(path, &[])
}

/// [`refuse_part`] for a reader of byte ranges of the file (see `manifest::verify_part`).
pub fn refuse_part_ranges(path: &Path, ranges: &manifest::Ranges) -> Result<()> {
    let by_manifest =
        manifest::verify_part(path, ranges)?.and_then(|m| m.shard.map(|s| (s.index, s.count)));
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
    pub fn merged_inputs(
        &self,
    ) -> Result<std::collections::BTreeMap<String, manifest::InputRecord>> {
        use crate::io::Fingerprint;
        let mut inputs = self.manifests[0].inputs.clone();
        for (role, rec) in inputs.iter_mut() {
            let recs: Vec<&manifest::InputRecord> = self
                .manifests
                .iter()
                .filter_map(|m| m.inputs.get(role))
                .collect();
            let fps = || recs.iter().map(|r| &r.fingerprint);
            if let Some(fp) = Fingerprint::sum(fps()) {
                rec.fingerprint = fp;
                rec.path = format!("{} (all parts)", rec.path);
            } else if fps().any(Fingerprint::is_range) {
                // The parts' ranges of one file join into the whole file's fingerprint.
                let whole = |fps: Vec<&Fingerprint>, what: &str| {
                    Fingerprint::combine(fps).ok_or_else(|| {
                        Error::input(format!(
                            "the parts read different contents of {what} (or not all of it): re-run all parts from the same inputs"
                        ))
                    })
                };
                rec.fingerprint = whole(fps().collect(), &rec.path)?;
                for (name, c) in rec.companions.iter_mut() {
                    *c = whole(
                        recs.iter().filter_map(|r| r.companions.get(name)).collect(),
                        name,
                    )?;
                }
            }
        }
        Ok(inputs)
    }
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
        // A part's list of files (its images) and its range of a large file (a gallery
        // shard's rows) are its own; every other input is shared.
        let same_inputs = m.inputs.len() == first.inputs.len()
            && m.inputs.iter().all(|(role, rec)| {
                first.inputs.get(role).is_some_and(|r| {
                    let (a, b) = (&r.fingerprint, &rec.fingerprint);
                    (a.is_sum() && b.is_sum())
                        || ((a.is_range() || b.is_range()) && a.size == b.size)
                        || a.same_content(b)
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
        assert!(refuse_part(Path::new("emb.part-0-of-2.npy")).is_err());
    }
}
