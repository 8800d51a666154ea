#pragma once

// Shared by the PKCS#11 key source tests: a SoftHSM token per test, options for it, and the controls of the
// interposer module (pkcs11_interposer.cc) that counts C_Login calls and records GCM parameters.

#include <dlfcn.h>

#include <memory>
#include <stdexcept>
#include <string>

#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "kmsplugin/keysource/pkcs11/pkcs11_key_source.h"
#include "tests/support/softhsm_harness.h"

#include <catch2/catch.hpp>
#include "tests/support/status_matchers.h"

namespace kmsplugin::testing {

inline constexpr char kPin[] = "1234";
inline const std::string kAad = "kmsplugin/envelope/v1 test-env key-v1";

inline absl::Time Soon() { return absl::Now() + absl::Seconds(20); }

// Controls of the interposer module, found in the same dlopen handle the key source uses.
class Interposer {
 public:
  Interposer() {
    handle_ = dlopen(KMS_INTERPOSER_PATH, RTLD_NOW | RTLD_LOCAL);
    if (handle_ == nullptr) {
      throw std::runtime_error(std::string("cannot load interposer: ") + dlerror());
    }
    reset_ = reinterpret_cast<void (*)()>(dlsym(handle_, "kms_interposer_reset"));
    inject_ = reinterpret_cast<void (*)(const char*, unsigned long, int)>(dlsym(handle_, "kms_interposer_inject"));
    set_login_rv_ = reinterpret_cast<void (*)(unsigned long)>(dlsym(handle_, "kms_interposer_set_login_rv"));
    logout_ = reinterpret_cast<unsigned long (*)()>(dlsym(handle_, "kms_interposer_logout"));
    counter_ = reinterpret_cast<long (*)(const char*)>(dlsym(handle_, "kms_interposer_counter"));
    reset_();
  }
  ~Interposer() {
    reset_();
    dlclose(handle_);
  }
  static std::string Path() { return KMS_INTERPOSER_PATH; }
  void Inject(const char* function, unsigned long rv, int count = 1) { inject_(function, rv, count); }
  void SetLoginRv(unsigned long rv) { set_login_rv_(rv); }
  unsigned long Logout() { return logout_(); }
  long Count(const char* name) { return counter_(name); }

 private:
  void* handle_ = nullptr;
  void (*reset_)() = nullptr;
  void (*inject_)(const char*, unsigned long, int) = nullptr;
  void (*set_login_rv_)(unsigned long) = nullptr;
  unsigned long (*logout_)() = nullptr;
  long (*counter_)(const char*) = nullptr;
};

struct TokenFixture {
  SoftHsmHarness hsm;
  std::string serial;
  std::string pin_file;

  explicit TokenFixture(const std::string& label = "kms") {
    serial = hsm.InitToken(label, kPin);
    pin_file = hsm.WriteFile(label + ".pin", std::string(kPin) + "\n");
  }

  keysource::pkcs11::Pkcs11Options Options(const std::string& module = kSoftHsmModule,
                                           const std::string& token_label = "kms") const {
    keysource::pkcs11::Pkcs11Options options;
    options.module_path = module;
    options.token_label = token_label;
    options.pin_file = pin_file;
    options.key_label = "kmsplugin-test";
    options.session_pool_size = 4;
    options.reinit_backoff_initial = absl::Milliseconds(20);
    options.reinit_backoff_max = absl::Milliseconds(200);
    return options;
  }
};

}  // namespace kmsplugin::testing
