//! ATen ops tch does not bind (in-place ops over tensor lists) and two of libtorch's facilities:
//! PyTorch's fused optimiser steps, GradScaler's unscale, oneDNN's bf16 check and the
//! profiler's FLOP counter.
use tch::Tensor;

use super::ffi::{self, check, pointers};
use crate::{Error, Result};

/// Adam's hyper-parameters for one group of parameters.
#[derive(Debug, Clone, Copy)]
pub struct AdamStep {
    pub lr: f64,
    pub betas: [f64; 2],
    pub weight_decay: f64,
    pub eps: f64,
    /// AdamW: decay the weights directly rather than adding to the gradient.
    pub decoupled: bool,
}

fn same_len(what: &str, n: usize, lens: &[usize]) -> Result<()> {
    if lens.iter().any(|&l| l != n) {
        return Err(Error::internal(format!(
            "{what}: lists of different lengths {n} and {lens:?}"
        )));
    }
    Ok(())
}

/// `torch.optim.Adam(fused=True)` / `AdamW(fused=True)`'s step over parameters of one device:
/// increments each `steps` tensor (float32 scalars), then updates the parameters and their
/// moments in one pass each.
pub fn fused_adam(
    params: &[Tensor],
    grads: &[Tensor],
    exp_avgs: &[Tensor],
    exp_avg_sqs: &[Tensor],
    steps: &[Tensor],
    h: AdamStep,
) -> Result<()> {
    let n = params.len();
    same_len(
        "fused Adam",
        n,
        &[grads.len(), exp_avgs.len(), exp_avg_sqs.len(), steps.len()],
    )?;
    let (p, g, m, v, s) = (
        pointers(params),
        pointers(grads),
        pointers(exp_avgs),
        pointers(exp_avg_sqs),
        pointers(steps),
    );
    // SAFETY: n live tensors in each list, alive for the call; the shim catches exceptions.
    check(unsafe {
        ffi::simile_fused_adam(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            s.as_ptr(),
            n,
            h.lr,
            h.betas[0],
            h.betas[1],
            h.weight_decay,
            h.eps,
            h.decoupled,
        )
    })
}

/// SGD's hyper-parameters for one group of parameters.
#[derive(Debug, Clone, Copy)]
pub struct SgdStep {
    pub lr: f64,
    pub momentum: f64,
    pub dampening: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
}

/// `torch.optim.SGD(fused=True)`'s step. `bufs`: the momentum buffers (ignored without
/// momentum); `first`: they are new, and take the gradients as they are.
pub fn fused_sgd(
    params: &[Tensor],
    grads: &[Tensor],
    bufs: &[Tensor],
    h: SgdStep,
    first: bool,
) -> Result<()> {
    let n = params.len();
    let mut lens = vec![grads.len()];
    if h.momentum != 0.0 {
        lens.push(bufs.len());
    }
    same_len("fused SGD", n, &lens)?;
    let (p, g, b) = (pointers(params), pointers(grads), pointers(bufs));
    // SAFETY: as fused_adam (bufs is read only when momentum != 0, and then holds n tensors).
    check(unsafe {
        ffi::simile_fused_sgd(
            p.as_ptr(),
            g.as_ptr(),
            b.as_ptr(),
            n,
            h.weight_decay,
            h.momentum,
            h.lr,
            h.dampening,
            h.nesterov,
            first,
        )
    })
}

/// `optimizer.zero_grad(set_to_none=True)`: drops each tensor's gradient (undefined until the
/// next backward allocates one), which costs nothing where zeroing is a pass over each.
pub fn clear_grads(tensors: &[Tensor]) -> Result<()> {
    let t = pointers(tensors);
    // SAFETY: live tensors for the duration of the call.
    check(unsafe { ffi::simile_clear_grads(t.as_ptr(), t.len()) })
}

/// GradScaler's unscale: every gradient times `inv_scale` (a float32 scalar tensor on their
/// device), in place; `found_inf` (likewise) becomes 1 if any gradient holds an inf or NaN.
pub fn amp_unscale(grads: &[Tensor], found_inf: &Tensor, inv_scale: &Tensor) -> Result<()> {
    let g = pointers(grads);
    // SAFETY: live tensors for the duration of the call.
    check(unsafe {
        ffi::simile_amp_unscale(g.as_ptr(), g.len(), found_inf.as_ptr(), inv_scale.as_ptr())
    })
}

/// Whether this CPU has oneDNN's bf16 kernels (AVX512 or AMX). Without them libtorch runs
/// bf16 convolutions through its reference code, many times slower than fp32.
pub fn cpu_has_bf16_kernels() -> Result<bool> {
    let mut out = false;
    // SAFETY: a valid out pointer.
    check(unsafe { ffi::simile_cpu_has_bf16_kernels(&mut out) })?;
    Ok(out)
}

/// The floating-point operations of what `f` runs on this thread, as libtorch's profiler
/// counts them (`with_flops`: conv2d, mm, addmm, bmm, baddbmm, mul, add; 2 per multiply-add).
pub fn count_flops<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
    // SAFETY: no arguments; the profiler state is this thread's.
    check(unsafe { ffi::simile_flops_begin() })?;
    let out = f();
    let mut flops = 0f64;
    // SAFETY: a valid out pointer; always called after begin, even when f failed.
    let end = check(unsafe { ffi::simile_flops_end(&mut flops) });
    let out = out?;
    end?;
    Ok((out, flops))
}
