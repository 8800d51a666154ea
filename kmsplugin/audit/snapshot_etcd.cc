#include "kmsplugin/audit/snapshot_etcd.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <optional>
#include <sstream>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "kmsplugin/audit/etcd_client.h"

namespace kmsplugin::audit {

struct SnapshotEtcd::State {
  std::mutex mu;
  pid_t pid = -1;  // etcdctl restoring, then etcd; leader of its own process group
  std::string dir;
  std::string endpoint;
  bool cleaned = false;
};

namespace {

constexpr int kStartAttempts = 5;
constexpr absl::Duration kRestoreTimeout = absl::Seconds(120);
constexpr absl::Duration kStopTimeout = absl::Seconds(10);

// A loopback TCP port that was free a moment ago. etcd cannot listen on port 0 and tell us the port, so the
// caller retries the start when another process took it in between.
absl::StatusOr<int> FreeLoopbackPort() {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    return absl::InternalError(absl::StrCat("socket: ", std::strerror(errno)));
  }
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    const int err = errno;
    close(fd);
    return absl::UnavailableError(absl::StrCat("no free loopback port: ", std::strerror(err)));
  }
  close(fd);
  return ntohs(addr.sin_port);
}

// fork + exec with stdout/stderr to `log`, in a new process group, killed when we die. Not posix_spawn: it cannot
// set PR_SET_PDEATHSIG. Between fork and exec only async-signal-safe calls.
absl::StatusOr<pid_t> Spawn(const std::vector<std::string>& argv, const std::string& log) {
  std::vector<char*> args;
  for (const std::string& arg : argv) {
    args.push_back(const_cast<char*>(arg.c_str()));
  }
  args.push_back(nullptr);
  const int log_fd = open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (log_fd < 0) {
    return absl::InternalError(absl::StrCat("cannot create ", log, ": ", std::strerror(errno)));
  }
  const pid_t parent = getpid();
  const pid_t pid = fork();
  if (pid < 0) {
    const int err = errno;
    close(log_fd);
    return absl::InternalError(absl::StrCat("fork: ", std::strerror(err)));
  }
  if (pid == 0) {
    setpgid(0, 0);
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) {
      _exit(127);
    }
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, nullptr);
    const int null_fd = open("/dev/null", O_RDONLY);
    if (null_fd >= 0) {
      dup2(null_fd, 0);
    }
    dup2(log_fd, 1);
    dup2(log_fd, 2);
    close_range(3, ~0U, 0);
    execv(args[0], args.data());
    _exit(127);
  }
  close(log_fd);
  return pid;
}

// Waits for `pid` up to `timeout`; the exit status, or nullopt if it is still running.
std::optional<int> WaitFor(pid_t pid, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (true) {
    int status = 0;
    const pid_t done = waitpid(pid, &status, WNOHANG);
    if (done == pid || (done < 0 && errno == ECHILD)) {
      return status;
    }
    if (absl::Now() >= deadline) {
      return std::nullopt;
    }
    absl::SleepFor(absl::Milliseconds(20));
  }
}

std::string Tail(const std::string& path, size_t max_bytes = 600) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  std::string out = text.str();
  while (!out.empty() && (out.back() == '\n' || out.back() == ' ')) {
    out.pop_back();
  }
  return out.size() > max_bytes ? "..." + out.substr(out.size() - max_bytes) : out;
}

void Cleanup(SnapshotEtcd::State& state) {
  std::lock_guard<std::mutex> lock(state.mu);
  if (state.cleaned) {
    return;
  }
  if (state.pid > 0) {
    kill(-state.pid, SIGTERM);
    if (!WaitFor(state.pid, kStopTimeout).has_value()) {
      kill(-state.pid, SIGKILL);
      WaitFor(state.pid, kStopTimeout);
    }
    state.pid = -1;
  }
  if (!state.dir.empty()) {
    std::error_code ignored;
    std::filesystem::remove_all(state.dir, ignored);
  }
  state.cleaned = true;
}

// Spawn, with the child recorded in `state` at once (under the lock Cleanup takes), so a signal at any moment
// finds it. CANCELLED when a signal has already cleaned up.
absl::StatusOr<pid_t> SpawnTracked(SnapshotEtcd::State& state, const std::vector<std::string>& argv,
                                   const std::string& log) {
  std::lock_guard<std::mutex> lock(state.mu);
  if (state.cleaned) {
    return absl::CancelledError("interrupted");
  }
  auto pid = Spawn(argv, log);
  if (pid.ok()) {
    state.pid = *pid;
  }
  return pid;
}

