#pragma once

// KeyCatalog: every key_id the configured environments know, with its state, so the audit can tell objects under
// a current, an older (active), a retired or an unknown key apart. Built by opening each environment's key
// source read-only (KeySourceSpec::Open, then Versions()); nothing is rotated, refreshed or written, and no key
// material is kept: only public facts (key_id, key_ref, version number, state).

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "kmsplugin/config/config.h"
#include "kmsplugin/core/key_source.h"

namespace kmsplugin::audit {

struct KnownKey {
  std::string environment;
  uint64_t version = 0;
  std::string key_id;
  core::KeyState state = core::KeyState::kActive;
};

// Opens the key source of every environment of `config` (or only `only_environment`), read-only, as `keys` and
// `retire` do; the caller keeps them for decrypting (audit --decrypt). An environment whose source cannot be opened
// is an error naming it.
absl::StatusOr<std::map<std::string, std::shared_ptr<core::KeySource>>> OpenKeySources(
    const config::Config& config, const std::string& only_environment = "");

class KeyCatalog {
 public:
  KeyCatalog() = default;

  // Opens every environment of `config` (or only `only_environment` when non-empty). An environment whose key
  // source cannot be opened or listed is an error naming it: an audit that cannot see a key would call its
  // objects "unknown".
  static absl::StatusOr<KeyCatalog> FromConfig(const config::Config& config,
                                               const std::string& only_environment = "");
  // The same from sources already opened (OpenKeySources): lists each one's versions.
  static absl::StatusOr<KeyCatalog> FromSources(const std::map<std::string, std::shared_ptr<core::KeySource>>& sources);

  // Adds the versions of one environment (FromConfig uses this; tests can feed it directly).
  void Add(const std::string& environment, const std::vector<core::KeyVersion>& versions);

  // The key with this key_id (KMS v2 values store it), if any environment knows it.
  const KnownKey* FindKeyId(const std::string& key_id) const;
  // The key an envelope of `environment` with `key_ref` names (KMS v1 values store only the ciphertext).
  const KnownKey* FindKeyRef(const std::string& environment, const std::string& key_ref) const;

  // Every known key of `environment`, oldest version first.
  std::vector<KnownKey> KeysOf(const std::string& environment) const;
  const std::vector<std::string>& environments() const { return environments_; }

 private:
  std::vector<std::string> environments_;
  std::map<std::string, KnownKey> by_key_id_;
  std::map<std::pair<std::string, std::string>, std::string> key_id_by_ref_;
};

}  // namespace kmsplugin::audit
