// The kmsplugin binary driven as an operator drives it: init, serve, status, rotate, keys, signals, and every
// bad file the issue lists. Each case checks the exit code and that the message names the problem and the fix.

#include <signal.h>
#include <sys/stat.h>

#include <algorithm>
#include <sstream>

#include <catch2/catch.hpp>
#include <httplib.h>
#include <nlohmann/json.hpp>

#include "absl/strings/escaping.h"
#include "tests/support/daemon.h"
#include "tests/support/kms_client.h"
#include "tests/support/subprocess.h"
#include "tests/support/temp_dir.h"

namespace kmsplugin::testing {
namespace {

const std::string kBinary = DaemonDriver::Binary();

bool Has(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

struct Setup : DaemonDriver {
  // One local environment; `extra` is appended to the environment entry, `key` picks the root key setting.
  explicit Setup(const std::string& key_setting = "", const std::string& server = "  pollInterval: 1s\n") {
    const std::string key = key_setting.empty() ? "rootKeyFile: " + dir.File("state/dev.rootkey") : key_setting;
    config = dir.Write("config.yaml", "http:\n  listen: 127.0.0.1:0\n"
                                      "server:\n" + server +
                                          "environments:\n"
                                          "  - name: dev\n"
                                          "    socket: " + dir.File("run/dev.sock") + "\n"
                                          "    keySource:\n"
                                          "      local:\n"
                                          "        keyring: " + dir.File("state/dev.keyring") + "\n"
                                          "        " + key + "\n");
    socket = dir.File("run/dev.sock");
    keyring = dir.File("state/dev.keyring");
    root_key = dir.File("state/dev.rootkey");
  }

  bool WaitServing(Subprocess& process) const { return DaemonDriver::WaitServing(process, socket); }
  std::string ServeUnhealthy() const { return DaemonDriver::ServeUnhealthy(socket); }
  std::string StatusKeyId() const { return Status(socket).key_id(); }

  std::string socket, keyring, root_key;
};

TEST_CASE("CLI: init creates a 0600 root key and keyring, and a second init leaves them untouched", "[cli]") {
  Setup s;
  const RunResult first = s.Init();
  INFO(first.err);
  REQUIRE(first.exit_code == 0);
  CHECK(Has(first.out, "created root key"));
  struct stat info {};
  REQUIRE(stat(s.keyring.c_str(), &info) == 0);
  CHECK((info.st_mode & 0777) == 0600);
  REQUIRE(stat(s.root_key.c_str(), &info) == 0);
  CHECK((info.st_mode & 0777) == 0600);
  CHECK(info.st_size == 32);
  const std::string keyring_before = ReadWholeFile(s.keyring);
  const std::string root_before = ReadWholeFile(s.root_key);
  const RunResult second = s.Init();
  CHECK(second.exit_code == 0);
  CHECK(Has(second.out, "left untouched"));
  CHECK(ReadWholeFile(s.keyring) == keyring_before);
  CHECK(ReadWholeFile(s.root_key) == root_before);
}

TEST_CASE("CLI: serve answers Status and both APIs, SIGTERM exits 0 and removes the socket", "[cli]") {
  Setup s;
  REQUIRE(s.Init().exit_code == 0);
  auto server = s.Serve();
  REQUIRE(s.WaitServing(*server));
  const RunResult status = s.Cli({"status", "--socket", s.socket});
  CHECK(status.exit_code == 0);
  CHECK(Has(status.out, "healthz: ok"));
  KmsClient client(s.socket, s.socket);  // authority = socket path, as kube-apiserver < 1.32 sends
  v2::EncryptResponse encrypted;
  REQUIRE(client.Encrypt(std::string(32, 'k'), encrypted).ok());
  v2::DecryptResponse decrypted;
  REQUIRE(client.DecryptResponseOf(encrypted, decrypted).ok());
  CHECK(decrypted.plaintext() == std::string(32, 'k'));
  server->Signal(SIGTERM);
  CHECK(server->Wait(std::chrono::seconds(15)) == std::optional<int>(0));
  struct stat info {};
  CHECK(lstat(s.socket.c_str(), &info) != 0);
  CHECK(Has(server->Stderr(), "SIGTERM"));
}


TEST_CASE("CLI: serve exposes /metrics, /healthz and /readyz and logs JSON lines", "[cli][observe]") {
  Setup s;
  REQUIRE(s.Init().exit_code == 0);
  auto server = s.Serve();
  REQUIRE(s.WaitServing(*server));
  const int port = DaemonDriver::LoggedHttpPort(*server);
  REQUIRE(port > 0);
  KmsClient client(s.socket);
  v2::EncryptResponse encrypted;
  REQUIRE(client.Encrypt(std::string(32, 'm'), encrypted).ok());
  v2::DecryptResponse decrypted;
  CHECK(client.Decrypt("garbage", encrypted.key_id(), {}, decrypted).error_code() ==
        grpc::StatusCode::INVALID_ARGUMENT);
  httplib::Client http("127.0.0.1", port);
  auto metrics = http.Get("/metrics");
  REQUIRE(metrics);
  CHECK(metrics->status == 200);
  const std::string& body = metrics->body;
  CHECK(Has(body, "kmsplugin_key_info{environment=\"dev\",key_source=\"local\",key_id=\"" + encrypted.key_id() +
                      "\"} 1"));
  CHECK(Has(body, "kmsplugin_grpc_requests_total{api=\"v2\",code=\"OK\",environment=\"dev\",rpc=\"Encrypt\"} 1"));
  CHECK(Has(body,
            "kmsplugin_grpc_requests_total{api=\"v2\",code=\"INVALID_ARGUMENT\",environment=\"dev\",rpc=\"Decrypt\"} 1"));
  CHECK(Has(body, "kmsplugin_backend_requests_total{environment=\"dev\",key_source=\"local\",operation=\"wrap\""));
  CHECK(Has(body, "kmsplugin_environment_healthy{environment=\"dev\"} 1"));
  CHECK(Has(body, "kmsplugin_build_info"));
  CHECK(http.Get("/healthz")->status == 200);
  auto ready = http.Get("/readyz");
  REQUIRE(ready);
  CHECK(ready->status == 200);
  CHECK(Has(ready->body, "dev: ok"));
  server->Signal(SIGTERM);
  REQUIRE(server->Wait(std::chrono::seconds(15)) == std::optional<int>(0));
  std::istringstream lines(server->Stderr());
  std::string line;
  int count = 0;
  while (std::getline(lines, line)) {
    INFO(line);
    CHECK(nlohmann::json::accept(line));
    ++count;
  }
  CHECK(count >= 4);
  CHECK(Has(server->Stderr(), "\"code\":\"INVALID_ARGUMENT\""));
}

// Every form a secret could leak in.
std::vector<std::string> Forms(const std::string& secret) {
  return {secret, absl::BytesToHexString(secret), absl::Base64Escape(secret), absl::WebSafeBase64Escape(secret)};
}

TEST_CASE("Secrets: no root key or seed appears in any log line, CLI output, error message or metric",
          "[cli][secrets]") {
  Setup s("", "  pollInterval: 1s\n");
  std::string everything;
  auto keep = [&everything](const RunResult& result) { everything += result.out + result.err; };
  keep(s.Init());
  const std::string root_key = ReadWholeFile(s.root_key);
  REQUIRE(root_key.size() == 32);
  auto server = std::make_unique<Subprocess>(
      std::vector<std::string>{kBinary, "--log-level", "debug", "serve", "--config", s.config}, s.dir.path());
  REQUIRE(s.WaitServing(*server));
  KmsClient client(s.socket);
  std::vector<std::string> seeds;
  for (int i = 0; i < 5; ++i) {
    std::string seed(32, '\0');
    for (char& c : seed) {
      c = static_cast<char>(std::rand());
    }
    seeds.push_back(seed);
    v2::EncryptResponse encrypted;
    REQUIRE(client.Encrypt(seed, encrypted).ok());
    v2::DecryptResponse decrypted;
    REQUIRE(client.DecryptResponseOf(encrypted, decrypted).ok());
    // Failures carry messages: make some, with the seed-bearing ciphertext damaged and with wrong metadata.
    std::string damaged = encrypted.ciphertext();
    damaged.back() = static_cast<char>(damaged.back() ^ 1);
    const grpc::Status bad = client.Decrypt(damaged, encrypted.key_id(), {{"format.kmsplugin.io", "1"}}, decrypted);
    everything += bad.error_message();
    everything += client.Decrypt(encrypted.ciphertext(), "wrong", {}, decrypted).error_message();
    v2::EncryptResponse too_long;
    everything += client.Encrypt(seed + seed + seed + seed + seed, too_long).error_message();
  }
  keep(s.Cli({"rotate", "--config", s.config, "--env", "dev"}));
  server->Signal(SIGHUP);
  // Retire, its refusal without etcd, and reinstate: their messages and audit events are searched too.
  keep(s.Cli({"retire", "--config", s.config, "--env", "dev", "--version", "1"}));
  const RunResult retired =
      s.Cli({"retire", "--config", s.config, "--env", "dev", "--version", "1", "--force", "--allow-recent"});
  CHECK(retired.exit_code == 0);
  keep(retired);
  keep(s.Cli({"retire", "--config", s.config, "--env", "dev", "--version", "1", "--reinstate"}));
  keep(s.Cli({"render", "--config", s.config, "--kind", "static-pod"}));
  keep(s.Cli({"keys", "--config", s.config, "--env", "dev", "--json"}));
  keep(s.Cli({"status", "--socket", s.socket, "--json"}));
  const int port = DaemonDriver::LoggedHttpPort(*server);
  REQUIRE(port > 0);
  httplib::Client http("127.0.0.1", port);
  auto metrics = http.Get("/metrics");
  REQUIRE(metrics);
  everything += metrics->body;
  everything += http.Get("/readyz")->body;
  server->Signal(SIGTERM);
  REQUIRE(server->Wait(std::chrono::seconds(15)) == std::optional<int>(0));
  everything += server->Stdout() + server->Stderr();
  everything += ReadWholeFile(s.keyring);  // sealed: the keyring file itself must not hold the root key either
  REQUIRE(everything.size() > 2000);       // the search covers a real amount of output
  for (const std::string& form : Forms(root_key)) {
    CHECK(everything.find(form) == std::string::npos);
  }
  for (const std::string& seed : seeds) {
    for (const std::string& form : Forms(seed)) {
      CHECK(everything.find(form) == std::string::npos);
    }
  }
}

TEST_CASE("CLI: SIGINT also drains and exits 0", "[cli]") {
  Setup s;
  REQUIRE(s.Init().exit_code == 0);
  auto server = s.Serve();
  REQUIRE(s.WaitServing(*server));
  server->Signal(SIGINT);
  CHECK(server->Wait(std::chrono::seconds(15)) == std::optional<int>(0));
}

TEST_CASE("CLI: rotate while serving is picked up at once on SIGHUP, old ciphertexts keep decrypting", "[cli]") {
  Setup s("", "  pollInterval: 1h\n");
  REQUIRE(s.Init().exit_code == 0);
  auto server = s.Serve();
  REQUIRE(s.WaitServing(*server));
  const std::string before = s.StatusKeyId();
  KmsClient client(s.socket);
  v2::EncryptResponse old_ciphertext;
  REQUIRE(client.Encrypt(std::string(32, 'o'), old_ciphertext).ok());
  const RunResult rotate = s.Cli({"rotate", "--config", s.config, "--env", "dev"});
  INFO(rotate.err);
  REQUIRE(rotate.exit_code == 0);
  CHECK(s.StatusKeyId() == before);  // an hour's poll interval: nothing yet
  server->Signal(SIGHUP);
  std::string after = before;
  for (int i = 0; i < 100 && after == before; ++i) {
    absl::SleepFor(absl::Milliseconds(20));
    after = s.StatusKeyId();
  }
  CHECK(after != before);
  CHECK(Has(rotate.out, after));
  v2::EncryptResponse fresh;
  REQUIRE(client.Encrypt(std::string(32, 'n'), fresh).ok());
  CHECK(fresh.key_id() == after);
  v2::DecryptResponse decrypted;
  REQUIRE(client.DecryptResponseOf(old_ciphertext, decrypted).ok());
  CHECK(decrypted.plaintext() == std::string(32, 'o'));
  CHECK(server->Running());
}

TEST_CASE("CLI: retire on a serving daemon takes effect on SIGHUP and reinstate undoes it", "[cli][retire]") {
  Setup s("", "  pollInterval: 1h\n");
  REQUIRE(s.Init().exit_code == 0);
  auto server = s.Serve();
  REQUIRE(s.WaitServing(*server));
  KmsClient client(s.socket);
  v2::EncryptResponse old_ciphertext;
  REQUIRE(client.Encrypt(std::string(32, 'o'), old_ciphertext).ok());
  const std::string before = s.StatusKeyId();
  REQUIRE(s.Cli({"rotate", "--config", s.config, "--env", "dev"}).exit_code == 0);
  REQUIRE(DaemonDriver::KeyIdAfterHup(*server, s.socket, before) != before);

  // Waits for the daemon's log to hold `text` `count` times (it applies a SIGHUP on its maintenance thread).
  auto logged = [&server](const std::string& text, int count) {
    for (int i = 0; i < 200; ++i) {
      const std::string log = server->Stderr();
      int seen = 0;
      for (size_t at = log.find(text); at != std::string::npos; at = log.find(text, at + 1)) {
        ++seen;
      }
      if (seen >= count) {
        return true;
      }
      absl::SleepFor(absl::Milliseconds(20));
    }
    return false;
  };
  const RunResult retired =
      s.Cli({"retire", "--config", s.config, "--env", "dev", "--version", "1", "--force", "--allow-recent"});
  INFO(retired.out << retired.err);
  REQUIRE(retired.exit_code == 0);
  v2::DecryptResponse decrypted;
  REQUIRE(client.DecryptResponseOf(old_ciphertext, decrypted).ok());  // an hour's poll interval: not yet
  server->Signal(SIGHUP);
  REQUIRE(logged("\"retired\":[1]", 1));
  const grpc::Status refused = client.DecryptResponseOf(old_ciphertext, decrypted);
  CHECK(refused.error_code() == grpc::StatusCode::FAILED_PRECONDITION);
  CHECK(Has(refused.error_message(), "retired"));
  v2::EncryptResponse fresh;
  REQUIRE(client.Encrypt(std::string(32, 'n'), fresh).ok());  // the current version is untouched

  REQUIRE(s.Cli({"retire", "--config", s.config, "--env", "dev", "--version", "1", "--reinstate"}).exit_code == 0);
  server->Signal(SIGHUP);
  REQUIRE(logged("\"retired_before\":[1]", 1));
  REQUIRE(client.DecryptResponseOf(old_ciphertext, decrypted).ok());
  CHECK(decrypted.plaintext() == std::string(32, 'o'));
  CHECK(server->Running());
}

TEST_CASE("CLI: a rotation is picked up within the poll interval without a signal", "[cli]") {
  Setup s;  // pollInterval: 1s
  REQUIRE(s.Init().exit_code == 0);
  auto server = s.Serve();
  REQUIRE(s.WaitServing(*server));
  const std::string before = s.StatusKeyId();
  REQUIRE(s.Cli({"rotate", "--config", s.config, "--env", "dev"}).exit_code == 0);
  const absl::Time rotated = absl::Now();
  std::string after = before;
  while (after == before && absl::Now() - rotated < absl::Seconds(5)) {
    absl::SleepFor(absl::Milliseconds(50));
    after = s.StatusKeyId();
  }
  CHECK(after != before);
  CHECK(absl::Now() - rotated < absl::Seconds(3));
}

TEST_CASE("CLI: keys lists versions with creation time and the current one, as a table and as JSON", "[cli]") {
  Setup s;
  REQUIRE(s.Init().exit_code == 0);
  REQUIRE(s.Cli({"rotate", "--config", s.config, "--env", "dev"}).exit_code == 0);
  const RunResult table = s.Cli({"keys", "--config", s.config, "--env", "dev"});
  CHECK(table.exit_code == 0);
  CHECK(Has(table.out, "current"));
  CHECK(Has(table.out, "active"));
  const RunResult json = s.Cli({"keys", "--config", s.config, "--env", "dev", "--json"});
  REQUIRE(json.exit_code == 0);
  const auto doc = nlohmann::json::parse(json.out);
  REQUIRE(doc["versions"].size() == 2);
  CHECK(doc["versions"][1]["state"] == "current");
  CHECK(doc["versions"][0]["state"] == "active");
  CHECK(doc["versions"][0]["keyId"] != doc["versions"][1]["keyId"]);
  CHECK(doc["versions"][0]["created"].get<std::string>().size() == 25);
}

TEST_CASE("CLI: a second serve on a socket that is being served fails and leaves the first running", "[cli][bad-input]") {
  Setup s;
  REQUIRE(s.Init().exit_code == 0);
  auto first = s.Serve();
  REQUIRE(s.WaitServing(*first));
  const RunResult second = s.Cli({"serve", "--config", s.config});
  CHECK(second.exit_code != 0);
  CHECK(Has(second.err, "already serving"));
  CHECK(first->Running());
  CHECK(s.Cli({"status", "--socket", s.socket}).exit_code == 0);
}

TEST_CASE("CLI: serve refuses a keyring readable by group or others, naming the file and the fix", "[cli][bad-input]") {
  Setup s;
  REQUIRE(s.Init().exit_code == 0);
  for (mode_t mode : {0644, 0640, 0604}) {
    chmod(s.keyring.c_str(), mode);
    const std::string why = s.ServeUnhealthy();
    CHECK(Has(why, s.keyring));
    CHECK(Has(why, "chmod 600"));
    // The command line refuses too, with exit 1.
    const RunResult keys = s.Cli({"keys", "--config", s.config, "--env", "dev"});
    CHECK(keys.exit_code == 1);
    CHECK(Has(keys.err, "chmod 600"));
  }
}

TEST_CASE("CLI: serve refuses a world-readable root key file", "[cli][bad-input]") {
  Setup s;
  REQUIRE(s.Init().exit_code == 0);
  chmod(s.root_key.c_str(), 0644);
  const std::string why = s.ServeUnhealthy();
  CHECK(Has(why, s.root_key));
  CHECK(Has(why, "chmod 600"));
}

TEST_CASE("CLI: a missing keyring says to restore a backup, or to run init", "[cli][bad-input]") {
  Setup s;
  const std::string why = s.ServeUnhealthy();
  CHECK(Has(why, "restore it from a backup"));
  CHECK(Has(why, "kmsplugin init"));
}

TEST_CASE("CLI: a missing root key file is refused with its path", "[cli][bad-input]") {
  Setup s;
  REQUIRE(s.Init().exit_code == 0);
  std::remove(s.root_key.c_str());
  CHECK(Has(s.ServeUnhealthy(), s.root_key));
}

TEST_CASE("CLI: corrupt and truncated keyrings are refused with a clear message", "[cli][bad-input]") {
  Setup s;
  REQUIRE(s.Init().exit_code == 0);
  const std::string good = ReadWholeFile(s.keyring);
  for (const std::string& bad : {good.substr(0, good.size() / 2), std::string(), std::string("{}"),
                                 std::string(good).replace(good.find("current"), 7, "retired")}) {
    s.dir.Write("state/dev.keyring", bad);
    const std::string why = s.ServeUnhealthy();
    INFO(why);
    CHECK(Has(why, s.keyring));
    CHECK((Has(why, "corrupt") || Has(why, "integrity")));
  }
}

TEST_CASE("CLI: a root key of the wrong size or another root key is refused", "[cli][bad-input]") {
  Setup s;
  REQUIRE(s.Init().exit_code == 0);
  s.dir.Write("state/dev.rootkey", std::string(31, 'r'));
  CHECK(Has(s.ServeUnhealthy(), "exactly 32"));
  s.dir.Write("state/dev.rootkey", std::string(32, 'r'));
  CHECK(Has(s.ServeUnhealthy(), "wrong passphrase or root key"));
}

TEST_CASE("CLI: passphrase keyrings open with the right passphrase and refuse a wrong one", "[cli][bad-input]") {
  TempDir tmp;
  Setup s("passphraseFile: " + std::string("PASSFILE"));
  const std::string pass = s.dir.Write("pass", "correct horse battery staple\n");
  std::string config = ReadWholeFile(s.config);
  config.replace(config.find("PASSFILE"), 8, pass);
  s.dir.Write("config.yaml", config);
  REQUIRE(s.Init().exit_code == 0);
  REQUIRE(s.Cli({"keys", "--config", s.config, "--env", "dev"}).exit_code == 0);
  s.dir.Write("pass", "wrong horse battery staple\n");
  const std::string why = s.ServeUnhealthy();
  CHECK(Has(why, "wrong passphrase"));
  CHECK(!Has(why, "wrong horse"));  // never echo the secret
  const RunResult keys = s.Cli({"keys", "--config", s.config, "--env", "dev"});
  CHECK(keys.exit_code == 1);
  CHECK(Has(keys.err, "wrong passphrase"));
  CHECK(!Has(keys.err, "wrong horse"));
}

TEST_CASE("CLI: config errors name the file, the field and the fix", "[cli][bad-input]") {
  Setup s;
  const std::string bad = s.dir.Write("bad.yaml",
                                      "environments:\n  - name: Dev\n    socket: relative.sock\n    keySource: {local: {}}\n");
  RunResult result = s.Cli({"serve", "--config", bad});
  CHECK(result.exit_code != 0);
  CHECK(Has(result.err, bad));
  CHECK(Has(result.err, "environments[0].name"));
  CHECK(Has(result.err, "fix:"));
  chmod(s.config.c_str(), 0666);
  result = s.Cli({"serve", "--config", s.config});
  CHECK(result.exit_code != 0);
  CHECK(Has(result.err, "chmod go-w"));
  chmod(s.config.c_str(), 0600);
  const std::string bad_http = s.dir.Write("http.yaml", "http:\n  listen: nowhere\n" + ReadWholeFile(s.config).substr(
                                                            ReadWholeFile(s.config).find("server:")));
  result = s.Cli({"serve", "--config", bad_http});
  CHECK(result.exit_code != 0);
  CHECK(Has(result.err, "http.listen"));
  result = s.Cli({"serve", "--config", s.dir.File("missing.yaml")});
  CHECK(result.exit_code != 0);
  CHECK(Has(result.err, "missing.yaml"));
}

TEST_CASE("CLI: rotate and keys refuse an unknown environment, listing the ones there are", "[cli][bad-input]") {
  Setup s;
  REQUIRE(s.Init().exit_code == 0);
  const RunResult result = s.Cli({"rotate", "--config", s.config, "--env", "prod"});
  CHECK(result.exit_code != 0);
  CHECK(Has(result.err, "no environment named \"prod\""));
  CHECK(Has(result.err, "dev"));
}

TEST_CASE("CLI: status on a socket nothing serves fails clearly with exit code 3", "[cli][bad-input]") {
  Setup s;
  const RunResult result = s.Cli({"status", "--socket", s.dir.File("none.sock"), "--timeout", "0.5"});
  CHECK(result.exit_code == 3);
  CHECK(Has(result.err, "none.sock"));
}

TEST_CASE("CLI: --help works for every subcommand, version prints the version", "[cli]") {
  Setup s;
  for (const std::string& sub :
       {"serve", "init", "rotate", "keys", "status", "version", "retire", "render", "audit", "doctor"}) {
    const RunResult result = s.Cli({sub, "--help"});
    INFO(sub);
    CHECK(result.exit_code == 0);
    CHECK(Has(result.out, "Usage"));
  }
  CHECK(s.Cli({"--help"}).exit_code == 0);
  const RunResult version = s.Cli({"version"});
  CHECK(version.exit_code == 0);
  CHECK(Has(version.out, "kmsplugin 0."));
  CHECK(s.Cli({"no-such-command"}).exit_code != 0);
}

// The README's exit-code table (core/exit_codes.h), true for every subcommand: 0 ok, 1 a check failed or unhealthy,
// 2 a usage or config error with one line naming the flag or field, 3 a socket or backend that cannot be reached.
TEST_CASE("CLI grammar: every usage error exits 2 with one line naming the flag", "[cli][bad-input]") {
  Setup s;
  REQUIRE(s.Init().exit_code == 0);
  struct Case {
    std::vector<std::string> args;
    std::string names;  // what the one line must name
  };
  const std::vector<Case> cases = {
      {{"serve", "--bogus"}, "--bogus"},
      {{"status"}, "--socket"},
      {{"status", "--socket", s.socket, "--timeout", "abc"}, "--timeout \"abc\""},
      {{"status", "--socket", s.socket, "--timeout", "-1s"}, "--timeout"},
      {{"keys", "--config", s.config}, "--env"},
      {{"rotate", "--config", s.config, "--env"}, "--env"},
      {{"retire", "--config", s.config, "--env", "dev"}, "--version"},
      {{"retire", "--config", s.config, "--env", "dev", "--version", "x"}, "--version"},
      {{"audit", "--timeout", "soon"}, "--timeout \"soon\""},
      {{"doctor", "--timeout", "soon", "--encryption-config", s.config}, "--timeout"},
      {{"render", "--config", s.config, "--kind", "helm"}, "--kind"},
      {{"render", "--config", s.config, "--kind", "encryption-config"}, "--env"},
      {{"--log-level", "verbose", "version"}, "--log-level"},
      {{"version", "--log-level", "verbose"}, "--log-level"},
      {{"--log-format", "yaml", "version"}, "--log-format"},
      {{"version", "--log-format", "yaml"}, "--log-format"},
      {{"no-such-command"}, "no-such-command"},
      // What the caller typed is echoed without its control characters (no escape sequence reaches a terminal).
      {{"--log-level", "debug\x1b[31m", "version"}, "debug\\x1b[31m"},
      {{"keys", "--config", s.config, "--env", "a\nb\x1b"}, "a\\x0ab\\x1b"},
      {{"keys", "--config", s.config, "--env", "prod"}, "no environment named \"prod\""},
      {{"keys", "--config", s.dir.File("missing.yaml"), "--env", "dev"}, "missing.yaml"},
      {{"init", "--config", s.dir.File("missing.yaml")}, "missing.yaml"},
      {{"serve", "--config", s.dir.File("missing.yaml")}, "missing.yaml"},
      {{"render", "--config", s.dir.File("missing.yaml"), "--kind", "systemd-unit"}, "missing.yaml"},
  };
  for (const Case& c : cases) {
    const RunResult result = s.Cli(c.args);
    std::string joined;
    for (const std::string& arg : c.args) {
      joined += arg + " ";
    }
    INFO(joined << "-> exit " << result.exit_code << ", stderr: " << result.err);
    CHECK(result.exit_code == 2);
    CHECK(Has(result.err, c.names));
    CHECK(result.err.rfind("kmsplugin", 0) == 0);  // starts with the program's name
    // One line (a config error may carry its own "fix:"; nothing else follows it).
    CHECK(std::count(result.err.begin(), result.err.end(), '\n') == 1);
  }
}

TEST_CASE("CLI grammar: global flags anywhere, durations in one form, old spellings kept", "[cli]") {
  Setup s;
  REQUIRE(s.Init().exit_code == 0);
  CHECK(s.Cli({"--log-level", "error", "keys", "--config", s.config, "--env", "dev"}).exit_code == 0);
  CHECK(s.Cli({"keys", "--config", s.config, "--env", "dev", "--log-level", "warn"}).exit_code == 0);
  CHECK(s.Cli({"keys", "--config", s.config, "--env", "dev", "--log-level", "warning"}).exit_code == 0);
  auto server = s.Serve();
  REQUIRE(s.WaitServing(*server));
  for (const std::string& timeout : {"3s", "500ms", "2", "1m30s"}) {
    INFO(timeout);
    CHECK(s.Cli({"status", "--socket", s.socket, "--timeout", timeout}).exit_code == 0);
  }
  // --endpoints on keys and retire, as on audit; --etcd still works but is not shown.
  const RunResult help = s.Cli({"keys", "--help"});
  CHECK(Has(help.out, "--endpoints"));
  CHECK(!Has(help.out, "--etcd"));
  server->Signal(SIGTERM);
  CHECK(server->Wait() == std::optional<int>(0));
}

TEST_CASE("CLI grammar: an unreachable socket or etcd exits 3, an unhealthy service 1", "[cli][bad-input]") {
  Setup s;
  REQUIRE(s.Init().exit_code == 0);
  const RunResult status = s.Cli({"status", "--socket", s.dir.File("none.sock"), "--timeout", "500ms"});
  CHECK(status.exit_code == 3);
  // Nothing listens on port 1 of loopback: etcd cannot be reached.
  const RunResult audit = s.Cli({"audit", "--endpoints", "127.0.0.1:1", "--timeout", "1s"});
  INFO(audit.err);
  CHECK(audit.exit_code == 3);
  CHECK(Has(audit.err, "cannot reach etcd"));
  const RunResult keys = s.Cli({"keys", "--config", s.config, "--env", "dev", "--endpoints", "127.0.0.1:1"});
  INFO(keys.err);
  CHECK(keys.exit_code == 3);
  const RunResult old_spelling = s.Cli({"keys", "--config", s.config, "--env", "dev", "--etcd", "127.0.0.1:1"});
  CHECK(old_spelling.exit_code == 3);
  // A served environment whose key source cannot open answers Status unhealthy: exit 1, not 3.
  chmod(s.keyring.c_str(), 0644);
  auto server = s.Serve();
  REQUIRE(s.WaitServing(*server));
  CHECK(s.Cli({"status", "--socket", s.socket}).exit_code == 1);
  server->Signal(SIGTERM);
  CHECK(server->Wait() == std::optional<int>(0));
}

TEST_CASE("CLI: render warns that Kubernetes auth cannot start a static-pod control plane, and still renders",
          "[cli]") {
  Setup s;
  const std::string config = s.dir.Write(
      "vault.yaml",
      "environments:\n  - name: prod\n    socket: /run/kmsplugin/prod.sock\n    keySource:\n      vault:\n"
      "        address: https://vault.example:8200\n        keyName: k\n        auth:\n          jwt:\n"
      "            role: kms\n            tokenFile: /var/run/secrets/kubernetes.io/serviceaccount/token\n");
  const RunResult pod = s.Cli({"render", "--config", config, "--kind", "static-pod"});
  CHECK(pod.exit_code == 0);
  CHECK(Has(pod.out, "kind: Pod"));
  CHECK(Has(pod.err, "kmsplugin: warning: environment \"prod\""));
  CHECK(Has(pod.err, "a static pod gets no projected token"));
  CHECK(Has(pod.err, "fix: use auth.cert"));
  // The local setup has nothing to warn about.
  CHECK(s.Cli({"render", "--config", s.config, "--kind", "static-pod"}).err.empty());
}

}  // namespace
}  // namespace kmsplugin::testing
