// The listeners attacked through the real binary (issue 11, items 2, 3, 7 and 13): a local unprivileged user
// flooding the metrics port of a daemon with few descriptors, slow HTTP clients, a socket file removed under a
// running daemon, an open socket directory, a link planted at the socket path, idle clients at SIGTERM.

#include <arpa/inet.h>
#include <fcntl.h>
#include <grp.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <iostream>
#include <sstream>
#include <thread>

#include <catch2/catch.hpp>
#include <httplib.h>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "tests/support/connection_flood.h"
#include "tests/support/daemon.h"

namespace kmsplugin::testing {
namespace {

bool Has(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

int Count(const std::string& text, const std::string& part) {
  int count = 0;
  for (size_t at = text.find(part); at != std::string::npos; at = text.find(part, at + part.size())) {
    ++count;
  }
  return count;
}

struct Setup : DaemonDriver {
  explicit Setup(const std::string& server = "  pollInterval: 1s\n", const std::string& socket_dir = "run") {
    socket = dir.File(socket_dir + "/dev.sock");
    config = dir.Write("config.yaml", "http:\n  listen: 127.0.0.1:0\n"
                                      "server:\n" + server +
                                          "environments:\n"
                                          "  - name: dev\n"
                                          "    socket: " + socket + "\n"
                                          "    keySource:\n"
                                          "      local:\n"
                                          "        keyring: " + dir.File("state/dev.keyring") + "\n"
                                          "        rootKeyFile: " + dir.File("state/dev.rootkey") + "\n");
    REQUIRE(Init().exit_code == 0);
  }
  // `serve` under `prefix` (e.g. prlimit), started and serving, with its HTTP port.
  std::unique_ptr<Subprocess> Start(std::vector<std::string> prefix = {}) {
    prefix.insert(prefix.end(), {Binary(), "serve", "--config", config});
    auto server = std::make_unique<Subprocess>(prefix, dir.path());
    const bool serving = WaitServing(*server, socket);
    INFO(server->Stderr());
    REQUIRE(serving);
    port = LoggedHttpPort(*server);
    REQUIRE(port > 0);
    return server;
  }
  // GET `path` with 1 s to connect and 1 s to read: the status code, or -1 when there is no answer in time.
  int Get(const std::string& path, std::string* body = nullptr) const {
    httplib::Client client("127.0.0.1", port);
    client.set_connection_timeout(1, 0);
    client.set_read_timeout(1, 0);
    auto response = client.Get(path.c_str());
    if (!response) {
      return -1;
    }
    if (body != nullptr) {
      *body = response->body;
    }
    return response->status;
  }
  static bool StatusOk(const std::string& socket, int ms = 2000) {
    KmsClient client(socket);
    v2::StatusResponse response;
    return client.Status(response, std::chrono::milliseconds(ms)).ok();
  }

  std::string socket;
  int port = -1;
};

template <typename Condition>
bool WaitFor(Condition condition, absl::Duration timeout = absl::Seconds(30)) {
  const absl::Time deadline = absl::Now() + timeout;
  while (!condition()) {
    if (absl::Now() > deadline) {
      return false;
    }
    absl::SleepFor(absl::Milliseconds(50));
  }
  return true;
}

int TcpConnect(int port, bool nonblocking) { return ConnectTo(FloodTarget{port, ""}, nonblocking); }

TEST_CASE("Listener attack: a local user's connection flood on the metrics port leaves gRPC answering after it",
          "[integration][hardening][listener]") {
#if defined(__SANITIZE_ADDRESS__)
  // Under UBSan a dynamic-type check that misses its cache tests the memory with a pipe (sanitizer_common's
  // IsAccessibleMemoryRange); with every descriptor taken the pipe fails and UBSan reports an "invalid vptr" that
  // is not there, and halts. Measured only in the Release run.
  WARN("skipped under the sanitizers: they need descriptors of their own");
  return;
#elif defined(__SANITIZE_THREAD__)
  // Under ThreadSanitizer the flood did not take the daemon's socket to EMFILE (accept_error stayed 0 and every
  // Status call was answered at once, in two runs), so the check below fails without any TSan report; why the
  // TSan-built daemon keeps descriptors free under this flood is not yet found. Measured only in the Release run.
  WARN("skipped under ThreadSanitizer: the flood does not exhaust the daemon's descriptors there");
  return;
#endif
  INFO("the attacker runs as the unprivileged user nobody: switching to it needs root (CI runs as root)");
  REQUIRE(geteuid() == 0);
  Setup s;
  // Few descriptors, as under systemd's default 1024 with the flood scaled down to match.
  auto server = s.Start({"/usr/bin/prlimit", "--nofile=64:64", "--"});
  {
    ConnectionFlood flood(FloodTarget{s.port, ""}, 2000);
    INFO("the flood opened " << flood.opened() << " connections");
    REQUIRE(flood.opened() > 100);
    // Clients arrive while descriptors are short: each accept4 can meet EMFILE.
    for (int i = 0; i < 5; ++i) {
      Setup::StatusOk(s.socket, 500);
    }
  }
  // The flood is over: the socket answers again, and so does HTTP.
  INFO(server->Stderr());
  CHECK(WaitFor([&] { return Setup::StatusOk(s.socket); }));
  CHECK(WaitFor([&] { return s.Get("/healthz") == 200; }));
  std::string metrics;
  CHECK(s.Get("/metrics", &metrics) == 200);
  INFO(metrics);
  CHECK(Has(metrics, "kmsplugin_environment_healthy{environment=\"dev\"} 1"));
  // The flood did reach the limit: accept4 failed (EMFILE) and was retried, and the log said so once.
  CHECK_FALSE(Has(metrics, "kmsplugin_socket_connections_refused_total{environment=\"dev\",reason=\"accept_error\"} 0"));
  CHECK(Has(metrics, "kmsplugin_socket_connections_refused_total{environment=\"dev\",reason=\"accept_error\"}"));
  CHECK(Has(server->Stderr(), "\"event\":\"accept_failed\""));
  server->Signal(SIGTERM);
  CHECK(server->Wait(std::chrono::seconds(15)) == std::optional<int>(0));
}

TEST_CASE("Listener attack: a socket file removed under the daemon fails /healthz until it is bound again",
          "[integration][hardening][listener]") {
  Setup s;
  auto server = s.Start();
  REQUIRE(s.Get("/healthz") == 200);
  // Someone removes the socket and leaves a regular file in its place: nothing can connect, and the daemon
  // must not delete a file it did not create.
  REQUIRE(unlink(s.socket.c_str()) == 0);
  s.dir.Write("run/dev.sock", "not a socket");
  std::string body;
  CHECK(WaitFor([&] { return s.Get("/healthz", &body) == 503; }));
  INFO(body);
  CHECK(Has(body, "socket " + s.socket + " does not answer"));
  CHECK(Has(body, "not a socket"));
  CHECK(ReadWholeFile(s.socket) == "not a socket");
  // Once the path is free, the daemon binds it again by itself, says so once, and counts it.
  REQUIRE(unlink(s.socket.c_str()) == 0);
  CHECK(WaitFor([&] { return s.Get("/healthz") == 200; }));
  CHECK(Setup::StatusOk(s.socket));
  struct stat info {};
  REQUIRE(lstat(s.socket.c_str(), &info) == 0);
  CHECK(S_ISSOCK(info.st_mode));
  CHECK((info.st_mode & 0777) == 0600);
  std::string metrics;
  REQUIRE(s.Get("/metrics", &metrics) == 200);
  CHECK(Has(metrics, "kmsplugin_socket_rebinds_total{environment=\"dev\"} 1"));
  const std::string log = server->Stderr();
  CHECK(Count(log, "\"event\":\"socket_rebound\"") == 1);
  CHECK(Count(log, "\"event\":\"socket_unanswered\"") == 1);
  server->Signal(SIGTERM);
  CHECK(server->Wait(std::chrono::seconds(15)) == std::optional<int>(0));
  CHECK(lstat(s.socket.c_str(), &info) != 0);
}

TEST_CASE("Listener attack: 8 HTTP clients sending one header byte a second do not stop /healthz answering "
          "within 1 s",
          "[integration][hardening][listener]") {
  Setup s;
  auto server = s.Start();
  std::atomic<bool> stop{false};
  std::atomic<int> cut_off{0};
  std::vector<std::thread> slow;
  for (int i = 0; i < 8; ++i) {
    slow.emplace_back([&] {
      const int fd = TcpConnect(s.port, /*nonblocking=*/false);
      if (fd < 0) {
        return;
      }
      const std::string request = "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
      for (size_t i = 0; i < request.size() && !stop.load(); ++i) {
        if (send(fd, &request[i], 1, MSG_NOSIGNAL) != 1) {
          ++cut_off;  // the server closed the connection: the slow client was cut off
          break;
        }
        absl::SleepFor(absl::Seconds(1));
      }
      close(fd);
    });
  }
  absl::SleepFor(absl::Seconds(2));  // every slow client is connected and trickling
  int answered = 0;
  for (int i = 0; i < 5; ++i) {
    answered += s.Get("/healthz") == 200 ? 1 : 0;
    answered += s.Get("/readyz") == 200 ? 1 : 0;
  }
  CHECK(answered == 10);
  // The slow clients are cut off at the request deadline (5 s), not served for ever.
  CHECK(WaitFor([&] { return cut_off.load() == 8; }, absl::Seconds(40)));
  stop = true;
  for (std::thread& t : slow) {
    t.join();
  }
  server->Signal(SIGTERM);
  CHECK(server->Wait(std::chrono::seconds(15)) == std::optional<int>(0));
}

TEST_CASE("Listener attack: SIGTERM with idle gRPC, bare and keep-alive HTTP clients exits well before the grace "
          "period",
          "[integration][drain][listener]") {
  Setup s("  pollInterval: 1s\n  shutdownGracePeriod: 20s\n");
  auto server = s.Start();
  KmsClient idle(s.socket);
  v2::StatusResponse response;
  REQUIRE(idle.Status(response).ok());  // connected; stays open and idle
  const int bare = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  std::strncpy(address.sun_path, s.socket.c_str(), sizeof(address.sun_path) - 1);
  REQUIRE(connect(bare, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0);
  const int http = TcpConnect(s.port, /*nonblocking=*/false);
  REQUIRE(http >= 0);
  const std::string request = "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n";
  REQUIRE(send(http, request.data(), request.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(request.size()));
  char buffer[512];
  REQUIRE(recv(http, buffer, sizeof(buffer), 0) > 0);
  const absl::Time start = absl::Now();
  server->Signal(SIGTERM);
  CHECK(server->Wait(std::chrono::seconds(30)) == std::optional<int>(0));
  const absl::Duration took = absl::Now() - start;
  INFO("exit took " << absl::FormatDuration(took));
  CHECK(took < absl::Seconds(3));  // 20 s grace period; 5 s (HTTP keep-alive) or 20 s (gRPC) before the fix
  close(bare);
  close(http);
}

TEST_CASE("Listener attack: serve refuses a socket directory anyone can write, naming it, its mode and the fix",
          "[integration][hardening][socket]") {
  Setup s("  pollInterval: 1s\n", "open");
  REQUIRE(mkdir(s.dir.File("open").c_str(), 0777) == 0);
  REQUIRE(chmod(s.dir.File("open").c_str(), 0777) == 0);
  const RunResult serve = s.Cli({"serve", "--config", s.config});
  INFO(serve.err);
  CHECK(serve.exit_code != 0);
  CHECK(Has(serve.err, "socket directory " + s.dir.File("open")));
  CHECK(Has(serve.err, "mode 0777"));
  CHECK(Has(serve.err, "chmod go-w " + s.dir.File("open")));
}

TEST_CASE("Listener attack: a link planted at the socket path is refused and its target left as it was",
          "[integration][hardening][socket]") {
  Setup s;
  const std::string target = s.dir.Write("precious", "secret", 0600);
  mkdir(s.dir.File("run").c_str(), 0700);
  REQUIRE(symlink(target.c_str(), s.socket.c_str()) == 0);
  const RunResult serve = s.Cli({"serve", "--config", s.config});
  INFO(serve.err);
  CHECK(serve.exit_code != 0);
  CHECK(Has(serve.err, "is not a socket"));
  struct stat info {};
  REQUIRE(stat(target.c_str(), &info) == 0);
  CHECK((info.st_mode & 07777) == 0600);
  CHECK(ReadWholeFile(target) == "secret");
}

}  // namespace
}  // namespace kmsplugin::testing
