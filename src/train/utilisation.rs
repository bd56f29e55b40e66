//! How close a run comes to what the machine can do: the network's FLOPs per image, counted
//! by libtorch's profiler over one forward pass (its `with_flops` counters; forward and
//! backward together are taken as 3 forwards, the usual convention: the backward pass computes
//! two products per forward one), and the device's peak for the compute mode, measured by a
//! short matrix-multiply probe once per machine and cached.
use std::collections::BTreeMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::model::{Compute, Net};
use crate::torch_ext;

/// Forward + backward FLOPs per image, from forward FLOPs.
pub const TRAIN_FLOPS_PER_FORWARD: f64 = 3.0;

/// Forward FLOPs of one `size` x `size` image through `net` (eval mode, so BatchNorm's
/// running statistics stay as they are).
pub fn forward_flops(net: &Net, size: usize, compute: Compute, dev: Device) -> Result<f64> {
    let s = size as i64;
    let x = Tensor::f_zeros([1, 3, s, s], (Kind::Float, dev))?;
    let (_, flops) = torch_ext::count_flops(|| {
        tch::no_grad(|| net.forward_in(&x, false, compute, dev)).map(|_| ())
    })?;
    Ok(flops)
}

/// The device's measured matrix-multiply throughput for a compute mode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Peak {
    pub gflop_s: f64,
    /// What was measured: `n` x `n` products in `dtype` (the compute mode's, or `Float` where
    /// fp32 is faster), with `threads` CPU threads.
    pub n: i64,
    pub dtype: String,
    pub threads: usize,
    pub device: String,
    /// Unix seconds of the measurement.
    pub measured_at: u64,
}

const PEAK_FILE: &str = "peak.json";

/// The peak for `compute` on `dev` with this process's threads: the faster of a GEMM in the
/// mode's precision and one in fp32 (on a CPU without bf16 kernels bf16's GEMM is far slower
/// than fp32's, and the machine's best is the fair yardstick: a bf16 run there is slow, not
/// efficient). Each from the cache (`<cache>/peak.json`, one entry per processor, device,
/// threads, precision and libtorch), else measured now (about half a second) and stored.
pub fn peak(dev: Device, compute: Compute) -> Result<Peak> {
    let own = probe_cached(dev, compute)?;
    if compute == Compute::Fp32 {
        return Ok(own);
    }
    let fp32 = probe_cached(dev, Compute::Fp32)?;
    Ok(if fp32.gflop_s > own.gflop_s {
        fp32
    } else {
        own
    })
}

fn probe_cached(dev: Device, compute: Compute) -> Result<Peak> {
    let key = format!(
        "{}|{}|{}|{}|{}",
        processor(),
        crate::device::describe(dev),
        tch::get_num_threads(),
        compute,
        option_env!("SIMILE_LIBTORCH_LIB").unwrap_or("")
    );
    let path = crate::io::cache_root().join(PEAK_FILE);
    // An unreadable or foreign cache is measured again and rewritten.
    let mut cache: BTreeMap<String, Peak> = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    if let Some(p) = cache.get(&key) {
        return Ok(p.clone());
    }
    let p = probe(dev, compute)?;
    cache.insert(key, p.clone());
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let bytes = serde_json::to_vec_pretty(&cache)
        .map_err(|e| Error::internal(format!("peak cache: {e}")))?;
    crate::io::atomic_write_bytes(&path, &bytes)?;
    Ok(p)
}

