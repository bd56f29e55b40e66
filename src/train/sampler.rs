//! Batch samplers for training: which dataset rows go into each batch of an epoch.
//!
//! The semantics are OML's (`oml/samplers/*.py`, see `docs/training.md`); the randomness is
//! simile's own: every draw comes from a caller-supplied ChaCha8 generator through the few
//! primitives in [`rng`], so an epoch is a pure function of (sampler, labels, RNG state) and
//! does not depend on any global state or on the version of a random-number crate.
//!
//! Indices returned by [`BatchSampler::epoch`] are positions in the `labels` slice the
//! sampler was built from (the trainer maps them to dataset rows).
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

use rand_chacha::rand_core::{RngCore, SeedableRng};
pub use rand_chacha::ChaCha8Rng as Rng;

/// The random primitives every sampler and miner uses. Written here (not taken from `rand`)
/// so that their output for a given generator state never changes with a dependency bump.
pub mod rng {
    use super::{Rng, RngCore, SeedableRng};
    use serde::{Deserialize, Serialize};

    /// A generator for `(seed, stream)`: e.g. stream = epoch for the sampler and
    /// stream = global step for a miner, so a resumed run needs nothing but the seed.
    pub fn seeded(seed: u64, stream: u64) -> Rng {
        let mut r = Rng::seed_from_u64(seed);
        r.set_stream(stream);
        r
    }

    /// A uniform integer in `0..n` (Lemire's multiply-and-reject, unbiased). `n > 0`.
    pub fn below(rng: &mut Rng, n: usize) -> usize {
        assert!(n > 0, "rng::below(0)");
        let n = n as u64;
        let mut m = (rng.next_u64() as u128) * (n as u128);
        if (m as u64) < n {
            let t = n.wrapping_neg() % n;
            while (m as u64) < t {
                m = (rng.next_u64() as u128) * (n as u128);
            }
        }
        (m >> 64) as usize
    }

    /// A uniform float in `[0, 1)` with 53 random bits.
    pub fn unit(rng: &mut Rng) -> f64 {
        (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Fisher-Yates shuffle in place.
    pub fn shuffle<T>(rng: &mut Rng, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = below(rng, i + 1);
            v.swap(i, j);
        }
    }

    /// `k` distinct positions of `0..n` in random order (partial Fisher-Yates). `k <= n`.
    pub fn choose_positions(rng: &mut Rng, n: usize, k: usize) -> Vec<usize> {
        assert!(k <= n);
        let mut idx: Vec<usize> = (0..n).collect();
        for i in 0..k {
            let j = i + below(rng, n - i);
            idx.swap(i, j);
        }
        idx.truncate(k);
        idx
    }

    /// `k` distinct items of `items` (without replacement), in random order. `k <= len`.
    pub fn choose<T: Copy>(rng: &mut Rng, items: &[T], k: usize) -> Vec<T> {
        choose_positions(rng, items.len(), k)
            .into_iter()
            .map(|i| items[i])
            .collect()
    }

    /// OML's `smart_sample(array, k)`: `k` items without replacement when there are enough;
    /// otherwise a random permutation of all of them followed by `k - len` draws with
    /// replacement. `items` must not be empty when `k > 0`.
    pub fn smart_sample<T: Copy>(rng: &mut Rng, items: &[T], k: usize) -> Vec<T> {
        if items.len() >= k {
            return choose(rng, items, k);
        }
        let mut out = items.to_vec();
        shuffle(rng, &mut out);
        for _ in items.len()..k {
            out.push(items[below(rng, items.len())]);
        }
        out
    }

    /// `k` distinct positions drawn one after another with probability proportional to
    /// `weights` among those not drawn yet (numpy's `choice(p=w, replace=False)`).
    /// Every weight must be > 0 and `k <= weights.len()`.
    pub fn choose_weighted(rng: &mut Rng, weights: &[f64], k: usize) -> Vec<usize> {
        assert!(k <= weights.len());
        let mut left: Vec<usize> = (0..weights.len()).collect();
        let mut out = Vec::with_capacity(k);
        for _ in 0..k {
            let total: f64 = left.iter().map(|&i| weights[i]).sum();
            let mut u = unit(rng) * total;
            let mut pick = left.len() - 1;
            for (pos, &i) in left.iter().enumerate() {
                if u < weights[i] {
                    pick = pos;
                    break;
                }
                u -= weights[i];
            }
            out.push(left.remove(pick));
        }
        out
    }

    /// A ChaCha8 generator's complete state as JSON-friendly values, for checkpoints.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct RngState {
        /// The 32-byte key, hex.
        pub seed: String,
        pub stream: u64,
        /// Position in the output stream in 32-bit words (a u128, written as a decimal string).
        pub word_pos: String,
    }

    impl RngState {
        pub fn of(rng: &Rng) -> RngState {
            RngState {
                seed: rng.get_seed().iter().map(|b| format!("{b:02x}")).collect(),
                stream: rng.get_stream(),
                word_pos: rng.get_word_pos().to_string(),
            }
        }

