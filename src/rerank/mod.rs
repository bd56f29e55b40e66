//! Re-ranking and post-processing of neighbour lists: what `simile-rerank` runs.
//!
//! - [`qe`]: query expansion (average, alpha-weighted) and database-side augmentation: new
//!   vectors from the top neighbours, then an exact re-search through [`crate::knn`].
//! - [`kreciprocal`]: k-reciprocal re-ranking (Zhong et al., CVPR 2017) over candidate lists.
//! - [`threshold`]: OML's constant and adaptive thresholding.
//! - [`pairwise`]: OML's learned pairwise re-ranker (a model of kind `pairwise`).
//! - [`stage`]: the stage around them: inputs and their checks, output and manifest.
pub mod kreciprocal;
pub mod pairwise;
pub mod qe;
pub mod stage;
pub mod threshold;
