// What the shim's translation units share (simile_ext.cpp: c10d with Gloo, autocast,
// kernels; simile_nccl.cpp: the NCCL backend): error plumbing and the handles' layouts.
// Internal to cpp/: the Rust side sees only simile_ext.h.
#pragma once

#include "simile_ext.h"

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>

#include <c10/util/Exception.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

namespace simile_detail {

// ---- Errors ------------------------------------------------------------------------------

inline simile_error* make_error(int32_t kind, const std::string& message) {
  auto* err = static_cast<simile_error*>(std::malloc(sizeof(simile_error)));
  if (err == nullptr) {
    std::abort();  // out of memory while reporting an error: nothing better to do
  }
  err->kind = kind;
  err->message = strdup(message.c_str());
  return err;
}

// The message without c10's C++ backtrace (which TORCH_SHOW_CPP_STACKTRACES may add).
inline std::string message_of(const std::exception& e) {
  if (auto* c10e = dynamic_cast<const c10::Error*>(&e)) {
    return c10e->what_without_backtrace();
  }
  return e.what();
}

// Runs f, turning any exception into an error of the given kind. `what` names the operation.
template <typename F>
inline simile_error* protect(int32_t kind, const char* what, F&& f) {
  try {
    f();
    return nullptr;
  } catch (const std::exception& e) {
    return make_error(kind, std::string(what) + ": " + message_of(e));
  } catch (...) {
    return make_error(kind, std::string(what) + ": unknown C++ exception");
  }
}

// Thrown inside protect() to pick another kind than the call's default.
struct KindError : std::runtime_error {
  int32_t kind;
  KindError(int32_t k, const std::string& m) : std::runtime_error(m), kind(k) {}
};

template <typename F>
inline simile_error* protect_kinds(int32_t kind, const char* what, F&& f) {
  try {
    f();
    return nullptr;
  } catch (const KindError& e) {
    return make_error(e.kind, std::string(what) + ": " + e.what());
  } catch (const std::exception& e) {
    return make_error(kind, std::string(what) + ": " + message_of(e));
  } catch (...) {
    return make_error(kind, std::string(what) + ": unknown C++ exception");
  }
}

inline std::chrono::milliseconds ms(int64_t v) { return std::chrono::milliseconds(v); }

}  // namespace simile_detail


struct simile_store {
  c10::intrusive_ptr<c10d::TCPStore> store;
};

struct simile_pg {
  c10::intrusive_ptr<c10d::Backend> backend;
  c10::DeviceType device;  // the device every tensor must be on (Gloo: the CPU)
  int32_t rank;
  int32_t size;
  std::chrono::milliseconds timeout;
};
