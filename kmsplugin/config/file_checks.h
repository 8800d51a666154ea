#pragma once

// Checks on files that hold configuration, credentials or key material. Each error names the file and the fix
// (ARCHITECTURE.md rule 6): a key file anyone else can read is a leaked key, a config file anyone else can
// write is a way to point the plugin at another key.

#include <string>
#include <string_view>

#include "absl/status/status.h"

namespace kmsplugin::config {

// A secret (root key, keyring, PIN, token, AppRole secret): must be a regular file that neither group nor
// others can read or write. NOT_FOUND when missing; FAILED_PRECONDITION naming the mode and `chmod 600 FILE`.
absl::Status CheckSecretFile(const std::string& path, std::string_view what);

// A config file: must exist and not be writable by group or others.
absl::Status CheckFileNotWritableByOthers(const std::string& path, std::string_view what);

}  // namespace kmsplugin::config
