// Seeds left in the server's memory: this test binary forks a client process before anything starts gRPC, serves
// a real kmsplugin socket in the parent, lets the child send Encrypts with recognisable seeds (and Decrypt
// others back), then scans the parent's own readable memory (/proc/self/maps + /proc/self/mem) for them.
// Everything found is a copy the server left behind after the calls had finished: the client's copies live in
// the other process. Its own binary, so no other test has started gRPC before the fork.

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstdio>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "tests/server/gated_key_source.h"
#include "tests/server/server_fixture.h"

namespace kmsplugin::testing {
namespace {

constexpr int kSeeds = 50;
// 32-byte seeds: an 8-byte tag, a 4-digit index, and filler that is unlikely anywhere else.
std::string Seed(const char* tag, int i) {
  char buffer[33];
  std::snprintf(buffer, sizeof(buffer), "%s%04d#q7Zx!pL2@vN9$kR4^wE6&", tag, i);
  return std::string(buffer, 32);
}

// Client process: reads two socket paths (a line each) from `in`. On the first (local keyring: served on the
// callback thread) it encrypts kSeeds "ENCSEED-" seeds and encrypts and decrypts kSeeds "DECSEED-" seeds; on the
// second (a source that may block: served by the worker pool) the same with "ENCPOOL-" and "DECPOOL-". Exits 0
// when every call succeeded.
[[noreturn]] void RunClient(int in) {
  char paths[600] = {};
  size_t got = 0;
  ssize_t n = 0;
  while ((n = read(in, paths + got, sizeof(paths) - 1 - got)) > 0) {
    got += static_cast<size_t>(n);
  }
  std::istringstream lines(std::string(paths, got));
  std::string inline_socket, pooled_socket;
  if (!std::getline(lines, inline_socket) || !std::getline(lines, pooled_socket)) {
    _exit(3);
  }
  for (const auto& [socket, enc, dec] :
       {std::tuple{inline_socket, "ENCSEED-", "DECSEED-"}, std::tuple{pooled_socket, "ENCPOOL-", "DECPOOL-"}}) {
    KmsClient client(socket);
    for (int i = 0; i < kSeeds; ++i) {
      v2::EncryptResponse encrypted;
      if (!client.Encrypt(Seed(enc, i), encrypted).ok()) {
        _exit(4);
      }
      v2::EncryptResponse again;
      v2::DecryptResponse decrypted;
      if (!client.Encrypt(Seed(dec, i), again).ok() || !client.DecryptResponseOf(again, decrypted).ok() ||
          decrypted.plaintext() != Seed(dec, i)) {
        _exit(5);
      }
    }
  }
  _exit(0);
}

// Distinct seeds with `tag` found anywhere in this process's readable private memory.
int CountSeedsInMemory(const char* tag) {
  std::set<int> found;
  std::ifstream maps("/proc/self/maps");
  const int mem = open("/proc/self/mem", O_RDONLY);
  REQUIRE(mem >= 0);
  const std::string suffix = Seed(tag, 0).substr(12);
  std::string line;
  while (std::getline(maps, line)) {
    std::istringstream fields(line);
    std::string range, perms, offset, device, inode, name;
    fields >> range >> perms >> offset >> device >> inode >> name;
    if (perms.size() < 4 || perms[0] != 'r' || perms[1] != 'w' || name == "[vvar]" || name == "[vsyscall]") {
      continue;
    }
    const size_t dash = range.find('-');
    const uint64_t start = std::stoull(range.substr(0, dash), nullptr, 16);
    const uint64_t end = std::stoull(range.substr(dash + 1), nullptr, 16);
    std::string bytes(end - start, '\0');
    const ssize_t got = pread(mem, bytes.data(), bytes.size(), static_cast<off_t>(start));
    if (got <= 0) {
      continue;
    }
    bytes.resize(static_cast<size_t>(got));
    for (size_t at = bytes.find(tag); at != std::string::npos; at = bytes.find(tag, at + 1)) {
      if (at + 32 <= bytes.size() && bytes.compare(at + 12, 20, suffix) == 0) {
        found.insert(std::stoi(bytes.substr(at + 8, 4)));
      }
    }
  }
  close(mem);
  return static_cast<int>(found.size());
}

}  // namespace

TEST_CASE("Seeds: after Encrypt and Decrypt calls end, the server's memory holds none of their plaintexts",
          "[server][secrets]") {
#if defined(__SANITIZE_ADDRESS__)
  // AddressSanitizer maps terabytes of shadow memory and keeps freed blocks in quarantine: a scan of this
  // process would measure the sanitizer, not the plugin. The Release run measures it.
  WARN("skipped under AddressSanitizer");
  return;
#elif defined(__SANITIZE_THREAD__)
  // ThreadSanitizer too maps terabytes of readable shadow memory, which the scan would try to copy whole.
  WARN("skipped under ThreadSanitizer");
  return;
#endif
  int to_child[2];
  REQUIRE(pipe(to_child) == 0);
  const pid_t child = fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    close(to_child[1]);
    RunClient(to_child[0]);
  }
  close(to_child[0]);
  TempDir dir;
  std::vector<server::ServedEnvironment> envs;
  envs.push_back(server::ServedEnvironment{dir.File("inline.sock"), std::nullopt,
                                           MakeService(OpenLocal(MakeKeyring(dir, "inline"), "inline"), "inline")});
  auto pooled = std::make_shared<GatedKeySource>(OpenLocal(MakeKeyring(dir, "pooled"), "pooled"));
  envs.push_back(server::ServedEnvironment{dir.File("pooled.sock"), std::nullopt, MakeService(pooled, "pooled")});
  server::ServerRunner runner({}, std::move(envs));
  REQUIRE(runner.Start().ok());
  const std::string sockets = dir.File("inline.sock") + "\n" + dir.File("pooled.sock") + "\n";
  REQUIRE(write(to_child[1], sockets.data(), sockets.size()) == static_cast<ssize_t>(sockets.size()));
  close(to_child[1]);
  int status = 0;
  REQUIRE(waitpid(child, &status, 0) == child);
  REQUIRE(WIFEXITED(status));
  REQUIRE(WEXITSTATUS(status) == 0);
  // Calls have ended on the client's side; give the server's last OnDone a moment (a condition, not a sleep:
  // the count can only fall).
  std::vector<int> left(4, kSeeds);
  const char* tags[] = {"ENCSEED-", "DECSEED-", "ENCPOOL-", "DECPOOL-"};
  const absl::Time end = absl::Now() + absl::Seconds(5);
  do {
    for (int i = 0; i < 4; ++i) {
      left[i] = CountSeedsInMemory(tags[i]);
    }
    if (left == std::vector<int>(4, 0)) {
      break;
    }
    absl::SleepFor(absl::Milliseconds(200));
  } while (absl::Now() < end);
  INFO("of " << kSeeds << " each left in memory: Encrypt seeds " << left[0] << " (inline) " << left[2]
             << " (pool); Decrypt plaintexts " << left[1] << " (inline) " << left[3] << " (pool)");
  CHECK(left == std::vector<int>(4, 0));
  runner.Shutdown();
}

}  // namespace kmsplugin::testing
