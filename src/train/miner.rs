//! Triplet miners: which (anchor, positive, negative) triplets of a batch a triplet loss sees.
//!
//! The semantics are OML's (`oml/miners/*.py`, see `docs/training.md`). Distances are
//! Euclidean (not squared), [`pairwise_dist`]. The selection of triplets is index work done
//! on the CPU on a detached copy of the distance matrix; the triplets come back as rows of
//! the caller's (device) features, whose distances the loss reads from one matrix
//! ([`Mined::distances`]), so gradients flow through them.
use crate::error::{Error, Result};
use crate::train::sampler::{rng, Rng};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use tch::{Device, Kind, Tensor};

/// Scalar logs of a miner or loss, by name (e.g. `active_tri`, `pos_dist`).
pub type Logs = BTreeMap<String, f64>;

/// Pairwise Euclidean distances `[N, M]` between the rows of `x1 [N, D]` and `x2 [M, D]`:
/// libtorch's `cdist` (p = 2), as OML's `pairwise_dist`. Its backward pass is defined at
/// zero distance (the gradient there is 0), so identical rows give no NaN.
pub fn pairwise_dist(x1: &Tensor, x2: &Tensor) -> Result<Tensor> {
    let (d1, d2) = (x1.size(), x2.size());
    if d1.len() != 2 || d2.len() != 2 || d1[1] != d2[1] {
        return Err(Error::internal(format!(
            "pairwise_dist needs [N, D] and [M, D], got {d1:?} and {d2:?}"
        )));
    }
    Ok(Tensor::f_cdist(x1, x2, 2.0, None::<i64>)?)
}

/// Row-wise Euclidean distances `||a_i - b_i||` of two `[N, D]` tensors, `[N]`. The norm's
/// backward pass gives 0 (not NaN) at zero distance.
pub fn elementwise_dist(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.size() != b.size() || a.dim() != 2 {
        return Err(Error::internal(format!(
            "elementwise_dist needs two [N, D] tensors of one shape, got {:?} and {:?}",
            a.size(),
            b.size()
        )));
    }
    Ok((a - b).f_norm_scalaropt_dim(2.0, [1i64], false)?)
}

/// A detached copy of a 2-D float tensor on the CPU, row-major.
pub(crate) fn to_host_matrix(t: &Tensor) -> Result<(Vec<f32>, usize, usize)> {
    let (n, m) = t.size2()?;
    let flat = t
        .f_detach()?
        .f_to_device(Device::Cpu)?
        .f_to_kind(Kind::Float)?
        .f_contiguous()?
        .f_view([-1])?;
    Ok((Vec::<f32>::try_from(&flat)?, n as usize, m as usize))
}

pub(crate) fn index_tensor(ids: &[i64], device: Device) -> Result<Tensor> {
    Ok(Tensor::f_from_slice(ids)?.f_to_device(device)?)
}

/// Triplets as positions: `a[i], p[i], n[i]` are rows of the miner's feature matrix (the
/// batch for in-batch miners; `[batch; bank]` for [`MinerWithBank`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TripletIds {
    pub a: Vec<i64>,
    pub p: Vec<i64>,
    pub n: Vec<i64>,
}

impl TripletIds {
    pub fn len(&self) -> usize {
        self.a.len()
    }

    pub fn is_empty(&self) -> bool {
        self.a.is_empty()
    }

    fn push(&mut self, a: usize, p: usize, n: usize) {
        self.a.push(a as i64);
        self.p.push(p as i64);
        self.n.push(n as i64);
    }

    /// The triplets as a set, for order-free comparisons.
    pub fn to_set(&self) -> BTreeSet<(i64, i64, i64)> {
        (0..self.len())
            .map(|i| (self.a[i], self.p[i], self.n[i]))
            .collect()
    }

    /// Gathers the anchor, positive and negative rows of `features`.
    pub fn gather(&self, features: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let dev = features.device();
        Ok((
            features.f_index_select(0, &index_tensor(&self.a, dev)?)?,
            features.f_index_select(0, &index_tensor(&self.p, dev)?)?,
            features.f_index_select(0, &index_tensor(&self.n, dev)?)?,
        ))
    }
}

/// What a miner returns: the triplets as rows of a feature matrix (the in-batch miners and
/// `miner_with_bank`) or as vectors (`hard_cluster`, `triplets_with_memory`).
#[derive(Debug)]
pub struct Mined {
    /// `[T, D]` anchor, positive and negative vectors, for the miners that build vectors.
    vectors: Option<(Tensor, Tensor, Tensor)>,
    /// The features `ids` index (gradients flow through it).
    source: Option<Tensor>,
    /// The triplets as positions, where the miner works with positions (all but
    /// `hard_cluster`, which returns label means, and `triplets_with_memory`).
    pub ids: Option<TripletIds>,
    /// For `triplets_with_memory`: `true` for the triplets taken wholly from the batch.
    pub is_original: Option<Vec<bool>>,
    pub logs: Logs,
}

impl Mined {
    fn from_ids(ids: TripletIds, features: &Tensor, logs: Logs) -> Result<Mined> {
        Ok(Mined {
            vectors: None,
            source: Some(features.shallow_clone()),
            ids: Some(ids),
            is_original: None,
            logs,
        })
    }

    fn from_vectors(
        v: (Tensor, Tensor, Tensor),
        is_original: Option<Vec<bool>>,
        logs: Logs,
    ) -> Mined {
        Mined {
            vectors: Some(v),
            source: None,
            ids: None,
            is_original,
            logs,
        }
    }

