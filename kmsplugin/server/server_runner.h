#pragma once

// ServerRunner: serves each environment's EnvelopeService on its own Unix socket (KMS v2 and v1beta1 on every
// socket), keeps health fresh, changes the set of environments while serving, and stops cleanly. It knows
// nothing of the config file: the caller (kmsplugin/cli/serve.cc) decides what changes, the runner applies it.
//
// - Start(): probes every environment once (so the first Status is truthful), prepares each socket path, starts
//   one gRPC server per socket with ServerTuning (no listening port of its own) and a SocketListener that
//   accepts for it (socket_listener.h: why), and starts the maintenance thread.
// - The maintenance thread, every poll interval and at once after RequestRefresh(): Refresh() of each key
//   source (to notice rotation), then a real wrap+unwrap probe; failures are logged, never fatal. Then each
//   socket is asked for v2 Status over a fresh gRPC connection (socket_probe.h); one that does not answer is
//   reported by Sockets() (and so fails /healthz) until it answers again. A socket file that was removed or
//   replaced is bound again at once (said once in the log, counted in kmsplugin_socket_rebinds_total).
// - Apply(): adds, removes and re-keys environments all or nothing (see EnvironmentChanges).
// - Shutdown(): stops accepting, lets in-flight calls finish until the grace period ends, cancels the rest,
//   removes the socket files it created. Idempotent. Connections with no call in flight are closed at once
//   (an idle client no longer holds the exit for the grace period).
// - RunUntilSignalled(): waits for SIGTERM/SIGINT (shutdown, returns OK) and SIGHUP (the reload handler, if one
//   is set, then a refresh of every key source). The signals must be blocked in every thread first: call
//   BlockServerSignals() in main before anything starts a thread.
// Thread-safe: Apply() and Shutdown() are serialised; Services() may be called from any thread at any time.

#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/server.h>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "kmsplugin/core/envelope_service.h"
#include "kmsplugin/observe/metrics.h"
#include "kmsplugin/server/call_counter.h"
#include "kmsplugin/server/kms_services.h"
#include "kmsplugin/server/server_tuning.h"
#include "kmsplugin/server/socket_listener.h"

namespace kmsplugin::server {

// One environment on one socket. Its name is service->environment().
struct ServedEnvironment {
  std::string socket;
  std::optional<std::string> socket_group;
  std::shared_ptr<core::EnvelopeService> service;
};

// An environment whose key source is replaced in place: same socket, same EnvelopeService.
struct KeySourceSwap {
  std::string environment;
  std::shared_ptr<core::KeySource> source;  // passed EnvelopeService::CheckReplacement
  core::Health health;                      // what that check's probe found
};

// A change to the served environments (a config reload), prepared by the caller: key sources opened, refreshed
// and probed. `add` may name an environment that `remove` stops (a changed socket, socket group or Status
// version is a remove plus an add).
struct EnvironmentChanges {
  std::vector<std::string> remove;
  std::vector<ServedEnvironment> add;
  std::vector<KeySourceSwap> swap;
  bool empty() const { return remove.empty() && add.empty() && swap.empty(); }
};

struct RunnerOptions {
  absl::Duration poll_interval = absl::Seconds(10);
  absl::Duration shutdown_grace_period = absl::Seconds(10);
  absl::Duration probe_timeout = absl::Seconds(5);
  ServerTuning tuning;
  ListenerLimits listener;
  // How long the maintenance thread waits for a socket to answer Status.
  absl::Duration socket_probe_timeout = absl::Seconds(3);
  // Where RPC metrics and rotations are counted; null for none.
  observe::Registry* registry = nullptr;
};

void BlockServerSignals();

// Whether a served socket answered the maintenance thread's last Status probe.
struct SocketHealth {
  std::string environment;
  std::string socket;
  bool answering = true;
  std::string reason;  // why not, when not
};

class ServerRunner {
 public:
  ServerRunner(RunnerOptions options, std::vector<ServedEnvironment> environments);
  ~ServerRunner();
  ServerRunner(const ServerRunner&) = delete;
  ServerRunner& operator=(const ServerRunner&) = delete;

  absl::Status Start();

  // Applies `changes` all or nothing, without dropping a call on an environment that stays:
  // 1. checks them against what is served (names exist, no socket served twice, groups exist);
  // 2. binds every added socket that no removed environment holds (prepared like at Start);
  // 3. stops the removed environments (draining for the grace period) and removes their socket files;
  // 4. binds the added sockets a removed environment held (the only window in which a socket does not answer);
  // 5. swaps key sources (calls in flight finish on the old one) and publishes the new set.
  // A failure in 1, 2 or 4 stops what was started, serves the removed environments again and returns the
  // error: the runner then serves exactly what it served before. FAILED_PRECONDITION after Shutdown().
  absl::Status Apply(EnvironmentChanges changes);

