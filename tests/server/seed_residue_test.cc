// Seeds left in the server's memory: this test binary forks a client process before anything starts gRPC, serves
// a real kmsplugin socket in the parent, lets the child send Encrypts with recognisable seeds (and Decrypt
// others back), then scans the parent's own readable memory (/proc/self/maps + /proc/self/mem) for them.
// Everything found is a copy the server left behind after the calls had finished: the client's copies live in
// the other process. Its own binary, so no other test has started gRPC before the fork.

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

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

// Client process: reads the socket path from `in`, encrypts kSeeds "ENCSEED-" seeds, encrypts and decrypts
// kSeeds "DECSEED-" seeds, exits 0 when every call succeeded.
[[noreturn]] void RunClient(int in) {
  char path[256] = {};
  const ssize_t n = read(in, path, sizeof(path) - 1);
  if (n <= 0) {
    _exit(3);
  }
  KmsClient client(std::string(path, static_cast<size_t>(n)));
  for (int i = 0; i < kSeeds; ++i) {
    v2::EncryptResponse encrypted;
    if (!client.Encrypt(Seed("ENCSEED-", i), encrypted).ok()) {
      _exit(4);
    }
    v2::EncryptResponse again;
    v2::DecryptResponse decrypted;
    if (!client.Encrypt(Seed("DECSEED-", i), again).ok() || !client.DecryptResponseOf(again, decrypted).ok() ||
        decrypted.plaintext() != Seed("DECSEED-", i)) {
      _exit(5);
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
  int to_child[2];
  REQUIRE(pipe(to_child) == 0);
  const pid_t child = fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    close(to_child[1]);
    RunClient(to_child[0]);
  }
  close(to_child[0]);
  ServerFixture f;
  REQUIRE(write(to_child[1], f.socket.data(), f.socket.size()) == static_cast<ssize_t>(f.socket.size()));
  close(to_child[1]);
  int status = 0;
  REQUIRE(waitpid(child, &status, 0) == child);
  REQUIRE(WIFEXITED(status));
  REQUIRE(WEXITSTATUS(status) == 0);
  // Calls have ended on the client's side; give the server's last OnDone a moment (a condition, not a sleep:
  // the count can only fall).
  int encrypt_left = kSeeds;
  int decrypt_left = kSeeds;
  const absl::Time end = absl::Now() + absl::Seconds(5);
  do {
    encrypt_left = CountSeedsInMemory("ENCSEED-");
    decrypt_left = CountSeedsInMemory("DECSEED-");
    if (encrypt_left == 0 && decrypt_left == 0) {
      break;
    }
    absl::SleepFor(absl::Milliseconds(200));
  } while (absl::Now() < end);
  INFO("Encrypt seeds left in memory: " << encrypt_left << " of " << kSeeds << "; Decrypt plaintexts left: "
                                        << decrypt_left << " of " << kSeeds);
  CHECK(encrypt_left == 0);
  CHECK(decrypt_left == 0);
}

}  // namespace kmsplugin::testing
