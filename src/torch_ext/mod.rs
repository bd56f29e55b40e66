//! What tch does not wrap from libtorch, through simile's C++ shim (`cpp/`, compiled by
//! `build.rs`): libtorch's own c10d for data-parallel training (a TCPStore rendezvous, Gloo
//! process groups for CPU tensors and NCCL ones for CUDA tensors, and their collectives), a
//! CPU/CUDA autocast guard, and
//! ATen's fused optimiser steps, GradScaler's unscale, the profiler's FLOP counter and
//! PyTorch's dynamic int8 linear layers (`quantized::linear_dynamic`). This
//! module is the shim's only face: everything else in simile uses these safe types.
//!
//! Errors: a C++ exception becomes a [`crate::Error`]: `Distributed` (exit 1) for a peer that
//! died, never came or timed out; `Input` (exit 2) for the user's configuration (a port in use,
//! an address that does not resolve or is not this machine's); `Internal` for misuse.
mod autocast;
mod dist;
mod ffi;
mod kernels;
mod quantized;

pub use autocast::AutocastGuard;
pub use dist::{nccl_built, ProcessGroup, Store};
pub use kernels::{
    amp_unscale, clear_grads, count_flops, cpu_has_bf16_kernels, fused_adam, fused_sgd, AdamStep,
    SgdStep,
};
pub use quantized::QLinear;

#[cfg(test)]
mod tests;
