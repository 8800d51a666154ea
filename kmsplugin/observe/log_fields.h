#pragma once

// The log's field list: every key a kmsplugin log line may carry, its one JSON type and what it means. This table
// is the single source of truth: README.md "Logs" lists exactly these keys (a test compares the two), and the
// daemon's log test checks every line it writes against it. A new field goes here first; a key keeps one type and
// one meaning everywhere (two meanings get two keys).
//
// Lines never carry an empty field: LogJson drops empty strings, nulls and empty lists, so a key's presence means
// it has a value.

#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

namespace kmsplugin::observe {

enum class LogFieldType {
  kString,
  kInteger,  // a JSON number without a fraction
  kNumber,   // any JSON number
  kBoolean,
  kStringList,
  kIntegerList,
};

struct LogField {
  const char* key;
  LogFieldType type;
  const char* meaning;
};

// Every field, in the order README.md lists them.
const std::vector<LogField>& LogFieldTable();
// The entry for `key`, or nullptr when no line may carry it.
const LogField* FindLogField(std::string_view key);
// "string", "integer", "number", "boolean", "list of strings", "list of integers" (as README.md writes them).
std::string_view LogFieldTypeName(LogFieldType type);
// Whether `value` has `type`.
bool HasLogFieldType(const nlohmann::json& value, LogFieldType type);

// The level names a line may carry: exactly the --log-level flag's names.
const std::vector<std::string>& LogLevelNames();

// What is wrong with one parsed JSON log line: not an object, a missing time/level/msg, a level the flag does not
// spell, an empty field, a key missing from the table or a value of another type. Empty when the line conforms.
std::vector<std::string> CheckLogLine(const nlohmann::json& line);

}  // namespace kmsplugin::observe
