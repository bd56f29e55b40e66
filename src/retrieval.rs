//! Query and gallery sets, and the exclusion rule: written once here, used by the distance
//! stage (which gallery rows a query may retrieve) and by the score stage (which gallery rows
//! count as a query's positives).
//!
//! A query never retrieves itself (same id, within one dataset), nor a gallery row with the
//! same non-null `sequence`. Deliberate difference from OML: OML factorizes sequences with
//! pandas, which maps every missing sequence to one shared code (-1), so rows with no
//! sequence exclude each other there; in simile a missing sequence excludes nothing.
//! [`SequenceRule::OmlMissingShared`] reproduces OML's behaviour for comparison.
use crate::dataset::{Dataset, Split};
use crate::error::{Error, Result};
use std::collections::HashMap;

/// Sequence code of a row without a sequence.
pub const NO_SEQUENCE: u32 = u32::MAX;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SequenceRule {
    /// simile: a missing sequence excludes nothing.
    #[default]
    MissingExcludesNothing,
    /// OML: all rows without a sequence share one sequence and exclude each other.
    OmlMissingShared,
}

/// One side (queries or gallery): rows of a dataset, in id order.
#[derive(Clone, Debug, Default)]
pub struct Side {
    /// Row positions in the dataset.
    pub rows: Vec<usize>,
    pub ids: Vec<i64>,
    pub labels: Vec<Option<i64>>,
    /// Interned sequence codes shared by both sides; [`NO_SEQUENCE`] when missing.
    pub seq: Vec<u32>,
    pub category: Vec<Option<String>>,
}

impl Side {
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// Queries, gallery, and whether they come from one dataset (then self-exclusion applies).
#[derive(Clone, Debug)]
pub struct QueryGallery {
    pub queries: Side,
    pub gallery: Side,
    pub same_dataset: bool,
    pub rule: SequenceRule,
}

struct Interner(HashMap<String, u32>);

impl Interner {
    fn code(&mut self, s: Option<&str>, rule: SequenceRule) -> u32 {
        match (s, rule) {
            (None, SequenceRule::MissingExcludesNothing) => NO_SEQUENCE,
            (None, SequenceRule::OmlMissingShared) => NO_SEQUENCE - 1,
            (Some(s), _) => {
                let n = self.0.len() as u32;
                *self.0.entry(s.to_string()).or_insert(n)
            }
        }
    }
}

fn side(ds: &Dataset, rows: Vec<usize>, it: &mut Interner, rule: SequenceRule) -> Side {
    Side {
        ids: rows.iter().map(|&r| ds.ids[r]).collect(),
        labels: rows.iter().map(|&r| ds.label[r]).collect(),
        seq: rows
            .iter()
            .map(|&r| it.code(ds.sequence[r].as_deref(), rule))
            .collect(),
        category: rows.iter().map(|&r| ds.category[r].clone()).collect(),
        rows,
    }
}

fn side_of_rows(r: crate::dataset::SideRows, it: &mut Interner, rule: SequenceRule) -> Side {
    Side {
        seq: r
            .sequence
            .iter()
            .map(|s| it.code(s.as_deref(), rule))
            .collect(),
        rows: r.rows,
        ids: r.ids,
        labels: r.labels,
        category: r.category,
    }
}

impl QueryGallery {
    /// The sides as read by `dataset::read_sides` (a shard's window of one of them, say):
    /// `same_dataset` when both come from one dataset (then self-exclusion applies).
    pub fn from_sides(
        q: crate::dataset::SideRows,
        g: crate::dataset::SideRows,
        same_dataset: bool,
        rule: SequenceRule,
    ) -> Self {
        let mut it = Interner(HashMap::new());
        QueryGallery {
            queries: side_of_rows(q, &mut it, rule),
            gallery: side_of_rows(g, &mut it, rule),
            same_dataset,
            rule,
        }
    }

    /// Queries are the split's rows with `is_query`, the gallery its rows with `is_gallery`.
    pub fn from_dataset(ds: &Dataset, split: Split, rule: SequenceRule) -> Result<Self> {
        if split == Split::Train {
            return Err(Error::input(format!(
                "{}: split 'train' has no query/gallery flags (they are empty on train rows); use --split validation",
                ds.file.display()
            )));
        }
        let rows = ds.rows_of_split(split);
        let (q, g): (Vec<usize>, Vec<usize>) = if split == Split::Inference {
            // An inference set has no flags: every row is a query and a gallery item.
            (rows.clone(), rows)
        } else {
            (
                rows.iter()
                    .copied()
                    .filter(|&r| ds.is_query[r] == Some(true))
                    .collect(),
                rows.iter()
                    .copied()
                    .filter(|&r| ds.is_gallery[r] == Some(true))
                    .collect(),
            )
        };
        let mut it = Interner(HashMap::new());
        let qg = QueryGallery {
            queries: side(ds, q, &mut it, rule),
            gallery: side(ds, g, &mut it, rule),
            same_dataset: true,
            rule,
        };
        qg.check_nonempty(&ds.file.display().to_string(), split.as_str())?;
        Ok(qg)
    }

