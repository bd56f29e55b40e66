//! A query's candidate buffer: threshold-filtered insertion, compacted by selection.
//!
//! Scores arrive in any order. The buffer admits a score only if it is at most `limit`, the
//! `keep`-th best score seen so far plus `slack` (infinite until `keep` scores are in), and
//! when it fills up, it selects the `keep` best (quickselect), drops everything beyond
//! `limit`, and tightens `limit`. After a few thousand scores almost nothing passes the
//! threshold, so the cost per score is one comparison (done in registers by the kernels).
//!
//! What it guarantees: at the end it holds every admitted score `s` with
//! `s <= (keep-th best score) + slack`, ties included. With `slack` twice the error bound of
//! the scores, that is every row that can be in the true top-`keep`.
use std::cmp::Ordering;

#[derive(Clone, Debug)]
pub struct Candidates {
    buf: Vec<(f32, u32)>,
    keep: usize,
    slack: f32,
    limit: f32,
    cap: usize,
}

#[inline]
fn by_score(a: &(f32, u32), b: &(f32, u32)) -> Ordering {
    a.0.total_cmp(&b.0).then(a.1.cmp(&b.1))
}

impl Candidates {
    /// A buffer for the `keep` best scores plus those within `slack` of the `keep`-th.
    pub fn new(keep: usize, slack: f32) -> Self {
        let keep = keep.max(1);
        Candidates {
            buf: Vec::new(),
            keep,
            slack: slack.max(0.0),
            limit: f32::INFINITY,
            // Compaction costs O(cap); amortised over cap - keep insertions.
            cap: keep.saturating_mul(2).saturating_add(32),
        }
    }

    /// Scores above this are refused (infinite until `keep` scores are in).
    #[inline]
    pub fn limit(&self) -> f32 {
        self.limit
    }

    /// Offers the score of gallery position `pos`.
    #[inline]
    pub fn offer(&mut self, score: f32, pos: u32) {
        if score <= self.limit {
            self.buf.push((score, pos));
            if self.buf.len() >= self.cap {
                self.compact();
            }
        }
    }

    fn compact(&mut self) {
        if self.buf.len() < self.keep {
            return;
        }
        let k = self.keep;
        self.buf.select_nth_unstable_by(k - 1, by_score);
        let tau = self.buf[k - 1].0;
        let limit = tau + self.slack;
        // The first k are <= tau; keep the rest only within the slack.
        let mut w = k;
        for r in k..self.buf.len() {
            if self.buf[r].0 <= limit {
                self.buf.swap(w, r);
                w += 1;
            }
        }
        self.buf.truncate(w);
        if limit < self.limit {
            self.limit = limit;
        }
        // Many scores inside the slack (near-duplicates): grow, so compaction stays amortised.
        if 2 * self.buf.len() > self.cap {
            self.cap = 2 * self.buf.len() + 32;
        }
    }

    /// The candidates, unordered: the `keep` best and everything within `slack` of them.
    pub fn finish(mut self) -> Vec<(f32, u32)> {
        self.compact();
        self.buf
    }

    /// How many best scores the buffer keeps (besides those within the slack).
    pub fn keep(&self) -> usize {
        self.keep
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Memory a buffer takes at most in steady state (for sizing query chunks).
    pub fn bytes_for(keep: usize) -> usize {
        keep.max(1)
            .saturating_mul(2)
            .saturating_add(32)
            .saturating_mul(std::mem::size_of::<(f32, u32)>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(scores: &[f32], keep: usize, slack: f32) -> Vec<u32> {
        let mut s: Vec<(f32, u32)> = scores
            .iter()
            .enumerate()
            .map(|(i, &v)| (v, i as u32))
            .collect();
        s.sort_by(by_score);
        if s.len() <= keep {
            return s.iter().map(|x| x.1).collect();
        }
        let lim = s[keep - 1].0 + slack;
        let mut out: Vec<u32> = s.iter().filter(|x| x.0 <= lim).map(|x| x.1).collect();
        out.sort();
        out
    }

    #[test]
    fn keeps_best_and_slack_with_ties() {
        let mut seed = 7u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) % 1000) as f32 / 10.0
        };
        for (n, keep, slack) in [
            (10, 20, 0.0),
            (1000, 5, 0.0),
            (5000, 37, 0.5),
            (3000, 1, 2.0),
        ] {
            let scores: Vec<f32> = (0..n).map(|_| rnd()).collect();
            let mut c = Candidates::new(keep, slack);
            for (i, &s) in scores.iter().enumerate() {
                c.offer(s, i as u32);
            }
            let mut got: Vec<u32> = c.finish().iter().map(|x| x.1).collect();
            got.sort();
            let mut want = reference(&scores, keep, slack);
            want.sort();
            if n <= keep {
                assert_eq!(got, want);
            } else {
                // Every reference entry must be there (ties included); nothing beyond the limit.
                assert_eq!(got, want, "n={n} keep={keep} slack={slack}");
            }
        }
    }

    #[test]
    fn near_duplicates_grow_the_buffer() {
        let mut c = Candidates::new(3, 1.0);
        for i in 0..10_000u32 {
            c.offer(5.0 + (i % 7) as f32 * 1e-3, i);
        }
        assert_eq!(c.finish().len(), 10_000);
    }
}
