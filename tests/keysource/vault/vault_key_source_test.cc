#include "kmsplugin/keysource/vault/vault_key_source.h"

#include <atomic>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>

#include "absl/strings/match.h"
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

std::shared_ptr<VaultKeySource> MustOpen(VaultOptions options) {
  auto source = VaultKeySource::Open(std::move(options), &core::SystemClock(), 4, /*background=*/false);
  REQUIRE_THAT(source, IsOk());
  return *source;
}

void CreateKey(VaultTestServer& server, const std::string& name = "kms") {
  server.Control({{"create_key", {{"name", name}}}});
}

TEST_CASE("VaultKeySource: wraps and unwraps over HTTPS with the pinned version", "[vault]") {
  VaultTestServer server;
  CreateKey(server);
  auto source = MustOpen(TokenOptions(server, MakeTempDir()));
  auto current = source->Current();
  REQUIRE_THAT(current, IsOk());
  CHECK(current->version == 1);
  CHECK(current->state == core::KeyState::kCurrent);
  CHECK(absl::StartsWith(current->key_id, "vault:transit/kms:v1:"));
  CHECK(current->key_ref.size() <= 255);
  auto wrapped = source->Wrap(*current, kSeed, kAad, In(absl::Seconds(5)));
  REQUIRE_THAT(wrapped, IsOk());
  CHECK(absl::StartsWith(*wrapped, "vault:v1:"));
  auto plain = source->Unwrap(current->key_ref, *wrapped, kAad, In(absl::Seconds(5)));
  REQUIRE_THAT(plain, IsOk());
  CHECK(plain->view() == kSeed);
  CHECK(source->Kind() == crypto::KeySourceKind::kVault);
}

TEST_CASE("VaultKeySource: bytes wrapped under one AAD are rejected under another", "[vault]") {
  VaultTestServer server;
  CreateKey(server);
  auto source = MustOpen(TokenOptions(server, MakeTempDir()));
  auto current = source->Current();
  REQUIRE_THAT(current, IsOk());
  auto wrapped = source->Wrap(*current, kSeed, kAad, In(absl::Seconds(5)));
  REQUIRE_THAT(wrapped, IsOk());
  CHECK_THAT(source->Unwrap(current->key_ref, *wrapped, "env=test;key=1", In(absl::Seconds(5))),
             StatusIs(Code::kInvalidArgument, "message authentication failed"));
  CHECK_THAT(source->Unwrap(current->key_ref, *wrapped, "", In(absl::Seconds(5))),
             StatusIs(Code::kInvalidArgument));
}

TEST_CASE("VaultKeySource: malformed or tampered wrapped bytes are INVALID_ARGUMENT", "[vault]") {
  VaultTestServer server;
  CreateKey(server);
  auto source = MustOpen(TokenOptions(server, MakeTempDir()));
  auto current = source->Current();
  REQUIRE_THAT(current, IsOk());
  auto wrapped = source->Wrap(*current, kSeed, kAad, In(absl::Seconds(5)));
  REQUIRE_THAT(wrapped, IsOk());
  std::string tampered = *wrapped;
  tampered[12] = tampered[12] == 'A' ? 'B' : 'A';
  CHECK_THAT(source->Unwrap(current->key_ref, tampered, kAad, In(absl::Seconds(5))),
             StatusIs(Code::kInvalidArgument));
  CHECK_THAT(source->Unwrap(current->key_ref, "vault:v2:AAAA", kAad, In(absl::Seconds(5))),
             StatusIs(Code::kInvalidArgument, "version 1"));
  CHECK_THAT(source->Unwrap(current->key_ref, "not-a-ciphertext", kAad, In(absl::Seconds(5))),
             StatusIs(Code::kInvalidArgument));
  CHECK_THAT(source->Unwrap(current->key_ref, "vault:v1:!!notbase64!!", kAad, In(absl::Seconds(5))),
             StatusIs(Code::kInvalidArgument, "base64"));
  CHECK_THAT(source->Unwrap("garbage", *wrapped, kAad, In(absl::Seconds(5))),
             StatusIs(Code::kInvalidArgument, "malformed Vault key reference"));
  CHECK_THAT(source->Unwrap("v0@1", "vault:v0:AAAA", kAad, In(absl::Seconds(5))),
             StatusIs(Code::kInvalidArgument));
  CHECK_THAT(source->Lookup("v9@1"), StatusIs(Code::kNotFound));
}

