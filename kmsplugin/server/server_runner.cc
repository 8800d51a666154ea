#include "kmsplugin/server/server_runner.h"

#include <pthread.h>
#include <signal.h>
#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <set>
#include <vector>

#include <grpc/grpc.h>
#include <grpcpp/server_builder.h>

#include "absl/strings/str_cat.h"
#include "kmsplugin/core/clock.h"
#include "kmsplugin/observe/log.h"
#include "kmsplugin/server/socket_probe.h"
#include "kmsplugin/server/unix_socket.h"

namespace kmsplugin::server {
namespace {

sigset_t ServerSignals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGHUP);
  return set;
}


// The monotonic reading core::Clock gives, as nanoseconds for an atomic.
int64_t SteadyNanos() { return absl::ToInt64Nanoseconds(core::SystemClock().Elapsed()); }

absl::Status ForEnvironment(const std::string& environment, const absl::Status& status) {
  return absl::Status(status.code(), absl::StrCat("environment \"", environment, "\": ", status.message()));
}

}  // namespace

void BlockServerSignals() {
  const sigset_t set = ServerSignals();
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
}

ServerRunner::ServerRunner(RunnerOptions options, std::vector<ServedEnvironment> environments)
    : options_(std::move(options)) {
  {
    absl::MutexLock lock(&mu_);
    for (ServedEnvironment& environment : environments) {
      auto listener = std::make_unique<Listener>();
      listener->environment = std::move(environment);
      listeners_.push_back(std::move(listener));
    }
  }
  if (options_.registry != nullptr) {
    RegisterLoadMetrics(*options_.registry);
  }
}

void ServerRunner::RegisterLoadMetrics(observe::Registry& registry) {
  struct Load {
    std::string environment;
    std::shared_ptr<CallCounter> calls;
    std::shared_ptr<CallPool> pool;
  };
  // Copies the pointers under mu_ (a listener may be replaced meanwhile); the counts are read without it.
  const auto loads = [this] {
    std::vector<Load> loads;
    absl::ReaderMutexLock lock(&mu_);
    for (const auto& listener : listeners_) {
      loads.push_back({listener->environment.service->environment(), listener->calls, listener->pool});
    }
    return loads;
  };
  registry.AddGaugeCollector(
      "kmsplugin_grpc_requests_in_flight",
      "KMS gRPC calls being handled now (received, not yet answered), by environment, API and RPC.", [loads] {
        std::vector<observe::Sample> samples;
        for (const Load& load : loads()) {
          if (load.calls == nullptr) {
            continue;
          }
          const auto counts = load.calls->InFlightByMethod();
          for (size_t i = 0; i < CallCounter::kMethods.size(); ++i) {
            const CallCounter::Method& method = CallCounter::kMethods[i];
            samples.push_back(
                {{{"environment", load.environment}, {"api", method.api}, {"rpc", method.rpc}}, double(counts[i])});
          }
        }
        return samples;
      });
  registry.AddGaugeCollector(
      "kmsplugin_call_pool_queued_calls",
      "Encrypt and Decrypt calls waiting for a worker of the environment's socket (server.maxQueuedCalls at most).",
      [loads] {
        std::vector<observe::Sample> samples;
        for (const Load& load : loads()) {
          if (load.pool != nullptr) {
            samples.push_back({{{"environment", load.environment}}, double(load.pool->CurrentLoad().queued)});
          }
        }
        return samples;
      });
  registry.AddGaugeCollector(
      "kmsplugin_call_pool_busy_workers",
      "Workers of the environment's socket running a call now (server.workers at most).", [loads] {
        std::vector<observe::Sample> samples;
        for (const Load& load : loads()) {
          if (load.pool != nullptr) {
            samples.push_back({{{"environment", load.environment}}, double(load.pool->CurrentLoad().busy_workers)});
          }
        }
        return samples;
      });
  registry.AddGaugeCollector("kmsplugin_call_pool_workers", "Workers of the environment's socket (server.workers).",
                             [loads] {
                               std::vector<observe::Sample> samples;
                               for (const Load& load : loads()) {
                                 if (load.pool != nullptr) {
                                   samples.push_back({{{"environment", load.environment}}, double(load.pool->workers())});
                                 }
                               }
                               return samples;
                             });
}

