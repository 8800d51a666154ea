// Soak under faults (issue 12, item 4): the release `kmsplugin serve` binary with three environments in one
// daemon (dev: local keyring; prod: Vault Transit through the Vault-API test server over HTTPS; test: PKCS#11 on a
// SoftHSM2 token) under a mixed v2/v1beta1 Encrypt/Decrypt/Status load, while a seeded schedule injects faults:
// - Vault: sealed then unsealed; rate limited (429, with and without Retry-After); killed and restarted (it comes
//   back sealed, with its storage, and is unsealed); answering 5xx; hanging past the call deadline;
// - PKCS#11: the token directory removed and restored (moved back, or copied back from a copy);
// - operations: SIGHUP with config changes (an extra environment added and removed, the Vault source's
//   pollInterval changed, a server: change that must be rejected, no change), `kmsplugin rotate` of each
//   environment, `kmsplugin retire --force --allow-recent` and `--reinstate` of version 1, which no recorded
//   ciphertext uses (the daemon is rotated to version 2 before the load starts).
// After the faults stop and every backend recovers, every ciphertext issued must decrypt to its plaintext; no
// call may have outlived its deadline (client side and plugin side); Status must never have failed nor been slow;
// the daemon must not have crashed; and its threads, file descriptors and RSS must come back to their baseline.
// Calls that fail with UNAVAILABLE or DEADLINE_EXCEEDED while a fault is in force on their backend are expected
// and counted by fault.
//
// KMSPLUGIN_SOAK_SECONDS sets how long faults are injected (default 180), KMSPLUGIN_SOAK_SEED the schedule's
// seed (default: random; printed either way, so a failing run can be replayed with the same schedule);
// KMSPLUGIN_SOAK_LOG=FILE keeps the daemon's log.

#include <signal.h>
#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <catch2/catch.hpp>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "tests/keysource/vault/vault_test_server.h"
#include "tests/soak/soak_load.h"
#include "tests/support/daemon.h"
#include "tests/support/kms_client.h"
#include "tests/support/process_stats.h"
#include "tests/support/softhsm_harness.h"
#include "tests/support/subprocess.h"

namespace kmsplugin::testing::soak {
namespace {

constexpr char kToken[] = "hvs.SOAK-TOKEN-SECRET-7f3c1e";
constexpr char kPin[] = "1234";

// The environments under load, by index: one per key source.
const std::vector<std::string> kEnvs = {"dev", "prod", "test"};
const std::vector<std::string> kSources = {"local", "vault", "pkcs11"};

// Stated bounds (bench/RESULTS.md "Soak under faults" gives the reasons).
constexpr milliseconds kCryptDeadline{2250};  // puts deadline + slack on the 2.5 s histogram boundary
constexpr milliseconds kDeadlineSlack{250};
constexpr milliseconds kStatusDeadline{1000};
// "Status is cheap": the plugin's own time for a Status (its log) above this fails the soak. Client-side times
// above kStatusReport are listed with what was in force, not failed: on a shared 2-core machine the client and
// the daemon's gRPC threads can wait that long for a CPU (the stall detector measures the test process's own).
constexpr double kStatusPluginBoundMs = 50;
constexpr milliseconds kStatusReport{500};
constexpr milliseconds kRecoveryGrace{5000};  // after a fault ends, its failures may trail this long
constexpr absl::Duration kRecoveryBound = absl::Seconds(30);
constexpr absl::Duration kIdle = absl::Seconds(7);  // past the worker pool's 5 s idle trim
constexpr long kThreadSlack = 4;                    // 68 -> 69..70 seen after a 180 s run (gRPC's own threads)
constexpr long kFdSlack = 8;  // Vault keep-alive connections: 43..46 seen at the baseline and after
constexpr double kRssFactor = 1.25;
constexpr long kRssSlackKb = 4096;

long EnvLong(const char* name, long fallback) {
  const char* value = std::getenv(name);
  return value != nullptr && *value != '\0' ? std::strtol(value, nullptr, 10) : fallback;
}

uint64_t Seed() {
  const char* value = std::getenv("KMSPLUGIN_SOAK_SEED");
  if (value != nullptr && *value != '\0') {
    return std::strtoull(value, nullptr, 10);
  }
  std::random_device device;
  return (static_cast<uint64_t>(device()) << 32) ^ device();
}

absl::Duration Between(std::mt19937_64& rng, int lo_ms, int hi_ms) {
  return absl::Milliseconds(std::uniform_int_distribution<int>(lo_ms, hi_ms)(rng));
}

// Sleeps `d`, or less when `stop` is set meanwhile; false when stopped.
bool Nap(absl::Duration d, const std::atomic<bool>& stop) {
  const absl::Time until = absl::Now() + d;
  while (absl::Now() < until) {
    if (stop.load()) {
      return false;
    }
    absl::SleepFor(std::min(absl::Milliseconds(50), until - absl::Now()));
  }
  return !stop.load();
}

template <typename F>
bool Eventually(F done, absl::Duration bound) {
  const absl::Time until = absl::Now() + bound;
  while (!done()) {
    if (absl::Now() > until) {
      return false;
    }
    absl::SleepFor(absl::Milliseconds(50));
  }
  return true;
}

// What the config file says; the soak moves between these shapes with SIGHUP.
struct Shape {
  bool extra = false;              // a fourth environment (local keyring) added and removed by reloads
  std::string vault_poll = "1s";   // keySource.vault.pollInterval: a key-source change, swapped in by a reload
  std::string server_poll = "1s";  // server.pollInterval: takes effect only at restart, so a reload is rejected
  bool operator==(const Shape& other) const {
    return extra == other.extra && vault_poll == other.vault_poll && server_poll == other.server_poll;
  }
};

struct World : DaemonDriver {
  World() : vault(VaultTestServer::Options::Persistent()) {
    serial = hsm.InitToken("kms", kPin);
    pin_file = dir.Write("user.pin", std::string(kPin) + "\n");
    vault.Control({{"add_token", {{"id", kToken}, {"ttl", 0}, {"renewable", true}, {"max_ttl", 0}}}});
    token_file = dir.Write("vault-token", std::string(kToken) + "\n");
  }
  std::string Socket(const std::string& env) const { return dir.File(env + ".sock"); }
  std::string Local(const std::string& env) const {
    return "  - name: " + env + "\n    socket: " + Socket(env) +
           "\n    keySource:\n      local:\n        keyring: " + dir.File(env + ".keyring") +
           "\n        rootKeyFile: " + dir.File(env + ".rootkey") + "\n";
  }
  std::string Yaml(const Shape& shape) const {
    std::string yaml = "http:\n  listen: 127.0.0.1:0\nserver:\n  pollInterval: " + shape.server_poll +
                       "\nenvironments:\n" + Local("dev");
    yaml += "  - name: prod\n    socket: " + Socket("prod") + "\n    keySource:\n      vault:\n        addresses: [" +
            vault.Address(0) + "]\n        keyName: kms\n        tls: {caFile: " + TestPki::Get().ca +
            "}\n        pollInterval: " + shape.vault_poll + "\n        auth:\n          token: {file: " + token_file +
            "}\n";
    yaml += "  - name: test\n    socket: " + Socket("test") +
            "\n    keySource:\n      pkcs11:\n        module: " + std::string(kSoftHsmModule) +
            "\n        tokenLabel: kms\n        pinFile: " + pin_file + "\n        keyLabel: kmsplugin-test\n";
    if (shape.extra) {
      yaml += Local("extra");
    }
    return yaml;
  }
  void Write(const Shape& shape) { config = dir.Write("config.yaml", Yaml(shape)); }