// SIGINT, SIGTERM and SIGHUP while a snapshot etcd runs: the handler only writes the signal number to a pipe; a
// watcher thread stops etcd, removes the directory, and re-raises the signal with its default action. One at a
// time per process (the audit starts one).
class SignalCleanup {
 public:
  static constexpr int kSignals[] = {SIGINT, SIGTERM, SIGHUP};

  explicit SignalCleanup(std::shared_ptr<SnapshotEtcd::State> state) : state_(std::move(state)) {
    if (pipe2(pipe_, O_CLOEXEC) != 0) {
      pipe_[0] = pipe_[1] = -1;
      return;
    }
    write_fd_ = pipe_[1];
    thread_ = std::thread([this] { Watch(); });
    struct sigaction action {};
    action.sa_handler = &SignalCleanup::Handler;
    sigemptyset(&action.sa_mask);
    action.sa_flags = SA_RESTART;
    for (size_t i = 0; i < std::size(kSignals); ++i) {
      sigaction(kSignals[i], &action, &previous_[i]);
    }
  }

  ~SignalCleanup() {
    if (pipe_[1] < 0) {
      return;
    }
    for (size_t i = 0; i < std::size(kSignals); ++i) {
      sigaction(kSignals[i], &previous_[i], nullptr);
    }
    const char stop = 0;
    (void)!write(pipe_[1], &stop, 1);
    thread_.join();
    write_fd_ = -1;
    close(pipe_[0]);
    close(pipe_[1]);
  }

 private:
  static void Handler(int signal) {
    const int saved = errno;
    const char byte = static_cast<char>(signal);
    if (write_fd_ >= 0) {
      (void)!write(write_fd_, &byte, 1);
    }
    errno = saved;
  }

  void Watch() {
    char byte = 0;
    while (true) {
      const ssize_t n = read(pipe_[0], &byte, 1);
      if (n < 0 && errno == EINTR) {
        continue;
      }
      if (n != 1 || byte == 0) {
        return;
      }
      Cleanup(*state_);
      signal(byte, SIG_DFL);
      sigset_t set;
      sigemptyset(&set);
      sigaddset(&set, byte);
      pthread_sigmask(SIG_UNBLOCK, &set, nullptr);
      raise(byte);
      _exit(128 + byte);  // not reached unless the signal was blocked elsewhere
    }
  }

  static inline volatile sig_atomic_t write_fd_ = -1;
  std::shared_ptr<SnapshotEtcd::State> state_;
  int pipe_[2] = {-1, -1};
  struct sigaction previous_[std::size(kSignals)]{};
  std::thread thread_;
};

// The one SignalCleanup of the process while a SnapshotEtcd lives.
std::mutex g_signal_mu;
std::unique_ptr<SignalCleanup> g_signal_cleanup;

absl::Status WaitUntilServing(SnapshotEtcd::State& state, const std::string& log, absl::Duration timeout,
                              bool& port_taken) {
  port_taken = false;
  EtcdOptions options;
  options.endpoints = {state.endpoint};
  options.timeout = absl::Seconds(1);
  auto client = EtcdClient::New(options);
  if (!client.ok()) {
    return client.status();
  }
  const absl::Time deadline = absl::Now() + timeout;
  absl::Status last;
  while (absl::Now() < deadline) {
    int status = 0;
    if (waitpid(state.pid, &status, WNOHANG) == state.pid) {
      {
        std::lock_guard<std::mutex> lock(state.mu);
        state.pid = -1;
      }
      const std::string tail = Tail(log);
      port_taken = absl::StrContains(tail, "address already in use");
      return absl::UnavailableError(absl::StrCat("the private etcd serving the snapshot exited: ", tail));
    }
    auto page = (*client)->Range("health", "", 1, 0);
    if (page.ok()) {
      return absl::OkStatus();
    }
    last = page.status();
    absl::SleepFor(absl::Milliseconds(50));
  }
  return absl::UnavailableError(absl::StrCat("the private etcd serving the snapshot did not answer within ",
                                             absl::FormatDuration(timeout), ": ", last.message(),
                                             "; its log: ", Tail(log)));
}

}  // namespace

SnapshotEtcd::SnapshotEtcd(std::shared_ptr<State> state) : state_(std::move(state)) {}

SnapshotEtcd::~SnapshotEtcd() {
  {
    std::lock_guard<std::mutex> lock(g_signal_mu);
    g_signal_cleanup.reset();
  }
  Cleanup(*state_);
}

const std::string& SnapshotEtcd::endpoint() const { return state_->endpoint; }
const std::string& SnapshotEtcd::directory() const { return state_->dir; }

