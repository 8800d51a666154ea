#include <dlfcn.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <map>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "kmsplugin/config/file_checks.h"
// Last: these include cryptoki.h.
#include "kmsplugin/keysource/pkcs11/errors.h"
#include "kmsplugin/keysource/pkcs11/module.h"

namespace kmsplugin::keysource::pkcs11 {

absl::StatusOr<std::shared_ptr<Module>> Module::Load(const std::string& path) {
  static absl::Mutex registry_mu(absl::kConstInit);
  static auto* registry = new std::map<std::string, std::weak_ptr<Module>>();
  absl::MutexLock lock(&registry_mu);
  if (auto it = registry->find(path); it != registry->end()) {
    if (auto module = it->second.lock()) {
      return module;
    }
  }
  // Loading a module runs its code (constructors first) with our privileges, often root's: it must be a regular
  // file that only root or the user we run as can change, and every directory on the way to it, as written and as
  // resolved, only writable by them (RUNBOOK 1e). With the whole chain trusted nobody else can swap the file
  // between the check and the load, so the loader gets the path. (Not /proc/self/fd/N: the loader matches an
  // already loaded object by that name, so a later module opened on a reused descriptor number would be answered
  // with the earlier one.)
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "cannot open PKCS#11 module ", path, ": ", std::strerror(errno),
        "; fix: set keySource.pkcs11.module to the path of the token's PKCS#11 library"));
  }
  struct stat info {};
  absl::Status trusted = fstat(fd, &info) == 0
                             ? config::CheckTrustedStat(info, path, "PKCS#11 module")
                             : absl::FailedPreconditionError(absl::StrCat("cannot stat PKCS#11 module ", path));
  if (!trusted.ok()) {
    close(fd);
    return trusted;
  }
  // The module stays mapped for the life of the process: unloading a PKCS#11 library that spawned threads or
  // registered atexit handlers is unsafe, and a later key source may load it again.
  close(fd);
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    const char* error = dlerror();
    return absl::FailedPreconditionError(
        absl::StrCat("cannot load PKCS#11 module ", path, ": ", error != nullptr ? error : "unknown error",
                     "; fix: set keySource.pkcs11.module to the path of the token's PKCS#11 library"));
  }
  auto get_function_list = reinterpret_cast<CK_C_GetFunctionList>(dlsym(handle, "C_GetFunctionList"));
  CK_FUNCTION_LIST_PTR functions = nullptr;
  if (get_function_list == nullptr || get_function_list(&functions) != CKR_OK || functions == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(
        "PKCS#11 module ", path, " has no usable C_GetFunctionList; fix: point keySource.pkcs11.module at a "
        "PKCS#11 library"));
  }
  auto module = std::shared_ptr<Module>(new Module(path, functions));
  if (auto status = module->InitialiseFirst(); !status.ok()) {
    return status;
  }
  (*registry)[path] = module;
  return module;
}

Module::~Module() {
  absl::WriterMutexLock lock(&call_mu_);
  if (initialised_ && owns_initialisation_) {
    functions_->C_Finalize(nullptr);
  }
}

absl::Status Module::Reinitialise(uint64_t observed_generation) {
  absl::WriterMutexLock lock(&call_mu_);
  if (initialised_ && generation_.load() != observed_generation) {
    return absl::OkStatus();
  }
  if (initialised_) {
    functions_->C_Finalize(nullptr);
    initialised_ = false;
  }
  const CK_RV rv = Initialise();
  if (rv != CKR_OK && rv != CKR_CRYPTOKI_ALREADY_INITIALIZED) {
    return absl::UnavailableError(absl::StrCat("C_Initialize of PKCS#11 module ", path_, " failed: ", Rv(rv)));
  }
  initialised_ = true;
  generation_.fetch_add(1);
  return absl::OkStatus();
}

CK_RV Module::Initialise() {
  CK_C_INITIALIZE_ARGS args{};
  args.flags = CKF_OS_LOCKING_OK;
  return functions_->C_Initialize(&args);
}

absl::Status Module::InitialiseFirst() {
  absl::WriterMutexLock lock(&call_mu_);
  const CK_RV rv = Initialise();
  if (rv == CKR_CRYPTOKI_ALREADY_INITIALIZED) {
    // Another component of the process initialised it: use it, but never finalise it at exit.
    owns_initialisation_ = false;
  } else if (rv != CKR_OK) {
    return absl::UnavailableError(absl::StrCat("C_Initialize of PKCS#11 module ", path_, " failed: ", Rv(rv),
                                               "; fix: check the module's configuration (for SoftHSM2, "
                                               "SOFTHSM2_CONF and its token directory)"));
  }
  initialised_ = true;
  generation_.store(1);
  return absl::OkStatus();
}

}  // namespace kmsplugin::keysource::pkcs11
