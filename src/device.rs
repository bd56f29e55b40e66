//! `--device auto|cpu|cuda[:i]`: parsing and checking. Asking for CUDA on a machine without
//! it is an error (exit 2), never a silent fallback to the CPU.
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceArg {
    Auto,
    Cpu,
    /// `cuda:<i>`; `None` for plain `cuda`: the process's own GPU (cuda:0, or a data-parallel
    /// rank's `cuda:LOCAL_RANK`, as torchrun's scripts pick it).
    Cuda(Option<usize>),
}

impl std::str::FromStr for DeviceArg {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(DeviceArg::Auto),
            "cpu" => Ok(DeviceArg::Cpu),
            "cuda" => Ok(DeviceArg::Cuda(None)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|i| i.parse().ok())
                .map(|i| DeviceArg::Cuda(Some(i)))
                .ok_or_else(|| format!("'{s}': expected auto, cpu, cuda or cuda:<index>")),
        }
    }
}

impl std::fmt::Display for DeviceArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceArg::Auto => write!(f, "auto"),
            DeviceArg::Cpu => write!(f, "cpu"),
            DeviceArg::Cuda(None) => write!(f, "cuda"),
            DeviceArg::Cuda(Some(i)) => write!(f, "cuda:{i}"),
        }
    }
}

/// Resolves the argument to a libtorch device, checking that it exists.
pub fn resolve(arg: DeviceArg) -> Result<tch::Device> {
    resolve_for_rank(arg, None)
}

/// As [`resolve`] for a data-parallel rank (`local_rank`: torchrun's `LOCAL_RANK`): `auto` and
/// plain `cuda` take GPU `local_rank` of this machine (one GPU per rank), so the same command
/// line serves every rank.
pub fn resolve_for_rank(arg: DeviceArg, local_rank: Option<usize>) -> Result<tch::Device> {
    let n = tch::Cuda::device_count() as usize;
    let own = local_rank.unwrap_or(0);
    let no_gpu_for_rank = |i: usize| {
        Error::Device(format!(
            "LOCAL_RANK={i}: this machine has {n} CUDA device(s), one per rank: start at most {n} ranks here, or give every rank --device cpu"
        ))
    };
    match arg {
        DeviceArg::Cpu => Ok(tch::Device::Cpu),
        DeviceArg::Auto if n == 0 => Ok(tch::Device::Cpu),
        DeviceArg::Auto | DeviceArg::Cuda(None) if own < n => Ok(tch::Device::Cuda(own)),
        DeviceArg::Auto => Err(no_gpu_for_rank(own)),
        DeviceArg::Cuda(None) if n > 0 => Err(no_gpu_for_rank(own)),
        DeviceArg::Cuda(Some(i)) if i < n => Ok(tch::Device::Cuda(i)),
        DeviceArg::Cuda(i) => {
            let shown = i.map_or("cuda".to_string(), |i| format!("cuda:{i}"));
            Err(Error::Device(if n == 0 {
                format!("--device {shown}: this machine has no CUDA device (libtorch sees none); use --device cpu or auto")
            } else {
                format!(
                    "--device {shown}: this machine has {n} CUDA device(s), numbered 0..{}",
                    n - 1
                )
            }))
        }
    }
}

/// The number of cores this process may use (affinity and cgroup quotas included).
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

/// `--threads N`: sizes libtorch's intra-op (OpenMP) and inter-op pools and rayon's global
/// pool together (`None` or 0: [`cores`]). Without it each pool takes every core for itself,
/// and decoding (rayon) beside a forward pass (OpenMP) oversubscribes the machine: OpenMP
/// threads spin at barriers while their peers wait for a core.
///
/// Call it first thing in a main: libtorch fixes its inter-op pool and rayon its global pool
/// on first use. The first call decides for the whole process; later calls return that
/// number (changing pools mid-run is not possible).
pub fn set_threads(n: Option<usize>) -> usize {
    *THREADS.get_or_init(|| {
        let n = n.filter(|&n| n > 0).unwrap_or_else(cores);
        tch::set_num_threads(n as i32);
        // Only TorchScript's fork/wait uses the inter-op pool; fixing it here also stops it
        // from starting one thread per core beside the OpenMP ones.
        tch::set_num_interop_threads(n as i32);
        // An error means the global pool already exists (something used rayon first).
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .thread_name(|i| format!("simile-rayon-{i}"))
            .build_global();
        n
    })
}

