//! `simile-rerank --method pairwise`: OML's `PairwiseReranker`. A pairwise model
//! (`model::pairwise`, kind `pairwise`) scores the first `top_n` (query, gallery) pairs of each
//! list; those are re-sorted by the new score and merged with the untouched tail by OML's
//! rule (`merge`). The set of the first `top_n` ids does not change, so CMC@top_n and
//! Precision@top_n cannot change; the tail keeps its ids and distances.
use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::image;
use crate::model::pairwise::{self, PairwiseModel};
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::Path;
use tch::Tensor;

/// OML's gap between the rescaled head and the tail: `1000 * finfo(float32).eps`.
pub const MERGE_EPS: f32 = 1000.0 * f32::EPSILON;

/// Re-scores the first `top_n` entries of every list (`(gallery id, distance)`, ascending)
/// with the pairwise model in `model_dir`, in place. `query_ids[i]` is the query of
/// `lists[i]`; every id must be a row of `ds` with an image. Images are decoded and resized as
/// the model's `input` says (the code `simile-embed` uses), all at once before the model runs,
/// so every unreadable file is reported together.
pub fn rescore(
    model_dir: &Path,
    ds: &Dataset,
    lists: &mut [Vec<(i64, f32)>],
    query_ids: &[i64],
    top_n: usize,
    device: tch::Device,
    batch_size: usize,
) -> Result<()> {
    if lists.len() != query_ids.len() {
        return Err(Error::internal(format!(
            "pairwise rescore: {} lists for {} queries",
            lists.len(),
            query_ids.len()
        )));
    }
    if top_n < 2 {
        return Err(Error::input(format!(
            "--top-n {top_n}: the pairwise re-ranker needs at least 2 (OML's PairwiseReranker asserts top_n > 1)"
        )));
    }
    if batch_size == 0 {
        return Err(Error::input("--batch-size must be at least 1"));
    }
    let model = PairwiseModel::load(model_dir, device)?;
    let pre = model.spec.model.input.clone();

    // The images the pairs need, each decoded once.
    let mut slot: HashMap<i64, usize> = HashMap::new();
    let mut need: Vec<i64> = Vec::new();
    let mut pairs: Vec<(usize, usize)> = Vec::new();
    let mut add = |id: i64, need: &mut Vec<i64>| {
        *slot.entry(id).or_insert_with(|| {
            need.push(id);
            need.len() - 1
        })
    };
    for (q, list) in query_ids.iter().zip(lists.iter()) {
        let a = add(*q, &mut need);
        for (g, _) in list.iter().take(top_n) {
            let b = add(*g, &mut need);
            pairs.push((a, b));
        }
    }
    let mut problems = Vec::new();
    let mut items = Vec::with_capacity(need.len());
    for &id in &need {
        match ds.position_of(id) {
            None => problems.push(format!("  id {id}: not a row of {}", ds.file.display())),
            Some(r) => match ds.resolve_path(r, None) {
                None => problems.push(format!("  id {id}: the row has no image path")),
                Some(p) => items.push((id, p, ds.bbox[r])),
            },
        }
    }
    if problems.is_empty() {
        let pb = crate::progress::bar(items.len() as u64, "decode");
        let decoded: Vec<std::result::Result<Vec<u8>, String>> = items
            .par_iter()
            .map(|(_, p, b)| {
                let r = image::prepare_file(p, *b, &pre);
                pb.inc(1);
                r
            })
            .collect();
        pb.finish_and_clear();
        let mut imgs = Vec::with_capacity(items.len());
        for ((id, p, _), r) in items.iter().zip(decoded) {
            match r {
                Ok(v) => imgs.push(v),
                Err(why) => problems.push(format!("  {} (id {id}): {why}", p.display())),
            }
        }
        if problems.is_empty() {
            let scores = score_pairs(&model, &imgs, &pairs, &pre, batch_size)?;
            let mut at = 0;
            for list in lists.iter_mut() {
                let n = list.len().min(top_n);
                merge(list, &scores[at..at + n], MERGE_EPS);
                at += n;
            }
            return Ok(());
        }
    }
    let mut lines = vec![format!(
        "{} of the images the pairwise re-ranker needs cannot be used (nothing was written):",
        problems.len()
    )];
    lines.extend(problems);
    Err(Error::InputMany(lines))
}

