// The socket listener under attack, in process with real gRPC over a Unix socket (issue 11, items 2 and 7):
// descriptor exhaustion, too many connections, a link swapped in at the socket path, an open socket directory.

#include <fcntl.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <grp.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>

#include "absl/time/clock.h"
#include <grpcpp/server_builder.h>

#include "kmsplugin/server/call_pool.h"
#include "kmsplugin/server/kms_services.h"
#include "kmsplugin/server/socket_listener.h"
#include "tests/server/server_fixture.h"

namespace kmsplugin::testing {
namespace {

bool Has(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// A connected Unix socket to `path` (REQUIREs success), or -1 with `allow_failure`.
int Connect(const std::string& path) {
  const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  REQUIRE(fd >= 0);
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  std::strncpy(address.sun_path, path.c_str(), sizeof(address.sun_path) - 1);
  REQUIRE(connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0);
  return fd;
}

// Waits up to `timeout` for `condition`.
template <typename Condition>
bool WaitFor(Condition condition, absl::Duration timeout = absl::Seconds(20)) {
  const absl::Time deadline = absl::Now() + timeout;
  while (!condition()) {
    if (absl::Now() > deadline) {
      return false;
    }
    absl::SleepFor(absl::Milliseconds(10));
  }
  return true;
}

// True when the peer closed `fd` (read gives 0 or an error) within `timeout`.
bool ClosedByPeer(int fd, absl::Duration timeout) {
  pollfd p{fd, POLLIN, 0};
  if (poll(&p, 1, static_cast<int>(absl::ToInt64Milliseconds(timeout))) <= 0) {
    return false;
  }
  char byte;
  return recv(fd, &byte, 1, MSG_DONTWAIT) <= 0;
}

bool StatusOk(const std::string& socket) {
  KmsClient client(socket);
  v2::StatusResponse response;
  return client.Status(response, std::chrono::milliseconds(2000)).ok();
}

TEST_CASE("Listener: a gRPC 1.51 server built with no listening port serves the connections handed to it",
          "[server][listener]") {
  TempDir dir;
  auto service = MakeService(OpenLocal(MakeKeyring(dir, "dev"), "dev"), "dev");
  server::CallPool pool(server::CallPool::Options{2, 4});
  server::KmsV2Service v2(*service, pool, nullptr);
  grpc::ServerBuilder builder;
  builder.RegisterService(&v2);
  std::unique_ptr<grpc::Server> grpc_server = builder.BuildAndStart();
  REQUIRE(grpc_server != nullptr);
  const std::string socket = dir.File("dev.sock");
  auto listener = server::SocketListener::Start(socket, std::nullopt, grpc_server.get(), {});
  REQUIRE(listener.ok());
  CHECK(StatusOk(socket));
  CHECK((*listener)->Counts().accepted == 1);
  listener->reset();
  grpc_server->Shutdown(std::chrono::system_clock::now());
  CHECK_FALSE(StatusOk(socket));  // nothing else listens: only handed connections were ever served
}

TEST_CASE("Listener: a connection that arrives while descriptors run out is served once they are back",
          "[server][listener][hardening]") {
  ServerFixture f;
  REQUIRE(StatusOk(f.socket));
  const int client = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);  // made before the descriptors run out
  REQUIRE(client >= 0);
  rlimit saved{};
  REQUIRE(getrlimit(RLIMIT_NOFILE, &saved) == 0);
  std::vector<int> hogs;
  {
    // Fill every descriptor this process may open, as a flood of connections would.
    rlimit low = saved;
    low.rlim_cur = std::min<rlim_t>(saved.rlim_cur, 4096);
    REQUIRE(setrlimit(RLIMIT_NOFILE, &low) == 0);
    while (true) {
      const int fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
      if (fd < 0) {
        REQUIRE(errno == EMFILE);
        break;
      }
      hogs.push_back(fd);
    }
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    std::strncpy(address.sun_path, f.socket.c_str(), sizeof(address.sun_path) - 1);
    REQUIRE(connect(client, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0);  // in the backlog
    const bool failed = WaitFor([&] { return f.runner->SocketCounts("dev")->accept_errors > 0; });
    for (int fd : hogs) {
      close(fd);
    }
    setrlimit(RLIMIT_NOFILE, &saved);
    REQUIRE(failed);  // accept4 did meet EMFILE
  }
  const uint64_t accepted_before = f.runner->SocketCounts("dev")->accepted;
  // The listener kept trying: the waiting connection is taken, and new clients are served.
  CHECK(WaitFor([&] { return f.runner->SocketCounts("dev")->accepted > accepted_before; }));
  CHECK(StatusOk(f.socket));
  close(client);
}

TEST_CASE("Listener: connections over the per-socket limit are closed at once, and room comes back when clients "
          "leave",
          "[server][listener][hardening]") {
  server::RunnerOptions options;
  options.listener.max_connections = 4;
  ServerFixture f(options);
  std::vector<int> held;
  for (int i = 0; i < 4; ++i) {
    held.push_back(Connect(f.socket));
  }
  REQUIRE(WaitFor([&] { return f.runner->SocketCounts("dev")->accepted >= 4; }));
  const int extra = Connect(f.socket);  // the kernel accepts it into the backlog; the listener closes it
  CHECK(ClosedByPeer(extra, absl::Seconds(20)));
  for (int fd : held) {
    INFO("a held connection was closed");
    CHECK(!ClosedByPeer(fd, absl::Milliseconds(1)));
  }
  close(extra);
  CHECK(f.runner->SocketCounts("dev")->refused_over_limit >= 1);
  CHECK(f.runner->SocketCounts("dev")->live <= 4);
  for (int fd : held) {
    close(fd);
  }
  // gRPC closes its side of each; the next connection past the limit check is served.
  CHECK(WaitFor([&] { return StatusOk(f.socket); }));
}

TEST_CASE("Listener: one peer user holding connections open cannot take kube-apiserver's room",
          "[server][listener][hardening]") {
  if (geteuid() != 0) {
    WARN("needs root to connect as another user; CI runs as root");
    return;
  }
  server::RunnerOptions options;
  options.listener.max_connections = 8;
  options.listener.max_connections_per_uid = 4;
  ServerFixture f(options);
  // A member of the socket group: here the socket is opened to everyone so that uid 65534 can connect.
  REQUIRE(chmod(f.socket.c_str(), 0666) == 0);
  std::string dir = f.socket.substr(0, f.socket.rfind('/'));
  for (std::string d = dir; d.size() > 1; d = d.substr(0, d.rfind('/'))) {
    struct stat info {};
    if (stat(d.c_str(), &info) == 0 && (info.st_mode & 0001) == 0) {
      chmod(d.c_str(), info.st_mode | 0001);  // traversable (the test's own temp directories)
    }
  }
  int ready[2], release[2];
  REQUIRE(pipe(ready) == 0);
  REQUIRE(pipe(release) == 0);
  const pid_t attacker = fork();
  REQUIRE(attacker >= 0);
  if (attacker == 0) {
    close(ready[0]);
    close(release[1]);
    if (setgroups(0, nullptr) != 0 || setresgid(65534, 65534, 65534) != 0 || setresuid(65534, 65534, 65534) != 0) {
      _exit(2);
    }
    std::vector<int> held;
    for (int i = 0; i < 8; ++i) {  // every connection the socket takes
      const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
      sockaddr_un address{};
      address.sun_family = AF_UNIX;
      std::strncpy(address.sun_path, f.socket.c_str(), sizeof(address.sun_path) - 1);
      if (connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0) {
        _exit(3);
      }
      held.push_back(fd);
    }
    const char byte = 1;
    if (write(ready[1], &byte, 1) != 1) {
      _exit(4);
    }
    char done;
    (void)!read(release[0], &done, 1);  // hold them until the parent has checked
    _exit(0);
  }
  close(ready[1]);
  close(release[0]);
  char byte = 0;
  REQUIRE(read(ready[0], &byte, 1) == 1);
  // The listener admits 4 of the attacker's 8 and closes the rest at once.
  CHECK(WaitFor([&] { return f.runner->SocketCounts("dev")->refused_over_limit >= 4; }));
  // kube-apiserver (root here) still gets in and is served.
  CHECK(StatusOk(f.socket));
  close(release[1]);
  int status = 0;
  waitpid(attacker, &status, 0);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
  close(ready[0]);
}

TEST_CASE("Socket: a link swapped in at the socket path never changes its target, over 20 starts",
          "[server][socket][hardening]") {
  TempDir dir;
  auto service = MakeService(OpenLocal(MakeKeyring(dir, "dev"), "dev"), "dev");
  // A root file that must stay 0600 root:root (a stand-in for /etc/shadow).
  const std::string target = dir.Write("precious", "secret", 0600);
  REQUIRE(chown(target.c_str(), 0, 0) == 0);
  const std::string socket = dir.File("dev.sock");
  const std::string link = dir.File("link.tmp");
  int started = 0;
  int changed = 0;
  for (int round = 0; round < 20; ++round) {
    std::atomic<bool> stop{false};
    // The attacker: as soon as a socket appears at the path, a link to the target is renamed over it (rename is
    // atomic), between the server's bind() and whatever it does to the file next.
    REQUIRE(symlink(target.c_str(), link.c_str()) == 0);
    std::thread attacker([&] {
      while (!stop.load()) {
        struct stat info {};
        if (lstat(socket.c_str(), &info) == 0 && S_ISSOCK(info.st_mode)) {
          rename(link.c_str(), socket.c_str());
          return;
        }
      }
    });
    {
      std::vector<server::ServedEnvironment> envs{{socket, std::string("nogroup"), service}};
      server::ServerRunner runner({}, std::move(envs));
      started += runner.Start().ok() ? 1 : 0;
      stop = true;
      attacker.join();
      runner.Shutdown();
    }
    struct stat info {};
    REQUIRE(stat(target.c_str(), &info) == 0);
    if ((info.st_mode & 07777) != 0600 || info.st_gid != 0 || info.st_uid != 0) {
      ++changed;
      chmod(target.c_str(), 0600);  // put it back for the next round
      chown(target.c_str(), 0, 0);
    }
    unlink(socket.c_str());
    unlink(link.c_str());
  }
  INFO("rounds that changed the target: " << changed << " of 20; starts that succeeded: " << started);
  CHECK(changed == 0);
  CHECK(ReadWholeFile(target) == "secret");
}

TEST_CASE("Socket: a socket directory others can write (0777, not sticky) is refused, naming it and the fix",
          "[server][socket][hardening]") {
  TempDir dir;
  const std::string open_dir = dir.File("open");
  REQUIRE(mkdir(open_dir.c_str(), 0777) == 0);
  REQUIRE(chmod(open_dir.c_str(), 0777) == 0);
  auto service = MakeService(OpenLocal(MakeKeyring(dir, "dev"), "dev"), "dev");
  std::vector<server::ServedEnvironment> envs{{open_dir + "/dev.sock", std::nullopt, service}};
  server::ServerRunner runner({}, std::move(envs));
  const absl::Status status = runner.Start();
  INFO(status.ToString());
  CHECK(status.code() == absl::StatusCode::kFailedPrecondition);
  CHECK(Has(std::string(status.message()), "socket directory " + open_dir));
  CHECK(Has(std::string(status.message()), "0777"));
  CHECK(Has(std::string(status.message()), "chmod go-w " + open_dir));
  struct stat info {};
  CHECK(lstat((open_dir + "/dev.sock").c_str(), &info) != 0);  // nothing was bound there
}

TEST_CASE("Socket: a sticky shared directory (like /tmp) is refused: anyone could create the path first",
          "[server][socket][hardening]") {
  TempDir dir;
  const std::string shared = dir.File("shared");
  REQUIRE(mkdir(shared.c_str(), 0777) == 0);
  REQUIRE(chmod(shared.c_str(), 01777) == 0);
  auto service = MakeService(OpenLocal(MakeKeyring(dir, "dev"), "dev"), "dev");
  std::vector<server::ServedEnvironment> envs{{shared + "/dev.sock", std::nullopt, service}};
  server::ServerRunner runner({}, std::move(envs));
  const absl::Status status = runner.Start();
  INFO(status.ToString());
  CHECK(status.code() == absl::StatusCode::kFailedPrecondition);
  CHECK(Has(std::string(status.message()), "socket directory " + shared));
  CHECK(Has(std::string(status.message()), "not creating it first"));
}

TEST_CASE("Socket: a directory above the socket's that another user owns is refused", "[server][socket][hardening]") {
  TempDir dir;
  const std::string theirs = dir.File("theirs");
  REQUIRE(mkdir(theirs.c_str(), 0755) == 0);
  REQUIRE(chown(theirs.c_str(), 65534, 65534) == 0);  // nobody: could rename run/ away and put its own in place
  REQUIRE(mkdir((theirs + "/run").c_str(), 0700) == 0);
  auto service = MakeService(OpenLocal(MakeKeyring(dir, "dev"), "dev"), "dev");
  std::vector<server::ServedEnvironment> envs{{theirs + "/run/dev.sock", std::nullopt, service}};
  server::ServerRunner runner({}, std::move(envs));
  const absl::Status status = runner.Start();
  INFO(status.ToString());
  CHECK(status.code() == absl::StatusCode::kFailedPrecondition);
  CHECK(Has(std::string(status.message()), "socket directory " + theirs + " (above " + theirs + "/run)"));
  CHECK(Has(std::string(status.message()), "owned by uid 65534"));
}

TEST_CASE("Socket: a stale socket is replaced by one of mode 0600 even with umask 0", "[server][socket]") {
  TempDir dir;
  const std::string socket = dir.File("dev.sock");
  {
    const int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    std::strncpy(address.sun_path, socket.c_str(), sizeof(address.sun_path) - 1);
    REQUIRE(bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0);
    close(fd);
  }
  auto service = MakeService(OpenLocal(MakeKeyring(dir, "dev"), "dev"), "dev");
  const mode_t saved = umask(0);
  std::vector<server::ServedEnvironment> envs{{socket, std::nullopt, service}};
  server::ServerRunner runner({}, std::move(envs));
  const absl::Status started = runner.Start();
  umask(saved);
  REQUIRE(started.ok());
  struct stat info {};
  REQUIRE(lstat(socket.c_str(), &info) == 0);
  CHECK(S_ISSOCK(info.st_mode));
  CHECK((info.st_mode & 0777) == 0600);
  CHECK(StatusOk(socket));
}

TEST_CASE("Shutdown: idle connections do not hold the exit for the grace period", "[server][drain]") {
  server::RunnerOptions options;
  options.shutdown_grace_period = absl::Seconds(30);
  ServerFixture f(options);
  REQUIRE(StatusOk(f.socket));
  v2::StatusResponse response;
  REQUIRE(f.client->Status(response).ok());  // the fixture's channel stays connected, idle
  const int bare = Connect(f.socket);         // a client that connected and never spoke
  const absl::Time start = absl::Now();
  f.runner->Shutdown();
  const absl::Duration took = absl::Now() - start;
  INFO("Shutdown took " << absl::FormatDuration(took));
  CHECK(took < absl::Seconds(10));  // the grace period is 30 s; without the fix it is all spent
  close(bare);
}

}  // namespace
}  // namespace kmsplugin::testing
