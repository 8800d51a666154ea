// Socket lifecycle, draining, rotation under load, bounded threads.

#include <dirent.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <thread>

#include <catch2/catch.hpp>

#include "tests/server/server_fixture.h"
#include "tests/support/rotation_load.h"

namespace kmsplugin::testing {
namespace {

const std::map<std::string, std::string> kAnnotations = {{"format.kmsplugin.io", "1"}};

// Delegates to a real key source, but every Wrap takes `delay`: an in-flight call that outlives a SIGTERM.
class SlowKeySource final : public core::KeySource {
 public:
  SlowKeySource(std::shared_ptr<core::KeySource> inner, absl::Duration delay) : inner_(std::move(inner)), delay_(delay) {}
  crypto::KeySourceKind Kind() const override { return inner_->Kind(); }
  absl::StatusOr<core::KeyVersion> Current() const override { return inner_->Current(); }
  absl::StatusOr<std::string> Wrap(const core::KeyVersion& v, std::string_view p, std::string_view a,
                                   absl::Time d) override {
    if (slow.load()) {
      absl::SleepFor(delay_);
    }
    return inner_->Wrap(v, p, a, d);
  }
  absl::StatusOr<crypto::SecretBytes> Unwrap(std::string_view r, std::string_view w, std::string_view a,
                                             absl::Time d) override {
    return inner_->Unwrap(r, w, a, d);
  }
  absl::StatusOr<core::KeyVersion> Lookup(std::string_view r) const override { return inner_->Lookup(r); }
  absl::Status Refresh(absl::Time d) override { return inner_->Refresh(d); }
  absl::StatusOr<std::vector<core::KeyVersion>> Versions() const override { return inner_->Versions(); }
  std::atomic<bool> slow{false};