  SoftHsmHarness hsm;  // before anything loads the module: it points SOFTHSM2_CONF at its own token directory
  VaultTestServer vault;
  std::string serial, pin_file, token_file;
};

// The running daemon: SIGHUP with the outcome read from /metrics.
struct Daemon {
  explicit Daemon(const World& world)
      : process(
            std::vector<std::string>{DaemonDriver::Binary(), "serve", "--config", world.config, "--log-level", "debug"},
            world.dir.path()) {}

  double Reloads(const std::string& result) const {
    return MetricSample(DaemonDriver::HttpGet(port, "/metrics"),
                        "kmsplugin_config_reloads_total{result=\"" + result + "\"}");
  }
  // SIGHUP, then waits (bounded) until the daemon counted the reload: "applied", "rejected", or "" if it did not.
  std::string Hup(absl::Duration bound = absl::Seconds(30)) {
    const double applied = std::max(0.0, Reloads("applied")), rejected = std::max(0.0, Reloads("rejected"));
    process.Signal(SIGHUP);
    std::string result;
    Eventually(
        [&] {
          if (Reloads("applied") > applied) {
            result = "applied";
          } else if (Reloads("rejected") > rejected) {
            result = "rejected";
          }
          return !result.empty();
        },
        bound);
    return result;
  }

