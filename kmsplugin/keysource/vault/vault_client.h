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
// - A standby's redirect is remembered: the active node it names is asked first by later calls, so a call costs
//   one request while the standby stays a standby. A configured address becomes the preferred one; any other
//   (https unless the standby itself was http) is kept in memory only, for this client's lifetime, and forgotten
//   as soon as it fails (then normal failover over the configured addresses resumes).
// - Auth: token file (its stamp checked at most once a second, re-read when it changes), AppRole, JWT/Kubernetes,
//   TLS certificate. Renewal is driven by the TTL Vault reports (renew-self's auth.lease_duration, lookup-self's
//   data.ttl), never by the local countdown alone: the background thread re-reads the TTL at least every poll
//   interval (1 min when polling is off) and more often as the end nears, renews at two thirds of the lease, and
//   when Vault says the token is invalid or expired it re-reads the token file or logs in again at once.
// - A 403 is told apart: "permission denied by policy" (the token is valid: lookup-self works; the message names
//   the path and the capability) from "token invalid or expired" (Vault's `invalid token`, or lookup-self refused),
//   which leads to one re-login (or token-file re-read) and one retry per call, never a loop.
// - Events (core::EventSink): failover, relogin, credential_reloaded, token_renewed; one per change, not per call.
// - The token lives in SecretBytes and never appears in a status message or an event.
// Thread-safe.

#include <atomic>
#include <functional>
#include <memory>
#include <optional>
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
#include "kmsplugin/core/events.h"
#include "kmsplugin/keysource/common/secret_file.h"
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

// Reads a credential file (token, role_id, secret_id, JWT) through keysource::ReadSecretFile: private, owned,
// printable, blanks trimmed. Every refusal is FAILED_PRECONDITION naming the file and the fix.
absl::StatusOr<keysource::SecretFile> ReadCredentialFile(const std::string& path, std::string_view what);

class VaultClient {
 public:
  // `events` may be null (NullEventSink); it must outlive the client.
  static absl::StatusOr<std::unique_ptr<VaultClient>> New(VaultOptions options, core::Clock* clock,
                                                          size_t max_concurrency, core::EventSink* events = nullptr);
  // The same over a given transport (the Vault response fuzz target's, which answers from its input).
  static absl::StatusOr<std::unique_ptr<VaultClient>> New(VaultOptions options, core::Clock* clock,
                                                          std::unique_ptr<HttpTransport> transport,
                                                          core::EventSink* events = nullptr);
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
  // What the background thread does on each wake-up: renews the token (or logs in again) when the renewal is
  // due, else re-reads its TTL when that is due, else nothing. Public so that a caller on a fake clock (the Vault
  // response fuzz target) can drive it without the thread.
  void UpkeepOnce();

  // Maps a non-2xx answer to a status: 400 INVALID_ARGUMENT, 403 PERMISSION_DENIED, 404 FAILED_PRECONDITION,
  // 429/5xx UNAVAILABLE. The message names `what`, the address, the status and Vault's errors.
  static absl::Status ErrorStatus(const VaultResponse& response, absl::string_view what);

  const VaultOptions& options() const { return options_; }
  // Seconds of token lifetime left (for metrics); InfiniteDuration for a non-expiring token.
  absl::Duration TokenTimeToLive() const;
  // Reports one event to the sink (never under a lock of ours).
  void Emit(const char* name, std::string message, std::vector<std::pair<std::string, std::string>> fields = {},
            bool warning = false) const;

 private:
  VaultClient(VaultOptions options, core::Clock* clock, std::unique_ptr<HttpTransport> transport,
              core::EventSink* events);

