// `kmsplugin serve` under a Type=notify unit (issue 13, item 6): the real binary, a real NOTIFY_SOCKET datagram
// socket read by the test, as systemd reads it. READY=1 only once the socket answers Status; RELOADING=1 then
// READY=1 around a SIGHUP; STOPPING=1 at SIGTERM; WATCHDOG=1 at half of WATCHDOG_USEC.

#include <signal.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <poll.h>
#include <unistd.h>

#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "absl/strings/match.h"
#include "absl/time/clock.h"
#include "tests/support/daemon.h"
#include "tests/support/kms_client.h"

namespace kmsplugin::testing {
namespace {

// The notification socket systemd would hold: a bound AF_UNIX datagram socket.
class NotifySocket {
 public:
  explicit NotifySocket(const std::string& path) : path_(path) {
    fd_ = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    REQUIRE(fd_ >= 0);
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    REQUIRE(path.size() < sizeof(address.sun_path));
    path.copy(address.sun_path, path.size());
    REQUIRE(bind(fd_, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0);
  }
  ~NotifySocket() { close(fd_); }

  // The next datagram, or "" when none came within `bound`.
  std::string Next(absl::Duration bound = absl::Seconds(15)) const {
    pollfd entry{fd_, POLLIN, 0};
    if (poll(&entry, 1, static_cast<int>(absl::ToInt64Milliseconds(bound))) != 1) {
      return "";
    }
    char buffer[4096];
    const ssize_t n = recv(fd_, buffer, sizeof(buffer), 0);
    return n > 0 ? std::string(buffer, static_cast<size_t>(n)) : "";
  }
  // Datagrams until one contains `part` (returned), skipping WATCHDOG=1 pings; "" when none did within `bound`.
  std::string Until(const std::string& part, absl::Duration bound = absl::Seconds(15)) const {
    const absl::Time end = absl::Now() + bound;
    while (absl::Now() < end) {
      const std::string message = Next(end - absl::Now());
      if (absl::StrContains(message, part)) {
        return message;
      }
    }
    return "";
  }

 private:
  std::string path_;
  int fd_ = -1;
};

// Sets an environment variable for the daemons this test starts, and removes it after.
struct ScopedEnv {
  ScopedEnv(const char* name, const std::string& value) : name(name) { setenv(name, value.c_str(), 1); }
  ~ScopedEnv() { unsetenv(name); }
  const char* name;
};

struct Notified : DaemonDriver {
  Notified() {
    // Port 0: tests run in parallel, and the default 9880 can be bound by one daemon only.
    config = dir.Write("config.yaml", "http:\n  listen: 127.0.0.1:0\nenvironments:\n  - name: dev\n    socket: " + Socket() +
                                          "\n    keySource:\n      local:\n        keyring: " +
                                          dir.File("state/dev.keyring") + "\n        rootKeyFile: " +
                                          dir.File("state/dev.rootkey") + "\n");
    REQUIRE(Init().exit_code == 0);
  }
  std::string Socket() const { return dir.File("run/dev.sock"); }
};

TEST_CASE("systemd notify: READY=1 comes only once the socket answers, with a STATUS line", "[integration]") {
  Notified test;
  NotifySocket notify(test.dir.File("notify.sock"));
  ScopedEnv env("NOTIFY_SOCKET", test.dir.File("notify.sock"));
  auto server = test.Serve();
  const std::string ready = notify.Until("READY=1");
  INFO(server->Stderr());
  REQUIRE(!ready.empty());
  CHECK(absl::StrContains(ready, "STATUS=serving 1 environment(s)"));
  // The unit's ordering promise: at READY=1 the socket serves already (no wait, no retry).
  KmsClient client(test.Socket());
  v2::StatusResponse status;
  CHECK(client.Status(status, std::chrono::milliseconds(2000)).ok());
  CHECK(status.healthz() == "ok");

  server->Signal(SIGHUP);
  const std::string reloading = notify.Until("RELOADING=1");
  CHECK(absl::StrContains(reloading, "STATUS=reloading the configuration"));
  CHECK(!notify.Until("READY=1").empty());

  server->Signal(SIGTERM);
  CHECK(absl::StrContains(notify.Until("STOPPING=1"), "STATUS=draining"));
  CHECK(server->Wait() == std::optional<int>(0));
}

TEST_CASE("systemd notify: WATCHDOG=1 at half of WATCHDOG_USEC while the maintenance loop runs", "[integration]") {
  Notified test;
  NotifySocket notify(test.dir.File("notify.sock"));
  ScopedEnv env("NOTIFY_SOCKET", test.dir.File("notify.sock"));
  ScopedEnv watchdog("WATCHDOG_USEC", "1000000");  // 1 s: a ping every 500 ms
  auto server = test.Serve();
  REQUIRE(!notify.Until("READY=1").empty());
  int pings = 0;
  const absl::Time end = absl::Now() + absl::Seconds(3);
  while (absl::Now() < end) {
    if (notify.Next(absl::Seconds(3)) == "WATCHDOG=1") {
      ++pings;
    }
  }
  INFO(server->Stderr());
  CHECK(pings >= 3);  // 6 expected in 3 s; a loaded machine may delay a few
  server->Signal(SIGTERM);
  CHECK(server->Wait() == std::optional<int>(0));
}

TEST_CASE("systemd notify: without NOTIFY_SOCKET serve runs as before", "[integration]") {
  Notified test;
  unsetenv("NOTIFY_SOCKET");
  auto server = test.Serve();
  REQUIRE(DaemonDriver::WaitServing(*server, test.Socket()));
  CHECK(!absl::StrContains(server->Stderr(), "sd_notify failed"));
  server->Signal(SIGTERM);
  CHECK(server->Wait() == std::optional<int>(0));
}

}  // namespace
}  // namespace kmsplugin::testing
