// simile's C++ shim over libtorch (see simile_ext.h for the API's rules). Built by build.rs
// with -std=c++20 -D_GLIBCXX_USE_CXX11_ABI=1 -DUSE_DISTRIBUTED -DUSE_C10D_GLOO, against the
// torch wheel's headers and Debian's libgloo-dev headers; it links only libtorch_cpu (the Gloo
// backend and gloo itself are inside it). The NCCL backend is simile_nccl.cpp's (built where
// libtorch has CUDA): a simile_pg holds a generic c10d::Backend and the device its tensors must
// be on, so the collectives here serve both.
#include "simile_internal.hpp"

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/autograd/profiler_legacy.h>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#ifndef USE_C10D_GLOO
#error "simile_ext.cpp needs -DUSE_C10D_GLOO (and -DUSE_DISTRIBUTED), as libtorch was built"
#endif

// The layouts the headers give must be the ones compiled into libtorch_cpu.so
// (ProcessGroupGloo::split allocates 0x1e8 bytes, Options::create_default 0xb8 in torch
// 2.13.0). A torch upgrade or other gloo headers that change them fail here, not at run time.
static_assert(sizeof(c10d::ProcessGroupGloo) == 488,
              "ProcessGroupGloo's layout differs from libtorch 2.13.0's: check the gloo headers "
              "and the torch version");
static_assert(sizeof(c10d::ProcessGroupGloo::Options) == 184,
              "ProcessGroupGloo::Options' layout differs from libtorch 2.13.0's");

using namespace simile_detail;

// The packed weights of one dynamic int8 linear layer: quantized::linear_prepack's result, a
// TorchScript custom class (LinearPackedParamsBase: fbgemm's or oneDNN's, after the quantized
// engine), held as an IValue and passed back to quantized::linear_dynamic through the
// dispatcher, boxed, as torch.ao.nn.quantized.dynamic.Linear does from Python.
struct simile_qlinear {
  c10::IValue packed;
};

extern "C" {

void simile_error_free(simile_error* err) {
  if (err != nullptr) {
    std::free(err->message);
    std::free(err);
  }
}

void simile_buf_free(uint8_t* buf) { std::free(buf); }

// ---- TCPStore ----------------------------------------------------------------------------

simile_error* simile_store_new(const char* host, uint16_t port, int32_t listen_fd,
                               int64_t world_size, bool is_server, bool wait_workers,
                               int64_t timeout_ms, simile_store** out) {
  *out = nullptr;
  // Failing to connect (the server never came up, or not within the timeout) is a peer
  // failure; the caller has already resolved the address and bound the server's socket, so
  // the user's mistakes (a bad address, a port in use) are reported before this is called.
  return protect(SIMILE_ERR_PEER, "TCPStore", [&] {
    c10d::TCPStoreOptions opts;
    opts.port = port;
    opts.isServer = is_server;
    if (world_size > 0) {
      opts.numWorkers = static_cast<std::size_t>(world_size);
    }
    opts.waitWorkers = wait_workers;
    opts.timeout = ms(timeout_ms);
    if (is_server && listen_fd >= 0) {
      opts.masterListenFd = listen_fd;
      // libtorch's libuv server cannot take over a socket; the classic one can.
      opts.useLibUV = false;
    }
    auto store = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    *out = new simile_store{std::move(store)};
  });
}

uint16_t simile_store_port(const simile_store* store) { return store->store->getPort(); }

simile_error* simile_store_set(simile_store* store, const char* key, const uint8_t* value,
                               size_t len) {
  return protect(SIMILE_ERR_PEER, "store set", [&] {
    std::vector<uint8_t> v(value, value + len);
    store->store->set(std::string(key), v);
  });
}

simile_error* simile_store_get(simile_store* store, const char* key, int64_t timeout_ms,
                               uint8_t** value, size_t* len) {
  *value = nullptr;
  *len = 0;
  return protect(SIMILE_ERR_PEER, "store get", [&] {
    std::string k(key);
    store->store->wait({k}, ms(timeout_ms));
    auto v = store->store->get(k);
    if (!v.empty()) {
      auto* buf = static_cast<uint8_t*>(std::malloc(v.size()));
      if (buf == nullptr) {
        throw std::bad_alloc();
      }
      std::memcpy(buf, v.data(), v.size());
      *value = buf;
      *len = v.size();
    }
  });
}

simile_error* simile_store_add(simile_store* store, const char* key, int64_t delta,
                               int64_t* out) {
  return protect(SIMILE_ERR_PEER, "store add",
                 [&] { *out = store->store->add(std::string(key), delta); });
}

void simile_store_free(simile_store* store) {
  try {
    delete store;
  } catch (...) {
    // A destructor that throws (it should not) must not cross into Rust.
  }
}

// ---- Process groups ----------------------------------------------------------------------

simile_error* simile_pg_new_gloo(simile_store* store, const char* prefix, int32_t rank,
                                 int32_t world_size, const char* hostname, int64_t timeout_ms,
                                 simile_pg** out) {
  *out = nullptr;
  return protect_kinds(SIMILE_ERR_PEER, "Gloo process group", [&] {
    if (world_size < 1 || rank < 0 || rank >= world_size) {
      throw KindError(SIMILE_ERR_INTERNAL, "rank " + std::to_string(rank) +
                                               " is not within a world of " +
                                               std::to_string(world_size));
    }
    auto opts = c10d::ProcessGroupGloo::Options::create(ms(timeout_ms));
    // The transport device: an address that does not resolve or is not one of this
    // machine's interfaces is the user's to fix.
    try {
      opts->devices.push_back(
          c10d::ProcessGroupGloo::createDeviceForHostname(std::string(hostname)));
    } catch (const std::exception& e) {
      throw KindError(SIMILE_ERR_USER,
                      "cannot use address '" + std::string(hostname) + "': " + message_of(e));
    }
    auto prefixed = c10::make_intrusive<c10d::PrefixStore>(
        std::string(prefix), c10::static_intrusive_pointer_cast<c10d::Store>(store->store));
    // Rendezvous: blocks until every rank has published its address (or the timeout).
    c10::intrusive_ptr<c10d::ProcessGroupGloo> backend;
    try {
      backend = c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed, rank, world_size, opts);
    } catch (const std::exception& e) {
      throw KindError(SIMILE_ERR_PEER, "rank " + std::to_string(rank) + " of " +
                                           std::to_string(world_size) +
                                           ": the group did not form within " +
                                           std::to_string(timeout_ms) + " ms: " + message_of(e));
    }
    *out = new simile_pg{c10::static_intrusive_pointer_cast<c10d::Backend>(backend),
                         c10::DeviceType::CPU, rank, world_size, ms(timeout_ms)};
  });
}

