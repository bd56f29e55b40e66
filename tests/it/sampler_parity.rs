//! simile's `balance` sampler against OML 4.0's `BalanceSampler` as distributions (issue 24,
//! item 2). The two draw from different generators (ChaCha8 per epoch against numpy's global
//! Mersenne Twister), so no batch can be compared with another; what must agree is everything
//! that does not depend on the generator: the number of batches per epoch, the per-epoch label
//! coverage, the shape of every batch, the instance draw rule (with replacement only for a
//! label with fewer than `n_instances` rows, and then all its rows plus uniform extras), and
//! how often each label and each row is drawn over many epochs.
//!
//! The data: 300 labels (sparse values, rows in shuffled order) with 2..=30 rows each (every
//! count about 10 times), P = 8 labels x K = 4 instances, 200 epochs on each side: 37 batches
//! per epoch, 4 labels left out each epoch. OML's side runs its own `BalanceSampler` in the
//! virtualenv scripts/bootstrap-oml.sh makes, seeded once as OML's pipelines do (numpy's
//! global state runs on across epochs); simile's side builds the sampler from the `[sampler]`
//! config as the trainer does and draws epoch e from `rng::seeded(seed, e)`.
//!
//! Known, deliberate difference (not tested): the order of the labels inside a batch (OML's
//! is a Python `set`'s iteration order, simile's is random); nothing in a loss or miner
//! depends on it beyond float summation order.
use crate::common;

use simile::train::sampler::{rng, SamplerConfig};
use std::collections::{BTreeMap, BTreeSet};

const N_LABELS: usize = 8;
const N_INSTANCES: usize = 4;
const L: usize = 300;
const EPOCHS: usize = 200;

/// OML's side: reads {labels, n_labels, n_instances, epochs, seed} from argv[1], writes the
/// batches of every epoch (dataset positions) and whether it refuses the corner cases that
/// simile refuses, to argv[2].
const OML_SCRIPT: &str = r#"
import json, sys
import numpy as np
from oml.samplers.balance import BalanceSampler

cfg = json.load(open(sys.argv[1]))
labels, P, K = cfg["labels"], cfg["n_labels"], cfg["n_instances"]
np.random.seed(cfg["seed"])
s = BalanceSampler(labels, n_labels=P, n_instances=K)
epochs = [[[int(i) for i in b] for b in s] for _ in range(cfg["epochs"])]

def refuses(lab, p, k):
    try:
        BalanceSampler(lab, n_labels=p, n_instances=k)
        return False
    except AssertionError:
        return True

n_unique = len(set(labels))
refusals = {
    "singleton_label": refuses(labels + [-1], P, K),
    "n_instances_1": refuses(labels, P, 1),
    "n_labels_1": refuses(labels, 1, K),
    "n_labels_above_L": refuses(labels, n_unique + 1, K),
}
json.dump({"len": len(s), "batch_size": s.batch_size, "epochs": epochs, "refusals": refusals},
          open(sys.argv[2], "w"))
"#;

/// One label per dataset row: label i (value 1000 + 37 i) has 2 + (11 i mod 29) rows, the
/// rows in a shuffled order.
fn make_labels() -> Vec<i64> {
    let mut labels: Vec<i64> = (0..L)
        .flat_map(|i| std::iter::repeat_n(1000 + 37 * i as i64, 2 + (11 * i) % 29))
        .collect();
    rng::shuffle(&mut rng::seeded(7, 0), &mut labels);
    labels
}

type Epochs = Vec<Vec<Vec<usize>>>;

/// What one side drew, summarised.
struct Stats {
    /// Per epoch: the number of distinct labels it used.
    coverage: Vec<usize>,
    /// Per label value: the number of epochs that used it.
    label_chosen: BTreeMap<i64, usize>,
    /// Per dataset position: the number of times it was drawn.
    row_drawn: Vec<usize>,
    /// For labels with 2 rows (K = 4): shares split 2+2, and all such shares.
    two_row_even: usize,
    two_row_shares: usize,
}

