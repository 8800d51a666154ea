// Issue 10, Vault part: every refresh through core::CheckAdvance, archived versions kept as retired, messages that
// name versions by number and tell "denied by policy" from "token invalid or expired", renewal driven by the TTL
// Vault reports, one event per recovery, and a standby's 307 remembered.

#include <thread>
#include <vector>

#include <catch2/catch.hpp>

#include "absl/strings/match.h"
#include "kmsplugin/core/events.h"
#include "kmsplugin/keysource/vault/vault_key_source.h"
#include "tests/keysource/vault/vault_test_util.h"
#include "tests/support/recording_event_sink.h"
#include "tests/support/status_matchers.h"

namespace kmsplugin::keysource::vault {
namespace {

using ::kmsplugin::testing::In;
using ::kmsplugin::testing::IsOk;
using ::kmsplugin::testing::kTestToken;
using ::kmsplugin::testing::MakeTempDir;
using ::kmsplugin::testing::RecordingEventSink;
using ::kmsplugin::testing::StatusIs;
using ::kmsplugin::testing::TokenOptions;
using ::kmsplugin::testing::VaultTestServer;
using ::kmsplugin::testing::WriteFile;
using Code = absl::StatusCode;
namespace event = core::event;

constexpr char kSeed[] = "0123456789abcdef0123456789abcdef";
constexpr char kAad[] = "env=prod;key=1";

std::shared_ptr<VaultKeySource> MustOpen(VaultOptions options, core::EventSink* events, bool background = false) {
  auto source = VaultKeySource::Open(std::move(options), &core::SystemClock(), 4, background, events);
  REQUIRE_THAT(source, IsOk());
  return *source;
}

absl::Status RoundTrip(VaultKeySource& source) {
  auto current = source.Current();
  if (!current.ok()) {
    return current.status();
  }
  auto wrapped = source.Wrap(*current, kSeed, kAad, In(absl::Seconds(5)));
  if (!wrapped.ok()) {
    return wrapped.status();
  }
  return source.Unwrap(current->key_ref, *wrapped, kAad, In(absl::Seconds(5))).status();
}

// Waits up to `budget` for `done`.
template <typename F>
bool Eventually(F done, absl::Duration budget = absl::Seconds(5)) {
  absl::Time end = absl::Now() + budget;
  while (absl::Now() < end) {
    if (done()) {
      return true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return done();
}

VaultOptions AppRoleOptions(VaultTestServer& server, const std::string& dir) {
  server.Control({{"approle", {{"role_id", "role-1"}, {"secret_id", "s3cret-id"}}}});
  VaultOptions o = TokenOptions(server, dir);
  o.auth = AuthOptions();
  o.auth.kind = AuthKind::kAppRole;
  o.auth.mount = "approle";
  o.auth.role_id_file = dir + "/role_id";
  o.auth.secret_id_file = dir + "/secret_id";
  WriteFile(o.auth.role_id_file, "role-1\n");
  WriteFile(o.auth.secret_id_file, "s3cret-id\n");
  return o;
}

// --- versions: CheckAdvance, archived versions, messages by number --------------------------------------------------

TEST_CASE("VaultKeySource: versions below min_decryption_version stay listed as retired after a refresh",
          "[vault][versions]") {
  VaultTestServer server;
  server.Control({{"create_key", {{"name", "kms"}}}});
  RecordingEventSink events;
  auto source = MustOpen(TokenOptions(server, MakeTempDir()), &events);
  auto v1 = source->Current();
  REQUIRE_THAT(v1, IsOk());
  auto wrapped = source->Wrap(*v1, kSeed, kAad, In(absl::Seconds(5)));
  REQUIRE_THAT(wrapped, IsOk());
  REQUIRE_THAT(source->Rotate(In(absl::Seconds(5))), IsOk());
  REQUIRE_THAT(source->Rotate(In(absl::Seconds(5))), IsOk());
  // Another operator raises the floor: Vault archives versions 1 and 2 and stops listing them.
  server.Control({{"key_config", {{"name", "kms"}, {"min_decryption_version", 3}}}});
  events.Clear();
  REQUIRE_THAT(source->Refresh(In(absl::Seconds(5))), IsOk());
  auto versions = source->Versions();
  REQUIRE_THAT(versions, IsOk());
  REQUIRE(versions->size() == 3);
  CHECK((*versions)[0].version == 1);
  CHECK((*versions)[0].state == core::KeyState::kRetired);
  CHECK((*versions)[0].key_id == v1->key_id);
  CHECK((*versions)[1].state == core::KeyState::kRetired);
  CHECK((*versions)[2].state == core::KeyState::kCurrent);
  CHECK(events.Count(event::kKeyVersionsChanged) == 1);
  CHECK(absl::StrContains(events.Last(event::kKeyVersionsChanged), "retired 1, 2"));
  auto looked = source->Lookup(v1->key_ref);
  REQUIRE_THAT(looked, IsOk());
  CHECK(looked->state == core::KeyState::kRetired);
  absl::Status refused = source->Unwrap(v1->key_ref, *wrapped, kAad, In(absl::Seconds(5))).status();
  CHECK_THAT(refused, StatusIs(Code::kFailedPrecondition, "key version 1 is retired (min_decryption_version is 3)"));
  CHECK_FALSE(absl::StrContains(refused.message(), "7631"));  // never the hex of the key reference
  // A second refresh with nothing new changes nothing and says nothing.
  REQUIRE_THAT(source->Refresh(In(absl::Seconds(5))), IsOk());
  CHECK(source->Versions()->size() == 3);
  CHECK(events.Count(event::kKeyVersionsChanged) == 1);
  // Reinstate brings them back from Vault's archive, as active.
  auto reinstated = source->Reinstate(1, In(absl::Seconds(5)));
  REQUIRE_THAT(reinstated, IsOk());
  CHECK(reinstated->size() == 2);
  CHECK_THAT(source->Unwrap(v1->key_ref, *wrapped, kAad, In(absl::Seconds(5))), IsOk());
}

TEST_CASE("VaultKeySource: a process that never saw an archived version refuses it by number and state",
          "[vault][versions]") {
  VaultTestServer server;
  server.Control({{"create_key", {{"name", "kms"}}}});
  auto first = MustOpen(TokenOptions(server, MakeTempDir()), nullptr);
  auto v1 = first->Current();
  REQUIRE_THAT(v1, IsOk());
  auto wrapped = first->Wrap(*v1, kSeed, kAad, In(absl::Seconds(5)));
  REQUIRE_THAT(wrapped, IsOk());
  REQUIRE_THAT(first->Rotate(In(absl::Seconds(5))), IsOk());
  REQUIRE_THAT(first->Rotate(In(absl::Seconds(5))), IsOk());
  server.Control({{"key_config", {{"name", "kms"}, {"min_decryption_version", 3}}}});

  auto fresh = MustOpen(TokenOptions(server, MakeTempDir()), nullptr);
  server.Control({{"reset_stats", true}});
  auto looked = fresh->Lookup(v1->key_ref);
  REQUIRE_THAT(looked, IsOk());
  CHECK(looked->version == 1);
  CHECK(looked->state == core::KeyState::kRetired);
  CHECK(looked->key_id == v1->key_id);
  CHECK_THAT(fresh->Unwrap(v1->key_ref, *wrapped, kAad, In(absl::Seconds(5))),
             StatusIs(Code::kFailedPrecondition, "key version 1 is retired (min_decryption_version is 3)"));
  CHECK(server.Requests(0, "/v1/transit/decrypt/kms") == 0);  // refused locally
  // An unknown version is named by number too.
  auto unknown = fresh->Lookup("v9@1700000000");
  CHECK_THAT(unknown, StatusIs(Code::kNotFound, "no key version 9"));
}

TEST_CASE("VaultKeySource: a re-created key is a refused view: Status keeps its key_id, nothing is encrypted",
          "[vault][versions]") {
  VaultTestServer server;
  server.Control({{"create_key", {{"name", "kms"}, {"created", 1700000000}}}});
  RecordingEventSink events;
  auto source = MustOpen(TokenOptions(server, MakeTempDir()), &events);
  auto old_version = source->Current();
  REQUIRE_THAT(old_version, IsOk());
  auto wrapped = source->Wrap(*old_version, kSeed, kAad, In(absl::Seconds(5)));
  REQUIRE_THAT(wrapped, IsOk());
  server.Control({{"delete_key", {{"name", "kms"}}}});
  server.Control({{"create_key", {{"name", "kms"}, {"created", 1700000100}}}});
  CHECK_THAT(source->Refresh(In(absl::Seconds(5))), StatusIs(Code::kFailedPrecondition, "re-created"));
  CHECK(events.Count(event::kVersionViewRefused) == 1);
  auto still = source->Current();
  REQUIRE_THAT(still, IsOk());
  CHECK(still->key_id == old_version->key_id);  // the key_id never moves
  // Vault's version 1 is another key now: nothing is encrypted under the old identity.
  CHECK_THAT(source->Wrap(*still, kSeed, kAad, In(absl::Seconds(5))),
             StatusIs(Code::kFailedPrecondition, "re-created"));
  CHECK_THAT(source->Unwrap(old_version->key_ref, *wrapped, kAad, In(absl::Seconds(5))),
             StatusIs(Code::kFailedPrecondition, "re-created"));
  // The same refusal again is not a second event.
  CHECK_THAT(source->Refresh(In(absl::Seconds(5))), StatusIs(Code::kFailedPrecondition));
  CHECK(events.Count(event::kVersionViewRefused) == 1);
  // A process that starts now sees the new key under a key_id never used before.
  auto other = MustOpen(TokenOptions(server, MakeTempDir()), nullptr);
  auto new_version = other->Current();
  REQUIRE_THAT(new_version, IsOk());
  CHECK(new_version->key_id != old_version->key_id);
}

TEST_CASE("VaultKeySource: a rotation seen by a refresh is one key_versions_changed event", "[vault][versions]") {
  VaultTestServer server;
  server.Control({{"create_key", {{"name", "kms"}}}});
  RecordingEventSink events;
  auto source = MustOpen(TokenOptions(server, MakeTempDir()), &events);
  auto other = MustOpen(TokenOptions(server, MakeTempDir()), nullptr);
  REQUIRE_THAT(other->Rotate(In(absl::Seconds(5))), IsOk());
  events.Clear();
  REQUIRE_THAT(source->Refresh(In(absl::Seconds(5))), IsOk());
  REQUIRE_THAT(source->Refresh(In(absl::Seconds(5))), IsOk());
  CHECK(events.Count(event::kKeyVersionsChanged) == 1);
  CHECK(absl::StrContains(events.Last(event::kKeyVersionsChanged), "current 1 -> 2"));
}

// --- 403: denied by policy, or token invalid ------------------------------------------------------------------------

TEST_CASE("VaultKeySource: a rotate denied by the token's policy says so, naming the path and the capability",
          "[vault][messages]") {
  VaultTestServer server;
  server.Control({{"create_key", {{"name", "kms"}}}});
  server.Control({{"policy",
                   {{"name", "kms-serve"},
                    {"paths",
                     {{"transit/keys/kms", {"read"}},
                      {"transit/encrypt/kms", {"update"}},
                      {"transit/decrypt/kms", {"update"}}}}}}});
  std::string dir = MakeTempDir();
  VaultOptions options = TokenOptions(server, dir, "hvs.SERVE-ONLY");
  server.Control({{"add_token", {{"id", "hvs.SERVE-ONLY"}, {"ttl", 0}, {"policies", {"default", "kms-serve"}}}}});
  auto source = MustOpen(options, nullptr);
  REQUIRE_THAT(RoundTrip(*source), IsOk());
  absl::Status rotate = source->Rotate(In(absl::Seconds(5))).status();
  CHECK_THAT(rotate, StatusIs(Code::kPermissionDenied, "permission denied by policy"));
  CHECK_THAT(rotate, StatusIs(Code::kPermissionDenied, "transit/keys/kms/rotate"));
  CHECK_THAT(rotate, StatusIs(Code::kPermissionDenied, "update"));
  CHECK_FALSE(absl::StrContains(rotate.message(), "write a valid"));
  CHECK_FALSE(absl::StrContains(rotate.message(), "hvs.SERVE-ONLY"));
  // The token itself still works.
  CHECK_THAT(RoundTrip(*source), IsOk());

  // A revoked token is the other case, and says so.
  server.Control({{"revoke_tokens", true}});
  absl::Status revoked = source->Rotate(In(absl::Seconds(5))).status();
  CHECK_THAT(revoked, StatusIs(Code::kPermissionDenied, "invalid or expired"));
  CHECK_FALSE(absl::StrContains(revoked.message(), "by policy"));
}

TEST_CASE("VaultKeySource: an AppRole token denied by policy does not log in again", "[vault][messages]") {
  VaultTestServer server;
  server.Control({{"create_key", {{"name", "kms"}}}});
  server.Control({{"policy", {{"name", "kms"}, {"paths", {{"transit/keys/kms", {"read"}}}}}}});
  auto source = MustOpen(AppRoleOptions(server, MakeTempDir()), nullptr);
  int logins = server.Requests(0, "/v1/auth/approle/login");
  absl::Status rotate = source->Rotate(In(absl::Seconds(5))).status();
  CHECK_THAT(rotate, StatusIs(Code::kPermissionDenied, "permission denied by policy"));
  CHECK_THAT(rotate, StatusIs(Code::kPermissionDenied, "transit/keys/kms/rotate"));
  CHECK(server.Requests(0, "/v1/auth/approle/login") == logins);
}

// --- renewal from the TTL Vault reports -----------------------------------------------------------------------------

TEST_CASE("VaultClient: renewal follows the TTL Vault reports, not the local countdown", "[vault][renewal]") {
  VaultTestServer server;
  server.Control({{"create_key", {{"name", "kms"}}}});
  RecordingEventSink events;
  VaultOptions options = TokenOptions(server, MakeTempDir(), kTestToken, /*ttl=*/60);
  options.poll_interval = absl::Milliseconds(300);
  auto source = MustOpen(options, &events, /*background=*/true);
  REQUIRE_THAT(RoundTrip(*source), IsOk());
  // The plugin thinks 60 s are left; Vault says 2 (a suspended host, a skewed clock, an operator).
  server.Control({{"set_token_ttl", {{"id", kTestToken}, {"ttl", 2}}}});
  std::this_thread::sleep_for(std::chrono::milliseconds(3500));
  CHECK_THAT(RoundTrip(*source), IsOk());
  CHECK(server.Requests(0, "/v1/auth/token/renew-self") >= 1);
  CHECK(source->client().TokenTimeToLive() > absl::Seconds(10));
  CHECK(events.Count(event::kTokenRenewed) >= 1);
}

TEST_CASE("VaultClient: a token Vault ended early is replaced by a new login before a call fails",
          "[vault][renewal]") {
  VaultTestServer server;
  server.Control({{"create_key", {{"name", "kms"}}}, {"token_ttl", 60}, {"token_max_ttl", 600}});
  RecordingEventSink events;
  VaultOptions options = AppRoleOptions(server, MakeTempDir());
  options.poll_interval = absl::Milliseconds(300);
  auto source = MustOpen(options, &events, /*background=*/true);
  REQUIRE(server.Requests(0, "/v1/auth/approle/login") == 1);
  server.Control({{"revoke_tokens", true}, {"reset_stats", true}});
  CHECK(Eventually([&] { return server.Requests(0, "/v1/auth/approle/login") == 1; }));
  CHECK(Eventually([&] { return events.Count(event::kRelogin) == 1; }));
  CHECK_THAT(RoundTrip(*source), IsOk());
  CHECK(server.Requests(0, "/v1/transit/encrypt/kms") == 1);  // no call saw the dead token
}

// --- events ---------------------------------------------------------------------------------------------------------

TEST_CASE("VaultKeySource: an outage and its end are one unavailable and one recovered event", "[vault][events]") {
  VaultTestServer server;
  server.Control({{"create_key", {{"name", "kms"}}}});
  RecordingEventSink events;
  auto source = MustOpen(TokenOptions(server, MakeTempDir()), &events);
  server.Control({{"sealed", true}});
  CHECK_THAT(source->Refresh(In(absl::Seconds(2))), StatusIs(Code::kUnavailable));
  CHECK_THAT(source->Refresh(In(absl::Seconds(2))), StatusIs(Code::kUnavailable));
  CHECK(events.Count(event::kUnavailable) == 1);
  CHECK(absl::StrContains(events.Last(event::kUnavailable), "sealed"));
  CHECK(events.Count(event::kRecovered) == 0);
  server.Control({{"sealed", false}});
  REQUIRE_THAT(source->Refresh(In(absl::Seconds(2))), IsOk());
  REQUIRE_THAT(source->Refresh(In(absl::Seconds(2))), IsOk());
  CHECK(events.Count(event::kRecovered) == 1);
  CHECK(events.Count(event::kUnavailable) == 1);
}

TEST_CASE("VaultClient: failover, a re-login and a new token file are one event each", "[vault][events]") {
  VaultTestServer server(VaultTestServer::Options::Listeners(2));
  server.Control({{"create_key", {{"name", "kms"}}}});
  RecordingEventSink events;
  VaultOptions options = TokenOptions(server, MakeTempDir());
  auto source = MustOpen(options, &events);
  server.Control({{"listener", 0}, {"sealed", true}});
  REQUIRE_THAT(RoundTrip(*source), IsOk());
  REQUIRE_THAT(RoundTrip(*source), IsOk());
  CHECK(events.Count(event::kFailover) == 1);
  CHECK(absl::StrContains(events.Last(event::kFailover), server.Address(0)));
  CHECK(absl::StrContains(events.Last(event::kFailover), server.Address(1)));

  server.Control({{"revoke_tokens", true}, {"add_token", {{"id", "hvs.SECOND-TOKEN"}, {"ttl", 0}}}});
  WriteFile(options.auth.token_file, "hvs.SECOND-TOKEN\n");
  REQUIRE_THAT(RoundTrip(*source), IsOk());
  REQUIRE_THAT(RoundTrip(*source), IsOk());
  CHECK(events.Count(event::kCredentialReloaded) == 1);
  CHECK(absl::StrContains(events.Last(event::kCredentialReloaded), options.auth.token_file));
  for (const core::SourceEvent& e : events.Events()) {
    CHECK_FALSE(absl::StrContains(e.message, "SECOND-TOKEN"));
    CHECK_FALSE(absl::StrContains(e.message, kTestToken));
  }
}

TEST_CASE("VaultClient: an AppRole re-login after a 403 is one relogin event", "[vault][events]") {
  VaultTestServer server;
  server.Control({{"create_key", {{"name", "kms"}}}});
  RecordingEventSink events;
  auto source = MustOpen(AppRoleOptions(server, MakeTempDir()), &events);
  server.Control({{"revoke_tokens", true}});
  REQUIRE_THAT(RoundTrip(*source), IsOk());
  REQUIRE_THAT(RoundTrip(*source), IsOk());
  CHECK(events.Count(event::kRelogin) == 1);
}

// --- a standby's redirect remembered --------------------------------------------------------------------------------

TEST_CASE("VaultClient: behind a standby, N calls cost N+1 requests, not 2N", "[vault][redirect]") {
  VaultTestServer server(VaultTestServer::Options::Listeners(2));
  server.Control({{"create_key", {{"name", "kms"}}}});
  RecordingEventSink events;
  auto source = MustOpen(TokenOptions(server, MakeTempDir()), &events);
  auto current = source->Current();
  REQUIRE_THAT(current, IsOk());
  server.Control({{"listener", 0}, {"standby_redirect", server.Address(1)}});
  server.Control({{"all", true}, {"reset_stats", true}});
  constexpr int kCalls = 6;
  for (int i = 0; i < kCalls; ++i) {
    REQUIRE_THAT(source->Wrap(*current, kSeed, kAad, In(absl::Seconds(5))), IsOk());
  }
  CHECK(server.Requests(0, "/v1/transit/encrypt/kms") == 1);
  CHECK(server.Requests(1, "/v1/transit/encrypt/kms") == kCalls);
  CHECK(events.Count(event::kFailover) == 1);
  // The active node goes away: back to normal failover, and the old standby (now active) serves.
  server.Control({{"listener", 0}, {"standby_redirect", ""}});
  server.Control({{"listener", 1}, {"sealed", true}});
  REQUIRE_THAT(source->Wrap(*current, kSeed, kAad, In(absl::Seconds(5))), IsOk());
}

TEST_CASE("VaultClient: a redirect to an address not configured is remembered for this client too",
          "[vault][redirect]") {
  VaultTestServer server(VaultTestServer::Options::Listeners(2));
  server.Control({{"create_key", {{"name", "kms"}}}});
  VaultOptions options = TokenOptions(server, MakeTempDir());
  options.addresses = {server.Address(0)};
  auto source = MustOpen(options, nullptr);
  auto current = source->Current();
  REQUIRE_THAT(current, IsOk());
  server.Control({{"listener", 0}, {"standby_redirect", server.Address(1)}});
  server.Control({{"all", true}, {"reset_stats", true}});
  constexpr int kCalls = 5;
  for (int i = 0; i < kCalls; ++i) {
    REQUIRE_THAT(source->Wrap(*current, kSeed, kAad, In(absl::Seconds(5))), IsOk());
  }
  CHECK(server.Requests(0, "/v1/transit/encrypt/kms") + server.Requests(1, "/v1/transit/encrypt/kms") ==
        kCalls + 1);
  // The remembered node fails: the configured address is asked again (and is active now).
  server.Control({{"listener", 0}, {"standby_redirect", ""}});
  server.Control({{"listener", 1}, {"sealed", true}});
  REQUIRE_THAT(source->Wrap(*current, kSeed, kAad, In(absl::Seconds(5))), IsOk());
}

}  // namespace
}  // namespace kmsplugin::keysource::vault