  Subprocess process;
  int port = -1;
};

// The process exists and is not a zombie (it exited or crashed, and nobody has reaped it yet).
bool Alive(pid_t pid) {
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(stat, line)) {
    return false;
  }
  const size_t paren = line.rfind(')');
  return paren != std::string::npos && paren + 2 < line.size() && line[paren + 2] != 'Z';
}

bool Healthy(const std::string& socket) {
  KmsClient client(socket);
  v2::StatusResponse status;
  return client.Status(status, milliseconds(1000)).ok() && status.healthz() == "ok";
}

// Outcomes of the operations and of the fault injectors; `problems` fail the soak.
struct Tally {
  void Count(const std::string& kind, const std::string& outcome) {
    std::lock_guard<std::mutex> lock(mu);
    ++outcomes[kind][outcome];
  }
  void Problem(std::string what) {
    std::lock_guard<std::mutex> lock(mu);
    problems.push_back(std::move(what));
  }
  std::mutex mu;
  std::map<std::string, std::map<std::string, int>> outcomes;
  std::vector<std::string> problems;
};

// Faults on the Vault-API test server, one at a time, until `stop`.
void VaultFaults(World& world, uint64_t seed, Timeline& timeline, Tally& tally, const std::atomic<bool>& stop) {
  std::mt19937_64 rng(seed);
  const std::vector<std::string> kinds = {"sealed", "rate-limited (429)", "killed and restarted", "5xx", "hanging"};
  while (Nap(Between(rng, 2000, 5000), stop)) {
    const std::string kind = kinds[std::uniform_int_distribution<size_t>(0, kinds.size() - 1)(rng)];
    std::string detail = kind;
    const size_t window = timeline.Begin("vault", kind);
    try {
      if (kind == "sealed") {
        world.vault.Control({{"all", true}, {"sealed", true}});
        absl::SleepFor(Between(rng, 2000, 6000));
        world.vault.Control({{"all", true}, {"sealed", false}});
      } else if (kind == "rate-limited (429)") {
        nlohmann::json control = {{"all", true}, {"rate_limit_count", 1000000}};
        const bool retry_after = std::uniform_int_distribution<int>(0, 1)(rng) == 1;
        if (retry_after) {
          control["retry_after"] = 1;
          detail += ", Retry-After: 1";
        }
        world.vault.Control(control);
        absl::SleepFor(Between(rng, 2000, 6000));
        world.vault.Control({{"all", true}, {"rate_limit_count", 0}});
      } else if (kind == "killed and restarted") {
        world.vault.Kill();
        absl::SleepFor(Between(rng, 1000, 4000));
        world.vault.Restart();  // sealed, as a restarted Vault is
        absl::SleepFor(Between(rng, 1000, 3000));
        world.vault.Control({{"all", true}, {"sealed", false}});
      } else if (kind == "5xx") {
        const int codes[] = {500, 502, 503};
        const int code = codes[std::uniform_int_distribution<int>(0, 2)(rng)];
        detail += " (" + std::to_string(code) + ")";
        world.vault.Control({{"all", true}, {"fail_count", 1000000}, {"fail_status", code}});
        absl::SleepFor(Between(rng, 2000, 6000));
        world.vault.Control({{"all", true}, {"fail_count", 0}});
      } else {
        world.vault.Control({{"all", true}, {"hang", true}});
        absl::SleepFor(Between(rng, 3000, 7000));
        world.vault.Control({{"all", true}, {"hang", false}});
      }
      tally.Count("vault: " + detail, "injected");
    } catch (const std::exception& e) {
      tally.Problem("injecting Vault fault \"" + kind + "\" failed: " + e.what());
    }
    timeline.End(window);
  }
}

// The SoftHSM2 token directory removed and restored, until `stop`.
void TokenFaults(World& world, uint64_t seed, Timeline& timeline, Tally& tally, const std::atomic<bool>& stop) {
  namespace fs = std::filesystem;
  std::mt19937_64 rng(seed);
  const fs::path tokens = world.hsm.token_dir();
  const fs::path away = world.hsm.dir() + "/tokens.away";
  const fs::path copy = world.hsm.dir() + "/tokens.copy";
  while (Nap(Between(rng, 4000, 9000), stop)) {
    const bool from_copy = std::uniform_int_distribution<int>(0, 1)(rng) == 1;
    const std::string kind =
        from_copy ? "token directory removed, restored from a copy" : "token directory removed, moved back";
    const size_t window = timeline.Begin("pkcs11", kind);
    std::error_code error;
    fs::rename(tokens, away, error);
    if (error) {
      tally.Problem("removing the token directory failed: " + error.message());
      timeline.End(window);
      continue;
    }
    absl::SleepFor(Between(rng, 2000, 6000));
    if (from_copy) {
      // A fresh copy (new files, new inodes) put in place at once, then the removed one deleted.
      fs::copy(away, copy, fs::copy_options::recursive, error);
      if (!error) {
        fs::rename(copy, tokens, error);
      }
      if (!error) {
        fs::remove_all(away, error);
      }
    } else {
      fs::rename(away, tokens, error);
    }
    if (error) {
      tally.Problem("restoring the token directory failed: " + error.message());
    }
    tally.Count("pkcs11: " + kind, "injected");
    timeline.End(window);
  }
}

// Operations an operator runs against the serving daemon, until `stop`.
class Operations {
 public:
  Operations(World& world, Daemon& daemon, Timeline& timeline, Tally& tally, const std::vector<Issued>& canaries)
      : world_(world), daemon_(daemon), timeline_(timeline), tally_(tally), canaries_(canaries) {}

  void Run(uint64_t seed, const std::atomic<bool>& stop) {
    std::mt19937_64 rng(seed);
    while (Nap(Between(rng, 1500, 4000), stop)) {
      const int pick = std::uniform_int_distribution<int>(0, 9)(rng);
      const int env = std::uniform_int_distribution<int>(0, 2)(rng);
      if (pick <= 2) {
        Rotate(env, std::uniform_int_distribution<int>(0, 1)(rng) == 1);
      } else if (pick <= 4) {
        ToggleRetire(env);
      } else if (pick <= 6) {
        Shape next = shape_;
        next.extra = !next.extra;
        Reload(next, next.extra ? "reload: extra environment added" : "reload: extra environment removed");
      } else if (pick == 7) {
        Shape next = shape_;
        next.vault_poll = next.vault_poll == "1s" ? "2s" : "1s";
        Reload(next, "reload: vault pollInterval changed");
      } else if (pick == 8) {
        Shape next = shape_;
        next.server_poll = "2s";
        Reload(next, "reload: server.pollInterval changed (must be rejected)");
      } else {
        Reload(shape_, "reload: no change");
      }
    }
  }

