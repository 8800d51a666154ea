// SIGHUP re-reads the config file of a running `kmsplugin serve` and applies it all or nothing (issue 6, item 5):
// the real binary, real gRPC over Unix sockets, the outcome read from its JSON log lines and /metrics.

#include <signal.h>
#include <sys/stat.h>

#include <atomic>
#include <mutex>
#include <regex>
#include <sstream>
#include <thread>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "tests/support/daemon.h"
#include "tests/support/kms_client.h"
#include "tests/support/subprocess.h"
#include "tests/support/temp_dir.h"

namespace kmsplugin::testing {
namespace {

bool Has(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

bool Exists(const std::string& path) {
  struct stat info {};
  return lstat(path.c_str(), &info) == 0;
}

// Polls `done` every 10 ms for at most `bound`; true once it holds.
template <typename F>
bool Eventually(F done, absl::Duration bound = absl::Seconds(10)) {
  const absl::Time until = absl::Now() + bound;
  while (!done()) {
    if (absl::Now() > until) {
      return false;
    }
    absl::SleepFor(absl::Milliseconds(10));
  }
  return true;
}

struct Reload : DaemonDriver {
  Reload() {
    // Key material for every environment any step uses, made once up front (init skips what exists).
    config = dir.Write("config.yaml", File({Dev(), Env("extra"), Env("other")}));
    REQUIRE(Init().exit_code == 0);
    Write({Dev()});
  }

  static std::string Server(const std::string& server) { return server.empty() ? "" : "server:\n" + server; }
  std::string File(const std::vector<std::string>& environments, const std::string& server = "") const {
    std::string text = "http:\n  listen: 127.0.0.1:0\n" + Server(server) + "environments:\n";
    for (const std::string& env : environments) {
      text += env;
    }
    return text;
  }
  // An environment entry; `key_source` replaces the default keySource mapping.
  std::string Env(const std::string& name, const std::string& extra = "", const std::string& key_source = "") const {
    const std::string source =
        key_source.empty() ? "      local:\n        keyring: " + dir.File("state/" + name + ".keyring") +
                                 "\n        rootKeyFile: " + dir.File("state/" + name + ".rootkey") + "\n"
                           : key_source;
    return "  - name: " + name + "\n    socket: " + Socket(name) + "\n" + extra + "    keySource:\n" + source;
  }
  std::string Dev(const std::string& key_source = "") const { return Env("dev", "", key_source); }
  std::string Socket(const std::string& name) const { return dir.File("run/" + name + ".sock"); }
  void Write(const std::vector<std::string>& environments, const std::string& server = "") const {
    dir.Write("config.yaml", File(environments, server));
  }

  void Start() {
    server = Serve();
    REQUIRE(WaitServing(*server, Socket("dev")));
    port = LoggedHttpPort(*server);
    REQUIRE(port > 0);
  }
  std::string Metrics() const { return HttpGet(port, "/metrics"); }
  double Reloads(const std::string& result) const {
    return MetricSample(Metrics(), "kmsplugin_config_reloads_total{result=\"" + result + "\"}");
  }
  // SIGHUP, then waits (bounded) until the daemon counted one more reload with `result`.
  bool Hup(const std::string& result) {
    const double before = Reloads(result);
    server->Signal(SIGHUP);
    return Eventually([&] { return Reloads(result) == before + 1; });
  }
  bool Answers(const std::string& socket) const {
    KmsClient client(socket);
    v2::StatusResponse status;
    return client.Status(status, std::chrono::milliseconds(1000)).ok() && status.healthz() == "ok";
  }
  std::string LastRejection() const {
    auto lines = LogLines(*server, "config reload rejected");
    return lines.empty() ? "" : lines.back().value("error", "");
  }

  std::unique_ptr<Subprocess> server;
  int port = -1;
};

// Encrypt + Decrypt (v2) in a loop on `socket` from several threads; every ciphertext is kept.
class Load {
 public:
  Load(const std::string& socket, int threads) {
    for (int t = 0; t < threads; ++t) {
      threads_.emplace_back([this, socket, t] {
        KmsClient client(socket);
        for (int i = 0; !stop_.load(); ++i) {
          const std::string plaintext = std::string(24, static_cast<char>('a' + t)) + std::to_string(1000000 + i);
          v2::EncryptResponse encrypted;
          v2::DecryptResponse decrypted;
          const grpc::Status e = client.Encrypt(plaintext, encrypted);
          const grpc::Status d = e.ok() ? client.DecryptResponseOf(encrypted, decrypted) : e;
          std::lock_guard<std::mutex> lock(mu_);
          if (!d.ok() || decrypted.plaintext() != plaintext) {
            errors_.push_back(d.ok() ? "wrong plaintext" : d.error_message());
          } else {
            written_.emplace_back(plaintext, std::move(encrypted));
          }
          ++calls_;
        }
      });
    }
  }
  ~Load() { Stop(); }
  void Stop() {
    stop_ = true;
    for (std::thread& thread : threads_) {
      thread.join();
    }
    threads_.clear();
  }
  int Calls() const { return calls_.load(); }
  // Waits (bounded) until `more` further calls completed: the load went on across whatever happened before.
  bool Progresses(int more = 20) const {
    const int from = Calls();
    return Eventually([&] { return Calls() >= from + more; });
  }
  std::vector<std::string> errors() {
    std::lock_guard<std::mutex> lock(mu_);
    return errors_;
  }
  std::vector<std::pair<std::string, v2::EncryptResponse>> written() {
    std::lock_guard<std::mutex> lock(mu_);
    return written_;
  }

 private:
  std::atomic<bool> stop_{false};
  std::atomic<int> calls_{0};
  std::mutex mu_;
  std::vector<std::string> errors_;
  std::vector<std::pair<std::string, v2::EncryptResponse>> written_;
  std::vector<std::thread> threads_;
};

TEST_CASE("Reload: under load, environments come and go, a key source is re-pointed, broken files are rejected, "
          "and no call fails", "[reload][integration]") {
  Reload r;
  r.Start();
  const std::string key_id = DaemonDriver::Status(r.Socket("dev")).key_id();
  // Equivalent specs of dev's key source: the same keyring through another path, the options in another order.
  const std::string same_keyring_other_path = "      local:\n        keyring: " + r.dir.File("state/./dev.keyring") +
                                              "\n        rootKeyFile: " + r.dir.File("state/dev.rootkey") + "\n";
  const std::string options_reordered = "      local:\n        rootKeyFile: " + r.dir.File("state/dev.rootkey") +
                                        "\n        keyring: " + r.dir.File("run/../state/dev.keyring") + "\n";
  Load load(r.Socket("dev"), 4);
  REQUIRE(load.Progresses());
  int applied = 0;
  int rejected = 0;
  const absl::Time start = absl::Now();
  for (int round = 0; round < 3 || absl::Now() - start < absl::Seconds(3); ++round) {
    INFO("round " << round);
    // Add a second environment: its socket answers, and the metrics list it.
    r.Write({r.Dev(), r.Env("extra")});
    REQUIRE(r.Hup("applied"));
    ++applied;
    CHECK(r.Answers(r.Socket("extra")));
    CHECK(Has(r.Metrics(), "kmsplugin_key_info{environment=\"extra\""));
    REQUIRE(load.Progresses());
    // Remove it again: the socket file goes, the metrics forget it.
    r.Write({r.Dev()});
    REQUIRE(r.Hup("applied"));
    ++applied;
    CHECK(Eventually([&] { return !Exists(r.Socket("extra")); }));
    CHECK_FALSE(Has(r.Metrics(), "kmsplugin_key_info{environment=\"extra\""));
    REQUIRE(load.Progresses());
    // Re-point dev's key source at an equivalent spec: swapped in place under load.
    r.Write({r.Dev(round % 2 == 0 ? same_keyring_other_path : options_reordered)});
    REQUIRE(r.Hup("applied"));
    ++applied;
    CHECK(LogLines(*r.server, "config reloaded").back().value("summary", "") == "changed: dev (keySource)");
    REQUIRE(load.Progresses());
    // A broken file (a YAML error, a validation error, a file others can write): rejected, dev keeps serving.
    switch (round % 3) {
      case 0:
        r.dir.Write("config.yaml", r.File({r.Dev()}) + "  - name: [\n");
        break;
      case 1:
        r.dir.Write("config.yaml", r.File({r.Dev(), r.Env("dev")}));
        break;
      default:
        r.dir.Write("config.yaml", r.File({r.Dev(), r.Env("extra")}), 0664);
        break;
    }
    REQUIRE(r.Hup("rejected"));
    ++rejected;
    const std::string reason = r.LastRejection();
    CHECK(Has(reason, r.config));
    CHECK(Has(reason, "fix:"));
    CHECK(MetricSample(r.Metrics(), "kmsplugin_config_last_reload_successful") == 0);
    CHECK_FALSE(Exists(r.Socket("extra")));
    CHECK(r.Answers(r.Socket("dev")));
    REQUIRE(load.Progresses());
    r.Write({r.Dev()});
    chmod(r.config.c_str(), 0600);
    REQUIRE(r.Hup("applied"));
    ++applied;
    CHECK(MetricSample(r.Metrics(), "kmsplugin_config_last_reload_successful") == 1);
  }
  REQUIRE(load.Progresses());
  load.Stop();
  const std::vector<std::string> errors = load.errors();
  INFO("first error: " << (errors.empty() ? "" : errors.front()));
  CHECK(errors.empty());
  CHECK(load.Calls() > 200);
  // Every ciphertext written across all those reloads decrypts now.
  KmsClient client(r.Socket("dev"));
  const auto written = load.written();
  int decrypted_ok = 0;
  for (const auto& [plaintext, encrypted] : written) {
    v2::DecryptResponse decrypted;
    if (client.DecryptResponseOf(encrypted, decrypted).ok() && decrypted.plaintext() == plaintext) {
      ++decrypted_ok;
    }
  }
  CHECK(decrypted_ok == static_cast<int>(written.size()));
  CHECK(DaemonDriver::Status(r.Socket("dev")).key_id() == key_id);
  // What the daemon counted and logged matches what was done.
  const std::string metrics = r.Metrics();
  CHECK(MetricSample(metrics, "kmsplugin_config_reloads_total{result=\"applied\"}") == applied);
  CHECK(MetricSample(metrics, "kmsplugin_config_reloads_total{result=\"rejected\"}") == rejected);
  CHECK(MetricSample(metrics, "kmsplugin_config_last_reload_success_timestamp_seconds") >=
        static_cast<double>(absl::ToUnixSeconds(start)));
  const auto applied_lines = LogLines(*r.server, "config reloaded");
  const auto rejected_lines = LogLines(*r.server, "config reload rejected");
  CHECK(static_cast<int>(applied_lines.size()) == applied);
  CHECK(static_cast<int>(rejected_lines.size()) == rejected);
  for (const auto& line : applied_lines) {
    CHECK(line["event"] == "reload");
    CHECK(line["result"] == "applied");
    CHECK(line["level"] == "info");
  }
  for (const auto& line : rejected_lines) {
    CHECK(line["event"] == "reload");
    CHECK(line["result"] == "rejected");
    CHECK(line["level"] == "error");
  }
  r.server->Signal(SIGTERM);
  CHECK(r.server->Wait(std::chrono::seconds(15)) == std::optional<int>(0));
  CHECK_FALSE(Exists(r.Socket("dev")));
}

TEST_CASE("Reload: a server.maxThreads or http.listen change is rejected, naming the field, the old config serves",
          "[reload][integration][bad-input]") {
  Reload r;
  r.Start();
  r.Write({r.Dev()}, "  maxThreads: 64\n");
  REQUIRE(r.Hup("rejected"));
  CHECK(Has(r.LastRejection(), r.config + ": server.maxThreads: changed from 128 to 64"));
  CHECK(Has(r.LastRejection(), "restart kmsplugin to apply it, or revert the change"));
  CHECK(r.Answers(r.Socket("dev")));
  // Environment changes in the same file are not applied either: all or nothing.
  r.dir.Write("config.yaml", "http:\n  listen: 127.0.0.1:1\nenvironments:\n" + r.Dev() + r.Env("extra"));
  REQUIRE(r.Hup("rejected"));
  CHECK(Has(r.LastRejection(), "http.listen"));
  CHECK_FALSE(Exists(r.Socket("extra")));
  const std::string metrics = r.Metrics();
  CHECK(MetricSample(metrics, "kmsplugin_config_reloads_total{result=\"applied\"}") == 0);
  CHECK(MetricSample(metrics, "kmsplugin_config_reloads_total{result=\"rejected\"}") == 2);
  CHECK(MetricSample(metrics, "kmsplugin_config_last_reload_successful") == 0);
  CHECK(r.Answers(r.Socket("dev")));
}

TEST_CASE("Reload: a keySource that does not know the current version is rejected, the old key_id keeps serving",
          "[reload][integration][bad-input]") {
  Reload r;
  // A copy of dev's keyring from before the rotation below: same keyring, without version 2.
  const std::string stale = r.dir.Write("state/stale.keyring", ReadWholeFile(r.dir.File("state/dev.keyring")));
  r.Start();
  const std::string v1 = DaemonDriver::Status(r.Socket("dev")).key_id();
  REQUIRE(r.Rotate("dev").exit_code == 0);
  REQUIRE(r.Hup("applied"));  // the same file: nothing changes, and the rotation is picked up
  std::string v2;
  REQUIRE(Eventually([&] { return (v2 = DaemonDriver::Status(r.Socket("dev")).key_id()) != v1; }));
  KmsClient client(r.Socket("dev"));
  v2::EncryptResponse before;
  REQUIRE(client.Encrypt(std::string(32, 'b'), before).ok());
  CHECK(before.key_id() == v2);

  r.Write({r.Dev("      local:\n        keyring: " + stale + "\n        rootKeyFile: " +
                 r.dir.File("state/dev.rootkey") + "\n")});
  REQUIRE(r.Hup("rejected"));
  const std::string reason = r.LastRejection();
  CHECK(Has(reason, "environment \"dev\""));
  CHECK(Has(reason, "does not know key version 2 (key_id " + v2 + ")"));
  CHECK(Has(reason, "would stop decrypting"));
  // Another keyring altogether (another environment's): it knows none of dev's versions.
  r.Write({r.Dev("      local:\n        keyring: " + r.dir.File("state/other.keyring") + "\n        rootKeyFile: " +
                 r.dir.File("state/other.rootkey") + "\n")});
  REQUIRE(r.Hup("rejected"));
  CHECK(Has(r.LastRejection(), "does not know key version 1 (key_id " + v1 + ")"));

  CHECK(DaemonDriver::Status(r.Socket("dev")).key_id() == v2);
  v2::EncryptResponse after;
  REQUIRE(client.Encrypt(std::string(32, 'a'), after).ok());
  CHECK(after.key_id() == v2);
  v2::DecryptResponse decrypted;
  REQUIRE(client.DecryptResponseOf(before, decrypted).ok());
  CHECK(decrypted.plaintext() == std::string(32, 'b'));
}

TEST_CASE("Reload: one environment that cannot be added undoes the others of the same reload",
          "[reload][integration][bad-input]") {
  Reload r;
  r.Start();
  // "extra" binds fine; "other"'s socket path is a regular file, which is never replaced.
  const std::string blocked = r.dir.Write("run/other.sock", "not a socket");
  r.Write({r.Dev(), r.Env("extra"), r.Env("other")});
  REQUIRE(r.Hup("rejected"));
  CHECK(Has(r.LastRejection(), "environment \"other\""));
  CHECK(Has(r.LastRejection(), "not a socket"));
  CHECK_FALSE(Exists(r.Socket("extra")));
  CHECK(ReadWholeFile(blocked) == "not a socket");
  // An environment without key material: the message says to run init; no socket appears for it.
  r.Write({r.Dev(), r.Env("fresh")});
  REQUIRE(r.Hup("rejected"));
  CHECK(Has(r.LastRejection(), "environment \"fresh\""));
  CHECK(Has(r.LastRejection(), "kmsplugin init"));
  CHECK_FALSE(Exists(r.Socket("fresh")));
  CHECK(r.Answers(r.Socket("dev")));
  // With the blocker gone the same file applies.
  std::remove(blocked.c_str());
  r.Write({r.Dev(), r.Env("extra"), r.Env("other")});
  REQUIRE(r.Hup("applied"));
  CHECK(r.Answers(r.Socket("extra")));
  CHECK(r.Answers(r.Socket("other")));
  CHECK(LogLines(*r.server, "config reloaded").back().value("summary", "") == "added: extra, other");
}

TEST_CASE("Reload: a changed socket or Status version restarts that environment's listener", "[reload][integration]") {
  Reload r;
  r.Start();
  const std::string moved = r.dir.File("run/moved/dev.sock");
  std::string env = r.Dev();
  env.replace(env.find(r.Socket("dev")), r.Socket("dev").size(), moved);
  r.dir.Write("config.yaml", r.File({env}));
  REQUIRE(r.Hup("applied"));
  CHECK(r.Answers(moved));
  CHECK_FALSE(Exists(r.Socket("dev")));
  r.dir.Write("config.yaml", r.File({r.Env("dev", "    statusVersion: v2beta1\n")}));
  REQUIRE(r.Hup("applied"));
  CHECK(DaemonDriver::Status(r.Socket("dev")).version() == "v2beta1");
  CHECK(DaemonDriver::Status(r.Socket("dev")).healthz() == "ok");
  CHECK_FALSE(Exists(moved));
}

}  // namespace
}  // namespace kmsplugin::testing
