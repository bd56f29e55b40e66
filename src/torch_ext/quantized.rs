//! PyTorch's dynamic int8 linear layer (`torch.ao.nn.quantized.dynamic.Linear`, what
//! `torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)` puts in
//! place of each `nn.Linear`), on the CPU: the weight quantized once to int8 (one scale for the
//! whole tensor, symmetric), each input quantized per call from its own range, the product
//! accumulated in int32 by fbgemm, the result in float32.
use std::ptr;

use tch::{nn, Device, Kind, Tensor};

use super::ffi::{self, check, SimileQLinear};
use crate::{Error, Result};

/// One linear layer's packed int8 weights (`quantized::linear_prepack`).
pub struct QLinear {
    ptr: *mut SimileQLinear,
}

// SAFETY: the packed weights are written once, by prepack, and only read after: fbgemm's
// packed matrices are shared by PyTorch's own threads the same way.
unsafe impl Send for QLinear {}
unsafe impl Sync for QLinear {}

impl std::fmt::Debug for QLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("QLinear")
    }
}

/// The weight's scale as PyTorch's default weight observer computes it (`MinMaxObserver`,
/// qint8, per-tensor symmetric): the largest magnitude over half of int8's 255 steps, at least
/// float32's epsilon, in float32 arithmetic.
fn weight_scale(w: &Tensor) -> Result<f64> {
    let amax = w.f_abs()?.f_max()?;
    Ok((amax / 127.5)
        .f_clamp_min(f64::from(f32::EPSILON))?
        .f_double_value(&[])?)
}

impl QLinear {
    /// The int8 copy of a float32 CPU linear layer (its weights are not changed).
    pub fn new(lin: &nn::Linear) -> Result<QLinear> {
        let w = lin.ws.detach();
        if w.device() != Device::Cpu || w.kind() != Kind::Float {
            return Err(Error::internal(format!(
                "int8 linear layers are made from float32 CPU weights, not {:?} on {:?}",
                w.kind(),
                w.device()
            )));
        }
        let q = w.f_quantize_per_tensor(weight_scale(&w)?, 0, Kind::QInt8)?;
        let bias = lin.bs.as_ref().map(|b| b.detach());
        let mut out = ptr::null_mut();
        // SAFETY: live tensors for the call (the shim copies what it keeps); valid out pointer;
        // the shim catches every exception.
        check(unsafe {
            ffi::simile_qlinear_new(
                q.as_ptr(),
                bias.as_ref().map_or(ptr::null(), |b| b.as_ptr()),
                &mut out,
            )
        })?;
        Ok(QLinear { ptr: out })
    }

    /// `quantized::linear_dynamic(x, packed, reduce_range=True)`, as the PyTorch module's
    /// forward calls it (reduce_range: activations on 7 bits, which fbgemm's int8 kernels need
    /// on CPUs without VNNI to not overflow). `x`: float32 `[.., in]` on the CPU.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut out = ptr::null_mut();
        // SAFETY: self.ptr is live; x lives for the call; the shim catches every exception.
        check(unsafe { ffi::simile_qlinear_forward(self.ptr, x.as_ptr(), true, &mut out) })?;
        // SAFETY: on success the shim returns a new heap tensor that we now own.
        Ok(unsafe { Tensor::from_ptr(out) })
    }
}

impl Drop for QLinear {
    fn drop(&mut self) {
        // SAFETY: made by simile_qlinear_new, freed once.
        unsafe { ffi::simile_qlinear_free(self.ptr) }
    }
}
