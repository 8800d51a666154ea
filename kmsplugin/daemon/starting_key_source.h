#pragma once

// StartingKeySource: keeps an environment serving while its key source cannot be opened.
//
// One environment's trouble never stops another (ARCHITECTURE.md, "environments"): when an environment's key
// source cannot start (bad or revoked credentials, a missing key, an unreachable backend, a token not present),
// `serve` still starts every environment. This one then answers every call with UNAVAILABLE (PERMISSION_DENIED
// when the backend refused our credentials), naming the reason and the environment; its Status healthz, /readyz
// and kmsplugin_environment_healthy say so too, because the health probe runs through the same calls.
// A thread of its own tries to open it again every `retry_interval` (the poll interval), and at once when Refresh
// is called (SIGHUP), at most once a second; the attempt never runs on the caller's thread, so a backend that hangs
// for its whole open timeout does not hold up the poll loop that probes every other environment. Once it opens,
// every call goes to the real source, one `started` event says so, and the thread ends. Only errors in the
// configuration file itself stop `serve`. Destruction waits for an attempt under way (bounded by the key source's
// own open timeout).
// A refused credential (PERMISSION_DENIED: a wrong PIN, a revoked token) is tried again only after one of the key
// source's files (`files`: PIN, token, secret-id, certificates...) changed on disk: retrying a wrong PIN on every
// poll could lock or wipe a real token.
// Thread-safe.

#include <functional>
#include <memory>
#include <string>
#include <optional>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "kmsplugin/core/events.h"
#include "kmsplugin/core/key_source.h"
#include "kmsplugin/keysource/common/secret_file.h"

namespace kmsplugin::daemon {

class StartingKeySource final : public core::KeySource {
 public:
  using Opener = std::function<absl::StatusOr<std::shared_ptr<core::KeySource>>()>;

  // `first_error`: why the first open failed. `open` is tried again by the retry thread.
  // `on_started` (may be empty) runs on the retry thread once the source has started: the daemon re-probes then,
  // rather than at its next poll.
  StartingKeySource(std::string environment, crypto::KeySourceKind kind, Opener open, absl::Status first_error,
                    absl::Duration retry_interval, std::vector<std::string> files, core::EventSink& events,
                    std::function<void()> on_started = {});
  ~StartingKeySource() override;

  // Opens through `open`; on failure returns a StartingKeySource that keeps trying. Never fails.
  static std::shared_ptr<core::KeySource> OpenOrKeepTrying(std::string environment, crypto::KeySourceKind kind,
                                                           Opener open, absl::Duration retry_interval,
                                                           std::vector<std::string> files, core::EventSink& events,
                                                           std::function<void()> on_started = {});

  crypto::KeySourceKind Kind() const override { return kind_; }
  absl::StatusOr<core::KeyVersion> Current() const override;
  absl::StatusOr<std::string> Wrap(const core::KeyVersion& version, std::string_view plaintext,
                                   std::string_view associated_data, absl::Time deadline) override;
  absl::StatusOr<crypto::SecretBytes> Unwrap(std::string_view key_ref, std::string_view wrapped,
                                             std::string_view associated_data, absl::Time deadline) override;
  absl::StatusOr<core::KeyVersion> Lookup(std::string_view key_ref) const override;
  absl::Status Refresh(absl::Time deadline) override;
  absl::StatusOr<std::vector<core::KeyVersion>> Versions() const override;
  bool HealUnknown(std::string_view key_ref, absl::Time deadline) override;
  std::vector<core::BackendGauge> BackendGauges() const override;

  // The opened source, or nullptr while it has not started.
  std::shared_ptr<core::KeySource> Started() const;

 private:
  absl::Status NotStarted() const;
  absl::Status NotStartedLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RetryLoop();
  // Whether an attempt is worth making now: always, unless the last error refused our credentials and no file
  // changed since.
  bool WorthTrying(const absl::Status& last_error);

  const std::string environment_;
  const crypto::KeySourceKind kind_;
  const Opener open_;
  const absl::Duration retry_interval_;
  const std::vector<std::string> files_;
  const std::function<void()> on_started_;
  std::vector<std::optional<keysource::FileStamp>> stamps_;  // only the retry thread touches it
  core::EventSink& events_;
  mutable absl::Mutex mu_;
  std::shared_ptr<core::KeySource> started_ ABSL_GUARDED_BY(mu_);
  absl::Status error_ ABSL_GUARDED_BY(mu_);
  bool wake_ ABSL_GUARDED_BY(mu_) = false;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread retry_;
};

}  // namespace kmsplugin::daemon
