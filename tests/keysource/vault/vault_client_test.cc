#include "kmsplugin/keysource/vault/vault_client.h"

#include <sys/stat.h>

#include <thread>
#include <vector>

#include <catch2/catch.hpp>

#include "absl/strings/match.h"
#include "kmsplugin/keysource/vault/vault_key_source.h"
#include "tests/keysource/vault/vault_test_util.h"
#include "tests/support/status_matchers.h"

namespace kmsplugin::keysource::vault {
namespace {

using ::kmsplugin::testing::In;
using ::kmsplugin::testing::IsOk;
using ::kmsplugin::testing::kTestToken;
using ::kmsplugin::testing::MakeTempDir;
using ::kmsplugin::testing::StatusIs;
using ::kmsplugin::testing::TestPki;
using ::kmsplugin::testing::TokenOptions;
using ::kmsplugin::testing::VaultTestServer;
using ::kmsplugin::testing::WriteFile;
using Code = absl::StatusCode;

constexpr char kSeed[] = "0123456789abcdef0123456789abcdef";
constexpr char kAad[] = "env=prod;key=1";

std::shared_ptr<VaultKeySource> MustOpen(VaultOptions options, bool background = false) {
  auto source = VaultKeySource::Open(std::move(options), &core::SystemClock(), 4, background);
  REQUIRE_THAT(source, IsOk());
  return *source;
}

// Wrap + Unwrap once with the current version.
absl::Status RoundTrip(VaultKeySource& source, absl::Duration budget = absl::Seconds(5)) {
  auto current = source.Current();
  if (!current.ok()) {
    return current.status();
  }
  auto wrapped = source.Wrap(*current, kSeed, kAad, In(budget));
  if (!wrapped.ok()) {
    return wrapped.status();
  }
  auto plain = source.Unwrap(current->key_ref, *wrapped, kAad, In(budget));
  return plain.status();
}

VaultOptions AppRoleOptions(VaultTestServer& server, const std::string& dir, const std::string& secret = "s3cret-id") {
  server.Control({{"approle", {{"role_id", "role-1"}, {"secret_id", "s3cret-id"}}}});
  VaultOptions o = TokenOptions(server, dir);
  o.auth = AuthOptions();
  o.auth.kind = AuthKind::kAppRole;
  o.auth.mount = "approle";
  o.auth.role_id_file = dir + "/role_id";
  o.auth.secret_id_file = dir + "/secret_id";
  WriteFile(o.auth.role_id_file, "role-1\n");
  WriteFile(o.auth.secret_id_file, secret + "\n");
  return o;
}

TEST_CASE("VaultClient: a token file readable by others is refused, naming the file and the fix", "[vault]") {
  VaultTestServer server;
  server.Control({{"create_key", {{"name", "kms"}}}});
  std::string dir = MakeTempDir();
  VaultOptions options = TokenOptions(server, dir);
  chmod(options.auth.token_file.c_str(), 0644);
  auto source = VaultKeySource::Open(options, &core::SystemClock(), 2, false);
  CHECK_THAT(source, StatusIs(Code::kFailedPrecondition, options.auth.token_file));
  CHECK_THAT(source, StatusIs(Code::kFailedPrecondition, "chmod 600"));
  chmod(options.auth.token_file.c_str(), 0640);
  CHECK_THAT(VaultKeySource::Open(options, &core::SystemClock(), 2, false), StatusIs(Code::kFailedPrecondition, "0640"));
  CHECK_THAT(ReadCredentialFile(dir + "/missing", "Vault token file"),
             StatusIs(Code::kFailedPrecondition, "missing"));
  WriteFile(dir + "/empty", "\n");
  CHECK_THAT(ReadCredentialFile(dir + "/empty", "Vault token file"), StatusIs(Code::kFailedPrecondition, "empty"));
  WriteFile(dir + "/blanks", "  hvs.PADDED \n");
  auto padded = ReadCredentialFile(dir + "/blanks", "Vault token file");
  REQUIRE_THAT(padded, IsOk());
  CHECK(padded->bytes.view() == "hvs.PADDED");
  WriteFile(dir + "/binary", std::string("hvs.\x01" "bad"));
  CHECK_THAT(ReadCredentialFile(dir + "/binary", "Vault token file"), StatusIs(Code::kFailedPrecondition));
}

TEST_CASE("VaultClient: a revoked token file is PERMISSION_DENIED after one re-read, never a loop", "[vault]") {
  VaultTestServer server;
  server.Control({{"create_key", {{"name", "kms"}}}});
  auto source = MustOpen(TokenOptions(server, MakeTempDir()));
  auto current = source->Current();
  REQUIRE_THAT(current, IsOk());
  server.Control({{"revoke_tokens", true}, {"reset_stats", true}});
  auto wrapped = source->Wrap(*current, kSeed, kAad, In(absl::Seconds(5)));
  CHECK_THAT(wrapped, StatusIs(Code::kPermissionDenied, "refused the token from"));
  CHECK(server.Requests(0, "/v1/transit/encrypt/kms") == 1);
  CHECK_FALSE(absl::StrContains(wrapped.status().message(), kTestToken));
}

TEST_CASE("VaultClient: a changed token file is picked up without a restart", "[vault]") {
  VaultTestServer server;
  server.Control({{"create_key", {{"name", "kms"}}}});
  VaultOptions options = TokenOptions(server, MakeTempDir());
  auto source = MustOpen(options);
  server.Control({{"revoke_tokens", true}});
  server.Control({{"add_token", {{"id", "hvs.SECOND-TOKEN"}, {"ttl", 0}}}});
  WriteFile(options.auth.token_file, "hvs.SECOND-TOKEN\n");
  CHECK_THAT(RoundTrip(*source), IsOk());
}

TEST_CASE("VaultClient: a token is renewed at about two thirds of its TTL", "[vault]") {
  VaultTestServer server;
  server.Control({{"create_key", {{"name", "kms"}}}});
  VaultOptions options = TokenOptions(server, MakeTempDir(), "hvs.SHORT-LIVED", /*ttl=*/3);
  auto source = MustOpen(options, /*background=*/true);
  for (int i = 0; i < 10; ++i) {  // 5 s: past the original 3 s TTL
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    REQUIRE_THAT(RoundTrip(*source), IsOk());
  }
  CHECK(server.Requests(0, "/v1/auth/token/renew-self") >= 2);
  CHECK(source->client().TokenTimeToLive() > absl::ZeroDuration());
  const auto gauges = source->BackendGauges();
  REQUIRE(gauges.size() == 1);
  CHECK(gauges[0].name == "kmsplugin_vault_token_ttl_seconds");
  CHECK(gauges[0].value > 0);
  CHECK(gauges[0].value <= 3);
}

TEST_CASE("VaultClient: AppRole logs in, renews, and logs in again after its tokens are revoked", "[vault]") {
  VaultTestServer server;
  server.Control({{"create_key", {{"name", "kms"}}}, {"token_ttl", 3}, {"token_max_ttl", 60}});
  auto source = MustOpen(AppRoleOptions(server, MakeTempDir()), /*background=*/true);
  REQUIRE_THAT(RoundTrip(*source), IsOk());
  CHECK(server.Requests(0, "/v1/auth/approle/login") == 1);
  server.Control({{"revoke_tokens", true}});
  REQUIRE_THAT(RoundTrip(*source), IsOk());
  CHECK(server.Requests(0, "/v1/auth/approle/login") == 2);
  std::this_thread::sleep_for(std::chrono::milliseconds(2600));
  CHECK(server.Requests(0, "/v1/auth/token/renew-self") >= 1);
  REQUIRE_THAT(RoundTrip(*source), IsOk());
}

TEST_CASE("VaultClient: AppRole logs in again when the max TTL ends renewals", "[vault]") {
  VaultTestServer server;
  server.Control({{"create_key", {{"name", "kms"}}}, {"token_ttl", 2}, {"token_max_ttl", 2}});
  auto source = MustOpen(AppRoleOptions(server, MakeTempDir()), /*background=*/true);
  for (int i = 0; i < 8; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    REQUIRE_THAT(RoundTrip(*source), IsOk());
  }
  CHECK(server.Requests(0, "/v1/auth/approle/login") >= 2);
}

TEST_CASE("VaultClient: failed renewals back off and log in again before the lease runs out", "[vault]") {
  VaultTestServer server;
  server.Control({{"create_key", {{"name", "kms"}}}, {"token_ttl", 3}, {"token_max_ttl", 600}});
  auto source = MustOpen(AppRoleOptions(server, MakeTempDir()), /*background=*/true);
  server.Control({{"fail_count", 100000}, {"fail_status", 500}, {"fail_path", "renew-self"}});
  for (int i = 0; i < 10; ++i) {  // 5 s: well past the 3 s lease
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    REQUIRE_THAT(RoundTrip(*source), IsOk());
  }
  int renewals = server.Requests(0, "/v1/auth/token/renew-self");
  CHECK(renewals >= 3);
  CHECK(renewals <= 40);  // backoff, not a hot loop
  CHECK(server.Requests(0, "/v1/auth/approle/login") >= 2);
  // No call ever saw the expired token: every encrypt succeeded on its first request.
  CHECK(server.Requests(0, "/v1/transit/encrypt/kms") == 10);
}

TEST_CASE("VaultClient: AppRole with a wrong secret_id is PERMISSION_DENIED without the secret", "[vault]") {
  VaultTestServer server;
  server.Control({{"create_key", {{"name", "kms"}}}});
  auto source = VaultKeySource::Open(AppRoleOptions(server, MakeTempDir(), "wrong-secret-xyz"),
                                     &core::SystemClock(), 2, false);
  CHECK_THAT(source, StatusIs(Code::kPermissionDenied, "invalid role or secret ID"));
  CHECK_FALSE(absl::StrContains(source.status().message(), "wrong-secret-xyz"));
  CHECK(server.Requests(0, "/v1/auth/approle/login") == 1);
}

TEST_CASE("VaultClient: AppRole secret_id file readable by group is refused", "[vault]") {
  VaultTestServer server;
  server.Control({{"create_key", {{"name", "kms"}}}});
  std::string dir = MakeTempDir();
  VaultOptions options = AppRoleOptions(server, dir);
  chmod(options.auth.secret_id_file.c_str(), 0640);
  CHECK_THAT(VaultKeySource::Open(options, &core::SystemClock(), 2, false),
             StatusIs(Code::kFailedPrecondition, "secret_id file " + options.auth.secret_id_file));
}

TEST_CASE("VaultClient: JWT login sends the role and the token file's JWT", "[vault]") {
  VaultTestServer server;
  server.Control({{"create_key", {{"name", "kms"}}}, {"jwt_role", {{"role", "kms"}, {"jwt", "eyJ.jwt.sig"}}}});
  std::string dir = MakeTempDir();
  VaultOptions options = TokenOptions(server, dir);
  options.auth = AuthOptions();
  options.auth.kind = AuthKind::kJwt;
  options.auth.mount = "kubernetes";
  options.auth.role = "kms";
  options.auth.jwt_file = dir + "/jwt";
  WriteFile(options.auth.jwt_file, "eyJ.jwt.sig");
  auto source = MustOpen(options);
  CHECK_THAT(RoundTrip(*source), IsOk());
  options.auth.role = "other";
  CHECK_THAT(VaultKeySource::Open(options, &core::SystemClock(), 2, false),
             StatusIs(Code::kPermissionDenied, "invalid role name"));
  options.auth.role = "kms";
  WriteFile(options.auth.jwt_file, "eyJ.other.sig");
  CHECK_THAT(VaultKeySource::Open(options, &core::SystemClock(), 2, false), StatusIs(Code::kPermissionDenied));
}

TEST_CASE("VaultClient: TLS cert auth logs in with the client certificate", "[vault]") {
  VaultTestServer server(VaultTestServer::Options::ClientCa());
  server.Control({{"create_key", {{"name", "kms"}}}, {"cert_role", {{"name", "kms"}}}});
  VaultOptions options = TokenOptions(server, MakeTempDir());
  options.auth = AuthOptions();
  options.auth.kind = AuthKind::kCert;
  options.auth.mount = "cert";
  options.auth.cert_name = "kms";
  options.tls.cert_file = TestPki::Get().client_cert;
  options.tls.key_file = TestPki::Get().client_key;
  auto source = MustOpen(options);
  CHECK_THAT(RoundTrip(*source), IsOk());
  options.tls.cert_file.clear();
  options.tls.key_file.clear();
  CHECK_THAT(VaultKeySource::Open(options, &core::SystemClock(), 2, false),
             StatusIs(Code::kPermissionDenied, "client certificate"));
}

TEST_CASE("VaultClient: a wrong CA is refused with a clear error", "[vault]") {
  VaultTestServer server;
  server.Control({{"create_key", {{"name", "kms"}}}});
  VaultOptions options = TokenOptions(server, MakeTempDir());
  options.tls.ca_file = TestPki::Get().other_ca;
  auto source = MustOpen(options);
  server.Control({{"reset_stats", true}});
  absl::Status refresh = source->Refresh(In(absl::Seconds(5)));
  CHECK_THAT(refresh, StatusIs(Code::kUnavailable, "TLS verification failed"));
  CHECK_THAT(refresh, StatusIs(Code::kUnavailable, "tls.caFile"));
  CHECK(server.Requests(0, "/v1/transit/keys/kms") == 0);
}

TEST_CASE("VaultClient: the server name override verifies the certificate's name", "[vault]") {
  VaultTestServer server;
  server.Control({{"create_key", {{"name", "kms"}}}});
  VaultOptions options = TokenOptions(server, MakeTempDir());
  options.tls.server_name = "vault.test";
  auto source = MustOpen(options);
  CHECK_THAT(RoundTrip(*source), IsOk());
  options.tls.server_name = "wrong.example";
  auto wrong = MustOpen(options);
  CHECK_THAT(wrong->Refresh(In(absl::Seconds(5))), StatusIs(Code::kUnavailable, "TLS verification failed"));
}

TEST_CASE("VaultClient: fails over when the first server is sealed", "[vault]") {
  VaultTestServer server(VaultTestServer::Options::Listeners(2));
  server.Control({{"create_key", {{"name", "kms"}}}});
  auto source = MustOpen(TokenOptions(server, MakeTempDir()));
  server.Control({{"listener", 0}, {"sealed", true}});
  CHECK_THAT(RoundTrip(*source), IsOk());
  CHECK(server.Requests(1, "/v1/transit/encrypt/kms") == 1);
  CHECK(server.Requests(0, "/v1/transit/encrypt/kms") == 1);
  // The healthy address stays preferred.
  CHECK_THAT(RoundTrip(*source), IsOk());
  CHECK(server.Requests(0, "/v1/transit/encrypt/kms") == 1);
  server.Control({{"all", true}, {"sealed", true}});
  CHECK_THAT(RoundTrip(*source), StatusIs(Code::kUnavailable, "Vault is sealed"));
}

TEST_CASE("VaultClient: fails over when the first server is killed", "[vault]") {
  VaultTestServer server(VaultTestServer::Options::Listeners(2));
  server.Control({{"create_key", {{"name", "kms"}}}});
  auto source = MustOpen(TokenOptions(server, MakeTempDir()));
  server.Control({{"listener", 0}, {"close", true}});
  CHECK_THAT(RoundTrip(*source), IsOk());
  server.Control({{"listener", 1}, {"close", true}});
  absl::Status down = RoundTrip(*source);
  CHECK_THAT(down, StatusIs(Code::kUnavailable, "127.0.0.1"));
}

TEST_CASE("VaultClient: fails over when the first server hangs, within the deadline", "[vault]") {
  VaultTestServer server(VaultTestServer::Options::Listeners(2));
  server.Control({{"create_key", {{"name", "kms"}}}});
  auto source = MustOpen(TokenOptions(server, MakeTempDir()));
  auto current = source->Current();
  REQUIRE_THAT(current, IsOk());
  server.Control({{"listener", 0}, {"hang", true}});
  absl::Time start = absl::Now();
  auto wrapped = source->Wrap(*current, kSeed, kAad, In(absl::Seconds(2)));
  CHECK_THAT(wrapped, IsOk());
  CHECK(absl::Now() - start < absl::Milliseconds(1800));
  server.Control({{"listener", 0}, {"hang", false}});
}

TEST_CASE("VaultClient: a never-answering server ends the call by the deadline", "[vault]") {
  VaultTestServer server;
  server.Control({{"create_key", {{"name", "kms"}}}});
  auto source = MustOpen(TokenOptions(server, MakeTempDir()));
  auto current = source->Current();
  REQUIRE_THAT(current, IsOk());
  server.Control({{"hang", true}});
  absl::Time start = absl::Now();
  auto wrapped = source->Wrap(*current, kSeed, kAad, In(absl::Milliseconds(800)));
  absl::Duration took = absl::Now() - start;
  CHECK((wrapped.status().code() == Code::kDeadlineExceeded || wrapped.status().code() == Code::kUnavailable));
  CHECK(took < absl::Milliseconds(1300));
  CHECK(took >= absl::Milliseconds(700));
  server.Control({{"hang", false}});
}

TEST_CASE("VaultClient: a short 429 storm is retried, honouring Retry-After", "[vault]") {
  VaultTestServer server;
  server.Control({{"create_key", {{"name", "kms"}}}});
  auto source = MustOpen(TokenOptions(server, MakeTempDir()));
  server.Control({{"rate_limit_count", 2}, {"retry_after", 0}, {"reset_stats", true}});
  auto current = source->Current();
  REQUIRE_THAT(current, IsOk());
  CHECK_THAT(source->Wrap(*current, kSeed, kAad, In(absl::Seconds(5))), IsOk());
  CHECK(server.Requests(0, "/v1/transit/encrypt/kms") == 3);
}

TEST_CASE("VaultClient: an endless 429 storm fails UNAVAILABLE, bounded", "[vault]") {
  VaultTestServer server;
  server.Control({{"create_key", {{"name", "kms"}}}});
  auto source = MustOpen(TokenOptions(server, MakeTempDir()));
  auto current = source->Current();
  REQUIRE_THAT(current, IsOk());
  server.Control({{"rate_limit_count", 1000}, {"reset_stats", true}});
  auto wrapped = source->Wrap(*current, kSeed, kAad, In(absl::Seconds(5)));
  CHECK_THAT(wrapped, StatusIs(Code::kUnavailable, "rate limit quota exceeded"));
  CHECK(server.Requests(0, "/v1/transit/encrypt/kms") == 3);  // 1 + maxRetries
  // A Retry-After beyond the deadline stops at once.
  server.Control({{"rate_limit_count", 1000}, {"retry_after", 30}});
  absl::Time start = absl::Now();
  CHECK_THAT(source->Wrap(*current, kSeed, kAad, In(absl::Seconds(2))), StatusIs(Code::kUnavailable, "deadline"));
  CHECK(absl::Now() - start < absl::Seconds(1));
}

TEST_CASE("VaultClient: 500 and 502 are retried, 501 is not", "[vault]") {
  VaultTestServer server;
  server.Control({{"create_key", {{"name", "kms"}}}});
  auto source = MustOpen(TokenOptions(server, MakeTempDir()));
  auto current = source->Current();
  REQUIRE_THAT(current, IsOk());
  server.Control({{"fail_count", 2}, {"fail_status", 502}, {"reset_stats", true}});
  CHECK_THAT(source->Wrap(*current, kSeed, kAad, In(absl::Seconds(5))), IsOk());
  CHECK(server.Requests(0, "/v1/transit/encrypt/kms") == 3);
  server.Control({{"fail_count", 1}, {"fail_status", 501}, {"reset_stats", true}});
  CHECK_THAT(source->Wrap(*current, kSeed, kAad, In(absl::Seconds(5))), StatusIs(Code::kUnavailable, "HTTP 501"));
  CHECK(server.Requests(0, "/v1/transit/encrypt/kms") == 1);
}

TEST_CASE("VaultClient: 400 from decrypt is not retried", "[vault]") {
  VaultTestServer server(VaultTestServer::Options::Listeners(2));
  server.Control({{"create_key", {{"name", "kms"}}}});
  auto source = MustOpen(TokenOptions(server, MakeTempDir()));
  auto current = source->Current();
  REQUIRE_THAT(current, IsOk());
  server.Control({{"all", true}, {"reset_stats", true}});
  CHECK_THAT(source->Unwrap(current->key_ref, "vault:v1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", kAad, In(absl::Seconds(5))),
             StatusIs(Code::kInvalidArgument, "HTTP 400"));
  CHECK(server.Requests(0, "/v1/transit/decrypt/kms") + server.Requests(1, "/v1/transit/decrypt/kms") == 1);
}

TEST_CASE("VaultClient: a standby's 307 is followed once, never from https to http", "[vault]") {
  VaultTestServer server(VaultTestServer::Options::Listeners(2));
  server.Control({{"create_key", {{"name", "kms"}}}});
  VaultOptions options = TokenOptions(server, MakeTempDir());
  auto source = MustOpen(options);
  server.Control({{"listener", 0}, {"standby_redirect", server.Address(1)}});
  CHECK_THAT(RoundTrip(*source), IsOk());
  CHECK(server.Requests(1, "/v1/transit/encrypt/kms") == 1);
  // Each case below with a client that still prefers the standby (a learnt redirect goes straight to the active
  // node, see vault_recovery_test.cc).
  server.Control({{"listener", 0}, {"standby_redirect", "http://127.0.0.1:" + std::to_string(server.Port(1))}});
  CHECK_THAT(RoundTrip(*MustOpen(options)), StatusIs(Code::kUnavailable, "from https to"));
  // Two hops are refused: 0 -> 1 -> 0.
  server.Control({{"listener", 0}, {"standby_redirect", server.Address(1)}});
  server.Control({{"listener", 1}, {"standby_redirect", server.Address(0)}});
  CHECK_THAT(RoundTrip(*MustOpen(options)), StatusIs(Code::kUnavailable, "redirected twice"));
}

TEST_CASE("VaultClient: the token never appears in any status message", "[vault]") {
  VaultTestServer server(VaultTestServer::Options::Listeners(2));
  server.Control({{"create_key", {{"name", "kms"}}}});
  std::string dir = MakeTempDir();
  VaultOptions options = TokenOptions(server, dir);
  auto source = MustOpen(options);
  auto current = source->Current();
  REQUIRE_THAT(current, IsOk());
  std::vector<absl::Status> seen;
  auto wrap = [&](absl::Duration budget = absl::Seconds(3)) {
    seen.push_back(source->Wrap(*current, kSeed, kAad, In(budget)).status());
    seen.push_back(source->Unwrap(current->key_ref, "vault:v1:AAAA", kAad, In(budget)).status());
    seen.push_back(source->Refresh(In(budget)));
    seen.push_back(source->Rotate(In(budget)).status());
  };
  server.Control({{"all", true}, {"sealed", true}});
  wrap();
  server.Control({{"all", true}, {"sealed", false}});
  server.Control({{"all", true}, {"rate_limit_count", 50}});
  wrap();
  server.Control({{"all", true}, {"rate_limit_count", 0}, {"fail_count", 50}, {"fail_status", 500}});
  wrap();
  server.Control({{"all", true}, {"fail_count", 0}, {"hang", true}});
  wrap(absl::Milliseconds(300));
  server.Control({{"all", true}, {"hang", false}, {"revoke_tokens", true}});
  wrap();
  chmod(options.auth.token_file.c_str(), 0644);
  wrap();
  seen.push_back(VaultKeySource::Open(options, &core::SystemClock(), 1, false).status());
  VaultOptions wrong_ca = options;
  wrong_ca.tls.ca_file = TestPki::Get().other_ca;
  chmod(options.auth.token_file.c_str(), 0600);
  auto bad = MustOpen(wrong_ca);
  seen.push_back(bad->Refresh(In(absl::Seconds(2))));
  int failures = 0;
  for (const absl::Status& s : seen) {
    if (!s.ok()) {
      ++failures;
    }
    CHECK_FALSE(absl::StrContains(s.ToString(), kTestToken));
    CHECK_FALSE(absl::StrContains(s.ToString(), "TOKEN-SECRET"));
  }
  CHECK(failures >= 20);
}

}  // namespace
}  // namespace kmsplugin::keysource::vault