    /// Two datasets: every row of `split` (or all rows) of each; no self-exclusion.
    pub fn two_sided(
        q: &Dataset,
        q_split: Option<Split>,
        g: &Dataset,
        g_split: Option<Split>,
        rule: SequenceRule,
    ) -> Result<Self> {
        let pick = |ds: &Dataset, s: Option<Split>| -> Vec<usize> {
            match s {
                Some(s) => ds.rows_of_split(s),
                None => (0..ds.len()).collect(),
            }
        };
        let mut it = Interner(HashMap::new());
        let qg = QueryGallery {
            queries: side(q, pick(q, q_split), &mut it, rule),
            gallery: side(g, pick(g, g_split), &mut it, rule),
            same_dataset: false,
            rule,
        };
        if qg.queries.is_empty() {
            return Err(Error::input(format!(
                "{}: no query rows{}",
                q.file.display(),
                q_split
                    .map(|s| format!(" in split '{s}'"))
                    .unwrap_or_default()
            )));
        }
        if qg.gallery.is_empty() {
            return Err(Error::input(format!(
                "{}: no gallery rows{}",
                g.file.display(),
                g_split
                    .map(|s| format!(" in split '{s}'"))
                    .unwrap_or_default()
            )));
        }
        Ok(qg)
    }

    fn check_nonempty(&self, file: &str, split: &str) -> Result<()> {
        if self.queries.is_empty() {
            return Err(Error::input(format!(
                "{file}: split '{split}' has no query rows (is_query=True)"
            )));
        }
        if self.gallery.is_empty() {
            return Err(Error::input(format!(
                "{file}: split '{split}' has no gallery rows (is_gallery=True)"
            )));
        }
        Ok(())
    }

    /// Whether gallery position `g` is excluded for query position `q`: the query itself
    /// (same id, one dataset) or the same non-null sequence.
    #[inline]
    pub fn is_excluded(&self, q: usize, g: usize) -> bool {
        (self.same_dataset && self.queries.ids[q] == self.gallery.ids[g])
            || (self.queries.seq[q] != NO_SEQUENCE && self.queries.seq[q] == self.gallery.seq[g])
    }

    /// Whether gallery position `g` is a positive of query `q`: same (non-null) label and
    /// not excluded. Counted over the whole gallery.
    #[inline]
    pub fn is_positive(&self, q: usize, g: usize) -> bool {
        match (self.queries.labels[q], self.gallery.labels[g]) {
            (Some(a), Some(b)) => a == b && !self.is_excluded(q, g),
            _ => false,
        }
    }

    /// How many gallery items each query may retrieve: the gallery less the items the
    /// exclusion rule takes out (itself, its sequence). A query with none has an empty list.
    pub fn candidate_counts(&self) -> Vec<usize> {
        let mut per_seq: HashMap<_, usize> = HashMap::new();
        for &s in &self.gallery.seq {
            if s != NO_SEQUENCE {
                *per_seq.entry(s).or_default() += 1;
            }
        }
        (0..self.queries.len())
            .map(|q| {
                let seq = self.queries.seq[q];
                let mut excluded = if seq != NO_SEQUENCE {
                    per_seq.get(&seq).copied().unwrap_or(0)
                } else {
                    0
                };
                if self.same_dataset {
                    if let Some(g) = self.gallery_pos(self.queries.ids[q]) {
                        if seq == NO_SEQUENCE || self.gallery.seq[g] != seq {
                            excluded += 1;
                        }
                    }
                }
                self.gallery.len() - excluded
            })
            .collect()
    }

    /// Gallery positions by label, for fast ground truth.
    pub fn gallery_by_label(&self) -> HashMap<i64, Vec<usize>> {
        let mut m: HashMap<i64, Vec<usize>> = HashMap::new();
        for (g, l) in self.gallery.labels.iter().enumerate() {
            if let Some(l) = l {
                m.entry(*l).or_default().push(g);
            }
        }
        m
    }

    /// Number of positives of every query over the whole gallery.
    pub fn positive_counts(&self) -> Vec<usize> {
        let by = self.gallery_by_label();
        (0..self.queries.len())
            .map(|q| match self.queries.labels[q].and_then(|l| by.get(&l)) {
                Some(gs) => gs.iter().filter(|&&g| !self.is_excluded(q, g)).count(),
                None => 0,
            })
            .collect()
    }

    /// The dataset rows either side needs, each once and sorted (what an embedding pass
    /// computes), and every query's and gallery item's position among them: a split's queries
    /// and gallery overlap, so embedding the union once serves both.
    pub fn union_rows(&self) -> (Vec<usize>, Vec<usize>, Vec<usize>) {
        let mut rows: Vec<usize> = self
            .queries
            .rows
            .iter()
            .chain(&self.gallery.rows)
            .copied()
            .collect();
        rows.sort_unstable();
        rows.dedup();
        let pos = |r: &usize| rows.binary_search(r).unwrap_or(0);
        let q_map = self.queries.rows.iter().map(pos).collect();
        let g_map = self.gallery.rows.iter().map(pos).collect();
        (rows, q_map, g_map)
    }

    /// Gallery position of a gallery id (ids are sorted within a side).
    pub fn gallery_pos(&self, id: i64) -> Option<usize> {
        self.gallery.ids.binary_search(&id).ok()
    }

    pub fn query_pos(&self, id: i64) -> Option<usize> {
        self.queries.ids.binary_search(&id).ok()
    }
}
