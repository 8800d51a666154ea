#pragma once

// The three backends the key-source contract (contract_test.cc) runs against, behind one small duck-typed
// interface, so each case is written once (TEMPLATE_TEST_CASE over LocalBackend, VaultBackend, Pkcs11Backend):
//
//   Instance Open(environment = "contract")   a new key source on this backend, as a second process would open
//                                              it (the backend starts with version 1 made)
//   Instance OpenServing()                     the same as the daemon opens it (background renewal where a source
//                                              has one), on the wall clock
//   GoAway() / ComeBack()                      the backend disappears and returns (keyring file moved away; the
//                                              Vault listener refuses connections; the SoftHSM token directory
//                                              moved away)
//   Hang() / Unhang()                          the backend accepts calls and never answers (Vault only; a no-op
//                                              where the backend cannot hang: kCanHang says which)
//   Freeze() / ServeFrozen(bool)               the backend shows, while on, the version listing it had at Freeze
//                                              (an older keyring copy put back; a lagging replica's key read; a
//                                              token listing that misses the objects made since)
//   ReplaceCredential(instance)                a new credential in the credential file, the old one no longer
//                                              accepted, and the source made to need it (new token / new PIN and a
//                                              logout; local: the root key file rewritten)
//   CredentialFile()                           the file holding the credential (token, PIN, root key)
//   UnknownKeyRef(version)                     a well-formed key_ref of a version this backend does not have
//   Secrets()                                  strings that must never appear in a status message
//   clock                                      the fake clock every Open()ed source runs on
//
// Traits: kName, kServesWhileAway (the local keyring keeps serving the loaded versions when the file vanishes),
// kBindsEnvironment (the source itself binds the environment name; the others bind it only through the AAD the
// core builds), kCanHang, kBlocksOnBackend (a call with a deadline already past is refused rather than served),
// kStages (each node holds its own copy of the versions, so the source stages, promotes and heals on an unknown
// newer version; Vault, one key shared by every node, refuses staging).

#include <dlfcn.h>
#include <p11-kit/pkcs11.h>
#include <sys/stat.h>

#include <cstdio>
#include <filesystem>
#include <map>
#include <fstream>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "crypto/random.h"
#include "kmsplugin/core/key_admin.h"
#include "kmsplugin/core/key_source.h"
#include "kmsplugin/keysource/local/keyring.h"
#include "kmsplugin/keysource/local/local_key_source.h"
#include "kmsplugin/keysource/pkcs11/pkcs11_key_source.h"
#include "kmsplugin/keysource/vault/vault_key_source.h"
#include "tests/keysource/contract/vault_proxy.h"
#include "tests/keysource/local/local_test_util.h"
#include "tests/keysource/vault/vault_test_server.h"
#include "tests/support/fake_clock.h"
#include "tests/support/softhsm_harness.h"
#include "tests/support/status_matchers.h"
#include "tests/support/temp_dir.h"

namespace kmsplugin::contract {

// One key source as a process holds it: the serving side and the admin side of the same object.
struct Instance {
  std::shared_ptr<core::KeySource> source;
  core::KeyAdmin* admin = nullptr;
  core::KeySource* operator->() const { return source.get(); }
};

template <typename T>
Instance MakeInstance(std::shared_ptr<T> source) {
  Instance instance;
  instance.admin = source.get();
  instance.source = std::move(source);
  return instance;
}

inline absl::Time Soon() { return absl::Now() + absl::Seconds(20); }

// Copies `from` over `to` atomically (a new inode, so every stamp changes).
inline void CopyOver(const std::string& from, const std::string& to) {
  const std::string tmp = to + ".copy-tmp";
  std::filesystem::copy_file(from, tmp, std::filesystem::copy_options::overwrite_existing);
  chmod(tmp.c_str(), 0600);
  REQUIRE(std::rename(tmp.c_str(), to.c_str()) == 0);
}

// ---------------------------------------------------------------------------------------------------------------
// local: a sealed keyring file and a root key file in a temp dir.

class LocalBackend {
 public:
  static constexpr const char* kName = "local";
  static constexpr bool kStages = true;
  static constexpr bool kServesWhileAway = true;
  static constexpr bool kBindsEnvironment = true;
  static constexpr bool kCanHang = false;
  static constexpr bool kBlocksOnBackend = false;

  LocalBackend() : world_(dir_, "contract") { keysource::local::testing::MustInit(world_.Options(), clock); }

  Instance Open(const std::string& environment = "contract") { return OpenOn(environment, clock); }
  Instance OpenServing() { return OpenOn("contract", core::SystemClock()); }

  void GoAway() { REQUIRE(std::rename(world_.keyring.c_str(), Away().c_str()) == 0); }
  void ComeBack() { REQUIRE(std::rename(Away().c_str(), world_.keyring.c_str()) == 0); }
  void Hang() {}
  void Unhang() {}