int32_t simile_pg_rank(const simile_pg* pg) { return pg->rank; }
int32_t simile_pg_size(const simile_pg* pg) { return pg->size; }

}  // extern "C"

namespace {

void check_tensor(const simile_pg* pg, const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.defined(), what, ": an undefined tensor");
  TORCH_CHECK(t.layout() == c10::kStrided, what, ": only dense tensors, not ", t.layout());
  TORCH_CHECK(t.device().type() == pg->device, what, ": a tensor on ", t.device(),
              " but this process group works on ", c10::DeviceTypeName(pg->device));
}

// Waits for a collective, at most the group's timeout. A peer that died closes its
// connections, which fails the collective at once ("Connection closed by peer"); a peer that
// is alive but never takes part leaves it pending until the timeout. The work itself goes on
// in Gloo's thread until Gloo's own timeout (the same delay) ends it; it holds references to
// its tensors, so nothing it touches is freed under it.
void wait(const c10::intrusive_ptr<c10d::Work>& work, const simile_pg* pg) {
  bool done = false;
  try {
    done = work->wait(pg->timeout);
  } catch (const std::exception&) {
    if (work->isCompleted()) {
      throw;  // the collective's own failure (Gloo names the peer)
    }
  }
  if (!done) {
    throw std::runtime_error("no result within " + std::to_string(pg->timeout.count()) +
                             " ms: a peer died, hangs, or did not call the same collective");
  }
}

// Tensors grouped by dtype, in order of first appearance (the same on every rank, given the
// same list), each group flattened into one contiguous buffer for one collective: Gloo would
// otherwise treat a list as one tensor's per-device copies (summing them together).
struct Flat {
  std::vector<at::Tensor> tensors;
  at::Tensor buffer;
  bool in_place = false;  // one contiguous tensor: the collective works on it directly
};

