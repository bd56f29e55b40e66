//! The triplet loss on mined triplets (OML's `TripletLoss`, `TripletLossWithMiner`).
use super::{host, mean_of, Criterion, Logs, LossOutput, Reduction};
use crate::error::{Error, Result};
use crate::train::miner::{elementwise_dist, Miner, MinerState};
use crate::train::sampler::Rng;
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// A triplet margin, or the soft form (`margin = "soft"` in a config; OML's `margin: null`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "MarginRepr", into = "MarginRepr")]
pub enum Margin {
    Value(f64),
    Soft,
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum MarginRepr {
    Value(f64),
    Word(String),
}

impl TryFrom<MarginRepr> for Margin {
    type Error = String;
    fn try_from(r: MarginRepr) -> std::result::Result<Self, String> {
        match r {
            MarginRepr::Value(v) if v > 0.0 => Ok(Margin::Value(v)),
            MarginRepr::Value(v) => Err(format!("margin must be > 0 (or \"soft\"), got {v}")),
            MarginRepr::Word(w) if w == "soft" => Ok(Margin::Soft),
            MarginRepr::Word(w) => Err(format!(
                "margin must be a number > 0 or \"soft\", got \"{w}\""
            )),
        }
    }
}

impl From<Margin> for MarginRepr {
    fn from(m: Margin) -> Self {
        match m {
            Margin::Value(v) => MarginRepr::Value(v),
            Margin::Soft => MarginRepr::Word("soft".into()),
        }
    }
}

/// OML's `TripletLoss`: `d_p = ||a - p||`, `d_n = ||a - n||` (Euclidean, not squared);
/// `relu(margin + d_p - d_n)`, or with the soft margin `log1p(exp(d_p - d_n))`.
#[derive(Debug, Clone, Copy)]
pub struct TripletLoss {
    pub margin: Margin,
    pub reduction: Reduction,
}

/// Per-triplet values of a triplet loss.
pub struct TripletTerms {
    pub loss: Tensor,
    pub d_pos: Tensor,
    pub d_neg: Tensor,
}

impl TripletLoss {
    pub fn new(margin: Margin, reduction: Reduction) -> Result<TripletLoss> {
        if let Margin::Value(v) = margin {
            if v.is_nan() || v <= 0.0 {
                return Err(Error::input(format!(
                    "triplet loss: margin must be > 0, got {v}"
                )));
            }
        }
        Ok(TripletLoss { margin, reduction })
    }

    pub fn terms(&self, a: &Tensor, p: &Tensor, n: &Tensor) -> Result<TripletTerms> {
        self.terms_of_distances(elementwise_dist(a, p)?, elementwise_dist(a, n)?)
    }

    /// The terms from the `[T]` anchor-positive and anchor-negative distances.
    pub fn terms_of_distances(&self, d_pos: Tensor, d_neg: Tensor) -> Result<TripletTerms> {
        let diff = d_pos.f_sub(&d_neg)?;
        let loss = match self.margin {
            Margin::Value(m) => diff.f_add_scalar(m)?.f_relu()?,
            Margin::Soft => diff.f_exp()?.f_log1p()?,
        };
        Ok(TripletTerms { loss, d_pos, d_neg })
    }

    /// The reduced loss with OML's logs `active_tri`, `pos_dist`, `neg_dist`.
    pub fn forward(&self, a: &Tensor, p: &Tensor, n: &Tensor) -> Result<LossOutput> {
        let t = self.terms(a, p, n)?;
        let logs = triplet_logs(&t, None)?;
        Ok(LossOutput {
            loss: self.reduction.apply(&t.loss)?,
            logs,
        })
    }
}

/// `active_tri`, `pos_dist`, `neg_dist`, and with `is_original` (a memory-bank miner) the
/// same split into the batch's own triplets (`orig`) and those drawn with the bank (`bank`).
fn triplet_logs(t: &TripletTerms, is_original: Option<&[bool]>) -> Result<Logs> {
    let (l, dp, dn) = (host(&t.loss)?, host(&t.d_pos)?, host(&t.d_neg)?);
    let mut logs = Logs::new();
    let all = |_: usize| true;
    let mut put = |suffix: &str, keep: &dyn Fn(usize) -> bool, active: &str| {
        let idx = || (0..l.len()).filter(|&i| keep(i));
        logs.insert(
            active.into(),
            mean_of(idx().map(|i| (l[i] > 0.0) as u8 as f64)),
        );
        logs.insert(
            format!("pos_dist{suffix}"),
            mean_of(idx().map(|i| dp[i] as f64)),
        );
        logs.insert(
            format!("neg_dist{suffix}"),
            mean_of(idx().map(|i| dn[i] as f64)),
        );
    };
    put("", &all, "active_tri");
    if let Some(orig) = is_original {
        put("_orig", &|i| orig[i], "orig_active_tri");
        put("_bank", &|i| !orig[i], "bank_active_tri");
    }
    Ok(logs)
}

/// OML's `TripletLossWithMiner` (registry `triplet`): mines triplets, then the triplet
/// loss. The miner's logs are merged into the loss's.
pub struct TripletWithMiner {
    pub loss: TripletLoss,
    pub miner: Box<dyn Miner>,
}

impl Criterion for TripletWithMiner {
    fn name(&self) -> &'static str {
        "triplet"
    }

    fn forward(&mut self, features: &Tensor, labels: &[i64], rng: &mut Rng) -> Result<LossOutput> {
        let mined = self.miner.mine(features, labels, rng)?;
        let (d_pos, d_neg) = mined.distances()?;
        let t = self.loss.terms_of_distances(d_pos, d_neg)?;
        let mut logs = triplet_logs(&t, mined.is_original.as_deref())?;
        logs.extend(mined.logs);
        Ok(LossOutput {
            loss: self.loss.reduction.apply(&t.loss)?,
            logs,
        })
    }

    fn state(&self) -> Result<MinerState> {
        self.miner.state()
    }

    fn load_state(&mut self, state: MinerState) -> Result<()> {
        self.miner.load_state(state)
    }
}
