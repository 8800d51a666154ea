// Environments are isolated at start: through the real `kmsplugin serve`, a Vault environment whose token Vault
// refuses does not stop a local environment in the same process; it serves unhealthy, says why (Status healthz,
// /readyz, one log line), and heals by itself once a valid token is written, without a restart.

#include <signal.h>

#include <string>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "absl/time/clock.h"
#include "tests/keysource/vault/vault_test_server.h"
#include "tests/support/daemon.h"
#include "tests/support/kms_client.h"

namespace kmsplugin::testing {
namespace {

constexpr char kToken[] = "hvs.ISOLATION-TOKEN-7f3c1e";
constexpr char kRevoked[] = "hvs.REVOKED-TOKEN-0a0a0a";

bool Has(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

struct World : DaemonDriver {
  World() {
    vault.Control({{"add_token", {{"id", kToken}, {"ttl", 0}, {"renewable", true}, {"max_ttl", 0}}}});
    token_file = dir.Write("vault-token", std::string(kToken) + "\n");
    config = dir.Write("config.yaml",
                       "http:\n  listen: 127.0.0.1:0\nserver:\n  pollInterval: 1s\nenvironments:\n"
                       "  - name: dev\n    socket: " + dir.File("dev.sock") +
                       "\n    keySource:\n      local:\n        keyring: " + dir.File("state/dev.keyring") +
                       "\n        rootKeyFile: " + dir.File("state/dev.rootkey") +
                       "\n  - name: prod\n    socket: " + dir.File("prod.sock") +
                       "\n    keySource:\n      vault:\n        address: " + vault.Address(0) +
                       "\n        keyName: kms\n        tls: {caFile: " + TestPki::Get().ca +
                       "}\n        requestTimeout: 2s\n        auth:\n          token: {file: " + token_file + "}\n");
  }
  std::string Healthz(const std::string& env) { return Status(dir.File(env + ".sock")).healthz(); }

  VaultTestServer vault{VaultTestServer::Options{}};
  std::string token_file;
};

TEST_CASE("Isolation: a revoked Vault token leaves the local environment serving, and Vault heals once fixed",
          "[integration][isolation]") {
  World w;
  const RunResult init = w.Init();
  INFO(init.out << init.err);
  REQUIRE(init.exit_code == 0);
  w.dir.Write("vault-token", std::string(kRevoked) + "\n");  // Vault answers 403 to it

  const absl::Time start = absl::Now();
  auto server = w.Serve();
  REQUIRE(w.WaitServing(*server, w.dir.File("dev.sock")));
  REQUIRE(w.WaitServing(*server, w.dir.File("prod.sock")));
  CHECK(absl::Now() - start < absl::Seconds(5));
  CHECK(w.Healthz("dev") == "ok");
  const std::string prod = w.Healthz("prod");
  INFO(prod);
  CHECK(Has(prod, "has not started"));
  CHECK(Has(prod, "403"));
  // The local environment encrypts and decrypts meanwhile; the Vault one refuses with a status, not a hang.
  KmsClient dev(w.dir.File("dev.sock"));
  v2::EncryptResponse encrypted;
  REQUIRE(dev.Encrypt(std::string(32, 'd'), encrypted).ok());
  v2::DecryptResponse decrypted;
  REQUIRE(dev.DecryptResponseOf(encrypted, decrypted).ok());
  KmsClient vault_client(w.dir.File("prod.sock"));
  v2::EncryptResponse refused;
  const grpc::Status refusal = vault_client.Encrypt(std::string(32, 'p'), refused);
  CHECK(refusal.error_code() == grpc::StatusCode::PERMISSION_DENIED);
  CHECK(Has(refusal.error_message(), "has not started"));
  const int port = DaemonDriver::LoggedHttpPort(*server);
  REQUIRE(port > 0);
  CHECK(Has(DaemonDriver::HttpGet(port, "/readyz"), "prod"));
  // Polls with the file unchanged do not try the refused token again.
  absl::SleepFor(absl::Seconds(3));
  CHECK(w.vault.Requests(0, "/v1/auth/token/lookup-self") <= 2);

  // The operator writes a valid token: no restart, no SIGHUP needed.
  w.dir.Write("vault-token", std::string(kToken) + "\n");
  const absl::Time fixed = absl::Now();
  std::string healthz;
  while (absl::Now() - fixed < absl::Seconds(10)) {
    healthz = w.Healthz("prod");
    if (healthz == "ok") {
      break;
    }
    absl::SleepFor(absl::Milliseconds(200));
  }
  CHECK(healthz == "ok");
  v2::EncryptResponse healed;
  REQUIRE(vault_client.Encrypt(std::string(32, 'p'), healed).ok());
  CHECK(Has(healed.key_id(), "vault:transit/kms:v1:"));
  CHECK(Has(server->Stderr(), "\"event\":\"started\""));
  CHECK(Has(server->Stderr(), "\"event\":\"unavailable\""));
  CHECK(Has(DaemonDriver::HttpGet(port, "/metrics"),
            "kmsplugin_key_source_events_total{environment=\"prod\",event=\"started\",key_source=\"vault\"} 1"));
  CHECK(!Has(server->Stderr(), kToken));
  CHECK(!Has(server->Stderr(), kRevoked));
  server->Signal(SIGTERM);
  CHECK(server->Wait() == 0);
}

}  // namespace
}  // namespace kmsplugin::testing
