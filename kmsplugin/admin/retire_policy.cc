#include "kmsplugin/admin/retire_policy.h"

#include "absl/strings/str_cat.h"
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
                          absl::Duration poll_interval, absl::Time now) {
  const absl::Duration settle = SettleTime(poll_interval);
  for (const core::KeyVersion& v : versions) {
    if (v.version <= version) {
      continue;
    }
    // The first version after `version`: the one that replaced it.
    const absl::Duration age = now - v.created;
    if (age >= settle) {
      return absl::OkStatus();
    }
    const std::string ago = age < absl::ZeroDuration()
                                ? std::string("in the future (its creation time is after now: check the clock)")
                                : absl::StrCat(absl::FormatDuration(absl::Trunc(age, absl::Seconds(1))), " ago");
    return absl::FailedPreconditionError(absl::StrCat(
        "version ", v.version, " replaced version ", version, " only ", ago,
        "; kube-apiserver may still be writing Secrets under version ", version,
        " (3 min + pollInterval + 5 min margin); fix: rewrite the Secrets after ",
        absl::FormatTime(absl::RFC3339_sec, v.created + settle, absl::UTCTimeZone()),
        " and retire then, or pass --allow-recent if no kube-apiserver uses this environment"));
  }
  return absl::OkStatus();
}

std::string VersionList(const std::vector<core::KeyVersion>& versions) {
  std::string out;
  for (const core::KeyVersion& v : versions) {
    absl::StrAppend(&out, out.empty() ? "" : ", ", v.version);
  }
  return out;
}

}  // namespace kmsplugin::admin