std::vector<Flat> flatten_by_dtype(const simile_pg* pg, simile_tensor* const* tensors, size_t n,
                                   bool need_values, const char* what) {
  std::vector<Flat> groups;
  for (size_t i = 0; i < n; i++) {
    const at::Tensor& t = *tensors[i];
    check_tensor(pg, t, what);
    Flat* g = nullptr;
    for (auto& cand : groups) {
      if (cand.tensors.front().scalar_type() == t.scalar_type()) {
        g = &cand;
        break;
      }
    }
    if (g == nullptr) {
      groups.emplace_back();
      g = &groups.back();
    }
    g->tensors.push_back(t);
  }
  for (auto& g : groups) {
    if (g.tensors.size() == 1 && g.tensors[0].is_contiguous()) {
      g.buffer = g.tensors[0];
      g.in_place = true;
    } else if (need_values) {
      std::vector<at::Tensor> flat;
      flat.reserve(g.tensors.size());
      for (auto& t : g.tensors) {
        flat.push_back(t.reshape({-1}));
      }
      g.buffer = at::cat(flat);
    } else {
      int64_t total = 0;
      for (auto& t : g.tensors) {
        total += t.numel();
      }
      g.buffer = at::empty({total}, g.tensors[0].options());
    }
  }
  return groups;
}

void unflatten(std::vector<Flat>& groups) {
  for (auto& g : groups) {
    if (g.in_place) {
      continue;
    }
    int64_t offset = 0;
    for (auto& t : g.tensors) {
      int64_t n = t.numel();
      t.copy_(g.buffer.narrow(0, offset, n).view(t.sizes()));
      offset += n;
    }
  }
}

// Runs one kind of collective over dtype groups: launch (synchronous argument errors are
// simile's bug), then wait for all (failures there are the peers').
template <typename Launch>
void run_grouped(simile_pg* pg, std::vector<Flat>& groups, Launch&& launch) {
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
  for (auto& g : groups) {
    std::vector<at::Tensor> v{g.buffer};
    try {
      works.push_back(launch(v));
    } catch (const std::exception& e) {
      throw KindError(SIMILE_ERR_INTERNAL, message_of(e));
    }
  }
  for (auto& w : works) {
    wait(w, pg);
  }
}

}  // namespace

