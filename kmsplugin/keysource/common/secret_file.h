#pragma once

// Secret files: the one way every key source reads a credential or key file (root key, passphrase, PIN, Vault
// token, AppRole secret_id) into locked memory, and notices that it changed.
//
// - The file is opened once, and every check runs on the open descriptor (fstat), so a file swapped between the
//   check and the read is never used: a regular file, owned by root or by the effective user, that neither group
//   nor others can read or write (config::CheckSecretStat). Its directory must be owned by root or the effective
//   user and not writable by others (unless sticky), so nobody else can replace the file.
// - At most `max_bytes` are read; a larger file is refused naming the limit. Content lands in SecretBytes only:
//   the buffer it is read into is locked and wiped.
// - FileStamp identifies one version of the file's content on disk (device, inode, size, mtime, ctime), so a
//   rewrite (new inode by rename, or in place) is noticed by a cheap stat.
// Messages name the file and the fix, never its content. Thread-compatible (no shared state).

#include <sys/stat.h>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "crypto/secret_bytes.h"

namespace kmsplugin::keysource {

struct FileStamp {
  dev_t device = 0;
  ino_t inode = 0;
  off_t size = 0;
  int64_t mtime_ns = 0;
  int64_t ctime_ns = 0;
  mode_t mode = 0;  // a chmod to 0644 must be noticed (and refused) too
  bool operator==(const FileStamp&) const = default;
};

FileStamp StampOf(const struct stat& info);
// The stamp of `path` now (following links, as a read would); nullopt when it cannot be stat'ed.
std::optional<FileStamp> StatStamp(const std::string& path);

struct SecretFileOptions {
  size_t max_bytes = 64 * 1024;
  // Strip trailing "\n"/"\r\n" (a credential written with echo); leading/trailing blanks when `trim_blanks`.
  bool trim_newlines = true;
  bool trim_blanks = false;
  // Refuse a file that is empty after trimming.
  bool allow_empty = false;
  // Refuse bytes outside printable ASCII (tokens, secret ids).
  bool printable_only = false;
};

struct SecretFile {
  crypto::SecretBytes bytes;
  FileStamp stamp;
};

// Reads `path` (`what` names it in messages: "PIN file", "Vault token file"). NOT_FOUND when it does not exist,
// FAILED_PRECONDITION for every other refusal, with the fix.
absl::StatusOr<SecretFile> ReadSecretFile(const std::string& path, std::string_view what,
                                          const SecretFileOptions& options = {});

}  // namespace kmsplugin::keysource
