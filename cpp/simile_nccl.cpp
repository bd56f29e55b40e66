// The NCCL backend for CUDA ranks (ProcessGroupNCCL, inside libtorch_cuda). Built by build.rs
// only where the torch wheel has CUDA (libtorch_cuda.so) and the CUDA headers it needs are
// installed (`nvidia-cuda-crt`, `nvidia-cuda-cccl`; NCCL's from `nvidia-nccl-cu13`), with
// -DUSE_C10D_NCCL as libtorch was built. The collectives themselves are simile_ext.cpp's,
// over the generic c10d::Backend a simile_pg holds.
#include "simile_internal.hpp"

#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

#ifndef USE_C10D_NCCL
#error "simile_nccl.cpp needs -DUSE_C10D_NCCL (and -DUSE_DISTRIBUTED), as libtorch was built"
#endif

// The layouts the headers give must be the ones compiled into libtorch_cuda.so: in torch
// 2.13.0 ProcessGroupNCCL::split allocates 0x480 bytes, and Options' constructor writes its
// last field at 0xf8 (NCCL 2.29's ncclConfig_t inside). An upgrade that changes them fails
// here, not at run time.
static_assert(sizeof(c10d::ProcessGroupNCCL) == 1152,
              "ProcessGroupNCCL's layout differs from libtorch 2.13.0's: check the NCCL headers "
              "and the torch version");
static_assert(sizeof(c10d::ProcessGroupNCCL::Options) == 256,
              "ProcessGroupNCCL::Options' layout differs from libtorch 2.13.0's");

using namespace simile_detail;

extern "C" {

bool simile_nccl_built(void) { return true; }

simile_error* simile_pg_new_nccl(simile_store* store, const char* prefix, int32_t rank,
                                 int32_t world_size, int32_t device_index, int64_t timeout_ms,
                                 simile_pg** out) {
  *out = nullptr;
  return protect_kinds(SIMILE_ERR_PEER, "NCCL process group", [&] {
    if (world_size < 1 || rank < 0 || rank >= world_size) {
      throw KindError(SIMILE_ERR_INTERNAL, "rank " + std::to_string(rank) +
                                               " is not within a world of " +
                                               std::to_string(world_size));
    }
    int64_t n = c10::cuda::device_count();
    if (device_index < 0 || device_index >= n) {
      throw KindError(SIMILE_ERR_USER, "cuda:" + std::to_string(device_index) +
                                           " does not exist: this machine has " +
                                           std::to_string(n) + " CUDA device(s)");
    }
    // NCCL's communicator and streams belong to the current device.
    c10::cuda::set_device(static_cast<c10::DeviceIndex>(device_index));
    auto opts = c10d::ProcessGroupNCCL::Options::create();
    opts->timeout = ms(timeout_ms);
    auto prefixed = c10::make_intrusive<c10d::PrefixStore>(
        std::string(prefix), c10::static_intrusive_pointer_cast<c10d::Store>(store->store));
    c10::intrusive_ptr<c10d::ProcessGroupNCCL> backend;
    at::Device device(at::kCUDA, static_cast<c10::DeviceIndex>(device_index));
    try {
      backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(prefixed, rank, world_size, opts);
      // Form the communicator now (as init_process_group(device_id=...) does), so a rank
      // that never comes is found at start, within the store's timeout, not at the first
      // gradient.
      backend->setBoundDeviceId(device);
      backend->eagerConnectSingleDevice(device);
    } catch (const std::exception& e) {
      throw KindError(SIMILE_ERR_PEER, "rank " + std::to_string(rank) + " of " +
                                           std::to_string(world_size) + " on cuda:" +
                                           std::to_string(device_index) +
                                           ": the group did not form within " +
                                           std::to_string(timeout_ms) + " ms: " + message_of(e));
    }
    *out = new simile_pg{c10::static_intrusive_pointer_cast<c10d::Backend>(backend),
                         c10::DeviceType::CUDA, rank, world_size, ms(timeout_ms)};
  });
}

}  // extern "C"
