// The retire rule every key source follows: VersionsToRetire and VersionsToReinstate.

#include "kmsplugin/core/key_source.h"

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

}  // namespace
}  // namespace kmsplugin::core
