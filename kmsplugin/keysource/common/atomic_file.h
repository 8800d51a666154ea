#pragma once

// Atomic files: how key material is written and read back, for every key source that keeps files.
//
// - WriteFileAtomically: a temporary file next to the target (mkstemp: unique, O_EXCL, mode 0600), written,
//   fsync'ed, then renamed over the target (or, `exclusive`, hard-linked to it so an existing file is never
//   replaced), then the directory fsync'ed: a crash at any point leaves the old or the new file, never a broken
//   one. A file larger than the limit it would be read back with is refused before anything is written.
// - Reading key files back: config::ReadCheckedFile (checked on the descriptor it reads), with kMaxKeyFileBytes.
// - RemoveStaleTemporaries: the temporary files a killed writer left next to `path` (they may hold key material,
//   such as a root key that was never used), overwritten with zeros and removed.
// Thread-compatible.

#include <cstddef>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace kmsplugin::keysource {

// The most a key file (a keyring, a root key) may hold, for writers and readers alike.
inline constexpr size_t kMaxKeyFileBytes = size_t{1} << 20;

absl::Status WriteFileAtomically(const std::string& path, const std::string& bytes, bool exclusive,
                                 size_t max_bytes = kMaxKeyFileBytes);

// Removes `<path>.tmp-*` files last written at least `min_age` ago (mtime), owned by the effective user and not
// linked elsewhere. Returns how many it removed.
inline constexpr absl::Duration kStaleTemporaryAge = absl::Minutes(1);
int RemoveStaleTemporaries(const std::string& path, absl::Duration min_age = kStaleTemporaryAge);
}  // namespace kmsplugin::keysource
