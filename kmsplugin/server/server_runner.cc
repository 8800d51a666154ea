#include "kmsplugin/server/server_runner.h"

#include <pthread.h>
#include <signal.h>

#include <grpcpp/server_builder.h>

#include "absl/strings/str_cat.h"
#include "kmsplugin/observe/log.h"
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

}  // namespace

void BlockServerSignals() {
  const sigset_t set = ServerSignals();
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
}

ServerRunner::ServerRunner(RunnerOptions options, std::vector<ServedEnvironment> environments)
    : options_(std::move(options)) {
  for (ServedEnvironment& environment : environments) {
    Listener listener;
    listener.environment = std::move(environment);
    listeners_.push_back(std::move(listener));
  }
}

ServerRunner::~ServerRunner() { Shutdown(); }

absl::Status ServerRunner::Start() {
  {
    absl::MutexLock lock(&mu_);
    if (started_) {
      return absl::FailedPreconditionError("ServerRunner::Start called twice");
    }
    started_ = true;
  }
  MaintainOnce();
  for (Listener& listener : listeners_) {
    const ServedEnvironment& env = listener.environment;
    if (auto status = PrepareSocketPath(env.socket, env.socket_group); !status.ok()) {
      Shutdown();
      return status;
    }
    listener.v2 = std::make_unique<KmsV2Service>(*env.service, options_.registry);
    listener.v1beta1 = std::make_unique<KmsV1beta1Service>(*env.service, options_.registry);
    grpc::ServerBuilder builder;
    ApplyServerTuning(options_.tuning, builder);
    builder.AddListeningPort(absl::StrCat("unix:", env.socket), grpc::InsecureServerCredentials());
    builder.RegisterService(listener.v2.get());
    builder.RegisterService(listener.v1beta1.get());
    listener.server = builder.BuildAndStart();
    if (listener.server == nullptr) {
      Shutdown();
      return absl::UnavailableError(absl::StrCat("cannot listen on ", env.socket,
                                                 "; fix: check that its directory is writable"));
    }
    auto inode = SecureSocket(env.socket, env.socket_group);
    if (!inode.ok()) {
      Shutdown();
      return inode.status();
    }
    listener.inode = *inode;
    const core::StatusResult status = env.service->Status();
    observe::Log(spdlog::level::info, "serving",
                 {{"environment", env.service->environment()},
                  {"socket", env.socket},
                  {"key_id", status.key_id},
                  {"healthz", status.healthz}});
  }
  maintenance_ = std::thread([this] { MaintenanceLoop(); });
  return absl::OkStatus();
}

void ServerRunner::MaintainOnce() {
  for (Listener& listener : listeners_) {
    core::EnvelopeService& service = *listener.environment.service;
    const std::string before = service.Status().key_id;
    if (auto status = service.key_source().Refresh(absl::Now() + options_.probe_timeout); !status.ok()) {
      observe::Log(spdlog::level::err, "key source refresh failed",
                   {{"environment", service.environment()}, {"error", std::string(status.message())}});
    }
    const core::Health health = service.Probe(absl::Now() + options_.probe_timeout);
    const std::string after = service.Status().key_id;
    if (after != before) {
      observe::Log(spdlog::level::info, "key rotation noticed",
                   {{"event", "rotation"}, {"environment", service.environment()}, {"old_key_id", before},
                    {"key_id", after}});
      if (options_.registry != nullptr) {
        options_.registry
            ->GetCounter("kmsplugin_key_rotations_total", "Key rotations this process noticed, by environment.",
                         {{"environment", service.environment()}})
            .Increment();
      }
    }
    if (!health.ok) {
      observe::Log(spdlog::level::err, "health probe failed",
                   {{"environment", service.environment()}, {"error", health.message}});
    }
  }
}

void ServerRunner::MaintenanceLoop() {
  while (true) {
    {
      absl::MutexLock lock(&mu_);
      auto wake = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return refresh_requested_ || stopping_; };
      mu_.AwaitWithTimeout(absl::Condition(&wake), options_.poll_interval);
      if (stopping_) {
        return;
      }
      refresh_requested_ = false;
    }
    MaintainOnce();
  }
}

void ServerRunner::RequestRefresh() {
  absl::MutexLock lock(&mu_);
  refresh_requested_ = true;
}

void ServerRunner::Shutdown() {
  {
    absl::MutexLock lock(&mu_);
    if (stopped_) {
      return;
    }
    stopped_ = true;
    stopping_ = true;
  }
  if (maintenance_.joinable()) {
    maintenance_.join();
  }
  // All servers drain at once, against one deadline.
  const auto deadline = std::chrono::system_clock::now() + absl::ToChronoSeconds(options_.shutdown_grace_period);
  std::vector<std::thread> drains;
  for (Listener& listener : listeners_) {
    if (listener.server != nullptr) {
      drains.emplace_back([&listener, deadline] { listener.server->Shutdown(deadline); });
    }
  }
  for (std::thread& drain : drains) {
    drain.join();
  }
  for (Listener& listener : listeners_) {
    if (listener.server != nullptr) {
      listener.server->Wait();
      RemoveSocket(listener.environment.socket, listener.inode);
      observe::Log(spdlog::level::info, "stopped",
                   {{"environment", listener.environment.service->environment()},
                    {"socket", listener.environment.socket}});
    }
  }
}

absl::Status ServerRunner::RunUntilSignalled() {
  const sigset_t set = ServerSignals();
  while (true) {
    int signal = 0;
    if (sigwait(&set, &signal) != 0) {
      continue;
    }
    if (signal == SIGHUP) {
      observe::Log(spdlog::level::info, "SIGHUP: refreshing key sources now", {{"event", "reload"}});
      RequestRefresh();
      continue;
    }
    observe::Log(spdlog::level::info, signal == SIGTERM ? "SIGTERM: draining in-flight calls"
                                                        : "SIGINT: draining in-flight calls",
                 {{"grace_period", absl::FormatDuration(options_.shutdown_grace_period)}});
    Shutdown();
    return absl::OkStatus();
  }
}

}  // namespace kmsplugin::server
