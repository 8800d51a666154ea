#pragma once

// Structured logs on stderr, in one of two formats (`--log-format`):
//   json (default): one JSON object per line,
//     {"time":"2026-11-22T08:00:00.000000Z","level":"info","environment":"dev","msg":"...",...}
//   text, for a person at a terminal: TIME LEVEL MESSAGE KEY=VALUE...
//     2026-11-22T08:00:00.000Z WARN  rpc failed code=INVALID_ARGUMENT environment=dev uid="a b"
//     A value is written bare when it is only letters, digits and . _ : / @ + - , [ ], otherwise in double quotes
//     with \\ \" \n \r \t and \xNN (any other control character, C1 controls, invalid UTF-8) escaped. The message
//     is written as it is unless it holds = " \\ or such a character; then it is quoted and escaped the same way.
//     So a reader finds the fields at the first "=", and a caller-supplied value can never start a line or write
//     a raw control character to the terminal.
// Levels are named as the --log-level flag names them: trace, debug, info, warn, error, critical. Log() adds
// fields; a field whose value is empty (an empty string, null or an empty list) is left out, never written. Every
// key, its one type and meaning, is listed in log_fields.h (and README.md "Logs"). Any plain spdlog call anywhere
// in the process still yields a valid line (its text becomes "msg"). Never pass a secret: fields are for names,
// key_ids, codes and latencies.
//
// Bounded lines: every string (the message, each field, strings nested in fields) is cut at kMaxLogFieldBytes and
// marked with its original length, so a caller that sends a 32,000-byte uid or key_id cannot make each log line
// 32 KB. Control characters and invalid UTF-8 are escaped or replaced by either format, never written raw.
// LineLimiter bounds how many lines a repeated event may write per second.

#include <cstdint>
#include <initializer_list>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include <nlohmann/json.hpp>
#include <spdlog/formatter.h>
#include <spdlog/spdlog.h>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace kmsplugin::observe {

enum class LogFormat { kJson, kText };
// "json" or "text"; nullopt for anything else.
std::optional<LogFormat> ParseLogFormat(std::string_view name);

// The line formatters (for tests and for any extra sink).
std::unique_ptr<spdlog::formatter> MakeJsonFormatter();
std::unique_ptr<spdlog::formatter> MakeTextFormatter();

// The name a line carries for `level`, as the --log-level flag spells it ("warn", not spdlog's "warning").
std::string_view LevelName(spdlog::level::level_enum level);

// Installs a stderr logger in `format` as the default logger. `level`: trace|debug|info|warn|error|critical|off.
void SetUpLogging(const std::string& level, LogFormat format);
inline void SetUpJsonLogging(const std::string& level) { SetUpLogging(level, LogFormat::kJson); }

using LogFields = std::initializer_list<std::pair<const char*, nlohmann::json>>;

void Log(spdlog::level::level_enum level, std::string_view message, LogFields fields = {});
// The same with fields built at run time (an object; "msg" is set from `message`).
void LogJson(spdlog::level::level_enum level, std::string_view message, const nlohmann::json& fields);

// The most bytes of one string in a log line. A key_id may be 1024 bytes (ARCHITECTURE rule 1), so it is logged
// whole; anything longer is caller-supplied garbage or a runaway message.
inline constexpr size_t kMaxLogFieldBytes = 1024;
// `value` cut at kMaxLogFieldBytes, with "…[truncated, N bytes]" appended when it was cut.
std::string CapForLog(std::string_view value);

// LineLimiter: at most `per_second` lines per key in each one-second window. Admit() says whether to write the
// line and how many lines of that key were held back since the last one written, so the next line written can
// say so ("suppressed": N). Thread-safe. Keys are few (one per environment, RPC and code), so they are kept.
class LineLimiter {
 public:
  explicit LineLimiter(int per_second) : per_second_(per_second) {}
  struct Decision {
    bool write = true;
    uint64_t suppressed_before = 0;  // lines of this key held back since the last one written
  };
  Decision Admit(const std::string& key, absl::Time now);

 private:
  struct Window {
    absl::Time start = absl::InfinitePast();
    int written = 0;
    uint64_t suppressed = 0;
  };
  const int per_second_;
  absl::Mutex mu_;
  std::map<std::string, Window> windows_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kmsplugin::observe
