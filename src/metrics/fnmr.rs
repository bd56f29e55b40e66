//! FNMR@FMR as OML computes it: the threshold T is numpy's default ('linear') quantile of
//! all negative distances at FMR, and FNMR is the share of positive distances >= T.
//!
//! Two exact ways: from distances in memory ([`fnmr_at_fmr`], e.g. an exhaustive neighbours
//! file), and streaming over pairs that are recomputed on demand ([`Streaming`]), where the
//! quantile is found by histogram refinement on the bits of the f32 distances (16 high bits,
//! then 16 low bits inside the bins that hold the wanted ranks), so memory stays bounded
//! whatever the number of pairs and the result is the same as sorting them all.
use crate::error::{Error, Result};

/// numpy's `_lerp`: a + (b - a)·t, computed from b when t >= 0.5 (as numpy does, so that
/// t = 1 returns b exactly).
fn lerp(a: f64, b: f64, t: f64) -> f64 {
    let d = b - a;
    if t >= 0.5 {
        b - d * (1.0 - t)
    } else {
        a + d * t
    }
}

/// The virtual index of numpy's 'linear' method: (lower rank, upper rank, weight).
fn quantile_ranks(n: usize, q: f64) -> (usize, usize, f64) {
    let h = (n - 1) as f64 * q;
    let lo = (h.floor() as usize).min(n - 1);
    let hi = (lo + 1).min(n - 1);
    (lo, hi, h - lo as f64)
}

/// `np.quantile(x, q)` (method 'linear') of unsorted values; reorders `x`. `None` if empty.
pub fn quantile_linear(x: &mut [f32], q: f64) -> Option<f64> {
    if x.is_empty() {
        return None;
    }
    let (lo, hi, t) = quantile_ranks(x.len(), q);
    let (_, &mut a, rest) = x.select_nth_unstable_by(lo, f32::total_cmp);
    let a = a as f64;
    let b = if hi > lo {
        rest.iter()
            .copied()
            .min_by(f32::total_cmp)
            .unwrap_or(a as f32) as f64
    } else {
        a
    };
    Some(lerp(a, b, t))
}

/// FNMR at each FMR from positive and negative distances (OML's `calc_fnmr_at_fmr`).
/// A value is `None` when there are no positives or no negatives. Reorders `neg`.
pub fn fnmr_at_fmr(pos: &[f32], neg: &mut [f32], fmr: &[f64]) -> Vec<Option<f64>> {
    fmr.iter()
        .map(|&f| {
            if pos.is_empty() {
                return None;
            }
            let t = quantile_linear(neg, f)?;
            let n = pos.iter().filter(|&&p| p as f64 >= t).count();
            Some(n as f64 / pos.len() as f64)
        })
        .collect()
}

/// FNMR@FMR from pair distances and whether each pair is positive (e.g. every row of an
/// exhaustive neighbours file).
pub fn fnmr_from_pairs(distance: &[f32], hits: &[bool], fmr: &[f64]) -> Vec<Option<f64>> {
    let pos: Vec<f32> = distance
        .iter()
        .zip(hits)
        .filter(|(_, &h)| h)
        .map(|(&d, _)| d)
        .collect();
    let mut neg: Vec<f32> = distance
        .iter()
        .zip(hits)
        .filter(|(_, &h)| !h)
        .map(|(&d, _)| d)
        .collect();
    fnmr_at_fmr(&pos, &mut neg, fmr)
}

/// Checks FMR values: non-empty, each in [0, 1].
pub fn check_fmr(fmr: &[f64]) -> Result<()> {
    // Each value adds histogram slots (64 Ki bins, per thread).
    if fmr.len() > 64 {
        return Err(Error::input(format!(
            "--fmr: {} values; give at most 64",
            fmr.len()
        )));
    }
    if let Some(f) = fmr.iter().find(|f| !(0.0..=1.0).contains(*f)) {
        return Err(Error::input(format!(
            "--fmr: every value must be in [0, 1], got {f}"
        )));
    }
    Ok(())
}

/// An order-preserving u32 key of an f32 (negatives included), so that distances can be
/// binned by their bits.
#[inline]
pub fn key(x: f32) -> u32 {
    let b = x.to_bits();
    if b >> 31 == 1 {
        !b
    } else {
        b | 0x8000_0000
    }
}