ServerRunner::~ServerRunner() { Shutdown(); }

absl::Status ServerRunner::Start() {
  std::vector<Listener*> listeners;
  {
    absl::MutexLock lock(&mu_);
    if (started_) {
      return absl::FailedPreconditionError("ServerRunner::Start called twice");
    }
    started_ = true;
    for (const auto& listener : listeners_) {
      listeners.push_back(listener.get());
    }
  }
  MaintainOnce();
  for (Listener* listener : listeners) {
    if (auto status = StartListener(*listener); !status.ok()) {
      Shutdown();
      return status;
    }
  }
  last_progress_ns_.store(SteadyNanos());
  maintenance_ = std::thread([this] { MaintenanceLoop(); });
  return absl::OkStatus();
}

absl::Status ServerRunner::StartListener(Listener& listener) {
  const ServedEnvironment& env = listener.environment;
  if (auto status = PrepareSocketPath(env.socket, env.socket_group); !status.ok()) {
    return status;
  }
  listener.server.reset();  // a pool is replaced only once its server is gone
  {
    absl::MutexLock lock(&mu_);
    listener.pool = std::make_shared<CallPool>(
        CallPool::Options{options_.tuning.workers, options_.tuning.max_queued_calls});
    listener.calls = std::make_shared<CallCounter>();
  }
  listener.v2 = std::make_unique<KmsV2Service>(*env.service, *listener.pool, options_.registry);
  listener.v1beta1 = std::make_unique<KmsV1beta1Service>(*env.service, *listener.pool, options_.registry);
  grpc::ServerBuilder builder;
  ApplyServerTuning(options_.tuning, builder);
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> interceptors;
  interceptors.push_back(listener.calls->Factory());
  builder.experimental().SetInterceptorCreators(std::move(interceptors));
  // No AddListeningPort: the SocketListener accepts and hands each connection over (socket_listener.h: why).
  builder.RegisterService(listener.v2.get());
  builder.RegisterService(listener.v1beta1.get());
  listener.server = builder.BuildAndStart();
  if (listener.server == nullptr) {
    return absl::UnavailableError(absl::StrCat("cannot start the gRPC server for ", env.socket));
  }
  auto socket = Listen(listener);
  if (!socket.ok()) {
    listener.server->Shutdown(std::chrono::system_clock::now());
    listener.server->Wait();
    listener.server.reset();
    return socket.status();
  }
  {
    absl::MutexLock lock(&mu_);
    listener.inode = (*socket)->inode();
    listener.socket = std::move(*socket);
    listener.answering = true;
    listener.reason.clear();
  }
  const core::StatusResult status = env.service->Status();
  observe::Log(spdlog::level::info, "serving",
               {{"environment", env.service->environment()},
                {"socket", env.socket},
                {"key_id", status.key_id},
                {"healthz", status.healthz}});
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<SocketListener>> ServerRunner::Listen(const Listener& listener) {
  const ServedEnvironment& env = listener.environment;
  ListenerMetrics metrics;
  if (options_.registry != nullptr) {
    const std::string name = "kmsplugin_socket_connections_refused_total";
    const std::string help =
        "Connections to a socket not served: over the per-socket connection limit (closed at once), or accept "
        "failed for lack of descriptors or memory (retried), by environment.";
    const std::string environment = env.service->environment();
    metrics.over_limit = &options_.registry->GetCounter(name, help, {{"environment", environment}, {"reason", "limit"}});
    metrics.accept_errors =
        &options_.registry->GetCounter(name, help, {{"environment", environment}, {"reason", "accept_error"}});
  }
  return SocketListener::Start(env.socket, env.socket_group, listener.server.get(), options_.listener, metrics);
}

void ServerRunner::StopListeners(const std::vector<Listener*>& listeners) {
  // Stop accepting first, so no connection arrives while the servers drain.
  std::vector<std::unique_ptr<SocketListener>> sockets;
  {
    absl::MutexLock lock(&mu_);
    for (Listener* listener : listeners) {
      sockets.push_back(std::move(listener->socket));
    }
  }
  sockets.clear();
  // All servers drain at once, against one deadline. A server with no call in flight has its connections
  // closed at once (call_counter.h: why), so idle clients do not hold the exit for the grace period.
  const auto deadline = std::chrono::system_clock::now() + absl::ToChronoSeconds(options_.shutdown_grace_period);
  struct Drain {
    Listener* listener;
    std::atomic<bool> done{false};
    bool idle_closed = false;
    std::thread thread;
  };
  std::vector<std::unique_ptr<Drain>> drains;
  for (Listener* listener : listeners) {
    if (listener->server != nullptr) {
      auto drain = std::make_unique<Drain>();
      drain->listener = listener;
      drain->thread = std::thread([raw = drain.get(), deadline] {
        raw->listener->server->Shutdown(deadline);
        raw->done = true;
      });
      drains.push_back(std::move(drain));
    }
  }
  for (bool waiting = true; waiting;) {
    waiting = false;
    for (const auto& drain : drains) {
      if (drain->done) {
        continue;
      }
      waiting = true;
      if (!drain->idle_closed && drain->listener->calls->InFlight() == 0) {
        // No handler runs: only idle connections (and calls not yet started, which the client sees as
        // UNAVAILABLE, as it would moments later) are left.
        grpc_server_cancel_all_calls(drain->listener->server->c_server());
        drain->idle_closed = true;
      }
    }
    if (waiting) {
      absl::SleepFor(absl::Milliseconds(5));
    }
  }
  for (const auto& drain : drains) {
    drain->thread.join();
  }
  for (Listener* listener : listeners) {
    if (listener->server != nullptr) {
      listener->server->Wait();
      listener->server.reset();
      RemoveSocket(listener->environment.socket, listener->inode);
      observe::Log(spdlog::level::info, "stopped",
                   {{"environment", listener->environment.service->environment()},
                    {"socket", listener->environment.socket}});
    }
  }
}

absl::Status ServerRunner::CheckChanges(const EnvironmentChanges& changes) {
  std::map<std::string, const Listener*> served;  // by environment name
  std::map<std::string, std::string> sockets;     // socket → environment name
  for (const auto& listener : listeners_) {
    served.emplace(listener->environment.service->environment(), listener.get());
    sockets.emplace(listener->environment.socket, listener->environment.service->environment());
  }
  std::set<std::string> removed;
  for (const std::string& name : changes.remove) {
    if (!served.contains(name)) {
      return absl::NotFoundError(absl::StrCat("environment \"", name, "\" is not served, so it cannot be removed"));
    }
    if (!removed.insert(name).second) {
      return absl::InvalidArgumentError(absl::StrCat("environment \"", name, "\" is removed twice"));
    }
  }
  std::set<std::string> swapped;
  for (const KeySourceSwap& swap : changes.swap) {
    if (!served.contains(swap.environment) || removed.contains(swap.environment)) {
      return absl::NotFoundError(
          absl::StrCat("environment \"", swap.environment, "\" is not served, so its key source cannot be replaced"));
    }
    if (swap.source == nullptr || !swapped.insert(swap.environment).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("environment \"", swap.environment, "\": one new key source is needed, no more"));
    }
  }
  std::set<std::string> added_names;
  std::set<std::string> added_sockets;
  for (const ServedEnvironment& env : changes.add) {
    if (env.service == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("an added environment on ", env.socket, " has no service"));
    }
    const std::string& name = env.service->environment();
    if (!added_names.insert(name).second) {
      return absl::InvalidArgumentError(absl::StrCat("environment \"", name, "\" is added twice"));
    }
    if (served.contains(name) && !removed.contains(name)) {
      return absl::AlreadyExistsError(absl::StrCat("environment \"", name, "\" is served already"));
    }
    if (!added_sockets.insert(env.socket).second) {
      return absl::InvalidArgumentError(absl::StrCat("socket ", env.socket, " is given to two environments"));
    }
    if (auto holder = sockets.find(env.socket); holder != sockets.end() && !removed.contains(holder->second)) {
      return absl::AlreadyExistsError(absl::StrCat("socket ", env.socket, " of environment \"", name,
                                                   "\" is served by environment \"", holder->second, "\""));
    }
    if (env.socket_group.has_value()) {
      if (auto status = LookupGroup(*env.socket_group).status(); !status.ok()) {
        return ForEnvironment(name, status);
      }
    }
  }
  return absl::OkStatus();
}

