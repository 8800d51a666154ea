#pragma once

// FakeKeySource: an in-memory core::KeySource for EnvelopeService tests. Never use outside tests.
//
// - Versions are added by hand (AddVersion / Rotate); the newest added is current, older ones become active.
//   SetState() retires (or otherwise changes) a version.
// - Wrap is a toy authenticated cipher (SHA-256 keystream + HMAC-SHA256 tag over nonce, body, key_ref and the
//   associated data), so wrong associated data, another version's key_ref and tampered bytes are all refused
//   with INVALID_ARGUMENT, as a real key source would.
// - Failures are injectable per call: FailNext(call, status, times) fails the next `times` calls,
//   FailAlways(call, status) until ClearFailures(). A failing call is still counted.
// - Calls(call) counts every call by kind. Thread-safe.

#include <openssl/hmac.h>
#include <openssl/sha.h>

#include <cstdint>
#include <deque>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "crypto/envelope_format.h"
#include "crypto/secret_bytes.h"
#include "kmsplugin/core/key_admin.h"
#include "kmsplugin/core/key_source.h"
#include "kmsplugin/core/version_rules.h"
#include "kmsplugin/core/sv.h"

namespace kmsplugin::testing {

class FakeKeySource : public core::KeySource, public core::KeyAdmin {
 public:
  enum class Call { kCurrent, kWrap, kUnwrap, kLookup, kRefresh, kRotate, kVersions, kRetire, kReinstate };

  static constexpr size_t kNonceSize = 8;
  static constexpr size_t kTagSize = 32;

  explicit FakeKeySource(std::string name = "fake", crypto::KeySourceKind kind = crypto::KeySourceKind::kLocal)
      : name_(std::move(name)), kind_(kind) {}