/// Checks every batch's shape and the draw rule, panicking with `side`, and summarises.
fn check_and_summarise(side: &str, epochs: &Epochs, labels: &[i64]) -> Stats {
    let mut rows_of: BTreeMap<i64, usize> = BTreeMap::new();
    for &l in labels {
        *rows_of.entry(l).or_default() += 1;
    }
    let mut st = Stats {
        coverage: Vec::new(),
        label_chosen: rows_of.keys().map(|&l| (l, 0)).collect(),
        row_drawn: vec![0; labels.len()],
        two_row_even: 0,
        two_row_shares: 0,
    };
    for (e, batches) in epochs.iter().enumerate() {
        let mut seen: BTreeSet<i64> = BTreeSet::new();
        for (b, batch) in batches.iter().enumerate() {
            assert_eq!(
                batch.len(),
                N_LABELS * N_INSTANCES,
                "{side} epoch {e} batch {b}: size"
            );
            let mut share: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
            for &i in batch {
                share.entry(labels[i]).or_default().push(i);
                st.row_drawn[i] += 1;
            }
            // (c) exactly P distinct labels, K rows each.
            assert_eq!(share.len(), N_LABELS, "{side} epoch {e} batch {b}: labels");
            for (&l, rows) in &share {
                assert_eq!(
                    rows.len(),
                    N_INSTANCES,
                    "{side} epoch {e} batch {b} label {l}"
                );
                let distinct: BTreeSet<usize> = rows.iter().copied().collect();
                let c = rows_of[&l];
                // (d)/(e) without replacement when the label has >= K rows; otherwise every
                // one of its rows once plus K - c repeats.
                assert_eq!(
                    distinct.len(),
                    c.min(N_INSTANCES),
                    "{side} epoch {e} batch {b} label {l} ({c} rows): distinct rows {rows:?}"
                );
                if c == 2 {
                    st.two_row_shares += 1;
                    st.two_row_even +=
                        usize::from(rows.iter().filter(|&&r| r == rows[0]).count() == 2);
                }
                // Each label at most once per epoch.
                assert!(seen.insert(l), "{side} epoch {e}: label {l} in two batches");
                *st.label_chosen.get_mut(&l).unwrap() += 1;
            }
        }
        st.coverage.push(seen.len());
    }
    st
}

/// Two-sample chi-square of equal-total counts, Σ (a - b)² / (a + b), and its degrees of
/// freedom (non-empty cells - 1).
fn chi2_two_sample(a: &[usize], b: &[usize]) -> (f64, usize) {
    let mut stat = 0.0;
    let mut cells = 0;
    for (&x, &y) in a.iter().zip(b) {
        if x + y > 0 {
            stat += (x as f64 - y as f64).powi(2) / (x + y) as f64;
            cells += 1;
        }
    }
    (stat, cells - 1)
}

/// Pearson's chi-square of `observed` against `expected`.
fn chi2_fit(observed: &[usize], expected: &[f64]) -> f64 {
    observed
        .iter()
        .zip(expected)
        .map(|(&o, &e)| (o as f64 - e).powi(2) / e)
        .sum()
}

/// The bound a chi-square with `df` degrees of freedom passes with probability about 1e-6
/// (normal approximation, df + 6 sd; df is ~300 or ~4800 here).
fn chi2_bound(df: usize) -> f64 {
    df as f64 + 6.0 * (2.0 * df as f64).sqrt()
}

