#include "kmsplugin/daemon/daemon.h"

#include <sys/resource.h>

#include <algorithm>
#include <memory>
#include <vector>

#include <spdlog/spdlog.h>

#include "absl/strings/str_cat.h"

#include "kmsplugin/core/exit_codes.h"
#include "kmsplugin/daemon/config_reloader.h"
#include "kmsplugin/daemon/http_tls.h"
#include "kmsplugin/daemon/memory_lock.h"
#include "kmsplugin/daemon/reload_plan.h"
#include "kmsplugin/daemon/source_opener.h"
#include "kmsplugin/daemon/state_metrics.h"
#include "kmsplugin/daemon/systemd_notifier.h"
#include "kmsplugin/keysource/registry.h"
#include "kmsplugin/observe/http_endpoint.h"
#include "kmsplugin/observe/log.h"
#include "kmsplugin/observe/metrics.h"
#include "kmsplugin/observe/process_metrics.h"
#include "kmsplugin/server/server_runner.h"

namespace kmsplugin::daemon {
namespace {

// Every connection, key file and backend session costs a descriptor; running out is how one local user stopped
// the gRPC socket (issue 11, item 2). The soft limit (1024 by default under systemd) is raised to the hard limit
// the operator gave (LimitNOFILE= in deploy/systemd/kmsplugin.service); the per-socket and HTTP connection limits
// keep a flood far below it.
void RaiseFileLimit() {
  rlimit limit{};
  if (getrlimit(RLIMIT_NOFILE, &limit) != 0) {
    return;
  }
  const rlim_t before = limit.rlim_cur;
  if (limit.rlim_cur < limit.rlim_max) {
    limit.rlim_cur = limit.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &limit) != 0) {
      limit.rlim_cur = before;
    }
  }
  if (limit.rlim_cur < 4096) {
    observe::Log(spdlog::level::warn, "file descriptor limit is low",
                 {{"soft", static_cast<uint64_t>(limit.rlim_cur)}, {"hard", static_cast<uint64_t>(limit.rlim_max)},
                  {"fix", "raise LimitNOFILE= (systemd) or the container's nofile ulimit to 65536"}});
  } else {
    observe::Log(spdlog::level::info, "file descriptor limit",
                 {{"soft", static_cast<uint64_t>(limit.rlim_cur)}, {"hard", static_cast<uint64_t>(limit.rlim_max)},
                  {"raised_from", static_cast<uint64_t>(before)}});
  }
}

// SIGHUP: the TLS listener's files again (a renewed certificate). A failure keeps the context in use.
void ReloadHttpTls(const std::string& config_path, const config::HttpTlsConfig& tls, observe::HttpEndpoint& endpoint) {
  auto context = LoadHttpTls(config_path, tls);
  if (!context.ok()) {
    observe::Log(spdlog::level::err, "http tls reload rejected",
                 {{"event", "reload"},
                  {"error", std::string(context.status().message())},
                  {"serving", "the previous certificate and key, unchanged"}});
    return;
  }
  endpoint.SetTls(std::move(*context));
  observe::Log(spdlog::level::info, "http tls reloaded", {{"event", "reload"}, {"file", tls.cert_file}});
}

}  // namespace