    pub fn len(&self) -> usize {
        match (&self.ids, &self.vectors) {
            (Some(ids), _) => ids.len(),
            (None, Some(v)) => v.0.size()[0] as usize,
            (None, None) => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `[T, D]` anchor, positive and negative vectors (gathered when the miner gave rows).
    pub fn vectors(&self) -> Result<(Tensor, Tensor, Tensor)> {
        match (&self.vectors, &self.source, &self.ids) {
            (Some((a, p, n)), _, _) => {
                Ok((a.shallow_clone(), p.shallow_clone(), n.shallow_clone()))
            }
            (None, Some(src), Some(ids)) => ids.gather(src),
            _ => Err(Error::internal("mined triplets without vectors or rows")),
        }
    }

    /// `[T]` anchor-positive and anchor-negative Euclidean distances, as
    /// [`elementwise_dist`] of [`Mined::vectors`]. For triplets given as rows they are read
    /// from the distance matrix of the anchor rows to every row instead of gathering three
    /// `[T, D]` copies: all_triplets of a 16 x 8 batch are 107,520 triplets (3 x 55 MB of
    /// vectors, and as much again in the backward pass) but only 128 x 128 distances. The
    /// matrix is computed directly (no `|x|^2 + |y|^2 - 2xy` expansion), so the values are
    /// the elementwise ones up to rounding and the gradient at zero distance is 0 too.
    pub fn distances(&self) -> Result<(Tensor, Tensor)> {
        let (Some(src), Some(ids)) = (&self.source, &self.ids) else {
            let (a, p, n) = self.vectors()?;
            return Ok((elementwise_dist(&a, &p)?, elementwise_dist(&a, &n)?));
        };
        let rows = src.size()[0];
        // Each distinct anchor row once, in ascending order.
        let mut slot = vec![-1i64; rows as usize];
        let mut anchors = Vec::new();
        for &a in &ids.a {
            if slot[a as usize] < 0 {
                slot[a as usize] = 0;
                anchors.push(a);
            }
        }
        anchors.sort_unstable();
        for (i, &a) in anchors.iter().enumerate() {
            slot[a as usize] = i as i64;
        }
        let dev = src.device();
        let anchor_rows = src.f_index_select(0, &index_tensor(&anchors, dev)?)?;
        // compute_mode 2: never the matrix-product expansion.
        let d = Tensor::f_cdist(&anchor_rows, src, 2.0, Some(2))?.f_view([-1])?;
        let flat = |other: &[i64]| -> Vec<i64> {
            ids.a
                .iter()
                .zip(other)
                .map(|(&a, &o)| slot[a as usize] * rows + o)
                .collect()
        };
        Ok((
            d.f_index_select(0, &index_tensor(&flat(&ids.p), dev)?)?,
            d.f_index_select(0, &index_tensor(&flat(&ids.n), dev)?)?,
        ))
    }
}

/// A miner's state for a checkpoint: scalars as JSON and the memory bank's tensors.
#[derive(Debug, Default)]
pub struct MinerState {
    pub meta: serde_json::Value,
    pub tensors: Vec<(String, Tensor)>,
}

/// A triplet miner. `labels` are the batch's labels (any integers), one per feature row.
pub trait Miner: Send {
    /// The registry name.
    fn name(&self) -> &'static str;
    fn mine(&mut self, features: &Tensor, labels: &[i64], rng: &mut Rng) -> Result<Mined>;
    /// State to checkpoint (the memory bank of the cross-batch miners; nothing for the others).
    fn state(&self) -> Result<MinerState> {
        Ok(MinerState::default())
    }
    fn load_state(&mut self, _state: MinerState) -> Result<()> {
        Ok(())
    }
}

/// A rank range of OML's `NHardTripletsMiner`: `n = 3` keeps ranks 1..=3; `n = [2, 5]`
/// keeps ranks 2..=5 (1-based, inclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum NHard {
    Top(usize),
    Range([usize; 2]),
}

impl Default for NHard {
    fn default() -> Self {
        NHard::Top(1)
    }
}

impl NHard {
    /// The 0-based half-open slice `[from, to)` of the ranked list.
    pub fn slice(self) -> Result<(usize, usize)> {
        let (from, to) = match self {
            NHard::Top(n) => (0, n),
            NHard::Range([a, b]) => {
                if a < 1 {
                    return Err(Error::input(format!(
                        "an n_hard rank range [from, to] is 1-based: got [{a}, {b}]"
                    )));
                }
                (a - 1, b)
            }
        };
        if to <= from {
            return Err(Error::input(format!(
                "an n_hard rank range needs to >= from >= 1 (or n >= 1), got {self:?}"
            )));
        }
        Ok((from, to))
    }
}

fn default_max_triplets() -> usize {
    usize::MAX
}

fn default_n_hard() -> NHard {
    NHard::Top(1)
}

/// The `miner` table of a triplet loss in a training config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "snake_case", deny_unknown_fields)]
pub enum MinerConfig {
    /// Every valid triplet, at most `max_output_triplets` (a random subset beyond).
    #[serde(alias = "all")]
    AllTriplets {
        #[serde(default = "default_max_triplets")]
        max_output_triplets: usize,
    },
    /// The farthest positive and the nearest negative of every anchor.
    #[serde(alias = "hard")]
    HardTriplets {},
    /// Positives and negatives of the given rank ranges, all combinations.
    #[serde(alias = "n_hard")]
    NHardTriplets {
        #[serde(default = "default_n_hard")]
        n_positive: NHard,
        #[serde(default = "default_n_hard")]
        n_negative: NHard,
    },
    /// Per label: its mean, its farthest instance and the nearest other mean.
    HardCluster {},
    /// The cross-batch memory bank of OML's `TripletMinerWithMemory`.
    TripletsWithMemory {
        bank_size_in_batches: usize,
        tri_expand_k: usize,
    },
    /// OML's `MinerWithBank`: n-hard mining over the batch and a bank of past batches.
    MinerWithBank {
        bank_size_in_batches: usize,
        #[serde(default = "default_n_hard")]
        n_positive: NHard,
        #[serde(default = "default_n_hard")]
        n_negative: NHard,
        #[serde(default = "yes")]
        need_logs: bool,
    },
}

fn yes() -> bool {
    true
}

impl Default for MinerConfig {
    fn default() -> Self {
        MinerConfig::AllTriplets {
            max_output_triplets: usize::MAX,
        }
    }
}

impl MinerConfig {
    pub fn build(&self) -> Result<Box<dyn Miner>> {
        Ok(match *self {
            MinerConfig::AllTriplets {
                max_output_triplets,
            } => Box::new(AllTriplets::new(max_output_triplets)?),
            MinerConfig::HardTriplets {} => Box::new(HardTriplets),
            MinerConfig::NHardTriplets {
                n_positive,
                n_negative,
            } => Box::new(NHardTriplets::new(n_positive, n_negative)?),
            MinerConfig::HardCluster {} => Box::new(HardCluster),
            MinerConfig::TripletsWithMemory {
                bank_size_in_batches,
                tri_expand_k,
            } => Box::new(TripletsWithMemory::new(bank_size_in_batches, tri_expand_k)?),
            MinerConfig::MinerWithBank {
                bank_size_in_batches,
                n_positive,
                n_negative,
                need_logs,
            } => Box::new(MinerWithBank::new(
                bank_size_in_batches,
                NHardTriplets::new(n_positive, n_negative)?,
                need_logs,
            )?),
        })
    }
}

/// OML's in-batch precondition: >= 2 labels, every label >= 2 samples.
fn check_batch(name: &str, features: &Tensor, labels: &[i64]) -> Result<BTreeMap<i64, Vec<usize>>> {
    let size = features.size();
    if size.len() != 2 || size[0] as usize != labels.len() {
        return Err(Error::internal(format!(
            "the {name} miner got features {size:?} for {} labels",
            labels.len()
        )));
    }
    let mut groups: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
    for (i, &l) in labels.iter().enumerate() {
        groups.entry(l).or_default().push(i);
    }
    if groups.len() < 2 {
        return Err(Error::input(format!(
            "the {name} miner needs at least 2 labels in a batch, got {}; use a balance sampler",
            groups.len()
        )));
    }
    if let Some((l, _)) = groups.iter().find(|(_, v)| v.len() < 2) {
        return Err(Error::input(format!(
            "the {name} miner needs at least 2 samples of every label in a batch, label {l} has 1; use a balance sampler"
        )));
    }
    Ok(groups)
}

// ------------------------------------------------------------------------------------------

/// OML's `AllTripletsMiner`: every `(a, p, n)` with `label[a] == label[p]`, `a != p`,
/// `label[n] != label[a]` (both orders of a positive pair). Features are not looked at.
/// When there are more than `max_output_triplets`, a uniform random subset of that size.
pub struct AllTriplets {
    pub max_output_triplets: usize,
}

impl AllTriplets {
    pub fn new(max_output_triplets: usize) -> Result<AllTriplets> {
        if max_output_triplets == 0 {
            return Err(Error::input(
                "all_triplets: max_output_triplets must be >= 1",
            ));
        }
        Ok(AllTriplets {
            max_output_triplets,
        })
    }

