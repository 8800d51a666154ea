#include "kmsplugin/audit/key_catalog.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "crypto/random.h"
#include "kmsplugin/core/clock.h"

namespace kmsplugin::audit {

absl::StatusOr<std::map<std::string, std::shared_ptr<core::KeySource>>> OpenKeySources(
    const config::Config& config, const std::string& only_environment) {
  std::map<std::string, std::shared_ptr<core::KeySource>> sources;
  if (!only_environment.empty()) {
    if (auto env = config.Find(only_environment); !env.ok()) {
      return env.status();
    }
  }
  for (const config::EnvironmentConfig& env : config.environments) {
    if (!only_environment.empty() && env.name != only_environment) {
      continue;
    }
    config::OpenContext context;
    context.environment = env.name;
    context.worker_threads = 1;
    context.clock = &core::SystemClock();
    context.random = &crypto::SystemRandom();
    auto source = env.key_source->Open(context);
    if (!source.ok()) {
      return absl::Status(source.status().code(),
                          absl::StrCat("environment \"", env.name, "\": cannot open its key source to list key ids: ",
                                       source.status().message()));
    }
    sources[env.name] = std::move(source->source);
  }
  return sources;
}

absl::StatusOr<KeyCatalog> KeyCatalog::FromSources(
    const std::map<std::string, std::shared_ptr<core::KeySource>>& sources) {
  KeyCatalog catalog;
  for (const auto& [name, source] : sources) {
    auto versions = source->Versions();
    if (!versions.ok()) {
      return absl::Status(versions.status().code(),
                          absl::StrCat("environment \"", name, "\": cannot list key versions: ",
                                       versions.status().message()));
    }
    catalog.Add(name, *versions);
  }
  return catalog;
}

absl::StatusOr<KeyCatalog> KeyCatalog::FromConfig(const config::Config& config,
                                                  const std::string& only_environment) {
  auto sources = OpenKeySources(config, only_environment);
  if (!sources.ok()) {
    return sources.status();
  }
  return FromSources(*sources);
}

void KeyCatalog::Add(const std::string& environment, const std::vector<core::KeyVersion>& versions) {
  if (std::find(environments_.begin(), environments_.end(), environment) == environments_.end()) {
    environments_.push_back(environment);
  }
  for (const core::KeyVersion& v : versions) {
    by_key_id_[v.key_id] = KnownKey{environment, v.version, v.key_id, v.state};
    key_id_by_ref_[{environment, v.key_ref}] = v.key_id;
  }
}

const KnownKey* KeyCatalog::FindKeyId(const std::string& key_id) const {
  auto it = by_key_id_.find(key_id);
  return it == by_key_id_.end() ? nullptr : &it->second;
}

const KnownKey* KeyCatalog::FindKeyRef(const std::string& environment, const std::string& key_ref) const {
  auto it = key_id_by_ref_.find({environment, key_ref});
  return it == key_id_by_ref_.end() ? nullptr : FindKeyId(it->second);
}

std::vector<KnownKey> KeyCatalog::KeysOf(const std::string& environment) const {
  std::vector<KnownKey> keys;
  for (const auto& [key_id, key] : by_key_id_) {
    if (key.environment == environment) {
      keys.push_back(key);
    }
  }
  std::sort(keys.begin(), keys.end(), [](const KnownKey& a, const KnownKey& b) { return a.version < b.version; });
  return keys;
}

}  // namespace kmsplugin::audit
