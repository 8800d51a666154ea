#include "kmsplugin/config/field_context.h"

#include <algorithm>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "kmsplugin/core/sv.h"

namespace kmsplugin::config {
namespace {

// Every string of the config is bounded and free of control characters before any other rule sees it: a NUL in
// `socket:` would otherwise serve on the truncated path, and a 10 MB name would be echoed into every message.
absl::Status CheckText(const FieldContext& context, const std::string& text) {
  if (text.size() > kMaxConfigString) {
    return context.Error(absl::StrCat("is ", text.size(), " bytes long; a config value holds at most ",
                                      kMaxConfigString),
                         "write the intended value");
  }
  for (size_t i = 0; i < text.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(text[i]);
    if (c < 0x20 || c == 0x7f) {
      return context.Error(absl::StrFormat("holds a control character (byte 0x%02x at offset %d)", c, i),
                           "write the value without control characters (a NUL would cut a path short)");
    }
  }
  return absl::OkStatus();
}

std::string NodeTypeName(const YAML::Node& node) {
  switch (node.Type()) {
    case YAML::NodeType::Null:
      return "null";
    case YAML::NodeType::Scalar:
      return "a scalar";
    case YAML::NodeType::Sequence:
      return "a list";
    case YAML::NodeType::Map:
      return "a mapping";
    default:
      return "undefined";
  }
}

}  // namespace

FieldContext FieldContext::Child(std::string_view key) const {
  return FieldContext(file_, path_.empty() ? std::string(key) : absl::StrCat(path_, ".", Sv(key)));
}

FieldContext FieldContext::Index(size_t index) const {
  return FieldContext(file_, absl::StrCat(path_, "[", index, "]"));
}

absl::Status FieldContext::Error(std::string_view problem, std::string_view fix) const {
  return absl::InvalidArgumentError(
      absl::StrCat(file_, ": ", path_.empty() ? "(top level)" : path_, ": ", Sv(problem), "; fix: ", Sv(fix)));
}

absl::StatusOr<std::string> FieldContext::RequiredString(const YAML::Node& node, std::string_view key,
                                                         std::string_view fix) const {
  absl::StatusOr<std::optional<std::string>> value = OptionalString(node, key);
  if (!value.ok()) {
    return value.status();
  }
  if (!value->has_value() || (*value)->empty()) {
    return Child(key).Error("is missing", fix);
  }
  return **value;
}

absl::StatusOr<std::optional<std::string>> FieldContext::OptionalString(const YAML::Node& node,
                                                                        std::string_view key) const {
  const YAML::Node value = node[std::string(key)];
  if (!value.IsDefined() || value.IsNull()) {
    return std::optional<std::string>();
  }
  if (!value.IsScalar()) {
    return Child(key).Error(absl::StrCat("must be a string, not ", NodeTypeName(value)),
                            "write a single value");
  }
  const std::string& text = value.Scalar();
  if (auto status = CheckText(Child(key), text); !status.ok()) {
    return status;
  }
  return std::optional<std::string>(text);
}

absl::StatusOr<std::optional<absl::Duration>> FieldContext::OptionalDuration(const YAML::Node& node,
                                                                             std::string_view key) const {
  absl::StatusOr<std::optional<std::string>> text = OptionalString(node, key);
  if (!text.ok()) {
    return text.status();
  }
  if (!text->has_value()) {
    return std::optional<absl::Duration>();
  }
  absl::Duration duration;
  if (!absl::ParseDuration(**text, &duration) || duration <= absl::ZeroDuration() ||
      duration == absl::InfiniteDuration()) {
    return Child(key).Error(absl::StrCat("\"", **text, "\" is not a positive duration"),
                            "write a duration such as 10s, 500ms or 1m30s");
  }
  return std::optional<absl::Duration>(duration);
}

absl::StatusOr<std::optional<int64_t>> FieldContext::OptionalInt(const YAML::Node& node, std::string_view key,
                                                                 int64_t min, int64_t max) const {
  absl::StatusOr<std::optional<std::string>> text = OptionalString(node, key);
  if (!text.ok()) {
    return text.status();
  }
  if (!text->has_value()) {
    return std::optional<int64_t>();
  }
  int64_t value = 0;
  if (!absl::SimpleAtoi(**text, &value) || value < min || value > max) {
    return Child(key).Error(absl::StrCat("\"", **text, "\" is not a whole number from ", min, " to ", max),
                            absl::StrCat("write a number from ", min, " to ", max));
  }
  return std::optional<int64_t>(value);
}

absl::StatusOr<std::optional<bool>> FieldContext::OptionalBool(const YAML::Node& node, std::string_view key) const {
  absl::StatusOr<std::optional<std::string>> text = OptionalString(node, key);
  if (!text.ok()) {
    return text.status();
  }
  if (!text->has_value()) {
    return std::optional<bool>();
  }
  if (**text == "true") {
    return std::optional<bool>(true);
  }
  if (**text == "false") {
    return std::optional<bool>(false);
  }
  return Child(key).Error(absl::StrCat("\"", **text, "\" is not a boolean"), "write true or false");
}

absl::StatusOr<std::optional<std::vector<std::string>>> FieldContext::OptionalStringList(
    const YAML::Node& node, std::string_view key) const {
  const YAML::Node value = node[std::string(key)];
  if (!value.IsDefined() || value.IsNull()) {
    return std::optional<std::vector<std::string>>();
  }
  if (!value.IsSequence()) {
    return Child(key).Error(absl::StrCat("must be a list, not ", NodeTypeName(value)),
                            "write a YAML list, one item per line starting with \"- \"");
  }
  std::vector<std::string> items;
  for (size_t i = 0; i < value.size(); ++i) {
    if (!value[i].IsScalar() || value[i].Scalar().empty()) {
      return Child(key).Index(i).Error("must be a non-empty string", "write a single value");
    }
    if (auto status = CheckText(Child(key).Index(i), value[i].Scalar()); !status.ok()) {
      return status;
    }
    items.push_back(value[i].Scalar());
  }
  return std::optional<std::vector<std::string>>(std::move(items));
}

absl::Status FieldContext::RejectUnknownKeys(const YAML::Node& node,
                                             const std::vector<std::string_view>& allowed) const {
  std::vector<std::string> names(allowed.begin(), allowed.end());
  if (!node.IsMap()) {
    return Error(absl::StrCat("must be a mapping, not ", NodeTypeName(node)),
                 absl::StrCat("write a mapping with the keys ", absl::StrJoin(names, ", ")));
  }
  std::vector<std::string> seen;
  for (const auto& entry : node) {
    const std::string key = entry.first.Scalar();
    if (std::find(seen.begin(), seen.end(), key) != seen.end()) {
      // yaml-cpp keeps the first of two equal keys; YAML 1.2 forbids them, and a silent choice could serve the
      // wrong socket or key.
      return Child(key).Error("appears more than once", "keep exactly one value for it");
    }
    seen.push_back(key);
    if (std::find(allowed.begin(), allowed.end(), key) == allowed.end()) {
      return Child(key).Error("is not a known setting",
                              absl::StrCat("remove it or correct the spelling; known here: ",
                                           absl::StrJoin(names, ", ")));
    }
  }
  return absl::OkStatus();
}

}  // namespace kmsplugin::config
