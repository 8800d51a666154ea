#pragma once

// FieldContext: where in which config file a YAML node sits, so every validation error names the file, the
// field and the fix:  "/etc/kmsplugin/config.yaml: environments[0].keySource.local.keyring: is missing;
// fix: set it to the keyring file path, e.g. /var/lib/kmsplugin/dev.keyring".

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <yaml-cpp/yaml.h>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace kmsplugin::config {

// The longest string any config value may hold (paths are far shorter; this bounds what messages echo).
inline constexpr size_t kMaxConfigString = 4096;

class FieldContext {
 public:
  FieldContext(std::string file, std::string path) : file_(std::move(file)), path_(std::move(path)) {}

  const std::string& file() const { return file_; }
  const std::string& path() const { return path_; }

  FieldContext Child(std::string_view key) const;
  FieldContext Index(size_t index) const;

  // INVALID_ARGUMENT "<file>: <path>: <problem>; fix: <fix>".
  absl::Status Error(std::string_view problem, std::string_view fix) const;

  // Typed accessors on `node[key]`. A missing optional key gives std::nullopt; a present key of the wrong type
  // or shape is an error naming the field. Unknown keys are found by RejectUnknownKeys.
  absl::StatusOr<std::string> RequiredString(const YAML::Node& node, std::string_view key,
                                             std::string_view fix) const;
  absl::StatusOr<std::optional<std::string>> OptionalString(const YAML::Node& node, std::string_view key) const;
  // Durations as Go writes them: "10s", "500ms", "1m30s".
  absl::StatusOr<std::optional<absl::Duration>> OptionalDuration(const YAML::Node& node,
                                                                 std::string_view key) const;
  absl::StatusOr<std::optional<int64_t>> OptionalInt(const YAML::Node& node, std::string_view key, int64_t min,
                                                     int64_t max) const;
  absl::StatusOr<std::optional<bool>> OptionalBool(const YAML::Node& node, std::string_view key) const;
  absl::StatusOr<std::optional<std::vector<std::string>>> OptionalStringList(const YAML::Node& node,
                                                                             std::string_view key) const;
  // `node` must be a map whose keys are all in `allowed`; a typo is an error naming the key and the choices.
  absl::Status RejectUnknownKeys(const YAML::Node& node, const std::vector<std::string_view>& allowed) const;

 private:
  std::string file_;
  std::string path_;
};

}  // namespace kmsplugin::config
