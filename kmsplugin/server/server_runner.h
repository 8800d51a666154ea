#pragma once

// ServerRunner: serves each environment's EnvelopeService on its own Unix socket (KMS v2 and v1beta1 on every
// socket), keeps health fresh, and stops cleanly.
//
// - Start(): probes every environment once (so the first Status is truthful), prepares each socket path, starts
//   one gRPC server per socket with ServerTuning, and starts the maintenance thread.
// - The maintenance thread, every poll interval and at once after RequestRefresh() (SIGHUP): Refresh() of each
//   key source (to notice rotation), then a real wrap+unwrap probe; failures are logged, never fatal.
// - Shutdown(): stops accepting, lets in-flight calls finish until the grace period ends, cancels the rest,
//   removes the socket files it created. Idempotent.
// - RunUntilSignalled(): waits for SIGTERM/SIGINT (shutdown, returns OK) and SIGHUP (refresh). The signals must
//   be blocked in every thread first: call BlockServerSignals() in main before anything starts a thread.

#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/server.h>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "kmsplugin/core/envelope_service.h"
#include "kmsplugin/observe/metrics.h"
#include "kmsplugin/server/kms_services.h"
#include "kmsplugin/server/server_tuning.h"

namespace kmsplugin::server {

struct ServedEnvironment {
  std::string socket;
  std::optional<std::string> socket_group;
  std::shared_ptr<core::EnvelopeService> service;
};

struct RunnerOptions {
  absl::Duration poll_interval = absl::Seconds(10);
  absl::Duration shutdown_grace_period = absl::Seconds(10);
  absl::Duration probe_timeout = absl::Seconds(5);
  ServerTuning tuning;
  // Where RPC metrics and rotations are counted; null for none.
  observe::Registry* registry = nullptr;
};

void BlockServerSignals();

class ServerRunner {
 public:
  ServerRunner(RunnerOptions options, std::vector<ServedEnvironment> environments);
  ~ServerRunner();
  ServerRunner(const ServerRunner&) = delete;
  ServerRunner& operator=(const ServerRunner&) = delete;

  absl::Status Start();
  void RequestRefresh();
  void Shutdown();
  absl::Status RunUntilSignalled();

 private:
  struct Listener {
    ServedEnvironment environment;
    std::unique_ptr<KmsV2Service> v2;
    std::unique_ptr<KmsV1beta1Service> v1beta1;
    std::unique_ptr<grpc::Server> server;
    ino_t inode = 0;
  };

  void MaintainOnce();
  void MaintenanceLoop();

  const RunnerOptions options_;
  std::vector<Listener> listeners_;
  std::thread maintenance_;

  absl::Mutex mu_;
  bool refresh_requested_ ABSL_GUARDED_BY(mu_) = false;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool started_ ABSL_GUARDED_BY(mu_) = false;
  bool stopped_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace kmsplugin::server
