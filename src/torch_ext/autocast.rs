//! Autocast on any device, CPU included (tch's `autocast` is CUDA and fp16 only, issue 25).
use std::marker::PhantomData;

use tch::{Device, Kind};

use super::ffi::{self, check, AutocastPrev};
use crate::{Error, Result};

/// `with torch.autocast(device_type, dtype):` as a guard. While it lives, on this thread, the
/// ops autocast lists (matmul, linear, conv, ...) run in `kind` on `device`'s type; dropping it
/// restores the previous state. Guards nest; when the outermost one drops, autocast's cache of
/// low-precision weight copies is cleared, so the next step sees the optimizer's updates.
///
/// Autocast state is per thread, so the guard cannot move to another thread.
pub struct AutocastGuard {
    device_type: i8,
    prev: AutocastPrev,
    _not_send: PhantomData<*const ()>,
}

impl AutocastGuard {
    /// `kind` is `BFloat16` or `Half` (`Float` turns the casts into no-ops).
    pub fn new(device: Device, kind: Kind) -> Result<AutocastGuard> {
        // c10::DeviceType and c10::ScalarType values.
        let device_type = match device {
            Device::Cpu => 0,
            Device::Cuda(_) => 1,
            other => {
                return Err(Error::Device(format!(
                    "autocast is not supported on {other:?}"
                )))
            }
        };
        let dtype = match kind {
            Kind::Half => 5,
            Kind::Float => 6,
            Kind::BFloat16 => 15,
            other => {
                return Err(Error::internal(format!(
                    "autocast to {other:?}: only BFloat16, Half or Float"
                )))
            }
        };
        let mut prev = AutocastPrev::default();
        // SAFETY: valid out pointer; the shim catches every exception.
        check(unsafe { ffi::simile_autocast_enter(device_type, dtype, &mut prev) })?;
        Ok(AutocastGuard {
            device_type,
            prev,
            _not_send: PhantomData,
        })
    }
}

impl Drop for AutocastGuard {
    fn drop(&mut self) {
        // SAFETY: restores what enter recorded, on the same thread (the guard is !Send).
        let res = check(unsafe { ffi::simile_autocast_exit(self.device_type, &self.prev) });
        // Exiting only sets thread-local flags, which does not fail for a device type that
        // entering accepted; a Drop cannot return an error anyway.
        debug_assert!(res.is_ok(), "autocast exit failed: {res:?}");
    }
}
