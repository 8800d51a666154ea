#include "kmsplugin/admin/retire_policy.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "kmsplugin/core/sv.h"
#include "kmsplugin/admin/version_times.h"
#include "kmsplugin/core/version_rules.h"

namespace kmsplugin::admin {

const char* Verb(RetireAction action) {
  switch (action) {
    case RetireAction::kRetire:
      return "retire";
    case RetireAction::kReinstate:
      return "reinstate";
    case RetireAction::kDestroy:
      return "destroy";
  }
  return "retire";
}

const char* PastTense(RetireAction action) {
  switch (action) {
    case RetireAction::kRetire:
      return "retired";
    case RetireAction::kReinstate:
      return "reinstated";
    case RetireAction::kDestroy:
      return "destroyed";
  }
  return "retired";
}

absl::StatusOr<std::vector<core::KeyVersion>> PlanRetireAction(RetireAction action,
                                                               const std::vector<core::KeyVersion>& versions,
                                                               uint64_t version) {
  switch (action) {
    case RetireAction::kRetire:
      return core::VersionsToRetire(versions, version);
    case RetireAction::kReinstate:
      return core::VersionsToReinstate(versions, version);
    case RetireAction::kDestroy:
      return core::VersionsToDestroy(versions, version);
  }
  return absl::InvalidArgumentError("unknown retire action");
}

absl::Duration SettleTime(absl::Duration poll_interval) { return absl::Minutes(8) + poll_interval; }

absl::Status CheckSettled(const std::vector<core::KeyVersion>& versions, uint64_t version,
                          absl::Duration poll_interval, absl::Time now, std::string_view environment) {
  const absl::Duration settle = SettleTime(poll_interval);
  // When the version that replaced `version` was made, from creation times that came from clocks which may have
  // been wrong. It was made no earlier than `version` and its predecessors (floor: their latest time that is not
  // in the future) and no later than any version after it; so it is the earliest later time at or above the
  // floor. A later time in the future (a clock that was ahead) is thus bounded by one rotation with the clock
  // right, and one below the floor (a clock that was behind) cannot make a fresh version look settled.
  absl::Time floor = absl::InfinitePast();
  for (const core::KeyVersion& v : versions) {
    if (v.version <= version && !CreatedInFuture(v, now)) {
      floor = std::max(floor, v.created);
    }
  }
  const core::KeyVersion* replaced_by = nullptr;
  absl::Time replaced_at = absl::InfiniteFuture();
  bool any_later = false;
  for (const core::KeyVersion& v : versions) {
    if (v.version <= version) {
      continue;
    }
    any_later = true;
    if (replaced_by == nullptr || v.version < replaced_by->version) {
      replaced_by = &v;
    }
    if (v.created >= floor - kCreationClockTolerance) {
      replaced_at = std::min(replaced_at, v.created);
    }
  }
  if (!any_later) {
    return absl::OkStatus();
  }
  if (replaced_at == absl::InfiniteFuture()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "version ", replaced_by->version, " replaced version ", version, " but was created at ",
        absl::FormatTime(absl::RFC3339_sec, replaced_by->created, absl::UTCTimeZone()), ", before version ",
        version, " (", absl::FormatTime(absl::RFC3339_sec, floor, absl::UTCTimeZone()),
        "): the clock was behind when it was made, so when it took over is unknown; fix: set the clock right, run "
        "`kmsplugin rotate --env ", Sv(environment), "`, rewrite the Secrets ", absl::FormatDuration(settle),
        " after that and retire then, or pass --allow-recent if no kube-apiserver uses this environment"));
  }
  const absl::Duration age = now - replaced_at;
  if (age >= settle) {
    return absl::OkStatus();
  }
  if (age < -kCreationClockTolerance) {
    return absl::FailedPreconditionError(absl::StrCat(
        "version ", replaced_by->version, " replaced version ", version, " at ",
        absl::FormatTime(absl::RFC3339_sec, replaced_by->created, absl::UTCTimeZone()),
        ", in the future (its creation time is after now, ", absl::FormatTime(absl::RFC3339_sec, now, absl::UTCTimeZone()),
        ": the clock was ahead when it was made), and no later version bounds it; fix: set the clock right, run "
        "`kmsplugin rotate --env ", Sv(environment), "`, rewrite the Secrets ",
        absl::FormatDuration(settle), " after that and retire then, or pass --allow-recent if no kube-apiserver "
        "uses this environment"));
  }
  const std::string ago = age < absl::ZeroDuration()
                              ? std::string("just now (its creation time is slightly after now: check the clock)")
                              : absl::StrCat(absl::FormatDuration(absl::Trunc(age, absl::Seconds(1))), " ago");
  return absl::FailedPreconditionError(absl::StrCat(
      "version ", replaced_by->version, " replaced version ", version, " only ", ago,
      "; kube-apiserver may still be writing Secrets under version ", version,
      " (3 min + pollInterval + 5 min margin); fix: rewrite the Secrets after ",
      absl::FormatTime(absl::RFC3339_sec, replaced_at + settle, absl::UTCTimeZone()),
      " and retire then, or pass --allow-recent if no kube-apiserver uses this environment"));
}

std::string VersionList(const std::vector<core::KeyVersion>& versions) {
  std::string out;
  for (const core::KeyVersion& v : versions) {
    absl::StrAppend(&out, out.empty() ? "" : ", ", v.version);
  }
  return out;
}

}  // namespace kmsplugin::admin
