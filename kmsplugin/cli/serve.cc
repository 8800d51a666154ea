#include "kmsplugin/cli/serve.h"


#include <algorithm>
#include <atomic>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "crypto/random.h"
#include "kmsplugin/cli/cli_common.h"
#include "kmsplugin/cli/key_sources.h"
#include "kmsplugin/cli/reload_plan.h"
#include "kmsplugin/config/config.h"
#include "kmsplugin/core/clock.h"
#include "kmsplugin/core/envelope_service.h"
#include "kmsplugin/observe/http_endpoint.h"
#include "kmsplugin/observe/instrumented_key_source.h"
#include "kmsplugin/observe/log.h"
#include "kmsplugin/observe/metrics.h"
#include "kmsplugin/server/server_runner.h"

namespace kmsplugin::cli {
namespace {

constexpr absl::Duration kProbeTimeout = absl::Seconds(5);

using Services = std::vector<std::shared_ptr<core::EnvelopeService>>;
using ServicesFn = std::function<Services()>;

absl::Status ForEnvironment(const std::string& environment, const absl::Status& status) {
  return absl::Status(status.code(), absl::StrCat("environment \"", environment, "\": ", status.message()));
}

// The environment's key source, opened and instrumented (backend metrics), not yet refreshed.
absl::StatusOr<std::shared_ptr<core::KeySource>> OpenSource(const config::EnvironmentConfig& env, int max_threads,
                                                            observe::Registry& registry) {
  auto opened = env.key_source->Open(ContextFor(env.name, max_threads));
  if (!opened.ok()) {
    return ForEnvironment(env.name, opened.status());
  }
  return std::shared_ptr<core::KeySource>(
      std::make_shared<observe::InstrumentedKeySource>(std::move(opened->source), env.name, registry));
}

std::shared_ptr<core::EnvelopeService> MakeService(const config::EnvironmentConfig& env,
                                                   const config::ServerConfig& server,
                                                   std::shared_ptr<core::KeySource> source) {
  core::EnvelopeService::Options options;
  options.environment = env.name;
  options.status_version = env.status_version;
  // Two missed probes are tolerated before Status turns unhealthy on age alone.
  options.health_max_age = 3 * server.poll_interval + kProbeTimeout;
  return std::make_shared<core::EnvelopeService>(options, std::move(source), core::SystemClock(),
                                                 crypto::SystemRandom());
}

// Gauges read from state at scrape time, so an old key_id disappears from kmsplugin_key_info after a rotation,
// and an environment a reload removed disappears from every family.
void RegisterStateMetrics(observe::Registry& registry, ServicesFn services) {
  registry.AddGaugeCollector("kmsplugin_build_info", "Always 1; the version label names the build.", [] {
    return std::vector<observe::Sample>{{{{"version", KMSPLUGIN_VERSION}}, 1}};
  });
  registry.AddGaugeCollector(
      "kmsplugin_key_info", "Always 1; names each environment's current key_id (the one Status reports).",
      [services] {
        std::vector<observe::Sample> samples;
        for (const auto& service : services()) {
          samples.push_back({{{"environment", service->environment()},
                              {"key_source", crypto::KeySourceKindName(service->key_source()->Kind())},
                              {"key_id", service->Status().key_id}},
                             1});
        }
        return samples;
      });
  registry.AddGaugeCollector("kmsplugin_environment_healthy",
                             "1 when the environment's last wrap+unwrap health probe succeeded recently.", [services] {
                               std::vector<observe::Sample> samples;
                               for (const auto& service : services()) {
                                 samples.push_back({{{"environment", service->environment()}},
                                                    service->Status().healthz == "ok" ? 1.0 : 0.0});
                               }
                               return samples;
                             });
  registry.AddGaugeCollector(
      "kmsplugin_key_last_rotation_timestamp_seconds", "Creation time of each environment's current key version.",
      [services] {
        std::vector<observe::Sample> samples;
        for (const auto& service : services()) {
          if (auto current = service->key_source()->Current(); current.ok()) {
            samples.push_back({{{"environment", service->environment()}},
                               static_cast<double>(absl::ToUnixSeconds(current->created))});
          }
        }
        return samples;
      });
  registry.AddGaugeCollector("kmsplugin_key_versions", "Key versions by environment and state.", [services] {
    std::vector<observe::Sample> samples;
    for (const auto& service : services()) {
      auto versions = service->key_source()->Versions();
      if (!versions.ok()) {
        continue;
      }
      std::map<std::string, double> by_state{{"current", 0}, {"active", 0}, {"retired", 0}};
      for (const core::KeyVersion& v : *versions) {
        by_state[std::string(core::KeyStateName(v.state))] += 1;
      }
      for (const auto& [state, count] : by_state) {
        samples.push_back({{{"environment", service->environment()}, {"state", state}}, count});
      }
    }
    return samples;
  });
}

// Backend numbers (Vault token TTL, HSM session pool): one family per name any key source reports. Called at
// start and after each applied reload (a new environment may bring a new family); `registered` remembers.
void RegisterBackendGauges(observe::Registry& registry, const ServicesFn& services, std::set<std::string>& registered) {
  for (const auto& service : services()) {
    for (const core::BackendGauge& gauge : service->key_source()->BackendGauges()) {
      if (!registered.insert(gauge.name).second) {
        continue;
      }
      registry.AddGaugeCollector(gauge.name, gauge.help, [services, name = gauge.name] {
        std::vector<observe::Sample> samples;
        for (const auto& service : services()) {
          for (const core::BackendGauge& g : service->key_source()->BackendGauges()) {
            if (g.name == name) {
              samples.push_back({{{"environment", service->environment()}}, g.value});
            }
          }
        }
        return samples;
      });
    }
  }
}

// SIGHUP: re-reads the config file and applies it through ServerRunner::Apply, all or nothing.
class ConfigReloader {
 public:
  ConfigReloader(std::string path, LoadedConfig running, observe::Registry& registry, server::ServerRunner& runner)
      : path_(std::move(path)), running_(std::move(running)), registry_(registry), runner_(runner) {
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

  void Reload() {
    ReloadPlan plan;
    if (absl::Status status = TryReload(plan); !status.ok()) {
      rejected_->Increment();
      last_ok_.store(false);
      observe::Log(spdlog::level::err, "config reload rejected",
                   {{"event", "reload"},
                    {"result", "rejected"},
                    {"config", path_},
                    {"error", std::string(status.message())},
                    {"serving", "the previous configuration, unchanged"}});
      return;
    }
    applied_->Increment();
    last_ok_.store(true);
    last_success_.store(absl::ToUnixSeconds(absl::Now()));
    RegisterBackendGauges(registry_, services_, backend_gauges_);
    observe::Log(spdlog::level::info, "config reloaded",
                 {{"event", "reload"},
                  {"result", "applied"},
                  {"config", path_},
                  {"summary", plan.Summary()},
                  {"added", plan.added},
                  {"removed", plan.removed},
                  {"changed", plan.Changed()}});
  }

 private:
  absl::Status TryReload(ReloadPlan& plan) {
    auto next = LoadServeConfig(path_, BuiltInKeySources());
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
        auto opened = OpenSource(env, config.server.max_threads, registry_);
        if (!opened.ok()) {
          return opened.status();
        }
        source = std::move(*opened);
        if (auto status = source->Refresh(absl::Now() + kProbeTimeout); !status.ok()) {
          return ForEnvironment(env.name, status);
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
        return ForEnvironment(env.name, absl::UnavailableError(absl::StrCat(
                                            "the wrap+unwrap probe of its key source failed: ", probed.message)));
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

  const std::string path_;
  LoadedConfig running_;  // only the signal thread touches it
  observe::Registry& registry_;
  server::ServerRunner& runner_;
  ServicesFn services_;
  std::set<std::string> backend_gauges_;
  observe::Counter* applied_ = nullptr;
  observe::Counter* rejected_ = nullptr;
  std::atomic<bool> last_ok_{true};
  std::atomic<int64_t> last_success_{0};
};

}  // namespace

int Serve(const std::string& config_path) {
  HardenProcess();
  server::BlockServerSignals();
  auto loaded = LoadServeConfig(config_path, BuiltInKeySources());
  if (!loaded.ok()) {
    return Fail(loaded.status());
  }
  const config::Config& config = loaded->config;
  observe::Registry registry;
  std::vector<server::ServedEnvironment> served;
  for (const config::EnvironmentConfig& env : config.environments) {
    auto source = OpenSource(env, config.server.max_threads, registry);
    if (!source.ok()) {
      return Fail(source.status());
    }
    served.push_back(
        server::ServedEnvironment{env.socket, env.socket_group, MakeService(env, config.server, std::move(*source))});
  }
  server::RunnerOptions options;
  options.poll_interval = config.server.poll_interval;
  options.shutdown_grace_period = config.server.shutdown_grace_period;
  options.probe_timeout = kProbeTimeout;
  options.tuning.max_threads = config.server.max_threads;
  options.registry = &registry;
  server::ServerRunner runner(options, std::move(served));
  RegisterStateMetrics(registry, [&runner] { return runner.Services(); });
  if (auto status = runner.Start(); !status.ok()) {
    return Fail(status);
  }
  const size_t environments = config.environments.size();
  const config::HttpConfig http_config = config.http;
  ConfigReloader reloader(config_path, std::move(*loaded), registry, runner);
  runner.SetReloadHandler([&reloader] { reloader.Reload(); });
  std::unique_ptr<observe::HttpEndpoint> http;
  if (http_config.enabled) {
    auto endpoint = observe::HttpEndpoint::Start(http_config.listen, registry, [&runner] {
      std::vector<observe::Readiness> report;
      for (const auto& service : runner.Services()) {
        const core::StatusResult status = service->Status();
        report.push_back({service->environment(), status.healthz == "ok", status.healthz});
      }
      return report;
    });
    if (!endpoint.ok()) {
      runner.Shutdown();
      return Fail(endpoint.status());
    }
    http = std::move(*endpoint);
    observe::Log(spdlog::level::info, "http listening",
                 {{"address", http_config.listen}, {"port", http->port()}, {"paths", "/metrics /healthz /readyz"}});
  }
  observe::Log(spdlog::level::info, "ready", {{"version", KMSPLUGIN_VERSION}, {"environments", environments}});
  const absl::Status stopped = runner.RunUntilSignalled();
  http.reset();
  return stopped.ok() ? 0 : 1;
}

}  // namespace kmsplugin::cli
