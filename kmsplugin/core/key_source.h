#pragma once

// KeySource: the serving side of the holder of one environment's key-encryption key (KEK), in a local keyring,
// Vault Transit or a PKCS#11 token. The KEK never leaves it; the core only asks it to wrap and unwrap. What
// changes the versions (rotate, retire, reinstate, destroy) is the separate KeyAdmin (key_admin.h), which the CLI
// holds and the serving path never sees.
//
// Contract (ARCHITECTURE.md, rules 1-5):
// - Current() is the version new encryptions use. Wrap() takes that exact version (the caller pins it), never
//   "latest", so Status and Encrypt report the same key_id at every instant.
// - A KeyVersion's key_id is public, at most 1024 bytes, unique forever (it includes a creation time or another
//   uniqueness part), and never changes for that version. key_ref is what the ciphertext carries to find the
//   version again: at most 255 bytes, no secret.
// - Unwrap() finds the version by key_ref and keeps working for every version until it is retired.
// - Every replacement of the version view (Refresh, and a change made through KeyAdmin) passes
//   core::CheckAdvance (version_rules.h): no version dropped, key_id never moves back, retired stays retired.
// - Every call honours `deadline`; blocking work stops there with DEADLINE_EXCEEDED or UNAVAILABLE.
// - Errors: INVALID_ARGUMENT (bytes do not authenticate), FAILED_PRECONDITION (unknown or retired version),
//   UNAVAILABLE (backend down), PERMISSION_DENIED (backend refuses our credentials), DEADLINE_EXCEEDED.
//   Messages name the problem and never contain key material or credentials.
// Implementations are thread-safe.

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "crypto/envelope_format.h"
#include "crypto/secret_bytes.h"

namespace kmsplugin::core {

enum class KeyState {
  kCurrent,  // encrypts and decrypts
  kActive,   // decrypts only (an older version)
  kRetired,  // an operator retired it: decrypt refused
  kStaged,   // decrypts only, newer than the current version, waiting to be promoted (version_rules.h)
};

std::string_view KeyStateName(KeyState state);

struct KeyVersion {
  uint64_t version = 0;  // 1, 2, 3 ... as the backend numbers them
  std::string key_id;
  std::string key_ref;
  absl::Time created = absl::InfinitePast();
  KeyState state = KeyState::kActive;
};

// What every source's Wrap and Unwrap refuse before the backend sees anything (the rule is the same for all, so it
// is written once): a plaintext of 1..kMaxWrapPlaintextSize bytes, wrapped bytes of 1..kMaxWrappedSize bytes, and
// non-empty associated data (it binds the environment and version). INVALID_ARGUMENT naming the size.
inline constexpr size_t kMaxWrapPlaintextSize = 512;
inline constexpr size_t kMaxWrappedSize = 1024;
absl::Status CheckWrapInput(std::string_view plaintext, std::string_view associated_data);
absl::Status CheckUnwrapInput(std::string_view wrapped, std::string_view associated_data);

// A number about the backend worth exporting as a metric (Vault token time-to-live, HSM session pool).
struct BackendGauge {
  std::string name;  // Prometheus name with unit, e.g. kmsplugin_vault_token_ttl_seconds
  std::string help;
  double value = 0;
};

class KeySource {
 public:
  virtual ~KeySource() = default;

  virtual crypto::KeySourceKind Kind() const = 0;

  // The version for new encryptions. FAILED_PRECONDITION/UNAVAILABLE when none is known yet.
  virtual absl::StatusOr<KeyVersion> Current() const = 0;

  // Encrypts `plaintext` under `version` (as returned by Current()), binding `associated_data`.
  virtual absl::StatusOr<std::string> Wrap(const KeyVersion& version, std::string_view plaintext,
                                           std::string_view associated_data, absl::Time deadline) = 0;

  // Decrypts bytes produced by Wrap under the version named by `key_ref`.
  virtual absl::StatusOr<crypto::SecretBytes> Unwrap(std::string_view key_ref, std::string_view wrapped,
                                                     std::string_view associated_data, absl::Time deadline) = 0;

  // The version `key_ref` names, if this source knows it (any state). NOT_FOUND otherwise.
  virtual absl::StatusOr<KeyVersion> Lookup(std::string_view key_ref) const = 0;

  // Re-reads the backend's idea of the versions (keyring file, Transit key metadata, token objects).
  // On failure the previous view stays in force; the status says why.
  virtual absl::Status Refresh(absl::Time deadline) = 0;

  // Every version, oldest first.
  virtual absl::StatusOr<std::vector<KeyVersion>> Versions() const = 0;

  // A ciphertext names `key_ref`, which Lookup does not know. A source whose versions reach this node as a copy
  // (a keyring file, a cloned token) re-reads its backend when the rule of version_heal.h says so (a version newer
  // than any it knows, at most once per second) and returns true when it did; the caller then looks again. The
  // default (a source that shares one backend between nodes) never re-reads.
  virtual bool HealUnknown(std::string_view /*key_ref*/, absl::Time /*deadline*/) { return false; }

  // Backend numbers for /metrics. A source with nothing of its own to report (the local keyring) keeps this.
  virtual std::vector<BackendGauge> BackendGauges() const { return {}; }
};

}  // namespace kmsplugin::core