    /// The enumeration, in (anchor, positive, negative) ascending order.
    pub fn enumerate(labels: &[i64]) -> TripletIds {
        let mut ids = TripletIds::default();
        for (a, &la) in labels.iter().enumerate() {
            for (p, &lp) in labels.iter().enumerate() {
                if p == a || lp != la {
                    continue;
                }
                for (n, &ln) in labels.iter().enumerate() {
                    if ln != la {
                        ids.push(a, p, n);
                    }
                }
            }
        }
        ids
    }
}

impl Miner for AllTriplets {
    fn name(&self) -> &'static str {
        "all_triplets"
    }

    fn mine(&mut self, features: &Tensor, labels: &[i64], rng: &mut Rng) -> Result<Mined> {
        check_batch(self.name(), features, labels)?;
        let mut ids = Self::enumerate(labels);
        if ids.len() > self.max_output_triplets {
            let mut keep = rng::choose_positions(rng, ids.len(), self.max_output_triplets);
            keep.sort_unstable();
            ids = TripletIds {
                a: keep.iter().map(|&i| ids.a[i]).collect(),
                p: keep.iter().map(|&i| ids.p[i]).collect(),
                n: keep.iter().map(|&i| ids.n[i]).collect(),
            };
        }
        Mined::from_ids(ids, features, Logs::new())
    }
}

// ------------------------------------------------------------------------------------------

/// OML's `HardTripletsMiner`: for every anchor, the positive at the largest distance among
/// same-label rows (the anchor itself included, as OML: its distance 0 only wins when all
/// positives coincide with it) and the negative at the smallest distance. Ties go to the
/// lowest row. B triplets.
pub struct HardTriplets;

impl HardTriplets {
    /// The mining rule on a row-major `[B, B]` distance matrix.
    pub fn from_distances(dist: &[f32], labels: &[i64]) -> TripletIds {
        let b = labels.len();
        let mut ids = TripletIds::default();
        for a in 0..b {
            let row = &dist[a * b..(a + 1) * b];
            let (mut best_p, mut best_n) = (None::<usize>, None::<usize>);
            for j in 0..b {
                if labels[j] == labels[a] {
                    if best_p.is_none_or(|p| row[j] > row[p]) {
                        best_p = Some(j);
                    }
                } else if best_n.is_none_or(|n| row[j] < row[n]) {
                    best_n = Some(j);
                }
            }
            if let (Some(p), Some(n)) = (best_p, best_n) {
                ids.push(a, p, n);
            }
        }
        ids
    }
}

impl Miner for HardTriplets {
    fn name(&self) -> &'static str {
        "hard_triplets"
    }

    fn mine(&mut self, features: &Tensor, labels: &[i64], _rng: &mut Rng) -> Result<Mined> {
        check_batch(self.name(), features, labels)?;
        let d = tch::no_grad(|| pairwise_dist(features, features))?;
        let (dist, _, _) = to_host_matrix(&d)?;
        // OML mines hard triplets on detached features; the gathered vectors keep the graph.
        Mined::from_ids(Self::from_distances(&dist, labels), features, Logs::new())
    }
}

// ------------------------------------------------------------------------------------------

/// OML's `NHardTripletsMiner`: per anchor, the positives (itself excluded) ranked by
/// decreasing distance and the negatives by increasing distance, cut to the configured rank
/// ranges; all positive x negative combinations. Equal distances are ranked by row.
#[derive(Debug, Clone, Copy)]
pub struct NHardTriplets {
    pos: (usize, usize),
    neg: (usize, usize),
}

impl NHardTriplets {
    pub fn new(n_positive: NHard, n_negative: NHard) -> Result<NHardTriplets> {
        Ok(NHardTriplets {
            pos: n_positive.slice()?,
            neg: n_negative.slice()?,
        })
    }

    /// The rule on a row-major `[N, N]` distance matrix; rows with `ignore_anchor[i]` are not
    /// anchors (they can still be positives and negatives).
    pub fn from_distances(
        &self,
        dist: &[f32],
        labels: &[i64],
        ignore_anchor: Option<&[bool]>,
    ) -> TripletIds {
        let b = labels.len();
        let mut ids = TripletIds::default();
        let mut pos = Vec::with_capacity(b);
        let mut neg = Vec::with_capacity(b);
        for a in 0..b {
            if ignore_anchor.is_some_and(|m| m[a]) {
                continue;
            }
            let row = &dist[a * b..(a + 1) * b];
            pos.clear();
            neg.clear();
            for j in 0..b {
                if labels[j] == labels[a] {
                    if j != a {
                        pos.push(j);
                    }
                } else {
                    neg.push(j);
                }
            }
            pos.sort_by(|&x, &y| row[y].total_cmp(&row[x]).then(x.cmp(&y)));
            neg.sort_by(|&x, &y| row[x].total_cmp(&row[y]).then(x.cmp(&y)));
            let ps = &pos[self.pos.0.min(pos.len())..self.pos.1.min(pos.len())];
            let ns = &neg[self.neg.0.min(neg.len())..self.neg.1.min(neg.len())];
            for &p in ps {
                for &n in ns {
                    ids.push(a, p, n);
                }
            }
        }
        ids
    }

    fn mine_ids(
        &self,
        features: &Tensor,
        labels: &[i64],
        ignore_anchor: Option<&[bool]>,
    ) -> Result<TripletIds> {
        let d = tch::no_grad(|| pairwise_dist(features, features))?;
        let (dist, _, _) = to_host_matrix(&d)?;
        Ok(self.from_distances(&dist, labels, ignore_anchor))
    }
}

impl Miner for NHardTriplets {
    fn name(&self) -> &'static str {
        "n_hard_triplets"
    }

    fn mine(&mut self, features: &Tensor, labels: &[i64], _rng: &mut Rng) -> Result<Mined> {
        check_batch(self.name(), features, labels)?;
        let ids = self.mine_ids(features, labels, None)?;
        Mined::from_ids(ids, features, Logs::new())
    }
}

// ------------------------------------------------------------------------------------------

/// OML's `HardClusterMiner`: every label must have the same number of rows. Per label (in
/// ascending label order): the anchor is the label's mean vector, the positive its instance
/// farthest from the mean (squared Euclidean distance), the negative the nearest other
/// label's mean (Euclidean). Returns vectors (`ids` is `None`), one triplet per label.
pub struct HardCluster;

impl HardCluster {
    /// Squared distances of each instance to its label's mean, `[n_labels, n_instances]`,
    /// with the grouped features `[n_labels, n_instances, D]`.
    pub fn intra_distances(grouped: &Tensor) -> Result<Tensor> {
        let means = grouped.f_mean_dim(1i64, true, None::<Kind>)?;
        Ok((grouped - means)
            .f_square()?
            .f_sum_dim_intlist(2i64, false, None::<Kind>)?)
    }