        pub fn restore(&self) -> crate::Result<Rng> {
            let bad = || crate::Error::input(format!("bad RNG state in checkpoint: {self:?}"));
            if self.seed.len() != 64 {
                return Err(bad());
            }
            let mut seed = [0u8; 32];
            for (i, b) in seed.iter_mut().enumerate() {
                *b = u8::from_str_radix(&self.seed[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
            }
            let pos: u128 = self.word_pos.parse().map_err(|_| bad())?;
            let mut r = Rng::from_seed(seed);
            r.set_stream(self.stream);
            r.set_word_pos(pos);
            Ok(r)
        }
    }
}

/// A source of batches: one call to [`epoch`](BatchSampler::epoch) gives all batches of an epoch.
pub trait BatchSampler: Send {
    /// Batches per epoch.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Rows per batch (the last batch of a plain shuffled epoch without `drop_last` may be shorter).
    fn batch_size(&self) -> usize;
    /// The batches of one epoch, each a list of positions in the labels the sampler was built on.
    fn epoch(&mut self, rng: &mut Rng) -> Vec<Vec<usize>>;
    /// The sampler's state for a checkpoint: its configuration and a fingerprint of the labels
    /// it was built on. (Samplers keep no state between epochs; the randomness is the caller's
    /// generator, see [`rng::RngState`] and [`rng::seeded`].)
    fn state(&self) -> serde_json::Value;
    /// Checks that a checkpoint's sampler state is this sampler's (same configuration, same
    /// labels), so a resumed run draws the same batches.
    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        let mine = self.state();
        if &mine == state {
            Ok(())
        } else {
            Err(Error::input(format!(
                "the checkpoint was written with another sampler or training split: it has {state}, this run has {mine}"
            )))
        }
    }
}

/// The `[sampler]` table of a training config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, strum::IntoStaticStr)]
#[serde(tag = "name", rename_all = "snake_case", deny_unknown_fields)]
#[strum(serialize_all = "snake_case")]
pub enum SamplerConfig {
    /// OML `balance`: `n_labels` labels x `n_instances` instances per batch.
    Balance { n_labels: usize, n_instances: usize },
    /// OML `category_balance`.
    CategoryBalance {
        n_categories: usize,
        n_labels: usize,
        n_instances: usize,
        #[serde(default)]
        resample_labels: bool,
        #[serde(default = "yes")]
        weight_categories: bool,
    },
    /// OML `distinct_category_balance`.
    DistinctCategoryBalance {
        n_categories: usize,
        n_labels: usize,
        n_instances: usize,
        epoch_size: usize,
    },
    /// Plain shuffled batches (OML's `sampler: null` with `bs_train`).
    Shuffle {
        batch_size: usize,
        #[serde(default = "yes")]
        drop_last: bool,
    },
}

/// The largest batch and epoch a sampler builds (their buffers are allocated up front).
pub const MAX_BATCH: usize = 1 << 20;
pub const MAX_EPOCH_BATCHES: usize = 1 << 24;

impl SamplerConfig {
    /// Refuses sizes whose product overflows or passes [`MAX_BATCH`] / [`MAX_EPOCH_BATCHES`],
    /// naming the keys (the lower bounds are each sampler's own checks).
    pub fn check_sizes(&self) -> Result<()> {
        let (keys, factors): (&str, Vec<usize>) = match self {
            SamplerConfig::Balance {
                n_labels,
                n_instances,
            } => ("n_labels x n_instances", vec![*n_labels, *n_instances]),
            SamplerConfig::CategoryBalance {
                n_categories,
                n_labels,
                n_instances,
                ..
            }
            | SamplerConfig::DistinctCategoryBalance {
                n_categories,
                n_labels,
                n_instances,
                ..
            } => (
                "n_categories x n_labels x n_instances",
                vec![*n_categories, *n_labels, *n_instances],
            ),
            SamplerConfig::Shuffle { batch_size, .. } => ("batch_size", vec![*batch_size]),
        };
        let batch = factors.iter().try_fold(1usize, |a, &f| a.checked_mul(f));
        if batch.is_none_or(|b| b > MAX_BATCH) {
            return Err(Error::input(format!(
                "config table [sampler]: the batch ({keys} = {}) is larger than {MAX_BATCH}",
                factors
                    .iter()
                    .map(|f| f.to_string())
                    .collect::<Vec<_>>()
                    .join(" x ")
            )));
        }
        if let SamplerConfig::DistinctCategoryBalance { epoch_size, .. } = self {
            if *epoch_size > MAX_EPOCH_BATCHES {
                return Err(Error::input(format!(
                    "config key 'sampler.epoch_size': {epoch_size} is larger than {MAX_EPOCH_BATCHES}"
                )));
            }
        }
        Ok(())
    }
}

fn yes() -> bool {
    true
}

impl SamplerConfig {
    /// The registry name (`balance`, `category_balance`, ...).
    pub fn name(&self) -> &'static str {
        self.into()
    }

    /// Whether the sampler needs a category per label.
    pub fn needs_categories(&self) -> bool {
        matches!(
            self,
            SamplerConfig::CategoryBalance { .. } | SamplerConfig::DistinctCategoryBalance { .. }
        )
    }

    /// Builds the sampler over `labels` (one per training row). `label2category` is required
    /// by the category samplers and ignored by the others.
    pub fn build(
        &self,
        labels: &[i64],
        label2category: Option<&BTreeMap<i64, String>>,
    ) -> Result<Box<dyn BatchSampler>> {
        let cats = || {
            label2category.ok_or_else(|| {
                Error::input(format!(
                    "the {} sampler needs a category for every label, but the dataset has no category column",
                    self.name()
                ))
            })
        };
        Ok(match *self {
            SamplerConfig::Balance {
                n_labels,
                n_instances,
            } => Box::new(Balance::new(labels, n_labels, n_instances)?),
            SamplerConfig::CategoryBalance {
                n_categories,
                n_labels,
                n_instances,
                resample_labels,
                weight_categories,
            } => Box::new(CategoryBalance::new(
                labels,
                cats()?,
                CategoryShape {
                    n_categories,
                    n_labels,
                    n_instances,
                },
                resample_labels,
                weight_categories,
            )?),
            SamplerConfig::DistinctCategoryBalance {
                n_categories,
                n_labels,
                n_instances,
                epoch_size,
            } => Box::new(DistinctCategoryBalance::new(
                labels,
                cats()?,
                CategoryShape {
                    n_categories,
                    n_labels,
                    n_instances,
                },
                epoch_size,
            )?),
            SamplerConfig::Shuffle {
                batch_size,
                drop_last,
            } => Box::new(Shuffle::new(labels.len(), batch_size, drop_last)?),
        })
    }
}

