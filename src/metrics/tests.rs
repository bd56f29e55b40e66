//! OML's own test cases (from `docs`' reference, oml.md section 10) and property tests of
//! every metric against naive reference implementations on random rankings.
use super::aggregate::*;
use super::fnmr;
use super::ranking::*;

const EPS: f64 = 1e-12;

fn flags(s: &str) -> Vec<bool> {
    s.chars().map(|c| c == 'V' || c == '1').collect()
}

fn close(a: f64, b: f64) -> bool {
    (a.is_nan() && b.is_nan()) || (a - b).abs() < 1e-9
}

/// T1: OML's exact 6-item case (`test_retrieval_metrics.py::exact_test_case`).
#[test]
fn oml_t1_exact_case_all_k() {
    let rows = ["VVXVX", "VXXVV", "XVVXV", "XXVVV", "VXXXX", "XXXVX"];
    let n_gt = [3, 3, 3, 3, 1, 1];
    let t = 1.0 / 3.0;
    type Row = [f64; 6];
    #[rustfmt::skip]
    let expected: [(usize, Row, Row, Row); 6] = [
        (1, [1., 1., 0., 0., 1., 0.], [1., 1., 0., 0., 1., 0.], [1., 1., 0., 0., 1., 0.]),
        (2, [1., 1., 1., 0., 1., 0.], [1., 0.5, 0.5, 0., 1., 0.], [1., 1., 0.5, 0., 1., 0.]),
        (3, [1., 1., 1., 1., 1., 0.], [2. * t, t, 2. * t, t, 1., 0.], [1., 1., 7. / 12., t, 1., 0.]),
        (4, [1.; 6], [1., 2. * t, 2. * t, 2. * t, 1., 1.], [11. / 12., 0.75, 7. / 12., 5. / 12., 1., 0.25]),
        (5, [1.; 6], [1.; 6], [11. / 12., 21. / 30., 53. / 90., 43. / 90., 1., 0.25]),
        (10, [1.; 6], [1.; 6], [11. / 12., 21. / 30., 53. / 90., 43. / 90., 1., 0.25]),
    ];
    for (k, cmc, prec, map) in expected {
        for q in 0..6 {
            let h = flags(rows[q]);
            assert!(close(cmc_at_k(&h, n_gt[q], k), cmc[q]), "cmc@{k} q{q}");
            assert!(
                close(precision_at_k(&h, n_gt[q], k), prec[q]),
                "precision@{k} q{q}"
            );
            assert!(close(map_at_k(&h, n_gt[q], k), map[q]), "map@{k} q{q}");
        }
    }
}

/// T2a: empty predictions (`test_metrics_retrieval.py`): gt sizes 1, 0, 2 and no results.
#[test]
fn oml_t2a_empty_predictions() {
    let n_gt = [1, 0, 2];
    let got: Vec<[f64; 3]> = n_gt
        .iter()
        .map(|&n| {
            [
                cmc_at_k(&[], n, 3),
                precision_at_k(&[], n, 2),
                map_at_k(&[], n, 1),
            ]
        })
        .collect();
    assert_eq!(got, vec![[0.0; 3], [1.0; 3], [0.0; 3]]);
    // Every metric follows the same edge rule.
    for m in [
        Metric::Ndcg(3),
        Metric::Recall(3),
        Metric::MapAtR,
        Metric::RPrecision,
        Metric::Mrr,
    ] {
        assert_eq!(m.eval(&[], 0), 1.0, "{m:?}");
        assert_eq!(m.eval(&[], 4), 0.0, "{m:?}");
    }
}