    /// Groups the rows by label: `[n_labels, n_instances, D]`, labels ascending.
    pub fn group(features: &Tensor, labels: &[i64]) -> Result<Tensor> {
        let mut groups: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
        for (i, &l) in labels.iter().enumerate() {
            groups.entry(l).or_default().push(i as i64);
        }
        if groups.len() < 2 {
            return Err(Error::input(
                "the hard_cluster miner expects at least 2 labels in the batch",
            ));
        }
        let counts: BTreeSet<usize> = groups.values().map(|v| v.len()).collect();
        if counts.len() != 1 {
            return Err(Error::input(format!(
                "the hard_cluster miner expects an equal number of samples for each label, the batch has {counts:?}; use a balance sampler"
            )));
        }
        let n_inst = *counts.first().unwrap();
        if n_inst < 2 {
            return Err(Error::input(
                "the hard_cluster miner expects more than one sample for each label",
            ));
        }
        let order: Vec<i64> = groups.into_values().flatten().collect();
        let d = features.size()[1];
        Ok(features
            .f_index_select(0, &index_tensor(&order, features.device())?)?
            .f_view([-1, n_inst as i64, d])?)
    }
}

impl Miner for HardCluster {
    fn name(&self) -> &'static str {
        "hard_cluster"
    }

    fn mine(&mut self, features: &Tensor, labels: &[i64], _rng: &mut Rng) -> Result<Mined> {
        if features.dim() != 2 || features.size()[0] as usize != labels.len() {
            return Err(Error::internal(
                "hard_cluster: features and labels differ in length",
            ));
        }
        let grouped = Self::group(features, labels)?;
        let (n_lab, n_inst, d) = grouped.size3()?;
        let means = grouped.f_mean_dim(1i64, false, None::<Kind>)?; // [L, D]
        let intra = Self::intra_distances(&grouped)?; // [L, I]
        let far = intra.f_argmax(1, false)?; // [L]
        let pos_rows = Tensor::f_arange(n_lab, (Kind::Int64, features.device()))? * n_inst + &far;
        let positives = grouped.f_view([-1, d])?.f_index_select(0, &pos_rows)?;
        let mut between = pairwise_dist(&means, &means)?;
        let eye = Tensor::f_eye(n_lab, (Kind::Bool, features.device()))?;
        between = between.f_masked_fill(&eye, f64::INFINITY)?;
        let nearest = between.f_argmin(1, false)?;
        let negatives = means.f_index_select(0, &nearest)?;
        Ok(Mined::from_vectors(
            (means, positives, negatives),
            None,
            Logs::new(),
        ))
    }
}

// ------------------------------------------------------------------------------------------

/// A FIFO memory bank of past batches' (detached) features and labels.
struct Bank {
    features: Tensor,
    labels: Vec<i64>,
    bs: usize,
    ptr: usize,
    /// Batches written so far, capped at the bank's size in batches.
    filled: usize,
}

impl Bank {
    fn size(&self) -> usize {
        self.labels.len()
    }

    fn push(&mut self, features: &Tensor, labels: &[i64]) -> Result<()> {
        let bs = labels.len();
        tch::no_grad(|| -> Result<()> {
            let mut slot = self.features.f_narrow(0, self.ptr as i64, bs as i64)?;
            slot.f_copy_(&features.f_detach()?)?;
            Ok(())
        })?;
        self.labels[self.ptr..self.ptr + bs].copy_from_slice(labels);
        self.ptr = (self.ptr + bs) % self.size();
        self.filled = (self.filled + 1).min(self.size() / self.bs);
        Ok(())
    }

    fn state(&self) -> Result<MinerState> {
        Ok(MinerState {
            meta: serde_json::json!({ "bs": self.bs, "ptr": self.ptr, "filled": self.filled }),
            tensors: vec![
                (
                    "bank_features".into(),
                    self.features.f_to_device(Device::Cpu)?,
                ),
                ("bank_labels".into(), Tensor::f_from_slice(&self.labels)?),
            ],
        })
    }

    fn load(state: MinerState, name: &str, size_in_batches: usize) -> Result<Option<Bank>> {
        if state.meta.is_null() {
            return Ok(None);
        }
        let bad = || Error::input(format!("the checkpoint's {name} miner state is malformed"));
        let get = |k: &str| state.meta.get(k).and_then(|v| v.as_u64()).ok_or_else(bad);
        let (bs, ptr, filled) = (
            get("bs")? as usize,
            get("ptr")? as usize,
            get("filled")? as usize,
        );
        let find = |k: &str| state.tensors.iter().find(|(n, _)| n == k).map(|(_, t)| t);
        let features = find("bank_features").ok_or_else(bad)?.f_detach()?.copy();
        let labels = Vec::<i64>::try_from(find("bank_labels").ok_or_else(bad)?)?;
        if bs == 0
            || labels.len() % bs != 0
            || ptr >= labels.len()
            || ptr % bs != 0
            || features.dim() != 2
            || features.size()[0] as usize != labels.len()
        {
            return Err(bad());
        }
        if labels.len() != bs * size_in_batches {
            return Err(Error::input(format!(
                "the checkpoint's {name} bank holds {} rows, this config asks for {size_in_batches} batches of {bs}",
                labels.len()
            )));
        }
        Ok(Some(Bank {
            features,
            labels,
            bs,
            ptr,
            filled,
        }))
    }
}

/// Ordered positive pairs of each group: for every group (in the given order) the pairs
/// `(i, j)`, `i < j` in row order, followed by the same pairs flipped.
fn pos_pairs_of(group: &[usize], out: &mut Vec<(usize, usize)>) {
    let start = out.len();
    for (x, &i) in group.iter().enumerate() {
        for &j in &group[x + 1..] {
            out.push((i, j));
        }
    }
    let end = out.len();
    for k in start..end {
        let (i, j) = out[k];
        out.push((j, i));
    }
}

/// OML's `TripletMinerWithMemory`: the batch's own triplets plus `tri_expand_k - 1` times as
/// many drawn with a memory bank of `bank_size_in_batches` past batches:
/// - part 1: every ordered positive pair of the batch x every batch row of another label;
/// - part 2: `n2 = floor(n1 (k-1) / 2)` positive pairs from the bank (whole label groups are
///   drawn until there are enough, shuffled, cut to n2), each with a random batch row as
///   negative, kept where the labels differ;
/// - part 3: n2 random batch positive pairs (with replacement), each with a random bank row
///   as negative, kept where the labels differ.
///
/// Output order `[part 3, part 2, part 1]`; `is_original` marks part 1. The bank starts as
/// labels `-1..-bs` (repeated) with one-hot features, and takes each batch FIFO after mining.
pub struct TripletsWithMemory {
    pub bank_size_in_batches: usize,
    pub tri_expand_k: usize,
    bank: Option<Bank>,
}

/// The largest memory bank, in batches (the bank is allocated whole at the first batch).
pub const MAX_BANK_BATCHES: usize = 4096;

