// Retire policy: which versions each action changes, and the wait after a rotation before a retire.

#include "kmsplugin/admin/retire_policy.h"

#include <catch2/catch.hpp>

#include "tests/support/status_matchers.h"

namespace kmsplugin::admin {
namespace {

using ::kmsplugin::testing::IsOk;
using ::kmsplugin::testing::StatusIs;
using Code = absl::StatusCode;

const absl::Time kNow = absl::FromUnixSeconds(1'900'000'000);

// Versions 1..n, version i created `ages[i-1]` before kNow; the last is current.
std::vector<core::KeyVersion> Made(std::initializer_list<absl::Duration> ages) {
  std::vector<core::KeyVersion> versions;
  for (absl::Duration age : ages) {
    core::KeyVersion v;
    v.version = versions.size() + 1;
    v.key_id = "k" + std::to_string(v.version);
    v.key_ref = "r" + std::to_string(v.version);
    v.created = kNow - age;
    v.state = core::KeyState::kActive;
    versions.push_back(v);
  }
  versions.back().state = core::KeyState::kCurrent;
  return versions;
}

TEST_CASE("RetirePolicy: each action plans by the shared version rules", "[admin][retire]") {
  auto versions = Made({absl::Hours(48), absl::Hours(24), absl::Hours(1)});
  auto retire = PlanRetireAction(RetireAction::kRetire, versions, 2);
  REQUIRE_THAT(retire, IsOk());
  CHECK(VersionList(*retire) == "1, 2");
  CHECK_THAT(PlanRetireAction(RetireAction::kRetire, versions, 3), StatusIs(Code::kFailedPrecondition, "current"));
  CHECK_THAT(PlanRetireAction(RetireAction::kReinstate, versions, 1),
             StatusIs(Code::kFailedPrecondition, "not retired"));
  CHECK_THAT(PlanRetireAction(RetireAction::kDestroy, versions, 1),
             StatusIs(Code::kFailedPrecondition, "version 1 (active) is not retired"));
  versions[0].state = core::KeyState::kRetired;
  auto destroy = PlanRetireAction(RetireAction::kDestroy, versions, 1);
  REQUIRE_THAT(destroy, IsOk());
  CHECK(VersionList(*destroy) == "1");
  auto reinstate = PlanRetireAction(RetireAction::kReinstate, versions, 1);
  REQUIRE_THAT(reinstate, IsOk());
  CHECK(VersionList(*reinstate) == "1");
  CHECK(std::string(Verb(RetireAction::kDestroy)) == "destroy");
  CHECK(std::string(PastTense(RetireAction::kReinstate)) == "reinstated");
}

TEST_CASE("RetirePolicy: a retire waits 8 minutes plus the poll interval after the next version", "[admin][retire]") {
  const absl::Duration poll = absl::Seconds(10);
  CHECK(SettleTime(poll) == absl::Minutes(8) + poll);
  // Version 2 replaced 1 five minutes ago: too soon.
  auto recent = Made({absl::Hours(24), absl::Minutes(5)});
  auto refused = CheckSettled(recent, 1, poll, kNow);
  CHECK_THAT(refused, StatusIs(Code::kFailedPrecondition, "version 2 replaced version 1 only 5m ago"));
  CHECK_THAT(refused, StatusIs(Code::kFailedPrecondition, "--allow-recent"));
  CHECK_THAT(refused, StatusIs(Code::kFailedPrecondition,
                               absl::FormatTime(absl::RFC3339_sec, kNow + absl::Minutes(3) + poll,
                                                absl::UTCTimeZone())));
  // Exactly at the settle time, and later: allowed.
  CHECK_THAT(CheckSettled(Made({absl::Hours(24), SettleTime(poll)}), 1, poll, kNow), IsOk());
  CHECK_THAT(CheckSettled(Made({absl::Hours(24), absl::Hours(1)}), 1, poll, kNow), IsOk());
  // Only the version right after counts: an old replacement with a newer rotation since is settled for 1.
  CHECK_THAT(CheckSettled(Made({absl::Hours(48), absl::Hours(24), absl::Minutes(1)}), 1, poll, kNow), IsOk());
  CHECK_THAT(CheckSettled(Made({absl::Hours(48), absl::Hours(24), absl::Minutes(1)}), 2, poll, kNow),
             StatusIs(Code::kFailedPrecondition, "version 3 replaced version 2"));
  // A creation time in the future (a clock set ahead when it was made) is named as such.
  CHECK_THAT(CheckSettled(Made({absl::Hours(24), -absl::Hours(24 * 365)}), 1, poll, kNow),
             StatusIs(Code::kFailedPrecondition, "in the future"));
  // Nothing newer than the version: nothing to wait for (PlanRetireAction refuses the current version anyway).
  CHECK_THAT(CheckSettled(Made({absl::Hours(1)}), 1, poll, kNow), IsOk());
}

}  // namespace
}  // namespace kmsplugin::admin
