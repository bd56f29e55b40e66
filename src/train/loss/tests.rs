//! The losses against OML's and pytorch-metric-learning's documented cases and naive
//! references.
use super::*;
use crate::train::miner::pairwise_dist;
use crate::train::sampler::rng;
use tch::Device;

fn t2(rows: &[&[f32]]) -> Tensor {
    let d = rows[0].len() as i64;
    let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_slice(&flat).view([-1, d])
}

fn scalar(t: &Tensor) -> f64 {
    t.double_value(&[])
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol
}

fn r() -> Rng {
    rng::seeded(0, 0)
}

fn assert_grads_finite(x: &Tensor) {
    let g = Vec::<f32>::try_from(&x.grad().view([-1])).unwrap();
    assert!(g.iter().all(|v| v.is_finite()), "{g:?}");
    assert!(g.iter().any(|v| *v != 0.0), "no gradient reached the input");
}

#[test]
fn triplet_hand_computed() {
    let a = t2(&[&[0.0, 0.0], &[0.0, 0.0]]);
    let p = t2(&[&[3.0, 4.0], &[1.0, 0.0]]);
    let n = t2(&[&[0.0, 1.0], &[0.0, 3.0]]);
    // d_p = [5, 1], d_n = [1, 3].
    let l = TripletLoss::new(Margin::Value(0.2), Reduction::Mean).unwrap();
    let out = l.forward(&a, &p, &n).unwrap();
    assert!(close(scalar(&out.loss), 2.1, 1e-5));
    assert_eq!(out.logs["active_tri"], 0.5);
    assert!(close(out.logs["pos_dist"], 3.0, 1e-6) && close(out.logs["neg_dist"], 2.0, 1e-6));
    let sum = TripletLoss::new(Margin::Value(0.2), Reduction::Sum).unwrap();
    assert!(close(
        scalar(&sum.forward(&a, &p, &n).unwrap().loss),
        4.2,
        1e-5
    ));
    let none = TripletLoss::new(Margin::Value(0.2), Reduction::None).unwrap();
    let v = Vec::<f32>::try_from(&none.forward(&a, &p, &n).unwrap().loss).unwrap();
    assert!(close(v[0] as f64, 4.2, 1e-5) && v[1] == 0.0);
    let soft = TripletLoss::new(Margin::Soft, Reduction::None).unwrap();
    let out = soft.forward(&a, &p, &n).unwrap();
    let v = Vec::<f32>::try_from(&out.loss).unwrap();
    assert!(close(v[0] as f64, 4f64.exp().ln_1p(), 1e-5));
    assert!(close(v[1] as f64, (-2f64).exp().ln_1p(), 1e-6));
    assert_eq!(out.logs["active_tri"], 1.0);
    assert!(TripletLoss::new(Margin::Value(0.0), Reduction::Mean).is_err());
}