extern "C" {

simile_error* simile_pg_allreduce_sum(simile_pg* pg, simile_tensor* const* tensors, size_t n) {
  return protect_kinds(SIMILE_ERR_PEER, "allreduce", [&] {
    at::NoGradGuard no_grad;  // parameters and gradients alike are updated in place
    std::vector<Flat> groups;
    try {
      groups = flatten_by_dtype(pg, tensors, n, true, "allreduce");
    } catch (const std::exception& e) {
      throw KindError(SIMILE_ERR_INTERNAL, message_of(e));
    }
    run_grouped(pg, groups, [&](std::vector<at::Tensor>& v) {
      c10d::AllreduceOptions opts;
      opts.reduceOp = c10d::ReduceOp::SUM;
      opts.timeout = pg->timeout;
      return pg->backend->allreduce(v, opts);
    });
    unflatten(groups);
  });
}

simile_error* simile_pg_allgather(simile_pg* pg, const simile_tensor* input,
                                  simile_tensor** outputs) {
  for (int32_t r = 0; r < pg->size; r++) {
    outputs[r] = nullptr;
  }
  return protect_kinds(SIMILE_ERR_PEER, "allgather", [&] {
    at::NoGradGuard no_grad;
    std::vector<at::Tensor> in;
    std::vector<std::vector<at::Tensor>> out(1);
    c10::intrusive_ptr<c10d::Work> work;
    try {
      check_tensor(pg, *input, "allgather");
      in.push_back(input->contiguous());
      for (int32_t r = 0; r < pg->size; r++) {
        out[0].push_back(at::empty(in[0].sizes(), in[0].options()));
      }
      c10d::AllgatherOptions opts;
      opts.timeout = pg->timeout;
      work = pg->backend->allgather(out, in, opts);
    } catch (const std::exception& e) {
      throw KindError(SIMILE_ERR_INTERNAL, message_of(e));
    }
    wait(work, pg);
    for (int32_t r = 0; r < pg->size; r++) {
      outputs[r] = new at::Tensor(std::move(out[0][r]));
    }
  });
}

simile_error* simile_pg_broadcast(simile_pg* pg, simile_tensor* const* tensors, size_t n,
                                  int32_t root) {
  return protect_kinds(SIMILE_ERR_PEER, "broadcast", [&] {
    at::NoGradGuard no_grad;
    std::vector<Flat> groups;
    try {
      TORCH_CHECK(root >= 0 && root < pg->size, "root ", root, " is not a rank of a world of ",
                  pg->size);
      // Only the root's values travel: the others need just a buffer of the right size.
      groups = flatten_by_dtype(pg, tensors, n, pg->rank == root, "broadcast");
    } catch (const std::exception& e) {
      throw KindError(SIMILE_ERR_INTERNAL, message_of(e));
    }
    run_grouped(pg, groups, [&](std::vector<at::Tensor>& v) {
      c10d::BroadcastOptions opts;
      opts.rootRank = root;
      opts.rootTensor = 0;
      opts.timeout = pg->timeout;
      return pg->backend->broadcast(v, opts);
    });
    if (pg->rank != root) {
      unflatten(groups);
    }
  });
}

simile_error* simile_pg_barrier(simile_pg* pg) {
  return protect(SIMILE_ERR_PEER, "barrier", [&] {
    c10d::BarrierOptions opts;
    opts.timeout = pg->timeout;
    wait(pg->backend->barrier(opts), pg);
  });
}

void simile_pg_free(simile_pg* pg) {
  try {
    delete pg;
  } catch (...) {
  }
}

// ---- Autocast ----------------------------------------------------------------------------

simile_error* simile_autocast_enter(int8_t device_type, int8_t dtype, simile_autocast_prev* prev) {
  return protect(SIMILE_ERR_INTERNAL, "autocast", [&] {
    auto dev = static_cast<c10::DeviceType>(device_type);
    auto st = static_cast<c10::ScalarType>(dtype);
    TORCH_CHECK(at::autocast::is_autocast_available(dev), "autocast is not available on ",
                c10::DeviceTypeName(dev));
    prev->enabled = at::autocast::is_autocast_enabled(dev);
    prev->dtype = static_cast<int8_t>(at::autocast::get_autocast_dtype(dev));
    at::autocast::set_autocast_enabled(dev, true);
    at::autocast::set_autocast_dtype(dev, st);
    at::autocast::increment_nesting();
  });
}

simile_error* simile_autocast_exit(int8_t device_type, const simile_autocast_prev* prev) {
  return protect(SIMILE_ERR_INTERNAL, "autocast", [&] {
    auto dev = static_cast<c10::DeviceType>(device_type);
    // The cast cache holds low-precision copies of leaf tensors (weights): once the outermost
    // region ends they must go, or the next region would use copies from before the
    // optimizer's step.
    if (at::autocast::decrement_nesting() == 0) {
      at::autocast::clear_cache();
    }
    at::autocast::set_autocast_enabled(dev, prev->enabled);
    at::autocast::set_autocast_dtype(dev, static_cast<c10::ScalarType>(prev->dtype));
  });
}

// ---- Fused optimisers -----------------------------------------------------------------

namespace {

std::vector<at::Tensor> list_of(simile_tensor* const* ts, size_t n) {
  std::vector<at::Tensor> v;
  v.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    v.push_back(*ts[i]);
  }
  return v;
}

}  // namespace

simile_error* simile_fused_adam(simile_tensor* const* params, simile_tensor* const* grads,
                                simile_tensor* const* exp_avgs, simile_tensor* const* exp_avg_sqs,
                                simile_tensor* const* steps, size_t n, double lr, double beta1,
                                double beta2, double weight_decay, double eps, bool decoupled) {
  return protect(SIMILE_ERR_INTERNAL, "fused Adam step", [&] {
    at::NoGradGuard no_grad;
    auto p = list_of(params, n);
    auto g = list_of(grads, n);
    auto m = list_of(exp_avgs, n);
    auto v = list_of(exp_avg_sqs, n);
    auto s = list_of(steps, n);
    at::_foreach_add_(s, 1);
    // No amsgrad: its max_exp_avg_sqs list stays empty, as torch.optim passes it.
    std::vector<at::Tensor> none;
    if (decoupled) {
      at::_fused_adamw_(p, g, m, v, none, s, lr, beta1, beta2, weight_decay, eps,
                        /*amsgrad=*/false, /*maximize=*/false, std::nullopt, std::nullopt);
    } else {
      at::_fused_adam_(p, g, m, v, none, s, lr, beta1, beta2, weight_decay, eps,
                       /*amsgrad=*/false, /*maximize=*/false, std::nullopt, std::nullopt);
    }
  });
}

