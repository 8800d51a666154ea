#include "kmsplugin/keysource/vault/vault_spec.h"

#include <cstdlib>

#include <catch2/catch.hpp>

#include "absl/strings/match.h"
#include "tests/keysource/vault/vault_test_util.h"
#include "tests/support/status_matchers.h"

namespace kmsplugin::keysource::vault {
namespace {

using ::kmsplugin::testing::IsOk;
using ::kmsplugin::testing::MakeTempDir;
using ::kmsplugin::testing::StatusIs;
using ::kmsplugin::testing::TestPki;
using ::kmsplugin::testing::VaultTestServer;
using ::kmsplugin::testing::WriteFile;
using Code = absl::StatusCode;

const config::FieldContext kContext("/etc/kmsplugin/config.yaml", "environments[0].keySource.vault");

absl::StatusOr<VaultOptions> Parse(const std::string& yaml) { return ParseOptions(YAML::Load(yaml), kContext); }

constexpr char kAuth[] = "auth: {token: {file: /etc/kmsplugin/vault-token}}\n";

TEST_CASE("VaultSpec: a full section parses into options", "[vault]") {
  auto options = Parse(std::string(R"(
addresses: [https://vault-1:8200/, https://vault-2:8200]
transitMount: kms-transit
keyName: prod-kek
namespace: team/prod/
tls: {caFile: /etc/ca.pem, certFile: /etc/c.pem, keyFile: /etc/c.key, serverName: vault.internal}
auth: {appRole: {mount: ar, roleIdFile: /etc/r, secretIdFile: /etc/s}}
pollInterval: 30s
requestTimeout: 2s
maxRetries: 3
retryMinWait: 50ms
retryMaxWait: 1s
)"));
  REQUIRE_THAT(options, IsOk());
  CHECK(options->addresses == std::vector<std::string>{"https://vault-1:8200", "https://vault-2:8200"});
  CHECK(options->transit_mount == "kms-transit");
  CHECK(options->vault_namespace == "team/prod");
  CHECK(options->auth.kind == AuthKind::kAppRole);
  CHECK(options->auth.mount == "ar");
  CHECK(options->tls.server_name == "vault.internal");
  CHECK(options->poll_interval == absl::Seconds(30));
  CHECK(options->retry.max_retries == 3);
  auto spec = ParseSpec(YAML::Load("address: https://v:8200\nkeyName: k\n" + std::string(kAuth)), kContext);
  REQUIRE_THAT(spec, IsOk());
  CHECK((*spec)->Kind() == "vault");
  CHECK((*spec)->BackendKeyIdentity() == "vault:https://v:8200/transit/keys/k");
}

TEST_CASE("VaultSpec: defaults and environment fallbacks apply only where the config is silent", "[vault]") {
  setenv("VAULT_ADDR", "https://from-env:8200", 1);
  setenv("VAULT_CACERT", "/env/ca.pem", 1);
  setenv("VAULT_NAMESPACE", "envns", 1);
  auto options = Parse(std::string("keyName: k\n") + kAuth);
  REQUIRE_THAT(options, IsOk());
  CHECK(options->addresses == std::vector<std::string>{"https://from-env:8200"});
  CHECK(options->tls.ca_file == "/env/ca.pem");
  CHECK(options->vault_namespace == "envns");
  CHECK(options->transit_mount == "transit");
  auto configured = Parse(std::string("address: https://cfg:8200\nnamespace: cfgns\nkeyName: k\n") + kAuth);
  REQUIRE_THAT(configured, IsOk());
  CHECK(configured->addresses.front() == "https://cfg:8200");
  CHECK(configured->vault_namespace == "cfgns");
  unsetenv("VAULT_ADDR");
  unsetenv("VAULT_CACERT");
  unsetenv("VAULT_NAMESPACE");
}

TEST_CASE("VaultSpec: Kubernetes auth from a service-account token warns that a cold control plane cannot start",
          "[vault]") {
  const std::string base = "address: https://v:8200\nkeyName: k\n";
  auto projected = ParseSpec(
      YAML::Load(base + "auth: {jwt: {role: kms, tokenFile: /var/run/secrets/kubernetes.io/serviceaccount/token}}\n"),
      kContext);
  REQUIRE_THAT(projected, IsOk());
  const std::vector<std::string> warnings = (*projected)->Warnings();
  REQUIRE(warnings.size() == 1);
  CHECK(absl::StrContains(warnings[0], "/var/run/secrets/kubernetes.io/serviceaccount/token"));
  CHECK(absl::StrContains(warnings[0], "auth.cert"));
  CHECK(absl::StrContains(warnings[0], "auth.appRole"));
  // The kubernetes auth mount with a token from elsewhere still needs kube-apiserver's TokenReview.
  auto mount = ParseSpec(YAML::Load(base + "auth: {jwt: {role: kms, tokenFile: /etc/kmsplugin/jwt}}\n"), kContext);
  REQUIRE_THAT(mount, IsOk());
  CHECK((*mount)->Warnings().size() == 1);
  // A JWT of another issuer on another mount, AppRole and certificates: nothing to say.
  for (const std::string& auth :
       {std::string("auth: {jwt: {mount: jwt-oidc, role: kms, tokenFile: /etc/kmsplugin/jwt}}\n"),
        std::string("auth: {appRole: {roleIdFile: /etc/kmsplugin/r, secretIdFile: /etc/kmsplugin/s}}\n"),
        std::string(kAuth)}) {
    auto quiet = ParseSpec(YAML::Load(base + auth), kContext);
    REQUIRE_THAT(quiet, IsOk());
    CHECK((*quiet)->Warnings().empty());
  }
}

TEST_CASE("VaultSpec: YAML errors name the file, the field and the fix", "[vault]") {
  unsetenv("VAULT_ADDR");
  const std::string base = "address: https://v:8200\nkeyName: k\n";
  CHECK_THAT(Parse(std::string("keyName: k\n") + kAuth),
             StatusIs(Code::kInvalidArgument, "environments[0].keySource.vault.address"));
  CHECK_THAT(Parse(std::string("address: https://v:8200\n") + kAuth),
             StatusIs(Code::kInvalidArgument, "keyName"));
  CHECK_THAT(Parse(base + kAuth + "adresses: [https://x]\n"), StatusIs(Code::kInvalidArgument, "adresses"));
  CHECK_THAT(Parse(base), StatusIs(Code::kInvalidArgument, "auth"));
  CHECK_THAT(Parse(base + "auth: {token: {file: /t}, appRole: {roleIdFile: /r, secretIdFile: /s}}\n"),
             StatusIs(Code::kInvalidArgument, "exactly one"));
  CHECK_THAT(Parse(base + "auth: {kerberos: {}}\n"), StatusIs(Code::kInvalidArgument, "kerberos"));
  CHECK_THAT(Parse(base + "auth: {token: {}}\n"), StatusIs(Code::kInvalidArgument, "auth.token.file"));
  CHECK_THAT(Parse(base + "auth: {appRole: {roleIdFile: /r}}\n"),
             StatusIs(Code::kInvalidArgument, "auth.appRole.secretIdFile"));
  CHECK_THAT(Parse(base + "auth: {jwt: {tokenFile: /j}}\n"), StatusIs(Code::kInvalidArgument, "auth.jwt.role"));
  CHECK_THAT(Parse(base + "auth: {cert: {name: kms}}\n"), StatusIs(Code::kInvalidArgument, "tls.certFile"));
  CHECK_THAT(Parse(std::string("address: http://vault.example.com:8200\nkeyName: k\n") + kAuth),
             StatusIs(Code::kInvalidArgument, "plain http"));
  CHECK_THAT(Parse(std::string("address: vault:8200\nkeyName: k\n") + kAuth),
             StatusIs(Code::kInvalidArgument, "https://HOST:PORT"));
  CHECK_THAT(Parse(std::string("address: https://v:8200/v1/transit\nkeyName: k\n") + kAuth),
             StatusIs(Code::kInvalidArgument, "without a path"));
  CHECK_THAT(Parse(std::string("addresses: []\nkeyName: k\n") + kAuth), StatusIs(Code::kInvalidArgument, "empty"));
  CHECK_THAT(Parse(std::string("addresses: [https://a:1, https://a:1/]\nkeyName: k\n") + kAuth),
             StatusIs(Code::kInvalidArgument, "addresses[1]"));
  CHECK_THAT(Parse(std::string("address: https://a:1\naddresses: [https://b:1]\nkeyName: k\n") + kAuth),
             StatusIs(Code::kInvalidArgument, "only one"));
  CHECK_THAT(Parse(std::string("address: https://a:1\nkeyName: a/b\n") + kAuth),
             StatusIs(Code::kInvalidArgument, "keyName"));
  CHECK_THAT(Parse(base + kAuth + "transitMount: ../sys\n"), StatusIs(Code::kInvalidArgument, "transitMount"));
  CHECK_THAT(Parse(base + kAuth + "tls: {certFile: /c}\n"), StatusIs(Code::kInvalidArgument, "tls.keyFile"));
  CHECK_THAT(Parse(base + kAuth + "tls: {ca: /c}\n"), StatusIs(Code::kInvalidArgument, "ca"));
  CHECK_THAT(Parse(base + kAuth + "requestTimeout: 0s\n"), StatusIs(Code::kInvalidArgument, "requestTimeout"));
  CHECK_THAT(Parse(base + kAuth + "pollInterval: soon\n"), StatusIs(Code::kInvalidArgument, "pollInterval"));
  CHECK_THAT(Parse(base + kAuth + "maxRetries: 100\n"), StatusIs(Code::kInvalidArgument, "maxRetries"));
  CHECK_THAT(Parse(base + kAuth + "retryMinWait: 2s\nretryMaxWait: 1s\n"),
             StatusIs(Code::kInvalidArgument, "retryMaxWait"));
  CHECK_THAT(Parse(base + kAuth + "addresses: nope\n"), StatusIs(Code::kInvalidArgument, "addresses"));
  CHECK_THAT(Parse(base + kAuth), IsOk());
  CHECK_THAT(Parse(base + kAuth + "tls: {certFile: /c}\n"), StatusIs(Code::kInvalidArgument, "fix:"));
}

TEST_CASE("VaultSpec: Init creates the transit key once, then reports ALREADY_EXISTS", "[vault]") {
  VaultTestServer server;
  std::string dir = MakeTempDir();
  WriteFile(dir + "/token", "root-setup-token\n");
  std::string yaml = "address: " + server.Address() + "\nkeyName: fresh\ntls: {caFile: " + TestPki::Get().ca +
                     "}\nauth: {token: {file: " + dir + "/token}}\npollInterval: 1h\n";
  auto spec = ParseSpec(YAML::Load(yaml), kContext);
  REQUIRE_THAT(spec, IsOk());
  config::OpenContext context;
  context.environment = "prod";
  context.clock = &core::SystemClock();
  context.worker_threads = 2;
  CHECK_THAT((*spec)->Open(context), StatusIs(Code::kFailedPrecondition, "kmsplugin init"));
  auto created = (*spec)->Init(context);
  REQUIRE_THAT(created, IsOk());
  CHECK(created->find("created") != std::string::npos);
  CHECK_THAT((*spec)->Init(context), StatusIs(Code::kAlreadyExists, "transit/keys/fresh"));
  auto source = (*spec)->Open(context);
  REQUIRE_THAT(source, IsOk());
  auto current = source->source->Current();
  REQUIRE_THAT(current, IsOk());
  CHECK(current->version == 1);
}

}  // namespace
}  // namespace kmsplugin::keysource::vault