  // After the faults: every retired version reinstated and the first config back. Backends have just healed, so
  // each step gets a few tries; one that never succeeds is a problem.
  void Settle() {
    for (int env = 0; env < static_cast<int>(kEnvs.size()); ++env) {
      for (int attempt = 0; attempt < 5 && retired_[env]; ++attempt) {
        absl::SleepFor(absl::Seconds(attempt));
        ToggleRetire(env);
      }
      if (retired_[env]) {
        tally_.Problem("version 1 of " + kEnvs[env] + " could not be reinstated after the faults");
      }
    }
    for (int attempt = 0; attempt < 5 && !(shape_ == Shape() && last_result_ == "applied"); ++attempt) {
      absl::SleepFor(absl::Seconds(attempt));
      Reload(Shape(), "reload: back to the first config");
    }
    if (!(shape_ == Shape() && last_result_ == "applied")) {
      tally_.Problem("the first config could not be reloaded after the faults: " + LastRejection());
    }
  }

 private:
  std::string LastRejection() const {
    const auto lines = LogLines(daemon_.process, "config reload rejected");
    return lines.empty() ? "" : lines.back().value("error", "");
  }

  // The fault in force on environment `env`'s backend during [start, now], or "".
  std::string FaultOn(int env, Steady::time_point start) const {
    return env == 0 ? "" : timeline_.During(kSources[env], start, Steady::now(), milliseconds(2000));
  }

  RunResult Cli(const std::vector<std::string>& args) const {
    std::vector<std::string> argv = {DaemonDriver::Binary()};
    argv.insert(argv.end(), args.begin(), args.end());
    return testing::Run(argv, world_.dir.path(), std::chrono::seconds(90));
  }

  // A CLI operation's outcome: ok, failed while a fault was in force on its backend (expected), or a problem.
  void Judge(const std::string& kind, int env, Steady::time_point start, const RunResult& result) {
    if (result.exit_code == 0) {
      tally_.Count(kind, "ok");
      return;
    }
    // Exit 3 is "the backend could not be reached": expected while a fault is in force on it; any other
    // failure is not.
    const std::string fault = FaultOn(env, start);
    if (!fault.empty() && result.exit_code == 3) {
      tally_.Count(kind, "failed during " + kSources[env] + " fault (exit 3)");
    } else {
      tally_.Count(kind, "FAILED");
      tally_.Problem(kind + " failed with no fault in force (exit " + std::to_string(result.exit_code) +
                     "): " + result.err);
    }
  }

  void Rotate(int env, bool hup) {
    const std::string kind = "rotate " + kEnvs[env] + (hup ? " + SIGHUP" : " (poll)");
    const size_t window = timeline_.Begin("ops", kind);
    const Steady::time_point start = Steady::now();
    Judge(kind, env, start, Cli({"rotate", "--config", world_.config, "--env", kEnvs[env]}));
    if (hup) {
      daemon_.Hup();
    }
    timeline_.End(window);
  }

  // Retires version 1 (no recorded ciphertext uses it), or reinstates it; then SIGHUP, and checks with the
  // canary (a version-1 ciphertext made before the load) that the daemon applied it. A backend fault can keep
  // the daemon from seeing the change before the next poll; that is counted, not failed.
  void ToggleRetire(int env) {
    const bool reinstate = retired_[env];
    const std::string kind = std::string(reinstate ? "reinstate" : "retire") + " version 1 of " + kEnvs[env];
    const size_t window = timeline_.Begin("ops", kind);
    const Steady::time_point start = Steady::now();
    std::vector<std::string> args = {"retire", "--config", world_.config, "--env", kEnvs[env], "--version", "1"};
    if (reinstate) {
      args.push_back("--reinstate");
    } else {
      args.insert(args.end(), {"--force", "--allow-recent"});
    }
    const RunResult result = Cli(args);
    Judge(kind, env, start, result);
    if (result.exit_code == 0) {
      retired_[env] = !reinstate;
      daemon_.Hup();
      const Issued& canary = canaries_[env];
      const bool seen = Eventually(
          [&] {
            KmsClient client(world_.Socket(kEnvs[env]));
            v2::DecryptResponse decrypted;
            const grpc::Status status =
                client.Decrypt(canary.ciphertext, canary.key_id, canary.annotations, decrypted, kCryptDeadline);
            return reinstate ? status.ok() && decrypted.plaintext() == canary.plaintext
                             : status.error_code() == grpc::StatusCode::FAILED_PRECONDITION;
          },
          absl::Seconds(5));
      const std::string fault = FaultOn(env, start);
      tally_.Count(kind, seen            ? "applied by the daemon"
                         : fault.empty() ? "NOT APPLIED by the daemon within 5 s"
                                         : "not yet applied (" + kSources[env] + " fault)");
      if (!seen && fault.empty()) {
        tally_.Problem(kind + ": the daemon did not apply it within 5 s of SIGHUP with no fault in force");
      }
    }
    timeline_.End(window);
  }