impl TripletsWithMemory {
    pub fn new(bank_size_in_batches: usize, tri_expand_k: usize) -> Result<TripletsWithMemory> {
        if tri_expand_k < 1 {
            return Err(Error::input(
                "triplets_with_memory: tri_expand_k must be >= 1",
            ));
        }
        if !(1..=MAX_BANK_BATCHES).contains(&bank_size_in_batches) {
            return Err(Error::input(format!(
                "config key 'loss.miner.bank_size_in_batches': {bank_size_in_batches} must be 1 to {MAX_BANK_BATCHES} (triplets_with_memory)"
            )));
        }
        Ok(TripletsWithMemory {
            bank_size_in_batches,
            tri_expand_k,
            bank: None,
        })
    }

    fn allocate(&mut self, features: &Tensor, bs: usize) -> Result<()> {
        if self.bank.is_some() {
            return Ok(());
        }
        let d = features.size()[1];
        let size = self.bank_size_in_batches * bs;
        let labels: Vec<i64> = (0..size).map(|i| -((i % bs) as i64 + 1)).collect();
        let mut one_hot = vec![0f32; size * d as usize];
        for (i, l) in labels.iter().enumerate() {
            one_hot[i * d as usize + l.unsigned_abs().min(d as u64 - 1) as usize] = 1.0;
        }
        let features = Tensor::f_from_slice(&one_hot)?
            .f_view([size as i64, d])?
            .f_to_kind(features.kind())?
            .f_to_device(features.device())?;
        self.bank = Some(Bank {
            features,
            labels,
            bs,
            ptr: 0,
            filled: 0,
        });
        Ok(())
    }
}

impl Miner for TripletsWithMemory {
    fn name(&self) -> &'static str {
        "triplets_with_memory"
    }

    fn mine(&mut self, features: &Tensor, labels: &[i64], rng: &mut Rng) -> Result<Mined> {
        let groups = check_batch(self.name(), features, labels)?;
        let bs = labels.len();
        self.allocate(features, bs)?;
        let bank = self.bank.as_mut().unwrap();
        if bank.bs != bs {
            return Err(Error::input(format!(
                "the triplets_with_memory miner needs one batch size throughout (its bank was sized for {}, got a batch of {bs}); use a balance sampler or drop_last = true",
                bank.bs
            )));
        }
        // Part 1.
        let mut batch_pairs = Vec::new();
        for g in groups.values() {
            pos_pairs_of(g, &mut batch_pairs);
        }
        let mut t1 = TripletIds::default();
        for &(a, p) in &batch_pairs {
            for n in 0..bs {
                if labels[a] != labels[n] {
                    t1.push(a, p, n);
                }
            }
        }
        let n1 = t1.len();
        let n2 = n1 * (self.tri_expand_k - 1) / 2;
        // Part 2: anchors and positives from the bank, negatives from the batch.
        let mut bank_groups: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
        for (i, &l) in bank.labels.iter().enumerate() {
            bank_groups.entry(l).or_default().push(i);
        }
        let bank_groups: Vec<Vec<usize>> = bank_groups.into_values().collect();
        let mut t2 = TripletIds::default();
        // OML loops forever when the bank has no positive pair; simile draws none instead.
        if n2 > 0 && bank_groups.iter().any(|g| g.len() >= 2) {
            let mut pairs = Vec::new();
            while pairs.len() < n2 {
                let g = &bank_groups[rng::below(rng, bank_groups.len())];
                pos_pairs_of(g, &mut pairs);
            }
            rng::shuffle(rng, &mut pairs);
            pairs.truncate(n2);
            for (a, p) in pairs {
                let n = rng::below(rng, bs);
                if bank.labels[a] != labels[n] {
                    t2.push(a, p, n);
                }
            }
        }
        // Part 3: anchors and positives from the batch, negatives from the bank.
        let mut t3 = TripletIds::default();
        for _ in 0..n2 {
            let n = rng::below(rng, bank.size());
            let (a, p) = batch_pairs[rng::below(rng, batch_pairs.len())];
            if labels[a] != bank.labels[n] {
                t3.push(a, p, n);
            }
        }
        let dev = features.device();
        let take = |from: &Tensor, ids: &[i64]| -> Result<Tensor> {
            Ok(from.f_index_select(0, &index_tensor(ids, dev)?)?)
        };
        let (a1, p1, n1t) = t1.gather(features)?;
        let (a2, p2, n2t) = (
            take(&bank.features, &t2.a)?,
            take(&bank.features, &t2.p)?,
            take(features, &t2.n)?,
        );
        let (a3, p3, n3t) = (
            take(features, &t3.a)?,
            take(features, &t3.p)?,
            take(&bank.features, &t3.n)?,
        );
        let anchors = Tensor::f_cat(&[a3, a2, a1], 0)?;
        let positives = Tensor::f_cat(&[p3, p2, p1], 0)?;
        let negatives = Tensor::f_cat(&[n3t, n2t, n1t], 0)?;
        let mut is_original = vec![false; t3.len() + t2.len()];
        is_original.resize(t3.len() + t2.len() + n1, true);
        bank.push(features, labels)?;
        let mut logs = Logs::new();
        logs.insert("n_tri_orig".into(), n1 as f64);
        logs.insert("n_tri_bank".into(), (t2.len() + t3.len()) as f64);
        Ok(Mined::from_vectors(
            (anchors, positives, negatives),
            Some(is_original),
            logs,
        ))
    }

    fn state(&self) -> Result<MinerState> {
        match &self.bank {
            Some(b) => b.state(),
            None => Ok(MinerState::default()),
        }
    }

    fn load_state(&mut self, state: MinerState) -> Result<()> {
        self.bank = Bank::load(state, self.name(), self.bank_size_in_batches)?;
        Ok(())
    }
}

// ------------------------------------------------------------------------------------------

/// OML's `MinerWithBank`: a FIFO bank of the last `bank_size_in_batches` batches. Until it is
/// full, n-hard mining inside the batch; then over `[batch; bank]` with only batch rows as
/// anchors. `ids` index `[batch; bank]`. Logs (averaged over anchors, over the distinct
/// triplets): `positives_from_bank`, `positives_from_batch`, `negatives_from_bank`,
/// `negatives_from_batch`.
pub struct MinerWithBank {
    pub bank_size_in_batches: usize,
    pub miner: NHardTriplets,
    pub need_logs: bool,
    bank: Option<Bank>,
}

impl MinerWithBank {
    pub fn new(
        bank_size_in_batches: usize,
        miner: NHardTriplets,
        need_logs: bool,
    ) -> Result<MinerWithBank> {
        if !(1..=MAX_BANK_BATCHES).contains(&bank_size_in_batches) {
            return Err(Error::input(format!(
                "config key 'loss.miner.bank_size_in_batches': {bank_size_in_batches} must be 1 to {MAX_BANK_BATCHES} (miner_with_bank)"
            )));
        }
        Ok(MinerWithBank {
            bank_size_in_batches,
            miner,
            need_logs,
            bank: None,
        })
    }

    fn is_accumulated(&self) -> bool {
        self.bank
            .as_ref()
            .is_some_and(|b| b.filled >= self.bank_size_in_batches)
    }