  // The environments served now (for metrics and readiness), in the order they were added.
  std::vector<std::shared_ptr<core::EnvelopeService>> Services() const;
  // Every served socket's last probe outcome (answering until the first probe says otherwise).
  std::vector<SocketHealth> Sockets() const;
  // Connection counts of the socket of `environment` (NOT_FOUND if it is not served).
  absl::StatusOr<ListenerCounts> SocketCounts(const std::string& environment) const;

  // Called on the signal thread at each SIGHUP, before every key source is refreshed. Set before
  // RunUntilSignalled(); it may call Apply().
  void SetReloadHandler(std::function<void()> handler);
  // Called on the signal thread at SIGTERM/SIGINT, before the drain starts. Set before RunUntilSignalled().
  void SetStopHandler(std::function<void()> handler);

  // True while the maintenance thread completes its passes: the last one ended (or the loop last woke) within
  // `limit`. A pass stuck in a key source beyond every deadline makes this false (the systemd watchdog uses it).
  bool MaintenanceProgressing(absl::Duration limit) const;

  void RequestRefresh();
  void Shutdown();
  absl::Status RunUntilSignalled();

 private:
  struct Listener {
    ServedEnvironment environment;
    // Runs this socket's Encrypt/Decrypt calls; outlives `server` (it is reset first when stopping).
    // `pool` and `calls` are replaced under mu_ (a scrape reads them: RegisterLoadMetrics).
    std::shared_ptr<CallPool> pool;
    std::unique_ptr<KmsV2Service> v2;
    std::unique_ptr<KmsV1beta1Service> v1beta1;
    std::shared_ptr<CallCounter> calls;  // outlives `server`
    std::unique_ptr<grpc::Server> server;
    std::unique_ptr<SocketListener> socket;
    ino_t inode = 0;
    // Written by the maintenance thread under mu_; read by Sockets().
    bool answering = true;
    std::string reason;
  };

  // Prepares the socket path, binds, secures the socket file. On failure nothing is left listening.
  absl::Status StartListener(Listener& listener);
  // Drains all of `listeners` at once against one deadline, then removes their socket files.
  void StopListeners(const std::vector<Listener*>& listeners);
  absl::Status CheckChanges(const EnvironmentChanges& changes) ABSL_SHARED_LOCKS_REQUIRED(mu_);
  void MaintainOnce();
  // Probes every socket; binds again one whose file was removed or replaced. Skipped while Apply() or
  // Shutdown() runs (they hold change_mu_).
  void CheckSockets();
  absl::Status Rebind(Listener& listener);
  // kmsplugin_grpc_requests_in_flight and kmsplugin_call_pool_*: read from the served listeners at scrape time,
  // so a removed environment's series disappear. The registry must not be scraped once the runner is gone.
  void RegisterLoadMetrics(observe::Registry& registry);
  absl::StatusOr<std::unique_ptr<SocketListener>> Listen(const Listener& listener);
  void MaintenanceLoop();

  const RunnerOptions options_;
  std::thread maintenance_;
  std::function<void()> reload_handler_;
  std::function<void()> stop_handler_;
  // Monotonic nanoseconds (core::Clock::Elapsed) at the end of the last maintenance pass (or the start of the
  // loop's wait).
  std::atomic<int64_t> last_progress_ns_{0};

  // Serialises Apply() and Shutdown(); taken before mu_.
  absl::Mutex change_mu_ ABSL_ACQUIRED_BEFORE(mu_);
  mutable absl::Mutex mu_;
  std::vector<std::unique_ptr<Listener>> listeners_ ABSL_GUARDED_BY(mu_);
  bool refresh_requested_ ABSL_GUARDED_BY(mu_) = false;
  // Each environment's last probe outcome, so a failure and a recovery are each said once ("event":"unhealthy",
  // "event":"recovered"). Only the maintenance thread touches it.
  std::map<std::string, bool> last_probe_ok_;
  // Each socket's last probe outcome, by path, so "does not answer" and "answers again" are each said once.
  std::map<std::string, bool> last_socket_ok_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool started_ ABSL_GUARDED_BY(mu_) = false;
  bool stopped_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace kmsplugin::server
