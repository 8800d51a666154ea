#pragma once

// Key version creation times that lie in the future. A version's creation time comes from the clock of whoever
// made it (this host for local keyrings, the Vault server, the HSM's host) and is part of its key_id (and, for a
// local keyring, sealed with it), so a wrong one cannot be edited away. It need not block anything either:
// - a new version never inherits an older one's time (keysource/local stamps the clock's own time), and
// - a retire counts from the earliest creation time among the later versions (CheckSettled), because a later
//   version cannot have been made before an earlier one: one rotation with the clock right bounds the future one.
// So the repair is: set the clock right, `kmsplugin rotate`, retire on the schedule `retire` names.

#include <string>
#include <string_view>
#include <vector>

#include "absl/time/time.h"
#include "kmsplugin/core/key_source.h"

namespace kmsplugin::admin {

// Clocks of two hosts differ by seconds; a creation time this far ahead of ours is a clock that was wrong.
inline constexpr absl::Duration kCreationClockTolerance = absl::Minutes(5);

// Whether `v` was created more than kCreationClockTolerance after `now`.
bool CreatedInFuture(const core::KeyVersion& v, absl::Time now);

// One line per such version of `environment`, naming its time and the repair; empty when there is none.
std::vector<std::string> FutureCreationWarnings(const std::vector<core::KeyVersion>& versions, absl::Time now,
                                                std::string_view environment);

}  // namespace kmsplugin::admin
