#pragma once

// GatedKeySource: wraps a real key source; while the gate is closed, Wrap and Unwrap block until it opens or the
// call's deadline passes (then DEADLINE_EXCEEDED), as a stalled Vault or HSM would. It reports itself as a vault
// source, so the server treats it as one that may block (the local keyring never does, and is served inline).
// Counts the Wrap/Unwrap calls that reached it and how many are blocked now. For server tests only. Thread-safe.

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "kmsplugin/core/key_source.h"

namespace kmsplugin::testing {

class GatedKeySource final : public core::KeySource {
 public:
  explicit GatedKeySource(std::shared_ptr<core::KeySource> inner) : inner_(std::move(inner)) {}

  void Close() {
    absl::MutexLock lock(&mu_);
    open_ = false;
  }
  void Open() {
    absl::MutexLock lock(&mu_);
    open_ = true;
  }
  int Calls() const {
    absl::MutexLock lock(&mu_);
    return calls_;
  }
  // Waits (up to `timeout`) until `n` calls are blocked at the gate; true when they are.
  bool AwaitBlocked(int n, absl::Duration timeout) const {
    absl::MutexLock lock(&mu_);
    auto enough = [this, n]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return blocked_ >= n; };
    return mu_.AwaitWithTimeout(absl::Condition(&enough), timeout);
  }

  crypto::KeySourceKind Kind() const override { return crypto::KeySourceKind::kVault; }
  absl::StatusOr<core::KeyVersion> Current() const override { return inner_->Current(); }
  absl::StatusOr<std::string> Wrap(const core::KeyVersion& version, std::string_view plaintext,
                                   std::string_view associated_data, absl::Time deadline) override {
    if (auto status = Pass(deadline); !status.ok()) {
      return status;
    }
    return inner_->Wrap(version, plaintext, associated_data, deadline);
  }
  absl::StatusOr<crypto::SecretBytes> Unwrap(std::string_view key_ref, std::string_view wrapped,
                                             std::string_view associated_data, absl::Time deadline) override {
    if (auto status = Pass(deadline); !status.ok()) {
      return status;
    }
    return inner_->Unwrap(key_ref, wrapped, associated_data, deadline);
  }
  absl::StatusOr<core::KeyVersion> Lookup(std::string_view key_ref) const override { return inner_->Lookup(key_ref); }
  absl::Status Refresh(absl::Time deadline) override { return inner_->Refresh(deadline); }
  absl::StatusOr<std::vector<core::KeyVersion>> Versions() const override { return inner_->Versions(); }

 private:
  absl::Status Pass(absl::Time deadline) {
    absl::MutexLock lock(&mu_);
    ++calls_;
    ++blocked_;
    auto open = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return open_; };
    const bool passed = mu_.AwaitWithDeadline(absl::Condition(&open), deadline);
    --blocked_;
    return passed ? absl::OkStatus() : absl::DeadlineExceededError("gated key source: the gate stayed closed");
  }

  const std::shared_ptr<core::KeySource> inner_;
  mutable absl::Mutex mu_;
  bool open_ ABSL_GUARDED_BY(mu_) = true;
  int calls_ ABSL_GUARDED_BY(mu_) = 0;
  int blocked_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace kmsplugin::testing
