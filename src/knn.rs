//! Exact k-nearest-neighbour search: what `simile-distance` runs.
//!
//! The data flow, in the order of the submodules:
//! - [`rows`]: a side's embeddings as a memory-mapped `.npy` plus the map from side positions
//!   (queries or gallery rows, in id order) to `.npy` rows; the finiteness and norm pre-pass.
//! - [`kernel`]: packing and the fused CPU micro-kernels (fp32 FMA, bf16 dot products) that
//!   score a tile of queries against gallery rows and filter the scores against each query's
//!   admission threshold in registers, so most scores never reach memory.
//! - [`topk`]: each query's candidate buffer (threshold-filtered insertion, compacted by
//!   selection), which keeps the k best estimates plus every estimate within the error bound.
//! - [`tensor`]: the same search through libtorch (matmul + topk on any device: CUDA, or the
//!   CPU for tests and `--backend torch`).
//! - [`search`]: the blocked driver (query chunks x streamed gallery blocks, in parallel),
//!   then exact re-scoring of the candidates in f64 and the final ordering by
//!   (distance, gallery id).
//! - [`stage`]: the stage around it: datasets, ids, exclusions, shards, output and manifest.
//! - [`merge`]: joining shard parts into the global result.
//!
//! Exactness: the fast paths rank by the expansion `||g||^2 - 2 q.g` (or `-q.g`), whose
//! floating-point error is bounded per query (see [`search::error_bound`]); every gallery row
//! whose estimate is within twice that bound of the k-th best is kept and re-scored directly,
//! so cancellation can neither drop a true neighbour nor misreport a distance.
pub mod exact;
pub mod job;
pub mod kernel;
pub mod merge;
pub mod rows;
pub mod search;
pub mod stage;
pub mod tensor;
pub mod topk;

/// The distance reported for a (query, gallery) pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Metric {
    /// Euclidean distance (not squared): OML's.
    #[default]
    L2,
    /// `1 - cos(q, g)`, normalising on the fly; a zero vector has cosine 0 with everything.
    Cosine,
    /// Negative inner product.
    Dot,
}

crate::named!(Metric { L2 => "l2", Cosine => "cosine", Dot => "dot" });

/// Precision of the candidate search (re-scoring is always exact).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Compute {
    /// f32 products with a proven error bound: exact results.
    #[default]
    Fp32,
    /// bf16 products, a fixed margin of extra candidates re-scored exactly: approximate at
    /// the margin (recall is measured, not guaranteed).
    Bf16,
}

crate::named!(Compute { Fp32 => "fp32", Bf16 => "bf16" });

/// Which implementation computes the candidates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Backend {
    /// `torch` on a CUDA device, `native` on the CPU.
    #[default]
    Auto,
    /// simile's own CPU kernels (AVX-512 where the CPU has it).
    Native,
    /// libtorch's matmul + topk, on the chosen device.
    Torch,
}

crate::named!(Backend { Auto => "auto", Native => "native", Torch => "torch" });

/// The engine a search runs on, resolved from `--backend` and `--device`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Native,
    Torch(tch::Device),
}

impl Engine {
    pub fn resolve(backend: Backend, device: tch::Device) -> crate::Result<Engine> {
        match (backend, device) {
            (Backend::Native, tch::Device::Cpu) | (Backend::Auto, tch::Device::Cpu) => {
                Ok(Engine::Native)
            }
            (Backend::Native, d) => Err(crate::Error::input(format!(
                "--backend native runs on the CPU only, but --device is {}; use --backend torch (or auto)",
                crate::device::describe(d)
            ))),
            (_, d) => Ok(Engine::Torch(d)),
        }
    }

    pub fn describe(self) -> String {
        match self {
            Engine::Native => format!(
                "cpu ({} threads, {})",
                rayon::current_num_threads(),
                kernel::Isa::detect().describe()
            ),
            Engine::Torch(d) => format!("{} via libtorch", crate::device::describe(d)),
        }
    }
}