absl::Status ServerRunner::Apply(EnvironmentChanges changes) {
  absl::MutexLock change_lock(&change_mu_);
  std::vector<Listener*> removed;
  std::map<std::string, std::shared_ptr<core::EnvelopeService>> services;
  {
    absl::ReaderMutexLock lock(&mu_);
    if (!started_ || stopped_) {
      return absl::FailedPreconditionError("the server is not running; nothing was changed");
    }
    if (auto status = CheckChanges(changes); !status.ok()) {
      return status;
    }
    const std::set<std::string> to_remove(changes.remove.begin(), changes.remove.end());
    for (const auto& listener : listeners_) {
      const std::shared_ptr<core::EnvelopeService>& service = listener->environment.service;
      services.emplace(service->environment(), service);
      if (to_remove.contains(service->environment())) {
        removed.push_back(listener.get());
      }
    }
  }
  std::set<std::string> removed_sockets;
  for (const Listener* listener : removed) {
    removed_sockets.insert(listener->environment.socket);
  }
  // A socket nobody serves now is bound before anything is stopped; one a removed environment holds, after.
  std::vector<std::unique_ptr<Listener>> early;
  std::vector<std::unique_ptr<Listener>> late;
  for (ServedEnvironment& env : changes.add) {
    auto listener = std::make_unique<Listener>();
    listener->environment = std::move(env);
    (removed_sockets.contains(listener->environment.socket) ? late : early).push_back(std::move(listener));
  }
  std::vector<Listener*> started;
  for (const auto& listener : early) {
    if (auto status = StartListener(*listener); !status.ok()) {
      StopListeners(started);
      return ForEnvironment(listener->environment.service->environment(), status);
    }
    started.push_back(listener.get());
  }
  StopListeners(removed);
  for (const auto& listener : late) {
    if (auto status = StartListener(*listener); !status.ok()) {
      StopListeners(started);
      for (Listener* old : removed) {
        if (auto again = StartListener(*old); !again.ok()) {
          observe::Log(spdlog::level::err, "environment could not be served again after a failed change",
                       {{"environment", old->environment.service->environment()},
                        {"socket", old->environment.socket},
                        {"error", std::string(again.message())}});
        }
      }
      return ForEnvironment(listener->environment.service->environment(), status);
    }
    started.push_back(listener.get());
  }
  for (KeySourceSwap& swap : changes.swap) {
    services.at(swap.environment)->ReplaceKeySource(std::move(swap.source), std::move(swap.health));
  }
  std::vector<std::unique_ptr<Listener>> stopped;  // destroyed outside the lock
  {
    absl::MutexLock lock(&mu_);
    for (auto it = listeners_.begin(); it != listeners_.end();) {
      if (std::find(removed.begin(), removed.end(), it->get()) != removed.end()) {
        stopped.push_back(std::move(*it));
        it = listeners_.erase(it);
      } else {
        ++it;
      }
    }
    for (auto* group : {&early, &late}) {
      for (auto& listener : *group) {
        listeners_.push_back(std::move(listener));
      }
    }
  }
  return absl::OkStatus();
}

