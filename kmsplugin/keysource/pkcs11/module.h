#pragma once

// Module: one dlopen'ed PKCS#11 library per path, shared by every key source of the process. C_Initialize runs
// once (CKF_OS_LOCKING_OK: without it SoftHSM disables its own locks). A full re-initialisation (C_Finalize +
// C_Initialize) takes call_mu() as writer, so that no call of any key source is inside the module meanwhile;
// every other call into the module holds it as reader. generation() counts initialisations: a session or key
// handle of an older generation is gone. Internal to this folder (includes cryptoki.h). Thread-safe.

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "kmsplugin/keysource/pkcs11/cryptoki.h"

namespace kmsplugin::keysource::pkcs11 {

class Module {
 public:
  // The module at `path`, loaded and initialised on first use. FAILED_PRECONDITION when it cannot be loaded,
  // UNAVAILABLE when C_Initialize fails. The library stays mapped for the life of the process.
  static absl::StatusOr<std::shared_ptr<Module>> Load(const std::string& path);

  ~Module();
  Module(const Module&) = delete;
  Module& operator=(const Module&) = delete;

  CK_FUNCTION_LIST_PTR f() const { return functions_; }
  absl::Mutex& call_mu() ABSL_LOCK_RETURNED(call_mu_) { return call_mu_; }
  uint64_t generation() const { return generation_.load(); }
  const std::string& path() const { return path_; }

  // C_Finalize + C_Initialize, unless another key source already did it since `observed_generation`.
  absl::Status Reinitialise(uint64_t observed_generation);

 private:
  Module(std::string path, CK_FUNCTION_LIST_PTR functions) : path_(std::move(path)), functions_(functions) {}

  CK_RV Initialise() ABSL_EXCLUSIVE_LOCKS_REQUIRED(call_mu_);
  absl::Status InitialiseFirst();

  const std::string path_;
  CK_FUNCTION_LIST_PTR const functions_;
  absl::Mutex call_mu_;
  bool initialised_ ABSL_GUARDED_BY(call_mu_) = false;
  bool owns_initialisation_ = true;
  std::atomic<uint64_t> generation_{0};
};

}  // namespace kmsplugin::keysource::pkcs11
