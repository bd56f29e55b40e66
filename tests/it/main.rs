//! The integration tests: one crate (one link, one binary), each module running the real
//! binaries on small generated data in temporary folders. `common` is the shared harness.
mod common;

mod architecture;
mod compare;
mod distance;
mod distributed;
mod embed;
mod image_parity;
mod integrity;
mod pairwise;
mod prepare;
mod reliability;
mod report;
mod rerank;
mod sampler_parity;
mod score;
mod shards;
mod skip;
mod text;
mod train;
mod train_parity;
mod train_run_parity;
