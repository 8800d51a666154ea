#pragma once

// Structured logs: one JSON object per line on stderr,
//   {"time":"2026-11-22T08:00:00.000000Z","level":"info","msg":"...","environment":"dev",...}
// Log() adds fields; any plain spdlog call anywhere in the process still yields a valid JSON line (its text
// becomes "msg"). Never pass a secret: fields are for names, key_ids, codes and latencies.
//
// Bounded lines: every string (the message, each field, strings nested in fields) is cut at kMaxLogFieldBytes and
// marked with its original length, so a caller that sends a 32,000-byte uid or key_id cannot make each log line
// 32 KB. Control characters and invalid UTF-8 are escaped or replaced by the JSON encoder, never written raw.
// LineLimiter bounds how many lines a repeated event may write per second.

#include <cstdint>
#include <initializer_list>
#include <map>
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

// The JSON line formatter (for tests and for any extra sink).
std::unique_ptr<spdlog::formatter> MakeJsonFormatter();

// Installs the JSON formatter on a stderr logger as the default logger. `level`: trace|debug|info|warn|error.
void SetUpJsonLogging(const std::string& level);

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
