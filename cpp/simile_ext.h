// simile's C++ shim over libtorch: c10d (TCPStore, ProcessGroupGloo, ProcessGroupNCCL), CPU/CUDA autocast, and
// the ATen ops and facilities tch does not reach (fused optimiser steps, GradScaler's unscale,
// oneDNN's bf16 check, the profiler's FLOP count, dynamic int8 linear layers).
// Its only caller is src/torch_ext/ (Rust), which declares these same functions.
//
// Rules of the API:
// - Every function that can fail returns a `simile_error*`: NULL on success, otherwise an error
//   allocated here that the caller releases with simile_error_free. No C++ exception crosses
//   this boundary.
// - Tensors are `at::Tensor*`, i.e. tch's `C_tensor` (`Tensor::as_ptr()`); tensors returned
//   through `at::Tensor**` are new heap objects that the caller owns (`Tensor::from_ptr`).
// - Handles (`simile_store*`, `simile_pg*`, `simile_qlinear*`) are released with their _free
//   function.
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
namespace at {
class Tensor;
}
typedef at::Tensor simile_tensor;
extern "C" {
#else
typedef void simile_tensor;
#endif

// What kind of failure: decides the exit code on the Rust side (src/error.rs).
enum {
  // Misuse of the API (a CPU-only collective given a CUDA tensor, a bad rank): simile's bug.
  SIMILE_ERR_INTERNAL = 0,
  // A peer that died, never came or did not answer within the timeout; a collective that
  // failed on the wire.
  SIMILE_ERR_PEER = 1,
  // The user's configuration: an address that is not one of this machine's interfaces, a
  // hostname that does not resolve.
  SIMILE_ERR_USER = 2,
};

typedef struct simile_error {
  int32_t kind;
  char* message;
} simile_error;

void simile_error_free(simile_error* err);

// ---- TCPStore ----------------------------------------------------------------------------
typedef struct simile_store simile_store;

// A TCPStore client of host:port; the server too when is_server. listen_fd >= 0 hands the
// server an already bound and listening socket (the store takes it over and closes it);
// -1 makes it bind `port` itself. world_size > 0 sets numWorkers (the server waits for that
// many clients when wait_workers). timeout_ms bounds connecting and every blocking store call.
simile_error* simile_store_new(const char* host, uint16_t port, int32_t listen_fd,
                               int64_t world_size, bool is_server, bool wait_workers,
                               int64_t timeout_ms, simile_store** out);
uint16_t simile_store_port(const simile_store* store);
simile_error* simile_store_set(simile_store* store, const char* key, const uint8_t* value,
                               size_t len);
// Waits up to timeout_ms for the key, then returns its value in a malloc'd buffer (release with
// simile_buf_free; NULL when len is 0).
simile_error* simile_store_get(simile_store* store, const char* key, int64_t timeout_ms,
                               uint8_t** value, size_t* len);
simile_error* simile_store_add(simile_store* store, const char* key, int64_t delta,
                               int64_t* out);
void simile_store_free(simile_store* store);
void simile_buf_free(uint8_t* buf);

// ---- Process groups ----------------------------------------------------------------------
typedef struct simile_pg simile_pg;

// A Gloo process group of world_size ranks on a PrefixStore(prefix, store), its transport bound
// to hostname (an address or name of one of this machine's interfaces). Blocks until every rank
// has joined, at most timeout_ms; timeout_ms also bounds every collective.
simile_error* simile_pg_new_gloo(simile_store* store, const char* prefix, int32_t rank,
                                 int32_t world_size, const char* hostname, int64_t timeout_ms,
                                 simile_pg** out);
// Whether this build has the NCCL backend (CUDA ranks): false where libtorch has no CUDA.
bool simile_nccl_built(void);
// An NCCL process group (CUDA tensors on cuda:device_index, which becomes this thread's current
// device) on a PrefixStore(prefix, store). Forms the communicator before returning (every rank
// must call it, at most timeout_ms); timeout_ms also bounds every collective's wait.
simile_error* simile_pg_new_nccl(simile_store* store, const char* prefix, int32_t rank,
                                 int32_t world_size, int32_t device_index, int64_t timeout_ms,
                                 simile_pg** out);
int32_t simile_pg_rank(const simile_pg* pg);
int32_t simile_pg_size(const simile_pg* pg);
// Sums each tensor over the ranks, in place (each tensor on its own: tensors of different
// shapes and dtypes may be mixed; one collective per dtype).
simile_error* simile_pg_allreduce_sum(simile_pg* pg, simile_tensor* const* tensors, size_t n);
// Gathers input from every rank: outputs[r] (world_size slots) receives rank r's tensor.
simile_error* simile_pg_allgather(simile_pg* pg, const simile_tensor* input,
                                  simile_tensor** outputs);
// Copies root's tensors over every other rank's, in place.
simile_error* simile_pg_broadcast(simile_pg* pg, simile_tensor* const* tensors, size_t n,
                                  int32_t root);
simile_error* simile_pg_barrier(simile_pg* pg);
// Waits for the group's collectives in flight (each bounded by the timeout), then frees it.
void simile_pg_free(simile_pg* pg);

// ---- Autocast ----------------------------------------------------------------------------
// The state a guard restores on exit (autocast state is thread-local).
typedef struct simile_autocast_prev {
  bool enabled;
  int8_t dtype;  // c10::ScalarType
} simile_autocast_prev;

// torch.autocast(device_type, dtype).__enter__: records the previous state in *prev, enables
// autocast for device_type (c10::DeviceType) with dtype (c10::ScalarType), nests once more.
simile_error* simile_autocast_enter(int8_t device_type, int8_t dtype, simile_autocast_prev* prev);
// __exit__: un-nests (clearing the cast cache when the outermost guard exits) and restores prev.
simile_error* simile_autocast_exit(int8_t device_type, const simile_autocast_prev* prev);

// ---- Fused optimisers -----------------------------------------------------------------
// torch.optim's fused=True steps (ATen's _fused_adam_ / _fused_adamw_ / _fused_sgd_: one pass
// over each parameter, CPU and CUDA kernels). Lists of n tensors each, one parameter per
// index, all on one device. steps: float32 scalar tensors, each parameter's step count,
// incremented here before the update (as torch.optim does). decoupled: AdamW's weight decay.
simile_error* simile_fused_adam(simile_tensor* const* params, simile_tensor* const* grads,
                                simile_tensor* const* exp_avgs, simile_tensor* const* exp_avg_sqs,
                                simile_tensor* const* steps, size_t n, double lr, double beta1,
                                double beta2, double weight_decay, double eps, bool decoupled);
// bufs: momentum buffers (when momentum != 0); is_first_step fills them with the gradients.
simile_error* simile_fused_sgd(simile_tensor* const* params, simile_tensor* const* grads,
                               simile_tensor* const* bufs, size_t n, double weight_decay,
                               double momentum, double lr, double dampening, bool nesterov,
                               bool is_first_step);

// optimizer.zero_grad(set_to_none=True): drops each tensor's gradient (the next backward
// allocates a new one), where zeroing would cost a pass over every gradient.
simile_error* simile_clear_grads(simile_tensor* const* tensors, size_t n);

// ---- Mixed precision ---------------------------------------------------------------------
// torch.amp.GradScaler's unscale: multiplies every gradient by inv_scale (a float32 scalar
// tensor), in place, and sets found_inf (a float32 scalar tensor) to 1 if any is inf or NaN.
simile_error* simile_amp_unscale(simile_tensor* const* grads, size_t n, simile_tensor* found_inf,
                                 const simile_tensor* inv_scale);
// Whether this CPU has oneDNN's bf16 kernels (torch.ops.mkldnn._is_mkldnn_bf16_supported:
// AVX512 or AMX); without them libtorch runs bf16 convolutions through slow reference code.
simile_error* simile_cpu_has_bf16_kernels(bool* out);

// ---- FLOPs ---------------------------------------------------------------------------------
// Counts the floating-point operations of the ops run on this thread between begin and end,
// with libtorch's profiler (its with_flops counters: conv2d, mm, addmm, bmm, baddbmm, mul,
// add).
simile_error* simile_flops_begin(void);
simile_error* simile_flops_end(double* flops);

// ---- Dynamic int8 linear layers ---------------------------------------------------------
// torch.ao.nn.quantized.dynamic.Linear (what torch.ao.quantization.quantize_dynamic puts in
// place of nn.Linear) on the CPU: int8 weights, activations quantized per call.
typedef struct simile_qlinear simile_qlinear;

// quantized::linear_prepack(qweight, bias): qweight a per-tensor qint8 tensor [out, in] (the
// caller quantizes it, as PyTorch's weight observer does); bias float32 [out] or NULL.
simile_error* simile_qlinear_new(const simile_tensor* qweight, const simile_tensor* bias,
                                 simile_qlinear** out);
// quantized::linear_dynamic(input, packed, reduce_range): float32 [.., in] -> float32 [.., out].
simile_error* simile_qlinear_forward(const simile_qlinear* q, const simile_tensor* input,
                                     bool reduce_range, simile_tensor** out);
void simile_qlinear_free(simile_qlinear* q);

#ifdef __cplusplus
}
#endif