#[test]
fn balance_matches_oml_balance_sampler_as_a_distribution() {
    let t0 = std::time::Instant::now();
    let labels = make_labels();
    let n_rows = labels.len();

    // OML's side.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cfg.json");
    let out = dir.path().join("oml.json");
    std::fs::write(
        &cfg,
        serde_json::json!({
            "labels": labels, "n_labels": N_LABELS, "n_instances": N_INSTANCES,
            "epochs": EPOCHS, "seed": 0,
        })
        .to_string(),
    )
    .unwrap();
    let py = std::process::Command::new(common::oml_python())
        .arg("-c")
        .arg(OML_SCRIPT)
        .arg(&cfg)
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        py.status.success(),
        "OML sampler script: {}",
        String::from_utf8_lossy(&py.stderr)
    );
    let oml: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let oml_len = oml["len"].as_u64().unwrap() as usize;
    let oml_epochs: Epochs = serde_json::from_value(oml["epochs"].clone()).unwrap();

    // simile's side, built and seeded as the trainer does.
    let config = SamplerConfig::Balance {
        n_labels: N_LABELS,
        n_instances: N_INSTANCES,
    };
    let mut sampler = config.build(&labels, None).unwrap();
    let sim_epochs: Epochs = (0..EPOCHS as u64)
        .map(|e| sampler.epoch(&mut rng::seeded(0, e)))
        .collect();

    // (a) batches per epoch and batch size: exactly L // P on both sides.
    assert_eq!(oml_len, L / N_LABELS, "OML's len");
    assert_eq!(sampler.len(), oml_len, "batches per epoch");
    assert_eq!(
        sampler.batch_size() as u64,
        oml["batch_size"].as_u64().unwrap()
    );
    for (side, epochs) in [("OML", &oml_epochs), ("simile", &sim_epochs)] {
        assert_eq!(epochs.len(), EPOCHS, "{side}: epochs");
        for (e, b) in epochs.iter().enumerate() {
            assert_eq!(b.len(), oml_len, "{side} epoch {e}: batches");
        }
    }

    // (c), (d), (e) batch shapes and the draw rule, on each side.
    let o = check_and_summarise("OML", &oml_epochs, &labels);
    let s = check_and_summarise("simile", &sim_epochs, &labels);

    // (b) per-epoch coverage: L - L mod P labels, every epoch, both sides.
    let full = oml_len * N_LABELS;
    assert!(
        o.coverage.iter().all(|&c| c == full),
        "OML coverage {:?}",
        o.coverage
    );
    assert!(
        s.coverage.iter().all(|&c| c == full),
        "simile coverage {:?}",
        s.coverage
    );

    // How often each label is used: each epoch leaves out L mod P labels uniformly, so a
    // label is left out Binomial(EPOCHS, (L mod P) / L) times on each side. Compare the
    // left-out counts of the two sides (two-sample chi-square) and each side against that.
    let left_out =
        |st: &Stats| -> Vec<usize> { st.label_chosen.values().map(|&n| EPOCHS - n).collect() };
    let (lo_o, lo_s) = (left_out(&o), left_out(&s));
    let (chi_labels, df_labels) = chi2_two_sample(&lo_o, &lo_s);
    let p_out = (L % N_LABELS) as f64 / L as f64;
    let exp_out = vec![EPOCHS as f64 * p_out; L];
    let (fit_lo_o, fit_lo_s) = (chi2_fit(&lo_o, &exp_out), chi2_fit(&lo_s, &exp_out));
    let max_label_dev = o
        .label_chosen
        .values()
        .zip(s.label_chosen.values())
        .map(|(&a, &b)| (a as f64 - b as f64).abs() / EPOCHS as f64)
        .fold(0.0, f64::max);

    // How often each row is drawn: a label with c rows gives each row K / c draws per epoch
    // it is used, in expectation, with or without replacement (c < K: once + (K - c) / c).
    let mut rows_of: BTreeMap<i64, usize> = BTreeMap::new();
    for &l in &labels {
        *rows_of.entry(l).or_default() += 1;
    }
    let p_used = full as f64 / L as f64;
    let exp_row: Vec<f64> = labels
        .iter()
        .map(|l| EPOCHS as f64 * p_used * N_INSTANCES as f64 / rows_of[l] as f64)
        .collect();
    let (chi_rows, df_rows) = chi2_two_sample(&o.row_drawn, &s.row_drawn);
    let (fit_rows_o, fit_rows_s) = (
        chi2_fit(&o.row_drawn, &exp_row),
        chi2_fit(&s.row_drawn, &exp_row),
    );

    // Labels with 2 rows and K = 4: both rows once, then 2 draws with replacement, so the
    // share is 2+2 with probability 1/2 (3+1 otherwise).
    let frac = |st: &Stats| st.two_row_even as f64 / st.two_row_shares as f64;
    let (f_o, f_s) = (frac(&o), frac(&s));
    let se = (0.25 / o.two_row_shares.min(s.two_row_shares) as f64).sqrt();

    eprintln!(
        "sampler_parity: {n_rows} rows, {L} labels, P={N_LABELS} K={N_INSTANCES}, {EPOCHS} epochs\n\
         batches/epoch OML {oml_len} simile {}; labels covered/epoch {full} on both sides every epoch\n\
         label left-out counts: two-sample chi2 {chi_labels:.1} (df {df_labels}, bound {:.1}); \
         fit to Binomial mean: OML {fit_lo_o:.1} simile {fit_lo_s:.1} (df {L}, bound {:.1}); \
         max |freq OML - freq simile| per label {max_label_dev:.4}\n\
         row draw counts: two-sample chi2 {chi_rows:.1} (df {df_rows}, bound {:.1}); \
         fit to K/c: OML {fit_rows_o:.1} simile {fit_rows_s:.1} (df {n_rows}, bound {:.1})\n\
         2-row labels split 2+2: OML {f_o:.4} ({} shares) simile {f_s:.4} ({} shares), theory 0.5\n\
         elapsed {:.2?}",
        sampler.len(),
        chi2_bound(df_labels),
        chi2_bound(L),
        chi2_bound(df_rows),
        chi2_bound(n_rows),
        o.two_row_shares,
        s.two_row_shares,
        t0.elapsed()
    );

    assert!(
        chi_labels < chi2_bound(df_labels),
        "label usage differs: chi2 {chi_labels:.1}"
    );
    assert!(
        fit_lo_o < chi2_bound(L),
        "OML label usage vs uniform: {fit_lo_o:.1}"
    );
    assert!(
        fit_lo_s < chi2_bound(L),
        "simile label usage vs uniform: {fit_lo_s:.1}"
    );
    assert!(
        chi_rows < chi2_bound(df_rows),
        "row draws differ: chi2 {chi_rows:.1}"
    );
    assert!(
        fit_rows_o < chi2_bound(n_rows),
        "OML row draws vs K/c: {fit_rows_o:.1}"
    );
    assert!(
        fit_rows_s < chi2_bound(n_rows),
        "simile row draws vs K/c: {fit_rows_s:.1}"
    );
    for (side, f) in [("OML", f_o), ("simile", f_s)] {
        assert!(
            (f - 0.5).abs() < 5.0 * se,
            "{side}: 2-row labels split 2+2 {f:.4}"
        );
    }
    assert!(
        (f_o - f_s).abs() < 5.0 * se * 2f64.sqrt(),
        "2+2 splits: {f_o:.4} vs {f_s:.4}"
    );

    // The corner cases OML refuses, simile refuses too.
    let refusals = &oml["refusals"];
    let n_unique = rows_of.len();
    let mut with_singleton = labels.clone();
    with_singleton.push(-1);
    let cases: [(&str, Vec<i64>, usize, usize); 4] = [
        ("singleton_label", with_singleton, N_LABELS, N_INSTANCES),
        ("n_instances_1", labels.clone(), N_LABELS, 1),
        ("n_labels_1", labels.clone(), 1, N_INSTANCES),
        (
            "n_labels_above_L",
            labels.clone(),
            n_unique + 1,
            N_INSTANCES,
        ),
    ];
    for (name, lab, p, k) in cases {
        assert_eq!(
            refusals[name],
            serde_json::Value::Bool(true),
            "OML accepts {name}"
        );
        let cfg = SamplerConfig::Balance {
            n_labels: p,
            n_instances: k,
        };
        assert!(cfg.build(&lab, None).is_err(), "simile accepts {name}");
    }
}