#[inline]
fn unkey(k: u32) -> f32 {
    if k >> 31 == 1 {
        f32::from_bits(k & 0x7fff_ffff)
    } else {
        f32::from_bits(!k)
    }
}

/// The smallest f32 >= t (so that `p >= t` for an f32 p is `key(p) >= key(that)`).
fn f32_at_least(t: f64) -> f32 {
    let c = t as f32;
    if (c as f64) < t {
        unkey(key(c) + 1)
    } else {
        c
    }
}

const BINS: usize = 1 << 16;

/// Per-thread counts of one pass.
#[derive(Clone)]
pub struct Counts {
    /// Pass 1: counts of negatives and positives by the high 16 bits of the key.
    pub neg_hi: Vec<u64>,
    pub pos_hi: Vec<u64>,
    /// Pass 2: counts by the low 16 bits, one block of BINS per watched high bin.
    pub neg_lo: Vec<u64>,
    pub pos_lo: Vec<u64>,
    /// Pass 3: positives >= each threshold.
    pub pos_ge: Vec<u64>,
}

/// Which pass the pairs are being fed to, with what it needs.
pub enum Pass<'a> {
    /// Histogram of high bits.
    High,
    /// Low bits inside watched high bins: `slot[hi]` is the block index or u16::MAX.
    Low { slot: &'a [u16] },
    /// Count positives >= each threshold key.
    Count { thresholds: &'a [u32] },
}

impl Counts {
    pub fn new(pass: &Pass) -> Counts {
        let (hi, lo, ge) = match pass {
            Pass::High => (BINS, 0, 0),
            Pass::Low { slot } => {
                let n = slot.iter().filter(|&&s| s != u16::MAX).count();
                (0, n * BINS, 0)
            }
            Pass::Count { thresholds } => (0, 0, thresholds.len()),
        };
        Counts {
            neg_hi: vec![0; hi],
            pos_hi: vec![0; hi],
            neg_lo: vec![0; lo],
            pos_lo: vec![0; lo],
            pos_ge: vec![0; ge],
        }
    }

    /// Feeds one pair's distance.
    #[inline]
    pub fn add(&mut self, pass: &Pass, d: f32, positive: bool) {
        let k = key(d);
        match pass {
            Pass::High => {
                let h = (k >> 16) as usize;
                if positive {
                    self.pos_hi[h] += 1;
                } else {
                    self.neg_hi[h] += 1;
                }
            }
            Pass::Low { slot } => {
                let s = slot[(k >> 16) as usize];
                if s != u16::MAX {
                    let i = s as usize * BINS + (k & 0xffff) as usize;
                    if positive {
                        self.pos_lo[i] += 1;
                    } else {
                        self.neg_lo[i] += 1;
                    }
                }
            }
            Pass::Count { thresholds } => {
                if positive {
                    for (c, &t) in self.pos_ge.iter_mut().zip(thresholds.iter()) {
                        *c += (k >= t) as u64;
                    }
                }
            }
        }
    }

    pub fn merge(mut self, o: &Counts) -> Counts {
        for (a, b) in [
            (&mut self.neg_hi, &o.neg_hi),
            (&mut self.pos_hi, &o.pos_hi),
            (&mut self.neg_lo, &o.neg_lo),
            (&mut self.pos_lo, &o.pos_lo),
            (&mut self.pos_ge, &o.pos_ge),
        ] {
            for (x, y) in a.iter_mut().zip(b) {
                *x += *y;
            }
        }
        self
    }
}

/// Exact FNMR@FMR over pairs that a caller can enumerate several times (at most three
/// passes): `feed(pass)` must visit every (distance, is_positive) pair once and return the
/// summed counts.
pub fn streaming_fnmr(
    fmr: &[f64],
    mut feed: impl FnMut(&Pass) -> Result<Counts>,
) -> Result<Vec<Option<f64>>> {
    if fmr.is_empty() {
        return Ok(Vec::new());
    }
    let c1 = feed(&Pass::High)?;
    let n_neg: u64 = c1.neg_hi.iter().sum();
    let n_pos: u64 = c1.pos_hi.iter().sum();
    if n_neg == 0 || n_pos == 0 {
        return Ok(vec![None; fmr.len()]);
    }
    // The high bin of a rank among the negatives, and the rank's offset inside it.
    let locate = |hist: &[u64], mut rank: u64| -> (usize, u64) {
        for (b, &c) in hist.iter().enumerate() {
            if rank < c {
                return (b, rank);
            }
            rank -= c;
        }
        unreachable!("rank below the total count")
    };
    struct Want {
        lo: (usize, u64),
        hi: (usize, u64),
        t: f64,
    }
    let mut wants: Vec<Want> = fmr
        .iter()
        .map(|&f| {
            let (lo, hi, t) = quantile_ranks(n_neg as usize, f);
            Want {
                lo: locate(&c1.neg_hi, lo as u64),
                hi: locate(&c1.neg_hi, hi as u64),
                t,
            }
        })
        .collect();
    // Watch the bins of the wanted negatives, and for positives every bin the threshold
    // can fall in (between the two order statistics), when that span is short.
    const MAX_SPAN: usize = 8;
    let mut slot = vec![u16::MAX; BINS];
    let mut n_slots = 0u16;
    let mut watch = |b: usize, slot: &mut Vec<u16>| {
        if slot[b] == u16::MAX {
            slot[b] = n_slots;
            n_slots += 1;
        }
    };
    for w in &wants {
        if w.hi.0 - w.lo.0 <= MAX_SPAN {
            for b in w.lo.0..=w.hi.0 {
                watch(b, &mut slot);
            }
        } else {
            watch(w.lo.0, &mut slot);
            watch(w.hi.0, &mut slot);
        }
    }
    let c2 = feed(&Pass::Low { slot: &slot })?;
    let value_of = |(b, r): (usize, u64)| -> f32 {
        let block = &c2.neg_lo[slot[b] as usize * BINS..][..BINS];
        let (lo, _) = locate(block, r);
        unkey(((b as u32) << 16) | lo as u32)
    };
    for w in wants.iter_mut() {
        let a = value_of(w.lo) as f64;
        let b = value_of(w.hi) as f64;
        w.t = lerp(a, b, w.t);
    }
    let thresholds: Vec<u32> = wants.iter().map(|w| key(f32_at_least(w.t))).collect();
    // Positives >= T: whole high bins above T's bin, plus the low-bit counts inside it.
    let mut ge: Vec<Option<u64>> = thresholds
        .iter()
        .map(|&tk| {
            let b = (tk >> 16) as usize;
            let above: u64 = c1.pos_hi[b + 1..].iter().sum();
            if c1.pos_hi[b] == 0 {
                return Some(above);
            }
            if slot[b] == u16::MAX {
                return None;
            }
            let block = &c2.pos_lo[slot[b] as usize * BINS..][..BINS];
            Some(above + block[(tk & 0xffff) as usize..].iter().sum::<u64>())
        })
        .collect();
    if ge.iter().any(Option::is_none) {
        let c3 = feed(&Pass::Count {
            thresholds: &thresholds,
        })?;
        for (g, c) in ge.iter_mut().zip(&c3.pos_ge) {
            g.get_or_insert(*c);
        }
    }
    Ok(ge
        .into_iter()
        .map(|g| g.map(|g| g as f64 / n_pos as f64))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_keep_order() {
        let xs = [-3.5f32, -1e-30, -0.0, 0.0, 1e-40, 0.5, 1.0, 7.25e20];
        for w in xs.windows(2) {
            assert!(key(w[0]) <= key(w[1]), "{w:?}");
            assert_eq!(unkey(key(w[0])).to_bits(), w[0].to_bits());
        }
        assert_eq!(f32_at_least(0.1), 0.1f32.max(f32_at_least(0.1)));
        assert!(f32_at_least(0.1) as f64 >= 0.1);
    }

    #[test]
    fn numpy_linear_quantile() {
        // np.quantile([3,3,4,4,6,6,7,7,8,8], [0, .1, .25, .5, 1]) = [3, 3, 4, 6, 8]
        let mut x = [3f32, 3., 4., 4., 6., 6., 7., 7., 8., 8.];
        for (q, want) in [(0.0, 3.0), (0.1, 3.0), (0.25, 4.0), (0.5, 6.0), (1.0, 8.0)] {
            assert_eq!(quantile_linear(&mut x, q), Some(want));
        }
        // np.quantile([1, 2], 0.3) = 1.3
        let mut y = [2f32, 1.];
        assert!((quantile_linear(&mut y, 0.3).unwrap() - 1.3).abs() < 1e-12);
    }
}