 private:
  std::shared_ptr<core::KeySource> inner_;
  absl::Duration delay_;
};

mode_t ModeOf(const std::string& path) {
  struct stat info {};
  REQUIRE(lstat(path.c_str(), &info) == 0);
  return info.st_mode;
}

int ThreadCount() {
  int count = 0;
  DIR* dir = opendir("/proc/self/task");
  while (dirent* entry = readdir(dir)) {
    count += entry->d_name[0] != '.' ? 1 : 0;
  }
  closedir(dir);
  return count;
}

// A socket file that nothing listens on any more, as a crashed server leaves behind.
void MakeStaleSocket(const std::string& path) {
  const int fd = socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  std::strncpy(address.sun_path, path.c_str(), sizeof(address.sun_path) - 1);
  REQUIRE(bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0);
  close(fd);
}

TEST_CASE("Socket: created with mode 0600 and removed on shutdown", "[server][socket]") {
  auto f = std::make_unique<ServerFixture>();
  const std::string socket = f->socket;
  CHECK((ModeOf(socket) & 0777) == 0600);
  CHECK(S_ISSOCK(ModeOf(socket)));
  f->runner->Shutdown();
  struct stat info {};
  CHECK(lstat(socket.c_str(), &info) != 0);
}

TEST_CASE("Socket: mode 0660 and the configured group when socketGroup is set", "[server][socket]") {
  TempDir dir;
  auto service = MakeService(OpenLocal(MakeKeyring(dir, "g"), "g"), "g");
  std::vector<server::ServedEnvironment> envs{{dir.File("sub/g.sock"), std::string("root"), service}};
  server::ServerRunner runner({}, std::move(envs));
  REQUIRE(runner.Start().ok());
  CHECK((ModeOf(dir.File("sub/g.sock")) & 0777) == 0660);
  struct stat info {};
  REQUIRE(lstat(dir.File("sub/g.sock").c_str(), &info) == 0);
  CHECK(info.st_gid == 0);
  CHECK((ModeOf(dir.File("sub")) & 0777) == 0750);
}

TEST_CASE("Socket: an unknown socket group is refused with a clear error", "[server][socket]") {
  TempDir dir;
  auto service = MakeService(OpenLocal(MakeKeyring(dir, "g"), "g"), "g");
  std::vector<server::ServedEnvironment> envs{{dir.File("g.sock"), std::string("no-such-group-kp"), service}};
  server::ServerRunner runner({}, std::move(envs));
  const absl::Status status = runner.Start();
  CHECK(status.code() == absl::StatusCode::kNotFound);
  CHECK(std::string(status.message()).find("no-such-group-kp") != std::string::npos);
}

TEST_CASE("Socket: a stale socket file nothing answers on is replaced", "[server][socket]") {
  TempDir dir;
  MakeStaleSocket(dir.File("dev.sock"));
  auto service = MakeService(OpenLocal(MakeKeyring(dir, "dev"), "dev"), "dev");
  std::vector<server::ServedEnvironment> envs{{dir.File("dev.sock"), std::nullopt, service}};
  server::ServerRunner runner({}, std::move(envs));
  REQUIRE(runner.Start().ok());
  KmsClient client(dir.File("dev.sock"));
  v2::StatusResponse status;
  CHECK(client.Status(status).ok());
}

TEST_CASE("Socket: a second server on a socket that is being served is refused", "[server][socket]") {
  ServerFixture f;
  std::vector<server::ServedEnvironment> envs{{f.socket, std::nullopt, f.service}};
  server::ServerRunner second({}, std::move(envs));
  const absl::Status status = second.Start();
  CHECK(status.code() == absl::StatusCode::kAlreadyExists);
  CHECK(std::string(status.message()).find("already serving") != std::string::npos);
  second.Shutdown();
  v2::StatusResponse response;
  CHECK(f.client->Status(response).ok());  // the first one is untouched
}

TEST_CASE("Socket: a path that is a regular file is refused, never deleted", "[server][socket]") {
  TempDir dir;
  const std::string path = dir.Write("dev.sock", "precious");
  auto service = MakeService(OpenLocal(MakeKeyring(dir, "dev"), "dev"), "dev");
  std::vector<server::ServedEnvironment> envs{{path, std::nullopt, service}};
  server::ServerRunner runner({}, std::move(envs));
  const absl::Status status = runner.Start();
  CHECK(status.code() == absl::StatusCode::kFailedPrecondition);
  CHECK(std::string(status.message()).find("not a socket") != std::string::npos);
  CHECK(ReadWholeFile(path) == "precious");
}

TEST_CASE("Shutdown: in-flight calls finish within the grace period, later calls are refused", "[server][drain]") {
  TempDir dir;
  auto slow = std::make_shared<SlowKeySource>(OpenLocal(MakeKeyring(dir, "dev"), "dev"), absl::Milliseconds(600));
  auto service = MakeService(slow, "dev");
  server::RunnerOptions options;
  options.shutdown_grace_period = absl::Seconds(5);
  std::vector<server::ServedEnvironment> envs{{dir.File("dev.sock"), std::nullopt, service}};
  server::ServerRunner runner(options, std::move(envs));
  REQUIRE(runner.Start().ok());
  slow->slow = true;
  std::atomic<int> succeeded{0};
  std::vector<std::thread> callers;
  for (int i = 0; i < 6; ++i) {
    callers.emplace_back([&] {
      KmsClient client(dir.File("dev.sock"));
      v2::EncryptResponse response;
      if (client.Encrypt(std::string(32, 'x'), response).ok()) {
        ++succeeded;
      }
    });
  }
  absl::SleepFor(absl::Milliseconds(200));  // the calls are now inside Wrap
  const absl::Time before = absl::Now();
  runner.Shutdown();
  CHECK(absl::Now() - before < absl::Seconds(5));
  for (std::thread& caller : callers) {
    caller.join();
  }
  CHECK(succeeded.load() == 6);
  KmsClient late(dir.File("dev.sock"));
  v2::StatusResponse status;
  CHECK(late.Status(status, std::chrono::milliseconds(300)).error_code() != grpc::StatusCode::OK);
}

TEST_CASE("Rotation under load: Status and Encrypt agree, key_ids only move forward, all decrypts succeed",
          "[server][rotation]") {
  ServerFixture f;
  // Rotation is done through a second handle on the same keyring, as `kmsplugin rotate` does.
  auto rotator = OpenLocal(f.keyring, "dev");
  auto version_of = [](const std::string& key_id) {  // local:<id>:v<N>:<created>
    const size_t v = key_id.find(":v");
    return std::stoul(key_id.substr(v + 2, key_id.find(':', v + 2) - v - 2));
  };
  RotationLoad load(f.socket, version_of);
  for (int r = 0; r < 5; ++r) {
    absl::SleepFor(absl::Milliseconds(150));
    REQUIRE(rotator->Rotate(absl::Now() + absl::Seconds(5)).ok());
    f.runner->RequestRefresh();
  }
  absl::SleepFor(absl::Milliseconds(300));
  load.Stop();
  CHECK(load.failures() == 0);
  CHECK(load.disagreements() == 0);
  v2::StatusResponse final_status;
  REQUIRE(f.client->Status(final_status).ok());
  CHECK(version_of(final_status.key_id()) == 6);
  // Every ciphertext written under any version still decrypts.
  std::set<std::string> key_ids;
  CHECK(load.DecryptAllAgain(key_ids) == 0);
  CHECK(key_ids.size() >= 3);
}

TEST_CASE("Threads: 64 concurrent clients do not grow the server past its thread cap", "[server][threads]") {
  server::RunnerOptions options;
  options.tuning.max_threads = 8;
  ServerFixture f(options);
  const int before = ThreadCount();
  std::atomic<int> ok{0};
  std::atomic<int> exhausted{0};
  std::atomic<int> other{0};
  std::atomic<int> peak{0};
  std::vector<std::thread> clients;
  for (int i = 0; i < 64; ++i) {
    clients.emplace_back([&] {
      KmsClient client(f.socket);
      for (int j = 0; j < 20; ++j) {
        v2::EncryptResponse response;
        const grpc::Status status = client.Encrypt(std::string(32, 'c'), response);
        if (status.ok()) {
          ++ok;
        } else if (status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED) {
          ++exhausted;
        } else {
          ++other;
        }
        peak = std::max(peak.load(), ThreadCount());
      }
    });
  }
  for (std::thread& client : clients) {
    client.join();
  }
  // 64 client threads (+ the client channels' own) live in this process too; the server may add at most its cap.
  const int client_side = 64;
  INFO("before " << before << " peak " << peak.load() << " ok " << ok.load() << " exhausted " << exhausted.load());
  CHECK(peak.load() <= before + client_side + 8 + 16);
  CHECK(other.load() == 0);
  CHECK(ok.load() > 0);
}

}  // namespace
}  // namespace kmsplugin::testing
