#pragma once

// EncryptionConfigFile: a kube-apiserver EncryptionConfiguration (the --encryption-provider-config file) read as
// kube-apiserver reads it, kept close to the text so `kmsplugin doctor` can say where each finding sits.
//
//   apiVersion: apiserver.config.k8s.io/v1
//   kind: EncryptionConfiguration
//   resources:
//     - resources: [secrets]                 # or wildcards: "*." (core group), "*.<group>", "*.*"
//       providers:                           # the first one writes; every one can read
//         - kms: {apiVersion: v2, name: kmsplugin-dev, endpoint: unix:///run/kmsplugin/dev.sock, timeout: 3s}
//         - identity: {}
//
// The parser is tolerant: only text that is not YAML, or whose top level is not a mapping, is an error
// (INVALID_ARGUMENT naming the file). Everything kube-apiserver would refuse or silently ignore beyond that (an
// unknown or repeated field, a value of the wrong shape, a provider element with no or two provider types) is
// recorded in `problems` with its path, so the doctor can report it and still check the rest.
//
// Not secret-bearing by itself, but an aescbc/aesgcm/secretbox entry holds keys: the parser never copies a key's
// `secret` anywhere; it only records whether one was present and whether it decodes to a valid key length.
// Not thread-safe to mutate; const access from several threads is fine.

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace kmsplugin::doctor {

enum class ProviderType { kIdentity, kAesCbc, kAesGcm, kSecretbox, kKms, kNone };

// The YAML key of the provider type ("identity", "aescbc", ..., "kms"); "(none)" for kNone.
std::string_view ProviderTypeName(ProviderType type);

struct KmsSettings {
  std::string api_version;                 // as written; empty means v1 (kube-apiserver's default)
  std::string name;
  std::string endpoint;
  std::optional<std::string> timeout;      // as written; absent means 3s (kube-apiserver's default)
  std::optional<std::string> cachesize;    // as written; only v1 may set it

  // apiVersion after kube-apiserver's defaulting: "v1" when empty, else as written.
  std::string EffectiveApiVersion() const { return api_version.empty() ? "v1" : api_version; }
  bool IsV2() const { return api_version == "v2"; }
};

struct Provider {
  ProviderType type = ProviderType::kNone;
  std::string path;                        // "resources[0].providers[1]"
  KmsSettings kms;                         // meaningful when type == kKms
  int key_count = 0;                       // aescbc/aesgcm/secretbox: entries under `keys`
};

struct ResourceEntry {
  std::string path;                        // "resources[0]"
  std::vector<std::string> resources;
  std::vector<Provider> providers;
};

struct EncryptionConfigFile {
  std::string file;                        // names the source in findings
  std::string api_version;
  std::string kind;
  std::vector<ResourceEntry> entries;
  // "<path>: <problem>" for everything kube-apiserver's strict decoding or validation refuses that the checks do
  // not report on their own (kms names, endpoints and timeouts have their own checks).
  std::vector<std::string> problems;

  // Every kms provider in file order.
  std::vector<const Provider*> KmsProviders() const;
  // Whether an aescbc, aesgcm or secretbox provider (keys in this file) appears anywhere.
  bool HoldsStaticKeys() const;
};

// Parses `yaml`; `file` only names the source in messages. INVALID_ARGUMENT when the text is empty, not YAML, or
// its top level is not a mapping.
absl::StatusOr<EncryptionConfigFile> ParseEncryptionConfig(const std::string& yaml, const std::string& file);

// A resource string split as Kubernetes' schema.ParseGroupResource does: at the first '.', resource before it,
// group after it ("secrets" -> {"", "secrets"}, "*." -> {"", "*"}, "*.apps" -> {"apps", "*"}, "*.*" -> {"*", "*"}).
struct GroupResource {
  std::string group;
  std::string resource;
  bool operator==(const GroupResource&) const = default;
};
GroupResource ParseGroupResource(std::string_view text);

}  // namespace kmsplugin::doctor