TEST_CASE("VaultKeySource: a version below min_decryption_version is retired, naming the version", "[vault]") {
  VaultTestServer server;
  CreateKey(server);
  auto source = MustOpen(TokenOptions(server, MakeTempDir()));
  auto v1 = source->Current();
  REQUIRE_THAT(v1, IsOk());
  auto wrapped = source->Wrap(*v1, kSeed, kAad, In(absl::Seconds(5)));
  REQUIRE_THAT(wrapped, IsOk());
  auto v2 = source->Rotate(In(absl::Seconds(5)));
  REQUIRE_THAT(v2, IsOk());
  CHECK(v2->version == 2);
  server.Control({{"key_config", {{"name", "kms"}, {"min_decryption_version", 2}}}});

  // Before the plugin notices, Vault's own refusal is mapped to FAILED_PRECONDITION.
  CHECK_THAT(source->Unwrap(v1->key_ref, *wrapped, kAad, In(absl::Seconds(5))),
             StatusIs(Code::kFailedPrecondition, "version 1"));
  REQUIRE_THAT(source->Refresh(In(absl::Seconds(5))), IsOk());
  auto versions = source->Versions();
  REQUIRE_THAT(versions, IsOk());
  REQUIRE(versions->size() == 2);
  CHECK((*versions)[0].state == core::KeyState::kRetired);
  CHECK((*versions)[1].state == core::KeyState::kCurrent);
  int before = server.Requests(0, "/v1/transit/decrypt/kms");
  CHECK_THAT(source->Unwrap(v1->key_ref, *wrapped, kAad, In(absl::Seconds(5))),
             StatusIs(Code::kFailedPrecondition, "version 1 is retired"));
  CHECK(server.Requests(0, "/v1/transit/decrypt/kms") == before);  // refused locally
  CHECK_THAT(source->Wrap(*v1, kSeed, kAad, In(absl::Seconds(5))), StatusIs(Code::kFailedPrecondition, "retired"));
}

TEST_CASE("VaultKeySource: Retire sets min_decryption_version, Reinstate lowers it again", "[vault][retire]") {
  VaultTestServer server;
  CreateKey(server);
  auto source = MustOpen(TokenOptions(server, MakeTempDir()));
  std::vector<core::KeyVersion> versions;
  std::vector<std::string> wrapped;
  for (int i = 0; i < 3; ++i) {
    auto current = i == 0 ? source->Current() : source->Rotate(In(absl::Seconds(5)));
    REQUIRE_THAT(current, IsOk());
    versions.push_back(*current);
    auto w = source->Wrap(*current, kSeed, kAad, In(absl::Seconds(5)));
    REQUIRE_THAT(w, IsOk());
    wrapped.push_back(*w);
  }
  CHECK_THAT(source->Retire(3, In(absl::Seconds(5))), StatusIs(Code::kFailedPrecondition, "current version"));
  CHECK_THAT(source->Retire(7, In(absl::Seconds(5))), StatusIs(Code::kNotFound, "no key version 7"));
  CHECK(server.Requests(0, "/v1/transit/keys/kms/config") == 0);  // refused before asking Vault

  auto retired = source->Retire(2, In(absl::Seconds(5)));
  REQUIRE_THAT(retired, IsOk());
  REQUIRE(retired->size() == 2);
  CHECK((*retired)[0].version == 1);
  CHECK((*retired)[1].version == 2);
  CHECK((*retired)[1].state == core::KeyState::kRetired);
  CHECK(server.Requests(0, "/v1/transit/keys/kms/config") == 1);
  // Vault itself refuses now, so another instance that has not refreshed cannot decrypt either.
  auto other = MustOpen(TokenOptions(server, MakeTempDir()));
  CHECK_THAT(other->Unwrap(versions[1].key_ref, wrapped[1], kAad, In(absl::Seconds(5))),
             StatusIs(Code::kFailedPrecondition, "version 2"));
  auto unwrapped = other->Unwrap(versions[2].key_ref, wrapped[2], kAad, In(absl::Seconds(5)));
  REQUIRE_THAT(unwrapped, IsOk());
  CHECK(unwrapped->view() == kSeed);

  auto reinstated = source->Reinstate(2, In(absl::Seconds(5)));
  REQUIRE_THAT(reinstated, IsOk());
  REQUIRE(reinstated->size() == 1);
  CHECK((*reinstated)[0].version == 2);
  CHECK((*reinstated)[0].state == core::KeyState::kActive);
  auto back = source->Unwrap(versions[1].key_ref, wrapped[1], kAad, In(absl::Seconds(5)));
  REQUIRE_THAT(back, IsOk());
  CHECK(back->view() == kSeed);
  CHECK_THAT(source->Unwrap(versions[0].key_ref, wrapped[0], kAad, In(absl::Seconds(5))),
             StatusIs(Code::kFailedPrecondition, "version 1"));
  CHECK_THAT(source->DestroyRetired(1, In(absl::Seconds(5))), StatusIs(Code::kUnimplemented, "vault"));
}