simile_error* simile_fused_sgd(simile_tensor* const* params, simile_tensor* const* grads,
                               simile_tensor* const* bufs, size_t n, double weight_decay,
                               double momentum, double lr, double dampening, bool nesterov,
                               bool is_first_step) {
  return protect(SIMILE_ERR_INTERNAL, "fused SGD step", [&] {
    at::NoGradGuard no_grad;
    auto p = list_of(params, n);
    auto g = list_of(grads, n);
    auto b = momentum != 0.0 ? list_of(bufs, n) : std::vector<at::Tensor>{};
    at::_fused_sgd_(p, g, b, weight_decay, momentum, lr, dampening, nesterov,
                    /*maximize=*/false, is_first_step, std::nullopt, std::nullopt);
  });
}

simile_error* simile_clear_grads(simile_tensor* const* tensors, size_t n) {
  return protect(SIMILE_ERR_INTERNAL, "clearing gradients", [&] {
    for (size_t i = 0; i < n; ++i) {
      tensors[i]->mutable_grad().reset();
    }
  });
}

// ---- Mixed precision ---------------------------------------------------------------------

simile_error* simile_amp_unscale(simile_tensor* const* grads, size_t n, simile_tensor* found_inf,
                                 const simile_tensor* inv_scale) {
  return protect(SIMILE_ERR_INTERNAL, "unscaling gradients", [&] {
    at::NoGradGuard no_grad;
    auto g = list_of(grads, n);
    at::_amp_foreach_non_finite_check_and_unscale_(g, *found_inf, *inv_scale);
  });
}

simile_error* simile_cpu_has_bf16_kernels(bool* out) {
  return protect(SIMILE_ERR_INTERNAL, "bf16 support", [&] {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("mkldnn::_is_mkldnn_bf16_supported", "")
                         .typed<bool()>();
    *out = op.call();
  });
}

// ---- FLOPs ---------------------------------------------------------------------------------

simile_error* simile_flops_begin(void) {
  return protect(SIMILE_ERR_INTERNAL, "counting FLOPs", [&] {
    using torch::profiler::impl::ProfilerConfig;
    using torch::profiler::impl::ProfilerState;
    torch::autograd::profiler::enableProfilerLegacy(
        ProfilerConfig(ProfilerState::CPU, /*report_input_shapes=*/true,
                       /*profile_memory=*/false, /*with_stack=*/false, /*with_flops=*/true));
  });
}

simile_error* simile_flops_end(double* flops) {
  return protect(SIMILE_ERR_INTERNAL, "counting FLOPs", [&] {
    auto lists = torch::autograd::profiler::disableProfilerLegacy();
    double total = 0;
    for (auto& events : lists) {
      for (auto& e : events) {
        // The count sits on the op's opening event.
        if (e.kind() == torch::autograd::profiler::EventKind::PushRange) {
          total += static_cast<double>(e.flops());
        }
      }
    }
    *flops = total;
  });
}

// ---- Dynamic int8 linear layers ---------------------------------------------------------

simile_error* simile_qlinear_new(const simile_tensor* qweight, const simile_tensor* bias,
                                 simile_qlinear** out) {
  *out = nullptr;
  return protect(SIMILE_ERR_INTERNAL, "quantized::linear_prepack", [&] {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("quantized::linear_prepack", "");
    std::vector<c10::IValue> stack;
    stack.emplace_back(*qweight);
    stack.emplace_back(bias != nullptr ? c10::IValue(*bias) : c10::IValue());
    op.callBoxed(&stack);
    TORCH_CHECK(stack.size() == 1 && stack[0].isObject(),
                "linear_prepack did not return packed weights");
    *out = new simile_qlinear{std::move(stack[0])};
  });
}

simile_error* simile_qlinear_forward(const simile_qlinear* q, const simile_tensor* input,
                                     bool reduce_range, simile_tensor** out) {
  *out = nullptr;
  return protect(SIMILE_ERR_INTERNAL, "quantized::linear_dynamic", [&] {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("quantized::linear_dynamic", "");
    std::vector<c10::IValue> stack{c10::IValue(*input), q->packed, c10::IValue(reduce_range)};
    op.callBoxed(&stack);
    TORCH_CHECK(stack.size() == 1 && stack[0].isTensor(), "linear_dynamic returned no tensor");
    *out = new at::Tensor(stack[0].toTensor());
  });
}

void simile_qlinear_free(simile_qlinear* q) { delete q; }

}  // extern "C"
