//! `--device auto|cpu|cuda[:i]`: parsing and checking. Asking for CUDA on a machine without
//! it is an error (exit 2), never a silent fallback to the CPU.
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceArg {
    Auto,
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceArg {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(DeviceArg::Auto),
            "cpu" => Ok(DeviceArg::Cpu),
            "cuda" => Ok(DeviceArg::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|i| i.parse().ok())
                .map(DeviceArg::Cuda)
                .ok_or_else(|| format!("'{s}': expected auto, cpu, cuda or cuda:<index>")),
        }
    }
}

impl std::fmt::Display for DeviceArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceArg::Auto => write!(f, "auto"),
            DeviceArg::Cpu => write!(f, "cpu"),
            DeviceArg::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// Resolves the argument to a libtorch device, checking that it exists.
pub fn resolve(arg: DeviceArg) -> Result<tch::Device> {
    let n = tch::Cuda::device_count() as usize;
    match arg {
        DeviceArg::Cpu => Ok(tch::Device::Cpu),
        DeviceArg::Auto => Ok(if n > 0 {
            tch::Device::Cuda(0)
        } else {
            tch::Device::Cpu
        }),
        DeviceArg::Cuda(i) if i < n => Ok(tch::Device::Cuda(i)),
        DeviceArg::Cuda(i) => Err(Error::Device(if n == 0 {
            format!("--device cuda:{i}: this machine has no CUDA device (libtorch sees none); use --device cpu or auto")
        } else {
            format!(
                "--device cuda:{i}: this machine has {n} CUDA device(s), numbered 0..{}",
                n - 1
            )
        })),
    }
}

/// How a device is shown to users.
pub fn describe(d: tch::Device) -> String {
    match d {
        tch::Device::Cpu => format!("cpu ({} threads)", rayon::current_num_threads()),
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
        assert_eq!("cuda".parse::<DeviceArg>().unwrap(), DeviceArg::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceArg>().unwrap(), DeviceArg::Cuda(3));
        assert!("gpu".parse::<DeviceArg>().is_err());
        assert_eq!(resolve(DeviceArg::Cpu).unwrap(), tch::Device::Cpu);
        if tch::Cuda::device_count() == 0 {
            let e = resolve(DeviceArg::Cuda(0)).unwrap_err();
            assert_eq!(e.exit_code(), 2);
            assert_eq!(resolve(DeviceArg::Auto).unwrap(), tch::Device::Cpu);
        }
    }
}