/// Positions of each label, labels in ascending order, positions ascending.
fn group_by_label(labels: &[i64]) -> BTreeMap<i64, Vec<usize>> {
    let mut m: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
    for (i, &l) in labels.iter().enumerate() {
        m.entry(l).or_default().push(i);
    }
    m
}

/// A short, stable fingerprint of the labels (xxh3 of their little-endian bytes).
fn labels_fingerprint(labels: &[i64]) -> String {
    let mut bytes = Vec::with_capacity(labels.len() * 8);
    for l in labels {
        bytes.extend_from_slice(&l.to_le_bytes());
    }
    format!(
        "{:016x}:{}",
        xxhash_rust::xxh3::xxh3_64(&bytes),
        labels.len()
    )
}

fn state_json(config: &SamplerConfig, labels: &str) -> serde_json::Value {
    serde_json::json!({ "config": config, "labels": labels })
}

fn check_common(
    name: &str,
    by_label: &BTreeMap<i64, Vec<usize>>,
    n_labels: usize,
    n_instances: usize,
) -> Result<()> {
    if by_label.is_empty() {
        return Err(Error::input(format!(
            "the {name} sampler got no training rows"
        )));
    }
    if n_labels < 2 {
        return Err(Error::input(format!(
            "the {name} sampler needs n_labels >= 2 (a batch needs negatives), got n_labels={n_labels}"
        )));
    }
    if n_instances < 2 {
        return Err(Error::input(format!(
            "the {name} sampler needs n_instances >= 2 (a batch needs positives), got n_instances={n_instances}"
        )));
    }
    let small: Vec<i64> = by_label
        .iter()
        .filter(|(_, v)| v.len() < 2)
        .map(|(&l, _)| l)
        .collect();
    if !small.is_empty() {
        let shown: Vec<String> = small.iter().take(5).map(|l| l.to_string()).collect();
        return Err(Error::input(format!(
            "the {name} sampler needs every label to have >= 2 samples in the train split; {} label(s) have 1 (e.g. {}); drop them or use name = \"shuffle\"",
            small.len(),
            shown.join(", ")
        )));
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------

/// OML's `BalanceSampler`: each batch holds `n_labels` distinct labels with `n_instances`
/// rows each (OML's `smart_sample`: with repetition only when a label has fewer rows); an
/// epoch is `L // n_labels` batches and uses each label at most once.
#[derive(Debug, Clone)]
pub struct Balance {
    n_labels: usize,
    n_instances: usize,
    labels: Vec<i64>,
    by_label: Vec<Vec<usize>>,
    fingerprint: String,
}

impl Balance {
    pub fn new(labels: &[i64], n_labels: usize, n_instances: usize) -> Result<Balance> {
        let groups = group_by_label(labels);
        check_common("balance", &groups, n_labels, n_instances)?;
        if n_labels > groups.len() {
            return Err(Error::input(format!(
                "the balance sampler needs n_labels={n_labels} labels with >= 2 samples, the train split has {}",
                groups.len()
            )));
        }
        Ok(Balance {
            n_labels,
            n_instances,
            labels: groups.keys().copied().collect(),
            by_label: groups.into_values().collect(),
            fingerprint: labels_fingerprint(labels),
        })
    }
}

impl BatchSampler for Balance {
    fn len(&self) -> usize {
        self.labels.len() / self.n_labels
    }

    fn batch_size(&self) -> usize {
        self.n_labels * self.n_instances
    }

    fn epoch(&mut self, rng: &mut Rng) -> Vec<Vec<usize>> {
        // Drawing n_labels labels without replacement from the rest, batch after batch, is
        // the same distribution as cutting one random permutation into consecutive chunks.
        let mut order: Vec<usize> = (0..self.labels.len()).collect();
        rng::shuffle(rng, &mut order);
        order
            .chunks_exact(self.n_labels)
            .map(|chunk| {
                let mut batch = Vec::with_capacity(self.batch_size());
                for &l in chunk {
                    batch.extend(rng::smart_sample(rng, &self.by_label[l], self.n_instances));
                }
                batch
            })
            .collect()
    }

    fn state(&self) -> serde_json::Value {
        state_json(
            &SamplerConfig::Balance {
                n_labels: self.n_labels,
                n_instances: self.n_instances,
            },
            &self.fingerprint,
        )
    }
}

// ------------------------------------------------------------------------------------------

/// Labels per category (categories sorted, labels sorted), after OML's validation.
struct CategoryIndex {
    categories: Vec<String>,
    /// For each category, its labels as positions into `by_label`.
    labels_of: Vec<Vec<usize>>,
    by_label: Vec<Vec<usize>>,
}

/// How many categories a category batch draws, labels in each and rows per label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CategoryShape {
    pub n_categories: usize,
    pub n_labels: usize,
    pub n_instances: usize,
}

impl CategoryShape {
    fn batch_size(&self) -> usize {
        self.n_categories * self.n_labels * self.n_instances
    }
}

fn category_index(
    name: &str,
    labels: &[i64],
    label2category: &BTreeMap<i64, String>,
    shape: CategoryShape,
) -> Result<CategoryIndex> {
    let CategoryShape {
        n_categories,
        n_labels,
        n_instances,
    } = shape;
    let groups = group_by_label(labels);
    // The first few labels of one side that the other lacks.
    let lacking = |a: Vec<&i64>, has: &dyn Fn(&i64) -> bool| -> Vec<String> {
        a.into_iter()
            .filter(|l| !has(l))
            .take(5)
            .map(|l| l.to_string())
            .collect()
    };
    let missing = lacking(groups.keys().collect(), &|l| label2category.contains_key(l));
    if !missing.is_empty() {
        return Err(Error::input(format!(
            "the {name} sampler needs a category for every label; label(s) {} have none",
            missing.join(", ")
        )));
    }
    let extra = lacking(label2category.keys().collect(), &|l| groups.contains_key(l));
    if !extra.is_empty() {
        return Err(Error::input(format!(
            "the {name} sampler's label-to-category map has label(s) {} that are not in the train split",
            extra.join(", ")
        )));
    }
    let categories: Vec<String> = label2category
        .values()
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    if n_categories < 1 || n_categories > categories.len() {
        return Err(Error::input(format!(
            "the {name} sampler needs 1 <= n_categories <= {} (the categories in the train split), got n_categories={n_categories}",
            categories.len()
        )));
    }
    check_common(name, &groups, n_labels, n_instances)?;
    if n_labels > groups.len() {
        return Err(Error::input(format!(
            "the {name} sampler needs n_labels={n_labels} labels with >= 2 samples, the train split has {}",
            groups.len()
        )));
    }
    let label_pos: BTreeMap<i64, usize> = groups.keys().enumerate().map(|(i, &l)| (l, i)).collect();
    let cat_pos: BTreeMap<&str, usize> = categories
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_str(), i))
        .collect();
    let mut labels_of = vec![Vec::new(); categories.len()];
    for (l, c) in label2category {
        labels_of[cat_pos[c.as_str()]].push(label_pos[l]);
    }
    Ok(CategoryIndex {
        categories,
        labels_of,
        by_label: groups.into_values().collect(),
    })
}

