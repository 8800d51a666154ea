#pragma once

// What a configuration reload (SIGHUP to `kmsplugin serve`) changes, decided before anything is touched.
//
// - server.* and http.* take effect only at restart: a reload that changes any of them is refused as a whole,
//   naming the field ("restart kmsplugin to apply it, or revert the change").
// - Environments are matched by name. One whose socket, socketGroup and statusVersion are unchanged keeps its
//   listener; if its keySource section changed (as written: another path, another option, even another key
//   order) it is re-keyed: the new key source must prove it can take over (EnvelopeService::CheckReplacement).
//   A changed socket, socketGroup or statusVersion is a remove plus an add on the new socket (re-keyed as well
//   when keySource changed too). Names only in the new file are added, names only in the old one removed.
// The plan holds names only, never key material. Pure functions; no I/O except LoadServeConfig.

#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kmsplugin/config/config.h"

namespace kmsplugin::daemon {

// A validated config plus each environment's keySource section as written, to tell whether it changed.
struct LoadedConfig {
  config::Config config;
  std::map<std::string, std::string> key_source_text;  // environment name → its keySource section (YAML)
};

// Reads `path` once and validates it as config::LoadConfig does (a file group or others can write is refused;
// every error names the file, the field and the fix), keeping the keySource sections.
absl::StatusOr<LoadedConfig> LoadServeConfig(const std::string& path, const config::KeySourceParsers& parsers);
// The same from text; `file` only names the source in messages.
absl::StatusOr<LoadedConfig> ParseServeConfig(const std::string& yaml, const std::string& file,
                                              const config::KeySourceParsers& parsers);

struct ReloadPlan {
  std::vector<std::string> added;       // in the new file's order
  std::vector<std::string> removed;     // in the old file's order
  std::vector<std::string> relistened;  // socket, socketGroup or statusVersion changed: stopped, started again
  std::vector<std::string> rekeyed;     // keySource changed (some may be relistened too)
  std::vector<std::string> unchanged;

  bool ChangesAnything() const { return !added.empty() || !removed.empty() || !relistened.empty() || !rekeyed.empty(); }
  // Names every environment that changes and how, e.g. "added: b; removed: c; changed: a (keySource)";
  // "no environment changed" when nothing does.
  std::string Summary() const;
  // Every environment that stays but changes (relistened or rekeyed), each once, in order.
  std::vector<std::string> Changed() const;
};

// FAILED_PRECONDITION "<file>: server.maxThreads: changed from 128 to 64, which takes effect only at restart;
// fix: restart kmsplugin to apply it, or revert the change" when a restart-only field changed.
absl::StatusOr<ReloadPlan> PlanReload(const LoadedConfig& running, const LoadedConfig& next);

}  // namespace kmsplugin::daemon
