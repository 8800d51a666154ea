#pragma once

// Unix socket lifecycle for one environment (ARCHITECTURE.md rule 8).
// - PrepareSocketPath: creates the parent directory if missing (0700, or 0750 with the socket group); refuses a
//   path that is not a socket; refuses a socket something still answers on (a second `serve`); removes a stale
//   socket file nothing answers on.
// - SecureSocket: after gRPC has bound, sets mode 0600 (0660 and the group when one is configured) and records
//   the inode, so RemoveSocket deletes only the file this process created.

#include <optional>
#include <string>
#include <sys/types.h>

#include "absl/status/statusor.h"

namespace kmsplugin::server {

// The id of `group`; NOT_FOUND naming it and the fix when there is no such group.
absl::StatusOr<gid_t> LookupGroup(const std::string& group);

absl::Status PrepareSocketPath(const std::string& path, const std::optional<std::string>& group);

// Returns the socket's inode.
absl::StatusOr<ino_t> SecureSocket(const std::string& path, const std::optional<std::string>& group);

// Removes `path` if it is still the socket with `inode`.
void RemoveSocket(const std::string& path, ino_t inode);

}  // namespace kmsplugin::server
