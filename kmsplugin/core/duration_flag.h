#pragma once

// Durations on the command line, one form for every subcommand: as kube-apiserver and Go write them ("3s",
// "500ms", "1m30s"), or a bare number of seconds (the older spelling of status/audit, kept). absl::ParseDuration
// reads the Go form; only the fallback and the bounds are ours.

#include <optional>
#include <string>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"

namespace kmsplugin::core {

// The duration `text` names, if it is a positive, finite one.
inline std::optional<absl::Duration> ParseDurationFlag(const std::string& text) {
  absl::Duration duration;
  double seconds = 0;
  if (absl::ParseDuration(text, &duration)) {
  } else if (absl::SimpleAtod(text, &seconds) && seconds == seconds) {
    duration = absl::Seconds(seconds);
  } else {
    return std::nullopt;
  }
  if (duration <= absl::ZeroDuration() || duration == absl::InfiniteDuration()) {
    return std::nullopt;
  }
  return duration;
}

// The one-line usage error for a bad duration flag (the caller caps nothing: CLI11 hands us argv as typed).
inline std::string DurationFlagError(const std::string& flag, const std::string& text) {
  return absl::StrCat(flag, " \"", text.substr(0, 64), "\" is not a positive duration; write e.g. 3s, 500ms or 1m30s");
}

}  // namespace kmsplugin::core