/// T2b: categories. retrieved [[0,5,4],[2,1,5],[2,1,5]], gt [[0,10,4],[2,3],[2,3]].
#[test]
fn oml_t2b_categories() {
    let retrieved: [&[i64]; 3] = [&[0, 5, 4], &[2, 1, 5], &[2, 1, 5]];
    let gt: [&[i64]; 3] = [&[0, 10, 4], &[2, 3], &[2, 3]];
    let hits: Vec<Vec<bool>> = retrieved
        .iter()
        .zip(&gt)
        .map(|(r, g)| r.iter().map(|x| g.contains(x)).collect())
        .collect();
    let rel: Vec<Relevance> = hits
        .iter()
        .zip(&gt)
        .map(|(h, g)| Relevance {
            hits: h,
            n_gt: g.len(),
        })
        .collect();
    let cats: Vec<Option<String>> = ["cat", "dog", "dog"]
        .iter()
        .map(|s| Some(s.to_string()))
        .collect();
    let set = MetricSet {
        cmc: vec![1],
        precision: vec![3, 5],
        map: vec![],
        ..Default::default()
    };
    let s = evaluate(&rel, Some(&cats), &set, AggregateOptions::default()).unwrap();
    let v = |k: &str| s.get(k).unwrap().unwrap();
    assert_eq!(v("OVERALL/cmc/1"), 1.0);
    let p = (2.0 / 3.0 + 0.5 + 0.5) / 3.0;
    assert!((v("OVERALL/precision/3") - p).abs() < EPS);
    assert!((v("OVERALL/precision/5") - p).abs() < EPS);
    assert!((v("cat/precision/3") - 2.0 / 3.0).abs() < EPS);
    assert!((v("dog/precision/5") - 0.5).abs() < EPS);
    assert_eq!(v("dog/n_queries"), 2.0);
    let keys: Vec<&str> = s.entries.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys[..5],
        [
            "OVERALL/cmc/1",
            "OVERALL/precision/3",
            "OVERALL/precision/5",
            "OVERALL/n_queries",
            "OVERALL/n_queries_without_positives"
        ]
    );
    assert_eq!(keys[5], "cat/cmc/1");
}

/// MAP@k docstring example: gt_tops [1,0], [0,1], [0,0,0,0], [] with n_gt [1,1,2,0].
#[test]
fn oml_map_docstring() {
    let tops = [flags("10"), flags("01"), flags("0000"), vec![]];
    let n_gt = [1, 1, 2, 0];
    let at = |k| {
        (0..4)
            .map(|i| map_at_k(&tops[i], n_gt[i], k))
            .collect::<Vec<_>>()
    };
    assert_eq!(at(1), vec![1.0, 0.0, 0.0, 1.0]);
    assert_eq!(at(2), vec![1.0, 0.5, 0.0, 1.0]);
}

/// Precision@k docstring example: n_gt = 3, hits [1,1,1,0,0] gives 1 for every k.
#[test]
fn oml_precision_docstring() {
    let h = flags("11100");
    for k in 1..=10 {
        assert_eq!(precision_at_k(&h, 3, k), 1.0, "k={k}");
    }
}

/// CMC@k and Precision@k docstring examples of OML's `calc_cmc` / `calc_precision`:
/// gt_tops [1,0], [0,1,1], [0,0], [].
#[test]
fn oml_cmc_and_precision_docstrings() {
    let tops = [flags("10"), flags("011"), flags("00"), vec![]];
    let cmc = |k| {
        (0..4)
            .map(|i| cmc_at_k(&tops[i], [2, 2, 1, 0][i], k))
            .collect::<Vec<_>>()
    };
    assert_eq!(cmc(1), vec![1.0, 0.0, 0.0, 1.0]);
    assert_eq!(cmc(2), vec![1.0, 1.0, 0.0, 1.0]);
    let prec = |k| {
        (0..4)
            .map(|i| precision_at_k(&tops[i], [2, 3, 5, 2][i], k))
            .collect::<Vec<_>>()
    };
    assert_eq!(prec(1), vec![1.0, 0.0, 0.0, 0.0]);
    assert_eq!(prec(2), vec![0.5, 0.5, 0.0, 0.0]);
}

/// Queries without positives: OML's CMC and MAP give 0, its Precision 0/0; simile leaves the
/// NaN out of the Precision mean only, or the query out of every mean when asked.
#[test]
fn queries_without_positives() {
    let h = [flags("10"), flags("00")];
    let rel = [
        Relevance {
            hits: &h[0],
            n_gt: 1,
        },
        Relevance {
            hits: &h[1],
            n_gt: 0,
        },
    ];
    assert!(precision_at_k(&h[1], 0, 2).is_nan());
    assert_eq!(cmc_at_k(&h[1], 0, 2), 0.0);
    assert_eq!(map_at_k(&h[1], 0, 2), 0.0);
    let set = MetricSet::default_set();
    let s = evaluate(&rel, None, &set, AggregateOptions::default()).unwrap();
    assert_eq!(s.get("OVERALL/cmc/1"), Some(Some(0.5)));
    assert_eq!(s.get("OVERALL/precision/5"), Some(Some(1.0)));
    assert_eq!(s.get("OVERALL/map/5"), Some(Some(0.5)));
    assert_eq!(
        s.get("OVERALL/n_queries_without_positives"),
        Some(Some(1.0))
    );
    let skip = AggregateOptions {
        skip_queries_without_positives: true,
    };
    let s = evaluate(&rel, None, &set, skip).unwrap();
    assert_eq!(s.get("OVERALL/cmc/1"), Some(Some(1.0)));
    assert_eq!(s.get("OVERALL/map/5"), Some(Some(1.0)));
    // A group whose values are all undefined has a null mean.
    let only = [rel[1]];
    let s = evaluate(&only, None, &set, AggregateOptions::default()).unwrap();
    assert_eq!(s.get("OVERALL/precision/5"), Some(None));
    assert_eq!(s.to_json()["OVERALL/precision/5"], serde_json::Value::Null);
}

