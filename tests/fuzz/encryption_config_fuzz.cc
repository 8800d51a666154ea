// Fuzz target: the EncryptionConfiguration parser `kmsplugin doctor` reads (doctor/encryption_config.h), a file
// an operator hands in. Properties: never crashes or throws; refuses only with INVALID_ARGUMENT; whatever parses
// can be walked (kms providers, static keys, group/resource splits).

#include <cstdint>
#include <cstdlib>
#include <string>

#include "kmsplugin/doctor/encryption_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace kmsplugin::doctor;
  const std::string yaml(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<EncryptionConfigFile> parsed = ParseEncryptionConfig(yaml, "encryption-config.yaml");
  if (!parsed.ok()) {
    if (parsed.status().code() != absl::StatusCode::kInvalidArgument) {
      std::abort();
    }
    return 0;
  }
  for (const Provider* provider : parsed->KmsProviders()) {
    if (provider == nullptr || provider->type != ProviderType::kKms) {
      std::abort();
    }
    (void)provider->kms.EffectiveApiVersion();
    (void)ProviderTypeName(provider->type);
  }
  (void)parsed->HoldsStaticKeys();
  for (const ResourceEntry& entry : parsed->entries) {
    for (const std::string& resource : entry.resources) {
      (void)ParseGroupResource(resource);
    }
  }
  return 0;
}
