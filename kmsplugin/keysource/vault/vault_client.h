#pragma once

// VaultClient: authenticated Vault HTTP API calls with failover, retries and token upkeep.
//
// - Addresses are tried from the last one that answered; a transport failure, 5xx (sealed, standby without
//   leader) moves to the next address at once; when every address failed, the round is retried after an
//   exponential backoff with jitter (RetryOptions), like Vault's Go client. 429 and 412 are retried on the same
//   address after Retry-After (or the backoff). 400/403/404 and other 4xx are returned, never retried blindly.
//   At most one 307/302/301 is followed, never from https to http. Everything stays inside the caller's deadline;
//   with several addresses one attempt gets at most half of the remaining time, so a hanging server still leaves
//   room to fail over.
// - Auth: token file (re-read when it changes), AppRole, JWT/Kubernetes, TLS certificate. Tokens are renewed
//   (renew-self) at about two thirds of their TTL by a background thread, with backoff on failures, and a new
//   login happens before the lease runs out. A 403 leads to one re-login (or token-file re-read) and one retry
//   per call, never a loop.
// - The token lives in SecretBytes and never appears in a status message.
// Thread-safe.

#include <atomic>
#include <memory>
#include <string>
#include <string_view>
#include <thread>

#include <nlohmann/json.hpp>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "crypto/secret_bytes.h"
#include "kmsplugin/core/clock.h"
#include "kmsplugin/keysource/vault/http_transport.h"
#include "kmsplugin/keysource/vault/vault_options.h"

namespace kmsplugin::keysource::vault {

struct VaultResponse {
  long status = 0;
  nlohmann::json body;   // parsed JSON, or null
  std::string address;   // which address answered
  // Vault's "errors" joined with "; " (empty if none).
  std::string Errors() const;
};

// Refuses a credential file that group or others may access: FAILED_PRECONDITION naming the file and the fix.
absl::Status CheckCredentialFile(const std::string& path, absl::string_view what);
// Reads a credential file (after CheckCredentialFile) into SecretBytes, trailing whitespace trimmed.
absl::StatusOr<crypto::SecretBytes> ReadCredentialFile(const std::string& path, absl::string_view what);

class VaultClient {
 public:
  static absl::StatusOr<std::unique_ptr<VaultClient>> New(VaultOptions options, core::Clock* clock,
                                                          size_t max_concurrency);
  ~VaultClient();

  // Sends `method path` (path below /v1/, e.g. "transit/encrypt/k") with a JSON `body` (may be empty), with the
  // token when `authenticated`. Returns the final HTTP answer (any status) or UNAVAILABLE / DEADLINE_EXCEEDED /
  // PERMISSION_DENIED when no usable answer came. `body` may hold secrets: it is wiped.
  absl::StatusOr<VaultResponse> Call(absl::string_view method, absl::string_view path, std::string body,
                                     absl::Time deadline, bool authenticated = true);

  // Makes sure a token is in hand (login or token-file read plus lookup-self). Called at start.
  absl::Status Authenticate(absl::Time deadline);

  // Starts the renewal thread. `tick` runs on it every `tick_every` (0 = never), e.g. for metadata polling.
  void StartBackground(std::function<void()> tick, absl::Duration tick_every);
  void StopBackground();

  // Maps a non-2xx answer to a status: 400 INVALID_ARGUMENT, 403 PERMISSION_DENIED, 404 FAILED_PRECONDITION,
  // 429/5xx UNAVAILABLE. The message names `what`, the address, the status and Vault's errors.
  static absl::Status ErrorStatus(const VaultResponse& response, absl::string_view what);

  const VaultOptions& options() const { return options_; }
  // Seconds of token lifetime left (for metrics); InfiniteDuration for a non-expiring token.
  absl::Duration TokenTimeToLive() const;

 private:
  struct Attempt;
  VaultClient(VaultOptions options, core::Clock* clock, std::unique_ptr<HttpTransport> transport);

  // Failover + retries for one request; no auth handling.
  absl::StatusOr<VaultResponse> Send(absl::string_view method, absl::string_view path, const std::string& body,
                                     const crypto::SecretBytes* token, absl::Time deadline);
  HttpResponse SendOnce(const std::string& url, const std::string& connect_to, absl::string_view method,
                        const std::string& body, const crypto::SecretBytes* token, absl::Duration timeout,
                        absl::Time deadline);
  // The token to use now (re-reading the token file or logging in when needed), and its generation.
  absl::StatusOr<crypto::SecretBytes> CurrentToken(absl::Time deadline, uint64_t* generation);
  // After a 403 with the token of `generation`: one fresh credential. PERMISSION_DENIED if none.
  absl::Status Reauthenticate(absl::Time deadline, uint64_t generation, const VaultResponse& refused);
  absl::Status Login(absl::Time deadline) ABSL_EXCLUSIVE_LOCKS_REQUIRED(login_mu_);
  absl::Status LoadTokenFile(bool force, absl::Time deadline, bool* changed) ABSL_EXCLUSIVE_LOCKS_REQUIRED(file_mu_);
  absl::Status LookupSelf(absl::Time deadline);
  void SetLease(absl::Duration lease, bool renewable) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RenewOnce();
  void BackgroundLoop(std::function<void()> tick, absl::Duration tick_every);
  absl::Duration Backoff(int attempt) const;
  std::string AuthMountPath() const;

  const VaultOptions options_;
  core::Clock* const clock_;
  std::unique_ptr<HttpTransport> transport_;
  std::atomic<size_t> preferred_{0};

  absl::Mutex login_mu_;  // serialises logins; taken before file_mu_ and mu_
  absl::Mutex file_mu_;   // serialises token-file reads; taken before mu_
  mutable absl::Mutex mu_;
  crypto::SecretBytes token_ ABSL_GUARDED_BY(mu_);
  uint64_t generation_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Time expire_ ABSL_GUARDED_BY(mu_) = absl::InfiniteFuture();
  absl::Duration lease_ ABSL_GUARDED_BY(mu_) = absl::ZeroDuration();
  absl::Duration grace_ ABSL_GUARDED_BY(mu_) = absl::ZeroDuration();
  bool renewable_ ABSL_GUARDED_BY(mu_) = false;
  absl::Time renew_at_ ABSL_GUARDED_BY(mu_) = absl::InfiniteFuture();
  int renew_failures_ ABSL_GUARDED_BY(mu_) = 0;
  // Token file identity, to notice a change.
  int64_t file_mtime_ns_ ABSL_GUARDED_BY(file_mu_) = -1;
  int64_t file_size_ ABSL_GUARDED_BY(file_mu_) = -1;
  uint64_t file_inode_ ABSL_GUARDED_BY(file_mu_) = 0;

  absl::Mutex bg_mu_;
  bool stop_ ABSL_GUARDED_BY(bg_mu_) = false;
  std::thread background_;
};

}  // namespace kmsplugin::keysource::vault