#[test]
fn default_set_and_keys() {
    let keys: Vec<String> = default_metric_set_keys();
    assert_eq!(keys, ["cmc/1", "cmc/5", "precision/5", "map/5"]);
    let set = MetricSet {
        ndcg: vec![10, 5, 10],
        recall: vec![5],
        map_at_r: true,
        r_precision: true,
        mrr: true,
        ..MetricSet::default_set()
    };
    let keys: Vec<String> = set.metrics().iter().map(Metric::key).collect();
    assert_eq!(
        keys,
        [
            "cmc/1",
            "cmc/5",
            "precision/5",
            "map/5",
            "ndcg/5",
            "ndcg/10",
            "recall/5",
            "map@r",
            "r_precision",
            "mrr"
        ]
    );
    assert_eq!(set.max_k(), 10);
    let bad = MetricSet {
        cmc: vec![0],
        ..Default::default()
    };
    assert!(bad
        .validate()
        .unwrap_err()
        .to_string()
        .contains("positive integer"));
}

fn default_metric_set_keys() -> Vec<String> {
    super::default_metric_set()
        .metrics()
        .iter()
        .map(Metric::key)
        .collect()
}

#[test]
fn python_float_repr() {
    for (x, s) in [
        (0.5, "0.5"),
        (0.01, "0.01"),
        (0.1, "0.1"),
        (1.0, "1.0"),
        (0.0, "0.0"),
        (0.001, "0.001"),
        (0.0001, "0.0001"),
        (0.00001, "1e-05"),
        (1.5e-7, "1.5e-07"),
        (0.95, "0.95"),
        (123.25, "123.25"),
        (1e16, "1e+16"),
        (2.5e15, "2500000000000000.0"),
    ] {
        assert_eq!(python_float(x), s);
    }
}

/// T4: FNMR@FMR (`test_calc_fnmr_at_fmr` and its RetrievalResults variant).
#[test]
fn oml_t4_fnmr() {
    let pos = [0f32, 0., 1., 1., 2., 2., 5., 5., 9., 9.];
    let mut neg = [7f32, 7., 8., 8., 3., 3., 4., 4., 6., 6.];
    assert_eq!(
        fnmr::fnmr_at_fmr(&pos, &mut neg, &[0.1, 0.5]),
        vec![Some(0.4), Some(0.2)]
    );
    // The RR form: two queries' lists, gt ids 10..=18 and 10.
    let d0 = [0f32, 0., 1., 1., 2., 2., 5., 5., 7., 7., 8., 8., 9.];
    let r0 = [10, 11, 12, 13, 14, 15, 16, 17, 20, 21, 22, 23, 18];
    let d1 = [3f32, 3., 4., 4., 6., 6., 9.];
    let r1 = [20, 21, 22, 23, 24, 25, 10];
    let mut dist: Vec<f32> = d0.to_vec();
    dist.extend_from_slice(&d1);
    let mut hits: Vec<bool> = r0.iter().map(|&g| (10..=18).contains(&g)).collect();
    hits.extend(r1.iter().map(|&g| g == 10));
    assert_eq!(
        fnmr::fnmr_from_pairs(&dist, &hits, &[0.1, 0.5]),
        vec![Some(0.4), Some(0.2)]
    );
    // The streaming form gives the same.
    assert_eq!(
        stream(&dist, &hits, &[0.1, 0.5]),
        vec![Some(0.4), Some(0.2)]
    );
}

fn stream(dist: &[f32], hits: &[bool], fmr: &[f64]) -> Vec<Option<f64>> {
    fnmr::streaming_fnmr(fmr, |pass| {
        // Two "threads" merged, as the embeddings path does.
        let mut a = fnmr::Counts::new(pass);
        let mut b = fnmr::Counts::new(pass);
        for (i, (&d, &h)) in dist.iter().zip(hits).enumerate() {
            if i % 2 == 0 { &mut a } else { &mut b }.add(pass, d, h);
        }
        Ok(a.merge(&b))
    })
    .unwrap()
}

