//! Exact distances: computed directly from the two rows in f64 (no expansion, so no
//! cancellation), then rounded once to f32.
//!
//! The sums run in 8 fixed lanes (lane `l` takes elements `l, l + 8, ...`, products rounded
//! before they are added, no FMA), then the lanes are added pairwise in a fixed order. The
//! AVX-512 version computes exactly the same operations in the same order as the portable
//! one, so every path, shard and machine reports the same bits.
// The AVX-512 intrinsics (and `vdpbf16ps`) are stable since Rust 1.89; the crate's declared
// rust-version (1.85) predates them. This module needs 1.89 (the toolchain used is newer).
#![allow(clippy::incompatible_msrv)]
use crate::knn::Metric;

/// The three sums a distance needs: `sum (q-g)^2`, `sum q g`, `sum q^2`, `sum g^2`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Sums {
    diff2: f64,
    qg: f64,
    qq: f64,
    gg: f64,
}

#[inline(always)]
fn reduce(a: [f64; 8]) -> f64 {
    ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))
}

/// The lanes `[diff2, qg, qq, gg]`, each of 8.
type Lanes = [[f64; 8]; 4];

/// Adds the products of `q` and `g` to the lanes, element `i` to lane `i % 8`.
#[inline(always)]
fn add_lanes(metric: Metric, q: &[f32], g: &[f32], lanes: &mut Lanes) {
    let [d2, qg, qq, gg] = lanes;
    for (i, (&a, &b)) in q.iter().zip(g).enumerate() {
        let (a, b, l) = (a as f64, b as f64, i % 8);
        match metric {
            Metric::L2 => d2[l] += (a - b) * (a - b),
            Metric::Dot => qg[l] += a * b,
            Metric::Cosine => {
                qg[l] += a * b;
                qq[l] += a * a;
                gg[l] += b * b;
            }
        }
    }
}

#[inline(always)]
fn sums_of(lanes: Lanes) -> Sums {
    let [d2, qg, qq, gg] = lanes;
    Sums {
        diff2: reduce(d2),
        qg: reduce(qg),
        qq: reduce(qq),
        gg: reduce(gg),
    }
}

