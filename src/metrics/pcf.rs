//! PCF, "Principal Components Fraction" (OML's `calc_pcf`): the fraction of dimensions the
//! principal components need to explain a share r of the variance.
//!
//! OML takes the singular values s of the centred [N, D] matrix (min(N, D) of them), the
//! explained variance ratio s² / Σs², and n_r = searchsorted(cumsum(ratio), r, right) + 1,
//! PCF = n_r / D. The squared singular values are the eigenvalues of the D x D scatter
//! matrix Σ (x - mean)(x - mean)ᵀ, which is accumulated here in f64 over row blocks, so the
//! embeddings are streamed, never held whole; its top min(N, D) eigenvalues are used.
use crate::error::{Error, Result};
use tch::{Device, Kind, Tensor};

/// PCF from the squared singular values (any order; negatives from rounding count as 0),
/// for each variance share in `r`, with `d` the embedding width. `None` when the total
/// variance is 0 or not finite (OML gives NaN there).
pub fn pcf_from_eigenvalues(ev: &[f64], d: usize, r: &[f64]) -> Vec<Option<f64>> {
    let mut ev: Vec<f64> = ev.iter().map(|&v| v.max(0.0)).collect();
    ev.sort_unstable_by(|a, b| b.total_cmp(a));
    // Prefix sums divided by the total: the last is exactly 1 and none exceeds it, so
    // r = 1 behaves as OML's float32 cumsum does on its test cases.
    let mut prefix = Vec::with_capacity(ev.len());
    let mut acc = 0.0f64;
    for v in &ev {
        acc += v;
        prefix.push(acc);
    }
    let total = acc;
    r.iter()
        .map(|&r| {
            if !(total > 0.0 && total.is_finite()) {
                return None;
            }
            let n_le = prefix.iter().filter(|&&p| p / total <= r).count();
            Some((n_le + 1) as f64 / d as f64)
        })
        .collect()
}

/// Checks the variance shares: each in [0, 1].
pub fn check_pcf(r: &[f64]) -> Result<()> {
    if let Some(v) = r.iter().find(|v| !(0.0..=1.0).contains(*v)) {
        return Err(Error::input(format!(
            "--pcf: every value must be in [0, 1], got {v}"
        )));
    }
    Ok(())
}

/// The widest embeddings PCF is computed for (a 16384 x 16384 f64 matrix is 2 GiB).
pub const MAX_DIM: usize = 16384;

/// PCF of `n` rows of width `d`, read in blocks by `read(start, end, out)` (row-major f32).
/// Two passes: the mean, then the scatter matrix.
pub fn pcf_of_rows(
    n: usize,
    d: usize,
    r: &[f64],
    mut read: impl FnMut(usize, usize, &mut Vec<f32>) -> Result<()>,
) -> Result<Vec<Option<f64>>> {
    if n < 2 || d == 0 {
        // One row has no variance: OML divides by n - 1 = 0 and gets NaN.
        return Ok(vec![None; r.len()]);
    }
    // The d x d scatter matrix (f64) and its eigen-decomposition live in memory.
    if d > MAX_DIM {
        return Err(Error::input(format!(
            "--pcf: the embeddings are {d} wide; PCF needs a {d} x {d} matrix, and simile computes it for widths up to {MAX_DIM}"
        )));
    }
    const BLOCK: usize = 16384;
    let mut buf = Vec::new();
    let mut sum = vec![0.0f64; d];
    for s in (0..n).step_by(BLOCK) {
        let e = (s + BLOCK).min(n);
        read(s, e, &mut buf)?;
        for row in buf.chunks_exact(d) {
            for (a, &x) in sum.iter_mut().zip(row) {
                *a += x as f64;
            }
        }
    }
    let mean = Tensor::from_slice(&sum.iter().map(|s| s / n as f64).collect::<Vec<_>>());
    let mut scatter = Tensor::zeros([d as i64, d as i64], (Kind::Double, Device::Cpu));
    for s in (0..n).step_by(BLOCK) {
        let e = (s + BLOCK).min(n);
        read(s, e, &mut buf)?;
        let x = Tensor::from_slice(&buf)
            .view([(e - s) as i64, d as i64])
            .to_kind(Kind::Double)
            - &mean;
        scatter += x.tr().matmul(&x);
    }
    let ev = scatter.f_linalg_eigvalsh("L")?;
    let mut ev: Vec<f64> = Vec::<f64>::try_from(&ev)?;
    ev.sort_unstable_by(|a, b| b.total_cmp(a));
    ev.truncate(n.min(d));
    Ok(pcf_from_eigenvalues(&ev, d, r))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eye(n: usize, d: usize) -> Vec<f32> {
        let mut v = vec![0f32; n * d];
        for i in 0..n.min(d) {
            v[i * d + i] = 1.0;
        }
        v
    }

    fn pcf_of(v: &[f32], n: usize, d: usize, r: &[f64]) -> Vec<Option<f64>> {
        pcf_of_rows(n, d, r, |s, e, out| {
            out.clear();
            out.extend_from_slice(&v[s * d..e * d]);
            Ok(())
        })
        .unwrap()
    }

    /// OML `test_topological_metrics.py`: eye(4, 10) with (0.5, 1) gives (0.2, 0.5).
    #[test]
    fn oml_eye_4_10() {
        assert_eq!(
            pcf_of(&eye(4, 10), 4, 10, &[0.5, 1.0]),
            vec![Some(0.2), Some(0.5)]
        );
    }

    /// OML: cat(eye(300, 10), eye(300, 10), dim=1) with (0.5, 0.9) gives (0.25, 0.45).
    #[test]
    fn oml_eye_concat() {
        let a = eye(300, 10);
        let mut v = Vec::new();
        for row in a.chunks_exact(10) {
            v.extend_from_slice(row);
            v.extend_from_slice(row);
        }
        assert_eq!(
            pcf_of(&v, 300, 20, &[0.5, 0.9]),
            vec![Some(0.25), Some(0.45)]
        );
    }

    #[test]
    fn degenerate_inputs_are_undefined() {
        assert_eq!(pcf_of(&[1.0, 2.0], 1, 2, &[0.5]), vec![None]);
        assert_eq!(pcf_of(&[1.0, 2.0, 1.0, 2.0], 2, 2, &[0.5]), vec![None]);
    }
}
