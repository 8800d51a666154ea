#include "kmsplugin/admin/version_times.h"

#include "absl/strings/str_cat.h"
#include "kmsplugin/core/sv.h"

namespace kmsplugin::admin {

bool CreatedInFuture(const core::KeyVersion& v, absl::Time now) { return v.created - now > kCreationClockTolerance; }

std::vector<std::string> FutureCreationWarnings(const std::vector<core::KeyVersion>& versions, absl::Time now,
                                                std::string_view environment) {
  std::vector<std::string> warnings;
  for (const core::KeyVersion& v : versions) {
    if (!CreatedInFuture(v, now)) {
      continue;
    }
    warnings.push_back(absl::StrCat(
        "version ", v.version, " was created at ", absl::FormatTime(absl::RFC3339_sec, v.created, absl::UTCTimeZone()),
        ", in the future (now ", absl::FormatTime(absl::RFC3339_sec, now, absl::UTCTimeZone()),
        "): the clock was ahead when it was made; its ciphertexts decrypt as usual, but a retire cannot count from "
        "that time; fix: set the clock right (check NTP), run `kmsplugin rotate --env ",
        Sv(environment), "`, then retire versions up to ", v.version,
        " from the new version's creation time on (`kmsplugin retire` names the time; see RUNBOOK, "
        "\"A creation time in the future\")"));
  }
  return warnings;
}

}  // namespace kmsplugin::admin