fn sums_portable(metric: Metric, q: &[f32], g: &[f32]) -> Sums {
    let mut lanes = [[0f64; 8]; 4];
    add_lanes(metric, q, g, &mut lanes);
    sums_of(lanes)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn sums_avx512(metric: Metric, q: &[f32], g: &[f32]) -> Sums {
    use std::arch::x86_64::*;
    let n = q.len().min(g.len());
    let full = n / 8 * 8;
    let (mut d2, mut qg, mut qq, mut gg) = (
        _mm512_setzero_pd(),
        _mm512_setzero_pd(),
        _mm512_setzero_pd(),
        _mm512_setzero_pd(),
    );
    let mut i = 0;
    while i < full {
        // SAFETY: i + 8 <= n, within both slices; unaligned loads.
        let (a, b) = unsafe {
            (
                _mm512_cvtps_pd(_mm256_loadu_ps(q.as_ptr().add(i))),
                _mm512_cvtps_pd(_mm256_loadu_ps(g.as_ptr().add(i))),
            )
        };
        match metric {
            Metric::L2 => {
                let d = _mm512_sub_pd(a, b);
                d2 = _mm512_add_pd(d2, _mm512_mul_pd(d, d));
            }
            Metric::Dot => qg = _mm512_add_pd(qg, _mm512_mul_pd(a, b)),
            Metric::Cosine => {
                qg = _mm512_add_pd(qg, _mm512_mul_pd(a, b));
                qq = _mm512_add_pd(qq, _mm512_mul_pd(a, a));
                gg = _mm512_add_pd(gg, _mm512_mul_pd(b, b));
            }
        }
        i += 8;
    }
    let lanes = |v: __m512d| -> [f64; 8] {
        let mut out = [0f64; 8];
        // SAFETY: out has 8 f64s.
        unsafe { _mm512_storeu_pd(out.as_mut_ptr(), v) };
        out
    };
    let mut all = [lanes(d2), lanes(qg), lanes(qq), lanes(gg)];
    // The tail (fewer than 8 elements) goes to lanes 0.., as the portable loop puts it.
    add_lanes(metric, &q[full..n], &g[full..n], &mut all);
    sums_of(all)
}

#[inline]
fn sums(metric: Metric, q: &[f32], g: &[f32]) -> Sums {
    #[cfg(target_arch = "x86_64")]
    if crate::knn::kernel::Isa::detect().avx512 {
        // SAFETY: the feature was detected at run time.
        return unsafe { sums_avx512(metric, q, g) };
    }
    sums_portable(metric, q, g)
}

fn finish(metric: Metric, s: Sums) -> f64 {
    match metric {
        Metric::L2 => s.diff2.sqrt(),
        Metric::Dot => -s.qg,
        Metric::Cosine => {
            if s.qq == 0.0 || s.gg == 0.0 {
                // A zero vector has no direction: cosine similarity 0.
                1.0
            } else {
                1.0 - s.qg / (s.qq.sqrt() * s.gg.sqrt())
            }
        }
    }
}

/// The metric's distance between `q` and `g`, in f64.
pub fn distance64(metric: Metric, q: &[f32], g: &[f32]) -> f64 {
    finish(metric, sums(metric, q, g))
}

/// The reported distance: [`distance64`] rounded to f32 (`-0` reported as `0`, so ties
/// compare equal).
#[inline]
pub fn distance(metric: Metric, q: &[f32], g: &[f32]) -> f32 {
    distance64(metric, q, g) as f32 + 0.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics() {
        let q = [3.0f32, 4.0, 0.0];
        let g = [0.0f32, 0.0, 0.0];
        assert_eq!(distance(Metric::L2, &q, &g), 5.0);
        assert_eq!(distance(Metric::Cosine, &q, &g), 1.0);
        assert_eq!(distance(Metric::Dot, &q, &[1.0, 1.0, 1.0]), -7.0);
        assert_eq!(distance(Metric::Dot, &q, &g).to_bits(), 0f32.to_bits());
        assert!((distance(Metric::Cosine, &q, &[6.0, 8.0, 0.0])).abs() < 1e-7);
        assert!((distance(Metric::Cosine, &q, &[-3.0, -4.0, 0.0]) - 2.0).abs() < 1e-7);
    }

    #[test]
    fn no_cancellation() {
        // Large-norm near-duplicates: the expansion in f32 loses everything, direct does not.
        let q: Vec<f32> = (0..64).map(|i| 1000.0 + i as f32).collect();
        let mut g = q.clone();
        g[10] += 0.001;
        let d = distance(Metric::L2, &q, &g) as f64;
        let want = (g[10] as f64 - q[10] as f64).abs();
        assert!((d - want).abs() <= 1e-6 * want, "{d} vs {want}");
    }

    /// The vector and portable sums are the same bits, for every length remainder.
    #[test]
    fn wide_equals_portable() {
        let mut s = 1u64;
        let mut r = || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
            ((s >> 40) as f32 / (1 << 24) as f32 - 0.5) * 1e3
        };
        for n in [0usize, 1, 7, 8, 9, 63, 64, 130] {
            let q: Vec<f32> = (0..n).map(|_| r()).collect();
            let g: Vec<f32> = (0..n).map(|_| r()).collect();
            for m in [Metric::L2, Metric::Dot, Metric::Cosine] {
                let p = sums_portable(m, &q, &g);
                assert_eq!(sums(m, &q, &g), p, "{m} n={n}");
                if m != Metric::L2 {
                    let direct: f64 = q.iter().zip(&g).map(|(&a, &b)| a as f64 * b as f64).sum();
                    assert!((p.qg - direct).abs() <= 1e-9 * direct.abs().max(1.0));
                }
            }
        }
    }
}