std::vector<SocketHealth> ServerRunner::Sockets() const {
  absl::ReaderMutexLock lock(&mu_);
  std::vector<SocketHealth> sockets;
  for (const auto& listener : listeners_) {
    sockets.push_back({listener->environment.service->environment(), listener->environment.socket,
                       listener->answering, listener->reason});
  }
  return sockets;
}

absl::StatusOr<ListenerCounts> ServerRunner::SocketCounts(const std::string& environment) const {
  absl::ReaderMutexLock lock(&mu_);
  for (const auto& listener : listeners_) {
    if (listener->environment.service->environment() == environment && listener->socket != nullptr) {
      return listener->socket->Counts();
    }
  }
  return absl::NotFoundError(absl::StrCat("environment \"", environment, "\" has no socket served"));
}

std::vector<std::shared_ptr<core::EnvelopeService>> ServerRunner::Services() const {
  absl::ReaderMutexLock lock(&mu_);
  std::vector<std::shared_ptr<core::EnvelopeService>> services;
  services.reserve(listeners_.size());
  for (const auto& listener : listeners_) {
    services.push_back(listener->environment.service);
  }
  return services;
}

void ServerRunner::SetReloadHandler(std::function<void()> handler) { reload_handler_ = std::move(handler); }

void ServerRunner::SetStopHandler(std::function<void()> handler) { stop_handler_ = std::move(handler); }

