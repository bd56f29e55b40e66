//! k-reciprocal re-ranking (Zhong, Zheng, Cao, Li: "Re-ranking Person Re-identification with
//! k-reciprocal Encoding", CVPR 2017), over candidate lists so memory is O(N k), not O(N^2).
//!
//! The graph's nodes are the union of the queries and the gallery rows (one node per dataset
//! row, like the paper's probe + gallery set); node `a`'s ranking is itself first, then the
//! other nodes by (distance, id), never a node it may not retrieve (same non-null sequence).
//! With `N(a, k)` its first `k + 1` entries:
//! - `R(a, k) = { b in N(a, k) : a in N(b, k) }` (k-reciprocal neighbours, `a` included);
//! - `R*(a) = R(a, k1)` plus every `R(c, round(k1/2))`, `c in R(a, k1)`, that shares more than
//!   2/3 of its items with `R(a, k1)` (`round` is numpy's, half to even, as the paper's code);
//! - `V_a[x] = exp(-d(a, x)) / sum` over `x in R*(a)`;
//! - local query expansion: `V_a <- mean of V_b over b in N(a, k2 - 1)` (the first `k2` entries);
//! - Jaccard distance `J(q, g) = 1 - m / (2 - m)`, `m = sum_x min(V_q[x], V_g[x])`;
//! - final distance `(1 - lambda) J(q, g) + lambda d(q, g)`.
//!
//! `d` is the cosine distance (`1 - cos`, half the squared distance of L2-normalised vectors).
//! The paper's code squares the distances and divides each column by its maximum over all
//! rows, which needs the whole matrix; on normalised vectors the distance is already bounded,
//! so simile uses it as it is.
//!
//! Each node needs only its first `max(k1, k2 - 1)` neighbours. The final distance is computed
//! for every gallery row that shares support with the query (`J < 1`) and every row of the
//! query's input list; any other gallery row has `J = 1`, so its final distance is
//! `(1 - lambda) + lambda d(q, g)`, only ever larger than that of a listed row when the list
//! holds the rows nearest to `q` (see `docs/rerank.md`).
use rayon::prelude::*;

/// The method's parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Params {
    pub k1: usize,
    pub k2: usize,
    pub lambda: f64,
}

/// Sparse vector: (node, value), sorted by node, values > 0.
pub type Sparse = Vec<(u32, f64)>;

/// `numpy.around(k1 / 2)`: halves round to even (k1 = 5 gives 2, k1 = 7 gives 4).
pub fn half_k(k1: usize) -> usize {
    let h = k1 / 2;
    if k1 % 2 == 1 && h % 2 == 1 {
        h + 1
    } else {
        h
    }
}

/// Neighbour search depth each node needs.
pub fn depth(p: &Params) -> usize {
    p.k1.max(p.k2.saturating_sub(1)).max(1)
}

/// The nodes' neighbour lists (node index, distance), sorted, self and excluded nodes absent.
pub struct Graph<'a, D> {
    pub lists: &'a [Vec<(u32, f32)>],
    /// Distance of two nodes; `+inf` for a pair that may not retrieve each other.
    pub dist: D,
}