  // Appends version N+1 as current (the former current becomes active). Returns it.
  core::KeyVersion AddVersion(absl::Time created = absl::FromUnixSeconds(1'800'000'000)) {
    absl::MutexLock lock(&mu_);
    return AddVersionLocked(created);
  }

  // Sets the state of `version` (1-based). A version made current demotes the former current to active.
  void SetState(uint64_t version, core::KeyState state) {
    absl::MutexLock lock(&mu_);
    for (core::KeyVersion& v : versions_) {
      if (state == core::KeyState::kCurrent && v.state == core::KeyState::kCurrent) {
        v.state = core::KeyState::kActive;
      }
    }
    versions_.at(version - 1).state = state;
  }

  void FailNext(Call call, absl::Status status, int times = 1) {
    absl::MutexLock lock(&mu_);
    for (int i = 0; i < times; ++i) {
      next_failures_[call].push_back(status);
    }
  }
  void FailAlways(Call call, absl::Status status) {
    absl::MutexLock lock(&mu_);
    sticky_failures_[call] = std::move(status);
  }
  void ClearFailures() {
    absl::MutexLock lock(&mu_);
    next_failures_.clear();
    sticky_failures_.clear();
  }
  // Unwrap authenticates but returns these bytes instead of the plaintext (a broken backend).
  void SetUnwrapOverride(std::optional<std::string> bytes) {
    absl::MutexLock lock(&mu_);
    unwrap_override_ = std::move(bytes);
  }

  int Calls(Call call) const {
    absl::MutexLock lock(&mu_);
    auto it = calls_.find(call);
    return it == calls_.end() ? 0 : it->second;
  }
  // The last deadline Wrap or Unwrap was given.
  absl::Time LastDeadline() const {
    absl::MutexLock lock(&mu_);
    return last_deadline_;
  }

  std::string KeyRefFor(uint64_t version) const { return absl::StrCat("fake/", name_, "/v", version); }

  // core::KeySource
  crypto::KeySourceKind Kind() const override { return kind_; }

  absl::StatusOr<core::KeyVersion> Current() const override {
    absl::MutexLock lock(&mu_);
    if (auto status = Enter(Call::kCurrent); !status.ok()) {
      return status;
    }
    for (const core::KeyVersion& v : versions_) {
      if (v.state == core::KeyState::kCurrent) {
        return v;
      }
    }
    return absl::FailedPreconditionError(absl::StrCat("fake key source ", name_, " has no current version"));
  }

  absl::StatusOr<std::string> Wrap(const core::KeyVersion& version, std::string_view plaintext,
                                   std::string_view associated_data, absl::Time deadline) override {
    absl::MutexLock lock(&mu_);
    last_deadline_ = deadline;
    if (auto status = Enter(Call::kWrap); !status.ok()) {
      return status;
    }
    const core::KeyVersion* v = FindLocked(version.key_ref);
    if (v == nullptr) {
      return absl::FailedPreconditionError("fake: wrap under an unknown version");
    }
    if (v->state == core::KeyState::kRetired) {
      return absl::FailedPreconditionError("fake: wrap under a retired version");
    }
    std::string nonce(kNonceSize, '\0');
    const uint64_t counter = ++nonce_counter_;
    for (size_t i = 0; i < kNonceSize; ++i) {
      nonce[i] = static_cast<char>((counter >> (8 * i)) & 0xff);
    }
    std::string body = Xor(v->key_ref, nonce, plaintext);
    std::string wrapped = nonce + body;
    wrapped += Tag(v->key_ref, nonce, body, associated_data);
    return wrapped;
  }

  absl::StatusOr<crypto::SecretBytes> Unwrap(std::string_view key_ref, std::string_view wrapped,
                                             std::string_view associated_data, absl::Time deadline) override {
    absl::MutexLock lock(&mu_);
    last_deadline_ = deadline;
    if (auto status = Enter(Call::kUnwrap); !status.ok()) {
      return status;
    }
    const core::KeyVersion* v = FindLocked(key_ref);
    if (v == nullptr) {
      return absl::FailedPreconditionError("fake: unwrap under an unknown version");
    }
    if (v->state == core::KeyState::kRetired) {
      return absl::FailedPreconditionError("fake: unwrap under a retired version");
    }
    if (wrapped.size() < kNonceSize + kTagSize) {
      return absl::InvalidArgumentError("fake: wrapped bytes are too short");
    }
    const std::string_view nonce = wrapped.substr(0, kNonceSize);
    const std::string_view body = wrapped.substr(kNonceSize, wrapped.size() - kNonceSize - kTagSize);
    const std::string_view tag = wrapped.substr(wrapped.size() - kTagSize);
    if (Tag(v->key_ref, nonce, body, associated_data) != tag) {
      return absl::InvalidArgumentError("fake: wrapped bytes do not authenticate");
    }
    if (unwrap_override_.has_value()) {
      return crypto::SecretBytes::CopyOf(*unwrap_override_);
    }
    return crypto::SecretBytes::CopyOf(Xor(v->key_ref, nonce, body));
  }

  absl::StatusOr<core::KeyVersion> Lookup(std::string_view key_ref) const override {
    absl::MutexLock lock(&mu_);
    if (auto status = Enter(Call::kLookup); !status.ok()) {
      return status;
    }
    const core::KeyVersion* v = FindLocked(key_ref);
    if (v == nullptr) {
      return absl::NotFoundError(absl::StrCat("fake key source ", name_, " has no such version"));
    }
    return *v;
  }

  absl::Status Refresh(absl::Time /*deadline*/) override {
    absl::MutexLock lock(&mu_);
    return Enter(Call::kRefresh);
  }

  absl::StatusOr<core::KeyVersion> Rotate(absl::Time /*deadline*/) override {
    absl::MutexLock lock(&mu_);
    if (auto status = Enter(Call::kRotate); !status.ok()) {
      return status;
    }
    return AddVersionLocked(absl::FromUnixSeconds(1'800'000'000));
  }

  absl::StatusOr<std::vector<core::KeyVersion>> Versions() const override {
    absl::MutexLock lock(&mu_);
    if (auto status = Enter(Call::kVersions); !status.ok()) {
      return status;
    }
    return versions_;
  }

  absl::StatusOr<std::vector<core::KeyVersion>> Retire(uint64_t version, absl::Time /*deadline*/) override {
    absl::MutexLock lock(&mu_);
    if (auto status = Enter(Call::kRetire); !status.ok()) {
      return status;
    }
    return SetStatesLocked(core::VersionsToRetire(versions_, version), core::KeyState::kRetired);
  }

  absl::StatusOr<std::vector<core::KeyVersion>> Reinstate(uint64_t version, absl::Time /*deadline*/) override {
    absl::MutexLock lock(&mu_);
    if (auto status = Enter(Call::kReinstate); !status.ok()) {
      return status;
    }
    return SetStatesLocked(core::VersionsToReinstate(versions_, version), core::KeyState::kActive);
  }

 private:
  core::KeyVersion AddVersionLocked(absl::Time created) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    for (core::KeyVersion& v : versions_) {
      if (v.state == core::KeyState::kCurrent) {
        v.state = core::KeyState::kActive;
      }
    }
    core::KeyVersion v;
    v.version = versions_.size() + 1;
    v.created = created;
    v.key_id = absl::StrCat("fake:", name_, ":v", v.version, ":", absl::ToUnixSeconds(created));
    v.key_ref = KeyRefFor(v.version);
    v.state = core::KeyState::kCurrent;
    versions_.push_back(v);
    return v;
  }

  absl::StatusOr<std::vector<core::KeyVersion>> SetStatesLocked(absl::StatusOr<std::vector<core::KeyVersion>> picked,
                                                                 core::KeyState state)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!picked.ok()) {
      return picked;
    }
    for (core::KeyVersion& pick : *picked) {
      versions_.at(pick.version - 1).state = state;
      pick.state = state;
    }
    return picked;
  }

