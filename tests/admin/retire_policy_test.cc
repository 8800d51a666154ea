// Retire policy: which versions each action changes, and the wait after a rotation before a retire.

#include "kmsplugin/admin/retire_policy.h"
#include "kmsplugin/admin/version_times.h"

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
  // A future time on the next version is bounded by a later version made with the clock right: the retire counts
  // from that one, naming its time, not 2100's.
  const auto future_then_right = Made({absl::Hours(48), -absl::Hours(24 * 365 * 70), absl::Minutes(2)});
  CHECK_THAT(CheckSettled(future_then_right, 1, poll, kNow, "dev"),
             StatusIs(Code::kFailedPrecondition,
                      absl::FormatTime(absl::RFC3339_sec, kNow - absl::Minutes(2) + SettleTime(poll),
                                       absl::UTCTimeZone())));
  CHECK_THAT(CheckSettled(future_then_right, 2, poll, kNow, "dev"), StatusIs(Code::kFailedPrecondition, "only 2m"));
  CHECK_THAT(CheckSettled(Made({absl::Hours(48), -absl::Hours(24 * 365 * 70), absl::Hours(1)}), 1, poll, kNow),
             IsOk());
  CHECK_THAT(CheckSettled(Made({absl::Hours(48), -absl::Hours(24 * 365 * 70), absl::Hours(1)}), 2, poll, kNow),
             IsOk());
  // Without such a version, the message says how to make one.
  CHECK_THAT(CheckSettled(Made({absl::Hours(24), -absl::Hours(24 * 365)}), 1, poll, kNow, "dev"),
             StatusIs(Code::kFailedPrecondition, "run `kmsplugin rotate --env dev`"));
  // A version made with the clock behind (older than its predecessor) never makes a retire look settled.
  const auto behind = Made({absl::Hours(48), absl::Hours(1), absl::Hours(24 * 365)});
  CHECK_THAT(CheckSettled(behind, 2, poll, kNow, "dev"), StatusIs(Code::kFailedPrecondition, "the clock was behind"));
  CHECK_THAT(CheckSettled(behind, 1, poll, kNow, "dev"), IsOk());  // version 2's own time bounds it
  // Nothing newer than the version: nothing to wait for (PlanRetireAction refuses the current version anyway).
  CHECK_THAT(CheckSettled(Made({absl::Hours(1)}), 1, poll, kNow), IsOk());
}

TEST_CASE("VersionTimes: a creation time beyond the tolerance in the future is named with the repair",
          "[admin][retire]") {
  auto versions = Made({absl::Hours(48), -absl::Hours(24), -absl::Minutes(1)});
  CHECK_FALSE(CreatedInFuture(versions[0], kNow));
  CHECK(CreatedInFuture(versions[1], kNow));
  CHECK_FALSE(CreatedInFuture(versions[2], kNow));  // a minute of skew between two clocks is normal
  const std::vector<std::string> warnings = FutureCreationWarnings(versions, kNow, "dev");
  REQUIRE(warnings.size() == 1);
  CHECK_THAT(warnings[0], Catch::Contains("version 2 was created at " +
                                          absl::FormatTime(absl::RFC3339_sec, kNow + absl::Hours(24),
                                                           absl::UTCTimeZone()) +
                                          ", in the future"));
  CHECK_THAT(warnings[0], Catch::Contains("fix: set the clock right"));
  CHECK_THAT(warnings[0], Catch::Contains("kmsplugin rotate --env dev"));
  CHECK(FutureCreationWarnings(Made({absl::Hours(1)}), kNow, "dev").empty());
}

}  // namespace
}  // namespace kmsplugin::admin