absl::Status RunDaemon(const DaemonOptions& options) {
  server::BlockServerSignals();
  auto loaded = LoadServeConfig(options.config_path, keysource::KeySourceParsers());
  if (!loaded.ok()) {
    return core::AsUsageError(loaded.status());  // one line, nothing logged before it
  }
  RaiseFileLimit();
  const config::Config& config = loaded->config;
  for (const config::EnvironmentConfig& env : config.environments) {
    for (const std::string& warning : env.key_source->Warnings()) {
      observe::Log(spdlog::level::warn, "config warning",
                   {{"event", "config_warning"}, {"environment", env.name}, {"warning", warning}});
    }
  }
  observe::Registry registry;
  registry.AddCollectable(std::make_shared<observe::ProcessCollector>());
  // Before any key source puts a secret in memory.
  if (auto locked = CheckLockedMemory(config.server.allow_unlocked_memory, registry); !locked.ok()) {
    return locked;
  }
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
  SystemdNotifier notifier;
  const auto serving_line = [&runner] { return absl::StrCat("serving ", runner.Services().size(), " environment(s)"); };
  // The TLS metrics listener (http.tls), if configured: its files are read again at each SIGHUP.
  std::unique_ptr<observe::HttpEndpoint> tls_http;
  runner.SetReloadHandler([&reloader, &notifier, &serving_line, &tls_http, &http_config, &options] {
    notifier.Reloading("reloading the configuration (SIGHUP)");
    reloader.Reload();
    if (tls_http != nullptr) {
      ReloadHttpTls(options.config_path, *http_config.tls, *tls_http);
    }
    notifier.Ready(serving_line());
  });
  runner.SetStopHandler([&notifier] { notifier.Stopping("draining in-flight calls"); });
  std::unique_ptr<observe::HttpEndpoint> http;
  const auto readiness = [&runner] {
    std::vector<observe::Readiness> report;
    for (const auto& service : runner.Services()) {
      const core::StatusResult status = service->Status();
      report.push_back({service->environment(), status.healthz == "ok", status.healthz});
    }
    return report;
  };
  const auto liveness = [&runner] {
    // /healthz: a socket that no longer answers makes the process not alive, so a liveness probe restarts it
    // if the runner cannot bind it again by itself.
    std::vector<observe::Readiness> report;
    for (const server::SocketHealth& socket : runner.Sockets()) {
      report.push_back({socket.environment, socket.answering,
                        absl::StrCat("socket ", socket.socket, " does not answer: ", socket.reason)});
    }
    return report;
  };
  if (http_config.enabled && http_config.tls.has_value()) {
    auto context = LoadHttpTls(options.config_path, *http_config.tls);
    if (!context.ok()) {
      runner.Shutdown();
      return core::AsUsageError(context.status());
    }
    auto endpoint = observe::HttpEndpoint::Start(http_config.tls->listen, registry, readiness, liveness, {},
                                                 std::move(*context));
    if (!endpoint.ok()) {
      runner.Shutdown();
      return endpoint.status();
    }
    tls_http = std::move(*endpoint);
    observe::Log(spdlog::level::info, "https listening, client certificates required",
                 {{"address", http_config.tls->listen},
                  {"port", tls_http->port()},
                  {"paths", "/metrics /healthz /readyz"}});
  }
  if (http_config.enabled) {
    auto endpoint = observe::HttpEndpoint::Start(http_config.listen, registry, readiness, liveness);
    if (!endpoint.ok()) {
      runner.Shutdown();
      return endpoint.status();
    }
    http = std::move(*endpoint);
    observe::Log(spdlog::level::info, "http listening",
                 {{"address", http_config.listen}, {"port", http->port()}, {"paths", "/metrics /healthz /readyz"}});
  }
  observe::Log(spdlog::level::info, "ready", {{"program_version", options.version}, {"environments", environments}});
  // Every socket listens and the HTTP endpoint answers: units ordered after this one may start now.
  notifier.Ready(serving_line());
  // A maintenance pass takes at most a refresh and a probe per environment, each bounded by the probe timeout;
  // beyond that (plus a poll interval and slack) the daemon is wedged, and systemd may restart it.
  const absl::Duration stuck_after = config.server.poll_interval +
                                     2 * kProbeTimeout * static_cast<int64_t>(environments + 1) + absl::Seconds(5);
  // Alive for systemd's watchdog by the rule of /healthz, plus progress: every socket answers its Status probe.
  notifier.StartWatchdog([&runner, stuck_after] {
    if (!runner.MaintenanceProgressing(stuck_after)) {
      return false;
    }
    const std::vector<server::SocketHealth> sockets = runner.Sockets();
    return std::all_of(sockets.begin(), sockets.end(), [](const server::SocketHealth& s) { return s.answering; });
  });
  const absl::Status stopped = runner.RunUntilSignalled();
  http.reset();
  tls_http.reset();
  return stopped;
}

}  // namespace kmsplugin::daemon
