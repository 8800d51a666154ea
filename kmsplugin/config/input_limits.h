#pragma once

// Input limits checked before anything recursive runs on outside input (a keyring file, a config file, a Vault
// response, an EncryptionConfiguration). nlohmann::json's serializer and yaml-cpp's parser recurse once per level
// of nesting, so a 200 KB file nested 100,000 deep overflows the stack; these scans are iterative and cheap, and
// every parser of outside input runs one first. The refusal names the input, the depth found and the limit.

#include <cstddef>
#include <string_view>

#include "absl/status/status.h"

namespace kmsplugin::config {

// Far above anything a legitimate keyring, config or Vault response has (they nest 4 to 6 deep).
inline constexpr int kMaxNesting = 64;

// JSON: counts [ and { outside strings. INVALID_ARGUMENT when deeper than `max_depth`.
absl::Status CheckJsonNesting(std::string_view text, std::string_view what, int max_depth = kMaxNesting);

// YAML: flow collections ([ and { outside quoted scalars and comments) and block indentation (leading spaces of a
// line, counted as one level per two columns). INVALID_ARGUMENT when either is deeper than `max_depth`.
absl::Status CheckYamlNesting(std::string_view text, std::string_view what, int max_depth = kMaxNesting);

}  // namespace kmsplugin::config
