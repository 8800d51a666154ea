#include "kmsplugin/observe/log.h"

#include <spdlog/pattern_formatter.h>
#include <spdlog/sinks/stdout_sinks.h>

#include <algorithm>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/time.h"

namespace kmsplugin::observe {
namespace {

// Marks a payload that is a whole JSON object of fields, "msg" included.
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

// An empty string, null, or an empty list or object: not worth a field.
bool IsEmpty(const nlohmann::json& value) {
  return value.is_null() || (value.is_string() && value.get_ref<const std::string&>().empty()) ||
         (value.is_structured() && value.empty());
}

std::string Dump(const nlohmann::json& value) {
  // Invalid UTF-8 (say, from a garbage key_id) is replaced, never allowed to break the line.
  return value.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

// The fields of one line: the structured payload parsed back, or a plain spdlog call's text as "msg".
nlohmann::json Fields(std::string_view payload) {
  if (!payload.empty() && payload.front() == kStructured) {
    nlohmann::json parsed = nlohmann::json::parse(payload.substr(1), nullptr, /*allow_exceptions=*/false);
    if (parsed.is_object()) {
      return parsed;
    }
  }
  return nlohmann::json{{"msg", CapForLog(payload)}};
}

void Append(spdlog::memory_buf_t& dest, std::string_view text) { dest.append(text.data(), text.data() + text.size()); }

class JsonFormatter final : public spdlog::formatter {
 public:
  void format(const spdlog::details::log_msg& msg, spdlog::memory_buf_t& dest) override {
    std::string line = "{\"time\":\"";
    line += absl::FormatTime("%Y-%m-%dT%H:%M:%E6SZ", absl::FromChrono(msg.time), absl::UTCTimeZone());
    line += "\",\"level\":\"";
    line += LevelName(msg.level);
    line += "\",";
    const std::string_view payload(msg.payload.data(), msg.payload.size());
    if (!payload.empty() && payload.front() == kStructured) {
      line.append(payload.substr(2));  // the object's members: LogJson wrote it, so "{" follows the marker
    } else {
      line += "\"msg\":";
      line += Dump(CapForLog(payload));
      line += "}";
    }
    line += "\n";
    Append(dest, line);
  }
  std::unique_ptr<spdlog::formatter> clone() const override { return std::make_unique<JsonFormatter>(); }
};

// Text format: hand-written rather than spdlog's pattern formatter, because a pattern cannot escape field values
// (a caller-supplied uid with "\n" or an escape sequence would start a line or drive the terminal).
bool IsBare(std::string_view text) {
  if (text.empty()) {
    return false;
  }
  for (const char c : text) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    std::string_view("._:/@+-,[]").find(c) != std::string_view::npos;
    if (!ok) {
      return false;
    }
  }
  return true;
}

// The length of the valid UTF-8 sequence at the start of `text`, or 0 when it is not one.
size_t Utf8Length(std::string_view text, uint32_t& code_point) {
  const auto byte = [&](size_t i) { return static_cast<unsigned char>(text[i]); };
  const unsigned char lead = byte(0);
  size_t length;
  uint32_t min;
  if (lead < 0x80) {
    code_point = lead;
    return 1;
  } else if ((lead & 0xE0) == 0xC0) {
    length = 2, min = 0x80, code_point = lead & 0x1F;
  } else if ((lead & 0xF0) == 0xE0) {
    length = 3, min = 0x800, code_point = lead & 0x0F;
  } else if ((lead & 0xF8) == 0xF0) {
    length = 4, min = 0x10000, code_point = lead & 0x07;
  } else {
    return 0;
  }
  if (text.size() < length) {
    return 0;
  }
  for (size_t i = 1; i < length; ++i) {
    if ((byte(i) & 0xC0) != 0x80) {
      return 0;
    }
    code_point = (code_point << 6) | (byte(i) & 0x3F);
  }
  if (code_point < min || code_point > 0x10FFFF || (code_point >= 0xD800 && code_point <= 0xDFFF)) {
    return 0;
  }
  return length;
}

// `text` with backslash, quote and every control character (C0, DEL, C1) or invalid UTF-8 byte escaped.
std::string Escape(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  while (!text.empty()) {
    uint32_t code_point = 0;
    const size_t length = Utf8Length(text, code_point);
    if (length == 0) {
      absl::StrAppend(&out, "\\x", absl::Hex(static_cast<unsigned char>(text[0]), absl::kZeroPad2));
      text.remove_prefix(1);
      continue;
    }
    switch (code_point) {
      case '\\':
        out += "\\\\";
        break;
      case '"':
        out += "\\\"";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (code_point < 0x20 || code_point == 0x7F) {
          absl::StrAppend(&out, "\\x", absl::Hex(code_point, absl::kZeroPad2));
        } else if (code_point >= 0x80 && code_point <= 0x9F) {
          absl::StrAppend(&out, "\\u", absl::Hex(code_point, absl::kZeroPad4));  // C1: 0x9B is a CSI
        } else {
          out.append(text.substr(0, length));
        }
    }
    text.remove_prefix(length);
  }
  return out;
}

std::string Quoted(std::string_view text) {
  return IsBare(text) ? std::string(text) : absl::StrCat("\"", Escape(text), "\"");
}

std::string TextValue(const nlohmann::json& value) {
  if (value.is_string()) {
    return Quoted(value.get_ref<const std::string&>());
  }
  if (value.is_array()) {
    // [1,2] or [dev,prod] when every item is bare; otherwise the list as JSON, quoted.
    std::vector<std::string> items;
    bool bare = true;
    for (const auto& item : value) {
      items.push_back(item.is_string() ? item.get<std::string>() : Dump(item));
      bare = bare && IsBare(items.back());
    }
    if (bare) {
      return absl::StrCat("[", absl::StrJoin(items, ","), "]");
    }
  }
  return Quoted(Dump(value));
}

class TextFormatter final : public spdlog::formatter {
 public:
  void format(const spdlog::details::log_msg& msg, spdlog::memory_buf_t& dest) override {
    std::string line = absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", absl::FromChrono(msg.time), absl::UTCTimeZone());
    std::string level = absl::AsciiStrToUpper(std::string(LevelName(msg.level)));
    level.resize(std::max<size_t>(level.size(), 5), ' ');
    absl::StrAppend(&line, " ", level, " ");
    const nlohmann::json fields = Fields(std::string_view(msg.payload.data(), msg.payload.size()));
    const std::string message = fields.value("msg", "");
    const bool plain =
        std::string_view(message).find_first_of("=\"\\") == std::string_view::npos && Escape(message) == message;
    line += plain ? message : absl::StrCat("\"", Escape(message), "\"");
    for (const auto& [key, value] : fields.items()) {
      if (key != "msg") {
        absl::StrAppend(&line, " ", IsBare(key) ? key : Quoted(key), "=", TextValue(value));
      }
    }
    line += "\n";
    Append(dest, line);
  }
  std::unique_ptr<spdlog::formatter> clone() const override { return std::make_unique<TextFormatter>(); }
};

}  // namespace

std::string CapForLog(std::string_view value) {
  if (value.size() <= kMaxLogFieldBytes) {
    return std::string(value);
  }
  // A cut inside a UTF-8 sequence is harmless: the encoder replaces the broken tail.
  return absl::StrCat(std::string(value.substr(0, kMaxLogFieldBytes)), "\xe2\x80\xa6[truncated, ", value.size(),
                      " bytes]");
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

std::optional<LogFormat> ParseLogFormat(std::string_view name) {
  if (name == "json") {
    return LogFormat::kJson;
  }
  if (name == "text") {
    return LogFormat::kText;
  }
  return std::nullopt;
}

std::unique_ptr<spdlog::formatter> MakeJsonFormatter() { return std::make_unique<JsonFormatter>(); }
std::unique_ptr<spdlog::formatter> MakeTextFormatter() { return std::make_unique<TextFormatter>(); }

std::string_view LevelName(spdlog::level::level_enum level) {
  switch (level) {
    case spdlog::level::trace:
      return "trace";
    case spdlog::level::debug:
      return "debug";
    case spdlog::level::info:
      return "info";
    case spdlog::level::warn:
      return "warn";
    case spdlog::level::err:
      return "error";
    case spdlog::level::critical:
      return "critical";
    default:
      return "off";
  }
}

void SetUpLogging(const std::string& level, LogFormat format) {
  auto logger = spdlog::get("kmsplugin");
  if (logger == nullptr) {
    logger = spdlog::stderr_logger_mt("kmsplugin");
  }
  logger->set_formatter(format == LogFormat::kText ? MakeTextFormatter() : MakeJsonFormatter());
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
    if (key != "msg" && !key.empty() && !IsEmpty(value)) {
      nlohmann::json& member = object[CapForLog(key)];
      member = value;
      CapStrings(member);
    }
  }
  spdlog::log(level, "{}{}", kStructured, Dump(object));
}

}  // namespace kmsplugin::observe
