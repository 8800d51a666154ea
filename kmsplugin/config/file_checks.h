#pragma once

// Checks on files that hold configuration, credentials or key material. Each error names the file and the fix
// (ARCHITECTURE.md rule 6): a key file anyone else can read is a leaked key, a config file anyone else can
// write is a way to point the plugin at another key.

//
// Ownership (README "Guarantees"): a file that decides which keys are used or which code runs (config, keyring,
// root key, PIN, token, PKCS#11 module) must be owned by root or by the effective user, and so must its directory,
// which others must not be able to write (a sticky directory such as /tmp is accepted: others cannot replace
// entries there). Otherwise another local user who owns or can replace the file could point a root-run
// `kmsplugin rotate` at a module or key of their choosing.

#include <sys/stat.h>

#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace kmsplugin::config {

// A secret (root key, keyring, PIN, token, AppRole secret): must be a regular file, owned by root or the effective
// user, that neither group nor others can read or write, in a directory that passes CheckDirectoryOf. NOT_FOUND
// when missing; FAILED_PRECONDITION naming the mode or owner and the fix (`chmod 600 FILE`, `chown`).
absl::Status CheckSecretFile(const std::string& path, std::string_view what);
// The same checks on a file already opened and fstat'ed (no race between check and read).
absl::Status CheckSecretStat(const struct stat& info, const std::string& path, std::string_view what);

// A file that decides what runs or which keys are used but is not secret (config file, PKCS#11 module): a regular
// file owned by root or the effective user, not writable by group or others, in a directory that passes
// CheckDirectoryOf.
absl::Status CheckTrustedFile(const std::string& path, std::string_view what);
// The same on an fstat'ed file.
absl::Status CheckTrustedStat(const struct stat& info, const std::string& path, std::string_view what);

// Every directory on the way to `path`, both as written and after resolving links: owned by root or the effective
// user, and not writable by group or others unless it is sticky; a symbolic link on the way must be owned by
// root or the effective user too. (A link to a trusted file, placed in a directory someone else controls, is
// refused: that someone could point it elsewhere between two reads.)
absl::Status CheckDirectoryOf(const std::string& path, std::string_view what);

// A file opened once, checked on its descriptor (CheckSecretStat or CheckTrustedStat), and read from that same
// descriptor, so a path swapped between the check and the read is never used. O_NONBLOCK at open, so a FIFO
// planted at the path is refused instead of hanging; O_NOFOLLOW when `follow_links` is false. At most `max_bytes`.
enum class FileKind { kSecret, kTrusted };
// The open and the checks alone: a descriptor (the caller closes it) of a file that passed them, and its fstat in
// `info`. ReadCheckedFile and keysource::ReadSecretFile (which reads into locked memory) both start here.
absl::StatusOr<int> OpenCheckedFile(const std::string& path, std::string_view what, FileKind kind,
                                    bool follow_links, struct stat* info);
struct CheckedFile {
  std::string bytes;
  struct stat info {};
};
absl::StatusOr<CheckedFile> ReadCheckedFile(const std::string& path, std::string_view what, FileKind kind,
                                            size_t max_bytes, bool follow_links = true);

// Kept for callers that only need the config-file rule: same as CheckTrustedFile.
absl::Status CheckFileNotWritableByOthers(const std::string& path, std::string_view what);

}  // namespace kmsplugin::config
