// Locked memory is guaranteed or refused (issue 11, item 11; issue 13, item 4): `kmsplugin serve` as a non-root
// user under a low RLIMIT_MEMLOCK (prlimit) used to serve with its root key in swappable memory (VmLck: 0 kB),
// because libsodium ignores a failed mlock. Now it refuses, naming the limit and the fix; with
// server.allowUnlockedMemory it serves, warns once and exports kmsplugin_memory_locked 0; with a sufficient limit
// VmLck is above 0 and the root key's bytes are found only in locked mappings.
// Creating users needs root: run as anyone else, the test exits 77, which CTest reports as skipped.

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>

#include <catch2/catch.hpp>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "tests/support/accounts.h"
#include "tests/support/daemon.h"
#include "tests/support/kms_client.h"
#include "tests/support/subprocess.h"
#include "tests/support/temp_dir.h"

namespace kmsplugin::testing {
namespace {

constexpr int kSkip = 77;

bool Has(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// A local environment served by a throw-away user, under `prlimit --memlock=BYTES`.
struct LockedSetup {
  explicit LockedSetup(const std::string& server_settings) : accounts(dir.path()) {
#if defined(__SANITIZE_ADDRESS__)
    // AddressSanitizer intercepts mlock and munlock and makes them succeed without locking anything
    // (sanitizer_common's MlockIsUnsupported), so under it nothing here can be observed: the Release run tests it.
    std::cout << "SKIPPED: AddressSanitizer turns mlock into a no-op\n";
    std::exit(kSkip);
#elif defined(__SANITIZE_THREAD__)
    // ThreadSanitizer shares that interceptor (sanitizer_common): mlock succeeds and locks nothing.
    std::cout << "SKIPPED: ThreadSanitizer turns mlock into a no-op\n";
    std::exit(kSkip);
#endif
    if (geteuid() != 0) {
      std::cout << "SKIPPED: creating throw-away users needs root (CI runs this as root)\n";
      std::exit(kSkip);
    }
    for (const char* tool : {"/usr/sbin/useradd", "/usr/sbin/userdel", "/usr/bin/setpriv", "/usr/bin/prlimit"}) {
      INFO(tool << " is missing: run deploy/install-deps.sh test (packages passwd, util-linux)");
      REQUIRE(access(tool, X_OK) == 0);
    }
    user = absl::StrCat("kpm", getpid());
    accounts.User(user);
    REQUIRE(chmod(dir.path().c_str(), 0711) == 0);
    std::filesystem::create_directories(dir.File("bin"));
    chmod(dir.File("bin").c_str(), 0755);
    binary = dir.File("bin/kmsplugin");
    std::filesystem::copy_file(DaemonDriver::Binary(), binary);
    REQUIRE(chmod(binary.c_str(), 0755) == 0);
    const std::string home = dir.File("home");
    std::filesystem::create_directories(home);
    REQUIRE(chown(home.c_str(), Accounts::Uid(user), Accounts::Gid(user)) == 0);
    REQUIRE(chmod(home.c_str(), 0711) == 0);
    socket = home + "/run/dev.sock";
    root_key = home + "/state/dev.rootkey";
    config = dir.Write("home/config.yaml", "http:\n  listen: 127.0.0.1:0\n"
                                           "server:\n" + server_settings +
                                               "environments:\n"
                                               "  - name: dev\n"
                                               "    socket: " + socket + "\n"
                                               "    keySource:\n"
                                               "      local:\n"
                                               "        keyring: " + home + "/state/dev.keyring\n"
                                               "        rootKeyFile: " + root_key + "\n");
    REQUIRE(chown(config.c_str(), Accounts::Uid(user), Accounts::Gid(user)) == 0);
    const RunResult init = Run(As(4 << 20, {binary, "init", "--config", config}), dir.path());
    INFO(init.err);
    REQUIRE(init.exit_code == 0);
  }

  // argv running `command` as the user, with RLIMIT_MEMLOCK at `memlock` bytes (soft and hard).
  std::vector<std::string> As(size_t memlock, std::vector<std::string> command) const {
    std::vector<std::string> argv = {"/usr/bin/prlimit", absl::StrCat("--memlock=", memlock, ":", memlock),
                                     "/usr/bin/setpriv", "--reuid=" + user, "--regid=" + user, "--clear-groups",
                                     "--"};
    argv.insert(argv.end(), command.begin(), command.end());
    return argv;
  }
  std::unique_ptr<Subprocess> Serve(size_t memlock) const {
    return std::make_unique<Subprocess>(As(memlock, {binary, "serve", "--config", config}), dir.path());
  }
  // Waits for the socket to answer (root passes any file mode).
  static bool Serving(Subprocess& server, const std::string& socket) {
    return DaemonDriver::WaitServing(server, socket);
  }

  TempDir dir;
  Accounts accounts;
  std::string user, binary, socket, root_key, config;
};

// The number in a "Key:   N kB" line of /proc/PID/status.
long StatusKb(pid_t pid, const std::string& key) {
  std::istringstream in(ReadAll(absl::StrCat("/proc/", pid, "/status")));
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(key + ":", 0) == 0) {
      long kb = -1;
      std::istringstream(line.substr(key.size() + 1)) >> kb;
      return kb;
    }
  }
  return -1;
}

std::string Gauge(int port) {
  const std::string metrics = DaemonDriver::HttpGet(port, "/metrics");
  for (absl::string_view line : absl::StrSplit(metrics, '\n')) {
    if (absl::StartsWith(line, "kmsplugin_memory_locked")) {
      return std::string(line);
    }
  }
  return "";
}

TEST_CASE("Locked memory: serve under a 64 KiB RLIMIT_MEMLOCK refuses, naming the limit and the fix",
          "[integration][memlock]") {
  LockedSetup s("  pollInterval: 1s\n");
  auto server = s.Serve(64 * 1024);
  const std::optional<int> code = server->Wait(std::chrono::seconds(30));
  INFO(server->Stderr());
  REQUIRE(code.has_value());
  CHECK(*code != 0);
  CHECK(Has(server->Stderr(), "RLIMIT_MEMLOCK is 64 KiB"));
  CHECK(Has(server->Stderr(), "LimitMEMLOCK="));
  CHECK(Has(server->Stderr(), "ulimit -l"));
  CHECK(Has(server->Stderr(), "server.allowUnlockedMemory: true"));
  CHECK(access(s.socket.c_str(), F_OK) != 0);  // it never served
}

TEST_CASE("Locked memory: with allowUnlockedMemory it serves under 64 KiB, warns once and exports 0",
          "[integration][memlock]") {
  LockedSetup s("  pollInterval: 1s\n  allowUnlockedMemory: true\n");
  auto server = s.Serve(64 * 1024);
  INFO(server->Stderr());
  REQUIRE(LockedSetup::Serving(*server, s.socket));
  CHECK(DaemonDriver::Status(s.socket).healthz() == "ok");
  const int port = DaemonDriver::LoggedHttpPort(*server);
  REQUIRE(port > 0);
  CHECK(Gauge(port) == "kmsplugin_memory_locked 0");
  const std::string log = server->Stderr();
  const size_t first = log.find("serving with secrets in unlocked memory");
  CHECK(first != std::string::npos);
  CHECK(log.find("serving with secrets in unlocked memory", first + 1) == std::string::npos);
  server->Signal(SIGTERM);
  CHECK(server->Wait() == std::optional<int>(0));
}

TEST_CASE("Locked memory: with a sufficient limit VmLck is above 0 and the root key sits only in locked pages",
          "[integration][memlock]") {
  LockedSetup s("  pollInterval: 1s\n");
  auto server = s.Serve(4 << 20);
  INFO(server->Stderr());
  REQUIRE(LockedSetup::Serving(*server, s.socket));
  CHECK(DaemonDriver::Status(s.socket).healthz() == "ok");
  const int port = DaemonDriver::LoggedHttpPort(*server);
  REQUIRE(port > 0);
  CHECK(Gauge(port) == "kmsplugin_memory_locked 1");
  CHECK(StatusKb(server->pid(), "VmLck") > 0);

  // Every copy of the root key in the daemon's memory lies in a mapping whose pages are locked.
  const std::string key = ReadAll(s.root_key);
  REQUIRE(key.size() == 32);
  const std::string smaps = ReadAll(absl::StrCat("/proc/", server->pid(), "/smaps"));
  const int mem = open(absl::StrCat("/proc/", server->pid(), "/mem").c_str(), O_RDONLY);
  if (mem < 0) {
    WARN("cannot read /proc/PID/mem (no CAP_SYS_PTRACE here): the root key's mapping is not checked");
  } else {
    int found = 0, unlocked = 0;
    std::istringstream in(smaps);
    std::string line;
    uint64_t start = 0, end = 0;
    bool readable = false;
    while (std::getline(in, line)) {
      const size_t dash = line.find('-');
      const size_t space = line.find(' ');
      if (dash != std::string::npos && space != std::string::npos && dash < space &&
          absl::SimpleHexAtoi(line.substr(0, dash), &start) &&
          absl::SimpleHexAtoi(line.substr(dash + 1, space - dash - 1), &end)) {
        readable = line.size() > space + 1 && line[space + 1] == 'r';
        continue;
      }
      if (line.rfind("Locked:", 0) != 0 || !readable || end - start > (uint64_t{1} << 30)) {
        continue;
      }
      long locked_kb = 0;
      std::istringstream(line.substr(7)) >> locked_kb;
      // In chunks that overlap by less than a key, so no copy is missed or counted twice (an ASan build maps
      // large regions).
      constexpr uint64_t kChunk = 1 << 20;
      std::string bytes;
      for (uint64_t at = start; at < end; at += kChunk) {
        bytes.assign(std::min(kChunk + key.size() - 1, end - at), '\0');
        const ssize_t got = pread(mem, bytes.data(), bytes.size(), static_cast<off_t>(at));
        if (got <= 0) {
          break;
        }
        bytes.resize(static_cast<size_t>(got));
        for (size_t hit = bytes.find(key); hit != std::string::npos && hit < kChunk; hit = bytes.find(key, hit + 1)) {
          ++found;
          if (locked_kb == 0) {
            ++unlocked;
            UNSCOPED_INFO("root key copy in an unlocked mapping at 0x" << std::hex << at + hit);
          }
        }
      }
    }
    close(mem);
    CHECK(found >= 1);
    CHECK(unlocked == 0);
  }
  server->Signal(SIGTERM);
  CHECK(server->Wait() == std::optional<int>(0));
}

}  // namespace
}  // namespace kmsplugin::testing
