// `kmsplugin serve` as a non-root user whose supplementary group is the configured socketGroup (issue 6, item 4),
// with clients that are other non-root users, in and out of that group. Users and groups are created for the
// test (unique names) and removed at the end, also when the test fails. Creating users needs root: run as
// anyone else, the test exits 77, which CTest reports as skipped (never as passed).

#include <grp.h>
#include <pwd.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>

#include <catch2/catch.hpp>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "tests/support/kms_client.h"
#include "tests/support/subprocess.h"
#include "tests/support/temp_dir.h"

namespace kmsplugin::testing {
namespace {

constexpr int kSkip = 77;
constexpr char kSetpriv[] = "/usr/bin/setpriv";

bool Has(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// Runs an administration command, retrying a few times while another process holds the /etc/passwd lock.
RunResult Admin(const std::vector<std::string>& argv, const std::string& dir) {
  RunResult result;
  for (int attempt = 0; attempt < 10; ++attempt) {
    result = Run(argv, dir);
    if (result.exit_code == 0 || !Has(result.err, "lock")) {
      break;
    }
    absl::SleepFor(absl::Milliseconds(200));
  }
  return result;
}

// Throw-away system users and groups; every one created is deleted when this object dies.
class Accounts {
 public:
  explicit Accounts(std::string dir) : dir_(std::move(dir)) {}
  ~Accounts() {
    for (auto it = created_.rbegin(); it != created_.rend(); ++it) {
      const RunResult removed = Admin({it->first ? "/usr/sbin/userdel" : "/usr/sbin/groupdel", it->second}, dir_);
      if (removed.exit_code != 0) {
        std::cerr << "nonroot_test: could not remove " << it->second << ": " << removed.err << "\n";
      }
    }
  }
  void Group(const std::string& name) {
    const RunResult result = Admin({"/usr/sbin/groupadd", "--system", name}, dir_);
    INFO(result.err);
    REQUIRE(result.exit_code == 0);
    created_.emplace_back(false, name);
  }
  // A system user with its own group, no home, no shell; `groups` are supplementary groups ("" for none).
  void User(const std::string& name, const std::string& groups) {
    std::vector<std::string> argv = {"/usr/sbin/useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                                     "--shell", "/usr/sbin/nologin", "--user-group"};
    if (!groups.empty()) {
      argv.insert(argv.end(), {"--groups", groups});
    }
    argv.push_back(name);
    const RunResult result = Admin(argv, dir_);
    INFO(result.err);
    REQUIRE(result.exit_code == 0);
    created_.emplace_back(true, name);
  }

 private:
  const std::string dir_;
  std::vector<std::pair<bool, std::string>> created_;  // (is a user, name), in creation order
};

uid_t Uid(const std::string& user) {
  const passwd* entry = getpwnam(user.c_str());
  REQUIRE(entry != nullptr);
  return entry->pw_uid;
}
gid_t Gid(const std::string& group) {
  const struct group* entry = getgrnam(group.c_str());
  REQUIRE(entry != nullptr);
  return entry->gr_gid;
}

struct stat Stat(const std::string& path) {
  struct stat info {};
  REQUIRE(lstat(path.c_str(), &info) == 0);
  return info;
}

// argv that runs `command` as `user` (its own group), with exactly the supplementary `groups` (may be empty).
std::vector<std::string> As(const std::string& user, const std::string& groups, std::vector<std::string> command) {
  std::vector<std::string> argv = {kSetpriv, "--reuid=" + user, "--regid=" + user};
  argv.push_back(groups.empty() ? std::string("--clear-groups") : "--groups=" + groups);
  argv.push_back("--");
  argv.insert(argv.end(), command.begin(), command.end());
  return argv;
}

// The "Uid:" or "Groups:" line of /proc/PID/status, without the key.
std::string ProcStatus(pid_t pid, const std::string& key) {
  std::ifstream in(absl::StrCat("/proc/", pid, "/status"));
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(key + ":", 0) == 0) {
      return line.substr(key.size() + 1);
    }
  }
  return "";
}

TEST_CASE("Non-root: serve as a user in the socket group, group members connect, others are refused",
          "[integration][nonroot]") {
  if (geteuid() != 0) {
    std::cout << "SKIPPED: creating throw-away users and groups needs root (CI runs this as root)\n";
    std::exit(kSkip);
  }
  for (const char* tool : {"/usr/sbin/useradd", "/usr/sbin/groupadd", "/usr/sbin/userdel", "/usr/sbin/groupdel",
                           kSetpriv}) {
    INFO(tool << " is missing: run deploy/install-deps.sh test (packages passwd, util-linux)");
    REQUIRE(access(tool, X_OK) == 0);
  }
  TempDir dir;
  // Unique names: several test runs may share the machine.
  const std::string tag = absl::StrCat("kpt", getpid());
  const std::string sock_group = tag + "g", daemon = tag + "d", client = tag + "c", outsider = tag + "x";
  Accounts accounts(dir.path());
  accounts.Group(sock_group);
  accounts.User(daemon, sock_group);
  accounts.User(client, sock_group);
  accounts.User(outsider, "");
  const uid_t daemon_uid = Uid(daemon);
  const gid_t sock_gid = Gid(sock_group);

  // Layout: DIR (root, 0711) / bin/kmsplugin (root, 0755) and home/ (the daemon user's, 0711) holding the
  // config, state/ (keyring, root key) and run/ (the socket directory, which the daemon creates).
  REQUIRE(chmod(dir.path().c_str(), 0711) == 0);
  std::filesystem::create_directories(dir.File("bin"));
  chmod(dir.File("bin").c_str(), 0755);
  const std::string binary = dir.File("bin/kmsplugin");
  std::filesystem::copy_file(std::string(KMS_BINARY_DIR) + "/kmsplugin/cli/kmsplugin", binary);
  REQUIRE(chmod(binary.c_str(), 0755) == 0);
  const std::string home = dir.File("home");
  std::filesystem::create_directories(home);
  REQUIRE(chown(home.c_str(), daemon_uid, Gid(daemon)) == 0);
  REQUIRE(chmod(home.c_str(), 0711) == 0);
  const std::string socket = home + "/run/dev.sock";
  const std::string keyring = home + "/state/dev.keyring";
  const std::string root_key = home + "/state/dev.rootkey";
  const std::string config = dir.Write("home/config.yaml",
                                       "http:\n  enabled: false\n"
                                       "environments:\n"
                                       "  - name: dev\n"
                                       "    socket: " + socket + "\n"
                                       "    socketGroup: " + sock_group + "\n"
                                       "    keySource:\n"
                                       "      local:\n"
                                       "        keyring: " + keyring + "\n"
                                       "        rootKeyFile: " + root_key + "\n");
  REQUIRE(chown(config.c_str(), daemon_uid, Gid(daemon)) == 0);

  const RunResult init = Run(As(daemon, sock_group, {binary, "init", "--config", config}), dir.path());
  INFO(init.err);
  REQUIRE(init.exit_code == 0);
  {
    auto server = std::make_unique<Subprocess>(As(daemon, sock_group, {binary, "serve", "--config", config}),
                                               dir.path());
    bool serving = false;
    for (int i = 0; i < 300 && !serving && server->Running(); ++i) {
      KmsClient root_client(socket);  // root passes any file mode: this only waits for the daemon
      v2::StatusResponse status;
      serving = root_client.Status(status, std::chrono::milliseconds(100)).ok();
      if (!serving) {
        absl::SleepFor(absl::Milliseconds(20));
      }
    }
    INFO(server->Stderr());
    REQUIRE(serving);

    // The daemon runs as that user, with the socket group as its supplementary group.
    const std::string uids = ProcStatus(server->pid(), "Uid");
    CHECK(uids == absl::StrCat("\t", daemon_uid, "\t", daemon_uid, "\t", daemon_uid, "\t", daemon_uid));
    CHECK(Has(ProcStatus(server->pid(), "Groups"), absl::StrCat(sock_gid)));

    // Its files: the socket (user, socket group, 0660) in a 0750 directory of the socket group; the keyring and
    // the root key owned by the user, 0600.
    const struct stat sock = Stat(socket);
    CHECK(S_ISSOCK(sock.st_mode));
    CHECK(sock.st_uid == daemon_uid);
    CHECK(sock.st_gid == sock_gid);
    CHECK((sock.st_mode & 0777) == 0660);
    const struct stat run_dir = Stat(home + "/run");
    CHECK(run_dir.st_uid == daemon_uid);
    CHECK(run_dir.st_gid == sock_gid);
    CHECK((run_dir.st_mode & 0777) == 0750);
    for (const std::string& file : {keyring, root_key}) {
      INFO(file);
      const struct stat info = Stat(file);
      CHECK(info.st_uid == daemon_uid);
      CHECK((info.st_mode & 0777) == 0600);
    }

    // A client process that is another non-root user in the group: Status ok.
    const std::vector<std::string> status = {binary, "status", "--socket", socket, "--timeout", "3"};
    const RunResult member = Run(As(client, sock_group, status), dir.path());
    INFO(member.err);
    CHECK(member.exit_code == 0);
    CHECK(Has(member.out, "healthz: ok"));
    // A non-root user outside the group is refused: first by the socket directory...
    const RunResult stranger = Run(As(outsider, "", status), dir.path());
    INFO(stranger.err);
    CHECK(stranger.exit_code == 3);
    CHECK(Has(stranger.err, "Permission denied (code 14)"));  // connect() failed with EACCES: UNAVAILABLE
    // ... and by the socket's own mode when the directory lets everyone through.
    REQUIRE(chmod((home + "/run").c_str(), 0751) == 0);
    const RunResult stranger_at_socket = Run(As(outsider, "", status), dir.path());
    INFO(stranger_at_socket.err);
    CHECK(stranger_at_socket.exit_code == 3);
    CHECK(Has(stranger_at_socket.err, "Permission denied (code 14)"));
    CHECK(Run(As(client, sock_group, status), dir.path()).exit_code == 0);

    server->Signal(SIGTERM);
    CHECK(server->Wait(std::chrono::seconds(15)) == std::optional<int>(0));
    struct stat gone {};
    CHECK(lstat(socket.c_str(), &gone) != 0);
  }
}

}  // namespace
}  // namespace kmsplugin::testing
