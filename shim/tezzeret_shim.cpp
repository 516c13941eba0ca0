// Tezzeret's C++ shim: the few TorchScript passes tch does not wrap.
//
// Every function catches every C++ exception and reports it as a malloc'd
// message through `err` (freed by the caller with free()), so no exception
// ever unwinds into Rust. Module pointers are `torch::jit::Module*` created
// with `new`, exactly as tch's libtch creates them, so `atm_free` frees ours.
#include <torch/script.h>
#include <torch/csrc/jit/api/module.h>

#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>

using torch::jit::Module;

namespace {

char *dup_message(const char *what) {
  size_t len = std::strlen(what);
  char *out = static_cast<char *>(std::malloc(len + 1));
  if (out != nullptr) {
    std::memcpy(out, what, len + 1);
  }
  return out;
}

template <typename F> void guarded(char **err, F &&body) {
  *err = nullptr;
  try {
    body();
  } catch (const std::exception &e) {
    *err = dup_message(e.what());
  } catch (...) {
    *err = dup_message("unknown C++ exception");
  }
}

} // namespace

extern "C" {

/// Freezes an eval-mode module (torch::jit::freeze): weights become graph
/// constants and the graph is simplified. Returns a new module or NULL.
Module *tz_shim_freeze(const Module *module, char **err) {
  Module *out = nullptr;
  guarded(err, [&] {
    Module copy = module->clone();
    copy.eval();
    out = new Module(torch::jit::freeze(copy, std::nullopt, true));
  });
  return out;
}

/// Applies torch::jit::optimize_for_inference (freezes first if needed).
Module *tz_shim_optimize_for_inference(const Module *module, char **err) {
  Module *out = nullptr;
  guarded(err, [&] {
    Module copy = module->clone();
    copy.eval();
    out = new Module(torch::jit::optimize_for_inference(copy));
  });
  return out;
}

/// Serialises a module (TorchScript zip archive) through a write callback.
void tz_shim_save(const Module *module, void *ctx,
                  void (*write)(void *ctx, const char *data, size_t len),
                  char **err) {
  guarded(err, [&] {
    std::ostringstream stream(std::ios::binary);
    module->save(stream);
    const std::string bytes = stream.str();
    write(ctx, bytes.data(), bytes.size());
  });
}

/// Sets whether the graph executor optimises (thread-local in libtorch).
void tz_shim_set_graph_executor_optimize(int enabled, char **err) {
  guarded(err, [&] { torch::jit::setGraphExecutorOptimize(enabled != 0); });
}

/// Returns a new reference-counted handle to the same module, or NULL.
Module *tz_shim_clone_handle(const Module *module, char **err) {
  Module *out = nullptr;
  guarded(err, [&] { out = new Module(*module); });
  return out;
}

/// Deliberately fails; lets tests prove exceptions never reach Rust.
void tz_shim_throw_for_test(char **err) {
  guarded(err, [&] { throw std::runtime_error("tezzeret shim self-test exception"); });
}

} // extern "C"