fn few_labels_error(name: &str, idx: &CategoryIndex, n_labels: usize, hint: &str) -> Result<()> {
    let small: Vec<String> = idx
        .labels_of
        .iter()
        .zip(&idx.categories)
        .filter(|(ls, _)| ls.len() < n_labels)
        .map(|(ls, c)| format!("'{c}' has {}", ls.len()))
        .collect();
    if small.is_empty() {
        return Ok(());
    }
    let shown: Vec<&str> = small.iter().take(5).map(|s| s.as_str()).collect();
    Err(Error::input(format!(
        "the {name} sampler needs every category to have >= n_labels={n_labels} labels; {} categor{} fewer ({}){hint}",
        small.len(),
        if small.len() == 1 { "y has" } else { "ies have" },
        shown.join(", ")
    )))
}

/// OML's `CategoryBalanceSampler`: each batch draws `n_categories` distinct categories
/// (weighted by their number of labels, or uniformly), `n_labels` labels in each and
/// `n_instances` rows per label. Batches are independent; an epoch is `ceil(L / n_labels)`.
pub struct CategoryBalance {
    shape: CategoryShape,
    resample_labels: bool,
    weight_categories: bool,
    idx: CategoryIndex,
    weights: Vec<f64>,
    fingerprint: String,
}

impl CategoryBalance {
    pub fn new(
        labels: &[i64],
        label2category: &BTreeMap<i64, String>,
        shape: CategoryShape,
        resample_labels: bool,
        weight_categories: bool,
    ) -> Result<CategoryBalance> {
        let name = "category_balance";
        let idx = category_index(name, labels, label2category, shape)?;
        if !resample_labels {
            few_labels_error(
                name,
                &idx,
                shape.n_labels,
                ", or set resample_labels = true",
            )?;
        }
        let n_lab = idx.by_label.len() as f64;
        let weights = idx
            .labels_of
            .iter()
            .map(|ls| {
                if weight_categories {
                    ls.len() as f64 / n_lab
                } else {
                    1.0
                }
            })
            .collect();
        Ok(CategoryBalance {
            shape,
            resample_labels,
            weight_categories,
            idx,
            weights,
            fingerprint: labels_fingerprint(labels),
        })
    }
}

impl BatchSampler for CategoryBalance {
    fn len(&self) -> usize {
        self.idx.by_label.len().div_ceil(self.shape.n_labels)
    }

    fn batch_size(&self) -> usize {
        self.shape.batch_size()
    }

    fn epoch(&mut self, rng: &mut Rng) -> Vec<Vec<usize>> {
        (0..self.len())
            .map(|_| {
                let mut batch = Vec::with_capacity(self.batch_size());
                for c in rng::choose_weighted(rng, &self.weights, self.shape.n_categories) {
                    let labs = rng::smart_sample(rng, &self.idx.labels_of[c], self.shape.n_labels);
                    for l in labs {
                        batch.extend(rng::smart_sample(
                            rng,
                            &self.idx.by_label[l],
                            self.shape.n_instances,
                        ));
                    }
                }
                batch
            })
            .collect()
    }

    fn state(&self) -> serde_json::Value {
        state_json(
            &SamplerConfig::CategoryBalance {
                n_categories: self.shape.n_categories,
                n_labels: self.shape.n_labels,
                n_instances: self.shape.n_instances,
                resample_labels: self.resample_labels,
                weight_categories: self.weight_categories,
            },
            &self.fingerprint,
        )
    }
}

// ------------------------------------------------------------------------------------------

/// OML's `DistinctCategoryBalanceSampler`: like [`CategoryBalance`], but within an epoch a
/// label is not drawn again until its category has run out of unused labels, and a category
/// is not drawn again until fewer than `n_categories` categories have unused labels (then
/// the state resets). An epoch is `epoch_size` batches; the state resets at each epoch.
pub struct DistinctCategoryBalance {
    shape: CategoryShape,
    epoch_size: usize,
    idx: CategoryIndex,
    fingerprint: String,
}

