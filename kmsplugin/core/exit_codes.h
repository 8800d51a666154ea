#pragma once

// The exit codes of every kmsplugin command, in one table (README "Exit codes"); the CLI, audit and doctor all
// map their outcomes through these.

#include "absl/status/status.h"
#include "absl/strings/cord.h"

namespace kmsplugin::core {

inline constexpr int kExitOk = 0;
inline constexpr int kExitFailed = 1;       // a check failed, the service is unhealthy, or the operation was refused
inline constexpr int kExitUsage = 2;        // a usage or config error: the message names the flag or field
inline constexpr int kExitUnreachable = 3;  // a socket or backend (etcd, Vault, the HSM) could not be reached

// 3 when `status` says something could not be reached in time, else `otherwise`.
inline int ExitCodeFor(const absl::Status& status, int otherwise) {
  return status.code() == absl::StatusCode::kUnavailable || status.code() == absl::StatusCode::kDeadlineExceeded
             ? kExitUnreachable
             : otherwise;
}

// A config that cannot be loaded, or an environment it does not have, is a usage error (2) wherever it surfaces;
// the layer that loads the config marks it so, and the CLI's one failure path reads the mark.
inline constexpr char kUsageErrorPayload[] = "type.kmsplugin.dev/usage-error";
inline absl::Status AsUsageError(absl::Status status) {
  if (!status.ok()) {
    status.SetPayload(kUsageErrorPayload, absl::Cord("config"));
  }
  return status;
}
inline bool IsUsageError(const absl::Status& status) {
  return status.code() == absl::StatusCode::kInvalidArgument || status.GetPayload(kUsageErrorPayload).has_value();
}

}  // namespace kmsplugin::core
