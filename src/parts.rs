//! Sets of shard parts (`shard` names them): every consumer refuses an unmerged part as an
//! input; `merge` subcommands join a set after checking for gaps, duplicates and parts made
//! from different inputs or parameters, each against its own manifest.
use crate::error::{Error, Result};
use crate::manifest::{self, Manifest};
use crate::shard::part_of_name;
use std::path::{Path, PathBuf};

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
    if items.len() != n {
        // Indices are sorted and distinct, so walk them for the first few gaps (the count
        // comes from a manifest and may be huge: never list all of 0..n).
        let mut missing: Vec<String> = Vec::new();
        let mut next = 0usize;
        for (s, _, _) in &items {
            while next < s.index && missing.len() < 10 {
                missing.push(next.to_string());
                next += 1;
            }
            next = s.index + 1;
        }
        while next < n && missing.len() < 10 {
            missing.push(next.to_string());
            next += 1;
        }
        return Err(Error::input(format!(
            "missing part(s) {}{} of {n} ({} of {n} present): run those shards before merging",
            missing.join(", "),
            if n - items.len() > missing.len() {
                ", ..."
            } else {
                ""
            },
            items.len()
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
    fn a_part_is_refused_as_an_input() {
        assert!(refuse_part(Path::new("emb.part-0-of-2.npy")).is_err());
        assert!(refuse_part(Path::new("nn.qpart-1-of-4.parquet")).is_err());
    }
}
