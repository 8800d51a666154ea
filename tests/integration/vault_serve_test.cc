// The vault key source end to end: the real `kmsplugin` binary (init, serve, rotate, keys) against the Vault-API
// test server (tests/vault_server, HTTPS with a test CA), called over real gRPC on Unix sockets with both KMS APIs.
// The test server's control channel makes it sealed or hanging and counts TCP connections and requests per path.

#include <signal.h>
#include <sys/stat.h>

#include <atomic>
#include <mutex>
#include <regex>
#include <set>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>
#include <catch2/catch.hpp>

#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "crypto/envelope_format.h"
#include "tests/keysource/vault/vault_test_server.h"
#include "tests/integration/serve_scenarios.h"
#include "tests/support/daemon.h"
#include "tests/support/kms_client.h"
#include "tests/support/rotation_load.h"
#include "tests/support/subprocess.h"
#include "tests/support/temp_dir.h"

namespace kmsplugin::testing {
namespace {

const std::string kBinary = DaemonDriver::Binary();
constexpr char kToken[] = "hvs.E2E-TOKEN-SECRET-5d2a9b";
const std::string kEncryptPath = "/v1/transit/encrypt/kms";
const std::string kDecryptPath = "/v1/transit/decrypt/kms";

bool Has(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// "vault:transit/kms:v<N>:<created>" -> N (0 when the key_id has another shape).
unsigned long VersionOf(const std::string& key_id) {
  static const std::regex shape(R"(:v([0-9]+):)");
  std::smatch m;
  return std::regex_search(key_id, m, shape) ? std::stoul(m[1].str()) : 0;
}


// A Vault test server, a token (or AppRole) registered on it, and a config whose environments use it.
struct VaultEnv {
  VaultEnv(std::string n, std::string k = "kms", std::string a = "")
      : name(std::move(n)), key(std::move(k)), auth(std::move(a)) {}
  std::string name, key, auth;  // auth "" = the token file
};

struct VaultE2E : DaemonDriver {
  using Env = VaultEnv;

  explicit VaultE2E(VaultTestServer::Options options = {}) : vault(options) {
    vault.Control({{"add_token", {{"id", kToken}, {"ttl", 0}, {"renewable", true}, {"max_ttl", 0}}}});
    token_file = dir.Write("vault-token", std::string(kToken) + "\n");
  }
  std::string Socket(const std::string& env) const { return dir.File(env + ".sock"); }
  std::string Addresses() {
    std::string list;
    for (size_t i = 0; i < vault.Stats()["listeners"].size(); ++i) {
      list += (i ? ", " : "") + vault.Address(static_cast<int>(i));
    }
    return "[" + list + "]";
  }
  void Configure(std::vector<Env> envs = {{"prod"}}, const std::string& server = "  pollInterval: 1h\n",
                 const std::string& ca = "", const std::string& extra = "") {
    std::string yaml = "http:\n  listen: 127.0.0.1:0\nserver:\n" + server + "environments:\n";
    for (const Env& e : envs) {
      yaml += "  - name: " + e.name + "\n    socket: " + Socket(e.name) +
              "\n    keySource:\n      vault:\n        addresses: " + Addresses() + "\n        keyName: " + e.key +
              "\n        tls: {caFile: " + (ca.empty() ? TestPki::Get().ca : ca) + "}\n" +
              "        pollInterval: 1h\n        requestTimeout: 2s\n        retryMinWait: 10ms\n"
              "        retryMaxWait: 50ms\n" + extra +
              "        auth:\n" + (e.auth.empty() ? "          token: {file: " + token_file + "}\n" : e.auth);
    }
    config = dir.Write("config.yaml", yaml);
  }
  // Polls Status until its healthz satisfies `want` or `limit` passes; the last healthz seen.
  std::string WaitHealth(const std::string& socket, bool healthy, absl::Duration limit) const {
    const absl::Time end = absl::Now() + limit;
    std::string healthz;
    do {
      healthz = Status(socket).healthz();
      if ((healthz == "ok") == healthy) {
        break;
      }
      absl::SleepFor(absl::Milliseconds(100));
    } while (absl::Now() < end);
    return healthz;
  }
  int Requests(const std::string& path, int listener = 0) { return vault.Requests(listener, path); }

  RunResult Rotate(const std::string& env = "prod") const { return DaemonDriver::Rotate(env); }

  VaultTestServer vault;
  std::string token_file;
};

// Nothing the daemon printed holds the Vault token.
void CheckNoToken(Subprocess& server) {
  CHECK(!Has(server.Stdout(), kToken));
  CHECK(!Has(server.Stderr(), kToken));
  CHECK(!Has(server.Stderr(), "E2E-TOKEN"));
}

TEST_CASE("Vault serve: init creates the transit key, a second init leaves it, both APIs round-trip",
          "[vault][serve]") {
  VaultE2E v;
  v.Configure();
  const RunResult first = v.Init();
  INFO(first.out << first.err);
  REQUIRE(first.exit_code == 0);
  CHECK(v.Requests("/v1/transit/keys/kms") >= 1);
  const RunResult second = v.Init();
  CHECK(second.exit_code == 0);
  CHECK(Has(second.out, "left untouched"));
  CHECK(!Has(first.out + first.err + second.out + second.err, kToken));

  auto server = v.Serve();
  REQUIRE(v.WaitServing(*server, v.Socket("prod")));
  const v2::StatusResponse status = v.Status(v.Socket("prod"));
  CHECK(VersionOf(status.key_id()) == 1);
  CHECK(Has(status.key_id(), "transit/kms"));
  ScenarioRoundTripBothApis(v.Socket("prod"));
  server->Signal(SIGTERM);
  CHECK(server->Wait(std::chrono::seconds(15)) == std::optional<int>(0));
  CheckNoToken(*server);
}

TEST_CASE("Vault serve: exactly one Vault request per Encrypt and per Decrypt, none per Status, and /metrics counts "
          "them",
          "[vault][serve][observe]") {
  VaultE2E v;
  v.Configure();
  REQUIRE(v.Init().exit_code == 0);
  auto server = v.Serve();
  const std::string socket = v.Socket("prod");
  REQUIRE(v.WaitServing(*server, socket));
  absl::SleepFor(absl::Milliseconds(300));  // let the start-up probe finish
  KmsClient client(socket);
  const int enc0 = v.Requests(kEncryptPath), dec0 = v.Requests(kDecryptPath);
  const nlohmann::json stats0 = v.vault.Stats();
  int total0 = 0;
  for (auto& [path, n] : stats0["listeners"][0]["requests"].items()) total0 += n.get<int>();
  constexpr int kCalls = 20;
  std::vector<v2::EncryptResponse> written(kCalls);
  for (int i = 0; i < kCalls; ++i) {
    REQUIRE(client.Encrypt(std::string(32, 'c'), written[i]).ok());
  }
  CHECK(v.Requests(kEncryptPath) - enc0 == kCalls);
  CHECK(v.Requests(kDecryptPath) - dec0 == 0);
  for (int i = 0; i < kCalls; ++i) {
    v2::DecryptResponse decrypted;
    REQUIRE(client.DecryptResponseOf(written[i], decrypted).ok());
  }
  CHECK(v.Requests(kDecryptPath) - dec0 == kCalls);
  CHECK(v.Requests(kEncryptPath) - enc0 == kCalls);
  for (int i = 0; i < 50; ++i) {
    v2::StatusResponse status;
    REQUIRE(client.Status(status).ok());
  }
  const nlohmann::json stats1 = v.vault.Stats();
  int total1 = 0;
  for (auto& [path, n] : stats1["listeners"][0]["requests"].items()) total1 += n.get<int>();
  INFO(stats0.dump() << " -> " << stats1.dump());
  CHECK(total1 - total0 == 2 * kCalls);  // nothing else: no Status, no lookups, no token renewals
  // Keep-alive: all of it on the connections opened at start.
  CHECK(v.vault.Connections(0) <= 4);

  const int port = DaemonDriver::LoggedHttpPort(*server);
  REQUIRE(port > 0);
  const std::string metrics = DaemonDriver::HttpGet(port, "/metrics");
  INFO(metrics);
  CHECK(Has(metrics, "kmsplugin_backend_requests_total{environment=\"prod\",key_source=\"vault\",operation=\"wrap\""));
  CHECK(Has(metrics, "kmsplugin_backend_requests_total{environment=\"prod\",key_source=\"vault\",operation=\"unwrap\""));
  CHECK(Has(metrics, "kmsplugin_key_info{environment=\"prod\",key_source=\"vault\",key_id=\"" +
                         written[0].key_id() + "\"} 1"));
  CHECK(!Has(metrics, kToken));
  CheckNoToken(*server);
}

TEST_CASE("Vault serve: rotate then SIGHUP changes the Status key_id at once, old ciphertexts keep decrypting",
          "[vault][serve][rotation]") {
  VaultE2E v;
  v.Configure();
  REQUIRE(v.Init().exit_code == 0);
  auto server = v.Serve();
  const std::string socket = v.Socket("prod");
  REQUIRE(v.WaitServing(*server, socket));
  ScenarioRotateThenHup(v, *server, "prod", socket, VersionOf);
  CheckNoToken(*server);
}

TEST_CASE("Vault serve: rotation under load keeps Status and Encrypt in agreement, with zero failed decrypts",
          "[vault][serve][rotation]") {
  VaultE2E v;
  v.Configure();
  REQUIRE(v.Init().exit_code == 0);
  auto server = v.Serve();
  const std::string socket = v.Socket("prod");
  REQUIRE(v.WaitServing(*server, socket));
  ScenarioRotationUnderLoad(v, *server, "prod", socket, VersionOf, /*writers=*/3, absl::Milliseconds(250),
                            /*min_rounds=*/5);
}

TEST_CASE("Vault serve: a server that accepts and never answers ends a 3 s Encrypt in time, and the daemon "
          "recovers",
          "[vault][serve][fault]") {
  VaultE2E v;
  v.Configure();
  REQUIRE(v.Init().exit_code == 0);
  auto server = v.Serve();
  const std::string socket = v.Socket("prod");
  REQUIRE(v.WaitServing(*server, socket));
  KmsClient client(socket);
  v2::EncryptResponse encrypted;
  REQUIRE(client.Encrypt(std::string(32, 'h'), encrypted).ok());
  v.vault.Control({{"hang", true}});
  std::vector<std::thread> callers;
  std::atomic<int> in_time{0}, right_code{0};
  for (int i = 0; i < 3; ++i) {
    callers.emplace_back([&, i] {
      KmsClient own(socket);
      const absl::Time start = absl::Now();
      grpc::Status status;
      if (i == 0) {
        v2::EncryptResponse out;
        status = own.Encrypt(std::string(32, 'x'), out, std::chrono::milliseconds(3000));
      } else {
        v2::DecryptResponse out;
        std::map<std::string, std::string> annotations(encrypted.annotations().begin(), encrypted.annotations().end());
        status = own.Decrypt(encrypted.ciphertext(), encrypted.key_id(), annotations, out,
                             std::chrono::milliseconds(3000));
      }
      const absl::Duration took = absl::Now() - start;
      in_time += took < absl::Milliseconds(3600) ? 1 : 0;
      right_code += (status.error_code() == grpc::StatusCode::UNAVAILABLE ||
                     status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED)
                        ? 1
                        : 0;
    });
  }
  // Status keeps answering at once while the backend hangs.
  absl::SleepFor(absl::Milliseconds(500));
  const absl::Time status_start = absl::Now();
  v2::StatusResponse status;
  KmsClient observer(socket);
  CHECK(observer.Status(status, std::chrono::milliseconds(1000)).ok());
  CHECK(absl::Now() - status_start < absl::Milliseconds(500));
  for (std::thread& caller : callers) {
    caller.join();
  }
  CHECK(in_time.load() == 3);
  CHECK(right_code.load() == 3);
  v.vault.Control({{"hang", false}});
  // No thread stayed stuck: new calls succeed once the server answers again.
  v2::EncryptResponse after;
  grpc::Status recovered;
  for (int i = 0; i < 30; ++i) {
    recovered = client.Encrypt(std::string(32, 'r'), after);
    if (recovered.ok()) break;
    absl::SleepFor(absl::Milliseconds(100));
  }
  REQUIRE(recovered.ok());
  v2::DecryptResponse decrypted;
  REQUIRE(client.DecryptResponseOf(after, decrypted).ok());
  CHECK(decrypted.plaintext() == std::string(32, 'r'));
  REQUIRE(client.DecryptResponseOf(encrypted, decrypted).ok());
  CHECK(server->Running());
  CheckNoToken(*server);
}

// kube-apiserver may send this many calls at once (a burst of Decrypts after a restart). Each call waits for its
// Vault round trip; none may be refused while the backend is merely slow.
TEST_CASE("Vault serve: 32 concurrent client streams against a Vault answering in 20 ms finish with zero failed "
          "calls",
          "[vault][serve][load]") {
  VaultE2E v;
  v.Configure();
  REQUIRE(v.Init().exit_code == 0);
  auto server = v.Serve();
  const std::string socket = v.Socket("prod");
  REQUIRE(v.WaitServing(*server, socket));
  v.vault.Control({{"delay", 0.02}});
  ScenarioConcurrentStreams(socket, /*streams=*/32, /*rounds=*/8);
  CHECK(server->Running());
}

TEST_CASE("Vault serve: with the first of two addresses sealed, calls fail over to the second", "[vault][serve][fault]") {
  VaultE2E v(VaultTestServer::Options::Listeners(2));
  v.Configure();
  REQUIRE(v.Init().exit_code == 0);
  auto server = v.Serve();
  const std::string socket = v.Socket("prod");
  REQUIRE(v.WaitServing(*server, socket));
  v.vault.Control({{"listener", 0}, {"sealed", true}});
  KmsClient client(socket);
  const int second_before = v.Requests(kEncryptPath, 1);
  for (int i = 0; i < 5; ++i) {
    v2::EncryptResponse encrypted;
    v2::DecryptResponse decrypted;
    INFO("call " << i);
    REQUIRE(client.Encrypt(std::string(32, 'f'), encrypted).ok());
    REQUIRE(client.DecryptResponseOf(encrypted, decrypted).ok());
    CHECK(decrypted.plaintext() == std::string(32, 'f'));
  }
  CHECK(v.Requests(kEncryptPath, 1) - second_before == 5);
  CHECK(v.Status(socket).healthz() == "ok");
  CheckNoToken(*server);
}

TEST_CASE("Vault serve: with the first of two addresses hanging, calls fail over inside a 3 s deadline",
          "[vault][serve][fault]") {
  VaultE2E v(VaultTestServer::Options::Listeners(2));
  v.Configure({{"prod"}}, "  pollInterval: 1h\n", "", "");
  REQUIRE(v.Init().exit_code == 0);
  auto server = v.Serve();
  const std::string socket = v.Socket("prod");
  REQUIRE(v.WaitServing(*server, socket));
  v.vault.Control({{"listener", 0}, {"hang", true}});
  KmsClient client(socket);
  const absl::Time start = absl::Now();
  v2::EncryptResponse encrypted;
  const grpc::Status status = client.Encrypt(std::string(32, 'g'), encrypted, std::chrono::milliseconds(3000));
  INFO(status.error_code() << " " << status.error_message());
  CHECK(status.ok());
  CHECK(absl::Now() - start < absl::Milliseconds(3000));
  CHECK(v.Requests(kEncryptPath, 1) >= 1);
  v.vault.Control({{"listener", 0}, {"hang", false}});
  v2::DecryptResponse decrypted;
  REQUIRE(client.DecryptResponseOf(encrypted, decrypted).ok());
  CHECK(decrypted.plaintext() == std::string(32, 'g'));
}

TEST_CASE("Vault serve: a Vault killed and started again (sealed, then unsealed) fails calls UNAVAILABLE in time "
          "meanwhile, and the daemon serves again by itself, earlier ciphertexts included",
          "[vault][serve][fault]") {
  VaultE2E v(VaultTestServer::Options::Persistent());
  v.Configure({{"prod"}}, "  pollInterval: 1s\n");
  REQUIRE(v.Init().exit_code == 0);
  auto server = v.Serve();
  const std::string socket = v.Socket("prod");
  REQUIRE(v.WaitServing(*server, socket));
  KmsClient client(socket);
  v2::EncryptResponse before;
  REQUIRE(client.Encrypt(std::string(32, 'k'), before).ok());
  v.vault.Kill();
  for (const char* state : {"killed", "restarted sealed"}) {
    INFO(state);
    const absl::Time start = absl::Now();
    v2::EncryptResponse encrypted;
    const grpc::Status down = client.Encrypt(std::string(32, 'k'), encrypted, std::chrono::milliseconds(3000));
    INFO(down.error_code() << " " << down.error_message());
    CHECK((down.error_code() == grpc::StatusCode::UNAVAILABLE ||
           down.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED));
    CHECK(absl::Now() - start < absl::Milliseconds(3500));
    CHECK(v.WaitHealth(socket, false, absl::Seconds(8)) != "ok");
    if (std::string(state) == "killed") {
      v.vault.Restart();  // same address and storage; sealed, as a restarted Vault is
    }
  }
  v.vault.Control({{"all", true}, {"sealed", false}});
  CHECK(v.WaitHealth(socket, true, absl::Seconds(8)) == "ok");
  v2::DecryptResponse decrypted;
  REQUIRE(client.DecryptResponseOf(before, decrypted).ok());
  CHECK(decrypted.plaintext() == std::string(32, 'k'));
  v2::EncryptResponse after;
  REQUIRE(client.Encrypt(std::string(32, 'k'), after).ok());
  CHECK(after.key_id() == before.key_id());
  CHECK(server->Running());
  CheckNoToken(*server);
}

TEST_CASE("Vault serve: a short 429 storm is retried inside the call, a long one ends UNAVAILABLE in time",
          "[vault][serve][fault]") {
  VaultE2E v;
  v.Configure();
  REQUIRE(v.Init().exit_code == 0);
  auto server = v.Serve();
  const std::string socket = v.Socket("prod");
  REQUIRE(v.WaitServing(*server, socket));
  KmsClient client(socket);
  const int before = v.Requests(kEncryptPath);
  v.vault.Control({{"rate_limit_count", 2}, {"retry_after", 0}});
  v2::EncryptResponse encrypted;
  REQUIRE(client.Encrypt(std::string(32, 'l'), encrypted).ok());
  CHECK(v.Requests(kEncryptPath) - before == 3);
  v.vault.Control({{"rate_limit_count", 100000}, {"retry_after", 0}});
  const absl::Time start = absl::Now();
  const grpc::Status storm = client.Encrypt(std::string(32, 'l'), encrypted, std::chrono::milliseconds(3000));
  CHECK((storm.error_code() == grpc::StatusCode::UNAVAILABLE ||
         storm.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED));
  CHECK(absl::Now() - start < absl::Milliseconds(3500));
  CHECK(v.Requests(kEncryptPath) - before < 40);  // bounded retries, not a hot loop
  v.vault.Control({{"rate_limit_count", 0}});
  REQUIRE(client.Encrypt(std::string(32, 'l'), encrypted).ok());
}

TEST_CASE("Vault serve: a 3 s token is renewed in the background and calls keep working past its TTL",
          "[vault][serve][auth]") {
  VaultE2E v;
  const std::string short_token = "hvs.E2E-TOKEN-SECRET-short";
  v.vault.Control({{"add_token", {{"id", short_token}, {"ttl", 3}, {"renewable", true}, {"max_ttl", 0}}}});
  v.dir.Write("vault-token", short_token + "\n");
  v.Configure();
  REQUIRE(v.Init().exit_code == 0);
  auto server = v.Serve();
  const std::string socket = v.Socket("prod");
  REQUIRE(v.WaitServing(*server, socket));
  KmsClient client(socket);
  int failed = 0;
  for (int i = 0; i < 10; ++i) {  // 5 s: past the 3 s TTL
    absl::SleepFor(absl::Milliseconds(500));
    v2::EncryptResponse encrypted;
    v2::DecryptResponse decrypted;
    failed += client.Encrypt(std::string(32, 't'), encrypted).ok() && client.DecryptResponseOf(encrypted, decrypted).ok()
                  ? 0
                  : 1;
  }
  CHECK(failed == 0);
  CHECK(v.Requests("/v1/auth/token/renew-self") >= 2);
  CHECK(v.Status(socket).healthz() == "ok");
  CHECK(!Has(server->Stderr(), short_token));
  CheckNoToken(*server);
}

TEST_CASE("Vault serve: Status turns unhealthy when no address answers and healthy again by itself",
          "[vault][serve][fault]") {
  VaultE2E v(VaultTestServer::Options::Listeners(2));
  v.Configure({{"prod"}}, "  pollInterval: 1s\n");
  REQUIRE(v.Init().exit_code == 0);
  auto server = v.Serve();
  const std::string socket = v.Socket("prod");
  REQUIRE(v.WaitServing(*server, socket));
  REQUIRE(v.WaitHealth(socket, true, absl::Seconds(5)) == "ok");
  v.vault.Control({{"all", true}, {"sealed", true}});
  const std::string down = v.WaitHealth(socket, false, absl::Seconds(8));
  CHECK(down != "ok");
  CHECK(!down.empty());
  KmsClient client(socket);
  v2::EncryptResponse encrypted;
  const grpc::Status refused = client.Encrypt(std::string(32, 'u'), encrypted);
  CHECK(refused.error_code() == grpc::StatusCode::UNAVAILABLE);
  v.vault.Control({{"all", true}, {"sealed", false}});
  CHECK(v.WaitHealth(socket, true, absl::Seconds(8)) == "ok");
  REQUIRE(client.Encrypt(std::string(32, 'u'), encrypted).ok());
  CheckNoToken(*server);
}

TEST_CASE("Vault serve: a version below min_decryption_version fails with FAILED_PRECONDITION naming the version",
          "[vault][serve][bad-input]") {
  VaultE2E v;
  v.Configure();
  REQUIRE(v.Init().exit_code == 0);
  auto server = v.Serve();
  const std::string socket = v.Socket("prod");
  REQUIRE(v.WaitServing(*server, socket));
  KmsClient client(socket);
  v2::EncryptResponse v1_ciphertext;
  REQUIRE(client.Encrypt(std::string(32, '1'), v1_ciphertext).ok());
  REQUIRE(v.Rotate().exit_code == 0);
  REQUIRE(VersionOf(v.KeyIdAfterHup(*server, socket, v1_ciphertext.key_id())) == 2);
  v.vault.Control({{"key_config", {{"name", "kms"}, {"min_decryption_version", 2}}}});
  // Vault refuses before the daemon has heard of the change...
  v2::DecryptResponse decrypted;
  grpc::Status refused = client.DecryptResponseOf(v1_ciphertext, decrypted);
  CHECK(refused.error_code() == grpc::StatusCode::FAILED_PRECONDITION);
  CHECK(Has(refused.error_message(), "version 1"));
  CHECK(Has(refused.error_message(), "min_decryption_version"));
  // ...and the daemon refuses by itself once it has.
  server->Signal(SIGHUP);
  absl::SleepFor(absl::Milliseconds(500));
  refused = client.DecryptResponseOf(v1_ciphertext, decrypted);
  CHECK(refused.error_code() == grpc::StatusCode::FAILED_PRECONDITION);
  CHECK(Has(refused.error_message(), "version 1"));
  CHECK(decrypted.plaintext().empty());
  // Version 2 keeps working.
  v2::EncryptResponse v2_ciphertext;
  REQUIRE(client.Encrypt(std::string(32, '2'), v2_ciphertext).ok());
  REQUIRE(client.DecryptResponseOf(v2_ciphertext, decrypted).ok());
  CHECK(v.Status(socket).healthz() == "ok");
}

// Vault archives versions below min_decryption_version and stops listing them, so the `retire --reinstate` run
// (a new process) never sees version 1 listed; it must bring it back all the same (found by the soak).
TEST_CASE("Vault serve: `retire` then `retire --reinstate` in another run bring version 1 back, and the daemon "
          "decrypts under it again",
          "[vault][serve][retire]") {
  VaultE2E v;
  v.Configure();
  REQUIRE(v.Init().exit_code == 0);
  auto server = v.Serve();
  const std::string socket = v.Socket("prod");
  REQUIRE(v.WaitServing(*server, socket));
  KmsClient client(socket);
  v2::EncryptResponse old;
  REQUIRE(client.Encrypt(std::string(32, '1'), old).ok());
  REQUIRE(v.Rotate().exit_code == 0);
  REQUIRE(VersionOf(v.KeyIdAfterHup(*server, socket, old.key_id())) == 2);
  const RunResult retire =
      v.Cli({"retire", "--config", v.config, "--env", "prod", "--version", "1", "--force", "--allow-recent"});
  INFO(retire.out << retire.err);
  REQUIRE(retire.exit_code == 0);
  server->Signal(SIGHUP);
  v2::DecryptResponse decrypted;
  grpc::Status status;
  for (int i = 0; i < 50; ++i) {
    status = client.DecryptResponseOf(old, decrypted);
    if (status.error_code() == grpc::StatusCode::FAILED_PRECONDITION) break;
    absl::SleepFor(absl::Milliseconds(100));
  }
  REQUIRE(status.error_code() == grpc::StatusCode::FAILED_PRECONDITION);
  const RunResult reinstate = v.Cli({"retire", "--config", v.config, "--env", "prod", "--version", "1", "--reinstate"});
  INFO(reinstate.out << reinstate.err);
  REQUIRE(reinstate.exit_code == 0);
  CHECK(Has(reinstate.out, "reinstated versions 1"));
  server->Signal(SIGHUP);
  for (int i = 0; i < 50; ++i) {
    status = client.DecryptResponseOf(old, decrypted);
    if (status.ok()) break;
    absl::SleepFor(absl::Milliseconds(100));
  }
  REQUIRE(status.ok());
  CHECK(decrypted.plaintext() == std::string(32, '1'));
  const RunResult keys = v.Cli({"keys", "--config", v.config, "--env", "prod", "--json"});
  REQUIRE(keys.exit_code == 0);
  const auto doc = nlohmann::json::parse(keys.out);
  REQUIRE(doc["versions"].size() == 2);
  CHECK(doc["versions"][0]["keyId"] == old.key_id());
  CHECK(doc["versions"][0]["state"] == "active");
}

TEST_CASE("Vault serve: a ciphertext of another vault environment is FAILED_PRECONDITION naming both",
          "[vault][serve][bad-input]") {
  VaultE2E v;
  v.Configure({{"alpha", "kms-alpha"}, {"beta", "kms-beta"}});
  const RunResult init = v.Init();
  INFO(init.out << init.err);
  REQUIRE(init.exit_code == 0);
  auto server = v.Serve();
  REQUIRE(v.WaitServing(*server, v.Socket("alpha")));
  REQUIRE(v.WaitServing(*server, v.Socket("beta")));
  CHECK(Has(v.Status(v.Socket("alpha")).key_id(), "/kms-alpha:"));
  CHECK(Has(v.Status(v.Socket("beta")).key_id(), "/kms-beta:"));
  KmsClient alpha(v.Socket("alpha")), beta(v.Socket("beta"));
  v2::EncryptResponse of_alpha;
  REQUIRE(alpha.Encrypt(std::string(32, 'a'), of_alpha).ok());
  const int beta_decrypts = v.Requests("/v1/transit/decrypt/kms-beta");
  v2::DecryptResponse decrypted;
  const grpc::Status crossed = beta.DecryptResponseOf(of_alpha, decrypted);
  CHECK(crossed.error_code() == grpc::StatusCode::FAILED_PRECONDITION);
  CHECK(Has(crossed.error_message(), "\"alpha\""));
  CHECK(Has(crossed.error_message(), "\"beta\""));
  CHECK(v.Requests("/v1/transit/decrypt/kms-beta") == beta_decrypts);  // refused before reaching Vault
  v1beta1::EncryptResponse v1_of_beta;
  REQUIRE(beta.V1Encrypt(std::string(32, 'b'), v1_of_beta).ok());
  v1beta1::DecryptResponse v1_decrypted;
  CHECK(alpha.V1Decrypt(v1_of_beta.cipher(), v1_decrypted).error_code() == grpc::StatusCode::FAILED_PRECONDITION);
  REQUIRE(alpha.DecryptResponseOf(of_alpha, decrypted).ok());
}

TEST_CASE("Vault serve: two environments on one Transit key (allowSharedBackendKey) still refuse each other's "
          "ciphertexts, even with a forged header",
          "[vault][serve][bad-input]") {
  VaultE2E v;
  v.Configure({{"alpha", "kms-shared"}, {"beta", "kms-shared"}});
  // Without the explicit allowance the config is refused...
  RunResult refused = v.Init();
  CHECK(refused.exit_code != 0);
  CHECK(Has(refused.err, "allowSharedBackendKey"));
  // ...with it, both environments use the very same Transit key.
  std::string yaml = ReadWholeFile(v.config);
  const size_t beta = yaml.find("  - name: beta\n");
  REQUIRE(beta != std::string::npos);
  yaml.insert(yaml.find("    keySource:", beta), "    allowSharedBackendKey: true\n");
  v.config = v.dir.Write("config.yaml", yaml);
  const RunResult init = v.Init();
  INFO(init.out << init.err);
  REQUIRE(init.exit_code == 0);
  auto server = v.Serve();
  REQUIRE(v.WaitServing(*server, v.Socket("alpha")));
  REQUIRE(v.WaitServing(*server, v.Socket("beta")));
  CHECK(v.Status(v.Socket("alpha")).key_id() == v.Status(v.Socket("beta")).key_id());
  KmsClient alpha(v.Socket("alpha")), beta_client(v.Socket("beta"));
  v2::EncryptResponse of_alpha;
  REQUIRE(alpha.Encrypt(std::string(32, 'a'), of_alpha).ok());
  v2::DecryptResponse decrypted;
  const grpc::Status crossed = beta_client.DecryptResponseOf(of_alpha, decrypted);
  CHECK(crossed.error_code() == grpc::StatusCode::FAILED_PRECONDITION);
  CHECK(Has(crossed.error_message(), "\"alpha\""));
  // Rewriting the header to claim "beta" reaches Vault, whose AES-GCM refuses the changed associated data.
  auto envelope = crypto::ParseEnvelope(of_alpha.ciphertext());
  REQUIRE(envelope.ok());
  envelope->header.environment = "beta";
  auto forged = crypto::EncodeEnvelope(*envelope);
  REQUIRE(forged.ok());
  const int decrypts = v.Requests("/v1/transit/decrypt/kms-shared");
  std::map<std::string, std::string> annotations(of_alpha.annotations().begin(), of_alpha.annotations().end());
  const grpc::Status status = beta_client.Decrypt(*forged, of_alpha.key_id(), annotations, decrypted);
  CHECK(status.error_code() == grpc::StatusCode::INVALID_ARGUMENT);
  CHECK(decrypted.plaintext().empty());
  CHECK(v.Requests("/v1/transit/decrypt/kms-shared") == decrypts + 1);
  REQUIRE(alpha.DecryptResponseOf(of_alpha, decrypted).ok());
}

TEST_CASE("Vault serve: revoked credentials give PERMISSION_DENIED without the token in any output",
          "[vault][serve][bad-input]") {
  VaultE2E v;
  v.Configure();
  REQUIRE(v.Init().exit_code == 0);
  auto server = v.Serve();
  const std::string socket = v.Socket("prod");
  REQUIRE(v.WaitServing(*server, socket));
  v.vault.Control({{"revoke_tokens", true}});
  KmsClient client(socket);
  v2::EncryptResponse encrypted;
  const grpc::Status denied = client.Encrypt(std::string(32, 'd'), encrypted);
  CHECK(denied.error_code() == grpc::StatusCode::PERMISSION_DENIED);
  CHECK(!Has(denied.error_message(), kToken));
  const RunResult rotate = v.Rotate();
  CHECK(rotate.exit_code != 0);
  CHECK(!Has(rotate.out + rotate.err, kToken));
  server->Signal(SIGTERM);
  server->Wait(std::chrono::seconds(15));
  CheckNoToken(*server);
}

TEST_CASE("Vault serve: AppRole logs in from 0600 files and logs in again after its token is revoked",
          "[vault][serve][auth]") {
  VaultE2E v;
  v.vault.Control({{"approle", {{"role_id", "role-e2e"}, {"secret_id", "SECRET-ID-e2e-9f31"}}}});
  const std::string role = v.dir.Write("role-id", "role-e2e\n");
  const std::string secret = v.dir.Write("secret-id", "SECRET-ID-e2e-9f31\n");
  v.Configure({{"prod", "kms", "          appRole: {roleIdFile: " + role + ", secretIdFile: " + secret + "}\n"}});
  const RunResult init = v.Init();
  INFO(init.out << init.err);
  REQUIRE(init.exit_code == 0);
  auto server = v.Serve();
  const std::string socket = v.Socket("prod");
  REQUIRE(v.WaitServing(*server, socket));
  KmsClient client(socket);
  v2::EncryptResponse encrypted;
  REQUIRE(client.Encrypt(std::string(32, 'r'), encrypted).ok());
  const int logins = v.Requests("/v1/auth/approle/login");
  v.vault.Control({{"revoke_tokens", true}});
  v2::DecryptResponse decrypted;
  REQUIRE(client.DecryptResponseOf(encrypted, decrypted).ok());
  CHECK(decrypted.plaintext() == std::string(32, 'r'));
  CHECK(v.Requests("/v1/auth/approle/login") - logins == 1);  // once, not in a loop
  CHECK(!Has(server->Stderr(), "SECRET-ID-e2e"));
  CheckNoToken(*server);
}

TEST_CASE("Vault serve: an AppRole secret_id file readable by others is refused, naming the file and the fix",
          "[vault][serve][bad-input]") {
  VaultE2E v;
  const std::string role = v.dir.Write("role-id", "role-e2e\n");
  const std::string secret = v.dir.Write("secret-id", "SECRET-ID-e2e-9f31\n", 0644);
  v.Configure({{"prod", "kms", "          appRole: {roleIdFile: " + role + ", secretIdFile: " + secret + "}\n"}});
  const std::string why = v.ServeUnhealthy(v.Socket("prod"));
  INFO(why);
  CHECK(Has(why, secret));
  CHECK(Has(why, "chmod 600"));
  CHECK(!Has(why, "SECRET-ID-e2e"));
}

TEST_CASE("Vault serve: a token file readable by others is refused, naming the file and the fix",
          "[vault][serve][bad-input]") {
  VaultE2E v;
  v.Configure();
  chmod(v.token_file.c_str(), 0640);
  const RunResult init = v.Cli({"init", "--config", v.config});
  INFO(init.err);
  CHECK(init.exit_code != 0);
  const std::string why = v.ServeUnhealthy(v.Socket("prod"));
  for (const std::string& said : {init.err, why}) {
    CHECK(Has(said, v.token_file));
    CHECK(Has(said, "chmod 600"));
    CHECK(!Has(said, kToken));
  }
}

TEST_CASE("Vault serve: a CA that did not sign the server is refused with a clear TLS error", "[vault][bad-input]") {
  VaultE2E v;
  v.Configure({{"prod"}}, "  pollInterval: 1h\n", TestPki::Get().other_ca);
  const RunResult init = v.Init();
  INFO(init.out << init.err);
  CHECK(init.exit_code != 0);
  CHECK((Has(init.err, "certificate") || Has(init.err, "TLS") || Has(init.err, "SSL")));
  CHECK(Has(init.err, v.vault.Address(0)));
  CHECK(v.Requests("/v1/transit/keys/kms") == 0);  // nothing went over an unverified connection
  CHECK(!Has(init.out + init.err, kToken));
}

TEST_CASE("Vault serve: before init the daemon refuses to start (or serves unhealthy), naming the missing key and "
          "the fix",
          "[vault][serve][bad-input]") {
  VaultE2E v;
  v.Configure();
  auto server = v.Serve();
  const std::string socket = v.Socket("prod");
  const bool serving = v.WaitServing(*server, socket);
  INFO(server->Stderr());
  if (!serving) {
    // Refused at start: non-zero exit, one line naming the key, the address and `kmsplugin init`.
    CHECK(server->Wait(std::chrono::seconds(5)).value_or(0) > 0);
    CHECK(Has(server->Stderr(), "transit/keys/kms"));
    CHECK(Has(server->Stderr(), "kmsplugin init"));
    CHECK(Has(server->Stderr(), v.vault.Address(0)));
    struct stat info {};
    CHECK(lstat(socket.c_str(), &info) != 0);
  } else {
    // Served: unhealthy, Encrypt refused, healthy after init + SIGHUP.
    CHECK(Has(v.Status(socket).healthz(), "kmsplugin init"));
    KmsClient client(socket);
    v2::EncryptResponse encrypted;
    CHECK(!client.Encrypt(std::string(32, 'z'), encrypted).ok());
    REQUIRE(v.Init().exit_code == 0);
    server->Signal(SIGHUP);
    CHECK(v.WaitHealth(socket, true, absl::Seconds(3)) == "ok");
    server->Signal(SIGTERM);
    CHECK(server->Wait(std::chrono::seconds(15)) == std::optional<int>(0));
  }
  // After init, serve comes up healthy.
  REQUIRE(v.Init().exit_code == 0);
  auto second = v.Serve();
  REQUIRE(v.WaitServing(*second, socket));
  CHECK(v.WaitHealth(socket, true, absl::Seconds(3)) == "ok");
  KmsClient client(socket);
  v2::EncryptResponse encrypted;
  REQUIRE(client.Encrypt(std::string(32, 'z'), encrypted).ok());
  CHECK(VersionOf(encrypted.key_id()) == 1);
  CheckNoToken(*server);
  CheckNoToken(*second);
}

}  // namespace
}  // namespace kmsplugin::testing