/// A small seeded generator (splitmix64), so the property tests need no crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Naive references, written from the definitions over the list of hit positions (1-based
/// ranks), independently of the implementations above.
mod naive {
    fn positions(h: &[bool], upto: usize) -> Vec<usize> {
        (1..=h.len().min(upto)).filter(|&r| h[r - 1]).collect()
    }
    fn edge(h: &[bool], n_gt: usize) -> Option<f64> {
        h.is_empty().then_some(if n_gt == 0 { 1.0 } else { 0.0 })
    }
    pub fn cmc(h: &[bool], n_gt: usize, k: usize) -> f64 {
        edge(h, n_gt).unwrap_or(if positions(h, k).is_empty() { 0.0 } else { 1.0 })
    }
    pub fn precision(h: &[bool], n_gt: usize, k: usize) -> f64 {
        edge(h, n_gt).unwrap_or_else(|| {
            let kk = k.min(h.len());
            positions(h, kk).len() as f64 / n_gt.min(kk) as f64
        })
    }
    pub fn map(h: &[bool], n_gt: usize, k: usize) -> f64 {
        edge(h, n_gt).unwrap_or_else(|| {
            let p = positions(h, k);
            if p.is_empty() {
                return 0.0;
            }
            p.iter()
                .enumerate()
                .map(|(j, &r)| (j + 1) as f64 / r as f64)
                .sum::<f64>()
                / p.len() as f64
        })
    }
    fn dcg(h: &[bool], k: usize) -> f64 {
        positions(h, k)
            .iter()
            .map(|&r| 1.0 / ((r + 1) as f64).log2())
            .sum()
    }
    pub fn ndcg(h: &[bool], n_gt: usize, k: usize) -> f64 {
        edge(h, n_gt).unwrap_or_else(|| dcg(h, k) / dcg(&vec![true; n_gt], k))
    }
    pub fn recall(h: &[bool], n_gt: usize, k: usize) -> f64 {
        edge(h, n_gt).unwrap_or_else(|| positions(h, k).len() as f64 / n_gt as f64)
    }
    pub fn map_at_r(h: &[bool], n_gt: usize) -> f64 {
        edge(h, n_gt).unwrap_or_else(|| {
            let p = positions(h, n_gt);
            p.iter()
                .enumerate()
                .map(|(j, &r)| (j + 1) as f64 / r as f64)
                .sum::<f64>()
                / n_gt as f64
        })
    }
    pub fn r_precision(h: &[bool], n_gt: usize) -> f64 {
        edge(h, n_gt).unwrap_or_else(|| positions(h, n_gt).len() as f64 / n_gt as f64)
    }
    pub fn mrr(h: &[bool], n_gt: usize) -> f64 {
        edge(h, n_gt).unwrap_or_else(|| {
            positions(h, h.len())
                .first()
                .map_or(0.0, |&r| 1.0 / r as f64)
        })
    }
}

#[test]
fn property_every_metric_matches_naive_reference() {
    let mut rng = Rng(42);
    for _ in 0..20_000 {
        let len = rng.below(25);
        let p = rng.unit();
        let h: Vec<bool> = (0..len).map(|_| rng.unit() < p).collect();
        let hits = h.iter().filter(|&&x| x).count();
        // n_gt counts the whole gallery: at least the hits, sometimes 0 with no hits.
        let n_gt = if hits == 0 && rng.below(4) == 0 {
            0
        } else {
            hits + rng.below(6)
        };
        let k = 1 + rng.below(30);
        let checks = [
            (Metric::Cmc(k), naive::cmc(&h, n_gt, k)),
            (Metric::Precision(k), naive::precision(&h, n_gt, k)),
            (Metric::Map(k), naive::map(&h, n_gt, k)),
            (Metric::Ndcg(k), naive::ndcg(&h, n_gt, k)),
            (Metric::Recall(k), naive::recall(&h, n_gt, k)),
            (Metric::MapAtR, naive::map_at_r(&h, n_gt)),
            (Metric::RPrecision, naive::r_precision(&h, n_gt)),
            (Metric::Mrr, naive::mrr(&h, n_gt)),
        ];
        for (m, want) in checks {
            let got = m.eval(&h, n_gt);
            assert!(
                close(got, want),
                "{m:?} on {h:?} n_gt={n_gt}: {got} vs {want}"
            );
            assert!(
                got.is_nan() || (0.0..=1.0 + 1e-12).contains(&got),
                "{m:?} out of range"
            );
        }
    }
}

