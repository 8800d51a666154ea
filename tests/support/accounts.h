#pragma once

// Throw-away system users for tests that need a real unprivileged process (root is not bound by file modes or
// RLIMIT_MEMLOCK). Every user created is deleted when the Accounts object dies, also when the test fails.
// Creating users needs root; callers skip (exit 77) otherwise. (tests/integration/nonroot_test.cc has the same
// helper with groups; it can move here.)

#include <pwd.h>

#include <iostream>
#include <string>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>

#include "absl/time/clock.h"
#include "tests/support/subprocess.h"

namespace kmsplugin::testing {

class Accounts {
 public:
  explicit Accounts(std::string dir) : dir_(std::move(dir)) {}
  ~Accounts() {
    for (auto it = users_.rbegin(); it != users_.rend(); ++it) {
      const RunResult removed = Admin({"/usr/sbin/userdel", *it});
      if (removed.exit_code != 0) {
        std::cerr << "accounts: could not remove " << *it << ": " << removed.err << "\n";
      }
    }
  }
  Accounts(const Accounts&) = delete;
  Accounts& operator=(const Accounts&) = delete;

  // A system user with its own group, no home, no shell.
  void User(const std::string& name) {
    const RunResult result = Admin({"/usr/sbin/useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                                    "--shell", "/usr/sbin/nologin", "--user-group", name});
    INFO(result.err);
    REQUIRE(result.exit_code == 0);
    users_.push_back(name);
  }
  static uid_t Uid(const std::string& user) {
    const passwd* entry = getpwnam(user.c_str());
    REQUIRE(entry != nullptr);
    return entry->pw_uid;
  }
  static gid_t Gid(const std::string& user) {
    const passwd* entry = getpwnam(user.c_str());
    REQUIRE(entry != nullptr);
    return entry->pw_gid;
  }

 private:
  // Retries a few times while another process holds the /etc/passwd lock.
  RunResult Admin(const std::vector<std::string>& argv) const {
    RunResult result;
    for (int attempt = 0; attempt < 10; ++attempt) {
      result = Run(argv, dir_);
      if (result.exit_code == 0 || result.err.find("lock") == std::string::npos) {
        break;
      }
      absl::SleepFor(absl::Milliseconds(200));
    }
    return result;
  }

  const std::string dir_;
  std::vector<std::string> users_;
};

}  // namespace kmsplugin::testing