  void Freeze() { std::filesystem::copy_file(world_.keyring, dir_.File("frozen"),
                                             std::filesystem::copy_options::overwrite_existing); }
  void ServeFrozen(bool on) {
    if (on) {
      std::filesystem::copy_file(world_.keyring, dir_.File("newest"),
                                 std::filesystem::copy_options::overwrite_existing);
      CopyOver(dir_.File("frozen"), world_.keyring);
    } else {
      CopyOver(dir_.File("newest"), world_.keyring);
    }
  }

  // The root key cannot change under a keyring sealed with it: the same key, rewritten as a new file.
  void ReplaceCredential(Instance&) { CopyOver(world_.root_key, world_.root_key); }
  std::string CredentialFile() const { return world_.root_key; }

  std::string UnknownKeyRef(const core::KeyVersion& known) const {
    return keysource::local::MakeKeyRef(known.key_ref.substr(0, keysource::local::kKeyringIdSize),
                                        known.version + 50);
  }

  std::vector<std::string> Secrets() const {
    const std::string key = testing::ReadWholeFile(world_.root_key);
    return {key, absl::BytesToHexString(key), absl::Base64Escape(key)};
  }

  testing::FakeClock clock;

 private:
  Instance OpenOn(const std::string& environment, core::Clock& on) {
    auto source = keysource::local::LocalKeySource::Open(world_.Options(), environment, on,
                                                         crypto::SystemRandom());
    REQUIRE_THAT(source, testing::IsOk());
    return MakeInstance(*source);
  }
  std::string Away() const { return world_.keyring + ".away"; }

  keysource::local::testing::TempDir dir_;
  keysource::local::testing::LocalWorld world_;
};

// ---------------------------------------------------------------------------------------------------------------
// vault: the Vault-API test server (plain HTTP on loopback) behind VaultProxy, token auth from a token file.

inline constexpr char kVaultToken[] = "hvs.CONTRACT-token-5d1e9a";
inline constexpr char kVaultToken2[] = "hvs.CONTRACT-second-7b3c44";

class VaultBackend {
 public:
  static constexpr const char* kName = "vault";
  static constexpr bool kStages = false;
  static constexpr bool kServesWhileAway = false;
  static constexpr bool kBindsEnvironment = false;
  static constexpr bool kCanHang = true;
  static constexpr bool kBlocksOnBackend = true;

  VaultBackend() : server_(PlainHttp()), dir_(testing::MakeTempDir()) {
    server_.Control({{"create_key", {{"name", "kms"}}}});
    server_.Control({{"add_token", {{"id", kVaultToken}, {"ttl", 0}, {"renewable", true}, {"max_ttl", 0}}}});
    proxy_ = std::make_unique<testing::VaultProxy>(server_.Port(), "/v1/transit/keys/kms");
    options_.addresses = {proxy_->Address()};
    options_.key_name = "kms";
    options_.auth.kind = keysource::vault::AuthKind::kToken;
    options_.auth.token_file = dir_ + "/token";
    testing::WriteFile(options_.auth.token_file, std::string(kVaultToken) + "\n");
    options_.request_timeout = absl::Seconds(3);
    options_.retry.min_wait = absl::Milliseconds(10);
    options_.retry.max_wait = absl::Milliseconds(50);
    options_.poll_interval = absl::ZeroDuration();
  }
  ~VaultBackend() {
    Unhang();  // no proxy thread may stay blocked on the server
    proxy_.reset();
  }

  Instance Open(const std::string& /*environment*/ = "contract") { return OpenOn(options_, &clock, false); }
  Instance OpenServing() {
    keysource::vault::VaultOptions options = options_;
    options.poll_interval = absl::Seconds(1);
    return OpenOn(options, &core::SystemClock(), true);
  }
  Instance OpenWith(const keysource::vault::VaultOptions& options, bool background) {
    return OpenOn(options, &core::SystemClock(), background);
  }

  void GoAway() { proxy_->Stop(); }
  void ComeBack() { proxy_->Start(); }
  void Hang() {
    server_.Control({{"hang", true}});
    hanging_ = true;
  }
  void Unhang() {
    if (hanging_) {
      server_.Control({{"hang", false}});
      hanging_ = false;
    }
  }
  void Freeze() { proxy_->Freeze(); }
  void ServeFrozen(bool on) { proxy_->ServeFrozen(on); }

  void ReplaceCredential(Instance&) {
    server_.Control({{"revoke_tokens", true}});
    server_.Control({{"add_token", {{"id", kVaultToken2}, {"ttl", 0}, {"renewable", true}, {"max_ttl", 0}}}});
    testing::WriteFile(options_.auth.token_file, std::string(kVaultToken2) + "\n");
  }
  std::string CredentialFile() const { return options_.auth.token_file; }

