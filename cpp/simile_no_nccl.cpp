// Built instead of simile_nccl.cpp where libtorch has no CUDA (a CPU-only torch wheel): such a
// libtorch has no ProcessGroupNCCL, and no CUDA device to give it.
#include "simile_internal.hpp"

using namespace simile_detail;

extern "C" {

bool simile_nccl_built(void) { return false; }

simile_error* simile_pg_new_nccl(simile_store*, const char*, int32_t, int32_t, int32_t, int64_t,
                                 simile_pg** out) {
  *out = nullptr;
  return make_error(SIMILE_ERR_USER,
                    "NCCL process group: this simile was built against a libtorch without CUDA "
                    "(no libtorch_cuda), so it has no NCCL backend");
}

}  // extern "C"
