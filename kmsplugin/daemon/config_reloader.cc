#include "kmsplugin/daemon/config_reloader.h"

#include <algorithm>
#include <map>
#include <memory>
#include <vector>

#include <spdlog/spdlog.h>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "kmsplugin/keysource/registry.h"
#include "kmsplugin/observe/log.h"

namespace kmsplugin::daemon {

ConfigReloader::ConfigReloader(std::string path, LoadedConfig running, observe::Registry& registry,
                               server::ServerRunner& runner, SourceOpener& opener)
    : path_(std::move(path)), running_(std::move(running)), registry_(registry), runner_(runner), opener_(opener) {
  services_ = [&runner] { return runner.Services(); };
  RegisterBackendGauges(registry_, services_, backend_gauges_);
  const char* help = "Configuration reloads (SIGHUP) by result: applied or rejected.";
  applied_ = &registry_.GetCounter("kmsplugin_config_reloads_total", help, {{"result", "applied"}});
  rejected_ = &registry_.GetCounter("kmsplugin_config_reloads_total", help, {{"result", "rejected"}});
  last_success_.store(absl::ToUnixSeconds(absl::Now()));
  registry_.AddGaugeCollector(
      "kmsplugin_config_last_reload_successful",
      "1 when the last configuration reload was applied (or none was tried since start), 0 when it was rejected "
      "and the previous configuration keeps serving.",
      [this] { return std::vector<observe::Sample>{{{}, last_ok_.load() ? 1.0 : 0.0}}; });
  registry_.AddGaugeCollector(
      "kmsplugin_config_last_reload_success_timestamp_seconds",
      "Unix time of the last configuration load that was applied (the start counts).",
      [this] { return std::vector<observe::Sample>{{{}, static_cast<double>(last_success_.load())}}; });
}

void ConfigReloader::Reload() {
  ReloadPlan plan;
  if (absl::Status status = TryReload(plan); !status.ok()) {
    // The line first, then the counter: whoever sees the counter move can read why (the tests do).
    observe::Log(spdlog::level::err, "config reload rejected",
                 {{"event", "reload"},
                  {"result", "rejected"},
                  {"config", path_},
                  {"error", std::string(status.message())},
                  {"serving", "the previous configuration, unchanged"}});
    last_ok_.store(false);
    rejected_->Increment();
    return;
  }
  RegisterBackendGauges(registry_, services_, backend_gauges_);
  observe::Log(spdlog::level::info, "config reloaded",
               {{"event", "reload"},
                {"result", "applied"},
                {"config", path_},
                {"summary", plan.Summary()},
                {"added", plan.added},
                {"removed", plan.removed},
                {"changed", plan.Changed()}});
  last_ok_.store(true);
  last_success_.store(absl::ToUnixSeconds(absl::Now()));
  applied_->Increment();
}

absl::Status ConfigReloader::TryReload(ReloadPlan& plan) {
  auto next = LoadServeConfig(path_, keysource::KeySourceParsers());
  if (!next.ok()) {
    return next.status();
  }
  auto planned = PlanReload(running_, *next);
  if (!planned.ok()) {
    return planned.status();
  }
  plan = std::move(*planned);
  std::map<std::string, std::shared_ptr<core::EnvelopeService>> served;
  for (const auto& service : runner_.Services()) {
    served.emplace(service->environment(), service);
  }
  const config::Config& config = next->config;
  server::EnvironmentChanges changes;
  auto contains = [](const std::vector<std::string>& names, const std::string& name) {
    return std::find(names.begin(), names.end(), name) != names.end();
  };
  // Everything that can fail happens here, before ServerRunner::Apply; dropping `changes` undoes it.
  for (const config::EnvironmentConfig& env : config.environments) {
    const bool added = contains(plan.added, env.name);
    const bool rekeyed = contains(plan.rekeyed, env.name);
    const bool relistened = contains(plan.relistened, env.name);
    if (!added && !rekeyed && !relistened) {
      continue;
    }
    std::shared_ptr<core::EnvelopeService> old_service;
    if (!added) {
      auto found = served.find(env.name);
      if (found == served.end()) {
        return absl::InternalError(absl::StrCat("environment \"", env.name, "\" is configured but not served"));
      }
      old_service = found->second;
    }
    std::shared_ptr<core::KeySource> source;
    core::Health health;
    if (added || rekeyed) {
      auto opened = opener_.Open(env);
      if (!opened.ok()) {
        return opened.status();
      }
      source = std::move(*opened);
      if (auto status = source->Refresh(absl::Now() + kProbeTimeout); !status.ok()) {
        return absl::Status(status.code(), absl::StrCat("environment \"", env.name, "\": ", status.message()));
      }
      if (rekeyed) {
        auto checked = old_service->CheckReplacement(*source, absl::Now() + kProbeTimeout);
        if (!checked.ok()) {
          return checked.status();
        }
        health = std::move(*checked);
      }
    } else {
      source = old_service->key_source();  // only the socket changes: keep the open key source
    }
    if (rekeyed && !relistened) {
      changes.swap.push_back(server::KeySourceSwap{env.name, std::move(source), std::move(health)});
      continue;
    }
    auto service = MakeService(env, config.server, std::move(source));
    const core::Health probed = service->Probe(absl::Now() + kProbeTimeout);
    if (added && !probed.ok) {
      return absl::UnavailableError(absl::StrCat("environment \"", env.name,
                                                 "\": the wrap+unwrap probe of its key source failed: ",
                                                 probed.message));
    }
    if (relistened) {
      changes.remove.push_back(env.name);
    }
    changes.add.push_back(server::ServedEnvironment{env.socket, env.socket_group, std::move(service)});
  }
  for (const std::string& name : plan.removed) {
    changes.remove.push_back(name);
  }
  if (!changes.empty()) {
    if (auto status = runner_.Apply(std::move(changes)); !status.ok()) {
      return status;
    }
  }
  running_ = std::move(*next);
  return absl::OkStatus();
}

}  // namespace kmsplugin::daemon
