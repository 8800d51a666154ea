#include "kmsplugin/observe/log.h"

#include <spdlog/pattern_formatter.h>
#include <spdlog/sinks/stdout_sinks.h>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"

namespace kmsplugin::observe {
namespace {

// Marks a payload that is already a list of JSON members ("msg":...,"k":v).
constexpr char kStructured = '\x1e';

// Caps every string in `value`, however deep, in place.
void CapStrings(nlohmann::json& value) {
  if (value.is_string()) {
    const std::string& text = value.get_ref<const std::string&>();
    if (text.size() > kMaxLogFieldBytes) {
      value = CapForLog(text);
    }
  } else if (value.is_structured()) {
    for (auto& member : value) {
      CapStrings(member);
    }
  }
}

class JsonFormatter final : public spdlog::formatter {
 public:
  void format(const spdlog::details::log_msg& msg, spdlog::memory_buf_t& dest) override {
    const absl::Time time = absl::FromChrono(msg.time);
    std::string line = "{\"time\":\"";
    line += absl::FormatTime("%Y-%m-%dT%H:%M:%E6SZ", time, absl::UTCTimeZone());
    line += "\",\"level\":\"";
    const auto level = spdlog::level::to_string_view(msg.level);
    line.append(level.data(), level.size());
    line += "\",";
    const std::string_view payload(msg.payload.data(), msg.payload.size());
    if (!payload.empty() && payload.front() == kStructured) {
      line.append(payload.substr(1));
    } else {
      line += "\"msg\":";
      line += nlohmann::json(CapForLog(payload)).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    }
    line += "}\n";
    dest.append(line.data(), line.data() + line.size());
  }
  std::unique_ptr<spdlog::formatter> clone() const override { return std::make_unique<JsonFormatter>(); }
};

}  // namespace

std::string CapForLog(std::string_view value) {
  if (value.size() <= kMaxLogFieldBytes) {
    return std::string(value);
  }
  // A cut inside a UTF-8 sequence is harmless: the encoder replaces the broken tail.
  return absl::StrCat(std::string(value.substr(0, kMaxLogFieldBytes)), "\xe2\x80\xa6[truncated, ", value.size(), " bytes]");
}

LineLimiter::Decision LineLimiter::Admit(const std::string& key, absl::Time now) {
  absl::MutexLock lock(&mu_);
  Window& window = windows_[key];
  if (now - window.start >= absl::Seconds(1)) {
    window.start = now;
    window.written = 0;
  }
  if (window.written >= per_second_) {
    ++window.suppressed;
    return Decision{false, 0};
  }
  ++window.written;
  Decision decision{true, window.suppressed};
  window.suppressed = 0;
  return decision;
}

std::unique_ptr<spdlog::formatter> MakeJsonFormatter() { return std::make_unique<JsonFormatter>(); }

void SetUpJsonLogging(const std::string& level) {
  auto logger = spdlog::get("kmsplugin");
  if (logger == nullptr) {
    logger = spdlog::stderr_logger_mt("kmsplugin");
  }
  logger->set_formatter(MakeJsonFormatter());
  logger->set_level(spdlog::level::from_str(level));
  logger->flush_on(spdlog::level::info);
  spdlog::set_default_logger(logger);
}

void Log(spdlog::level::level_enum level, std::string_view message, LogFields fields) {
  if (!spdlog::should_log(level)) {
    return;
  }
  nlohmann::json object = nlohmann::json::object();
  for (const auto& [key, value] : fields) {
    object[key] = value;
  }
  LogJson(level, message, object);
}

void LogJson(spdlog::level::level_enum level, std::string_view message, const nlohmann::json& fields) {
  if (!spdlog::should_log(level)) {
    return;
  }
  nlohmann::json object = nlohmann::json::object();
  object["msg"] = CapForLog(message);
  for (const auto& [key, value] : fields.items()) {
    if (key != "msg") {
      nlohmann::json& member = object[CapForLog(key)];
      member = value;
      CapStrings(member);
    }
  }
  // Invalid UTF-8 (say, from a garbage key_id) is replaced, never allowed to break the line.
  const std::string members = object.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  std::string payload(1, kStructured);
  payload.append(members, 1, members.size() - 2);  // without the braces
  spdlog::log(level, "{}", payload);
}

}  // namespace kmsplugin::observe