bool ServerRunner::MaintenanceProgressing(absl::Duration limit) const {
  return absl::Nanoseconds(SteadyNanos() - last_progress_ns_.load()) <= limit;
}

namespace {

// The versions `source` reports retired ("1,2"); empty when none are or the versions are unknown.
std::vector<uint64_t> RetiredVersions(const core::KeySource& source) {
  std::vector<uint64_t> retired;
  if (auto versions = source.Versions(); versions.ok()) {
    for (const core::KeyVersion& v : *versions) {
      if (v.state == core::KeyState::kRetired) {
        retired.push_back(v.version);
      }
    }
  }
  return retired;
}

}  // namespace

void ServerRunner::MaintainOnce() {
  for (const std::shared_ptr<core::EnvelopeService>& service : Services()) {
    const std::string before = service->Status().key_id;
    const std::vector<uint64_t> retired_before = RetiredVersions(*service->key_source());
    if (auto status = service->key_source()->Refresh(absl::Now() + options_.probe_timeout); !status.ok()) {
      observe::Log(spdlog::level::err, "key source refresh failed",
                   {{"environment", service->environment()}, {"error", std::string(status.message())}});
    }
    // A retire or reinstate (by `kmsplugin retire` or in the backend) is in force from here on: say so once.
    if (const auto retired_after = RetiredVersions(*service->key_source()); retired_after != retired_before) {
      observe::Log(spdlog::level::warn, "retired key versions changed",
                   {{"event", "retire"}, {"environment", service->environment()},
                    {"retired_before", retired_before}, {"retired", retired_after}});
    }
    const core::Health health = service->Probe(absl::Now() + options_.probe_timeout);
    const std::string after = service->Status().key_id;
    if (after != before) {
      observe::Log(spdlog::level::info, "key rotation noticed",
                   {{"event", "rotation"}, {"environment", service->environment()}, {"old_key_id", before},
                    {"key_id", after}});
      if (options_.registry != nullptr) {
        options_.registry
            ->GetCounter("kmsplugin_key_rotations_total", "Key rotations this process noticed, by environment.",
                         {{"environment", service->environment()}})
            .Increment();
      }
    }
    const auto previous = last_probe_ok_.find(service->environment());
    const bool was_ok = previous == last_probe_ok_.end() || previous->second;
    if (!health.ok) {
      observe::Log(spdlog::level::err, "health probe failed",
                   {{"event", was_ok ? "unhealthy" : "still_unhealthy"},
                    {"environment", service->environment()},
                    {"error", health.message}});
    } else if (!was_ok) {
      observe::Log(spdlog::level::info, "health probe recovered",
                   {{"event", "recovered"}, {"environment", service->environment()}, {"key_id", after}});
    }
    last_probe_ok_[service->environment()] = health.ok;
  }
}

absl::Status ServerRunner::Rebind(Listener& listener) {
  const ServedEnvironment& env = listener.environment;
  // The same checks as at start: a non-socket there is refused, so is a socket another process answers on.
  if (auto status = PrepareSocketPath(env.socket, env.socket_group); !status.ok()) {
    return status;
  }
  auto socket = Listen(listener);
  if (!socket.ok()) {
    return socket.status();
  }
  std::unique_ptr<SocketListener> old;  // its file is gone or not ours: closed, never unlinked
  {
    absl::MutexLock lock(&mu_);
    listener.inode = (*socket)->inode();
    old = std::move(listener.socket);
    listener.socket = std::move(*socket);
  }
  return absl::OkStatus();
}

