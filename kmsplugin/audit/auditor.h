#pragma once

// The audit: for each resource prefix in etcd, how many objects sit under each storage kind, provider and
// key_id, which are not encrypted, which are under a key_id no configured environment knows or under a retired
// key version, and which values are malformed. Read-only (EtcdClient has no write), paged (ScanPrefix), and one
// consistent snapshot: every prefix is read at the revision of the first page.
//
// Exit policy (ExitCodeFor): 1 when anything is unencrypted, under an unknown key_id, under a retired version,
// or malformed; 0 otherwise. Objects under aescbc/aesgcm/secretbox are encrypted (with a key in the apiserver's
// own config, not a KMS) and are listed but not failures. Without a catalog (no --config) key_ids are not
// checked and cannot fail.
//
// Nothing secret is read: values are classified by their public parts only (value_classifier.h).

#include <cstdint>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/status/statusor.h"
#include "kmsplugin/audit/etcd_client.h"
#include "kmsplugin/audit/key_catalog.h"
#include "kmsplugin/audit/object_decryptor.h"
#include "kmsplugin/audit/value_classifier.h"

namespace kmsplugin::audit {

inline constexpr char kDefaultPrefix[] = "/registry/secrets/";
inline constexpr int64_t kDefaultPageSize = 500;

struct AuditOptions {
  std::vector<std::string> prefixes = {kDefaultPrefix};
  int64_t page_size = kDefaultPageSize;
  size_t max_names = 1000;  // object names listed per problem kind and prefix; counts are always exact
  size_t max_names_per_key = 0;  // object names kept per key_id group (GroupCount::names); 0: none
  // With a decryptor (audit --decrypt), every encrypted object is also decrypted for real; one that does not is a
  // problem, named with the reason. Not owned.
  ObjectDecryptor* decryptor = nullptr;
};

// How a key_id relates to the configured environments.
enum class KeyStatus {
  kCurrent,     // the key new encryptions use
  kActive,      // an older version, still decrypts
  kRetired,     // an operator retired it: these objects no longer decrypt
  kUnknown,     // no configured environment knows it
  kNotChecked,  // no config given
  kNotKms,      // identity, aescbc, aesgcm, secretbox: no KMS key
};
std::string_view KeyStatusName(KeyStatus status);

struct GroupKey {
  StorageKind kind = StorageKind::kIdentity;
  std::string provider;
  std::string key_id;
  auto operator<=>(const GroupKey&) const = default;
};

struct GroupCount {
  std::string environment;  // the configured environment that owns the key, else the ciphertext's (if ours)
  uint64_t version = 0;     // its key version, when known
  KeyStatus status = KeyStatus::kNotKms;
  uint64_t objects = 0;
  std::map<int, uint64_t> by_dek_source_type;  // KMS v2 only
  std::vector<std::string> names;               // at most AuditOptions::max_names_per_key
  uint64_t decrypted = 0;                       // with a decryptor: objects of this group that decrypt
};

struct MalformedObject {
  std::string name;
  std::string problem;
};

// An object that does not decrypt (audit --decrypt), and why.
struct UndecryptableObject {
  std::string name;
  std::string reason;
};

struct PrefixReport {
  std::string prefix;
  uint64_t objects = 0;
  uint64_t unencrypted = 0;
  uint64_t malformed = 0;
  uint64_t unknown_key = 0;
  uint64_t retired_key = 0;
  std::map<GroupKey, GroupCount> groups;
  // Names are the etcd key without the prefix (for Secrets: <namespace>/<name>). At most max_names each.
  std::vector<std::string> unencrypted_names;
  std::vector<std::string> unknown_key_names;
  std::vector<std::string> retired_key_names;
  std::vector<MalformedObject> malformed_objects;
  // With a decryptor: KMS objects that decrypt, that do not (each a problem), and objects whose key is not a KMS
  // key (aescbc, aesgcm, secretbox). `undecryptable_not_counted` are the undecryptable ones no other count above
  // holds already (an object under a retired key is counted once).
  uint64_t decrypted = 0;
  uint64_t undecryptable = 0;
  uint64_t undecryptable_not_counted = 0;
  uint64_t not_checkable = 0;
  std::vector<UndecryptableObject> undecryptable_objects;  // at most max_names

  uint64_t problems() const {
    return unencrypted + malformed + unknown_key + retired_key + undecryptable_not_counted;
  }
};

struct AuditReport {
  std::string endpoint;
  int64_t revision = 0;
  bool keys_checked = false;
  bool decrypt_checked = false;  // audit --decrypt
  std::vector<std::string> environments;  // the configured environments whose keys were known
  std::vector<PrefixReport> prefixes;

  uint64_t problems() const;
};

// Scans every prefix. `catalog` may be null (key_ids then are kNotChecked).
absl::StatusOr<AuditReport> RunAuditScan(EtcdClient& client, const KeyCatalog* catalog, const AuditOptions& options);

// 0: nothing to fix; 1: something unencrypted, malformed, under an unknown or retired key, or (--decrypt) that
// does not decrypt.
int ExitCodeFor(const AuditReport& report);

std::string RenderTable(const AuditReport& report);
nlohmann::json ToJson(const AuditReport& report);

// For `kmsplugin keys --env NAME --endpoints ...`: for every key version of `environment` (oldest first), how many
// objects under `options.prefixes` still use it (0 included), so retiring a version in use can be refused.
// Objects of this environment under a key_ref the catalog does not know are not counted here (the audit
// reports them as unknown).
struct KeyUsage {
  KnownKey key;
  uint64_t objects = 0;
  std::vector<std::string> names;  // full etcd keys, at most AuditOptions::max_names in all prefixes
};
struct KeyUsageReport {
  std::string environment;
  int64_t revision = 0;
  std::vector<KeyUsage> keys;
};
absl::StatusOr<KeyUsageReport> CountKeyUsage(EtcdClient& client, const KeyCatalog& catalog,
                                             const std::string& environment, const AuditOptions& options);

}  // namespace kmsplugin::audit