absl::StatusOr<std::unique_ptr<SnapshotEtcd>> SnapshotEtcd::Start(const SnapshotEtcdOptions& options) {
  if (options.snapshot.empty()) {
    return absl::InvalidArgumentError("--snapshot needs a file (made by etcdctl snapshot save)");
  }
  if (access(options.snapshot.c_str(), R_OK) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--snapshot ", options.snapshot, " cannot be read: ", std::strerror(errno)));
  }
  for (const std::string& tool : {options.etcd, options.etcdctl}) {
    if (access(tool.c_str(), X_OK) != 0) {
      return absl::FailedPreconditionError(
          absl::StrCat(tool,
                       " is missing; fix: apt-get install etcd-server etcd-client (--snapshot restores and "
                       "serves the snapshot with them)"));
    }
  }
  auto state = std::make_shared<State>();
  std::unique_ptr<SnapshotEtcd> etcd(new SnapshotEtcd(state));  // from here every return cleans up
  {
    std::lock_guard<std::mutex> lock(g_signal_mu);
    if (g_signal_cleanup == nullptr) {
      g_signal_cleanup = std::make_unique<SignalCleanup>(state);
    }
  }
  const char* tmp = std::getenv("TMPDIR");
  std::string templ = absl::StrCat(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp", "/kmsplugin-audit-XXXXXX");
  {
    // Made and recorded under the lock a signal's cleanup takes, so it is never left behind.
    std::lock_guard<std::mutex> lock(state->mu);
    if (mkdtemp(templ.data()) == nullptr) {
      return absl::FailedPreconditionError(absl::StrCat("cannot create a private directory ", templ, ": ",
                                                        std::strerror(errno), "; fix: set TMPDIR to a writable one"));
    }
    state->dir = templ;
  }
  chmod(templ.c_str(), 0700);
  const std::string data_dir = templ + "/data";
  const std::string restore_log = templ + "/restore.log";
  const std::string etcd_log = templ + "/etcd.log";

  // The restored member records a peer URL; a single member never dials it, so later starts may listen elsewhere.
  auto restore_peer = FreeLoopbackPort();
  if (!restore_peer.ok()) {
    return restore_peer.status();
  }
  const std::string peer_url = absl::StrCat("http://127.0.0.1:", *restore_peer);
  auto restore = SpawnTracked(
      *state,
      {options.etcdctl, "snapshot", "restore", options.snapshot, "--data-dir=" + data_dir, "--name=kmsplugin-audit",
       "--initial-cluster=kmsplugin-audit=" + peer_url, "--initial-advertise-peer-urls=" + peer_url},
      restore_log);
  if (!restore.ok()) {
    return restore.status();
  }
  std::optional<int> restored = WaitFor(*restore, kRestoreTimeout);
  if (!restored.has_value()) {
    return absl::UnavailableError(
        absl::StrCat("etcdctl snapshot restore did not finish within ", absl::FormatDuration(kRestoreTimeout)));
  }
  {
    std::lock_guard<std::mutex> lock(state->mu);
    state->pid = -1;  // reaped
  }
  if (!WIFEXITED(*restored) || WEXITSTATUS(*restored) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("etcdctl snapshot restore of ", options.snapshot,
                     " failed (is it a snapshot from etcdctl snapshot save?): ", Tail(restore_log)));
  }

  absl::Status last;
  for (int attempt = 0; attempt < kStartAttempts; ++attempt) {
    auto client_port = FreeLoopbackPort();
    auto peer_port = FreeLoopbackPort();
    if (!client_port.ok() || !peer_port.ok()) {
      return client_port.ok() ? peer_port.status() : client_port.status();
    }
    if (*client_port == *peer_port) {
      continue;
    }
    const std::string client_url = absl::StrCat("http://127.0.0.1:", *client_port);
    auto pid = SpawnTracked(
        *state,
        {options.etcd, "--name=kmsplugin-audit", "--data-dir=" + data_dir, "--listen-client-urls=" + client_url,
         "--advertise-client-urls=" + client_url, absl::StrCat("--listen-peer-urls=http://127.0.0.1:", *peer_port),
         "--logger=zap", "--log-level=error"},
        etcd_log);
    if (!pid.ok()) {
      return pid.status();
    }
    {
      std::lock_guard<std::mutex> lock(state->mu);
      state->endpoint = absl::StrCat("127.0.0.1:", *client_port);
    }
    bool port_taken = false;
    last = WaitUntilServing(*state, etcd_log, options.start_timeout, port_taken);
    if (last.ok()) {
      return etcd;
    }
    if (!port_taken) {
      return last;
    }
  }
  return last;
}

}  // namespace kmsplugin::audit
