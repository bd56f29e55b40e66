//! The shim's C API (`cpp/simile_ext.h`, whose comments are the contract) and its errors.
use std::ffi::{c_char, CStr};
use std::time::Duration;

use torch_sys::C_tensor;

use crate::{Error, Result};

/// `SIMILE_ERR_*` in `cpp/simile_ext.h`.
const ERR_PEER: i32 = 1;
const ERR_USER: i32 = 2;

#[repr(C)]
pub(super) struct SimileError {
    kind: i32,
    message: *mut c_char,
}

#[repr(C)]
pub(super) struct SimileStore {
    _private: [u8; 0],
}

#[repr(C)]
pub(super) struct SimilePg {
    _private: [u8; 0],
}

#[repr(C)]
pub(super) struct SimileQLinear {
    _private: [u8; 0],
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(super) struct AutocastPrev {
    pub enabled: bool,
    pub dtype: i8,
}

extern "C" {
    fn simile_error_free(err: *mut SimileError);

    pub(super) fn simile_store_new(
        host: *const c_char,
        port: u16,
        listen_fd: i32,
        world_size: i64,
        is_server: bool,
        wait_workers: bool,
        timeout_ms: i64,
        out: *mut *mut SimileStore,
    ) -> *mut SimileError;
    pub(super) fn simile_store_port(store: *const SimileStore) -> u16;
    pub(super) fn simile_store_set(
        store: *mut SimileStore,
        key: *const c_char,
        value: *const u8,
        len: usize,
    ) -> *mut SimileError;
    pub(super) fn simile_store_get(
        store: *mut SimileStore,
        key: *const c_char,
        timeout_ms: i64,
        value: *mut *mut u8,
        len: *mut usize,
    ) -> *mut SimileError;
    pub(super) fn simile_store_add(
        store: *mut SimileStore,
        key: *const c_char,
        delta: i64,
        out: *mut i64,
    ) -> *mut SimileError;
    pub(super) fn simile_store_free(store: *mut SimileStore);
    pub(super) fn simile_buf_free(buf: *mut u8);

    pub(super) fn simile_pg_new_gloo(
        store: *mut SimileStore,
        prefix: *const c_char,
        rank: i32,
        world_size: i32,
        hostname: *const c_char,
        timeout_ms: i64,
        out: *mut *mut SimilePg,
    ) -> *mut SimileError;
    pub(super) fn simile_nccl_built() -> bool;
    pub(super) fn simile_pg_new_nccl(
        store: *mut SimileStore,
        prefix: *const c_char,
        rank: i32,
        world_size: i32,
        device_index: i32,
        timeout_ms: i64,
        out: *mut *mut SimilePg,
    ) -> *mut SimileError;
    pub(super) fn simile_pg_allreduce_sum(
        pg: *mut SimilePg,
        tensors: *const *const C_tensor,
        n: usize,
    ) -> *mut SimileError;
    pub(super) fn simile_pg_allgather(
        pg: *mut SimilePg,
        input: *const C_tensor,
        outputs: *mut *mut C_tensor,
    ) -> *mut SimileError;
    pub(super) fn simile_pg_broadcast(
        pg: *mut SimilePg,
        tensors: *const *const C_tensor,
        n: usize,
        root: i32,
    ) -> *mut SimileError;
    pub(super) fn simile_pg_barrier(pg: *mut SimilePg) -> *mut SimileError;
    pub(super) fn simile_pg_free(pg: *mut SimilePg);

    pub(super) fn simile_autocast_enter(
        device_type: i8,
        dtype: i8,
        prev: *mut AutocastPrev,
    ) -> *mut SimileError;
    pub(super) fn simile_autocast_exit(
        device_type: i8,
        prev: *const AutocastPrev,
    ) -> *mut SimileError;

    pub(super) fn simile_fused_adam(
        params: *const *const C_tensor,
        grads: *const *const C_tensor,
        exp_avgs: *const *const C_tensor,
        exp_avg_sqs: *const *const C_tensor,
        steps: *const *const C_tensor,
        n: usize,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        decoupled: bool,
    ) -> *mut SimileError;
    pub(super) fn simile_fused_sgd(
        params: *const *const C_tensor,
        grads: *const *const C_tensor,
        bufs: *const *const C_tensor,
        n: usize,
        weight_decay: f64,
        momentum: f64,
        lr: f64,
        dampening: f64,
        nesterov: bool,
        is_first_step: bool,
    ) -> *mut SimileError;
    pub(super) fn simile_clear_grads(tensors: *const *const C_tensor, n: usize)
        -> *mut SimileError;
    pub(super) fn simile_amp_unscale(
        grads: *const *const C_tensor,
        n: usize,
        found_inf: *const C_tensor,
        inv_scale: *const C_tensor,
    ) -> *mut SimileError;
    pub(super) fn simile_cpu_has_bf16_kernels(out: *mut bool) -> *mut SimileError;
    pub(super) fn simile_flops_begin() -> *mut SimileError;
    pub(super) fn simile_flops_end(flops: *mut f64) -> *mut SimileError;

    pub(super) fn simile_qlinear_new(
        qweight: *const C_tensor,
        bias: *const C_tensor,
        out: *mut *mut SimileQLinear,
    ) -> *mut SimileError;
    pub(super) fn simile_qlinear_forward(
        q: *const SimileQLinear,
        input: *const C_tensor,
        reduce_range: bool,
        out: *mut *mut C_tensor,
    ) -> *mut SimileError;
    pub(super) fn simile_qlinear_free(q: *mut SimileQLinear);
}

/// Turns the shim's returned error (null: success) into a `Result`, freeing it.
pub(super) fn check(err: *mut SimileError) -> Result<()> {
    if err.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null error comes from make_error in the shim: a valid struct whose message
    // is a NUL-terminated strdup (or null if that allocation failed); freed once, here.
    let (kind, message) = unsafe {
        let e = &*err;
        let message = if e.message.is_null() {
            "(no message)".to_string()
        } else {
            CStr::from_ptr(e.message).to_string_lossy().into_owned()
        };
        let kind = e.kind;
        simile_error_free(err);
        (kind, message)
    };
    Err(match kind {
        ERR_PEER => Error::Distributed(message),
        ERR_USER => Error::Input(message),
        _ => Error::Internal(message),
    })
}

/// A string for C; an interior NUL is the caller's input (a host name, a key).
pub(super) fn cstring(what: &str, s: &str) -> Result<std::ffi::CString> {
    std::ffi::CString::new(s).map_err(|_| Error::input(format!("{what} {s:?} contains a NUL byte")))
}

/// A timeout in the milliseconds c10d counts in. At least 1: c10d reads 0 as "no timeout".
pub(super) fn millis(timeout: Duration) -> i64 {
    i64::try_from(timeout.as_millis())
        .unwrap_or(i64::MAX)
        .max(1)
}

/// The C header's `simile_tensor* const*`: the shim changes the tensors' data, never the
/// handles.
pub(super) fn pointers<T: std::borrow::Borrow<tch::Tensor>>(tensors: &[T]) -> Vec<*const C_tensor> {
    tensors.iter().map(|t| t.borrow().as_ptr()).collect()
}