  void Reload(const Shape& next, const std::string& kind) {
    const size_t window = timeline_.Begin("ops", kind);
    world_.Write(next);
    const std::string result = daemon_.Hup();
    last_result_ = result;
    const bool must_reject = next.server_poll != "1s";
    if (result.empty()) {
      tally_.Count(kind, "NOT COUNTED within 30 s");
      tally_.Problem(kind + ": the daemon did not count the reload within 30 s of SIGHUP");
    } else if (must_reject) {
      tally_.Count(kind, result);
      if (result != "rejected") {
        tally_.Problem(kind + ": applied, but a server: change needs a restart");
      }
      world_.Write(shape_);  // the file on disk back to what is served
    } else if (result == "rejected") {
      // A changed Vault source is probed before it is swapped in; with Vault down that fails, as it should.
      const std::string fault = timeline_.During("vault", Steady::now(), Steady::now(), milliseconds(2000));
      tally_.Count(kind, fault.empty() ? "REJECTED" : "rejected (vault fault)");
      if (fault.empty() || next.vault_poll == shape_.vault_poll) {
        tally_.Problem(kind + ": rejected: " + LastRejection());
      }
      world_.Write(shape_);
    } else {
      tally_.Count(kind, "applied");
      if (next.extra != shape_.extra) {
        const std::string socket = world_.Socket("extra");
        const bool done = next.extra ? Eventually([&] { return Healthy(socket); }, absl::Seconds(5))
                                     : Eventually(
                                           [&] {
                                             struct stat info {};
                                             return lstat(socket.c_str(), &info) != 0;
                                           },
                                           absl::Seconds(15));
        if (!done) {
          tally_.Problem(kind + ": applied, but the extra environment's socket " +
                         (next.extra ? "does not answer healthy" : "is still there"));
        }
      }
      shape_ = next;
    }
    timeline_.End(window);
  }

