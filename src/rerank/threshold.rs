//! OML's thresholding postprocessors (`ConstantThresholding`, `AdaptiveThresholding`), on
//! lists sorted by distance. They only drop a list's tail: order and distances stay.

/// Keeps the items with `distance < th` (strict, as OML).
pub fn constant<T>(lists: &mut [Vec<(T, f32)>], th: f32) {
    for l in lists.iter_mut() {
        // Sorted ascending, so the kept items are a prefix.
        let keep = l.iter().position(|x| x.1 >= th).unwrap_or(l.len());
        l.truncate(keep);
    }
}

/// The mean of every consecutive distance gap of every list (OML's `avg_gap`); `None` when no
/// list has two items. OML accumulates it with a running mean that divides by zero when the
/// first list has fewer than two items; a plain sum over all gaps has no such case.
pub fn average_gap<T>(lists: &[Vec<(T, f32)>]) -> Option<f64> {
    let (mut sum, mut n) = (0f64, 0u64);
    for l in lists {
        for w in l.windows(2) {
            sum += w[1].1 as f64 - w[0].1 as f64;
            n += 1;
        }
    }
    (n > 0).then(|| sum / n as f64)
}

/// Cuts each list after its first gap larger than `n_std * avg_gap` (keeping the items up to
/// and including the one before the gap). Returns the average gap used; with no gaps at all
/// there is nothing to cut and the lists stay as they are.
pub fn adaptive<T>(lists: &mut [Vec<(T, f32)>], n_std: f64) -> Option<f64> {
    let avg = average_gap(lists)?;
    let limit = n_std * avg;
    for l in lists.iter_mut() {
        if let Some(i) = l
            .windows(2)
            .position(|w| (w[1].1 as f64 - w[0].1 as f64) > limit)
        {
            l.truncate(i + 1);
        }
    }
    Some(avg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lists(v: &[&[f32]]) -> Vec<Vec<(usize, f32)>> {
        v.iter()
            .map(|l| l.iter().enumerate().map(|(i, &d)| (i, d)).collect())
            .collect()
    }

    fn dists(l: &[Vec<(usize, f32)>]) -> Vec<Vec<f32>> {
        l.iter().map(|l| l.iter().map(|x| x.1).collect()).collect()
    }

    /// OML's `test_thresholding.py`, constant case: th=0.2 keeps `dist < 0.2` only.
    #[test]
    fn oml_constant_cases() {
        let mut l = lists(&[
            &[0.0, 0.05, 0.07, 0.1, 0.12, 0.2, 0.2, 0.4],
            &[],
            &[0.21, 0.25],
        ]);
        constant(&mut l, 0.2);
        assert_eq!(
            dists(&l),
            vec![vec![0.0, 0.05, 0.07, 0.1, 0.12], vec![], vec![]]
        );
        // Ids travel with their distances.
        assert_eq!(
            l[0].iter().map(|x| x.0).collect::<Vec<_>>(),
            vec![0, 1, 2, 3, 4]
        );
    }

    /// OML's `test_thresholding.py`, adaptive case with n_std=3: the average gap is taken
    /// over all 18 gaps of all lists (34/18), so the limit is about 5.67.
    #[test]
    fn oml_adaptive_cases() {
        let mut l = lists(&[
            &[1.0, 2.0, 3.0, 4.0, 10.0, 11.0, 12.0, 13.0],
            &[],
            &[4.0, 5.0, 6.0, 7.0],
            &[3.0, 4.0, 5.0, 12.0, 13.0, 14.0, 20.0, 21.0, 22.0],
            &[100.0],
        ]);
        let avg = adaptive(&mut l, 3.0).unwrap();
        assert!((avg - 34.0 / 18.0).abs() < 1e-9, "{avg}");
        assert_eq!(
            dists(&l),
            vec![
                vec![1.0, 2.0, 3.0, 4.0],
                vec![],
                vec![4.0, 5.0, 6.0, 7.0],
                vec![3.0, 4.0, 5.0],
                vec![100.0],
            ]
        );
    }

    /// Where OML divides by zero (the first query has one result or none), simile averages
    /// over the gaps that exist, and leaves lists alone when there are none.
    #[test]
    fn adaptive_without_oml_division_by_zero() {
        // First list empty, then one item: OML's running mean starts with n=0 here.
        let mut l = lists(&[&[], &[0.5], &[1.0, 2.0, 3.0, 30.0]]);
        let avg = adaptive(&mut l, 2.0).unwrap();
        assert!((avg - 29.0 / 3.0).abs() < 1e-9);
        // Gaps 1, 1, 27 > 2 * 9.67: cut before 30.
        assert_eq!(dists(&l), vec![vec![], vec![0.5], vec![1.0, 2.0, 3.0]]);
        let mut l = lists(&[&[0.3], &[], &[0.7]]);
        assert_eq!(adaptive(&mut l, 1.0), None);
        assert_eq!(dists(&l), vec![vec![0.3], vec![], vec![0.7]]);
    }
}