  std::string UnknownKeyRef(const core::KeyVersion& known) const {
    return absl::StrCat("v", known.version + 50, "@", absl::ToUnixSeconds(known.created));
  }

  std::vector<std::string> Secrets() const {
    return {kVaultToken, kVaultToken2, "root-setup-token", "CONTRACT-secret-id-93f0"};
  }

  testing::VaultTestServer& server() { return server_; }
  const keysource::vault::VaultOptions& options() const { return options_; }
  std::string dir() const { return dir_; }

  testing::FakeClock clock;

 private:
  static testing::VaultTestServer::Options PlainHttp() {
    testing::VaultTestServer::Options options;
    options.tls = false;
    return options;
  }
  Instance OpenOn(const keysource::vault::VaultOptions& options, core::Clock* on, bool background) {
    auto source = keysource::vault::VaultKeySource::Open(options, on, 4, background);
    REQUIRE_THAT(source, testing::IsOk());
    return MakeInstance(*source);
  }

  testing::VaultTestServer server_;
  std::string dir_;
  std::unique_ptr<testing::VaultProxy> proxy_;
  keysource::vault::VaultOptions options_;
  bool hanging_ = false;
};

// ---------------------------------------------------------------------------------------------------------------
// pkcs11: a real SoftHSM2 token in a private directory.

inline constexpr char kPin[] = "CONTRACT-pin-4187";
inline constexpr char kPin2[] = "CONTRACT-pin-second-6620";

// Raw access to the token through the module the key sources of this process initialised (so call it only after
// one was opened): hides objects from listings by relabelling them, changes the PIN, logs the application out.
class TokenPeek {
 public:
  TokenPeek() {
    void* handle = dlopen(testing::kSoftHsmModule, RTLD_NOW | RTLD_LOCAL);
    REQUIRE(handle != nullptr);
    auto get = reinterpret_cast<CK_C_GetFunctionList>(dlsym(handle, "C_GetFunctionList"));
    REQUIRE(get(&f_) == CKR_OK);
    CK_ULONG count = 0;
    REQUIRE(f_->C_GetSlotList(CK_TRUE, nullptr, &count) == CKR_OK);
    std::vector<CK_SLOT_ID> slots(count);
    REQUIRE(f_->C_GetSlotList(CK_TRUE, slots.data(), &count) == CKR_OK);
    for (CK_SLOT_ID slot : slots) {
      CK_TOKEN_INFO info{};
      f_->C_GetTokenInfo(slot, &info);
      std::string label(reinterpret_cast<char*>(info.label), sizeof(info.label));
      label.erase(label.find_last_not_of(' ') + 1);
      if (label == "kms") {
        REQUIRE(f_->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr, &session_) == CKR_OK);
        return;
      }
    }
    FAIL("token kms not found");
  }
  ~TokenPeek() { f_->C_CloseSession(session_); }

  // CKA_ID and CKA_LABEL of every AES key object.
  std::vector<std::pair<std::string, std::string>> Objects() {
    CK_OBJECT_CLASS klass = CKO_SECRET_KEY;
    CK_ATTRIBUTE query[] = {{CKA_CLASS, &klass, sizeof(klass)}};
    REQUIRE(f_->C_FindObjectsInit(session_, query, 1) == CKR_OK);
    CK_OBJECT_HANDLE found[64];
    CK_ULONG count = 0;
    REQUIRE(f_->C_FindObjects(session_, found, 64, &count) == CKR_OK);
    f_->C_FindObjectsFinal(session_);
    std::vector<std::pair<std::string, std::string>> out;
    for (CK_ULONG i = 0; i < count; ++i) {
      out.emplace_back(Get(found[i], CKA_ID), Get(found[i], CKA_LABEL));
      handles_[out.back().first] = found[i];
    }
    return out;
  }
  void SetLabel(const std::string& id, const std::string& label) {
    CK_ATTRIBUTE attribute{CKA_LABEL, const_cast<char*>(label.data()), label.size()};
    REQUIRE(f_->C_SetAttributeValue(session_, handles_.at(id), &attribute, 1) == CKR_OK);
  }
  void Login(const std::string& pin) {
    const CK_RV rv = f_->C_Login(session_, CKU_USER, (CK_UTF8CHAR_PTR)pin.data(), pin.size());
    REQUIRE((rv == CKR_OK || rv == CKR_USER_ALREADY_LOGGED_IN));
  }
  void SetPin(const std::string& old_pin, const std::string& new_pin) {
    REQUIRE(f_->C_SetPIN(session_, (CK_UTF8CHAR_PTR)old_pin.data(), old_pin.size(), (CK_UTF8CHAR_PTR)new_pin.data(),
                         new_pin.size()) == CKR_OK);
  }
  void Logout() { f_->C_Logout(session_); }

