//! The intervals and the paired test against known answers: coverage by simulation from a
//! population whose value is known, false alarms and power of the paired test, McNemar
//! against scipy's `binomtest`.
use super::*;

/// A population of labels whose queries share a hit probability: 77% of labels are easy
/// (0.95), the rest hard (0.3). Every label has `per_label` queries, so the population's mean
/// hit rate is exactly `MU`, and queries of one label are strongly correlated.
const EASY: f64 = 0.95;
const HARD: f64 = 0.3;
const SHARE_EASY: f64 = 0.77;
const MU: f64 = HARD * (1.0 - SHARE_EASY) + EASY * SHARE_EASY;

fn unit(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// One validation set: (label of each query, each label's hit probability, hit of each query).
fn draw_set(
    rng: &mut ChaCha8Rng,
    labels: usize,
    per_label: usize,
) -> (Vec<Option<i64>>, Vec<f64>, Vec<f64>) {
    let mut lab = Vec::new();
    let mut probs = Vec::new();
    let mut hits = Vec::new();
    for l in 0..labels {
        let p = if unit(rng) < SHARE_EASY { EASY } else { HARD };
        probs.push(p);
        for _ in 0..per_label {
            lab.push(Some(l as i64));
            hits.push(if unit(rng) < p { 1.0 } else { 0.0 });
        }
    }
    (lab, probs, hits)
}

fn mean_of(values: &[f64], clusters: &Clusters) -> Estimand {
    Estimand::mean(Ratio::of(values.iter().copied().enumerate(), clusters))
}

fn opts(by: CiBy, seed: u64) -> CiOptions {
    CiOptions {
        level: 0.95,
        resamples: 1000,
        by,
        seed,
    }
}

#[test]
fn label_intervals_cover_the_population_value_at_the_nominal_rate() {
    let sims = 1000;
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let (mut by_label, mut by_query) = (0usize, 0usize);
    for s in 0..sims {
        let (labels, _, hits) = draw_set(&mut rng, 150, 5);
        for (by, covered) in [(CiBy::Label, &mut by_label), (CiBy::Query, &mut by_query)] {
            let c = Clusters::new(by, &labels);
            let i = intervals(&[mean_of(&hits, &c)], &c, &opts(by, s))
                .unwrap()
                .remove(0)
                .expect("defined");
            assert!(i.low <= i.estimate && i.estimate <= i.high, "{i:?}");
            if i.low <= MU && MU <= i.high {
                *covered += 1;
            }
        }
    }
    let (label, query) = (by_label as f64 / sims as f64, by_query as f64 / sims as f64);
    let msg = format!(
        "95% intervals over {sims} simulated sets (150 labels x 5 correlated queries): --ci-by label covers {:.1}%, --ci-by query {:.1}%",
        100.0 * label,
        100.0 * query
    );
    assert!((label - 0.95).abs() <= 0.02, "{msg}");
    // Resampling queries of correlated labels one by one gives intervals far too narrow:
    // why `label` exists and is the default.
    assert!(query < 0.90, "{msg}");
    eprintln!("{msg}");
}

#[test]
fn the_paired_test_raises_no_more_false_alarms_than_its_level_and_finds_a_two_point_gain() {
    let reps = 300;
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut alarms = 0;
    let mut p_sum = 0.0;
    let mut found = 0;
    let mut mcnemar_found = 0;
    for r in 0..reps {
        // Two equally good models: each query's outcome drawn afresh from its label's
        // difficulty (so the models agree on easy labels, as real models do).
        let (labels, probs, a) = draw_set(&mut rng, 300, 5);
        let b: Vec<f64> = (0..a.len())
            .map(|q| f64::from(unit(&mut rng) < probs[q / 5]))
            .collect();
        let c = Clusters::new(CiBy::Label, &labels);
        let ra = Ratio::of(a.iter().copied().enumerate(), &c);
        let rb = Ratio::of(b.iter().copied().enumerate(), &c);
        let i = intervals(
            &[Estimand::difference(rb, ra.clone())],
            &c,
            &opts(CiBy::Label, r),
        )
        .unwrap()[0]
            .expect("defined");
        p_sum += i.p_value;
        if i.p_value < 0.05 {
            alarms += 1;
        }
        // B = A with 2% of the queries turned from misses into hits.
        let mut better = a.clone();
        let misses: Vec<usize> = (0..a.len()).filter(|&q| a[q] == 0.0).collect();
        let flip = a.len() / 50;
        for k in 0..flip {
            better[misses[(k * 7919) % misses.len()]] = 1.0;
        }
        let rb = Ratio::of(better.iter().copied().enumerate(), &c);
        let j = intervals(&[Estimand::difference(rb, ra)], &c, &opts(CiBy::Label, r)).unwrap()[0]
            .expect("defined");
        assert!((j.estimate - flip as f64 / a.len() as f64).abs() < 1e-12);
        if j.low > 0.0 && j.p_value < 0.05 {
            found += 1;
        }
        if mcnemar_exact(0, flip as u64) < 0.05 {
            mcnemar_found += 1;
        }
    }
    let rate = alarms as f64 / reps as f64;
    let mean_p = p_sum / reps as f64;
    assert!(
        rate <= 0.08,
        "false alarms at p < 0.05: {alarms} of {reps} ({rate:.3})"
    );
    assert!(
        (0.4..=0.6).contains(&mean_p),
        "p-values under the null should be about uniform; mean {mean_p:.3}"
    );
    // 30 flips among 1,500 queries spread over 300 labels: the difference is about six
    // standard errors, so the expected power is 1 to three decimals.
    assert!(found >= reps * 99 / 100, "found {found} of {reps}");
    assert_eq!(mcnemar_found, reps);
}

#[test]
fn mcnemar_equals_scipy_binomtest() {
    // scipy.stats.binomtest(min(b, c), b + c, 0.5).pvalue (scipy 1.17.1).
    for (b, c, p) in [
        (0, 0, 1.0),
        (1, 0, 1.0),
        (3, 7, 0.34375),
        (10, 2, 0.03857421875),
        (25, 40, 0.08168153394154003),
        (100, 130, 0.05561357778139238),
        (5, 5, 1.0),
        (0, 12, 0.00048828125),
    ] {
        let got = mcnemar_exact(b, c);
        assert!(
            (got - p).abs() <= 1e-9 * p.max(1e-300),
            "b={b} c={c}: {got} vs scipy {p}"
        );
    }
}

#[test]
fn same_seed_same_interval_and_edge_cases_stay_defined() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (labels, _, hits) = draw_set(&mut rng, 40, 3);
    let c = Clusters::new(CiBy::Label, &labels);
    assert_eq!(c.len(), 40);
    let (big_labels, _, big_hits) = draw_set(&mut rng, 500, 7);
    let big = Clusters::new(CiBy::Label, &big_labels);
    let e = [mean_of(&big_hits, &big)];
    let one = intervals(&e, &big, &opts(CiBy::Label, 5)).unwrap();
    assert_eq!(one, intervals(&e, &big, &opts(CiBy::Label, 5)).unwrap());
    assert_ne!(one, intervals(&e, &big, &opts(CiBy::Label, 6)).unwrap());
    // Values of many kinds (every label's sum differs) take the direct path, cluster draws
    // shared by the estimands: also seeded, and about as wide as the kinds' path for the
    // same data's 0/1 version.
    let spread: Vec<f64> = big_hits
        .iter()
        .map(|&h| h * (0.9 + 0.1 * unit(&mut rng)))
        .collect();
    let kinds = mean_of(&spread, &big).kinds(big.len());
    assert!(
        kinds.times.len() * 16 > big.len(),
        "many kinds: the direct path"
    );
    let e2 = [mean_of(&spread, &big), mean_of(&big_hits, &big)];
    let two = intervals(&e2, &big, &opts(CiBy::Label, 5)).unwrap();
    assert_eq!(two, intervals(&e2, &big, &opts(CiBy::Label, 5)).unwrap());
    let (d, k) = (two[0].unwrap(), two[1].unwrap());
    assert!(d.low < d.estimate && d.estimate < d.high, "{d:?}");
    let ratio = (d.high - d.low) / (k.high - k.low);
    assert!((0.8..1.2).contains(&ratio), "direct {d:?} vs kinds {k:?}");
    // A constant metric: the interval is the point.
    let ones = vec![1.0; hits.len()];
    let i = intervals(&[mean_of(&ones, &c)], &c, &opts(CiBy::Label, 1)).unwrap()[0].unwrap();
    assert_eq!((i.low, i.estimate, i.high), (1.0, 1.0, 1.0));
    // One cluster: no jackknife, still an interval.
    let single = Clusters::new(CiBy::Label, &[Some(9); 5]);
    let v = [1.0, 0.0, 1.0, 1.0, 0.0];
    let i = intervals(&[mean_of(&v, &single)], &single, &opts(CiBy::Label, 1)).unwrap()[0].unwrap();
    assert_eq!((i.low, i.high), (0.6, 0.6));
    // A ratio with no query: undefined, not NaN.
    let none = Estimand::mean(Ratio::of(std::iter::empty(), &c));
    assert_eq!(
        intervals(&[none], &c, &opts(CiBy::Label, 1)).unwrap()[0],
        None
    );
    // Unlabelled queries are their own clusters.
    let c = Clusters::new(CiBy::Label, &[Some(1), None, Some(1), None]);
    assert_eq!(c.len(), 3);
    assert!(opts(CiBy::Query, 0).validate().is_ok());
    let mut bad = opts(CiBy::Query, 0);
    bad.resamples = 10;
    assert_eq!(bad.validate().unwrap_err().exit_code(), 2);
    bad.resamples = 1000;
    bad.level = 1.0;
    assert_eq!(bad.validate().unwrap_err().exit_code(), 2);
}
