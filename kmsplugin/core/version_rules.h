#pragma once

// The rules every key source's versions obey, written once (README "Guarantees", ARCHITECTURE.md rules 1 and 3).
//
// A key source serves a view of its versions (oldest first) and replaces it when it re-reads its backend (a
// poll, SIGHUP, a rotate/retire in this or another process). Every such replacement passes CheckAdvance:
//   1. No version that still decrypts is dropped: each version of the old view that is not retired is in the
//      fresh one. (A backend that suddenly lists fewer versions is failing, not rotating: an empty PKCS#11 search
//      while the token is away, a keyring file restored from an old backup.)
//   2. A version never changes identity: the same number keeps its key_ref and key_id (otherwise the key was
//      deleted and re-created, and the old ciphertexts name a key that no longer exists).
//   3. The current version, and so the key_id Status reports, never moves back (a lagging Vault replica, an old
//      keyring copy), and a view that had a current version keeps having one.
//   4. Retired stays retired unless reinstated: a retired version the backend no longer lists (Vault archives
//      versions below min_decryption_version, another process destroyed a PKCS#11 object) stays in the view as
//      retired, so `kmsplugin keys` and every refusal still name it; it becomes active again only when the
//      backend lists it as active again, which only a reinstate does.
//   5. A staged version is newer than the current version: it decrypts and never encrypts, so Status never reports
//      it. Promoting it (staged -> current) moves the current version forward, which rule 3 allows; a version that
//      was current or active never becomes staged again (it would be older than the current version).
// A refused view leaves the old one in force; the status (FAILED_PRECONDITION) names the rule and the versions.
//
// Staged versions: the two-step rotation for several control-plane nodes that each hold a copy of the versions
// (local keyring, per-node HSM token). `rotate --stage` adds version max+1 as staged on one node; the copy goes to
// every node, which can then decrypt under it; `rotate --promote` makes it current (VersionsToPromote), and that
// copy goes out too. A node that has not got the promoted copy yet still encrypts under the previous version, which
// every node decrypts, so no node ever meets a ciphertext it cannot read. KeySetFingerprint is what operators (and
// the kmsplugin_key_set_info metric) compare across nodes before promoting.

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kmsplugin/core/key_source.h"

namespace kmsplugin::core {

// What a refresh changed, for the key-version event and log line.
struct VersionChange {
  std::vector<uint64_t> added;
  std::vector<uint64_t> retired;
  std::vector<uint64_t> reinstated;
  std::vector<uint64_t> kept_retired;  // retired versions the backend no longer lists, kept in the view
  std::optional<uint64_t> current_before;
  std::optional<uint64_t> current_after;

  bool empty() const {
    return added.empty() && retired.empty() && reinstated.empty() && current_before == current_after;
  }
  // "current 2 -> 3; added 3; retired 1" (empty string when nothing changed).
  std::string Summary() const;
};

struct Advanced {
  std::vector<KeyVersion> versions;  // the view to install: fresh plus retired versions kept, oldest first
  VersionChange change;
};

// May `old` be replaced by `fresh` (both any order)? Returns the view to install, or FAILED_PRECONDITION naming
// the broken rule. `what` names the backend in messages ("keyring /var/lib/kmsplugin/dev.keyring").
// An empty `old` (nothing loaded yet) accepts any `fresh`.
absl::StatusOr<Advanced> CheckAdvance(const std::vector<KeyVersion>& old, const std::vector<KeyVersion>& fresh,
                                      std::string_view what);

// The versions Retire(version) changes, from `versions` (oldest first): `version` and every older one not retired
// yet. FAILED_PRECONDITION when `version` is the current version or newer than it, NOT_FOUND when it is not there.
absl::StatusOr<std::vector<KeyVersion>> VersionsToRetire(const std::vector<KeyVersion>& versions, uint64_t version);
// The versions Reinstate(version) changes: `version` and every newer retired one. NOT_FOUND when `version` is not
// there, FAILED_PRECONDITION when it is not retired.
absl::StatusOr<std::vector<KeyVersion>> VersionsToReinstate(const std::vector<KeyVersion>& versions,
                                                            uint64_t version);
// The versions DestroyRetired(version) destroys: `version` and every older one, all of which must be retired
// (FAILED_PRECONDITION naming the first that is not). NOT_FOUND when `version` is not there.
absl::StatusOr<std::vector<KeyVersion>> VersionsToDestroy(const std::vector<KeyVersion>& versions, uint64_t version);

// The versions Promote changes, in their new state: the newest staged version becomes current, the former current
// version and every older staged version become active. FAILED_PRECONDITION when nothing is staged or no version is
// current (the fix names `rotate --stage`).
absl::StatusOr<std::vector<KeyVersion>> VersionsToPromote(const std::vector<KeyVersion>& versions);
// May a version be staged on top of `versions`? A current version must exist (it is what the others keep
// encrypting under until the promote). OK, or FAILED_PRECONDITION naming the fix.
absl::Status CheckStage(const std::vector<KeyVersion>& versions);
// May a plain rotate make a new version current on top of `versions`? Not while a version is staged: the new
// current version would be newer than it, and the staged version was copied to the nodes to become current next.
absl::Status CheckRotate(const std::vector<KeyVersion>& versions);
// The number a new version (staged or current) gets: one more than the highest listed.
uint64_t NextVersionNumber(const std::vector<KeyVersion>& versions);

// A fingerprint of the key set: "ks1-" and 16 hex digits of SHA-256 over each version's number, key_id, key_ref and
// state (never key material), in version order. Two nodes that hold the same versions in the same states show the
// same fingerprint (`kmsplugin keys`, metric kmsplugin_key_set_info); any difference (a version missing, a
// promote not copied yet, a retire done on one node only) changes it.
std::string KeySetFingerprint(const std::vector<KeyVersion>& versions);

// "version 3 (current)", "version 1 (retired)": how every message names a version.
std::string DescribeVersion(const KeyVersion& version);

// The one refusal for a version that no longer decrypts. `detail` says what marks it retired in this backend
// ("min_decryption_version is 3", "CKA_DECRYPT is false on the token"); may be empty.
absl::Status RetiredVersionError(const KeyVersion& version, std::string_view detail);

// The version in `versions` with this number, if any.
std::optional<KeyVersion> FindVersionNumber(const std::vector<KeyVersion>& versions, uint64_t number);

// The current version of `versions` (state kCurrent), if any.
std::optional<KeyVersion> CurrentOf(const std::vector<KeyVersion>& versions);

}  // namespace kmsplugin::core
