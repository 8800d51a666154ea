// audit_bench_writer: fills an etcd with N objects written as kube-apiserver writes them (ApiserverWriter through
// an in-process kmsplugin), for bench/audit/run.sh. A hidden Catch test ("[.bench]"), so it reuses the test
// fixtures; CTest never runs it. Environment:
//   AUDIT_BENCH_ETCD     host:port of a running etcd
//   AUDIT_BENCH_OBJECTS  how many objects (default 100000): 95% KMS v2, 3% KMS v1, 2% identity
//   AUDIT_BENCH_DIR      where the keyring, root key and config.yaml for `audit --config` are left
//   AUDIT_BENCH_SEED_EVERY  if set (e.g. 1000): a new KMS v2 seed per that many objects, as apiserver restarts and
//                        rotations leave behind (audit --decrypt unwraps each distinct seed once); default: one seed

#include <sys/stat.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>

#include "absl/strings/str_cat.h"
#include "tests/audit/apiserver_writer.h"
#include "tests/server/server_fixture.h"

namespace kmsplugin::testing {
namespace {

std::string Env(const char* name, const std::string& fallback = "") {
  const char* value = std::getenv(name);
  return value == nullptr ? fallback : std::string(value);
}

TEST_CASE("bench: write objects as kube-apiserver does", "[.bench]") {
  const std::string endpoint = Env("AUDIT_BENCH_ETCD");
  const std::string out_dir = Env("AUDIT_BENCH_DIR");
  REQUIRE(!endpoint.empty());
  REQUIRE(!out_dir.empty());
  const int objects = std::stoi(Env("AUDIT_BENCH_OBJECTS", "100000"));
  ServerFixture plugin;
  ApiserverWriter writer(endpoint, *plugin.client);
  REQUIRE(writer.NewSeed().ok());

  const int seed_every = std::stoi(Env("AUDIT_BENCH_SEED_EVERY", "0"));
  const auto start = std::chrono::steady_clock::now();
  constexpr int kThreads = 16;
  std::atomic<int> next{0};
  std::atomic<int> failures{0};
  std::atomic<int> seeds{seed_every > 0 ? 0 : 1};
  std::vector<std::thread> threads;
  const std::string filler(500, 'v');  // a Secret's data: about 0.6 KB stored per object
  const auto put = [&](ApiserverWriter& w, int i) {
    const std::string name = absl::StrCat("secret-", i);
    const std::string key = absl::StrCat("/registry/secrets/ns-", i % 100, "/", name);
    const std::string payload = SecretPayload(name) + filler;
    absl::Status status;
    if (i % 100 < 95) {
      status = w.PutV2(key, payload);
    } else if (i % 100 < 98) {
      status = w.PutV1(key, payload);
    } else {
      status = w.PutIdentityProtobuf(key, payload);
    }
    if (!status.ok() && failures++ == 0) {
      std::cerr << status.ToString() << "\n";
    }
  };
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      if (seed_every <= 0) {
        for (int i = next++; i < objects; i = next++) {
          put(writer, i);
        }
        return;
      }
      // Blocks of seed_every objects, each under a seed of its own (this thread's writer, a new seed per block).
      ApiserverWriter own(endpoint, *plugin.client);
      for (int block = next++; block * seed_every < objects; block = next++) {
        if (!own.NewSeed().ok()) {
          ++failures;
          return;
        }
        ++seeds;
        for (int i = block * seed_every; i < std::min(objects, (block + 1) * seed_every); ++i) {
          put(own, i);
        }
      }
    });
  }
  for (std::thread& thread : threads) {
    thread.join();
  }
  REQUIRE(failures.load() == 0);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::cout << "wrote " << objects << " objects in " << seconds << " s under " << seeds.load() << " KMS v2 seed(s)\n";

  // Leave what `audit --config` needs: the keyring and root key (0600) and a config naming them.
  namespace fs = std::filesystem;
  for (const char* file : {"dev.keyring", "dev.rootkey"}) {
    fs::copy_file(plugin.dir.File(file), out_dir + "/" + file, fs::copy_options::overwrite_existing);
    chmod((out_dir + "/" + file).c_str(), 0600);
  }
  TempDir scratch;
  const std::string config = absl::StrCat("environments:\n  - name: dev\n    socket: ", out_dir,
                                          "/dev.sock\n    keySource:\n      local:\n        keyring: ", out_dir,
                                          "/dev.keyring\n        rootKeyFile: ", out_dir, "/dev.rootkey\n");
  std::ofstream(out_dir + "/config.yaml") << config;
  chmod((out_dir + "/config.yaml").c_str(), 0600);
  std::cout << "key_id " << writer.key_id() << "\n";
}

}  // namespace
}  // namespace kmsplugin::testing
