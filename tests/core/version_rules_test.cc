// The version rules every key source follows: CheckAdvance (every refresh), and the sets Retire, Reinstate and
// DestroyRetired change.

#include "kmsplugin/core/version_rules.h"

#include <catch2/catch.hpp>

#include "tests/support/status_matchers.h"

namespace kmsplugin::core {
namespace {

using ::kmsplugin::testing::IsOk;
using ::kmsplugin::testing::StatusIs;
using Code = absl::StatusCode;

// Versions 1..states.size(), in the given states.
std::vector<KeyVersion> Make(std::initializer_list<KeyState> states) {
  std::vector<KeyVersion> versions;
  for (KeyState state : states) {
    KeyVersion v;
    v.version = versions.size() + 1;
    v.key_id = "id" + std::to_string(v.version);
    v.key_ref = "ref" + std::to_string(v.version);
    v.state = state;
    versions.push_back(v);
  }
  return versions;
}

std::vector<uint64_t> Numbers(const absl::StatusOr<std::vector<KeyVersion>>& picked) {
  REQUIRE_THAT(picked, IsOk());
  std::vector<uint64_t> numbers;
  for (const KeyVersion& v : *picked) {
    numbers.push_back(v.version);
  }
  return numbers;
}

constexpr KeyState R = KeyState::kRetired;
constexpr KeyState A = KeyState::kActive;
constexpr KeyState C = KeyState::kCurrent;

TEST_CASE("VersionsToRetire: N and every older unretired version", "[core][retire]") {
  CHECK(Numbers(VersionsToRetire(Make({A, A, A, C}), 3)) == std::vector<uint64_t>{1, 2, 3});
  CHECK(Numbers(VersionsToRetire(Make({R, A, A, C}), 2)) == std::vector<uint64_t>{2});
  CHECK(Numbers(VersionsToRetire(Make({R, R, A, C}), 2)).empty());
  CHECK(Numbers(VersionsToRetire(Make({A, C}), 1)) == std::vector<uint64_t>{1});
}

TEST_CASE("VersionsToRetire: the current version, a newer one and an unknown one are refused", "[core][retire]") {
  CHECK_THAT(VersionsToRetire(Make({A, C}), 2), StatusIs(Code::kFailedPrecondition, "is the current version"));
  // A current version older than the newest (a source that pins an older one) protects everything above it.
  CHECK_THAT(VersionsToRetire(Make({A, C, A}), 3),
             StatusIs(Code::kFailedPrecondition, "newer than the current version 2"));
  CHECK_THAT(VersionsToRetire(Make({A, C}), 5), StatusIs(Code::kNotFound, "no key version 5 (versions: 1, 2)"));
  CHECK_THAT(VersionsToRetire(Make({A, C}), 0), StatusIs(Code::kNotFound, "no key version 0"));
  CHECK_THAT(VersionsToRetire({}, 1), StatusIs(Code::kNotFound, "no key version 1"));
}

TEST_CASE("VersionsToReinstate: N and every newer retired version", "[core][retire]") {
  CHECK(Numbers(VersionsToReinstate(Make({R, R, R, C}), 2)) == std::vector<uint64_t>{2, 3});
  CHECK(Numbers(VersionsToReinstate(Make({R, R, A, C}), 1)) == std::vector<uint64_t>{1, 2});
  CHECK_THAT(VersionsToReinstate(Make({R, A, C}), 2),
             StatusIs(Code::kFailedPrecondition, "is not retired (it is active)"));
  CHECK_THAT(VersionsToReinstate(Make({R, C}), 3), StatusIs(Code::kNotFound, "no key version 3"));
}

TEST_CASE("VersionsToDestroy: N and every older version, all retired", "[core][retire]") {
  CHECK(Numbers(VersionsToDestroy(Make({R, R, A, C}), 2)) == std::vector<uint64_t>{1, 2});
  CHECK_THAT(VersionsToDestroy(Make({R, A, A, C}), 2),
             StatusIs(Code::kFailedPrecondition, "version 2 (active) is not retired"));
  CHECK_THAT(VersionsToDestroy(Make({R, C}), 2), StatusIs(Code::kFailedPrecondition, "version 2 (current)"));
  CHECK_THAT(VersionsToDestroy(Make({R, C}), 7), StatusIs(Code::kNotFound, "no key version 7"));
}

std::vector<uint64_t> NumbersOf(const std::vector<KeyVersion>& versions) {
  std::vector<uint64_t> numbers;
  for (const KeyVersion& v : versions) {
    numbers.push_back(v.version);
  }
  return numbers;
}

TEST_CASE("CheckAdvance: a rotation, a retire and a reinstate are accepted and reported", "[core][versions]") {
  auto rotated = CheckAdvance(Make({A, C}), Make({A, A, C}), "keyring k");
  REQUIRE_THAT(rotated, IsOk());
  CHECK(rotated->change.added == std::vector<uint64_t>{3});
  CHECK(rotated->change.current_before == 2u);
  CHECK(rotated->change.current_after == 3u);
  CHECK(rotated->change.Summary() == "current 2 -> 3; added 3");

  auto retired = CheckAdvance(Make({A, A, C}), Make({R, R, C}), "keyring k");
  REQUIRE_THAT(retired, IsOk());
  CHECK(retired->change.retired == std::vector<uint64_t>{1, 2});
  CHECK(retired->change.Summary() == "retired 1, 2");

  auto reinstated = CheckAdvance(Make({R, R, C}), Make({R, A, C}), "keyring k");
  REQUIRE_THAT(reinstated, IsOk());
  CHECK(reinstated->change.reinstated == std::vector<uint64_t>{2});
  CHECK_FALSE(reinstated->change.empty());

  auto same = CheckAdvance(Make({A, C}), Make({A, C}), "keyring k");
  REQUIRE_THAT(same, IsOk());
  CHECK(same->change.empty());
  CHECK(same->change.Summary().empty());
}

TEST_CASE("CheckAdvance: nothing loaded yet accepts any view, an empty one included", "[core][versions]") {
  auto first = CheckAdvance({}, Make({A, C}), "token t");
  REQUIRE_THAT(first, IsOk());
  CHECK(NumbersOf(first->versions) == std::vector<uint64_t>{1, 2});
  CHECK_THAT(CheckAdvance({}, {}, "token t"), IsOk());
}

TEST_CASE("CheckAdvance: rule 1, a version that still decrypts is never dropped", "[core][versions]") {
  // The PKCS#11 token away: its search finds no objects at all.
  CHECK_THAT(CheckAdvance(Make({A, C}), {}, "PKCS#11 token t"),
             StatusIs(Code::kFailedPrecondition, "PKCS#11 token t no longer lists versions 1, 2"));
  // An old keyring copy without the newest version.
  CHECK_THAT(CheckAdvance(Make({A, A, C}), Make({A, C}), "keyring k"),
             StatusIs(Code::kFailedPrecondition, "no longer lists version 3"));
  CHECK_THAT(CheckAdvance(Make({A, A, C}), Make({A, C}), "keyring k"),
             StatusIs(Code::kFailedPrecondition, "still serving the versions loaded before"));
}

TEST_CASE("CheckAdvance: rule 2, a version number never changes its key", "[core][versions]") {
  std::vector<KeyVersion> recreated = Make({A, C});
  recreated[0].key_id = "id1-recreated";
  CHECK_THAT(CheckAdvance(Make({A, C}), recreated, "Vault transit key t"),
             StatusIs(Code::kFailedPrecondition, "different key as version 1"));
  std::vector<KeyVersion> other_ref = Make({A, C});
  other_ref[1].key_ref = "elsewhere";
  CHECK_THAT(CheckAdvance(Make({A, C}), other_ref, "x"), StatusIs(Code::kFailedPrecondition, "deleted and re-created"));
}

TEST_CASE("CheckAdvance: rule 3, the current version never moves back and never vanishes", "[core][versions]") {
  // A lagging replica that still says 2 is current after 3 was made current.
  CHECK_THAT(CheckAdvance(Make({A, A, C}), Make({A, C, A}), "Vault transit key t"),
             StatusIs(Code::kFailedPrecondition, "moves the current version back from 3 to 2"));
  // The newest version retired by other tools: no current version any more.
  CHECK_THAT(CheckAdvance(Make({A, C}), Make({A, R}), "token t"),
             StatusIs(Code::kFailedPrecondition, "no current version any more (version 2 (current) was current)"));
  CHECK_THAT(CheckAdvance(Make({C}), Make({A, A}), "x"), StatusIs(Code::kFailedPrecondition, "no current version"));
  CHECK_THAT(CheckAdvance(Make({A, C}), Make({C, C}), "x"), StatusIs(Code::kFailedPrecondition, "more than one"));
  std::vector<KeyVersion> twice = Make({A, C});
  twice.push_back(twice[1]);
  twice[1].state = KeyState::kActive;
  CHECK_THAT(CheckAdvance(Make({A, C}), twice, "x"), StatusIs(Code::kFailedPrecondition, "same version number twice"));
}

TEST_CASE("CheckAdvance: rule 4, a retired version the backend stops listing stays, as retired", "[core][versions]") {
  // Vault lists only versions from min_decryption_version up: 1 and 2 were retired, then vanish from the keys map.
  std::vector<KeyVersion> vault_now = Make({R, R, A, C});
  vault_now.erase(vault_now.begin(), vault_now.begin() + 2);
  auto kept = CheckAdvance(Make({R, R, A, C}), vault_now, "Vault transit key t");
  REQUIRE_THAT(kept, IsOk());
  CHECK(NumbersOf(kept->versions) == std::vector<uint64_t>{1, 2, 3, 4});
  CHECK(kept->versions[0].state == KeyState::kRetired);
  CHECK(kept->versions[1].state == KeyState::kRetired);
  CHECK(kept->change.kept_retired == std::vector<uint64_t>{1, 2});
  CHECK(kept->change.empty());
  // Retired in the same refresh in which they vanish: still dropped versions that decrypted, so refused.
  CHECK_THAT(CheckAdvance(Make({A, A, A, C}), vault_now, "Vault transit key t"),
             StatusIs(Code::kFailedPrecondition, "no longer lists versions 1, 2"));
  // Reinstated later: listed again as active.
  auto back = CheckAdvance(kept->versions, Make({A, A, A, C}), "Vault transit key t");
  REQUIRE_THAT(back, IsOk());
  CHECK(back->change.reinstated == std::vector<uint64_t>{1, 2});
}

TEST_CASE("DescribeVersion and RetiredVersionError name versions by number and state", "[core][versions]") {
  KeyVersion v = Make({R})[0];
  CHECK(DescribeVersion(v) == "version 1 (retired)");
  CHECK_THAT(RetiredVersionError(v, "min_decryption_version is 3"),
             StatusIs(Code::kFailedPrecondition, "key version 1 is retired (min_decryption_version is 3) and no "
                                                 "longer decrypts; fix: if Secrets still need it, reinstate it"));
  CHECK_THAT(RetiredVersionError(v, ""), StatusIs(Code::kFailedPrecondition, "key version 1 is retired and no longer"));
  CHECK(CurrentOf(Make({A, C}))->version == 2);
  CHECK_FALSE(CurrentOf(Make({A, R})).has_value());
  CHECK(FindVersionNumber(Make({A, C}), 1)->key_ref == "ref1");
  CHECK_FALSE(FindVersionNumber(Make({A, C}), 3).has_value());
}

}  // namespace
}  // namespace kmsplugin::core