#[test]
fn soft_triplet_is_ln2_when_equal_and_gradient_is_finite() {
    let x = Tensor::randn([5, 8], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let soft = TripletLoss::new(Margin::Soft, Reduction::Mean).unwrap();
    let out = soft.forward(&x, &x, &x).unwrap();
    assert!(close(scalar(&out.loss), std::f64::consts::LN_2, 1e-7));
    out.loss.backward();
    let g = Vec::<f32>::try_from(&x.grad().view([-1])).unwrap();
    assert!(g.iter().all(|v| v.is_finite()));
}

#[test]
fn triplet_matches_torch_triplet_margin_loss() {
    let a = Tensor::randn([16, 6], (Kind::Float, Device::Cpu));
    let p = Tensor::randn([16, 6], (Kind::Float, Device::Cpu));
    let n = Tensor::randn([16, 6], (Kind::Float, Device::Cpu));
    for margin in [0.2, 0.5, 1.5] {
        for (red, tr) in [
            (Reduction::Mean, tch::Reduction::Mean),
            (Reduction::Sum, tch::Reduction::Sum),
            (Reduction::None, tch::Reduction::None),
        ] {
            let ours = TripletLoss::new(Margin::Value(margin), red)
                .unwrap()
                .forward(&a, &p, &n)
                .unwrap()
                .loss;
            let theirs = Tensor::triplet_margin_loss(&a, &p, &n, margin, 2.0, 1e-6, false, tr);
            assert!(
                ours.allclose(&theirs, 1e-4, 1e-4, false),
                "{margin} {red:?}"
            );
        }
    }
}

#[test]
fn triplet_with_miner_logs_and_gradients() {
    let labels = vec![0, 0, 1, 1, 2, 2];
    let x = Tensor::randn([6, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let cfg: LossConfig =
        serde_json::from_str(r#"{"name":"triplet","margin":0.2,"miner":{"name":"hard_triplets"}}"#)
            .unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let mut c = cfg.build(&vs.root(), 4, 3, None).unwrap();
    let out = c.forward(&x, &labels, &mut r()).unwrap();
    out.loss.backward();
    for k in ["active_tri", "pos_dist", "neg_dist"] {
        assert!(out.logs.contains_key(k));
    }
    let g = Vec::<f32>::try_from(&x.grad().view([-1])).unwrap();
    assert!(g.iter().all(|v| v.is_finite()));
    assert!(
        vs.variables().is_empty(),
        "a triplet loss has no parameters"
    );
}

/// The triplet loss reads row-miner distances from a distance matrix; it must equal the
/// loss of the gathered vectors (OML's elementwise form), value and gradient, also with
/// duplicate rows (zero distances) and with a bank.
#[test]
fn triplet_distances_from_the_matrix_equal_the_gathered_vectors() {
    let labels = vec![0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3];
    let miners = [
        r#"{"name":"all_triplets"}"#,
        r#"{"name":"hard_triplets"}"#,
        r#"{"name":"n_hard_triplets","n_positive":2,"n_negative":[2,4]}"#,
        r#"{"name":"miner_with_bank","bank_size_in_batches":1,"n_negative":3}"#,
    ];
    for (mi, miner) in miners.iter().enumerate() {
        let mut m = MinerConfig::build(&serde_json::from_str(miner).unwrap()).unwrap();
        let loss = TripletLoss::new(Margin::Value(0.3), Reduction::Mean).unwrap();
        for step in 0..3 {
            tch::manual_seed((10 * mi + step) as i64);
            let base = Tensor::randn([12, 5], (Kind::Float, Device::Cpu));
            // Rows 1 and 2 coincide: a zero distance inside a label.
            base.get(2).copy_(&base.get(1));
            let x1 = base.copy().set_requires_grad(true);
            let x2 = base.copy().set_requires_grad(true);
            // miner_with_bank: the bank before this batch joins it.
            let bank = m.state().unwrap().tensors.first().map(|t| t.1.copy());
            let mined = m.mine(&x1, &labels, &mut r()).unwrap();
            let (dp, dn) = mined.distances().unwrap();
            let t = loss.terms_of_distances(dp, dn).unwrap();
            let ids = mined.ids.clone().unwrap();
            // The same triplets on the second copy, gathered; rows past the batch are the
            // bank's.
            let src = match bank {
                Some(b) if ids.a.iter().chain(&ids.p).chain(&ids.n).any(|&i| i >= 12) => {
                    Tensor::cat(&[&x2, &b], 0)
                }
                _ => x2.shallow_clone(),
            };
            let (a, p, n) = ids.gather(&src).unwrap();
            let want = loss.terms(&a, &p, &n).unwrap();
            let (v1, v2) = (
                scalar(&t.loss.mean(Kind::Float)),
                scalar(&want.loss.mean(Kind::Float)),
            );
            assert!(close(v1, v2, 1e-5), "{miner} step {step}: {v1} vs {v2}");
            t.loss.mean(Kind::Float).backward();
            want.loss.mean(Kind::Float).backward();
            let g1 = Vec::<f32>::try_from(&x1.grad().view([-1])).unwrap();
            let g2 = Vec::<f32>::try_from(&x2.grad().view([-1])).unwrap();
            assert!(g1.iter().all(|v| v.is_finite()), "{miner}: {g1:?}");
            for (a, b) in g1.iter().zip(&g2) {
                assert!((a - b).abs() < 1e-5, "{miner} step {step}: {a} vs {b}");
            }
        }
    }
}

#[test]
fn triplet_with_memory_bank_logs_average_to_overall() {
    let cfg: LossConfig = serde_json::from_str(
        r#"{"name":"triplet","margin":"soft","miner":{"name":"triplets_with_memory","bank_size_in_batches":3,"tri_expand_k":3}}"#,
    )
    .unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let mut c = cfg.build(&vs.root(), 4, 3, None).unwrap();
    let mut rg = r();
    let labels = vec![0, 0, 1, 1, 2, 2];
    for step in 0..4 {
        let x = Tensor::randn([6, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let out = c.forward(&x, &labels, &mut rg).unwrap();
        out.loss.backward();
        let l = &out.logs;
        let (no, nb) = (l["n_tri_orig"], l["n_tri_bank"]);
        assert_eq!(no, 24.0);
        for k in ["pos_dist", "neg_dist"] {
            let w = (l[&format!("{k}_orig")] * no + l[&format!("{k}_bank")] * nb) / (no + nb);
            assert!(close(w, l[k], 1e-5), "step {step} {k}");
        }
    }
    // The bank is in the criterion's state.
    let st = c.state().unwrap();
    assert_eq!(st.tensors.len(), 2);
}

#[test]
fn label_smoothing_oml_cases() {
    let y = Tensor::from_slice(&[1i64, 0]);
    let check = |t: Tensor, want: &[f32]| {
        let v = Vec::<f32>::try_from(&t.view([-1])).unwrap();
        for (a, b) in v.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{v:?} vs {want:?}");
        }
    };
    check(
        label_smoothing(&y, 2, 0.1, None).unwrap(),
        &[0.05, 0.95, 0.95, 0.05],
    );
    check(
        label_smoothing(&y, 3, 0.3, None).unwrap(),
        &[0.1, 0.8, 0.1, 0.8, 0.1, 0.1],
    );
    let c = Tensor::from_slice(&[0i64, 1, 1]);
    check(
        label_smoothing(&y, 3, 0.2, Some(&c)).unwrap(),
        &[0.0, 0.9, 0.1, 1.0, 0.0, 0.0],
    );
    let c = Tensor::from_slice(&[0i64, 0, 1]);
    check(
        label_smoothing(&y, 3, 0.2, Some(&c)).unwrap(),
        &[0.1, 0.9, 0.0, 0.9, 0.1, 0.0],
    );
}

/// ArcFace by the textbook: angles, margin on the true class's angle, softmax CE.
fn arcface_reference(
    x: &Tensor,
    w: &Tensor,
    y: &[i64],
    m: f64,
    s: f64,
    target: Option<&[Vec<f64>]>,
) -> f64 {
    let xs = Vec::<Vec<f32>>::try_from(x).unwrap();
    let ws = Vec::<Vec<f32>>::try_from(w).unwrap();
    let norm = |v: &[f32]| v.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
    let mut total = 0.0;
    for (i, xi) in xs.iter().enumerate() {
        let logits: Vec<f64> = ws
            .iter()
            .enumerate()
            .map(|(j, wj)| {
                let c = xi
                    .iter()
                    .zip(wj)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum::<f64>()
                    / (norm(xi) * norm(wj));
                if j as i64 == y[i] {
                    let theta = c.clamp(-1.0, 1.0).acos();
                    if theta + m < std::f64::consts::PI {
                        s * (theta + m).cos()
                    } else {
                        s * (c - m * m.sin())
                    }
                } else {
                    s * c
                }
            })
            .collect();
        let mx = logits.iter().cloned().fold(f64::MIN, f64::max);
        let lse = mx + logits.iter().map(|l| (l - mx).exp()).sum::<f64>().ln();
        total += match target {
            None => lse - logits[y[i] as usize],
            Some(t) => t[i].iter().zip(&logits).map(|(p, l)| p * (lse - l)).sum(),
        };
    }
    total / xs.len() as f64
}

#[test]
fn arcface_matches_reference_formula() {
    tch::manual_seed(3);
    for (m, s) in [(0.4, 64.0), (0.5, 64.0), (0.5, 48.0)] {
        let vs = nn::VarStore::new(Device::Cpu);
        let mut a = ArcFace::new(&vs.root(), 8, 5, m, s, 0.0, None, Reduction::Mean).unwrap();
        // Xavier-uniform bound sqrt(6 / (8 + 5)).
        let wmax = scalar(&a.weight.abs().max());
        assert!(wmax <= (6.0f64 / 13.0).sqrt() + 1e-6);
        let x = Tensor::randn([7, 8], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let y = vec![0, 1, 2, 3, 4, 0, 2];
        let out = a.forward(&x, &y, &mut r()).unwrap();
        let want = arcface_reference(&x.detach(), &a.weight.detach(), &y, m, s, None);
        assert!(
            close(scalar(&out.loss), want, 1e-3 * want.max(1.0)),
            "{} vs {want}",
            scalar(&out.loss)
        );
        let acc = out.logs["accuracy"];
        assert!((0.0..=1.0).contains(&acc));
        out.loss.backward();
        assert_grads_finite(&x);
        assert_grads_finite(&a.weight);
    }
}

#[test]
fn arcface_accuracy_and_smoothing() {
    let vs = nn::VarStore::new(Device::Cpu);
    let cats = vec!["b".to_string(), "a".into(), "a".into()];
    let mut a = ArcFace::new(
        &vs.root(),
        3,
        3,
        0.5,
        10.0,
        0.2,
        Some(&cats),
        Reduction::Mean,
    )
    .unwrap();
    assert_eq!(a.categories, Some(vec![1, 0, 0]));
    tch::no_grad(|| a.weight.copy_(&Tensor::eye(3, (Kind::Float, Device::Cpu))));
    let x = t2(&[&[1.0, 0.1, 0.0], &[0.0, 0.2, 1.0]]);
    let y = vec![0, 1];
    let out = a.forward(&x, &y, &mut r()).unwrap();
    assert_eq!(out.logs["accuracy"], 0.5); // row 0 -> class 0 (right), row 1 -> class 2 (wrong)
                                           // Category-aware targets: class 0 alone in "b"; classes 1, 2 share "a".
    let target = vec![vec![1.0, 0.0, 0.0], vec![0.0, 0.9, 0.1]];
    let want = arcface_reference(&x, &a.weight.detach(), &y, 0.5, 10.0, Some(&target));
    assert!(
        close(scalar(&out.loss), want, 1e-4),
        "{} vs {want}",
        scalar(&out.loss)
    );
    // Without categories: eps / C everywhere.
    let mut b = ArcFace::new(
        &(vs.root() / "b"),
        3,
        3,
        0.5,
        10.0,
        0.2,
        None,
        Reduction::Mean,
    )
    .unwrap();
    tch::no_grad(|| b.weight.copy_(&Tensor::eye(3, (Kind::Float, Device::Cpu))));
    let e = 0.2 / 3.0;
    let target = vec![vec![0.8 + e, e, e], vec![e, 0.8 + e, e]];
    let want = arcface_reference(&x, &b.weight.detach(), &y, 0.5, 10.0, Some(&target));
    let got = scalar(&b.forward(&x, &y, &mut r()).unwrap().loss);
    assert!(close(got, want, 1e-4), "{got} vs {want}");
    assert!(b.forward(&x, &[0, 3], &mut r()).is_err());
    assert!(ArcFace::new(
        &(vs.root() / "c"),
        3,
        3,
        0.5,
        10.0,
        1.0,
        None,
        Reduction::Mean
    )
    .is_err());
}

#[test]
fn mlp_arcface_builds_params_and_trains() {
    let vs = nn::VarStore::new(Device::Cpu);
    let cfg: LossConfig =
        serde_json::from_str(r#"{"name":"mlp_arcface","mlp_features":[16, 8],"s":16}"#).unwrap();
    let mut c = cfg.build(&(vs.root() / "criterion"), 12, 4, None).unwrap();
    let names: std::collections::BTreeSet<String> = vs.variables().into_keys().collect();
    let want: std::collections::BTreeSet<String> = [
        "criterion.mlp.0.weight",
        "criterion.mlp.0.bias",
        "criterion.mlp.2.weight",
        "criterion.mlp.2.bias",
        "criterion.arcface.weight",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(names, want);
    assert_eq!(
        vs.variables()["criterion.arcface.weight"].size(),
        vec![4, 8]
    );
    let x = Tensor::randn([6, 12], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let out = c.forward(&x, &[0, 1, 2, 3, 0, 1], &mut r()).unwrap();
    assert!(scalar(&out.loss).is_finite());
    out.loss.backward();
    assert_grads_finite(&x);
}

/// OML's exact retrieval case (T1): 6 items, labels [0,0,0,0,1,1], hit positions per query.
fn exact_case() -> (Tensor, Tensor) {
    let labels = [0, 0, 0, 0, 1, 1];
    let positions: [&[usize]; 6] = [&[0, 1, 3], &[0, 3, 4], &[1, 2, 4], &[2, 3, 4], &[0], &[3]];
    let mut d = vec![0f32; 36];
    let mut m = vec![false; 36];
    for q in 0..6 {
        let rel: Vec<usize> = (0..6)
            .filter(|&g| g != q && labels[g] == labels[q])
            .collect();
        let irr: Vec<usize> = (0..6).filter(|&g| labels[g] != labels[q]).collect();
        let (mut ri, mut ii) = (rel.iter(), irr.iter());
        for pos in 0..5 {
            let hit = positions[q].contains(&pos);
            let g = *if hit { ri.next() } else { ii.next() }.unwrap();
            d[q * 6 + g] = pos as f32 + 1.0;
            m[q * 6 + g] = hit;
        }
        d[q * 6 + q] = 1_000_000.0; // self, as OML's test: far away and not a match
    }
    (
        Tensor::from_slice(&d).view([6, 6]),
        Tensor::from_slice(&m).view([6, 6]),
    )
}

#[test]
fn surrogate_precision_equals_exact_precision_at_small_temperatures() {
    let (d, m) = exact_case();
    let expected: [(usize, [f64; 6]); 6] = [
        (1, [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]),
        (2, [1.0, 0.5, 0.5, 0.0, 1.0, 0.0]),
        (3, [2.0 / 3.0, 1.0 / 3.0, 2.0 / 3.0, 1.0 / 3.0, 1.0, 0.0]),
        (4, [1.0, 2.0 / 3.0, 2.0 / 3.0, 2.0 / 3.0, 1.0, 1.0]),
        (5, [1.0; 6]),
        (10, [1.0; 6]),
    ];
    for (k, want) in expected {
        let got = surrogate_precision(&d, &m, k, 1e-6, 1e-6, Reduction::None).unwrap();
        let got = Vec::<f32>::try_from(&got).unwrap();
        for (g, w) in got.iter().zip(want) {
            assert!(close(*g as f64, w, 1e-3), "k={k}: {got:?} vs {want:?}");
        }
    }
}

#[test]
fn surrogate_precision_loss_is_one_minus_precision_with_self() {
    let mut rg = rng::seeded(21, 0);
    for _ in 0..10 {
        let labels: Vec<i64> = (0..10).map(|_| rng::below(&mut rg, 3) as i64).collect();
        let x = Tensor::randn([10, 4], (Kind::Float, Device::Cpu));
        for k in [1usize, 2, 4] {
            let mut c = SurrogatePrecision {
                k,
                temperature1: 1e-6,
                temperature2: 1e-6,
                reduction: Reduction::Mean,
            };
            let loss = scalar(&c.forward(&x, &labels, &mut rg).unwrap().loss);
            // Exact: the batch ranked by distance from each item (itself first), the
            // share of same-label items among the first k+1, over min(n_same, k+1).
            let d = Vec::<Vec<f32>>::try_from(&pairwise_dist(&x, &x).unwrap()).unwrap();
            let mut prec = 0.0;
            for q in 0..10 {
                let mut order: Vec<usize> = (0..10).collect();
                order.sort_by(|&a, &b| d[q][a].total_cmp(&d[q][b]));
                assert_eq!(order[0], q);
                let hits = order[..k + 1]
                    .iter()
                    .filter(|&&g| labels[g] == labels[q])
                    .count();
                let n_same = labels.iter().filter(|&&l| l == labels[q]).count();
                prec += hits as f64 / n_same.min(k + 1) as f64;
            }
            assert!(
                close(loss, 1.0 - prec / 10.0, 1e-4),
                "k={k}: {loss} vs {}",
                1.0 - prec / 10.0
            );
        }
    }
    // Default temperatures: finite gradients.
    let x = Tensor::randn([8, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let mut c = SurrogatePrecision {
        k: 2,
        temperature1: 1.0,
        temperature2: 0.01,
        reduction: Reduction::Mean,
    };
    let out = c.forward(&x, &[0, 0, 1, 1, 2, 2, 3, 3], &mut r()).unwrap();
    out.loss.backward();
    assert_grads_finite(&x);
}

#[test]
fn contrastive_hand_computed() {
    // x0=(0,0), x1=(0.6,0.8), x2=(0.3,0.4): d01 = 1, d02 = d12 = 0.5; labels [0,0,1].
    let x = t2(&[&[0.0, 0.0], &[0.6, 0.8], &[0.3, 0.4]]).set_requires_grad(true);
    let labels = [0, 0, 1];
    let mut c = Contrastive {
        pos_margin: 0.0,
        neg_margin: 1.0,
        normalize: false,
    };
    let out = c.forward(&x, &labels, &mut r()).unwrap();
    // Positives: relu(1 - 0) twice, averaged: 1. Negatives: relu(1 - 0.5) four times: 0.5.
    assert!(close(scalar(&out.loss), 1.5, 1e-5), "{}", scalar(&out.loss));
    assert!(close(out.logs["pos_dist"], 1.0, 1e-5) && close(out.logs["neg_dist"], 0.5, 1e-5));
    out.loss.backward();
    assert_grads_finite(&x);
    // No active negatives: the negative term is 0, not NaN.
    c.neg_margin = 0.4;
    assert!(close(
        scalar(&c.forward(&x, &labels, &mut r()).unwrap().loss),
        1.0,
        1e-5
    ));
    assert_eq!(
        c.forward(&x, &labels, &mut r()).unwrap().logs["active_neg"],
        0.0
    );
    // Non-zero averaging: pos_margin 0.5 leaves the positive pair at 0.5.
    c.pos_margin = 0.5;
    assert!(close(
        scalar(&c.forward(&x, &labels, &mut r()).unwrap().loss),
        0.5,
        1e-5
    ));
    // normalize (pml's default): (3,4) and (6,8) coincide after normalisation.
    let y = t2(&[&[3.0, 4.0], &[6.0, 8.0], &[-4.0, 3.0], &[-8.0, 6.0]]);
    let mut n = Contrastive {
        pos_margin: 0.0,
        neg_margin: 2.0,
        normalize: true,
    };
    let out = n.forward(&y, &[0, 0, 1, 1], &mut r()).unwrap();
    // Negatives at distance sqrt(2): relu(2 - 1.41421) = 0.58579; positives ~0.
    assert!(
        close(scalar(&out.loss), 2.0 - 2f64.sqrt(), 1e-4),
        "{}",
        scalar(&out.loss)
    );
}

#[test]
fn multi_similarity_hand_computed() {
    let x = t2(&[&[1.0, 0.0], &[0.0, 2.0], &[3.0, 0.0]]).set_requires_grad(true);
    let labels = [0, 0, 1];
    let (a, b, base) = (2.0f64, 50.0f64, 0.5f64);
    let mut c = MultiSimilarity {
        alpha: a,
        beta: b,
        base,
    };
    let out = c.forward(&x, &labels, &mut r()).unwrap();
    // S01 = 0, S02 = 1, S12 = 0.
    let pos = |s: f64| (1.0 + (-a * (s - base)).exp()).ln() / a;
    let neg = |ss: &[f64]| (1.0 + ss.iter().map(|s| (b * (s - base)).exp()).sum::<f64>()).ln() / b;
    let rows = [
        pos(0.0) + neg(&[1.0]),
        pos(0.0) + neg(&[0.0]),
        neg(&[1.0, 0.0]),
    ];
    let want = rows.iter().sum::<f64>() / 3.0;
    assert!(
        close(scalar(&out.loss), want, 1e-5),
        "{} vs {want}",
        scalar(&out.loss)
    );
    out.loss.backward();
    assert_grads_finite(&x);
}

/// On a machine with CUDA: the losses and the memory-bank miner give the CPU's values.
#[test]
fn cuda_matches_cpu_when_available() {
    if !tch::Cuda::is_available() {
        return;
    }
    let cuda = Device::Cuda(0);
    let labels = vec![0, 0, 1, 1, 2, 2, 3, 3];
    let cfgs = [
        r#"{"name":"triplet","margin":0.2,"miner":{"name":"triplets_with_memory","bank_size_in_batches":2,"tri_expand_k":3}}"#,
        r#"{"name":"triplet","margin":"soft","miner":{"name":"miner_with_bank","bank_size_in_batches":1,"n_positive":1,"n_negative":[1,3]}}"#,
        r#"{"name":"triplet","margin":0.2,"miner":{"name":"hard_cluster"}}"#,
        r#"{"name":"surrogate_precision","k":2}"#,
        r#"{"name":"contrastive"}"#,
        r#"{"name":"multi_similarity"}"#,
        r#"{"name":"arcface","smoothing_epsilon":0.1}"#,
    ];
    for cfg in cfgs {
        let cfg: LossConfig = serde_json::from_str(cfg).unwrap();
        let (vs_c, vs_g) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(cuda));
        let mut c = cfg.build(&vs_c.root(), 6, 4, None).unwrap();
        let mut g = cfg.build(&vs_g.root(), 6, 4, None).unwrap();
        for (n, mut t) in vs_g.variables() {
            tch::no_grad(|| t.copy_(&vs_c.variables()[&n]));
        }
        let (mut r1, mut r2) = (rng::seeded(4, 0), rng::seeded(4, 0));
        for _ in 0..3 {
            let x = Tensor::randn([8, 6], (Kind::Float, Device::Cpu));
            let xg = x.to_device(cuda).set_requires_grad(true);
            let a = c.forward(&x, &labels, &mut r1).unwrap();
            let b = g.forward(&xg, &labels, &mut r2).unwrap();
            let (va, vb) = (scalar(&a.loss), scalar(&b.loss));
            assert!(
                close(va, vb, 1e-4 * va.abs().max(1.0)),
                "{cfg:?}: {va} vs {vb}"
            );
            b.loss.backward();
            assert_grads_finite(&xg);
        }
    }
}

#[test]
fn config_parses_with_defaults() {
    let c: LossConfig = serde_json::from_str(r#"{"name":"arcface"}"#).unwrap();
    assert_eq!(
        c,
        LossConfig::Arcface {
            m: 0.5,
            s: 64.0,
            smoothing_epsilon: 0.0,
            reduction: Reduction::Mean
        }
    );
    let c: LossConfig =
        serde_json::from_str(r#"{"name":"triplet_with_miner","margin":"soft","reduction":"sum"}"#)
            .unwrap();
    assert_eq!(
        c,
        LossConfig::Triplet {
            margin: Margin::Soft,
            reduction: Reduction::Sum,
            miner: MinerConfig::default()
        }
    );
    let c: LossConfig = serde_json::from_str(r#"{"name":"triplet","margin":1}"#).unwrap();
    assert!(matches!(c, LossConfig::Triplet { margin: Margin::Value(v), .. } if v == 1.0));
    let e =
        serde_json::from_str::<LossConfig>(r#"{"name":"triplet","margin":"hard"}"#).unwrap_err();
    assert!(e.to_string().contains("soft"), "{e}");
    assert!(serde_json::from_str::<LossConfig>(r#"{"name":"triplet","margin":-1}"#).is_err());
    assert!(serde_json::from_str::<LossConfig>(r#"{"name":"triplet"}"#).is_err());
    let e = serde_json::from_str::<LossConfig>(r#"{"name":"arcface","margin":0.2}"#).unwrap_err();
    assert!(e.to_string().contains("margin"), "{e}");
    let c: LossConfig = serde_json::from_str(r#"{"name":"surrogate_precision","k":5}"#).unwrap();
    assert!(
        matches!(c, LossConfig::SurrogatePrecision { temperature1, temperature2, .. } if temperature1 == 1.0 && temperature2 == 0.01)
    );
    let c: LossConfig = serde_json::from_str(r#"{"name":"multi_similarity"}"#).unwrap();
    assert_eq!(
        c,
        LossConfig::MultiSimilarity {
            alpha: 2.0,
            beta: 50.0,
            base: 0.5
        }
    );
    let c: LossConfig = serde_json::from_str(r#"{"name":"contrastive"}"#).unwrap();
    assert_eq!(
        c,
        LossConfig::Contrastive {
            pos_margin: 0.0,
            neg_margin: 1.0,
            normalize: true
        }
    );
    // Round trip.
    let back: LossConfig = serde_json::from_value(serde_json::to_value(&c).unwrap()).unwrap();
    assert_eq!(back, c);
}

#[test]
fn name_is_the_config_tag_for_every_loss() {
    // `name()` comes from strum and the tag from serde: they must spell each loss alike.
    let tables = [
        ("triplet", "margin = 0.1"),
        ("arcface", ""),
        ("mlp_arcface", "mlp_features = [4]"),
        ("surrogate_precision", "k = 3"),
        ("contrastive", ""),
        ("multi_similarity", ""),
        ("in_batch_negatives", ""),
    ];
    for (name, rest) in tables {
        let cfg: LossConfig = toml::from_str(&format!("name = \"{name}\"\n{rest}")).unwrap();
        assert_eq!(cfg.name(), name);
        let back = serde_json::to_value(&cfg).unwrap();
        assert_eq!(back["name"], name);
    }
}

/// The in-batch-negatives loss written out with loops: every ordered same-label pair,
/// cross-entropy of the positive against the anchor's other-label texts.
fn in_batch_negatives_naive(x: &[Vec<f64>], labels: &[i64], scale: f64) -> f64 {
    let norm = |v: &Vec<f64>| v.iter().map(|a| a * a).sum::<f64>().sqrt();
    let cos = |a: &Vec<f64>, b: &Vec<f64>| {
        a.iter().zip(b).map(|(p, q)| p * q).sum::<f64>() / (norm(a) * norm(b))
    };
    let (mut sum, mut n) = (0.0, 0);
    for i in 0..x.len() {
        for j in 0..x.len() {
            if i == j || labels[i] != labels[j] {
                continue;
            }
            let pos = (scale * cos(&x[i], &x[j])).exp();
            let negs: f64 = (0..x.len())
                .filter(|&k| labels[k] != labels[i])
                .map(|k| (scale * cos(&x[i], &x[k])).exp())
                .sum();
            sum += -(pos / (pos + negs)).ln();
            n += 1;
        }
    }
    sum / n as f64
}

#[test]
fn in_batch_negatives_equals_naive_reference() {
    tch::manual_seed(3);
    for (labels, scale) in [
        (vec![0i64, 0, 1, 1, 2, 2], 20.0),
        (vec![5, 1, 5, 1, 1, 7, 7, 5, 2, 2], 20.0),
        (vec![0, 0, 0, 1, 1, 1, 2, 2, 2], 1.0),
    ] {
        let x = Tensor::randn([labels.len() as i64, 6], (Kind::Float, Device::Cpu));
        let rows: Vec<Vec<f64>> = (0..labels.len() as i64)
            .map(|i| Vec::<f64>::try_from(x.get(i).to_kind(Kind::Double)).unwrap())
            .collect();
        let mut c = InBatchNegatives { scale };
        let got = scalar(&c.forward(&x, &labels, &mut r()).unwrap().loss);
        let want = in_batch_negatives_naive(&rows, &labels, scale);
        assert!(close(got, want, 1e-4 * want.max(1.0)), "{got} vs {want}");
    }
}

#[test]
fn in_batch_negatives_two_per_label_is_sentence_transformers_cross_entropy() {
    // Two texts per label and the negatives of anchor i all other-label texts: each pair's
    // term is cross-entropy over [positive, negatives] with the positive as the target, as
    // sentence-transformers computes it (scores * 20, F.cross_entropy).
    tch::manual_seed(4);
    let labels = vec![0i64, 1, 2, 0, 1, 2];
    let x = Tensor::randn([6, 8], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let mut c = InBatchNegatives { scale: 20.0 };
    let out = c.forward(&x, &labels, &mut r()).unwrap();
    let xn = l2_normalize(&x).unwrap();
    let s = xn.matmul(&xn.tr()) * 20.0;
    let mut terms = Vec::new();
    for i in 0..6i64 {
        let j = (i + 3) % 6;
        let cand: Vec<i64> = std::iter::once(j)
            .chain((0..6).filter(|&k| labels[k as usize] != labels[i as usize]))
            .collect();
        let logits = s
            .get(i)
            .index_select(0, &Tensor::from_slice(&cand))
            .unsqueeze(0);
        terms.push(logits.cross_entropy_for_logits(&Tensor::from_slice(&[0i64])));
    }
    let want = scalar(&Tensor::stack(&terms, 0).mean(Kind::Float));
    assert!(
        close(scalar(&out.loss), want, 1e-5),
        "{} vs {want}",
        scalar(&out.loss)
    );
    out.loss.backward();
    assert_grads_finite(&x);
    assert!(out.logs["accuracy"] >= 0.0 && out.logs["accuracy"] <= 1.0);
    assert!(out.logs["pos_sim"] <= 1.0 && out.logs["neg_sim"] >= -1.0);
}

#[test]
fn in_batch_negatives_refuses_batches_it_cannot_learn_from() {
    let x = Tensor::randn([4, 3], (Kind::Float, Device::Cpu));
    let mut c = InBatchNegatives { scale: 20.0 };
    let e = c.forward(&x, &[0, 1, 2, 3], &mut r()).unwrap_err();
    assert!(e.to_string().contains("n_instances >= 2"), "{e}");
    let e = c.forward(&x, &[1, 1, 1, 1], &mut r()).unwrap_err();
    assert!(e.to_string().contains("n_labels >= 2"), "{e}");
    // A well-separated batch: the loss is near 0 and every positive wins.
    let x = t2(&[&[1.0, 0.0], &[0.99, 0.1], &[0.0, 1.0], &[0.1, 0.99]]);
    let out = c.forward(&x, &[0, 0, 1, 1], &mut r()).unwrap();
    assert!(scalar(&out.loss) < 1e-6, "{}", scalar(&out.loss));
    assert_eq!(out.logs["accuracy"], 1.0);
}
