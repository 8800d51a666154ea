#pragma once

// Pkcs11KeySource: the KEK lives in a PKCS#11 token (an HSM; SoftHSM2 in tests) and never leaves it.
//
// - The module is loaded with dlopen and initialised once per process (CKF_OS_LOCKING_OK); the token is found
//   by label or serial, never by slot number. The PIN comes from a file of mode 0600 or stricter and is kept in
//   SecretBytes; it never appears in a message.
// - Each key version is a token object: AES-256, CKA_TOKEN, CKA_PRIVATE, CKA_SENSITIVE, !CKA_EXTRACTABLE,
//   CKA_ENCRYPT, CKA_DECRYPT, no wrap/unwrap/derive/sign, CKA_ALLOWED_MECHANISMS = {CKM_AES_GCM}, CKA_MODIFIABLE
//   (so that it can be retired; SoftHSM still refuses to clear CKA_SENSITIVE, set CKA_EXTRACTABLE or change
//   CKA_ALLOWED_MECHANISMS). CKA_LABEL = "<key_label>-v<N>", CKA_ID = key_ref (key_ref.h: version and creation
//   time). Versions made before retirement existed have CKA_MODIFIABLE false and cannot be retired.
// - The view: every listing of the token, and every change Rotate/Retire/Reinstate make, replaces the view only
//   through core::CheckAdvance (version_rules.h); a refused listing leaves the old view in force
//   (FAILED_PRECONDITION, event version_view_refused). A listing that no longer shows versions that still decrypt
//   while no private key at all is visible is the token being away, not a change: the token is marked gone (full
//   re-initialisation with backoff), Refresh/Wrap/Unwrap answer UNAVAILABLE, and the view stays, so the same
//   key_id and every old ciphertext work again once the token is back. Versions missing while other keys are
//   visible were destroyed (by another process's DestroyRetired): they stay listed as retired. DestroyRetired in
//   this process removes what it destroyed from the view.
// - State model, read back from the token by every Open/Refresh, so every process (daemons, CLI) agrees:
//     CKA_DECRYPT false                 -> kRetired (Unwrap and Wrap refused with FAILED_PRECONDITION)
//     CKA_ENCRYPT false, newer than the current version -> kStaged (decrypts; the token refuses to encrypt)
//     otherwise, the highest version    -> kCurrent
//     otherwise                         -> kActive
//   Stage() generates version max+1 with CKA_ENCRYPT false; Promote() sets CKA_ENCRYPT on the newest staged
//   version (and on older staged ones), which makes it the highest encrypting version, so current. Per-node tokens
//   (one token per control-plane node, clones of one token) receive a staged or promoted version as a copy of the
//   token's object files (RUNBOOK "Several control-plane nodes"); a ciphertext naming a version newer than the
//   view makes Unwrap list the token again once (core/version_heal.h) before refusing.
//   Retire(N) clears CKA_ENCRYPT and CKA_DECRYPT (one C_SetAttributeValue) on N and every older active version,
//   oldest first, after refusing (changing nothing) if any of them is not modifiable; Reinstate(N) sets them
//   again, newest first. A failure halfway says which versions were changed; the same call again finishes.
//   The token enforces the marker too (CKR_KEY_FUNCTION_NOT_PERMITTED), so a process whose view is stale is
//   refused with FAILED_PRECONDITION as well, and cannot encrypt new Secrets under a retired version.
//   DestroyRetired(N) is the separate, irreversible step: C_DestroyObject on N and every older version, all of
//   which must be retired; afterwards a ciphertext under them is FAILED_PRECONDITION (unknown version), also in a
//   process that has not refreshed yet (the key is missing while other keys are visible: not a device failure).
//   A newest version found retired (only other tools can do that) leaves Current() FAILED_PRECONDITION.
//   Retire, Reinstate, DestroyRetired and Rotate are serialised within the process; they run on the session pool
//   next to Wrap/Unwrap and honour the deadline before each token call.
// - Wrap/Unwrap run CKM_AES_GCM in the token with a fresh 12-byte IV from our Random, a 128-bit tag and the
//   caller's non-empty associated data. Wrapped bytes = IV(12) || ciphertext || tag(16). The plugin checks
//   IV length, tag length and AAD itself, because SoftHSM accepts an empty IV and a zero-length tag.
// - Sessions: a pool (one operation per session at a time) plus one anchor session held for the source's life
//   so the login persists. Recovery: a lost session is replaced and the call retried once; a lost key handle
//   (logout) leads to a re-login if needed and a fresh lookup, retried once; a removed device or a module that
//   lost its initialisation leads to a full re-initialisation with backoff (UNAVAILABLE meanwhile). A refused PIN
//   (incorrect, locked, expired) is never retried: every call reports PERMISSION_DENIED until Refresh() finds
//   that the PIN file changed. Refresh() re-reads the PIN file whenever it changed (also while healthy), for the
//   next login.
// - Events (options.events): unavailable, recovered, relogin, credential_reloaded, key_versions_changed,
//   version_view_refused; one per transition, never per call (session_pool.h).
// Files: errors (return values), module (dlopen, initialisation), key_ref, token_keys (key objects),
// session_pool (sessions, login, recovery), this source (the view, wrap/unwrap, administration).
//
// Thread-safe.

