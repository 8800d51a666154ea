#include "kmsplugin/daemon/daemon.h"

#include <memory>
#include <vector>

#include <spdlog/spdlog.h>

#include "kmsplugin/daemon/config_reloader.h"
#include "kmsplugin/daemon/reload_plan.h"
#include "kmsplugin/daemon/source_opener.h"
#include "kmsplugin/daemon/state_metrics.h"
#include "kmsplugin/keysource/registry.h"
#include "kmsplugin/observe/http_endpoint.h"
#include "kmsplugin/observe/log.h"
#include "kmsplugin/observe/metrics.h"
#include "kmsplugin/server/server_runner.h"

namespace kmsplugin::daemon {

absl::Status RunDaemon(const DaemonOptions& options) {
  server::BlockServerSignals();
  auto loaded = LoadServeConfig(options.config_path, keysource::KeySourceParsers());
  if (!loaded.ok()) {
    return loaded.status();
  }
  const config::Config& config = loaded->config;
  observe::Registry registry;
  SourceOpener opener(registry, config.server.workers, config.server.poll_interval);
  std::vector<server::ServedEnvironment> served;
  for (const config::EnvironmentConfig& env : config.environments) {
    served.push_back(server::ServedEnvironment{env.socket, env.socket_group,
                                               MakeService(env, config.server, opener.OpenOrKeepTrying(env))});
  }
  server::RunnerOptions runner_options;
  runner_options.poll_interval = config.server.poll_interval;
  runner_options.shutdown_grace_period = config.server.shutdown_grace_period;
  runner_options.probe_timeout = kProbeTimeout;
  runner_options.tuning.max_threads = config.server.max_threads;
  runner_options.tuning.workers = config.server.workers;
  runner_options.tuning.max_queued_calls = config.server.max_queued_calls;
  runner_options.registry = &registry;
  server::ServerRunner runner(runner_options, std::move(served));
  opener.OnStarted([&runner] { runner.RequestRefresh(); });
  // Destroyed before the runner, on every path out: a source starting then must not reach a runner going away.
  struct ForgetRunner {
    SourceOpener& opener;
    ~ForgetRunner() { opener.OnStarted({}); }
  } forget_runner{opener};
  RegisterStateMetrics(registry, [&runner] { return runner.Services(); }, options.version);
  if (auto status = runner.Start(); !status.ok()) {
    return status;
  }
  const size_t environments = config.environments.size();
  const config::HttpConfig http_config = config.http;
  ConfigReloader reloader(options.config_path, std::move(*loaded), registry, runner, opener);
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
      return endpoint.status();
    }
    http = std::move(*endpoint);
    observe::Log(spdlog::level::info, "http listening",
                 {{"address", http_config.listen}, {"port", http->port()}, {"paths", "/metrics /healthz /readyz"}});
  }
  observe::Log(spdlog::level::info, "ready", {{"version", options.version}, {"environments", environments}});
  const absl::Status stopped = runner.RunUntilSignalled();
  http.reset();
  return stopped;
}

}  // namespace kmsplugin::daemon