TEST_CASE("VaultKeySource: Retire that Vault refuses reports Vault's reason and changes nothing", "[vault][retire]") {
  VaultTestServer server;
  CreateKey(server);
  auto source = MustOpen(TokenOptions(server, MakeTempDir()));
  for (int i = 0; i < 3; ++i) {
    REQUIRE_THAT(source->Rotate(In(absl::Seconds(5))), IsOk());
  }
  // An operator pinned encryption to version 2; retiring 2 would make min_decryption (3) exceed it.
  server.Control({{"key_config", {{"name", "kms"}, {"min_encryption_version", 2}}}});
  CHECK_THAT(source->Retire(2, In(absl::Seconds(5))),
             StatusIs(Code::kFailedPrecondition, "minimum decryption version is greater than minimum encryption"));
  auto versions = source->Versions();
  REQUIRE_THAT(versions, IsOk());
  for (const core::KeyVersion& v : *versions) {
    CHECK(v.state != core::KeyState::kRetired);
  }
}

TEST_CASE("VaultKeySource: rotation while threads wrap and unwrap loses nothing", "[vault]") {
  VaultTestServer server;
  CreateKey(server);
  auto source = MustOpen(TokenOptions(server, MakeTempDir()));
  std::atomic<bool> stop{false};
  std::atomic<int> failures{0}, rounds{0};
  std::vector<std::thread> workers;
  for (int t = 0; t < 4; ++t) {
    workers.emplace_back([&] {
      while (!stop.load()) {
        auto current = source->Current();
        if (!current.ok()) {
          ++failures;
          continue;
        }
        auto wrapped = source->Wrap(*current, kSeed, kAad, In(absl::Seconds(5)));
        if (!wrapped.ok() || !absl::StartsWith(*wrapped, "vault:v" + std::to_string(current->version) + ":")) {
          ++failures;
          continue;
        }
        auto plain = source->Unwrap(current->key_ref, *wrapped, kAad, In(absl::Seconds(5)));
        if (!plain.ok() || plain->view() != kSeed) {
          ++failures;
        }
        // The key_id of a key_ref never changes.
        auto looked = source->Lookup(current->key_ref);
        if (!looked.ok() || looked->key_id != current->key_id) {
          ++failures;
        }
        ++rounds;
      }
    });
  }
  std::vector<std::string> ids;
  for (int r = 0; r < 3; ++r) {
    std::this_thread::sleep_for(std::chrono::milliseconds(150));
    auto rotated = source->Rotate(In(absl::Seconds(5)));
    REQUIRE_THAT(rotated, IsOk());
    ids.push_back(rotated->key_id);
    auto current = source->Current();
    REQUIRE_THAT(current, IsOk());
    CHECK(current->key_id == rotated->key_id);
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(150));
  stop = true;
  for (auto& w : workers) {
    w.join();
  }
  CHECK(failures.load() == 0);
  CHECK(rounds.load() > 10);
  CHECK(ids.size() == 3);
  CHECK(ids[0] != ids[1]);
  CHECK(ids[1] != ids[2]);
  auto versions = source->Versions();
  REQUIRE_THAT(versions, IsOk());
  CHECK(versions->size() == 4);
}

