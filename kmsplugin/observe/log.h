#pragma once

// Structured logs: one JSON object per line on stderr,
//   {"time":"2026-11-22T08:00:00.000000Z","level":"info","msg":"...","environment":"dev",...}
// Log() adds fields; any plain spdlog call anywhere in the process still yields a valid JSON line (its text
// becomes "msg"). Never pass a secret: fields are for names, key_ids, codes and latencies.

#include <initializer_list>
#include <string>
#include <string_view>
#include <utility>

#include <nlohmann/json.hpp>
#include <spdlog/formatter.h>
#include <spdlog/spdlog.h>

namespace kmsplugin::observe {

// The JSON line formatter (for tests and for any extra sink).
std::unique_ptr<spdlog::formatter> MakeJsonFormatter();

// Installs the JSON formatter on a stderr logger as the default logger. `level`: trace|debug|info|warn|error.
void SetUpJsonLogging(const std::string& level);

using LogFields = std::initializer_list<std::pair<const char*, nlohmann::json>>;

void Log(spdlog::level::level_enum level, std::string_view message, LogFields fields = {});
// The same with fields built at run time (an object; "msg" is set from `message`).
void LogJson(spdlog::level::level_enum level, std::string_view message, const nlohmann::json& fields);

}  // namespace kmsplugin::observe
