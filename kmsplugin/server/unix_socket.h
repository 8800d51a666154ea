#pragma once

// Unix socket lifecycle for one environment (ARCHITECTURE.md rule 8).
// - PrepareSocketPath: creates the parent directory if missing (0700, or 0750 with the socket group); refuses a
//   socket directory that another user owns or that group or others may write (unless sticky): whoever can
//   write there can swap the socket for a link or for their own socket; refuses a path that is not a socket;
//   refuses a socket something still answers on (a second `serve`); removes a stale socket file nothing answers
//   on.
// - BindSocket: creates, binds and listens on the socket with mode 0600 (0660 and the group when one is
//   configured), never following a link: the mode is set on the socket before bind() (Linux gives the file the
//   socket inode's mode, masked by umask), and the group on the file opened with O_PATH|O_NOFOLLOW after bind,
//   which must be a socket owned by us. Records the inode, so RemoveSocket deletes only the file this process
//   created.

#include <sys/types.h>

#include <optional>
#include <string>

#include "absl/status/statusor.h"

namespace kmsplugin::server {

// The id of `group`; NOT_FOUND naming it and the fix when there is no such group.
absl::StatusOr<gid_t> LookupGroup(const std::string& group);

absl::Status PrepareSocketPath(const std::string& path, const std::optional<std::string>& group);

// A bound, listening socket (non-blocking, close-on-exec) and the inode of its file.
struct BoundSocket {
  int fd = -1;
  ino_t inode = 0;
};
// Binds `path` (prepared by PrepareSocketPath) and listens with `backlog`. On failure nothing is left bound or
// open (a file bound and then found replaced is left alone: it is not ours).
absl::StatusOr<BoundSocket> BindSocket(const std::string& path, const std::optional<std::string>& group,
                                       int backlog);

// Whether `path` is still the socket file with `inode` (lstat: a link there is not).
bool IsSocketFile(const std::string& path, ino_t inode);

// Removes `path` if it is still the socket with `inode`.
void RemoveSocket(const std::string& path, ino_t inode);

}  // namespace kmsplugin::server
