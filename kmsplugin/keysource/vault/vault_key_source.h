#pragma once

// VaultKeySource: a KeySource backed by one HashiCorp Vault (or OpenBao) Transit key.
//
// - Wrap: `POST /v1/<mount>/encrypt/<key>` with the explicit `key_version` of the pinned KeyVersion and
//   `associated_data` = base64 of the caller's AAD. The wrapped bytes are Transit's "vault:vN:..." string.
// - Unwrap: `POST /v1/<mount>/decrypt/<key>` with the same AAD. Exactly one Vault request per Wrap/Unwrap
//   (plus, rarely, a login when the token is gone).
// - Refresh: `GET /v1/<mount>/keys/<key>` learns latest_version, min_decryption_version and each version's
//   creation time. Every new view passes core::CheckAdvance (no version dropped, no identity change, current
//   never back, retired stays listed); a refused view keeps the old one and emits `version_view_refused`, an
//   accepted change emits `key_versions_changed`, the first failed refresh `unavailable` and the next good one
//   `recovered`. A background thread refreshes every pollInterval (every second while failing) and keeps the
//   token alive.
// - Retired versions: Vault archives versions below min_decryption_version and stops listing them in `keys`
//   (keysutil handleArchiving). A version this process knew stays in the view as kRetired. One it never saw has
//   no creation time to build a key_id from, so it is not listed by Versions() (inventing one would change its
//   key_id when a reinstate brings it back); Lookup of a key_ref below the floor still answers it as kRetired,
//   with the number and creation time the key_ref itself carries, and Unwrap refuses it locally with
//   core::RetiredVersionError ("key version 1 is retired (min_decryption_version is 3) ..."). Reinstate of such
//   a version (the retire ran in another process) lowers the floor first and answers the versions Vault then
//   lists again, with their own creation times.
// - A key deleted and re-created in Vault (same numbers, new creation times) is a refused view: Current() keeps
//   the old key_id, and Wrap/Unwrap of a version whose creation time no longer matches Vault's are refused
//   (FAILED_PRECONDITION "re-created"), so nothing is encrypted under an identity Vault no longer has.
// - key_id  = "vault:[<namespace>/]<mount>/<key>:v<N>:<creation unix seconds>" (address-independent; a
//   deleted and re-created key gets new creation times, so ids never repeat). No secret.
// - key_ref = "v<N>@<creation unix seconds>" (<= 40 bytes), carried in the envelope header.
// Thread-safe.

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "kmsplugin/core/clock.h"
#include "kmsplugin/core/events.h"
#include "kmsplugin/core/key_admin.h"
#include "kmsplugin/core/key_source.h"
#include "kmsplugin/core/version_heal.h"
#include "kmsplugin/keysource/vault/vault_client.h"
#include "kmsplugin/keysource/vault/vault_options.h"

namespace kmsplugin::keysource::vault {

class VaultKeySource : public core::KeySource, public core::KeyAdmin {
 public:
  // Connects, authenticates and reads the key metadata. Credential problems (bad file mode, refused login) fail
  // here; an unreachable Vault does not: Current() then reports UNAVAILABLE until a background refresh works.
  static absl::StatusOr<std::shared_ptr<VaultKeySource>> Open(VaultOptions options, core::Clock* clock,
                                                              int worker_threads, bool background = true,
                                                              core::EventSink* events = nullptr);
  // The same over a client made already (the Vault response fuzz target's, whose transport answers from its input).
  static absl::StatusOr<std::shared_ptr<VaultKeySource>> Open(std::unique_ptr<VaultClient> client, core::Clock* clock,
                                                              bool background = true,
                                                              core::EventSink* events = nullptr);

  // `kmsplugin init`: creates the Transit key (aes256-gcm96) if it does not exist; ALREADY_EXISTS otherwise.
  static absl::StatusOr<std::string> CreateKey(const VaultOptions& options, core::Clock* clock, absl::Time deadline);
  // The same through `client` (the options are the client's).
  static absl::StatusOr<std::string> CreateKey(VaultClient& client, absl::Time deadline);

  ~VaultKeySource() override;