  const core::KeyVersion* FindLocked(std::string_view key_ref) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    for (const core::KeyVersion& v : versions_) {
      if (v.key_ref == key_ref) {
        return &v;
      }
    }
    return nullptr;
  }

  // Counts the call and returns the injected failure, if any.
  absl::Status Enter(Call call) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    ++calls_[call];
    auto next = next_failures_.find(call);
    if (next != next_failures_.end() && !next->second.empty()) {
      absl::Status status = next->second.front();
      next->second.pop_front();
      return status;
    }
    auto sticky = sticky_failures_.find(call);
    if (sticky != sticky_failures_.end()) {
      return sticky->second;
    }
    return absl::OkStatus();
  }

  // The version's (non-secret, test-only) key: SHA-256 of its key_ref.
  static std::string KeyFor(std::string_view key_ref) {
    uint8_t digest[SHA256_DIGEST_LENGTH];
    const std::string input = absl::StrCat("fake-key/", Sv(key_ref));
    SHA256(reinterpret_cast<const uint8_t*>(input.data()), input.size(), digest);
    return std::string(reinterpret_cast<const char*>(digest), sizeof(digest));
  }

  static std::string Xor(std::string_view key_ref, std::string_view nonce, std::string_view data) {
    const std::string key = KeyFor(key_ref);
    std::string out(data);
    uint8_t block[SHA256_DIGEST_LENGTH];
    for (size_t i = 0; i < out.size(); ++i) {
      if (i % sizeof(block) == 0) {
        const std::string input = absl::StrCat(key, Sv(nonce), i / sizeof(block));
        SHA256(reinterpret_cast<const uint8_t*>(input.data()), input.size(), block);
      }
      out[i] = static_cast<char>(out[i] ^ block[i % sizeof(block)]);
    }
    return out;
  }

  static std::string Tag(std::string_view key_ref, std::string_view nonce, std::string_view body,
                         std::string_view associated_data) {
    const std::string key = KeyFor(key_ref);
    const std::string input = absl::StrCat(Sv(nonce), body.size(), ":", Sv(body), associated_data.size(), ":",
                                           Sv(associated_data));
    uint8_t mac[EVP_MAX_MD_SIZE];
    unsigned int mac_size = 0;
    HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()), reinterpret_cast<const uint8_t*>(input.data()),
         input.size(), mac, &mac_size);
    return std::string(reinterpret_cast<const char*>(mac), mac_size);
  }

  const std::string name_;
  const crypto::KeySourceKind kind_;
  mutable absl::Mutex mu_;
  std::vector<core::KeyVersion> versions_ ABSL_GUARDED_BY(mu_);
  mutable std::map<Call, int> calls_ ABSL_GUARDED_BY(mu_);
  mutable std::map<Call, std::deque<absl::Status>> next_failures_ ABSL_GUARDED_BY(mu_);
  std::map<Call, absl::Status> sticky_failures_ ABSL_GUARDED_BY(mu_);
  std::optional<std::string> unwrap_override_ ABSL_GUARDED_BY(mu_);
  uint64_t nonce_counter_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Time last_deadline_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
};

}  // namespace kmsplugin::testing
