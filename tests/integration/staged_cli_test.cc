// `kmsplugin rotate --stage` / `--promote` and the key-set fingerprint of `kmsplugin keys`, through the real binary:
// the normal path on a serving daemon, and every error path with its exit code (core/exit_codes.h) and message.

#include <signal.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>
#include <regex>

#include "absl/time/clock.h"
#include "tests/support/daemon.h"
#include "tests/support/kms_client.h"
#include "tests/support/subprocess.h"
#include "tests/support/temp_dir.h"

namespace kmsplugin::testing {
namespace {

bool Has(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

struct Setup : DaemonDriver {
  Setup() {
    socket = dir.File("run/dev.sock");
    keyring = dir.File("state/dev.keyring");
    config = dir.Write("config.yaml",
                       "http:\n  listen: 127.0.0.1:0\nserver:\n  pollInterval: 1h\n"
                       "environments:\n  - name: dev\n    socket: " +
                           socket + "\n    keySource:\n      local:\n        keyring: " + keyring +
                           "\n        rootKeyFile: " + dir.File("state/dev.rootkey") +
                           "\n"
                           "  - name: vlt\n    socket: " +
                           dir.File("run/vlt.sock") +
                           "\n    keySource:\n      vault:\n        addresses: [http://127.0.0.1:1]\n"
                           "        keyName: kms\n        requestTimeout: 1s\n"
                           "        retryMinWait: 10ms\n        retryMaxWait: 50ms\n"
                           "        auth:\n          token: {file: " +
                           dir.Write("vault.token", "hvs.CLI-token-0000\n") + "}\n");
  }
  RunResult Rotate(std::vector<std::string> extra) const {
    std::vector<std::string> args = {"rotate", "--config", config, "--env", "dev"};
    args.insert(args.end(), extra.begin(), extra.end());
    return Cli(args);
  }
  nlohmann::json KeysJson() const {
    const RunResult keys = Cli({"keys", "--config", config, "--env", "dev", "--json"});
    INFO(keys.err);
    REQUIRE(keys.exit_code == 0);
    return nlohmann::json::parse(keys.out);
  }
  std::string socket, keyring;
};

std::string StateOf(const nlohmann::json& keys, int version) {
  for (const auto& v : keys["versions"]) {
    if (v["version"].get<int>() == version) {
      return v["state"].get<std::string>();
    }
  }
  return "";
}

TEST_CASE("CLI staged: --stage lists a staged version Status never reports, --promote makes it current",
          "[cli][staged]") {
  Setup s;
  REQUIRE(s.Cli({"init", "--config", s.config, "--env", "dev"}).exit_code == 0);
  auto server = s.Serve();
  REQUIRE(s.WaitServing(*server, s.socket));
  const std::string v1_key_id = s.Status(s.socket).key_id();
  const std::string print1 = s.KeysJson()["fingerprint"].get<std::string>();
  CHECK(std::regex_match(print1, std::regex("ks1-[0-9a-f]{16}")));

  const RunResult staged = s.Rotate({"--stage"});
  INFO(staged.out << staged.err);
  REQUIRE(staged.exit_code == 0);
  CHECK(Has(staged.out, "staged version 2"));
  CHECK(Has(staged.out, "version 1 stays current"));
  const nlohmann::json after_stage = s.KeysJson();
  CHECK(StateOf(after_stage, 1) == "current");
  CHECK(StateOf(after_stage, 2) == "staged");
  const std::string print2 = after_stage["fingerprint"].get<std::string>();
  CHECK(print2 != print1);
  CHECK(Has(staged.out, "key set fingerprint: " + print2));
  // The table shows the state and the fingerprint too.
  const RunResult table = s.Cli({"keys", "--config", s.config, "--env", "dev"});
  CHECK(table.exit_code == 0);
  CHECK(std::regex_search(table.out, std::regex("\\n2 +staged ")));
  CHECK(Has(table.out, "key set fingerprint: " + print2));

  // The daemon loads the staged version and keeps reporting (and encrypting under) version 1.
  server->Signal(SIGHUP);
  const std::string metric_line = "kmsplugin_key_set_info{environment=\"dev\",fingerprint=\"" + print2 + "\"} 1";
  const int port = DaemonDriver::LoggedHttpPort(*server);
  bool exported = false;
  for (int i = 0; i < 100 && !exported; ++i) {
    absl::SleepFor(absl::Milliseconds(20));
    exported = Has(DaemonDriver::HttpGet(port, "/metrics"), metric_line);
  }
  CHECK(exported);
  CHECK(Has(DaemonDriver::HttpGet(port, "/metrics"), "kmsplugin_key_versions{environment=\"dev\",state=\"staged\"} 1"));
  CHECK(s.Status(s.socket).key_id() == v1_key_id);
  KmsClient client(s.socket);
  v2::EncryptResponse encrypted;
  REQUIRE(client.Encrypt(std::string(32, 'x'), encrypted).ok());
  CHECK(encrypted.key_id() == v1_key_id);

  const RunResult promoted = s.Rotate({"--promote"});
  INFO(promoted.out << promoted.err);
  REQUIRE(promoted.exit_code == 0);
  CHECK(Has(promoted.out, "promoted version 2"));
  const nlohmann::json after_promote = s.KeysJson();
  CHECK(StateOf(after_promote, 1) == "active");
  CHECK(StateOf(after_promote, 2) == "current");
  const std::string v2_key_id = DaemonDriver::KeyIdAfterHup(*server, s.socket, v1_key_id);
  CHECK(v2_key_id != v1_key_id);
  CHECK(Has(promoted.out, v2_key_id));
  v2::DecryptResponse decrypted;
  REQUIRE(client.DecryptResponseOf(encrypted, decrypted).ok());
  server->Signal(SIGTERM);
  CHECK(server->Wait() == std::optional<int>(0));
}

TEST_CASE("CLI staged: error paths exit 1 or 2 with one line naming the problem and the fix",
          "[cli][staged][bad-input]") {
  Setup s;
  REQUIRE(s.Cli({"init", "--config", s.config, "--env", "dev"}).exit_code == 0);
  auto one_line = [](const RunResult& r) { return std::count(r.err.begin(), r.err.end(), '\n') == 1; };

  // Usage errors: 2.
  const RunResult both = s.Rotate({"--stage", "--promote"});
  INFO(both.err);
  CHECK(both.exit_code == 2);
  CHECK(Has(both.err, "--promote"));
  CHECK(Has(both.err, "--stage"));
  CHECK(one_line(both));
  const RunResult env = s.Cli({"rotate", "--config", s.config, "--env", "prod", "--stage"});
  CHECK(env.exit_code == 2);
  CHECK(Has(env.err, "no environment named \"prod\""));
  const RunResult value = s.Rotate({"--stage=maybe"});
  CHECK(value.exit_code == 2);
  CHECK(one_line(value));

  // Refusals: 1, and nothing changed.
  const std::string before = ReadWholeFile(s.keyring);
  const RunResult nothing = s.Rotate({"--promote"});
  INFO(nothing.err);
  CHECK(nothing.exit_code == 1);
  CHECK(Has(nothing.err, "no key version is staged"));
  CHECK(Has(nothing.err, "rotate --stage"));
  CHECK(one_line(nothing));
  CHECK(ReadWholeFile(s.keyring) == before);

  REQUIRE(s.Rotate({"--stage"}).exit_code == 0);
  const std::string staged = ReadWholeFile(s.keyring);
  const RunResult plain = s.Rotate({});
  INFO(plain.err);
  CHECK(plain.exit_code == 1);
  CHECK(Has(plain.err, "key version 2 is staged"));
  CHECK(Has(plain.err, "--promote"));
  CHECK(one_line(plain));
  CHECK(ReadWholeFile(s.keyring) == staged);
  const RunResult retire = s.Cli({"retire", "--config", s.config, "--env", "dev", "--version", "2", "--force"});
  CHECK(retire.exit_code == 1);
  CHECK(ReadWholeFile(s.keyring) == staged);
}

TEST_CASE("CLI staged: a Vault environment refuses --stage and --promote with the reason, exit 1",
          "[cli][staged][bad-input]") {
  Setup s;  // Vault is not even reachable: the refusal does not depend on it
  for (const std::string flag : {"--stage", "--promote"}) {
    const RunResult result = s.Cli({"rotate", "--config", s.config, "--env", "vlt", flag});
    INFO(flag << ": " << result.err);
    CHECK(result.exit_code == 1);
    CHECK(Has(result.err, "kmsplugin: a vault key source cannot stage a key version"));
    CHECK(Has(result.err, "use plain `kmsplugin rotate`"));
  }
}

}  // namespace
}  // namespace kmsplugin::testing