void ServerRunner::CheckSockets() {
  // Apply() and Shutdown() change the listeners under change_mu_; Shutdown() also joins this thread, so waiting
  // for the lock here could deadlock. Skipping one round is harmless.
  if (!change_mu_.TryLock()) {
    return;
  }
  std::vector<Listener*> listeners;
  {
    absl::ReaderMutexLock lock(&mu_);
    for (const auto& listener : listeners_) {
      listeners.push_back(listener.get());
    }
  }
  for (Listener* listener : listeners) {
    const std::string& path = listener->environment.socket;
    const std::string environment = listener->environment.service->environment();
    std::string reason;
    if (listener->server == nullptr) {
      continue;
    }
    if (listener->socket == nullptr || !IsSocketFile(path, listener->socket->inode())) {
      if (auto status = Rebind(*listener); !status.ok()) {
        reason = absl::StrCat("the socket file was removed or replaced, and binding it again failed: ",
                              status.message());
      } else {
        observe::Log(spdlog::level::warn, "socket file was removed or replaced; bound it again",
                     {{"event", "socket_rebound"}, {"environment", environment}, {"socket", path}});
        if (options_.registry != nullptr) {
          options_.registry
              ->GetCounter("kmsplugin_socket_rebinds_total",
                           "Sockets bound again because their file was removed or replaced, by environment.",
                           {{"environment", environment}})
              .Increment();
        }
      }
    }
    if (reason.empty()) {
      if (auto probe = ProbeSocket(path, options_.socket_probe_timeout); !probe.ok()) {
        reason = std::string(probe.message());
      }
    }
    const bool ok = reason.empty();
    const auto previous = last_socket_ok_.find(path);
    const bool was_ok = previous == last_socket_ok_.end() || previous->second;
    if (!ok && was_ok) {
      observe::Log(spdlog::level::err, "socket does not answer; /healthz fails until it does",
                   {{"event", "socket_unanswered"}, {"environment", environment}, {"socket", path},
                    {"error", reason}});
    } else if (ok && !was_ok) {
      observe::Log(spdlog::level::info, "socket answers again",
                   {{"event", "socket_recovered"}, {"environment", environment}, {"socket", path}});
    }
    last_socket_ok_[path] = ok;
    absl::MutexLock lock(&mu_);
    listener->answering = ok;
    listener->reason = reason;
  }
  change_mu_.Unlock();
}

void ServerRunner::MaintenanceLoop() {
  while (true) {
    last_progress_ns_.store(SteadyNanos());
    {
      auto wake = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return refresh_requested_ || stopping_; };
      // Counted on the monotonic clock: abseil's AwaitWithTimeout waits for a CLOCK_REALTIME deadline, so a wall
      // clock stepped back stalled this loop and one stepped ahead spun it (core/clock.h).
      core::WaitMonotonic(mu_, absl::Condition(&wake), options_.poll_interval);
      absl::MutexLock lock(&mu_);
      if (stopping_) {
        return;
      }
      refresh_requested_ = false;
    }
    MaintainOnce();
    CheckSockets();
    last_progress_ns_.store(SteadyNanos());
  }
}

void ServerRunner::RequestRefresh() {
  absl::MutexLock lock(&mu_);
  refresh_requested_ = true;
}

void ServerRunner::Shutdown() {
  absl::MutexLock change_lock(&change_mu_);
  std::vector<std::unique_ptr<Listener>> listeners;
  {
    absl::MutexLock lock(&mu_);
    if (stopped_) {
      return;
    }
    stopped_ = true;
    stopping_ = true;
    listeners.swap(listeners_);
  }
  if (maintenance_.joinable()) {
    maintenance_.join();
  }
  std::vector<Listener*> all;
  for (const auto& listener : listeners) {
    all.push_back(listener.get());
  }
  StopListeners(all);
}

absl::Status ServerRunner::RunUntilSignalled() {
  const sigset_t set = ServerSignals();
  while (true) {
    int signal = 0;
    if (sigwait(&set, &signal) != 0) {
      continue;
    }
    if (signal == SIGHUP) {
      observe::Log(spdlog::level::info,
                   reload_handler_ ? "SIGHUP: reloading the configuration and refreshing key sources now"
                                   : "SIGHUP: refreshing key sources now",
                   {{"event", "reload"}});
      if (reload_handler_) {
        reload_handler_();
      }
      RequestRefresh();
      continue;
    }
    observe::Log(spdlog::level::info, signal == SIGTERM ? "SIGTERM: draining in-flight calls"
                                                        : "SIGINT: draining in-flight calls",
                 {{"grace_period_seconds", absl::ToDoubleSeconds(options_.shutdown_grace_period)}});
    if (stop_handler_) {
      stop_handler_();
    }
    Shutdown();
    return absl::OkStatus();
  }
}

}  // namespace kmsplugin::server