  // Failover + retries for one request; no auth handling.
  absl::StatusOr<VaultResponse> Send(absl::string_view method, absl::string_view path, const std::string& body,
                                     const crypto::SecretBytes* token, absl::Time deadline);
  HttpResponse SendOnce(const std::string& url, const std::string& connect_to, absl::string_view method,
                        const std::string& body, const crypto::SecretBytes* token, absl::Duration timeout,
                        absl::Time deadline);
  // After a redirect from `standby` was answered by `base`: prefer it from now on.
  void LearnActive(const std::string& standby, const std::string& base);
  // `address` answered: emits `failover` when it is not the one that answered before.
  void NoteAnswered(const std::string& address, absl::string_view reason);
  // The token to use now (re-reading the token file or logging in when needed), and its generation.
  absl::StatusOr<crypto::SecretBytes> CurrentToken(absl::Time deadline, uint64_t* generation);
  // After Vault said the token of `generation` is invalid or expired: one fresh credential. PERMISSION_DENIED
  // ("token invalid or expired") if none.
  absl::Status Reauthenticate(absl::Time deadline, uint64_t generation, const VaultResponse& refused);
  // A 403 without Vault's "invalid token": is the token still valid (lookup-self)? OK with its policies if it is,
  // PERMISSION_DENIED if Vault refuses it, other errors when Vault could not tell.
  absl::StatusOr<std::vector<std::string>> ProbeToken(const crypto::SecretBytes& token, absl::Time deadline);
  absl::Status Login(absl::Time deadline) ABSL_EXCLUSIVE_LOCKS_REQUIRED(login_mu_);
  // Re-reads the token file when its stamp changed (or `force`). `changed`: a different token than before.
  absl::Status LoadTokenFile(bool force, bool* changed) ABSL_EXCLUSIVE_LOCKS_REQUIRED(file_mu_);
  absl::Status LookupSelf(absl::Time deadline);
  // What Vault said about the token of `generation`: `remaining` TTL (0 = never expires), full `lease`.
  void Report(absl::Duration remaining, absl::Duration lease, bool renewable) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RenewOnce();
  void VerifyOnce();
  // Vault refused the token of `generation` as invalid/expired outside a call: re-read or log in again now.
  void TokenDead(uint64_t generation, absl::Time deadline);
  void BackgroundLoop(std::function<void()> tick, absl::Duration tick_every);
  absl::Duration Backoff(int attempt) const;
  absl::Duration CheckEvery() const;
  std::string AuthMountPath() const;
  std::string CredentialName() const;  // "the token from <file>", "the token from the AppRole login"

  const VaultOptions options_;
  core::Clock* const clock_;
  std::unique_ptr<HttpTransport> transport_;
  core::EventSink* const events_;
  std::atomic<size_t> preferred_{0};

  mutable absl::Mutex route_mu_;
  // An active node learnt from a standby's redirect that is not a configured address ("https://host:port").
  std::string remembered_ ABSL_GUARDED_BY(route_mu_);
  std::string last_answered_ ABSL_GUARDED_BY(route_mu_);

  absl::Mutex login_mu_;  // serialises logins; taken before file_mu_ and mu_
  absl::Mutex file_mu_;   // serialises token-file reads; taken before mu_
  mutable absl::Mutex mu_;
  crypto::SecretBytes token_ ABSL_GUARDED_BY(mu_);
  uint64_t generation_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Time expire_ ABSL_GUARDED_BY(mu_) = absl::InfiniteFuture();
  absl::Duration lease_ ABSL_GUARDED_BY(mu_) = absl::ZeroDuration();
  absl::Duration grace_ ABSL_GUARDED_BY(mu_) = absl::ZeroDuration();
  bool renewable_ ABSL_GUARDED_BY(mu_) = false;
  bool capped_ ABSL_GUARDED_BY(mu_) = false;  // renewals stopped extending the lease (max TTL)
  absl::Time renew_at_ ABSL_GUARDED_BY(mu_) = absl::InfiniteFuture();
  absl::Time verify_at_ ABSL_GUARDED_BY(mu_) = absl::InfiniteFuture();
  int renew_failures_ ABSL_GUARDED_BY(mu_) = 0;
  // Token file identity, to notice a change; checked at most once a second on the call path.
  std::optional<keysource::FileStamp> file_stamp_ ABSL_GUARDED_BY(file_mu_);
  absl::Time file_checked_ ABSL_GUARDED_BY(file_mu_) = absl::InfinitePast();
  // AppRole secret_id file stamp at the last login, to report a new secret_id once.
  std::optional<keysource::FileStamp> secret_stamp_ ABSL_GUARDED_BY(login_mu_);

  absl::Mutex bg_mu_;
  bool stop_ ABSL_GUARDED_BY(bg_mu_) = false;
  std::thread background_;
};

}  // namespace kmsplugin::keysource::vault
