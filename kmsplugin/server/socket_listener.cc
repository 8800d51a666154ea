#include "kmsplugin/server/socket_listener.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include <grpcpp/server_posix.h>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "kmsplugin/observe/log.h"
#include "kmsplugin/server/unix_socket.h"

namespace kmsplugin::server {
namespace {

// Errors after which the pending connection is still in the backlog and a later accept4 can succeed.
bool Transient(int error) { return error == EMFILE || error == ENFILE || error == ENOBUFS || error == ENOMEM; }

}  // namespace

absl::StatusOr<std::unique_ptr<SocketListener>> SocketListener::Start(const std::string& path,
                                                                      const std::optional<std::string>& group,
                                                                      grpc::Server* server, ListenerLimits limits,
                                                                      ListenerMetrics metrics) {
  auto bound = BindSocket(path, group, limits.backlog);
  if (!bound.ok()) {
    return bound.status();
  }
  std::unique_ptr<SocketListener> listener(new SocketListener(path, bound->fd, bound->inode, server, limits, metrics));
  if (pipe2(listener->wake_, O_CLOEXEC | O_NONBLOCK) != 0) {
    const absl::Status status =
        absl::UnavailableError(absl::StrCat("cannot listen on ", path, ": ", std::strerror(errno)));
    RemoveSocket(path, bound->inode);
    return status;  // the destructor closes the socket
  }
  listener->thread_ = std::thread([raw = listener.get()] { raw->AcceptLoop(); });
  return listener;
}

SocketListener::SocketListener(std::string path, int fd, ino_t inode, grpc::Server* server, ListenerLimits limits,
                               ListenerMetrics metrics)
    : path_(std::move(path)), fd_(fd), inode_(inode), server_(server), limits_(limits), metrics_(metrics) {}

SocketListener::~SocketListener() {
  if (thread_.joinable()) {
    const char byte = 1;
    (void)!write(wake_[1], &byte, 1);
    thread_.join();
  }
  for (int fd : {wake_[0], wake_[1], fd_}) {
    if (fd >= 0) {
      close(fd);
    }
  }
}

bool SocketListener::WaitForStop(absl::Duration timeout) const {
  pollfd wake{wake_[0], POLLIN, 0};
  const int ms = static_cast<int>(absl::ToInt64Milliseconds(timeout));
  return poll(&wake, 1, ms) > 0;
}

void SocketListener::Sweep() {
  std::erase_if(handed_, [](const Handed& entry) {
    struct stat info {};
    return fstat(entry.fd, &info) != 0 || !S_ISSOCK(info.st_mode) || info.st_ino != entry.inode;
  });
}

int SocketListener::LiveConnections() {
  absl::MutexLock lock(&mu_);
  Sweep();
  return static_cast<int>(handed_.size());
}

ListenerCounts SocketListener::Counts() const {
  ListenerCounts counts;
  counts.accepted = accepted_.load();
  counts.refused_over_limit = refused_over_limit_.load();
  counts.accept_errors = accept_errors_.load();
  absl::MutexLock lock(&mu_);
  counts.live = static_cast<int>(handed_.size());
  return counts;
}

void SocketListener::AcceptLoop() {
  // Each kind of trouble is said at most once a minute (with the count so far), so a flood that flaps around a
  // limit cannot flood the log as well.
  bool failing = false;       // in a run of accept4 failures
  bool owe_recovery = false;  // a failure was said: say the recovery too
  absl::Time failure_said = absl::InfinitePast();
  absl::Time refusal_said = absl::InfinitePast();
  while (true) {
    pollfd fds[2] = {{fd_, POLLIN, 0}, {wake_[0], POLLIN, 0}};
    if (poll(fds, 2, -1) < 0) {
      if (errno == EINTR) {
        continue;
      }
      // poll on two valid descriptors fails only for lack of memory: wait, then try again.
      if (WaitForStop(limits_.error_backoff)) {
        return;
      }
      continue;
    }
    if (fds[1].revents != 0) {
      return;
    }
    while (true) {
      const int fd = accept4(fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) {
        const int error = errno;
        if (error == EINTR || error == ECONNABORTED) {
          continue;
        }
        if (error == EAGAIN || error == EWOULDBLOCK) {
          break;
        }
        accept_errors_.fetch_add(1);
        if (metrics_.accept_errors != nullptr) {
          metrics_.accept_errors->Increment();
        }
        if (!failing && absl::Now() - failure_said >= absl::Minutes(1)) {
          failure_said = absl::Now();
          owe_recovery = true;
          observe::Log(spdlog::level::err, "cannot accept connections; retrying until it works",
                       {{"event", "accept_failed"}, {"socket", path_}, {"error", std::strerror(error)},
                        {"failures_so_far", accept_errors_.load()},
                        {"fix", Transient(error) ? "raise LimitNOFILE (RLIMIT_NOFILE), or find who holds the "
                                                   "descriptors (ls /proc/PID/fd)"
                                                 : "see the error"}});
        }
        failing = true;
        if (WaitForStop(limits_.error_backoff)) {
          return;
        }
        break;
      }
      failing = false;
      if (owe_recovery) {
        owe_recovery = false;
        observe::Log(spdlog::level::info, "accepting connections again",
                     {{"event", "accept_recovered"}, {"socket", path_}, {"failures_so_far", accept_errors_.load()}});
      }
      struct stat info {};
      fstat(fd, &info);
      ucred peer{};
      socklen_t peer_size = sizeof(peer);
      if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &peer, &peer_size) != 0) {
        peer.uid = static_cast<uid_t>(-1);  // unknown peers share one account
      }
      bool admit = false;
      {
        absl::MutexLock lock(&mu_);
        const auto from_peer = [&] {
          return std::count_if(handed_.begin(), handed_.end(), [&](const Handed& h) { return h.uid == peer.uid; });
        };
        if (static_cast<int>(handed_.size()) >= limits_.max_connections ||
            from_peer() >= limits_.max_connections_per_uid) {
          Sweep();
        }
        admit = static_cast<int>(handed_.size()) < limits_.max_connections &&
                from_peer() < limits_.max_connections_per_uid;
        if (admit) {
          handed_.push_back({fd, info.st_ino, peer.uid});
        }
      }
      if (!admit) {
        refused_over_limit_.fetch_add(1);  // before the close, which the client may be waiting for
        if (metrics_.over_limit != nullptr) {
          metrics_.over_limit->Increment();
        }
        close(fd);
        if (absl::Now() - refusal_said >= absl::Minutes(1)) {
          refusal_said = absl::Now();
          observe::Log(spdlog::level::warn, "connection limit reached; closing new connections at once",
                       {{"event", "connection_limit"}, {"socket", path_},
                        {"max_connections", limits_.max_connections},
                        {"max_connections_per_uid", limits_.max_connections_per_uid},
                        {"peer_uid", static_cast<int64_t>(peer.uid)},
                        {"refused_so_far", refused_over_limit_.load()}});
        }
        continue;
      }
      accepted_.fetch_add(1);
      // gRPC owns the descriptor from here (it closes it with the connection).
      grpc::AddInsecureChannelFromFd(server_, fd);
    }
  }
}

}  // namespace kmsplugin::server
