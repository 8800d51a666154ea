#include "kmsplugin/daemon/reload_plan.h"

#include <algorithm>
#include <set>

#include <yaml-cpp/yaml.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kmsplugin/config/field_context.h"

namespace kmsplugin::daemon {
namespace {

std::string Quoted(const std::string& value) { return absl::StrCat("\"", value, "\""); }

// FAILED_PRECONDITION naming `field` when `before` and `after` differ.
absl::Status RestartOnly(const std::string& file, const std::string& section, const std::string& field,
                         const std::string& before, const std::string& after) {
  if (before == after) {
    return absl::OkStatus();
  }
  const absl::Status error =
      config::FieldContext(file, section)
          .Child(field)
          .Error(absl::StrCat("changed from ", before, " to ", after, ", which takes effect only at restart"),
                 "restart kmsplugin to apply it, or revert the change");
  return absl::FailedPreconditionError(error.message());
}

bool Contains(const std::vector<std::string>& names, const std::string& name) {
  return std::find(names.begin(), names.end(), name) != names.end();
}

}  // namespace

absl::StatusOr<LoadedConfig> ParseServeConfig(const std::string& yaml, const std::string& file,
                                              const config::KeySourceParsers& parsers) {
  auto parsed = config::ParseConfig(yaml, file, parsers);
  if (!parsed.ok()) {
    return parsed.status();
  }
  LoadedConfig loaded;
  loaded.config = std::move(*parsed);
  // ParseConfig accepted this text, so it is a mapping whose environments are a sequence, in config order.
  const YAML::Node environments = YAML::Load(yaml)["environments"];
  for (size_t i = 0; i < loaded.config.environments.size(); ++i) {
    loaded.key_source_text[loaded.config.environments[i].name] = YAML::Dump(environments[i]["keySource"]);
  }
  return loaded;
}

absl::StatusOr<LoadedConfig> LoadServeConfig(const std::string& path, const config::KeySourceParsers& parsers) {
  // The same steps as config::LoadConfig, on one read of the file.
  auto text = config::ReadConfigFile(path);
  if (!text.ok()) {
    return text.status();
  }
  return ParseServeConfig(*text, path, parsers);
}

std::string ReloadPlan::Summary() const {
  std::vector<std::string> parts;
  if (!added.empty()) {
    parts.push_back(absl::StrCat("added: ", absl::StrJoin(added, ", ")));
  }
  if (!removed.empty()) {
    parts.push_back(absl::StrCat("removed: ", absl::StrJoin(removed, ", ")));
  }
  std::vector<std::string> changed;
  for (const std::string& name : Changed()) {
    std::vector<std::string> what;
    if (Contains(rekeyed, name)) {
      what.push_back("keySource");
    }
    if (Contains(relistened, name)) {
      what.push_back("socket");
    }
    changed.push_back(absl::StrCat(name, " (", absl::StrJoin(what, ", "), ")"));
  }
  if (!changed.empty()) {
    parts.push_back(absl::StrCat("changed: ", absl::StrJoin(changed, ", ")));
  }
  return parts.empty() ? "no environment changed" : absl::StrJoin(parts, "; ");
}

std::vector<std::string> ReloadPlan::Changed() const {
  std::vector<std::string> changed = relistened;
  for (const std::string& name : rekeyed) {
    if (!Contains(changed, name)) {
      changed.push_back(name);
    }
  }
  return changed;
}

namespace {

// http.tls as one value: its listener and files are set at start (the files' contents are read again at SIGHUP).
std::string TlsText(const std::optional<config::HttpTlsConfig>& tls) {
  if (!tls.has_value()) {
    return "none";
  }
  return absl::StrCat("{listen: ", tls->listen, ", certFile: ", tls->cert_file, ", keyFile: ", tls->key_file,
                      ", clientCAFile: ", tls->client_ca_file, "}");
}

}  // namespace

absl::StatusOr<ReloadPlan> PlanReload(const LoadedConfig& running, const LoadedConfig& next) {
  const std::string& file = next.config.file;
  const config::ServerConfig& server_before = running.config.server;
  const config::ServerConfig& server_after = next.config.server;
  const config::HttpConfig& http_before = running.config.http;
  const config::HttpConfig& http_after = next.config.http;
  for (const absl::Status& status : {
           RestartOnly(file, "server", "pollInterval", absl::FormatDuration(server_before.poll_interval),
                       absl::FormatDuration(server_after.poll_interval)),
           RestartOnly(file, "server", "shutdownGracePeriod",
                       absl::FormatDuration(server_before.shutdown_grace_period),
                       absl::FormatDuration(server_after.shutdown_grace_period)),
           RestartOnly(file, "server", "maxThreads", absl::StrCat(server_before.max_threads),
                       absl::StrCat(server_after.max_threads)),
           RestartOnly(file, "server", "allowUnlockedMemory", server_before.allow_unlocked_memory ? "true" : "false",
                       server_after.allow_unlocked_memory ? "true" : "false"),
           RestartOnly(file, "server", "workers", absl::StrCat(server_before.workers),
                       absl::StrCat(server_after.workers)),
           RestartOnly(file, "server", "maxQueuedCalls", absl::StrCat(server_before.max_queued_calls),
                       absl::StrCat(server_after.max_queued_calls)),
           RestartOnly(file, "http", "enabled", http_before.enabled ? "true" : "false",
                       http_after.enabled ? "true" : "false"),
           RestartOnly(file, "http", "listen", Quoted(http_before.listen), Quoted(http_after.listen)),
           RestartOnly(file, "http", "tls", TlsText(http_before.tls), TlsText(http_after.tls)),
       }) {
    if (!status.ok()) {
      return status;
    }
  }
  ReloadPlan plan;
  std::set<std::string> new_names;
  for (const config::EnvironmentConfig& env : next.config.environments) {
    new_names.insert(env.name);
    auto old_env = running.config.Find(env.name);
    if (!old_env.ok()) {
      plan.added.push_back(env.name);
      continue;
    }
    const config::EnvironmentConfig& before = **old_env;
    const bool relisten = before.socket != env.socket || before.socket_group != env.socket_group ||
                          before.status_version != env.status_version;
    const auto old_text = running.key_source_text.find(env.name);
    const auto new_text = next.key_source_text.find(env.name);
    const bool rekey = old_text == running.key_source_text.end() || new_text == next.key_source_text.end() ||
                       old_text->second != new_text->second;
    if (relisten) {
      plan.relistened.push_back(env.name);
    }
    if (rekey) {
      plan.rekeyed.push_back(env.name);
    }
    if (!relisten && !rekey) {
      plan.unchanged.push_back(env.name);
    }
  }
  for (const config::EnvironmentConfig& env : running.config.environments) {
    if (!new_names.contains(env.name)) {
      plan.removed.push_back(env.name);
    }
  }
  return plan;
}

}  // namespace kmsplugin::daemon
