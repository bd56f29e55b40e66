//! Retrieval metrics, written once: `simile-score` and training-time validation both call
//! them. Formulas, edge rules and deviations from OML and pytorch-metric-learning are in
//! `docs/metrics.md`; the output keys in `schemas/metrics.md`.
//!
//! The data flows: ground truth from the dataset ([`crate::retrieval::QueryGallery`], the
//! one exclusion rule) and ranked lists give per-query [`Relevance`] (hit flags and the
//! number of positives); [`ranking`] turns each into one number per metric;
//! [`aggregate`] takes means overall and per category and names the keys as OML does.
//! [`fnmr`] and [`pcf`] are the pair- and embedding-level metrics, [`embeddings`] feeds
//! them from `.npy` files; [`lists`] scans a neighbours file (decode, check, score in one
//! parallel pass); [`stage`] is the score stage that `simile-score` runs.
pub mod aggregate;
pub mod compare;
pub mod confidence;
pub mod embeddings;
pub mod fnmr;
pub mod lists;
pub mod pcf;
pub mod ranking;
pub mod stage;

pub use aggregate::{
    aggregate, evaluate, python_float, scores, AggregateOptions, Extras, GroupStats, PerQuery,
    Relevance, Scores, OVERALL,
};
pub use ranking::{
    cmc_at_k, map_at_k, map_at_r, ndcg_at_k, precision_at_k, r_precision, recall_at_k,
    reciprocal_rank, Metric, MetricSet, DEFAULT_CMC, DEFAULT_MAP, DEFAULT_PRECISION,
};

/// The default metric set (`--cmc 1,5 --precision 5 --map 5`), for training-time validation.
pub fn default_metric_set() -> MetricSet {
    MetricSet::default_set()
}

/// The hit flags of a ranked list of gallery positions for query position `q`: what
/// training-time validation passes to [`evaluate`] with `qg.positive_counts()[q]`.
pub fn hits_of(qg: &crate::retrieval::QueryGallery, q: usize, gallery: &[usize]) -> Vec<bool> {
    gallery.iter().map(|&g| qg.is_positive(q, g)).collect()
}

#[cfg(test)]
mod tests;