/// libtorch's OpenMP runtime (libgomp) reads `OMP_WAIT_POLICY` once, when it is loaded,
/// before `main` runs. By default its idle threads spin at every barrier; when other threads
/// want the same cores (simile's own decoding, or other programs), the spinning threads hold
/// the cores while the thread they wait for is descheduled. Measured on 2 busy cores:
/// EfficientNet-B0 9.3 images/s by default, 23.4 with `PASSIVE` (19.6 with one thread).
/// Unless the variable is already set, this runs the program again (exec, same arguments)
/// with it set to `PASSIVE`; if that fails, it carries on as it is. Call it first in `main`.
pub fn reexec_with_passive_openmp() {
    if std::env::var_os("OMP_WAIT_POLICY").is_some() {
        return;
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        let Ok(exe) = std::env::current_exe() else {
            return;
        };
        let mut args = std::env::args_os();
        let arg0 = args.next().unwrap_or_else(|| exe.clone().into_os_string());
        // exec returns only when it failed.
        let _ = std::process::Command::new(&exe)
            .arg0(arg0)
            .args(args)
            .env("OMP_WAIT_POLICY", "PASSIVE")
            .exec();
    }
}

/// Keeps memory that libtorch frees inside the process for the next batch (glibc malloc: no
/// `mmap` for large blocks, no trimming of the heap). Every batch allocates the same large
/// activations (the small CNN's first block, 64 x 32 x 64 x 64 floats, is 33 MB); by default
/// glibc maps each such block fresh and unmaps it on free, so the kernel zero-fills every page
/// again for every batch: measured, system time 80% of user time. Peak memory is unchanged
/// (freed blocks are reused, not added). Call it in a main that runs models, early.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocation policy; it is called before other
    // threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// The thread count set by [`set_threads`], if it was called.
pub fn threads() -> Option<usize> {
    THREADS.get().copied()
}

/// How a device is shown to users.
pub fn describe(d: tch::Device) -> String {
    match d {
        tch::Device::Cpu => format!("cpu ({} threads)", tch::get_num_threads()),
        tch::Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse() {
        assert_eq!("auto".parse::<DeviceArg>().unwrap(), DeviceArg::Auto);
        assert_eq!("cuda".parse::<DeviceArg>().unwrap(), DeviceArg::Cuda(None));
        assert_eq!(
            "cuda:3".parse::<DeviceArg>().unwrap(),
            DeviceArg::Cuda(Some(3))
        );
        assert_eq!(DeviceArg::Cuda(None).to_string(), "cuda");
        assert_eq!(DeviceArg::Cuda(Some(3)).to_string(), "cuda:3");
        assert!("gpu".parse::<DeviceArg>().is_err());
        assert_eq!(resolve(DeviceArg::Cpu).unwrap(), tch::Device::Cpu);
        if tch::Cuda::device_count() == 0 {
            for arg in [DeviceArg::Cuda(Some(0)), DeviceArg::Cuda(None)] {
                let e = resolve(arg).unwrap_err();
                assert_eq!(e.exit_code(), 2);
                let e = resolve_for_rank(arg, Some(1)).unwrap_err();
                assert_eq!(e.exit_code(), 2);
            }
            assert_eq!(resolve(DeviceArg::Auto).unwrap(), tch::Device::Cpu);
            // A CPU-only machine's ranks train on the CPU with `auto`.
            assert_eq!(
                resolve_for_rank(DeviceArg::Auto, Some(3)).unwrap(),
                tch::Device::Cpu
            );
        }
    }

    #[test]
    fn threads_size_both_pools_once() {
        // The lib tests share one process: the first call decides, later ones report it.
        let n = set_threads(None);
        assert_eq!(n, cores());
        assert_eq!(threads(), Some(n));
        assert_eq!(set_threads(Some(n + 1)), n);
        assert_eq!(tch::get_num_threads() as usize, n);
        assert!(cores() >= 1);
    }
}
