#pragma once

// SocketListener: one environment's listening Unix socket, accepted by our own thread and handed, connection by
// connection, to a gRPC server built without a listening port (grpc::AddInsecureChannelFromFd).
//
// Why not ServerBuilder::AddListeningPort: gRPC 1.51's listener (src/core/lib/iomgr/tcp_server_posix.cc,
// on_read()) handles an accept4() error other than EINTR and EAGAIN by logging "Failed accept4" and leaving the
// read closure un-armed ("goto error"), so one EMFILE (a local user holding ~1,000 connections to the metrics
// port was enough) stops the socket accepting for good while health stays green (issue 11, item 2). Here:
// - accept4(SOCK_NONBLOCK|SOCK_CLOEXEC) on a poll() of the listening socket and a wake pipe (for the destructor);
// - EMFILE, ENFILE, ENOBUFS, ENOMEM: the connection stays in the kernel's backlog; the loop waits `error_backoff`
//   and tries again, for ever; it counts each failure and logs a run of failures (at most once a minute);
// - at most `max_connections` connections live at once: one more is closed at once (the client sees the
//   connection closed, never a hang), counted, and logged at most once a minute. gRPC tells nobody when it
//   closes a connection it was given, so each handed descriptor is remembered with its socket inode; at the
//   limit, entries whose descriptor is closed or now names another file (fstat) are dropped first. A descriptor
//   number gRPC closed and the kernel reused has another inode, so it is never counted twice.
// - at most `max_connections_per_uid` of them from one peer user (SO_PEERCRED): a member of the socket group who
//   holds connections open cannot take the room kube-apiserver (and the daemon's own socket probe) need.
// Thread-safe. The gRPC server must be started before Start() and outlive the listener.

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <grpcpp/server.h>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "kmsplugin/observe/metrics.h"

namespace kmsplugin::server {

struct ListenerLimits {
  // Connections one socket serves at once. kube-apiserver keeps one per plugin; the rest is room for
  // `kmsplugin status`, probes and restarts of the apiserver.
  int max_connections = 128;
  // Of those, at most this many from one peer uid; kube-apiserver's user and ours always keep the rest.
  int max_connections_per_uid = 64;
  int backlog = 128;
  absl::Duration error_backoff = absl::Milliseconds(50);
};

struct ListenerCounts {
  uint64_t accepted = 0;
  uint64_t refused_over_limit = 0;  // closed at once: `max_connections` were live, or the peer uid's share
  uint64_t accept_errors = 0;       // accept4 failed with EMFILE, ENFILE, ENOBUFS or ENOMEM (and was retried)
  int live = 0;                     // connections handed to gRPC that are still open (as of the last sweep)
};

// Where refusals are counted as well (null: only in Counts()); the counters must outlive the listener.
struct ListenerMetrics {
  observe::Counter* over_limit = nullptr;
  observe::Counter* accept_errors = nullptr;
};

class SocketListener {
 public:
  // Binds `path` (already prepared by PrepareSocketPath) and starts accepting into `server`.
  static absl::StatusOr<std::unique_ptr<SocketListener>> Start(const std::string& path,
                                                               const std::optional<std::string>& group,
                                                               grpc::Server* server, ListenerLimits limits,
                                                               ListenerMetrics metrics = {});
  // Stops accepting and closes the listening socket. The socket file stays (see RemoveSocket).
  ~SocketListener();
  SocketListener(const SocketListener&) = delete;
  SocketListener& operator=(const SocketListener&) = delete;

  ino_t inode() const { return inode_; }
  const std::string& path() const { return path_; }
  ListenerCounts Counts() const;
  // The number of handed connections still open, sweeping closed ones now.
  int LiveConnections();

 private:
  SocketListener(std::string path, int fd, ino_t inode, grpc::Server* server, ListenerLimits limits,
                 ListenerMetrics metrics);
  void AcceptLoop();
  // Waits up to `timeout` for Stop(); true when stopping.
  bool WaitForStop(absl::Duration timeout) const;
  void Sweep() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const std::string path_;
  const int fd_;
  const ino_t inode_;
  grpc::Server* const server_;
  const ListenerLimits limits_;
  const ListenerMetrics metrics_;
  int wake_[2] = {-1, -1};
  std::thread thread_;

  std::atomic<uint64_t> accepted_{0};
  std::atomic<uint64_t> refused_over_limit_{0};
  std::atomic<uint64_t> accept_errors_{0};
  mutable absl::Mutex mu_;
  struct Handed {
    int fd;
    ino_t inode;
    uid_t uid;  // the peer's, from SO_PEERCRED
  };
  std::vector<Handed> handed_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kmsplugin::server
