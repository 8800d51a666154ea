// ServerRunner::Apply: adding, removing, moving and re-keying environments while serving, all or nothing.

#include <sys/stat.h>

#include <atomic>
#include <thread>

#include <catch2/catch.hpp>

#include "absl/strings/match.h"
#include "tests/server/server_fixture.h"
#include "tests/support/status_matchers.h"

namespace kmsplugin::testing {
namespace {

using Code = absl::StatusCode;

bool Exists(const std::string& path) {
  struct stat info {};
  return lstat(path.c_str(), &info) == 0;
}

bool Answers(const std::string& socket, std::string* version = nullptr) {
  KmsClient client(socket);
  v2::StatusResponse status;
  const bool ok = client.Status(status, std::chrono::milliseconds(1000)).ok();
  if (ok && version != nullptr) {
    *version = status.version();
  }
  return ok;
}

std::vector<std::string> Names(const server::ServerRunner& runner) {
  std::vector<std::string> names;
  for (const auto& service : runner.Services()) {
    names.push_back(service->environment());
  }
  return names;
}

// A new environment "name" on its own keyring, probed (as serve.cc does before Apply).
server::ServedEnvironment NewEnvironment(const TempDir& dir, const std::string& name, const std::string& socket,
                                         const std::string& status_version = "v2") {
  auto service = MakeService(OpenLocal(MakeKeyring(dir, name), name), name, status_version);
  REQUIRE(service->Probe(absl::Now() + absl::Seconds(5)).ok);
  return server::ServedEnvironment{socket, std::nullopt, service};
}

TEST_CASE("Apply: an added environment answers on its socket, removing it stops it and removes the file",
          "[server][reload]") {
  ServerFixture f;
  const std::string socket = f.dir.File("b.sock");
  server::EnvironmentChanges add;
  add.add.push_back(NewEnvironment(f.dir, "b", socket));
  REQUIRE_THAT(f.runner->Apply(std::move(add)), IsOk());
  CHECK(Answers(socket));
  CHECK(Names(*f.runner) == std::vector<std::string>{"dev", "b"});
  server::EnvironmentChanges remove;
  remove.remove.push_back("b");
  REQUIRE_THAT(f.runner->Apply(std::move(remove)), IsOk());
  CHECK_FALSE(Exists(socket));
  CHECK(Names(*f.runner) == std::vector<std::string>{"dev"});
  CHECK(Answers(f.socket));
}

TEST_CASE("Apply: when one added socket cannot be bound, the others it bound are stopped and nothing changes",
          "[server][reload][bad-input]") {
  ServerFixture f;
  const std::string good = f.dir.File("b.sock");
  const std::string taken = f.dir.Write("c.sock", "a regular file, not a socket");
  server::EnvironmentChanges changes;
  changes.add.push_back(NewEnvironment(f.dir, "b", good));
  changes.add.push_back(NewEnvironment(f.dir, "c", taken));
  changes.remove.push_back("dev");
  const absl::Status status = f.runner->Apply(std::move(changes));
  REQUIRE_THAT(status, StatusIs(Code::kFailedPrecondition, "environment \"c\""));
  CHECK(absl::StrContains(status.message(), "not a socket"));
  CHECK_FALSE(Exists(good));
  CHECK(ReadWholeFile(taken) == "a regular file, not a socket");
  CHECK(Names(*f.runner) == std::vector<std::string>{"dev"});
  CHECK(Answers(f.socket));  // "dev" was never stopped
}

TEST_CASE("Apply: an environment moves to a new socket, the old one disappears", "[server][reload]") {
  ServerFixture f;
  const std::string moved = f.dir.File("moved/dev.sock");
  server::EnvironmentChanges changes;
  changes.remove.push_back("dev");
  changes.add.push_back(server::ServedEnvironment{moved, std::nullopt, MakeService(f.source, "dev")});
  REQUIRE_THAT(f.runner->Apply(std::move(changes)), IsOk());
  CHECK(Answers(moved));
  CHECK_FALSE(Exists(f.socket));
  CHECK(Names(*f.runner) == std::vector<std::string>{"dev"});
}

TEST_CASE("Apply: a changed Status version on the same socket is served after a restart of that listener",
          "[server][reload]") {
  ServerFixture f;
  server::EnvironmentChanges changes;
  changes.remove.push_back("dev");
  auto service = MakeService(f.source, "dev", "v2beta1");
  service->Probe(absl::Now() + absl::Seconds(5));
  changes.add.push_back(server::ServedEnvironment{f.socket, std::nullopt, service});
  REQUIRE_THAT(f.runner->Apply(std::move(changes)), IsOk());
  std::string version;
  REQUIRE(Answers(f.socket, &version));
  CHECK(version == "v2beta1");
}

TEST_CASE("Apply: a key source swapped under load drops no call", "[server][reload]") {
  ServerFixture f;
  std::atomic<bool> stop{false};
  std::atomic<int> calls{0};
  std::atomic<int> failures{0};
  std::vector<std::thread> workers;
  for (int w = 0; w < 3; ++w) {
    workers.emplace_back([&] {
      KmsClient client(f.socket);
      while (!stop.load()) {
        v2::EncryptResponse encrypted;
        v2::DecryptResponse decrypted;
        if (!client.Encrypt(std::string(32, 'w'), encrypted).ok() ||
            !client.DecryptResponseOf(encrypted, decrypted).ok() || decrypted.plaintext() != std::string(32, 'w')) {
          ++failures;
        }
        ++calls;
      }
    });
  }
  for (int i = 0; i < 10; ++i) {
    auto candidate = OpenLocal(f.keyring, "dev");  // the same keyring through a second handle
    auto health = f.service->CheckReplacement(*candidate, absl::Now() + absl::Seconds(5));
    REQUIRE_THAT(health, IsOk());
    server::EnvironmentChanges changes;
    changes.swap.push_back(server::KeySourceSwap{"dev", candidate, *health});
    const int before = calls.load();
    REQUIRE_THAT(f.runner->Apply(std::move(changes)), IsOk());
    CHECK(f.service->key_source() == candidate);
    for (int wait = 0; wait < 500 && calls.load() < before + 10; ++wait) {
      absl::SleepFor(absl::Milliseconds(2));
    }
  }
  stop = true;
  for (std::thread& worker : workers) {
    worker.join();
  }
  CHECK(failures.load() == 0);
  CHECK(calls.load() >= 100);
}

TEST_CASE("Apply: inconsistent changes are refused before anything is touched", "[server][reload][bad-input]") {
  ServerFixture f;
  SECTION("removing an environment that is not served") {
    server::EnvironmentChanges changes;
    changes.remove.push_back("nope");
    CHECK_THAT(f.runner->Apply(std::move(changes)), StatusIs(Code::kNotFound, "nope"));
  }
  SECTION("adding a name that is served and not removed") {
    server::EnvironmentChanges changes;
    changes.add.push_back(server::ServedEnvironment{f.dir.File("x.sock"), std::nullopt, MakeService(f.source, "dev")});
    CHECK_THAT(f.runner->Apply(std::move(changes)), StatusIs(Code::kAlreadyExists, "served already"));
    CHECK_FALSE(Exists(f.dir.File("x.sock")));
  }
  SECTION("adding on a socket another environment keeps") {
    server::EnvironmentChanges changes;
    changes.add.push_back(NewEnvironment(f.dir, "b", f.socket));
    CHECK_THAT(f.runner->Apply(std::move(changes)), StatusIs(Code::kAlreadyExists, "is served by environment \"dev\""));
  }
  SECTION("a socket group that does not exist") {
    server::EnvironmentChanges changes;
    auto env = NewEnvironment(f.dir, "b", f.dir.File("b.sock"));
    env.socket_group = "no-such-group-kp";
    changes.add.push_back(env);
    CHECK_THAT(f.runner->Apply(std::move(changes)), StatusIs(Code::kNotFound, "no-such-group-kp"));
    CHECK_FALSE(Exists(f.dir.File("b.sock")));
  }
  SECTION("swapping the key source of an environment that is removed") {
    server::EnvironmentChanges changes;
    changes.remove.push_back("dev");
    changes.swap.push_back(server::KeySourceSwap{"dev", f.source, {}});
    CHECK_THAT(f.runner->Apply(std::move(changes)), StatusIs(Code::kNotFound));
  }
  CHECK(Answers(f.socket));
  CHECK(Names(*f.runner) == std::vector<std::string>{"dev"});
}

TEST_CASE("Apply: refused after Shutdown", "[server][reload][bad-input]") {
  ServerFixture f;
  f.runner->Shutdown();
  server::EnvironmentChanges changes;
  changes.remove.push_back("dev");
  CHECK_THAT(f.runner->Apply(std::move(changes)), StatusIs(Code::kFailedPrecondition));
  CHECK(f.runner->Services().empty());
}

}  // namespace
}  // namespace kmsplugin::testing
