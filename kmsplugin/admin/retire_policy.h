#pragma once

// Retire policy: what `kmsplugin retire` may change and when, decided before the key source is touched. Pure
// functions, unit-tested (tests/admin/retire_policy_test.cc); the command adds the etcd check and the printing.
//
// - The versions an action changes come from core/version_rules.h, the same rule the key source applies.
// - A retire waits until kube-apiserver can no longer be writing under the old version: kube-apiserver polls Status
//   every minute and a data key may coast 3 minutes; every kmsplugin notices a rotation within pollInterval; a
//   5-minute margin covers the rest (the RUNBOOK's 3 + N + M). Until then new Secrets may still be written under
//   the versions about to be retired, after the etcd check has looked.

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "kmsplugin/core/key_source.h"

namespace kmsplugin::admin {

enum class RetireAction { kRetire, kReinstate, kDestroy };

// "retire", "reinstate", "destroy"; and "retired", "reinstated", "destroyed".
const char* Verb(RetireAction action);
const char* PastTense(RetireAction action);

// The versions `action` on `version` changes (empty: nothing to do).
absl::StatusOr<std::vector<core::KeyVersion>> PlanRetireAction(RetireAction action,
                                                               const std::vector<core::KeyVersion>& versions,
                                                               uint64_t version);

// How long after the next version's creation a retire of `version` must wait.
absl::Duration SettleTime(absl::Duration poll_interval);

// FAILED_PRECONDITION when the version that replaced `version` is younger than SettleTime(poll_interval) at `now`,
// naming its age, the time from which the retire is allowed, and --allow-recent. Its age counts from the earliest
// creation time among all later versions (a later version cannot be older), so a future creation time (a clock
// that was ahead) is bounded by one rotation with the clock right; without one, the message says so, for
// `environment`.
absl::Status CheckSettled(const std::vector<core::KeyVersion>& versions, uint64_t version,
                          absl::Duration poll_interval, absl::Time now, std::string_view environment = "ENV");

// "1, 2, 3".
std::string VersionList(const std::vector<core::KeyVersion>& versions);

}  // namespace kmsplugin::admin
