// Memory after a flood, through the real binary: 1,000 clients (one connection each) call `kmsplugin serve`, then
// go away; the daemon's RSS must come back down instead of staying at its peak (issue 15: 52 -> 225 MB and
// stuck, while the shipped static pod allows 64 Mi).

#include <catch2/catch.hpp>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "tests/support/daemon.h"

namespace kmsplugin::testing {
namespace {

long RssKb(pid_t pid) {
  std::ifstream status("/proc/" + std::to_string(pid) + "/status");
  std::string key;
  long value = -1;
  while (status >> key) {
    if (key == "VmRSS:") {
      status >> value;
      return value;
    }
    status.ignore(4096, '\n');
  }
  return value;
}

}  // namespace

TEST_CASE("Memory: after 1,000 clients have come and gone, the daemon's RSS falls back", "[server][memory]") {
  DaemonDriver d;
  const std::string socket = d.dir.File("dev.sock");
  d.config =
      d.dir.Write("config.yaml", "http:\n  enabled: false\nenvironments:\n  - name: dev\n    socket: " + socket +
                                     "\n    keySource:\n      local:\n        keyring: " + d.dir.File("dev.keyring") +
                                     "\n        rootKeyFile: " + d.dir.File("dev.rootkey") + "\n");
  REQUIRE(d.Init().exit_code == 0);
  auto server = d.Serve();
  REQUIRE(DaemonDriver::WaitServing(*server, socket));
  {
    KmsClient warm(socket);
    for (int i = 0; i < 200; ++i) {
      v2::EncryptResponse response;
      REQUIRE(warm.Encrypt(std::string(32, 'w'), response).ok());
    }
  }
  const long base = RssKb(server->pid());
  {
    const int clients = 1000;
    const int threads = 50;
    std::vector<std::unique_ptr<KmsClient>> pool;
    for (int i = 0; i < clients; ++i) {
      pool.push_back(std::make_unique<KmsClient>(socket));
    }
    std::atomic<int> failures{0};
    std::vector<std::thread> workers;
    for (int t = 0; t < threads; ++t) {
      workers.emplace_back([&, t] {
        for (int round = 0; round < 3; ++round) {
          for (int i = t; i < clients; i += threads) {
            v2::EncryptResponse response;
            failures += pool[i]->Encrypt(std::string(32, 'f'), response).ok() ? 0 : 1;
          }
        }
      });
    }
    for (std::thread& worker : workers) {
      worker.join();
    }
    CHECK(failures == 0);
  }  // every client connection closes here
  const long peak = RssKb(server->pid());
  INFO("RSS before the flood " << base << " kB, after it " << peak << " kB");
  REQUIRE(peak - base > 8 * 1024);  // the flood did grow the daemon; otherwise this test shows nothing
  // Wait (generously) for the memory to be handed back: at least half of the growth.
  long now = peak;
  const absl::Time end = absl::Now() + absl::Seconds(60);
  while (now > base + (peak - base) / 2 && absl::Now() < end) {
    absl::SleepFor(absl::Milliseconds(500));
    now = RssKb(server->pid());
  }
  INFO("RSS at the end " << now << " kB");
  CHECK(now <= base + (peak - base) / 2);
  server->Signal(SIGTERM);
  CHECK(server->Wait() == std::optional<int>(0));
}

}  // namespace kmsplugin::testing