impl<D: Fn(usize, usize) -> f32 + Sync> Graph<'_, D> {
    /// `N(a, k)`: `a`, then its first `k` neighbours.
    fn top(&self, a: usize, k: usize) -> impl Iterator<Item = u32> + '_ {
        let l = &self.lists[a];
        std::iter::once(a as u32).chain(l[..k.min(l.len())].iter().map(|x| x.0))
    }

    fn in_top(&self, b: usize, a: u32, k: usize) -> bool {
        b as u32 == a || self.top(b, k).any(|x| x == a)
    }

    /// `R(a, k)`, in `N(a, k)` order.
    fn reciprocal(&self, a: usize, k: usize) -> Vec<u32> {
        self.top(a, k)
            .filter(|&b| self.in_top(b as usize, a as u32, k))
            .collect()
    }

    /// `R*(a)`, sorted.
    fn expansion(&self, a: usize, k1: usize) -> Vec<u32> {
        let r = self.reciprocal(a, k1);
        let h = half_k(k1);
        let mut out = r.clone();
        for &c in &r {
            let rc = self.reciprocal(c as usize, h);
            let common = rc.iter().filter(|x| r.contains(x)).count();
            if common as f64 > 2.0 / 3.0 * rc.len() as f64 {
                out.extend_from_slice(&rc);
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// `V_a` before local query expansion.
    fn encode_node(&self, a: usize, k1: usize) -> Sparse {
        let mut v: Sparse = self
            .expansion(a, k1)
            .into_iter()
            .map(|x| {
                let d = if x as usize == a {
                    0.0
                } else {
                    (self.dist)(a, x as usize) as f64
                };
                (x, (-d).exp())
            })
            .filter(|x| x.1 > 0.0)
            .collect();
        let s: f64 = v.iter().map(|x| x.1).sum();
        v.iter_mut().for_each(|x| x.1 /= s);
        v
    }

    /// Every node's `V`, after local query expansion.
    pub fn encode(&self, p: &Params) -> Vec<Sparse> {
        let n = self.lists.len();
        let v: Vec<Sparse> = (0..n)
            .into_par_iter()
            .map(|a| self.encode_node(a, p.k1))
            .collect();
        if p.k2 <= 1 {
            return v;
        }
        (0..n)
            .into_par_iter()
            .map(|a| {
                let members: Vec<u32> = self.top(a, p.k2 - 1).collect();
                let c = members.len() as f64;
                let mut all: Vec<(u32, f64)> = members
                    .iter()
                    .flat_map(|&b| v[b as usize].iter().copied())
                    .collect();
                all.sort_by_key(|x| x.0);
                let mut out: Sparse = Vec::with_capacity(all.len());
                for (x, w) in all {
                    match out.last_mut() {
                        Some(last) if last.0 == x => last.1 += w,
                        _ => out.push((x, w)),
                    }
                }
                out.iter_mut().for_each(|x| x.1 /= c);
                out
            })
            .collect()
    }
}

/// Final distances of each query against its candidates, best `top_k` first.
pub struct Rerank<'a, E> {
    /// Node of each query position, and of each gallery position.
    pub query_nodes: &'a [u32],
    pub gallery_nodes: &'a [u32],
    /// Each query's input list (gallery positions).
    pub shortlists: &'a [Vec<u32>],
    /// Whether query position `q` may not retrieve gallery position `g`.
    pub excluded: E,
    pub top_k: usize,
}

impl<E: Fn(usize, usize) -> bool + Sync> Rerank<'_, E> {
    /// `(gallery position, final distance)` per query, sorted by (distance, position).
    pub fn run<D: Fn(usize, usize) -> f32 + Sync>(
        &self,
        graph: &Graph<D>,
        v: &[Sparse],
        p: &Params,
    ) -> Vec<Vec<(u32, f32)>> {
        // Inverted index: node x -> the gallery rows whose V has x.
        let mut inv: Vec<Vec<(u32, f64)>> = vec![Vec::new(); v.len()];
        for (g, &node) in self.gallery_nodes.iter().enumerate() {
            for &(x, w) in &v[node as usize] {
                inv[x as usize].push((g as u32, w));
            }
        }
        let n_g = self.gallery_nodes.len();
        (0..self.query_nodes.len())
            .into_par_iter()
            .map_init(
                || (vec![0f64; n_g], vec![false; n_g]),
                |(acc, seen), q| {
                    let qn = self.query_nodes[q] as usize;
                    let mut cands: Vec<u32> = Vec::new();
                    for &(x, wq) in &v[qn] {
                        for &(g, wg) in &inv[x as usize] {
                            if !seen[g as usize] {
                                seen[g as usize] = true;
                                cands.push(g);
                            }
                            acc[g as usize] += wq.min(wg);
                        }
                    }
                    for &g in &self.shortlists[q] {
                        if !seen[g as usize] {
                            seen[g as usize] = true;
                            cands.push(g);
                        }
                    }
                    let mut out: Vec<(u32, f32)> = Vec::with_capacity(cands.len());
                    for &g in &cands {
                        let gi = g as usize;
                        if !(self.excluded)(q, gi) {
                            let m = acc[gi];
                            let jac = 1.0 - m / (2.0 - m);
                            let d = (graph.dist)(qn, self.gallery_nodes[gi] as usize) as f64;
                            out.push((g, ((1.0 - p.lambda) * jac + p.lambda * d) as f32));
                        }
                        acc[gi] = 0.0;
                        seen[gi] = false;
                    }
                    out.sort_unstable_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
                    out.truncate(self.top_k);
                    out
                },
            )
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_k_rounds_like_numpy() {
        // numpy.around: 2.5 -> 2, 3.5 -> 4, 10 -> 10.
        assert_eq!(half_k(5), 2);
        assert_eq!(half_k(7), 4);
        assert_eq!(half_k(20), 10);
        assert_eq!(half_k(1), 0);
        assert_eq!(half_k(3), 2);
    }
}