#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "crypto/random.h"
#include "kmsplugin/core/clock.h"
#include "kmsplugin/core/events.h"
#include "kmsplugin/core/key_admin.h"
#include "kmsplugin/core/key_source.h"
#include "kmsplugin/keysource/pkcs11/key_ref.h"

namespace kmsplugin::keysource::pkcs11 {

inline constexpr size_t kGcmIvSize = 12;
inline constexpr size_t kGcmTagSize = 16;
// Largest plaintext Wrap accepts (the wrapped form must fit in the 1024-byte envelope).
inline constexpr size_t kMaxWrapPlaintextSize = 512;

struct Pkcs11Options {
  std::string module_path;
  // Exactly one of the two.
  std::optional<std::string> token_label;
  std::optional<std::string> token_serial;
  std::string pin_file;
  std::string key_label;  // label prefix; versions are "<key_label>-v<N>"
  int session_pool_size = 9;
  // Stamps the creation time of new versions (CKA_ID, key_id). Deadlines and backoff are real time
  // (absl::Now()), as gRPC deadlines are.
  core::Clock* clock = nullptr;      // defaults to SystemClock()
  crypto::Random* random = nullptr;  // defaults to SystemRandom()
  // Backoff between full re-initialisation attempts after the device went away.
  absl::Duration reinit_backoff_initial = absl::Milliseconds(100);
  absl::Duration reinit_backoff_max = absl::Seconds(5);
  // Where recoveries, re-logins, PIN file reloads and key-version changes are reported; nullptr means
  // core::NullEventSink().
  core::EventSink* events = nullptr;
};


struct SessionPoolStats {
  int size = 0;  // configured maximum
  int open = 0;  // sessions open now, idle or in use (the anchor session is not counted)
  int idle = 0;
};

class Pkcs11KeySource : public core::KeySource, public core::KeyAdmin {
 public:
  // Loads the module, finds the token, logs in and lists the key versions. An empty token is fine (Current()
  // then fails until Rotate()). Errors: FAILED_PRECONDITION (PIN file mode, module not loadable),
  // UNAVAILABLE (no such token: the message names it and the tokens present; module or token down),
  // PERMISSION_DENIED (PIN refused; one attempt only), DEADLINE_EXCEEDED.
  static absl::StatusOr<std::unique_ptr<Pkcs11KeySource>> Open(const Pkcs11Options& options, absl::Time deadline);

  ~Pkcs11KeySource() override;

  crypto::KeySourceKind Kind() const override { return crypto::KeySourceKind::kPkcs11; }
  absl::StatusOr<core::KeyVersion> Current() const override;
  absl::StatusOr<std::string> Wrap(const core::KeyVersion& version, std::string_view plaintext,
                                   std::string_view associated_data, absl::Time deadline) override;
  absl::StatusOr<crypto::SecretBytes> Unwrap(std::string_view key_ref, std::string_view wrapped,
                                             std::string_view associated_data, absl::Time deadline) override;
  absl::StatusOr<core::KeyVersion> Lookup(std::string_view key_ref) const override;
  absl::Status Refresh(absl::Time deadline) override;
  absl::StatusOr<core::KeyVersion> Rotate(absl::Time deadline) override;
  absl::StatusOr<core::KeyVersion> Stage(absl::Time deadline) override;
  absl::StatusOr<core::KeyVersion> Promote(absl::Time deadline) override;
  bool HealUnknown(std::string_view key_ref, absl::Time deadline) override;
  absl::StatusOr<std::vector<core::KeyVersion>> Versions() const override;
  absl::StatusOr<std::vector<core::KeyVersion>> Retire(uint64_t version, absl::Time deadline) override;
  absl::StatusOr<std::vector<core::KeyVersion>> Reinstate(uint64_t version, absl::Time deadline) override;
  absl::StatusOr<std::vector<core::KeyVersion>> DestroyRetired(uint64_t version, absl::Time deadline) override;

  // The token's serial number as the token reports it (trimmed), for key ids and identities.
  std::string TokenSerial() const;

  // Session pool use, for metrics ("HSM session pool use").
  SessionPoolStats PoolStats() const;
  // kmsplugin_pkcs11_session_pool_size, kmsplugin_pkcs11_sessions_open, kmsplugin_pkcs11_sessions_in_use.
  std::vector<core::BackendGauge> BackendGauges() const override;

 private:
  class Impl;
  explicit Pkcs11KeySource(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kmsplugin::keysource::pkcs11
