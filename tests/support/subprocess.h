#pragma once

// Subprocess: runs a real binary (kmsplugin) with its output captured to files, so integration tests drive the
// program exactly as an operator does. Wait() is bounded; a child still running at destruction is killed.

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "tests/support/temp_dir.h"

namespace kmsplugin::testing {

class Subprocess {
 public:
  Subprocess(const std::vector<std::string>& argv, const std::string& output_dir) {
    static int counter = 0;
    const std::string base = output_dir + "/proc" + std::to_string(counter++);
    stdout_path_ = base + ".out";
    stderr_path_ = base + ".err";
    pid_ = fork();
    if (pid_ == 0) {
      const int out = open(stdout_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
      const int err = open(stderr_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
      dup2(out, 1);
      dup2(err, 2);
      const int null = open("/dev/null", O_RDONLY);
      dup2(null, 0);
      sigset_t none;
      sigemptyset(&none);
      sigprocmask(SIG_SETMASK, &none, nullptr);
      std::vector<char*> args;
      for (const std::string& arg : argv) {
        args.push_back(const_cast<char*>(arg.c_str()));
      }
      args.push_back(nullptr);
      execv(args[0], args.data());
      _exit(127);
    }
  }
  ~Subprocess() {
    if (!exit_code_.has_value() && pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }
  Subprocess(const Subprocess&) = delete;
  Subprocess& operator=(const Subprocess&) = delete;

  pid_t pid() const { return pid_; }
  void Signal(int signal) const { kill(pid_, signal); }

  // The exit code (128+signal when killed by one), or nullopt if still running after `timeout`.
  std::optional<int> Wait(std::chrono::milliseconds timeout = std::chrono::seconds(30)) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (!exit_code_.has_value()) {
      int status = 0;
      const pid_t done = waitpid(pid_, &status, WNOHANG);
      if (done == pid_) {
        exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        break;
      }
      if (std::chrono::steady_clock::now() > deadline) {
        return std::nullopt;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return exit_code_;
  }
  bool Running() {
    return !Wait(std::chrono::milliseconds(0)).has_value();
  }

  std::string Stdout() const { return ReadWholeFile(stdout_path_); }
  std::string Stderr() const { return ReadWholeFile(stderr_path_); }

 private:
  pid_t pid_ = -1;
  std::optional<int> exit_code_;
  std::string stdout_path_;
  std::string stderr_path_;
};

// Runs to completion (bounded) and returns {exit code, stdout, stderr}.
struct RunResult {
  int exit_code = -1;
  std::string out;
  std::string err;
};
inline RunResult Run(const std::vector<std::string>& argv, const std::string& output_dir,
                     std::chrono::milliseconds timeout = std::chrono::seconds(60)) {
  Subprocess process(argv, output_dir);
  RunResult result;
  result.exit_code = process.Wait(timeout).value_or(-1);
  result.out = process.Stdout();
  result.err = process.Stderr();
  return result;
}

}  // namespace kmsplugin::testing