    fn logs(ids: &TripletIds, n_batch: usize) -> Logs {
        let uniq = ids.to_set();
        let mut pos: BTreeMap<i64, BTreeSet<i64>> = BTreeMap::new();
        let mut neg: BTreeMap<i64, BTreeSet<i64>> = BTreeMap::new();
        for (a, p, n) in uniq {
            pos.entry(a).or_default().insert(p);
            neg.entry(a).or_default().insert(n);
        }
        let nb = n_batch as i64;
        let mut sums = [0f64; 4];
        for (a, ps) in &pos {
            let pb = ps.iter().filter(|&&p| p >= nb).count();
            let ns = &neg[a];
            let nbk = ns.iter().filter(|&&n| n >= nb).count();
            sums[0] += pb as f64;
            sums[1] += (ps.len() - pb) as f64;
            sums[2] += nbk as f64;
            sums[3] += (ns.len() - nbk) as f64;
        }
        let k = pos.len().max(1) as f64;
        let mut logs = Logs::new();
        if !pos.is_empty() {
            for (name, s) in [
                "positives_from_bank",
                "positives_from_batch",
                "negatives_from_bank",
                "negatives_from_batch",
            ]
            .into_iter()
            .zip(sums)
            {
                logs.insert(name.into(), s / k);
            }
        }
        logs
    }
}

