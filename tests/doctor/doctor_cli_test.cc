// `kmsplugin doctor` driven as an operator drives it: against `kmsplugin serve` on a local keyring, on the
// EncryptionConfiguration `kmsplugin render` prints; then with the daemon stopped; then with identity first; and
// the usage errors (exit 2, one line on stderr).

#include <signal.h>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "tests/support/daemon.h"
#include "tests/support/subprocess.h"
#include "tests/support/temp_dir.h"

namespace kmsplugin::testing {
namespace {

bool Has(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

struct DoctorSetup : DaemonDriver {
  DoctorSetup() {
    socket = dir.File("run/dev.sock");
    config = dir.Write("config.yaml", "http:\n  enabled: false\n"
                                      "server:\n  pollInterval: 1s\n"
                                      "environments:\n"
                                      "  - name: dev\n"
                                      "    socket: " + socket + "\n"
                                      "    keySource:\n"
                                      "      local:\n"
                                      "        keyring: " + dir.File("state/dev.keyring") + "\n"
                                      "        rootKeyFile: " + dir.File("state/dev.rootkey") + "\n");
  }

  // `kmsplugin render --env dev` written to a 0600 file; its path.
  std::string RenderedFile() const {
    const RunResult rendered = Cli({"render", "--config", config, "--env", "dev"});
    INFO(rendered.err);
    REQUIRE(rendered.exit_code == 0);
    return dir.Write("encryption-config.yaml", rendered.out, 0600);
  }

  RunResult Doctor(const std::string& file, std::vector<std::string> extra = {}) const {
    std::vector<std::string> args = {"doctor", "--encryption-config", file, "--config", config, "--timeout", "2s"};
    args.insert(args.end(), extra.begin(), extra.end());
    return Cli(args);
  }

  // id -> verdict from `doctor --json`.
  static std::map<std::string, std::string> Verdicts(const RunResult& run) {
    INFO(run.out << run.err);
    REQUIRE(nlohmann::json::accept(run.out));
    std::map<std::string, std::string> out;
    const nlohmann::json doc = nlohmann::json::parse(run.out);
    for (const auto& check : doc["checks"]) {
      out[check["id"].get<std::string>()] = check["verdict"].get<std::string>();
    }
    return out;
  }

  std::string socket;
};

TEST_CASE("CLI doctor: the rendered EncryptionConfiguration against a serving plugin passes every check",
          "[doctor][integration]") {
  DoctorSetup s;
  REQUIRE(s.Init().exit_code == 0);
  auto server = s.Serve();
  REQUIRE(DaemonDriver::WaitServing(*server, s.socket));
  const std::string file = s.RenderedFile();

  const RunResult table = s.Doctor(file);
  INFO(table.out << table.err);
  CHECK(table.exit_code == 0);
  CHECK(Has(table.out, "CHECK"));
  CHECK(Has(table.out, "kms.endpoint[kmsplugin-dev]"));
  CHECK(Has(table.out, "verdict: PASS"));
  CHECK_FALSE(Has(table.out, "FAIL "));
  CHECK(table.err.empty());

  const RunResult json = s.Doctor(file, {"--json"});
  CHECK(json.exit_code == 0);
  const auto verdicts = DoctorSetup::Verdicts(json);
  CHECK(verdicts.size() >= 10);
  for (const auto& [id, verdict] : verdicts) {
    INFO(id);
    CHECK(verdict == "PASS");
  }
  CHECK(verdicts.count("kmsplugin.secrets-environment") == 1);
  CHECK(nlohmann::json::parse(json.out)["verdict"] == "PASS");
  server->Signal(SIGTERM);
  CHECK(server->Wait(std::chrono::seconds(15)) == std::optional<int>(0));
}

TEST_CASE("CLI doctor: with the daemon stopped the endpoint check fails naming the socket, exit 1",
          "[doctor][integration]") {
  DoctorSetup s;
  REQUIRE(s.Init().exit_code == 0);
  auto server = s.Serve();
  REQUIRE(DaemonDriver::WaitServing(*server, s.socket));
  const std::string file = s.RenderedFile();
  server->Signal(SIGTERM);
  REQUIRE(server->Wait(std::chrono::seconds(15)) == std::optional<int>(0));

  const RunResult run = s.Doctor(file, {"--json"});
  INFO(run.out << run.err);
  CHECK(run.exit_code == 1);
  const auto doc = nlohmann::json::parse(run.out);
  CHECK(doc["verdict"] == "FAIL");
  bool seen = false;
  for (const auto& check : doc["checks"]) {
    if (check["id"] == "kms.endpoint[kmsplugin-dev]") {
      seen = true;
      CHECK(check["verdict"] == "FAIL");
      CHECK(Has(check["found"].get<std::string>(), "Status on " + s.socket + " failed"));
      CHECK(Has(check["fix"].get<std::string>(), "kmsplugin status --socket " + s.socket));
    } else {
      INFO(check.dump());
      CHECK(check["verdict"] == "PASS");
    }
  }
  CHECK(seen);
  const RunResult table = s.Doctor(file);
  CHECK(table.exit_code == 1);
  CHECK(Has(table.out, "verdict: FAIL (1 FAIL"));
}

TEST_CASE("CLI doctor: identity as Secrets' first provider fails, exit 1", "[doctor][integration]") {
  DoctorSetup s;
  REQUIRE(s.Init().exit_code == 0);
  auto server = s.Serve();
  REQUIRE(DaemonDriver::WaitServing(*server, s.socket));
  const std::string file = s.dir.Write("identity-first.yaml",
                                       "apiVersion: apiserver.config.k8s.io/v1\n"
                                       "kind: EncryptionConfiguration\n"
                                       "resources:\n"
                                       "  - resources: [secrets]\n"
                                       "    providers:\n"
                                       "      - identity: {}\n"
                                       "      - kms: {apiVersion: v2, name: kmsplugin-dev, endpoint: unix://" +
                                           s.socket + ", timeout: 3s}\n",
                                       0600);
  const RunResult run = s.Doctor(file, {"--json"});
  INFO(run.out << run.err);
  CHECK(run.exit_code == 1);
  const auto verdicts = DoctorSetup::Verdicts(run);
  CHECK(verdicts.at("secrets.write-provider") == "FAIL");
  CHECK(verdicts.at("kmsplugin.secrets-environment") == "FAIL");
  CHECK(verdicts.at("kms.endpoint[kmsplugin-dev]") == "PASS");
  server->Signal(SIGTERM);
  CHECK(server->Wait(std::chrono::seconds(15)) == std::optional<int>(0));
}

TEST_CASE("CLI doctor: usage errors and unreadable or unparsable files exit 2 with one line on stderr",
          "[doctor][integration]") {
  DoctorSetup s;
  const std::string good = s.dir.Write("enc.yaml", "apiVersion: apiserver.config.k8s.io/v1\n", 0600);
  const std::string broken = s.dir.Write("broken.yaml", "resources: [\n", 0600);
  const std::string empty = s.dir.Write("empty.yaml", "", 0600);
  const std::string unreadable = s.dir.Write("unreadable.yaml", "kind: x\n", 0000);
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"doctor"}, "--encryption-config FILE is required"},
      {{"doctor", "--encryption-config", s.dir.File("missing.yaml")}, "missing.yaml: cannot read"},
      {{"doctor", "--encryption-config", s.dir.path()}, "is not a regular file"},
      {{"doctor", "--encryption-config", broken}, "is not valid YAML"},
      {{"doctor", "--encryption-config", empty}, "is empty"},
      {{"doctor", "--encryption-config", good, "--timeout", "soon"}, "--timeout \"soon\""},
      {{"doctor", "--encryption-config", good, "--timeout", "0"}, "not a positive duration"},
      {{"doctor", "--encryption-config", good, "--bogus"}, "not expected: --bogus"},
      {{"doctor", "--encryption-config", good, "--config", s.dir.File("nope.yaml")}, "nope.yaml"},
  };
  for (const auto& [args, message] : cases) {
    const RunResult run = s.Cli(args);
    INFO(run.out << run.err);
    CHECK(run.exit_code == 2);
    CHECK(Has(run.err, message));
    CHECK(std::count(run.err.begin(), run.err.end(), '\n') == 1);
    CHECK(run.out.empty());
  }
  if (geteuid() != 0) {  // root reads a mode-000 file
    const RunResult run = s.Cli({"doctor", "--encryption-config", unreadable});
    CHECK(run.exit_code == 2);
    CHECK(Has(run.err, "cannot open"));
  }
}

}  // namespace
}  // namespace kmsplugin::testing