/// The model's score of every pair of image slots.
fn score_pairs(
    model: &PairwiseModel,
    imgs: &[Vec<u8>],
    pairs: &[(usize, usize)],
    pre: &image::Preprocess,
    batch_size: usize,
) -> Result<Vec<f32>> {
    let images = |items: &[usize]| -> Result<Tensor> {
        let a: Vec<&[u8]> = items.iter().map(|&i| imgs[i].as_slice()).collect();
        Ok(image::batch_tensor(&a, pre))
    };
    let scores = pairwise::score_pairs(
        model.net(),
        model.spec.pairwise.swap_average,
        imgs.len(),
        pairs,
        &images,
        batch_size,
        model.device,
        true,
    )?;
    if scores.iter().any(|x| !x.is_finite()) {
        return Err(Error::input(format!(
            "{}: the pairwise model produced NaN or infinite scores (its weights have diverged)",
            model.dir.display()
        )));
    }
    Ok(scores)
}

/// OML's merge of a re-scored head with the untouched tail. `scores[i]` is the new distance
/// of `list[i]` for the first `n = scores.len()` entries. The head is sorted by the new score
/// (ties keep the old order); when the list has a tail and the largest new score exceeds the
/// tail's first distance `t`, the head is rescaled to `s * (t / max) - eps`, so the list stays
/// sorted (`cat_two_sorted_tensors_and_keep_it_sorted`). The tail is left as it is.
pub fn merge(list: &mut [(i64, f32)], scores: &[f32], eps: f32) {
    let n = scores.len().min(list.len());
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    let mut head: Vec<(i64, f32)> = order.iter().map(|&i| (list[i].0, scores[i])).collect();
    if let (Some(&(_, t)), Some(&(_, mx))) = (list.get(n), head.last()) {
        if mx > t {
            // OML computes the scale in float32 as tail / max and subtracts eps after.
            let scale = t / mx;
            for h in &mut head {
                h.1 = h.1 * scale - eps;
            }
        }
    }
    list[..n].copy_from_slice(&head);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oml_merge_case() {
        // OML's test: x1 [[10, 20, 30]], x2 [[.3, .4, .5]], eps .001
        // -> [.1 - .001, .2 - .001, .3 - .001, .3, .4, .5].
        let mut l = vec![(1, 0.0), (2, 0.0), (3, 0.0), (4, 0.3), (5, 0.4), (6, 0.5)];
        merge(&mut l, &[10.0, 20.0, 30.0], 0.001);
        let want = [0.1 - 0.001, 0.2 - 0.001, 0.3 - 0.001, 0.3, 0.4, 0.5];
        for ((_, d), w) in l.iter().zip(want) {
            assert!((d - w).abs() < 1e-6, "{l:?}");
        }
        assert_eq!(
            l.iter().map(|x| x.0).collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5, 6]
        );
    }

    #[test]
    fn head_is_resorted_and_tail_kept() {
        let mut l = vec![(7, 0.1), (8, 0.2), (9, 0.3), (10, 0.9), (11, 1.5)];
        merge(&mut l, &[0.8, 0.05, 0.3], MERGE_EPS);
        assert_eq!(
            l.iter().map(|x| x.0).collect::<Vec<_>>(),
            vec![8, 9, 7, 10, 11]
        );
        // max 0.8 <= tail 0.9: plain concatenation.
        assert_eq!(
            l[..3].iter().map(|x| x.1).collect::<Vec<_>>(),
            vec![0.05, 0.3, 0.8]
        );
        assert_eq!(&l[3..], &[(10, 0.9), (11, 1.5)]);
        // Rescaled when the head's max exceeds the tail's first distance.
        let mut l = vec![(1, 0.1), (2, 0.2), (3, 0.25)];
        merge(&mut l, &[0.9, 0.5], MERGE_EPS);
        assert_eq!(l[0].0, 2);
        assert!((l[1].1 - (0.9 * (0.25 / 0.9) - MERGE_EPS)).abs() < 1e-7);
        assert!(l[0].1 < l[1].1 && l[1].1 < l[2].1 && l[2] == (3, 0.25));
    }

    #[test]
    fn short_lists_have_no_tail_and_ties_keep_order() {
        let mut l = vec![(1, 0.1), (2, 0.2)];
        merge(&mut l, &[0.5, 0.5], MERGE_EPS);
        assert_eq!(l, vec![(1, 0.5), (2, 0.5)]);
        let mut e: Vec<(i64, f32)> = vec![];
        merge(&mut e, &[], MERGE_EPS);
        assert!(e.is_empty());
    }
}