impl Miner for MinerWithBank {
    fn name(&self) -> &'static str {
        "miner_with_bank"
    }

    fn mine(&mut self, features: &Tensor, labels: &[i64], _rng: &mut Rng) -> Result<Mined> {
        let bs = labels.len();
        if features.dim() != 2 || features.size()[0] as usize != bs {
            return Err(Error::internal(
                "miner_with_bank: features and labels differ in length",
            ));
        }
        if self.bank.is_none() {
            let d = features.size()[1];
            let size = self.bank_size_in_batches * bs;
            self.bank = Some(Bank {
                features: Tensor::f_zeros([size as i64, d], (features.kind(), features.device()))?,
                labels: vec![i64::MIN; size],
                bs,
                ptr: 0,
                filled: 0,
            });
        }
        if self.bank.as_ref().unwrap().bs != bs {
            return Err(Error::input(format!(
                "the miner_with_bank miner needs one batch size throughout (its bank was sized for {}, got a batch of {bs}); use a balance sampler or drop_last = true",
                self.bank.as_ref().unwrap().bs
            )));
        }
        let (ids, all) = if self.is_accumulated() {
            let bank = self.bank.as_ref().unwrap();
            let all = Tensor::f_cat(&[features, &bank.features], 0)?;
            let mut all_labels = labels.to_vec();
            all_labels.extend_from_slice(&bank.labels);
            let mut ignore = vec![false; bs];
            ignore.resize(all_labels.len(), true);
            (self.miner.mine_ids(&all, &all_labels, Some(&ignore))?, all)
        } else {
            (
                self.miner.mine_ids(features, labels, None)?,
                features.shallow_clone(),
            )
        };
        let logs = if self.need_logs {
            Self::logs(&ids, bs)
        } else {
            Logs::new()
        };
        self.bank.as_mut().unwrap().push(features, labels)?;
        Mined::from_ids(ids, &all, logs)
    }

    fn state(&self) -> Result<MinerState> {
        match &self.bank {
            Some(b) => b.state(),
            None => Ok(MinerState::default()),
        }
    }

    fn load_state(&mut self, state: MinerState) -> Result<()> {
        self.bank = Bank::load(state, self.name(), self.bank_size_in_batches)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feats(rows: &[&[f32]]) -> Tensor {
        let d = rows[0].len() as i64;
        let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_slice(&flat).view([-1, d])
    }

    /// A random batch: `n_labels` labels with 2..=max_inst rows each (shuffled), `[B, d]` features.
    fn random_batch(
        r: &mut Rng,
        n_labels: usize,
        max_inst: usize,
        d: i64,
        balanced: bool,
    ) -> (Tensor, Vec<i64>) {
        let mut labels = Vec::new();
        for l in 0..n_labels {
            let c = if balanced {
                max_inst
            } else {
                2 + rng::below(r, max_inst - 1)
            };
            labels.extend(std::iter::repeat_n(l as i64 * 3 + 1, c));
        }
        rng::shuffle(r, &mut labels);
        let vals: Vec<f32> = (0..labels.len() as i64 * d)
            .map(|_| rng::unit(r) as f32 * 2.0 - 1.0)
            .collect();
        (Tensor::from_slice(&vals).view([-1, d]), labels)
    }

    fn dist_host(f: &Tensor) -> Vec<f32> {
        to_host_matrix(&pairwise_dist(f, f).unwrap()).unwrap().0
    }

    /// The naive enumeration count: Σ_label 2·C(cnt,2)·(B − cnt).
    fn n_all(labels: &[i64]) -> usize {
        let mut c: BTreeMap<i64, usize> = BTreeMap::new();
        for &l in labels {
            *c.entry(l).or_insert(0) += 1;
        }
        c.values().map(|&k| k * (k - 1) * (labels.len() - k)).sum()
    }

    #[test]
    fn pairwise_dist_is_euclidean_with_safe_gradients() {
        let x = feats(&[&[0.0, 0.0], &[3.0, 4.0], &[3.0, 4.0]]).set_requires_grad(true);
        let d = pairwise_dist(&x, &x).unwrap();
        let v = to_host_matrix(&d).unwrap().0;
        assert!((v[1] - 5.0).abs() < 1e-5 && v[5].abs() < 1e-5 && v[0].abs() < 1e-5);
        d.sum(Kind::Float).backward();
        let g = Vec::<f32>::try_from(&x.grad().view([-1])).unwrap();
        assert!(g.iter().all(|v| v.is_finite()), "{g:?}");
        let e = elementwise_dist(&x, &x.flip([0])).unwrap();
        let ev = Vec::<f32>::try_from(&e).unwrap();
        assert!((ev[0] - 5.0).abs() < 1e-6 && ev[1].abs() < 1e-6);
    }

    #[test]
    fn all_triplets_matches_naive_enumeration() {
        let mut r = rng::seeded(11, 0);
        for _ in 0..20 {
            let n_lab = 2 + rng::below(&mut r, 5);
            let (f, labels) = random_batch(&mut r, n_lab, 5, 4, false);
            let m = AllTriplets::new(usize::MAX)
                .unwrap()
                .mine(&f, &labels, &mut r)
                .unwrap();
            let ids = m.ids.clone().unwrap();
            assert_eq!(ids.len(), n_all(&labels));
            // Naive: the set of all valid (a, p, n).
            let b = labels.len();
            let mut naive = BTreeSet::new();
            for a in 0..b {
                for p in 0..b {
                    for n in 0..b {
                        if a != p && labels[a] == labels[p] && labels[n] != labels[a] {
                            naive.insert((a as i64, p as i64, n as i64));
                        }
                    }
                }
            }
            assert_eq!(ids.to_set(), naive);
            assert_eq!(m.vectors().unwrap().0.size(), vec![ids.len() as i64, 4]);
        }
        // Balanced batch: n_labels(n_labels−1)(n_inst−1)n_inst².
        let (f, labels) = random_batch(&mut r, 4, 3, 2, true);
        let m = AllTriplets::new(usize::MAX)
            .unwrap()
            .mine(&f, &labels, &mut r)
            .unwrap();
        assert_eq!(m.len(), 4 * 3 * 2 * 9);
        // max_output_triplets: a distinct subset of the right size.
        let m = AllTriplets::new(50)
            .unwrap()
            .mine(&f, &labels, &mut r)
            .unwrap();
        let ids = m.ids.unwrap();
        assert_eq!(ids.len(), 50);
        assert_eq!(ids.to_set().len(), 50);
        assert!(ids
            .to_set()
            .is_subset(&AllTriplets::enumerate(&labels).to_set()));
    }

    #[test]
    fn in_batch_miners_reject_bad_batches() {
        let f = Tensor::zeros([3, 2], (Kind::Float, Device::Cpu));
        let mut r = rng::seeded(0, 0);
        let e = HardTriplets.mine(&f, &[1, 1, 2], &mut r).unwrap_err();
        assert!(e.to_string().contains("label 2 has 1"), "{e}");
        assert_eq!(e.exit_code(), 2);
        let e = AllTriplets::new(10)
            .unwrap()
            .mine(&f, &[1, 1, 1], &mut r)
            .unwrap_err();
        assert!(e.to_string().contains("at least 2 labels"), "{e}");
    }

    #[test]
    fn hard_triplets_manual_case() {
        let labels = [0, 0, 1, 1];
        let dist = [
            0.0, 0.3, 0.2, 0.4, //
            0.3, 0.0, 0.4, 0.8, //
            0.2, 0.4, 0.0, 0.5, //
            0.4, 0.8, 0.5, 0.0,
        ];
        let ids = HardTriplets::from_distances(&dist, &labels);
        let want: BTreeSet<_> = [(0, 1, 2), (1, 0, 2), (2, 3, 0), (3, 2, 0)].into();
        assert_eq!(ids.to_set(), want);
    }

    #[test]
    fn hard_triplets_are_the_hardest() {
        let mut r = rng::seeded(12, 0);
        for _ in 0..20 {
            let n_lab = 2 + rng::below(&mut r, 4);
            let (f, labels) = random_batch(&mut r, n_lab, 5, 3, false);
            let b = labels.len();
            let m = HardTriplets.mine(&f, &labels, &mut r).unwrap();
            let ids = m.ids.unwrap();
            assert_eq!(ids.len(), b);
            let d = dist_host(&f);
            for i in 0..b {
                let (a, p, n) = (ids.a[i] as usize, ids.p[i] as usize, ids.n[i] as usize);
                assert_eq!(a, i);
                for j in 0..b {
                    if labels[j] == labels[a] {
                        assert!(d[a * b + p] >= d[a * b + j]);
                    } else {
                        assert!(d[a * b + n] <= d[a * b + j]);
                    }
                }
            }
        }
    }

    #[test]
    fn n_hard_special_cases_and_counts() {
        let mut r = rng::seeded(13, 0);
        for _ in 0..20 {
            let n_lab = 2 + rng::below(&mut r, 4);
            let (f, labels) = random_batch(&mut r, n_lab, 6, 3, false);
            let hard = HardTriplets.mine(&f, &labels, &mut r).unwrap().ids.unwrap();
            let one = NHardTriplets::new(NHard::Range([1, 1]), NHard::Range([1, 1]))
                .unwrap()
                .mine(&f, &labels, &mut r)
                .unwrap()
                .ids
                .unwrap();
            assert_eq!(one.to_set(), hard.to_set());
            let huge = NHardTriplets::new(NHard::Top(1000), NHard::Top(1000))
                .unwrap()
                .mine(&f, &labels, &mut r)
                .unwrap()
                .ids
                .unwrap();
            assert_eq!(huge.to_set(), AllTriplets::enumerate(&labels).to_set());
            assert_eq!(huge.len(), n_all(&labels));
        }
        // Balanced 4 labels x 6: ranges (2,4) x (3,7) give B·3·5 triplets, with the right ranks.
        let (f, labels) = random_batch(&mut r, 4, 6, 3, true);
        let m = NHardTriplets::new(NHard::Range([2, 4]), NHard::Range([3, 7])).unwrap();
        let ids = m.mine_ids(&f, &labels, None).unwrap();
        let b = labels.len();
        assert_eq!(ids.len(), b * 3 * 5);
        let d = dist_host(&f);
        for i in 0..ids.len() {
            let (a, p, n) = (ids.a[i] as usize, ids.p[i] as usize, ids.n[i] as usize);
            let farther = (0..b)
                .filter(|&j| j != a && labels[j] == labels[a] && d[a * b + j] > d[a * b + p])
                .count();
            assert!((1..=3).contains(&farther), "positive rank {}", farther + 1);
            let nearer = (0..b)
                .filter(|&j| labels[j] != labels[a] && d[a * b + j] < d[a * b + n])
                .count();
            assert!((2..=6).contains(&nearer), "negative rank {}", nearer + 1);
        }
        assert!(NHard::Range([0, 3]).slice().is_err());
        assert!(NHard::Range([3, 2]).slice().is_err());
        assert!(NHard::Top(0).slice().is_err());
    }

    #[test]
    fn hard_cluster_cases() {
        // OML's intra-distance case.
        let g = feats(&[
            &[1.0, 0.0, 0.0, 0.0],
            &[1.0, 0.0, 0.0, 0.0],
            &[1.0, 0.0, 0.0, 3.0],
        ])
        .view([1, 3, 4]);
        let intra =
            Vec::<f32>::try_from(&HardCluster::intra_distances(&g).unwrap().view([-1])).unwrap();
        for (x, y) in intra.iter().zip([1.0, 1.0, 4.0]) {
            assert!((x - y).abs() < 1e-5, "{intra:?}");
        }
        // Three labels on a line: means 0, 10, 30 (x coordinate).
        let f = feats(&[
            &[-1.0, 0.0],
            &[9.0, 0.0],
            &[31.0, 0.0],
            &[1.0, 0.0],
            &[11.5, 0.0],
            &[29.0, 0.0],
        ]);
        let labels = [5, 7, 9, 5, 7, 9];
        let m = HardCluster
            .mine(&f, &labels, &mut rng::seeded(0, 0))
            .unwrap();
        let x = |t: &Tensor| Vec::<f32>::try_from(&t.select(1, 0)).unwrap();
        let (ma, mp, mn) = m.vectors().unwrap();
        assert_eq!(x(&ma), vec![0.0, 10.25, 30.0]);
        // Two instances are equally far from their mean: ties go to the first row.
        assert_eq!(x(&mp), vec![-1.0, 9.0, 31.0]);
        assert_eq!(x(&mn), vec![10.25, 0.0, 10.25]);
        assert!(m.ids.is_none());
        let e = HardCluster
            .mine(&f.narrow(0, 0, 5), &labels[..5], &mut rng::seeded(0, 0))
            .unwrap_err();
        assert!(e.to_string().contains("equal number of samples"), "{e}");
    }

    #[test]
    fn memory_bank_counts() {
        let (n_l, n_i, k) = (4usize, 3usize, 3usize);
        let mut miner = TripletsWithMemory::new(4, k).unwrap();
        let mut r = rng::seeded(14, 0);
        let orig = n_l * (n_l - 1) * (n_i - 1) * n_i * n_i;
        for step in 0..12 {
            // Labels from a pool of 20 so that later batches share some labels with the bank.
            let all: Vec<i64> = (0..20).collect();
            let pool: Vec<i64> = rng::choose(&mut r, &all, n_l);
            let labels: Vec<i64> = pool
                .iter()
                .flat_map(|&l| std::iter::repeat_n(l, n_i))
                .collect();
            let f = Tensor::randn([labels.len() as i64, 8], (Kind::Float, Device::Cpu));
            let m = miner.mine(&f, &labels, &mut r).unwrap();
            let is_orig = m.is_original.clone().unwrap();
            assert_eq!(is_orig.iter().filter(|&&x| x).count(), orig);
            assert!(is_orig[is_orig.len() - orig..].iter().all(|&x| x));
            if step == 0 {
                // The bank holds only its synthetic negative labels: nothing is filtered.
                assert_eq!(m.len(), k * orig);
            } else {
                assert!(m.len() as f64 > 0.9 * (k * orig) as f64, "{}", m.len());
                assert!(m.len() <= k * orig);
            }
            let (ma, _, mn) = m.vectors().unwrap();
            assert_eq!(ma.size(), mn.size());
        }
        // tri_expand_k = 1: only the batch's own triplets.
        let mut m1 = TripletsWithMemory::new(2, 1).unwrap();
        let labels = vec![0, 0, 1, 1];
        let f = Tensor::randn([4, 3], (Kind::Float, Device::Cpu));
        assert_eq!(m1.mine(&f, &labels, &mut r).unwrap().len(), 2 * 4); // n_l(n_l-1)(n_i-1)n_i^2 = 8
                                                                        // bank_size_in_batches = 1 with k > 1 terminates (OML would loop forever).
        let mut m2 = TripletsWithMemory::new(1, 3).unwrap();
        let m = m2.mine(&f, &labels, &mut r).unwrap();
        assert_eq!(m.is_original.unwrap().iter().filter(|&&x| x).count(), 8);
    }

    #[test]
    fn memory_bank_state_round_trips() {
        let mut a = TripletsWithMemory::new(3, 2).unwrap();
        let mut r = rng::seeded(15, 0);
        let labels = vec![0, 0, 1, 1, 2, 2];
        for _ in 0..2 {
            let f = Tensor::randn([6, 4], (Kind::Float, Device::Cpu));
            a.mine(&f, &labels, &mut r).unwrap();
        }
        let st = a.state().unwrap();
        let mut b = TripletsWithMemory::new(3, 2).unwrap();
        b.load_state(MinerState {
            meta: st.meta.clone(),
            tensors: st
                .tensors
                .iter()
                .map(|(n, t)| (n.clone(), t.copy()))
                .collect(),
        })
        .unwrap();
        let f = Tensor::randn([6, 4], (Kind::Float, Device::Cpu));
        let (mut r1, mut r2) = (rng::seeded(1, 1), rng::seeded(1, 1));
        let x = a.mine(&f, &labels, &mut r1).unwrap();
        let y = b.mine(&f, &labels, &mut r2).unwrap();
        let ((xa, _, xn), (ya, _, yn)) = (x.vectors().unwrap(), y.vectors().unwrap());
        assert!(xa.equal(&ya) && xn.equal(&yn));
        assert!(TripletsWithMemory::new(2, 2)
            .unwrap()
            .load_state(a.state().unwrap())
            .is_err());
    }

    #[test]
    fn miner_with_bank_uses_bank_after_accumulation() {
        let mut m = MinerWithBank::new(
            2,
            NHardTriplets::new(NHard::Top(2), NHard::Top(3)).unwrap(),
            true,
        )
        .unwrap();
        let mut r = rng::seeded(16, 0);
        let labels = vec![0, 0, 0, 1, 1, 1];
        // The bank's two slots, in ring order.
        let mut slots: Vec<Tensor> = Vec::new();
        for step in 0..5 {
            let f = Tensor::randn([6, 5], (Kind::Float, Device::Cpu));
            let out = m.mine(&f, &labels, &mut r).unwrap();
            let ids = out.ids.clone().unwrap();
            assert!(ids.a.iter().all(|&a| a < 6), "only batch rows are anchors");
            if step < 2 {
                // In-batch n-hard: each anchor has 2 positives and 3 negatives.
                assert_eq!(ids.len(), 6 * 2 * 3);
                assert!(ids.p.iter().chain(&ids.n).all(|&x| x < 6));
                assert_eq!(out.logs["positives_from_bank"], 0.0);
            } else {
                // Over [batch; bank of 12]: 8 positives and 9 negatives per anchor, so the
                // same counts but drawn from 18 rows, and equal to the naive rule there.
                let all = Tensor::cat(&[&f, &slots[0], &slots[1]], 0);
                let mut all_labels = labels.clone();
                all_labels.extend(labels.iter().chain(&labels));
                let d = dist_host(&all);
                let mut ignore = vec![false; 6];
                ignore.resize(18, true);
                let want = m.miner.from_distances(&d, &all_labels, Some(&ignore));
                assert_eq!(ids.to_set(), want.to_set());
                assert_eq!(ids.len(), 6 * 2 * 3);
                let logs = &out.logs;
                let total_p = logs["positives_from_bank"] + logs["positives_from_batch"];
                let total_n = logs["negatives_from_bank"] + logs["negatives_from_batch"];
                assert!((total_p - 2.0).abs() < 1e-9 && (total_n - 3.0).abs() < 1e-9);
                assert!(out
                    .vectors()
                    .unwrap()
                    .0
                    .equal(&all.index_select(0, &Tensor::from_slice(&ids.a))));
            }
            if slots.len() < 2 {
                slots.push(f);
            } else {
                slots[step % 2] = f;
            }
        }
    }

    #[test]
    fn config_parses() {
        let c: MinerConfig =
            serde_json::from_str(r#"{"name":"n_hard_triplets","n_positive":[2,5],"n_negative":3}"#)
                .unwrap();
        assert_eq!(
            c,
            MinerConfig::NHardTriplets {
                n_positive: NHard::Range([2, 5]),
                n_negative: NHard::Top(3)
            }
        );
        let c: MinerConfig = serde_json::from_str(r#"{"name":"hard"}"#).unwrap();
        assert_eq!(c, MinerConfig::HardTriplets {});
        let c: MinerConfig = serde_json::from_str(r#"{"name":"all_triplets"}"#).unwrap();
        assert_eq!(c, MinerConfig::default());
        assert!(
            serde_json::from_str::<MinerConfig>(r#"{"name":"hard_triplets","margin":1}"#).is_err()
        );
        let c: MinerConfig = serde_json::from_str(
            r#"{"name":"triplets_with_memory","bank_size_in_batches":50,"tri_expand_k":3}"#,
        )
        .unwrap();
        assert!(c.build().is_ok());
        let c: MinerConfig = serde_json::from_str(
            r#"{"name":"miner_with_bank","bank_size_in_batches":2,"n_positive":[0,3]}"#,
        )
        .unwrap();
        assert!(c.build().is_err());
    }
}
