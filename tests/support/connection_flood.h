#pragma once

// Hostile clients as separate processes running as another user (a real unprivileged uid: the listeners limit
// connections per peer uid, and a flood from the test's own root would only test root's share). After fork only
// system calls are made (the test process has gRPC threads). Switching users needs root; callers REQUIRE it.
//
// - ConnectionFlood: opens `count` connections to a TCP port on loopback or to a Unix socket, holds them until
//   End(), then exits. For a Unix socket it also tells how the server took each one: answered (a gRPC server
//   sends its HTTP/2 SETTINGS frame first: admitted), closed without a byte (refused at the limit), or silent.
// - RawGarbage: `clients` processes that, until `duration` is over, connect to a Unix socket, wait for the
//   server's first bytes (or the close of a refused connection), send `garbage` (not HTTP/2) and read until the
//   server closes; each counts its connections admitted and refused.

#include <arpa/inet.h>
#include <fcntl.h>
#include <grp.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cerrno>
#include <cstring>
#include <string>
#include <vector>

namespace kmsplugin::testing {

inline constexpr uid_t kNobody = 65534;

// Where a flood connects: a TCP port on 127.0.0.1, or a Unix socket path.
struct FloodTarget {
  int tcp_port = -1;
  std::string unix_path;
};

// A connected socket (`nonblocking`: the connect may still be in progress), or -1.
inline int ConnectTo(const FloodTarget& target, bool nonblocking) {
  const int flags = SOCK_STREAM | SOCK_CLOEXEC | (nonblocking ? SOCK_NONBLOCK : 0);
  if (target.tcp_port >= 0) {
    const int fd = socket(AF_INET, flags, 0);
    if (fd < 0) {
      return -1;
    }
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_port = htons(static_cast<uint16_t>(target.tcp_port));
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0 && errno != EINPROGRESS) {
      close(fd);
      return -1;
    }
    return fd;
  }
  const int fd = socket(AF_UNIX, flags, 0);
  if (fd < 0) {
    return -1;
  }
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  std::strncpy(address.sun_path, target.unix_path.c_str(), sizeof(address.sun_path) - 1);
  if (connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

// In a forked child: drops to `uid` with `group` as its only group (the socket group). false if it cannot.
inline bool BecomeUser(uid_t uid, gid_t group) {
  const gid_t groups[1] = {group};
  return setgroups(1, groups) == 0 && setresgid(group, group, group) == 0 && setresuid(uid, uid, uid) == 0;
}

inline int64_t MonotonicMs() {
  timespec now{};
  clock_gettime(CLOCK_MONOTONIC, &now);
  return static_cast<int64_t>(now.tv_sec) * 1000 + now.tv_nsec / 1000000;
}

// Waits up to `timeout_ms` for the first bytes on `fd`: 1 when some came, 0 when the peer closed first (EOF or
// reset), -1 when nothing happened.
inline int FirstBytes(int fd, int timeout_ms) {
  pollfd p{fd, POLLIN, 0};
  if (poll(&p, 1, timeout_ms) <= 0) {
    return -1;
  }
  char byte[64];
  const ssize_t n = recv(fd, byte, sizeof(byte), MSG_DONTWAIT);
  return n > 0 ? 1 : (n == 0 || (errno != EAGAIN && errno != EINTR)) ? 0 : -1;
}

class ConnectionFlood {
 public:
  struct Seen {
    int opened = 0;    // connect() succeeded
    int answered = 0;  // Unix only: the server sent its first bytes (admitted)
    int closed = 0;    // Unix only: closed by the server before any byte (refused)
    int silent = 0;    // Unix only: neither within 10 s
  };

  ConnectionFlood(const FloodTarget& target, int count, uid_t uid = kNobody, gid_t group = kNobody) {
    int ready[2];
    int release[2];
    REQUIRE(pipe(ready) == 0);
    REQUIRE(pipe(release) == 0);
    // Allocated before the fork: the child only makes system calls.
    const bool unix_socket = target.tcp_port < 0;
    std::vector<int> fds;
    fds.reserve(static_cast<size_t>(count));
    std::vector<pollfd> waiting;
    waiting.reserve(static_cast<size_t>(count));
    pid_ = fork();
    REQUIRE(pid_ >= 0);
    if (pid_ == 0) {
      close(ready[0]);
      close(release[1]);
      if (!BecomeUser(uid, group)) {
        _exit(3);
      }
      Seen seen;
      for (int i = 0; i < count; ++i) {
        // TCP: non-blocking, the kernel's backlog is the limit. Unix: a blocking connect is queued at once while
        // the backlog has room and waits while the server's accept loop catches up.
        const int fd = ConnectTo(target, /*nonblocking=*/!unix_socket);
        if (fd >= 0) {
          ++seen.opened;
          fds.push_back(fd);
        }
      }
      if (unix_socket) {
        for (int fd : fds) {
          waiting.push_back({fd, POLLIN, 0});
        }
        const int64_t end = MonotonicMs() + 10000;
        int left = static_cast<int>(waiting.size());
        while (left > 0 && MonotonicMs() < end) {
          if (poll(waiting.data(), waiting.size(), 100) <= 0) {
            continue;
          }
          for (pollfd& p : waiting) {
            if (p.fd < 0 || p.revents == 0) {
              continue;
            }
            const int first = FirstBytes(p.fd, 0);
            if (first < 0) {
              continue;
            }
            (first == 1 ? seen.answered : seen.closed) += 1;
            p.fd = -1;  // held open (answered) or dead (closed); no longer watched
            --left;
          }
        }
        seen.silent = left;
      }
      (void)!write(ready[1], &seen, sizeof(seen));
      char byte;
      (void)!read(release[0], &byte, 1);
      _exit(0);
    }
    close(ready[1]);
    close(release[0]);
    release_ = release[1];
    REQUIRE(read(ready[0], &seen_, sizeof(seen_)) == sizeof(seen_));
    close(ready[0]);
  }
  ~ConnectionFlood() { End(); }
  ConnectionFlood(const ConnectionFlood&) = delete;
  ConnectionFlood& operator=(const ConnectionFlood&) = delete;

  int opened() const { return seen_.opened; }
  const Seen& seen() const { return seen_; }
  // Closes every connection (the process exits).
  void End() {
    if (pid_ > 0) {
      close(release_);
      waitpid(pid_, nullptr, 0);
      pid_ = -1;
    }
  }

 private:
  pid_t pid_ = -1;
  int release_ = -1;
  Seen seen_;
};

class RawGarbage {
 public:
  struct Seen {
    int admitted = 0;  // the server sent its first bytes, then closed the connection for the garbage
    int refused = 0;   // closed by the server before any byte
    int failed = 0;    // connect failed, or the server neither answered nor closed within 5 s
  };

  RawGarbage(const std::string& socket, int clients, const std::string& garbage, int duration_ms, uid_t uid,
             gid_t group) {
    const FloodTarget target{-1, socket};
    for (int c = 0; c < clients; ++c) {
      int report[2];
      REQUIRE(pipe(report) == 0);
      const pid_t pid = fork();
      REQUIRE(pid >= 0);
      if (pid == 0) {
        close(report[0]);
        if (!BecomeUser(uid, group)) {
          _exit(3);
        }
        Seen seen;
        const int64_t end = MonotonicMs() + duration_ms;
        while (MonotonicMs() < end) {
          const int fd = ConnectTo(target, /*nonblocking=*/false);
          if (fd < 0) {
            ++seen.failed;
            continue;
          }
          const int first = FirstBytes(fd, 5000);
          if (first == 0) {
            ++seen.refused;
          } else if (first < 0) {
            ++seen.failed;
          } else {
            // Admitted: the garbage, then read until the server hangs up (it must: this is no HTTP/2).
            send(fd, garbage.data(), garbage.size(), MSG_NOSIGNAL);
            char buffer[4096];
            bool hung_up = false;
            for (int64_t until = MonotonicMs() + 5000; !hung_up && MonotonicMs() < until;) {
              pollfd p{fd, POLLIN, 0};
              if (poll(&p, 1, 100) > 0) {
                const ssize_t n = recv(fd, buffer, sizeof(buffer), MSG_DONTWAIT);
                hung_up = n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR);
              }
            }
            (hung_up ? seen.admitted : seen.failed) += 1;
          }
          close(fd);
        }
        (void)!write(report[1], &seen, sizeof(seen));
        _exit(0);
      }
      close(report[1]);
      children_.push_back({pid, report[0]});
    }
  }
  ~RawGarbage() { Wait(); }
  RawGarbage(const RawGarbage&) = delete;
  RawGarbage& operator=(const RawGarbage&) = delete;

  // Waits for every client (each stops at the end of its duration) and sums what they saw.
  const Seen& Wait() {
    for (const Child& child : children_) {
      Seen seen;
      if (read(child.report, &seen, sizeof(seen)) == sizeof(seen)) {
        total_.admitted += seen.admitted;
        total_.refused += seen.refused;
        total_.failed += seen.failed;
      } else {
        ++total_.failed;
      }
      close(child.report);
      waitpid(child.pid, nullptr, 0);
    }
    children_.clear();
    return total_;
  }

 private:
  struct Child {
    pid_t pid;
    int report;
  };
  std::vector<Child> children_;
  Seen total_;
};

}  // namespace kmsplugin::testing