 private:
  std::string Get(CK_OBJECT_HANDLE object, CK_ATTRIBUTE_TYPE type) {
    CK_ATTRIBUTE attribute{type, nullptr, 0};
    REQUIRE(f_->C_GetAttributeValue(session_, object, &attribute, 1) == CKR_OK);
    std::string value(attribute.ulValueLen, '\0');
    attribute.pValue = value.data();
    REQUIRE(f_->C_GetAttributeValue(session_, object, &attribute, 1) == CKR_OK);
    return value;
  }

  CK_FUNCTION_LIST_PTR f_ = nullptr;
  CK_SESSION_HANDLE session_ = CK_INVALID_HANDLE;
  std::map<std::string, CK_OBJECT_HANDLE> handles_;
};

class Pkcs11Backend {
 public:
  static constexpr const char* kName = "pkcs11";
  static constexpr bool kStages = true;
  static constexpr bool kServesWhileAway = false;
  static constexpr bool kBindsEnvironment = false;
  static constexpr bool kCanHang = false;
  static constexpr bool kBlocksOnBackend = true;

  Pkcs11Backend() {
    hsm_.InitToken("kms", kPin);
    pin_file_ = hsm_.WriteFile("kms.pin", std::string(kPin) + "\n");
    // Version 1, made as `kmsplugin init` would.
    Instance first = Open();
    REQUIRE_THAT(first.admin->Rotate(Soon()), testing::IsOk());
    clock.Advance(absl::Seconds(1));
  }
  ~Pkcs11Backend() { peek_.reset(); }

  Instance Open(const std::string& /*environment*/ = "contract") { return OpenOn(&clock); }
  Instance OpenServing() { return OpenOn(&core::SystemClock()); }

  void GoAway() { REQUIRE(std::rename(hsm_.token_dir().c_str(), Away().c_str()) == 0); }
  void ComeBack() { REQUIRE(std::rename(Away().c_str(), hsm_.token_dir().c_str()) == 0); }
  void Hang() {}
  void Unhang() {}

  void Freeze() {
    frozen_.clear();
    for (const auto& [id, label] : Peek().Objects()) {
      frozen_.insert(id);
    }
  }
  void ServeFrozen(bool on) {
    if (on) {
      hidden_.clear();
      for (const auto& [id, label] : Peek().Objects()) {
        if (frozen_.count(id) == 0) {
          hidden_.emplace_back(id, label);
          Peek().SetLabel(id, "hidden-" + label);
        }
      }
    } else {
      Peek().Objects();
      for (const auto& [id, label] : hidden_) {
        Peek().SetLabel(id, label);
      }
      hidden_.clear();
    }
  }

  // A new PIN on the token and in the PIN file, then a logout: the source must log in again, with the new PIN.
  void ReplaceCredential(Instance&) {
    Peek().Login(kPin);
    Peek().SetPin(kPin, kPin2);
    hsm_.WriteFile("kms.pin", std::string(kPin2) + "\n");
    Peek().Logout();
  }
  std::string CredentialFile() const { return pin_file_; }

  std::string UnknownKeyRef(const core::KeyVersion& known) const {
    return keysource::pkcs11::EncodeKeyRef(known.version + 50, known.created);
  }

  std::vector<std::string> Secrets() const { return {kPin, kPin2}; }

  testing::FakeClock clock;

 private:
  Instance OpenOn(core::Clock* on) {
    keysource::pkcs11::Pkcs11Options options;
    options.module_path = testing::kSoftHsmModule;
    options.token_label = "kms";
    options.pin_file = pin_file_;
    options.key_label = "kmsplugin-contract";
    options.session_pool_size = 4;
    options.clock = on;
    options.reinit_backoff_initial = absl::Milliseconds(20);
    options.reinit_backoff_max = absl::Milliseconds(200);
    auto source = keysource::pkcs11::Pkcs11KeySource::Open(options, Soon());
    REQUIRE_THAT(source, testing::IsOk());
    return MakeInstance(std::shared_ptr<keysource::pkcs11::Pkcs11KeySource>(std::move(*source)));
  }
  TokenPeek& Peek() {
    if (peek_ == nullptr) {
      peek_ = std::make_unique<TokenPeek>();
    }
    return *peek_;
  }
  std::string Away() const { return hsm_.dir() + "/tokens.away"; }

  testing::SoftHsmHarness hsm_;
  std::string pin_file_;
  std::unique_ptr<TokenPeek> peek_;
  std::set<std::string> frozen_;
  std::vector<std::pair<std::string, std::string>> hidden_;
};

}  // namespace kmsplugin::contract
