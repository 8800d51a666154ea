// Staged versions (version_rules.h rule 5, VersionsToPromote, CheckStage, CheckRotate), the key-set fingerprint,
// and the heal-on-unknown-version rule (version_heal.h), written once for every key source.

#include <catch2/catch.hpp>

#include "kmsplugin/core/version_heal.h"
#include "kmsplugin/core/version_rules.h"
#include "tests/support/fake_clock.h"
#include "tests/support/status_matchers.h"

namespace kmsplugin::core {
namespace {

using ::kmsplugin::testing::IsOk;
using ::kmsplugin::testing::StatusIs;
using Code = absl::StatusCode;

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

constexpr KeyState R = KeyState::kRetired;
constexpr KeyState A = KeyState::kActive;
constexpr KeyState C = KeyState::kCurrent;
constexpr KeyState S = KeyState::kStaged;

std::vector<std::pair<uint64_t, KeyState>> Changes(const absl::StatusOr<std::vector<KeyVersion>>& changed) {
  REQUIRE_THAT(changed, IsOk());
  std::vector<std::pair<uint64_t, KeyState>> out;
  for (const KeyVersion& v : *changed) {
    out.emplace_back(v.version, v.state);
  }
  return out;
}

TEST_CASE("KeyStateName: staged is named staged", "[core][staged]") { CHECK(KeyStateName(S) == "staged"); }

TEST_CASE("CheckAdvance: a new staged version is accepted and the current version stays", "[core][staged]") {
  auto advanced = CheckAdvance(Make({A, C}), Make({A, C, S}), "test");
  REQUIRE_THAT(advanced, IsOk());
  CHECK(advanced->change.added == std::vector<uint64_t>{3});
  CHECK(advanced->change.current_after == std::optional<uint64_t>(2));
}

TEST_CASE("CheckAdvance: promotion staged -> current is accepted", "[core][staged]") {
  auto advanced = CheckAdvance(Make({A, C, S}), Make({A, A, C}), "test");
  REQUIRE_THAT(advanced, IsOk());
  CHECK(advanced->change.current_before == std::optional<uint64_t>(2));
  CHECK(advanced->change.current_after == std::optional<uint64_t>(3));
}

TEST_CASE("CheckAdvance: the current version never moves back to staged", "[core][staged]") {
  // A node given an older copy (staged) after it had the promoted one.
  CHECK_THAT(CheckAdvance(Make({A, A, C}), Make({A, C, S}), "test"),
             StatusIs(Code::kFailedPrecondition, "moves the current version back from 3 to 2"));
}

TEST_CASE("CheckAdvance: a staged version older than the current one is refused", "[core][staged]") {
  CHECK_THAT(CheckAdvance(Make({A, C}), Make({S, C}), "test"),
             StatusIs(Code::kFailedPrecondition, "lists version 1 as staged although version 2 is current"));
  CHECK_THAT(CheckAdvance({}, Make({S, C}), "test"), StatusIs(Code::kFailedPrecondition));
}

TEST_CASE("CheckAdvance: a staged version is not dropped (it decrypts)", "[core][staged]") {
  CHECK_THAT(CheckAdvance(Make({A, C, S}), Make({A, C}), "test"),
             StatusIs(Code::kFailedPrecondition, "no longer lists version 3"));
}

TEST_CASE("VersionsToPromote: the newest staged becomes current, the old current and older staged active",
          "[core][staged]") {
  CHECK(Changes(VersionsToPromote(Make({R, A, C, S}))) == std::vector<std::pair<uint64_t, KeyState>>{{3, A}, {4, C}});
  CHECK(Changes(VersionsToPromote(Make({A, C, S, S}))) ==
        std::vector<std::pair<uint64_t, KeyState>>{{2, A}, {3, A}, {4, C}});
}

TEST_CASE("VersionsToPromote: nothing staged is refused, naming the fix", "[core][staged]") {
  CHECK_THAT(VersionsToPromote(Make({A, C})),
             StatusIs(Code::kFailedPrecondition, "no key version is staged (version 2 is current)"));
  CHECK_THAT(VersionsToPromote(Make({A, C})), StatusIs(Code::kFailedPrecondition, "rotate --stage"));
}

TEST_CASE("VersionsToPromote: the result passes CheckAdvance", "[core][staged]") {
  std::vector<KeyVersion> versions = Make({A, C, S});
  std::vector<KeyVersion> after = versions;
  auto changed = VersionsToPromote(versions);
  REQUIRE_THAT(changed, IsOk());
  for (const KeyVersion& v : *changed) {
    after[v.version - 1].state = v.state;
  }
  CHECK_THAT(CheckAdvance(versions, after, "test"), IsOk());
}

TEST_CASE("CheckStage / CheckRotate: stage needs a current version, rotate is refused while one is staged",
          "[core][staged]") {
  CHECK_THAT(CheckStage(Make({A, C})), IsOk());
  CHECK_THAT(CheckStage(Make({A, R})), StatusIs(Code::kFailedPrecondition, "no current key version"));
  CHECK_THAT(CheckRotate(Make({A, C})), IsOk());
  CHECK_THAT(CheckRotate(Make({A, C, S})), StatusIs(Code::kFailedPrecondition, "key version 3 is staged"));
  CHECK_THAT(CheckRotate(Make({A, C, S})), StatusIs(Code::kFailedPrecondition, "--promote"));
  CHECK(NextVersionNumber(Make({A, C, S})) == 4);
  CHECK(NextVersionNumber({}) == 1);
}

TEST_CASE("VersionsToRetire: a staged version (newer than current) cannot be retired", "[core][staged]") {
  CHECK_THAT(VersionsToRetire(Make({A, C, S}), 3), StatusIs(Code::kFailedPrecondition));
}

TEST_CASE("KeySetFingerprint: same set same print, and any version, key_id, key_ref or state changes it",
          "[core][fingerprint]") {
  const std::vector<KeyVersion> base = Make({A, C, S});
  const std::string print = KeySetFingerprint(base);
  CHECK(print.rfind("ks1-", 0) == 0);
  CHECK(print.size() == 4 + 16);
  std::vector<KeyVersion> reversed(base.rbegin(), base.rend());
  CHECK(KeySetFingerprint(reversed) == print);  // order of listing does not matter
  auto changed = [&](auto edit) {
    std::vector<KeyVersion> copy = base;
    edit(copy);
    return KeySetFingerprint(copy);
  };
  CHECK(changed([](auto& v) {
          v[2].state = KeyState::kCurrent;
          v[1].state = KeyState::kActive;
        }) != print);
  CHECK(changed([](auto& v) { v.pop_back(); }) != print);
  CHECK(changed([](auto& v) { v[0].key_id += "x"; }) != print);
  CHECK(changed([](auto& v) { v[0].key_ref += "x"; }) != print);
  CHECK(changed([](auto& v) { v[0].version = 7; }) != print);
  // Field boundaries are unambiguous: moving a character from key_id to key_ref changes it.
  CHECK(changed([](auto& v) {
          v[0].key_id = "id";
          v[0].key_ref = "1ref1";
        }) != print);
  CHECK(KeySetFingerprint({}) != print);
}

TEST_CASE("UnknownVersionHeal: re-reads only for a version newer than all known", "[core][heal]") {
  testing::FakeClock clock;
  UnknownVersionHeal heal(clock);
  int reads = 0;
  auto reread = [&] {
    ++reads;
    return absl::OkStatus();
  };
  CHECK_FALSE(heal.MaybeReread(2, Make({A, C}), reread));  // known already
  CHECK_FALSE(heal.MaybeReread(1, Make({A, C}), reread));  // older: another keyring or destroyed
  CHECK(reads == 0);
  CHECK(heal.MaybeReread(3, Make({A, C}), reread));
  CHECK(reads == 1);
  CHECK(heal.rereads() == 1);
}

TEST_CASE("UnknownVersionHeal: at most one re-read per second on the injected clock", "[core][heal]") {
  testing::FakeClock clock;
  UnknownVersionHeal heal(clock);
  int reads = 0;
  auto reread = [&] {
    ++reads;
    return absl::OkStatus();
  };
  CHECK(heal.MaybeReread(3, Make({A, C}), reread));
  for (int i = 0; i < 100; ++i) {
    CHECK_FALSE(heal.MaybeReread(3 + i, Make({A, C}), reread));
  }
  clock.Advance(absl::Milliseconds(999));
  CHECK_FALSE(heal.MaybeReread(3, Make({A, C}), reread));
  CHECK(reads == 1);
  clock.Advance(absl::Milliseconds(1));
  CHECK(heal.MaybeReread(3, Make({A, C}), reread));
  CHECK(reads == 2);
  // A wall-clock step does not open the gate: the limit is on the monotonic reading.
  clock.StepWall(absl::Hours(5));
  CHECK_FALSE(heal.MaybeReread(3, Make({A, C}), reread));
  CHECK(reads == 2);
}

TEST_CASE("UnknownVersionHeal: a failed re-read answers false and still counts against the limit", "[core][heal]") {
  testing::FakeClock clock;
  UnknownVersionHeal heal(clock);
  int reads = 0;
  auto failing = [&] {
    ++reads;
    return absl::UnavailableError("keyring gone");
  };
  CHECK_FALSE(heal.MaybeReread(3, Make({C}), failing));
  CHECK_FALSE(heal.MaybeReread(3, Make({C}), failing));
  CHECK(reads == 1);
}

}  // namespace
}  // namespace kmsplugin::core