  World& world_;
  Daemon& daemon_;
  Timeline& timeline_;
  Tally& tally_;
  const std::vector<Issued>& canaries_;
  Shape shape_;
  std::string last_result_;
  bool retired_[3] = {false, false, false};
};

// Per (environment, api, rpc): how many calls the plugin finished above `le` seconds, from its latency histogram.
std::map<std::string, double> CallsAbove(const std::string& metrics, const std::string& le) {
  std::map<std::string, double> below, total, above;
  std::istringstream lines(metrics);
  std::string line;
  const std::string prefix = "kmsplugin_grpc_request_duration_seconds_bucket{";
  while (std::getline(lines, line)) {
    if (line.rfind(prefix, 0) != 0) {
      continue;
    }
    const size_t le_at = line.find(",le=\"");
    const size_t close = line.find("\"}", le_at);
    if (le_at == std::string::npos || close == std::string::npos) {
      continue;
    }
    const std::string series = line.substr(prefix.size(), le_at - prefix.size());
    const std::string bound = line.substr(le_at + 5, close - le_at - 5);
    const double count = std::stod(line.substr(close + 3));
    if (bound == le) {
      below[series] = count;
    } else if (bound == "+Inf") {
      total[series] = count;
    }
  }
  for (const auto& [series, count] : total) {
    above[series] = count - below[series];
  }
  return above;
}

std::string Seconds(absl::Duration d) {
  std::ostringstream out;
  out << std::fixed << std::setprecision(1) << absl::ToDoubleSeconds(d) << " s";
  return out.str();
}

TEST_CASE(
    "Soak: three key sources in one daemon under a seeded fault schedule lose no ciphertext, keep every "
    "deadline and give back what they took",
    "[soak]") {
  const long fault_seconds = EnvLong("KMSPLUGIN_SOAK_SECONDS", 180);
  const uint64_t seed = Seed();
  std::cout << "soak: seed " << seed << " (KMSPLUGIN_SOAK_SEED=" << seed << " replays this schedule), faults for "
            << fault_seconds << " s (KMSPLUGIN_SOAK_SECONDS)" << std::endl;
  const absl::Time soak_start = absl::Now();

  // --- Set-up: key material for every environment (version 1), the daemon, canaries under version 1, then
  // version 2 current everywhere, so that version 1 is one no load ciphertext uses.
  World world;
  {
    Shape all;
    all.extra = true;
    world.Write(all);
    const RunResult init = world.Init();
    INFO(init.out << init.err);
    REQUIRE(init.exit_code == 0);
    world.Write(Shape());
  }
  Daemon daemon(world);
  for (const std::string& env : kEnvs) {
    INFO(daemon.process.Stderr());
    REQUIRE(DaemonDriver::WaitServing(daemon.process, world.Socket(env)));
  }
  daemon.port = DaemonDriver::LoggedHttpPort(daemon.process);
  REQUIRE(daemon.port > 0);
  std::vector<Issued> canaries;
  std::vector<std::string> first_key_ids;
  for (int env = 0; env < 3; ++env) {
    REQUIRE(Eventually([&] { return Healthy(world.Socket(kEnvs[env])); }, absl::Seconds(10)));
    KmsClient client(world.Socket(kEnvs[env]));
    v2::EncryptResponse encrypted;
    Issued canary;
    canary.env = env;
    canary.plaintext = "canary of " + kEnvs[env] + " under version 1";
    REQUIRE(client.Encrypt(canary.plaintext, encrypted).ok());
    canary.ciphertext = encrypted.ciphertext();
    canary.key_id = encrypted.key_id();
    canary.annotations.insert(encrypted.annotations().begin(), encrypted.annotations().end());
    canaries.push_back(canary);
    first_key_ids.push_back(encrypted.key_id());
    const RunResult rotate = world.Rotate(kEnvs[env]);
    INFO(rotate.err);
    REQUIRE(rotate.exit_code == 0);
  }
  REQUIRE(daemon.Hup() == "applied");
  for (int env = 0; env < 3; ++env) {
    REQUIRE(Eventually([&] { return DaemonDriver::Status(world.Socket(kEnvs[env])).key_id() != first_key_ids[env]; },
                       absl::Seconds(10)));
  }

  // --- Warm-up under the full load with no fault (connections, sessions and pools reach their working size),
  // then idle past the trim: the baseline.
  Ledger ledger;
  Timeline timeline;
  Tally tally;
  LoadOptions load_options;
  load_options.crypt_deadline = kCryptDeadline;
  load_options.status_deadline = kStatusDeadline;
  std::vector<std::string> sockets;
  for (const std::string& env : kEnvs) {
    sockets.push_back(world.Socket(env));
  }
  const Steady::time_point load_start = Steady::now();
  SoakLoad load(sockets, load_options, seed ^ 0x5eed, ledger);
  absl::SleepFor(absl::Seconds(10));
  load.Pause(true);
  absl::SleepFor(kIdle);
  const ProcessStats baseline = ProcessStats::Of(daemon.process.pid());
  load.Pause(false);

  // --- Faults, with a monitor that watches the daemon stay alive and samples what it holds.
  std::atomic<bool> stop{false};
  std::atomic<bool> crashed{false};
  ProcessStats peak = baseline;
  std::mutex peak_mu;
  // How long the test process itself went without a CPU: a thread that asks for 5 ms naps measures oversleep.
  std::atomic<long> worst_stall_ms{0}, worst_stall_at_ms{0};
  std::thread stall_detector([&] {
    while (!stop.load()) {
      const Steady::time_point before = Steady::now();
      std::this_thread::sleep_for(milliseconds(5));
      const long over = std::chrono::duration_cast<milliseconds>(Steady::now() - before).count() - 5;
      if (over > worst_stall_ms.load()) {
        worst_stall_ms = over;
        worst_stall_at_ms = std::chrono::duration_cast<milliseconds>(before - load_start).count();
      }
    }
  });
  std::thread monitor([&] {
    while (!stop.load()) {
      if (!Alive(daemon.process.pid())) {  // not reaped here: the pid stays ours to signal
        crashed = true;
        return;
      }
      const ProcessStats now = ProcessStats::Of(daemon.process.pid());
      std::lock_guard<std::mutex> lock(peak_mu);
      peak.rss_kb = std::max(peak.rss_kb, now.rss_kb);
      peak.threads = std::max(peak.threads, now.threads);
      peak.fds = std::max(peak.fds, now.fds);
      absl::SleepFor(absl::Milliseconds(500));
    }
  });
  Operations operations(world, daemon, timeline, tally, canaries);
  std::mt19937_64 seeds(seed);
  const uint64_t vault_seed = seeds(), token_seed = seeds(), ops_seed = seeds();
  std::atomic<bool> stop_faults{false};
  std::thread vault_faults([&] { VaultFaults(world, vault_seed, timeline, tally, stop_faults); });
  std::thread token_faults([&] { TokenFaults(world, token_seed, timeline, tally, stop_faults); });
  std::thread ops([&] { operations.Run(ops_seed, stop_faults); });
  const absl::Time faults_start = absl::Now();
  while (absl::Now() - faults_start < absl::Seconds(fault_seconds) && !crashed.load()) {
    absl::SleepFor(absl::Milliseconds(200));
  }
  stop_faults = true;  // each injector ends (heals) the fault it is in
  vault_faults.join();
  token_faults.join();
  ops.join();
  const absl::Duration fault_time = absl::Now() - faults_start;

  // --- Recovery: the first config, every version reinstated, every environment healthy again by itself.
  const absl::Time recovery_start = absl::Now();
  if (!crashed.load()) {
    operations.Settle();
  }
  bool recovered = !crashed.load();
  for (const std::string& env : kEnvs) {
    recovered = recovered && Eventually([&] { return Healthy(world.Socket(env)); }, kRecoveryBound);
  }
  const absl::Duration recovery_time = absl::Now() - recovery_start;
  absl::SleepFor(absl::Seconds(5));  // the load runs on against healthy backends
  load.Stop();

  // --- Every ciphertext issued (and the canaries) decrypts to its plaintext.
  std::vector<Issued> issued = ledger.issued();
  issued.insert(issued.end(), canaries.begin(), canaries.end());
  std::atomic<size_t> next{0};
  std::mutex undecryptable_mu;
  std::vector<std::string> undecryptable;
  std::vector<std::thread> checkers;
  const absl::Time check_start = absl::Now();
  for (int t = 0; t < 6 && recovered; ++t) {
    checkers.emplace_back([&] {
      std::vector<std::unique_ptr<KmsClient>> clients;
      for (const std::string& socket : sockets) {
        clients.push_back(std::make_unique<KmsClient>(socket));
      }
      for (size_t i = next++; i < issued.size(); i = next++) {
        const Issued& one = issued[i];
        grpc::Status status;
        std::string plaintext;
        if (one.v1) {
          v1beta1::DecryptResponse response;
          status = clients[one.env]->V1Decrypt(one.ciphertext, response, "v1beta1", milliseconds(5000));
          plaintext = response.plain();
        } else {
          v2::DecryptResponse response;
          status = clients[one.env]->Decrypt(one.ciphertext, one.key_id, one.annotations, response, milliseconds(5000));
          plaintext = response.plaintext();
        }
        if (!status.ok() || plaintext != one.plaintext) {
          std::lock_guard<std::mutex> lock(undecryptable_mu);
          undecryptable.push_back(kEnvs[one.env] + (one.v1 ? " v1beta1" : " v2") + " key_id " + one.key_id + ": " +
                                  (status.ok() ? "wrong plaintext" : CodeName(status.error_code())) + " " +
                                  status.error_message());
        }
      }
    });
  }
  for (std::thread& checker : checkers) {
    checker.join();
  }
  const absl::Duration check_time = absl::Now() - check_start;

  // --- Idle again: what the daemon holds now, against the baseline.
  absl::SleepFor(kIdle);
  const ProcessStats after = ProcessStats::Of(daemon.process.pid());
  stop = true;
  monitor.join();
  stall_detector.join();
  const std::string metrics = DaemonDriver::HttpGet(daemon.port, "/metrics");
  if (const char* keep = std::getenv("KMSPLUGIN_SOAK_LOG"); keep != nullptr && *keep != '\0') {
    std::ofstream(keep) << daemon.process.Stderr();  // the daemon's log, for a run to be looked at later
  }
  const bool alive = daemon.process.Running();
  daemon.process.Signal(SIGTERM);
  const std::optional<int> exit_code = daemon.process.Wait(std::chrono::seconds(30));

  // --- Judge every call.
  const std::vector<Call> calls = ledger.calls();
  std::map<std::string, std::map<std::string, long>> by_rpc;  // "env source rpc" -> code -> calls
  std::map<std::string, long> by_cause;                       // "fault: code" -> failed calls
  std::map<std::string, milliseconds> longest;                // rpc -> longest call (client side)
  std::vector<std::string> unexplained, late, status_problems, slow_status;
  long cut_by_client = 0;
  for (const Call& call : calls) {
    const std::string rpc = RpcName(call.rpc);
    ++by_rpc[kEnvs[call.env] + " (" + kSources[call.env] + ") " + rpc][CodeName(call.code)];
    const std::string env_rpc = kEnvs[call.env] + " " + rpc;
    longest[env_rpc] = std::max(longest[env_rpc], call.Took());
    cut_by_client += call.cut_by_client ? 1 : 0;
    const auto at = [&] {
      return "at +" + std::to_string(std::chrono::duration_cast<milliseconds>(call.start - load_start).count()) +
             " ms, " + kEnvs[call.env] + " " + rpc + " " + CodeName(call.code) + " after " +
             std::to_string(call.Took().count()) + " ms (in force: " + timeline.InForce(call.start, call.end) + ")";
    };
    if (call.Took() > call.deadline + kDeadlineSlack) {
      late.push_back(at());
    }
    if (call.rpc == Rpc::kStatus) {
      if (call.code != 0) {
        status_problems.push_back(at());
      } else if (call.Took() > kStatusReport) {
        slow_status.push_back(at());
      }
      continue;
    }
    if (call.code == 0) {
      continue;
    }
    const std::string fault =
        call.env == 0 ? "" : timeline.During(kSources[call.env], call.start, call.end, kRecoveryGrace);
    const bool expected = !fault.empty() && (call.code == grpc::StatusCode::UNAVAILABLE ||
                                             call.code == grpc::StatusCode::DEADLINE_EXCEEDED);
    ++by_cause[(fault.empty() ? "no fault" : kSources[call.env] + " " + fault) + ": " + CodeName(call.code)];
    if (!expected) {
      unexplained.push_back(at() + (fault.empty() ? ": no fault on its backend" : ": during " + fault));
    }
  }
  // The plugin's own view: calls it finished above deadline + slack (histogram), and its longest logged call.
  std::map<std::string, double> plugin_late;
  for (const auto& [series, n] : CallsAbove(metrics, "2.5")) {
    if (n > 0 && series.find("Status") == std::string::npos) {
      plugin_late[series] = n;
    }
  }
  std::map<std::string, double> plugin_longest_ms;
  for (const nlohmann::json& line : LogLines(daemon.process, "")) {
    if (line.contains("latency_ms") && line.contains("rpc")) {
      const std::string rpc = line.value("environment", "") + " " + line["rpc"].get<std::string>();
      plugin_longest_ms[rpc] = std::max(plugin_longest_ms[rpc], line["latency_ms"].get<double>());
    }
  }

  // --- The summary.
  std::ostringstream out;
  out << "\n=== soak summary (seed " << seed << ") ===\n"
      << "faults injected for " << Seconds(fault_time) << "; recovery (first config back, versions reinstated, "
      << "all healthy) " << Seconds(recovery_time) << "; " << issued.size() << " ciphertexts checked at the end in "
      << Seconds(check_time) << "; whole run " << Seconds(absl::Now() - soak_start)
      << "\n\ncalls by environment (source) API.RPC: outcome\n";
  for (const auto& [rpc, codes] : by_rpc) {
    out << "  " << std::left << std::setw(34) << rpc;
    for (const auto& [code, n] : codes) {
      out << " " << code << "=" << n;
    }
    out << "\n";
  }
  out << "\nfaults and operations: outcome\n";
  for (const auto& [kind, outcomes] : tally.outcomes) {
    out << "  " << std::left << std::setw(58) << kind;
    for (const auto& [outcome, n] : outcomes) {
      out << " " << outcome << "=" << n;
    }
    out << "\n";
  }
  out << "\nfailed Encrypt/Decrypt calls by cause (fault in force on their backend, or ended < "
      << kRecoveryGrace.count() << " ms before)\n";
  for (const auto& [cause, n] : by_cause) {
    out << "  " << std::left << std::setw(58) << cause << " " << n << "\n";
  }
  out << "  (of the DEADLINE_EXCEEDED, " << cut_by_client << " were ended by the client's own timer)\n";
  out << "\nlongest call, client side (deadline " << kCryptDeadline.count() << " ms, Status " << kStatusDeadline.count()
      << " ms)\n";
  for (const auto& [rpc, took] : longest) {
    out << "  " << std::left << std::setw(26) << rpc << " " << took.count() << " ms\n";
  }
  out << "longest call, plugin side (its log)\n";
  for (const auto& [rpc, ms] : plugin_longest_ms) {
    out << "  " << std::left << std::setw(26) << rpc << " " << std::fixed << std::setprecision(1) << ms << " ms\n";
  }
  out << "\nStatus calls slower than " << kStatusReport.count() << " ms on the client (" << slow_status.size()
      << "):\n";
  for (size_t i = 0; i < slow_status.size() && i < 10; ++i) {
    out << "  " << slow_status[i] << "\n";
  }
  out << "longest stall of the test process itself: " << worst_stall_ms.load() << " ms at +" << worst_stall_at_ms.load()
      << " ms\n";
  out << "\nStatus answers not \"ok\" (healthz) while faults were in force:";
  for (int env = 0; env < 3; ++env) {
    out << " " << kEnvs[env] << "=" << load.Unhealthy(env);
  }
  out << "\nkey_ids Status reported:";
  for (int env = 0; env < 3; ++env) {
    out << " " << kEnvs[env] << "=" << load.KeyIds(env).size();
  }
  out << "\n\ndaemon        baseline   peak   after   (tolerance)\n"
      << "  RSS (kB)    " << std::setw(10) << baseline.rss_kb << " " << std::setw(6) << peak.rss_kb << " "
      << std::setw(7) << after.rss_kb << "   (x" << std::setprecision(2) << kRssFactor << " + " << kRssSlackKb
      << " kB)\n"
      << "  threads     " << std::setw(10) << baseline.threads << " " << std::setw(6) << peak.threads << " "
      << std::setw(7) << after.threads << "   (+" << kThreadSlack << ")\n"
      << "  fds         " << std::setw(10) << baseline.fds << " " << std::setw(6) << peak.fds << " " << std::setw(7)
      << after.fds << "   (+" << kFdSlack << ")\n";
  std::cout << out.str() << std::endl;

  // --- The verdict.
  auto first = [](const std::vector<std::string>& all) {
    std::string text;
    for (size_t i = 0; i < all.size() && i < 10; ++i) {
      text += "  " + all[i] + "\n";
    }
    return text;
  };
  INFO("daemon log tail:\n"
       << [&] {
            const std::string log = daemon.process.Stderr();
            return log.substr(log.size() > 4000 ? log.size() - 4000 : 0);
          }());
  CHECK_FALSE(crashed.load());
  CHECK(alive);
  CHECK(exit_code == std::optional<int>(0));
  CHECK(recovered);
  INFO("anomalies:\n" << first(ledger.anomalies()));
  CHECK(ledger.anomalies().empty());
  INFO("problems:\n" << first(tally.problems));
  CHECK(tally.problems.empty());
  INFO("undecryptable (" << undecryptable.size() << "):\n" << first(undecryptable));
  CHECK(undecryptable.empty());
  INFO("late calls (" << late.size() << "):\n" << first(late));
  CHECK(late.empty());
  INFO("plugin side, calls above 2.5 s: " << nlohmann::json(plugin_late).dump());
  CHECK(plugin_late.empty());
  for (const auto& [rpc, ms] : plugin_longest_ms) {
    INFO(rpc);
    CHECK(ms <=
          (rpc.find("Status") == std::string::npos ? (kCryptDeadline + kDeadlineSlack).count() : kStatusPluginBoundMs));
  }
  INFO("Status problems (" << status_problems.size() << "):\n" << first(status_problems));
  CHECK(status_problems.empty());
  INFO("unexplained failed calls (" << unexplained.size() << "):\n" << first(unexplained));
  CHECK(unexplained.empty());
  CHECK(after.threads <= baseline.threads + kThreadSlack);
  CHECK(after.fds <= baseline.fds + kFdSlack);
#if !defined(__SANITIZE_ADDRESS__)
  // Under AddressSanitizer RSS is mostly shadow memory and quarantine, never handed back.
  CHECK(after.rss_kb <= static_cast<long>(baseline.rss_kb * kRssFactor) + kRssSlackKb);
#endif
  CHECK(issued.size() > 100);
}

}  // namespace
}  // namespace kmsplugin::testing::soak
