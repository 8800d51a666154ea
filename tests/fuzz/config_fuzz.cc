// Fuzz target: kmsplugin's config YAML (config/config.h) with every key source parser this build has (local,
// vault, pkcs11, through the registry), as `kmsplugin serve`, `check-config` and a SIGHUP reload read it.
// Parsing only validates: no file named in the config is opened. Properties: never crashes, throws or recurses
// without bound; refuses only with INVALID_ARGUMENT naming the file; a config that parses has at least one
// environment, each with a valid name and a key source.

#include <cstdint>
#include <cstdlib>
#include <string>

#include "kmsplugin/config/config.h"
#include "kmsplugin/keysource/registry.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace kmsplugin;
  static const config::KeySourceParsers* parsers = new config::KeySourceParsers(keysource::KeySourceParsers());
  const std::string yaml(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<config::Config> parsed = config::ParseConfig(yaml, "fuzz.yaml", *parsers);
  if (!parsed.ok()) {
    if (parsed.status().code() != absl::StatusCode::kInvalidArgument ||
        parsed.status().message().find("fuzz.yaml") == std::string::npos) {
      std::abort();
    }
    return 0;
  }
  if (parsed->environments.empty()) {
    std::abort();
  }
  for (const config::EnvironmentConfig& environment : parsed->environments) {
    if (!config::IsValidEnvironmentName(environment.name) || environment.key_source == nullptr) {
      std::abort();
    }
    if (!parsed->Find(environment.name).ok()) {
      std::abort();
    }
  }
  return 0;
}