  crypto::KeySourceKind Kind() const override { return crypto::KeySourceKind::kVault; }
  absl::StatusOr<core::KeyVersion> Current() const override;
  absl::StatusOr<std::string> Wrap(const core::KeyVersion& version, std::string_view plaintext,
                                   std::string_view associated_data, absl::Time deadline) override;
  absl::StatusOr<crypto::SecretBytes> Unwrap(std::string_view key_ref, std::string_view wrapped,
                                             std::string_view associated_data, absl::Time deadline) override;
  absl::StatusOr<core::KeyVersion> Lookup(std::string_view key_ref) const override;
  absl::Status Refresh(absl::Time deadline) override;
  absl::StatusOr<core::KeyVersion> Rotate(absl::Time deadline) override;
  // Refused: every node reads the one Transit key, so a plain rotate reaches all of them at once (the next poll,
  // or HealUnknown when a node meets the newer version first); there is no copy to stage.
  absl::StatusOr<core::KeyVersion> Stage(absl::Time deadline) override;
  absl::StatusOr<core::KeyVersion> Promote(absl::Time deadline) override;
  absl::StatusOr<std::vector<core::KeyVersion>> Versions() const override;
  // A ciphertext of a version newer than the view (another node rotated, this one has not polled yet): the key
  // metadata is read again under the rule of core/version_heal.h (at most once per second).
  bool HealUnknown(std::string_view key_ref, absl::Time deadline) override;
  // `POST /v1/<mount>/keys/<key>/config` with min_decryption_version = version + 1 (Retire) or = version
  // (Reinstate); Vault keeps every version, so a retired one can always come back.
  absl::StatusOr<std::vector<core::KeyVersion>> Retire(uint64_t version, absl::Time deadline) override;
  absl::StatusOr<std::vector<core::KeyVersion>> Reinstate(uint64_t version, absl::Time deadline) override;
  // UNIMPLEMENTED: Vault's own trim endpoint deletes versions for good; kmsplugin leaves that to the operator.
  absl::StatusOr<std::vector<core::KeyVersion>> DestroyRetired(uint64_t version, absl::Time deadline) override;

  VaultClient& client() { return *client_; }
  // kmsplugin_vault_token_ttl_seconds (+Inf for a token that does not expire).
  std::vector<core::BackendGauge> BackendGauges() const override;

 private:
  VaultKeySource(std::unique_ptr<VaultClient> client, core::Clock* clock, core::EventSink* events);
  std::string KeyPath(absl::string_view op) const;
  // POST .../config {"min_decryption_version": floor}, then Refresh. A 400 is FAILED_PRECONDITION.
  absl::Status PostMinDecryptionVersion(uint64_t floor, absl::Time deadline);
  // After a Refresh: `select` on the view, then the floor, then the changed versions as the new view has them.
  absl::StatusOr<std::vector<core::KeyVersion>> SetMinDecryptionVersion(
      uint64_t version,
      absl::StatusOr<std::vector<core::KeyVersion>> (*select)(const std::vector<core::KeyVersion>&, uint64_t),
      uint64_t floor, absl::Time deadline);
  std::string Describe() const;  // "Vault transit key '<mount>/keys/<key>'"
  core::KeyVersion MakeVersion(uint64_t version, int64_t created, core::KeyState state) const;
  // The refusal for a version of the view that Vault now has with another creation time, if any.
  absl::Status CheckIdentity(uint64_t version, int64_t created) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::string FloorDetail() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);  // "min_decryption_version is 3"
  void Emit(const char* name, std::string message, bool warning) const;
  void BackgroundTick();

  std::unique_ptr<VaultClient> client_;
  core::Clock* const clock_;
  const VaultOptions& options_;

  core::EventSink* const events_;
  core::UnknownVersionHeal heal_;

  mutable absl::Mutex mu_;
  bool loaded_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<core::KeyVersion> versions_ ABSL_GUARDED_BY(mu_);  // the view, oldest first (CheckAdvance'd)
  std::map<uint64_t, int64_t> vault_created_ ABSL_GUARDED_BY(mu_);  // Vault's last answer, accepted or not
  uint64_t min_decryption_ ABSL_GUARDED_BY(mu_) = 1;
  std::string refresh_error_ ABSL_GUARDED_BY(mu_) = "key metadata not read yet";
  std::string refused_ ABSL_GUARDED_BY(mu_);  // the last view refusal reported, to report each one once
  bool failing_ ABSL_GUARDED_BY(mu_) = false;
  absl::Time last_attempt_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
  absl::Time last_refresh_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
};

// Parses "v<N>@<created>"; INVALID_ARGUMENT otherwise.
absl::Status ParseKeyRef(absl::string_view key_ref, uint64_t* version, int64_t* created);

}  // namespace kmsplugin::keysource::vault