TEST_CASE("VaultKeySource: one Vault request per Wrap and Unwrap over one kept-alive connection", "[vault]") {
  VaultTestServer server;
  CreateKey(server);
  auto source = MustOpen(TokenOptions(server, MakeTempDir()));
  auto current = source->Current();
  REQUIRE_THAT(current, IsOk());
  server.Control({{"reset_stats", true}});
  for (int i = 0; i < 10; ++i) {
    auto wrapped = source->Wrap(*current, kSeed, kAad, In(absl::Seconds(5)));
    REQUIRE_THAT(wrapped, IsOk());
    REQUIRE_THAT(source->Unwrap(current->key_ref, *wrapped, kAad, In(absl::Seconds(5))), IsOk());
  }
  CHECK(server.Requests(0, "/v1/transit/encrypt/kms") == 10);
  CHECK(server.Requests(0, "/v1/transit/decrypt/kms") == 10);
  CHECK(server.Connections(0) <= 1);
}

TEST_CASE("VaultKeySource: a missing key is FAILED_PRECONDITION from Refresh and Current", "[vault]") {
  VaultTestServer server;
  auto source = VaultKeySource::Open(TokenOptions(server, MakeTempDir()), &core::SystemClock(), 2, false);
  CHECK_THAT(source, StatusIs(Code::kFailedPrecondition, "kmsplugin init"));
}

TEST_CASE("VaultKeySource: an unreachable Vault at start makes Current UNAVAILABLE, not Open", "[vault]") {
  VaultTestServer server;
  CreateKey(server);
  VaultOptions options = TokenOptions(server, MakeTempDir());
  server.Control({{"close", true}});
  auto start = absl::Now();
  auto source = VaultKeySource::Open(options, &core::SystemClock(), 2, false);
  REQUIRE_THAT(source, IsOk());
  CHECK(absl::Now() - start < absl::Seconds(5));
  CHECK_THAT((*source)->Current(), StatusIs(Code::kUnavailable, "127.0.0.1"));
  CHECK_THAT((*source)->Versions(), StatusIs(Code::kUnavailable));
}

TEST_CASE("VaultKeySource: the namespace header selects the namespace's key", "[vault]") {
  VaultTestServer server(VaultTestServer::Options::Namespaces("team/prod"));
  server.Control({{"create_key", {{"name", "kms"}, {"namespace", "team/prod"}}}});
  VaultOptions options = TokenOptions(server, MakeTempDir());
  options.vault_namespace = "team/prod";
  auto source = MustOpen(options);
  auto current = source->Current();
  REQUIRE_THAT(current, IsOk());
  CHECK(absl::StartsWith(current->key_id, "vault:team/prod/transit/kms:v1:"));
  REQUIRE_THAT(source->Wrap(*current, kSeed, kAad, In(absl::Seconds(5))), IsOk());

  VaultOptions root = TokenOptions(server, MakeTempDir());
  CHECK_THAT(VaultKeySource::Open(root, &core::SystemClock(), 2, false), StatusIs(Code::kFailedPrecondition));
  VaultOptions unknown = options;
  unknown.vault_namespace = "nope";
  CHECK_THAT(VaultKeySource::Open(unknown, &core::SystemClock(), 2, false), StatusIs(Code::kFailedPrecondition));
}

TEST_CASE("VaultKeySource: background polling notices a rotation by another instance", "[vault]") {
  VaultTestServer server;
  CreateKey(server);
  VaultOptions options = TokenOptions(server, MakeTempDir());
  options.poll_interval = absl::Milliseconds(200);
  auto source = VaultKeySource::Open(options, &core::SystemClock(), 2, /*background=*/true);
  REQUIRE_THAT(source, IsOk());
  auto other = MustOpen(TokenOptions(server, MakeTempDir()));
  REQUIRE_THAT(other->Rotate(In(absl::Seconds(5))), IsOk());
  bool seen = false;
  for (int i = 0; i < 40 && !seen; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    auto current = (*source)->Current();
    seen = current.ok() && current->version == 2;
  }
  CHECK(seen);
}

}  // namespace
}  // namespace kmsplugin::keysource::vault