impl DistinctCategoryBalance {
    pub fn new(
        labels: &[i64],
        label2category: &BTreeMap<i64, String>,
        shape: CategoryShape,
        epoch_size: usize,
    ) -> Result<DistinctCategoryBalance> {
        let name = "distinct_category_balance";
        let idx = category_index(name, labels, label2category, shape)?;
        few_labels_error(name, &idx, shape.n_labels, "")?;
        if epoch_size < 1 {
            return Err(Error::input(
                "the distinct_category_balance sampler needs epoch_size >= 1, got 0",
            ));
        }
        Ok(DistinctCategoryBalance {
            shape,
            epoch_size,
            idx,
            fingerprint: labels_fingerprint(labels),
        })
    }
}

impl BatchSampler for DistinctCategoryBalance {
    fn len(&self) -> usize {
        self.epoch_size
    }

    fn batch_size(&self) -> usize {
        self.shape.batch_size()
    }

    fn epoch(&mut self, rng: &mut Rng) -> Vec<Vec<usize>> {
        let n_cat = self.idx.categories.len();
        // Unused / used labels per category (positions into by_label, kept sorted).
        let fresh = |idx: &CategoryIndex| -> (Vec<BTreeSet<usize>>, Vec<BTreeSet<usize>>) {
            (
                idx.labels_of
                    .iter()
                    .map(|v| v.iter().copied().collect())
                    .collect(),
                vec![BTreeSet::new(); n_cat],
            )
        };
        let (mut unused, mut used) = fresh(&self.idx);
        let mut out = Vec::with_capacity(self.epoch_size);
        for _ in 0..self.epoch_size {
            let mut available: Vec<usize> = (0..n_cat).filter(|&c| !unused[c].is_empty()).collect();
            if available.len() < self.shape.n_categories {
                (unused, used) = fresh(&self.idx);
                available = (0..n_cat).collect();
            }
            let mut batch = Vec::with_capacity(self.batch_size());
            for c in rng::choose(rng, &available, self.shape.n_categories) {
                let free: Vec<usize> = unused[c].iter().copied().collect();
                let labs = if free.len() >= self.shape.n_labels {
                    rng::choose(rng, &free, self.shape.n_labels)
                } else {
                    let old: Vec<usize> = used[c].iter().copied().collect();
                    let mut l = free.clone();
                    l.extend(rng::choose(rng, &old, self.shape.n_labels - free.len()));
                    l
                };
                for &l in &labs {
                    batch.extend(rng::smart_sample(
                        rng,
                        &self.idx.by_label[l],
                        self.shape.n_instances,
                    ));
                    unused[c].remove(&l);
                    used[c].insert(l);
                }
            }
            out.push(batch);
        }
        out
    }

    fn state(&self) -> serde_json::Value {
        state_json(
            &SamplerConfig::DistinctCategoryBalance {
                n_categories: self.shape.n_categories,
                n_labels: self.shape.n_labels,
                n_instances: self.shape.n_instances,
                epoch_size: self.epoch_size,
            },
            &self.fingerprint,
        )
    }
}

// ------------------------------------------------------------------------------------------

/// Plain shuffled batches: a random permutation of all rows cut into `batch_size` chunks;
/// with `drop_last` the short tail is dropped (OML's `sampler: null` uses `drop_last=True`).
pub struct Shuffle {
    n_rows: usize,
    batch_size: usize,
    drop_last: bool,
    fingerprint: String,
}

impl Shuffle {
    pub fn new(n_rows: usize, batch_size: usize, drop_last: bool) -> Result<Shuffle> {
        if batch_size < 1 {
            return Err(Error::input(
                "the shuffle sampler needs batch_size >= 1, got 0",
            ));
        }
        if n_rows == 0 {
            return Err(Error::input("the shuffle sampler got no training rows"));
        }
        if drop_last && n_rows < batch_size {
            return Err(Error::input(format!(
                "the shuffle sampler with drop_last = true needs at least batch_size={batch_size} rows, the train split has {n_rows}"
            )));
        }
        Ok(Shuffle {
            n_rows,
            batch_size,
            drop_last,
            fingerprint: format!("rows:{n_rows}"),
        })
    }
}

impl BatchSampler for Shuffle {
    fn len(&self) -> usize {
        if self.drop_last {
            self.n_rows / self.batch_size
        } else {
            self.n_rows.div_ceil(self.batch_size)
        }
    }

    fn batch_size(&self) -> usize {
        self.batch_size
    }

    fn epoch(&mut self, rng: &mut Rng) -> Vec<Vec<usize>> {
        let mut order: Vec<usize> = (0..self.n_rows).collect();
        rng::shuffle(rng, &mut order);
        order
            .chunks(self.batch_size)
            .take(self.len())
            .map(|c| c.to_vec())
            .collect()
    }