#[test]
fn property_means_match_naive_mean() {
    let mut rng = Rng(7);
    let n = 500;
    let hs: Vec<Vec<bool>> = (0..n)
        .map(|_| (0..rng.below(12)).map(|_| rng.below(3) == 0).collect())
        .collect();
    let n_gt: Vec<usize> = hs
        .iter()
        .map(|h| h.iter().filter(|&&x| x).count() + rng.below(3))
        .collect();
    let cats: Vec<Option<String>> = (0..n)
        .map(|_| match rng.below(3) {
            0 => None,
            c => Some(format!("c{c}")),
        })
        .collect();
    let rel: Vec<Relevance> = hs
        .iter()
        .zip(&n_gt)
        .map(|(h, &g)| Relevance { hits: h, n_gt: g })
        .collect();
    let set = MetricSet {
        ndcg: vec![3],
        recall: vec![3],
        mrr: true,
        ..MetricSet::default_set()
    };
    for skip in [false, true] {
        let s = evaluate(
            &rel,
            Some(&cats),
            &set,
            AggregateOptions {
                skip_queries_without_positives: skip,
            },
        )
        .unwrap();
        for m in set.metrics() {
            for group in ["OVERALL", "c1", "c2"] {
                let vals: Vec<f64> = (0..n)
                    .filter(|&q| group == "OVERALL" || cats[q].as_deref() == Some(group))
                    .filter(|&q| !(skip && n_gt[q] == 0))
                    .map(|q| m.eval(&hs[q], n_gt[q]))
                    .filter(|v| !v.is_nan())
                    .collect();
                let want = vals.iter().sum::<f64>() / vals.len() as f64;
                let got = s.get(&format!("{group}/{}", m.key())).unwrap().unwrap();
                assert!((got - want).abs() < 1e-12, "{group}/{m:?}");
            }
        }
    }
}

/// Sorting every distance and applying numpy's formula, as the reference.
fn naive_fnmr(dist: &[f32], hits: &[bool], f: f64) -> Option<f64> {
    let mut neg: Vec<f64> = dist
        .iter()
        .zip(hits)
        .filter(|(_, &h)| !h)
        .map(|(&d, _)| d as f64)
        .collect();
    let pos: Vec<f64> = dist
        .iter()
        .zip(hits)
        .filter(|(_, &h)| h)
        .map(|(&d, _)| d as f64)
        .collect();
    if neg.is_empty() || pos.is_empty() {
        return None;
    }
    neg.sort_by(f64::total_cmp);
    let h = (neg.len() - 1) as f64 * f;
    let lo = h.floor() as usize;
    let hi = (lo + 1).min(neg.len() - 1);
    let g = h - lo as f64;
    let t = if g >= 0.5 {
        neg[hi] - (neg[hi] - neg[lo]) * (1.0 - g)
    } else {
        neg[lo] + (neg[hi] - neg[lo]) * g
    };
    Some(pos.iter().filter(|&&p| p >= t).count() as f64 / pos.len() as f64)
}

#[test]
fn property_fnmr_streaming_and_in_memory_match_sorting() {
    let mut rng = Rng(99);
    let fmr = [0.0, 0.001, 0.01, 0.1, 0.25, 0.5, 0.9, 1.0];
    for case in 0..60 {
        let n = 1 + rng.below(3000);
        let dist: Vec<f32> = (0..n)
            .map(|_| match case % 4 {
                // Few distinct values: many ties at the threshold.
                0 => rng.below(7) as f32 * 0.5,
                // A narrow range: the wanted ranks share high bins.
                1 => 1.0 + rng.unit() as f32 * 1e-4,
                // Wide range, negatives too (dot distances).
                2 => (rng.unit() as f32 - 0.5) * 1e6,
                _ => rng.unit() as f32 * 2.0,
            })
            .collect();
        let hits: Vec<bool> = (0..n).map(|_| rng.below(4) == 0).collect();
        let want: Vec<Option<f64>> = fmr.iter().map(|&f| naive_fnmr(&dist, &hits, f)).collect();
        assert_eq!(
            fnmr::fnmr_from_pairs(&dist, &hits, &fmr),
            want,
            "case {case}"
        );
        assert_eq!(stream(&dist, &hits, &fmr), want, "case {case}");
    }
    // A threshold far from both neighbouring negatives, with positives between: the
    // third pass.
    let dist = [1.0f32, 1000.0, 400.0, 500.0, 600.0, 501.0];
    let hits = [false, false, true, true, true, true];
    assert_eq!(
        stream(&dist, &hits, &[0.5]),
        vec![naive_fnmr(&dist, &hits, 0.5)]
    );
    assert_eq!(stream(&dist, &hits, &[0.5]), vec![Some(0.5)]);
}