/// Times `n` x `n` products in the compute mode's dtype (what autocast runs convolutions and
/// linear layers in): 3 rounds of about 0.1 s after a warm-up, the fastest round kept (a
/// moment of load elsewhere slows a round, never speeds one); 2 n^3 FLOPs per product.
fn probe(dev: Device, compute: Compute) -> Result<Peak> {
    let n: i64 = if dev == Device::Cpu { 1024 } else { 8192 };
    let kind = compute.kind();
    let a = Tensor::f_randn([n, n], (Kind::Float, dev))?.f_to_kind(kind)?;
    let b = Tensor::f_randn([n, n], (Kind::Float, dev))?.f_to_kind(kind)?;
    let sync = || {
        if let Device::Cuda(i) = dev {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let once = || -> Result<f64> {
        let t = Instant::now();
        let _ = a.f_mm(&b)?;
        sync();
        Ok(t.elapsed().as_secs_f64())
    };
    tch::no_grad(|| -> Result<Peak> {
        // Warm-up: a slow first product (a dtype without fast kernels) ends the probe there.
        let first = once()?;
        let per_product = 2.0 * (n as f64).powi(3);
        let mut best = per_product / first.max(1e-9);
        if first < 0.1 {
            for _ in 0..3 {
                let (mut reps, mut secs) = (0u32, 0f64);
                while secs < 0.1 && reps < 1000 {
                    secs += once()?;
                    reps += 1;
                }
                best = best.max(per_product * f64::from(reps) / secs.max(1e-9));
            }
        }
        Ok(Peak {
            gflop_s: best / 1e9,
            n,
            dtype: format!("{kind:?}"),
            threads: tch::get_num_threads().max(1) as usize,
            device: crate::device::describe(dev),
            measured_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        })
    })
}

/// The processor's model name (`/proc/cpuinfo`), part of the cache key.
fn processor() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// A run's utilisation: achieved GFLOP/s and its share of the peak.
#[derive(Debug, Clone, PartialEq)]
pub struct Utilisation {
    /// Forward + backward FLOPs per image.
    pub flops_per_image: f64,
    pub gflop_s: f64,
    /// The peak of the whole job (one rank's probe times the ranks).
    pub peak_gflop_s: Option<f64>,
}

impl Utilisation {
    pub fn of(flops_per_image: f64, images_per_s: f64, peak_gflop_s: Option<f64>) -> Self {
        Utilisation {
            flops_per_image,
            gflop_s: images_per_s * flops_per_image / 1e9,
            peak_gflop_s,
        }
    }

    /// Achieved / peak.
    pub fn share(&self) -> Option<f64> {
        self.peak_gflop_s
            .filter(|p| *p > 0.0)
            .map(|p| self.gflop_s / p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ArchSpec;

    #[test]
    fn the_profiler_counts_a_small_cnns_convolutions() {
        // smallcnn width 8 at 16 px: 3x3 'same' convolutions 3->8 at 16x16, 8->16 at 8x8,
        // 16->32 at 4x4, 32->64 at 2x2, then avg pool, no projection. 2 FLOPs per
        // multiply-add.
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let spec: ArchSpec = serde_json::from_value(serde_json::json!({
            "name": "smallcnn", "width": 8, "pool": "avg"
        }))
        .unwrap();
        let net = Net::new(&vs.root(), &spec, false).unwrap();
        let f = forward_flops(&net, 16, Compute::Fp32, Device::Cpu).unwrap();
        let conv = |cin: f64, cout: f64, hw: f64| 2.0 * cin * cout * 9.0 * hw * hw;
        let want = conv(3.0, 8.0, 16.0)
            + conv(8.0, 16.0, 8.0)
            + conv(16.0, 32.0, 4.0)
            + conv(32.0, 64.0, 2.0);
        assert!(f >= want, "counted {f}, the convolutions alone are {want}");
        // Beyond the convolutions only element-wise ops (bias adds) are counted.
        assert!(f < want * 1.05, "counted {f}, want about {want}");
    }

    #[test]
    fn utilisation_is_the_share_of_the_peak() {
        let u = Utilisation::of(2e9, 50.0, Some(200.0));
        assert_eq!(u.gflop_s, 100.0);
        assert_eq!(u.share(), Some(0.5));
        assert_eq!(Utilisation::of(1.0, 1.0, None).share(), None);
    }
}