    fn state(&self) -> serde_json::Value {
        state_json(
            &SamplerConfig::Shuffle {
                batch_size: self.batch_size,
                drop_last: self.drop_last,
            },
            &self.fingerprint,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn shape(n_categories: usize, n_labels: usize, n_instances: usize) -> CategoryShape {
        CategoryShape {
            n_categories,
            n_labels,
            n_instances,
        }
    }

    /// Labels with random counts in `min..=max` per label, in shuffled row order.
    fn make_labels(rng: &mut Rng, n_labels: usize, min: usize, max: usize) -> Vec<i64> {
        let mut v = Vec::new();
        for l in 0..n_labels {
            let c = min + rng::below(rng, max - min + 1);
            v.extend(std::iter::repeat_n(l as i64 * 7 + 3, c));
        }
        rng::shuffle(rng, &mut v);
        v
    }

    fn counts(batch: &[usize], labels: &[i64]) -> BTreeMap<i64, usize> {
        let mut m = BTreeMap::new();
        for &i in batch {
            *m.entry(labels[i]).or_insert(0) += 1;
        }
        m
    }

    #[test]
    fn rng_primitives_are_stable_and_uniform() {
        let mut r = rng::seeded(7, 0);
        let v: Vec<usize> = (0..8).map(|_| rng::below(&mut r, 10)).collect();
        let mut r2 = rng::seeded(7, 0);
        let v2: Vec<usize> = (0..8).map(|_| rng::below(&mut r2, 10)).collect();
        assert_eq!(v, v2);
        // A different stream gives a different sequence.
        let mut r3 = rng::seeded(7, 1);
        let v3: Vec<usize> = (0..8).map(|_| rng::below(&mut r3, 10)).collect();
        assert_ne!(v, v3);
        // Roughly uniform.
        let mut hist = [0usize; 5];
        for _ in 0..50_000 {
            hist[rng::below(&mut r, 5)] += 1;
        }
        for h in hist {
            assert!((9_000..11_000).contains(&h), "{hist:?}");
        }
        // smart_sample: distinct when enough, all items + repeats otherwise.
        let s = rng::smart_sample(&mut r, &[1, 2, 3, 4, 5], 3);
        assert_eq!(s.iter().collect::<BTreeSet<_>>().len(), 3);
        let s = rng::smart_sample(&mut r, &[1, 2], 5);
        assert_eq!(s.len(), 5);
        assert_eq!(s[..2].iter().collect::<BTreeSet<_>>().len(), 2);
        // Weighted choice: distinct, and a heavy weight is drawn first most of the time.
        let mut first = 0;
        for _ in 0..2000 {
            let c = rng::choose_weighted(&mut r, &[0.05, 0.9, 0.05], 2);
            assert_ne!(c[0], c[1]);
            first += (c[0] == 1) as usize;
        }
        assert!((1700..1900).contains(&first), "{first}");
    }

    #[test]
    fn rng_state_round_trips() {
        let mut r = rng::seeded(42, 3);
        for _ in 0..13 {
            r.next_u32();
        }
        let st = rng::RngState::of(&r);
        let json = serde_json::to_string(&st).unwrap();
        let mut back = serde_json::from_str::<rng::RngState>(&json)
            .unwrap()
            .restore()
            .unwrap();
        for _ in 0..10 {
            assert_eq!(r.next_u64(), back.next_u64());
        }
    }

    #[test]
    fn balance_invariants() {
        let mut r = rng::seeded(1, 0);
        for trial in 0..40 {
            let n_lab = 2 + rng::below(&mut r, 30);
            let labels = make_labels(&mut r, n_lab, 2, 9);
            let p = 2 + rng::below(&mut r, n_lab - 1);
            let k = 2 + rng::below(&mut r, 6);
            let mut s = Balance::new(&labels, p, k).unwrap();
            assert_eq!(s.len(), n_lab / p, "trial {trial}");
            let epoch = s.epoch(&mut r);
            assert_eq!(epoch.len(), s.len());
            let mut seen = BTreeSet::new();
            let mut total = 0;
            for b in &epoch {
                assert_eq!(b.len(), p * k);
                let c = counts(b, &labels);
                assert_eq!(c.len(), p);
                assert!(c.values().all(|&v| v == k));
                for &l in c.keys() {
                    assert!(seen.insert(l), "label {l} repeated within an epoch");
                }
                // Without repetition when a label has enough rows.
                for (&l, _) in c.iter() {
                    let avail = labels.iter().filter(|&&x| x == l).count();
                    let distinct: BTreeSet<usize> =
                        b.iter().copied().filter(|&i| labels[i] == l).collect();
                    assert_eq!(distinct.len(), avail.min(k));
                }
                total += b.len();
            }
            assert!(seen.len() <= n_lab && seen.len() + p > n_lab);
            assert_eq!(s.len() * s.batch_size(), total);
        }
    }

    #[test]
    fn balance_is_deterministic_and_epochs_differ() {
        let mut r = rng::seeded(5, 0);
        let labels = make_labels(&mut r, 20, 2, 8);
        let mut s = Balance::new(&labels, 4, 3).unwrap();
        let e1 = s.epoch(&mut rng::seeded(9, 0));
        let e2 = s.epoch(&mut rng::seeded(9, 0));
        assert_eq!(e1, e2);
        let e3 = s.epoch(&mut rng::seeded(9, 1));
        assert_ne!(e1, e3);
    }

    #[test]
    fn balance_errors_name_the_numbers() {
        let labels = vec![0, 0, 1, 1, 2, 2, 3, 3, 4, 4];
        let e = Balance::new(&labels, 8, 4).err().unwrap().to_string();
        assert!(
            e.contains("n_labels=8") && e.contains("the train split has 5"),
            "{e}"
        );
        assert_eq!(Balance::new(&labels, 8, 4).err().unwrap().exit_code(), 2);
        let e = Balance::new(&labels, 1, 4).err().unwrap().to_string();
        assert!(e.contains("n_labels >= 2"), "{e}");
        let e = Balance::new(&labels, 2, 1).err().unwrap().to_string();
        assert!(e.contains("n_instances >= 2"), "{e}");
        let e = Balance::new(&[0, 0, 1], 2, 2).err().unwrap().to_string();
        assert!(e.contains(">= 2 samples") && e.contains("e.g. 1"), "{e}");
        assert!(Balance::new(&[], 2, 2).is_err());
    }

    fn make_categories(labels: &[i64], n_cat: usize, rng: &mut Rng) -> BTreeMap<i64, String> {
        let uniq: BTreeSet<i64> = labels.iter().copied().collect();
        let mut m = BTreeMap::new();
        for (i, l) in uniq.into_iter().enumerate() {
            // Every category gets labels: round-robin, then shuffled assignment for the rest.
            let c = if i < n_cat { i } else { rng::below(rng, n_cat) };
            m.insert(l, format!("cat{c}"));
        }
        m
    }

    #[test]
    fn name_is_the_config_tag_for_every_sampler() {
        // `name()` comes from strum and the tag from serde: they must spell each alike.
        let tables = [
            ("balance", "n_labels = 2\nn_instances = 2"),
            (
                "category_balance",
                "n_categories = 1\nn_labels = 2\nn_instances = 2",
            ),
            (
                "distinct_category_balance",
                "n_categories = 1\nn_labels = 2\nn_instances = 2\nepoch_size = 3",
            ),
            ("shuffle", "batch_size = 4"),
        ];
        for (name, rest) in tables {
            let text = format!("name = \"{name}\"\n{rest}");
            let cfg: SamplerConfig = toml::from_str(&text).unwrap();
            assert_eq!(cfg.name(), name);
            assert_eq!(serde_json::to_value(&cfg).unwrap()["name"], name);
        }
    }

    #[test]
    fn category_balance_invariants() {
        let mut r = rng::seeded(2, 0);
        for trial in 0..30 {
            let n_lab = 6 + rng::below(&mut r, 30);
            let labels = make_labels(&mut r, n_lab, 2, 7);
            let n_cat = 2 + rng::below(&mut r, 4);
            let l2c = make_categories(&labels, n_cat, &mut r);
            let c = 1 + rng::below(&mut r, n_cat);
            let p = 2 + rng::below(&mut r, 3);
            let k = 2 + rng::below(&mut r, 3);
            let resample = trial % 2 == 0;
            let weighted = trial % 3 != 0;
            let s = CategoryBalance::new(&labels, &l2c, shape(c, p, k), resample, weighted);
            let mut s = match s {
                Ok(s) => s,
                Err(e) => {
                    assert!(
                        !resample && e.to_string().contains("resample_labels"),
                        "{e}"
                    );
                    continue;
                }
            };
            assert_eq!(s.len(), n_lab.div_ceil(p));
            let epoch = s.epoch(&mut r);
            assert_eq!(epoch.len(), s.len());
            for b in &epoch {
                assert_eq!(b.len(), c * p * k);
                let cats: BTreeSet<&String> = b.iter().map(|&i| &l2c[&labels[i]]).collect();
                assert_eq!(cats.len(), c, "exactly n_categories categories per batch");
                // Per category: n_labels*n_instances rows; distinct labels unless resampled.
                for cat in cats {
                    let rows: Vec<usize> = b
                        .iter()
                        .copied()
                        .filter(|&i| &l2c[&labels[i]] == cat)
                        .collect();
                    assert_eq!(rows.len(), p * k);
                    let cc = counts(&rows, &labels);
                    let n_in_cat = l2c.values().filter(|v| *v == cat).count();
                    if n_in_cat >= p {
                        assert_eq!(cc.len(), p);
                        assert!(cc.values().all(|&v| v == k));
                    } else {
                        assert!(resample);
                        assert_eq!(cc.len(), n_in_cat);
                    }
                }
            }
        }
    }

    #[test]
    fn category_balance_weights_follow_label_counts() {
        // cat "a" has 8 labels, "b" 2: with weights, "a" is drawn ~80% of the time.
        let labels: Vec<i64> = (0..10).flat_map(|l| [l, l]).collect();
        let l2c: BTreeMap<i64, String> = (0..10)
            .map(|l| (l, if l < 8 { "a" } else { "b" }.to_string()))
            .collect();
        let mut s = CategoryBalance::new(&labels, &l2c, shape(1, 2, 2), false, true).unwrap();
        let mut r = rng::seeded(3, 0);
        let (mut a, mut n) = (0, 0);
        for _ in 0..400 {
            for b in s.epoch(&mut r) {
                n += 1;
                a += (l2c[&labels[b[0]]] == "a") as usize;
            }
        }
        let share = a as f64 / n as f64;
        assert!((0.77..0.83).contains(&share), "{share}");
        let mut s = CategoryBalance::new(&labels, &l2c, shape(1, 2, 2), false, false).unwrap();
        let (mut a, mut n) = (0, 0);
        for _ in 0..400 {
            for b in s.epoch(&mut r) {
                n += 1;
                a += (l2c[&labels[b[0]]] == "a") as usize;
            }
        }
        let share = a as f64 / n as f64;
        assert!((0.46..0.54).contains(&share), "{share}");
    }

    #[test]
    fn category_samplers_validate() {
        let labels: Vec<i64> = (0..6).flat_map(|l| [l, l]).collect();
        let l2c: BTreeMap<i64, String> = (0..6)
            .map(|l| (l, if l < 5 { "a" } else { "b" }.to_string()))
            .collect();
        let e = CategoryBalance::new(&labels, &l2c, shape(3, 2, 2), false, true)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("n_categories <= 2"), "{e}");
        let e = CategoryBalance::new(&labels, &l2c, shape(1, 2, 2), false, true)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("'b' has 1"), "{e}");
        assert!(CategoryBalance::new(&labels, &l2c, shape(1, 2, 2), true, true).is_ok());
        let e = DistinctCategoryBalance::new(&labels, &l2c, shape(1, 2, 2), 5)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("n_labels=2"), "{e}");
        let mut partial = l2c.clone();
        partial.remove(&3);
        let e = CategoryBalance::new(&labels, &partial, shape(1, 2, 2), true, true)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("label(s) 3 have none"), "{e}");
        let mut more = l2c.clone();
        more.insert(99, "a".into());
        assert!(CategoryBalance::new(&labels, &more, shape(1, 2, 2), true, true).is_err());
        let cfg = SamplerConfig::CategoryBalance {
            n_categories: 1,
            n_labels: 2,
            n_instances: 2,
            resample_labels: true,
            weight_categories: true,
        };
        let e = cfg.build(&labels, None).err().unwrap().to_string();
        assert!(e.contains("no category column"), "{e}");
        assert!(cfg.build(&labels, Some(&l2c)).is_ok());
    }

    #[test]
    fn distinct_category_balance_invariants() {
        let mut r = rng::seeded(4, 0);
        for _ in 0..30 {
            let n_cat = 2 + rng::below(&mut r, 3);
            // Each category gets 3..8 labels.
            let mut labels = Vec::new();
            let mut l2c = BTreeMap::new();
            let mut next = 0i64;
            for c in 0..n_cat {
                for _ in 0..3 + rng::below(&mut r, 6) {
                    l2c.insert(next, format!("c{c}"));
                    for _ in 0..2 + rng::below(&mut r, 4) {
                        labels.push(next);
                    }
                    next += 1;
                }
            }
            let c = 1 + rng::below(&mut r, n_cat);
            let p = 2 + rng::below(&mut r, 2);
            let k = 2 + rng::below(&mut r, 3);
            let epoch_size = 1 + rng::below(&mut r, 12);
            let mut s =
                DistinctCategoryBalance::new(&labels, &l2c, shape(c, p, k), epoch_size).unwrap();
            assert_eq!(s.len(), epoch_size);
            let epoch = s.epoch(&mut r);
            assert_eq!(epoch.len(), epoch_size);
            // Replay the state: a label repeats only after its category ran out of unused
            // labels or after a reset.
            let mut unused: HashMap<String, BTreeSet<i64>> = HashMap::new();
            let reset = |u: &mut HashMap<String, BTreeSet<i64>>| {
                u.clear();
                for (l, cat) in &l2c {
                    u.entry(cat.clone()).or_default().insert(*l);
                }
            };
            reset(&mut unused);
            for b in &epoch {
                assert_eq!(b.len(), c * p * k);
                let cc = counts(b, &labels);
                let cats: BTreeSet<&String> = cc.keys().map(|l| &l2c[l]).collect();
                assert_eq!(cats.len(), c);
                assert_eq!(cc.len(), c * p, "distinct labels within a batch");
                assert!(cc.values().all(|&v| v == k));
                if unused.values().filter(|s| !s.is_empty()).count() < c {
                    reset(&mut unused);
                }
                for cat in cats {
                    let free = &unused[cat];
                    let in_batch: BTreeSet<i64> =
                        cc.keys().copied().filter(|l| &l2c[l] == cat).collect();
                    assert!(
                        !free.is_empty(),
                        "a category without unused labels was drawn"
                    );
                    if free.len() >= p {
                        assert!(in_batch.is_subset(free));
                    } else {
                        assert!(free.is_subset(&in_batch));
                    }
                    let f = unused.get_mut(cat).unwrap();
                    for l in &in_batch {
                        f.remove(l);
                    }
                }
            }
        }
    }

    #[test]
    fn shuffle_covers_rows() {
        let mut r = rng::seeded(6, 0);
        let mut s = Shuffle::new(10, 3, true).unwrap();
        assert_eq!(s.len(), 3);
        let e = s.epoch(&mut r);
        assert_eq!(e.len(), 3);
        assert!(e.iter().all(|b| b.len() == 3));
        let all: BTreeSet<usize> = e.iter().flatten().copied().collect();
        assert_eq!(all.len(), 9);
        let mut s = Shuffle::new(10, 3, false).unwrap();
        assert_eq!(s.len(), 4);
        let e = s.epoch(&mut r);
        assert_eq!(e.last().unwrap().len(), 1);
        let all: BTreeSet<usize> = e.iter().flatten().copied().collect();
        assert_eq!(all, (0..10).collect());
        assert!(Shuffle::new(2, 3, true).is_err());
    }

    #[test]
    fn config_parses_and_state_checks() {
        let c: SamplerConfig =
            serde_json::from_str(r#"{"name":"balance","n_labels":2,"n_instances":2}"#).unwrap();
        assert_eq!(
            c,
            SamplerConfig::Balance {
                n_labels: 2,
                n_instances: 2
            }
        );
        let c: SamplerConfig = serde_json::from_str(
            r#"{"name":"category_balance","n_categories":1,"n_labels":2,"n_instances":2}"#,
        )
        .unwrap();
        assert!(matches!(
            c,
            SamplerConfig::CategoryBalance {
                resample_labels: false,
                weight_categories: true,
                ..
            }
        ));
        let c: SamplerConfig =
            serde_json::from_str(r#"{"name":"shuffle","batch_size":4}"#).unwrap();
        assert!(matches!(
            c,
            SamplerConfig::Shuffle {
                drop_last: true,
                ..
            }
        ));
        let e = serde_json::from_str::<SamplerConfig>(
            r#"{"name":"balance","n_labels":2,"n_instance":2}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("n_instance"), "{e}");
        assert!(serde_json::from_str::<SamplerConfig>(r#"{"name":"balanced"}"#).is_err());

        let labels = vec![0, 0, 1, 1, 2, 2];
        let cfg = SamplerConfig::Balance {
            n_labels: 2,
            n_instances: 2,
        };
        let mut s = cfg.build(&labels, None).unwrap();
        let st = s.state();
        assert_eq!(st["config"]["name"], "balance");
        s.load_state(&st).unwrap();
        let mut other = cfg.build(&[0, 0, 1, 1, 3, 3], None).unwrap();
        assert!(other.load_state(&st).is_err());
    }
}
