#include "kmsplugin/daemon/event_log_sink.h"

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "absl/strings/numbers.h"
#include "kmsplugin/observe/log.h"
#include "kmsplugin/observe/log_fields.h"

namespace kmsplugin::daemon {
namespace {

constexpr size_t kMaxFieldBytes = 512;

std::string Capped(const std::string& value) {
  if (value.size() <= kMaxFieldBytes) {
    return value;
  }
  return value.substr(0, kMaxFieldBytes) + "...(truncated)";
}

// A source's fields arrive as text; a key the field list (observe/log_fields.h) types as a number is written as
// one ("ttl_seconds":3600, not "3600"), so each key keeps one JSON type whoever logs it.
nlohmann::json Typed(const std::string& key, const std::string& value) {
  const observe::LogField* field = observe::FindLogField(key);
  if (field != nullptr &&
      (field->type == observe::LogFieldType::kInteger || field->type == observe::LogFieldType::kNumber)) {
    if (int64_t integer = 0; absl::SimpleAtoi(value, &integer)) {
      return integer;
    }
    if (double number = 0; field->type == observe::LogFieldType::kNumber && absl::SimpleAtod(value, &number)) {
      return number;
    }
  }
  return value;
}

}  // namespace

EventLogSink::EventLogSink(std::string environment, std::string key_source, observe::Registry* registry)
    : environment_(std::move(environment)), key_source_(std::move(key_source)), registry_(registry) {}

void EventLogSink::Emit(const core::SourceEvent& event) {
  nlohmann::json fields = nlohmann::json::object();
  fields["event"] = event.name;
  fields["environment"] = environment_;
  fields["key_source"] = key_source_;
  for (const auto& [name, value] : event.fields) {
    if (!fields.contains(name)) {
      fields[name] = Typed(name, Capped(value));
    }
  }
  observe::LogJson(event.warning ? spdlog::level::warn : spdlog::level::info, Capped(event.message), fields);
  if (registry_ != nullptr) {
    registry_
        ->GetCounter("kmsplugin_key_source_events_total",
                     "What key sources reported: recoveries, failovers, re-logins, credential files picked up, key "
                     "version changes, refused views; by environment, key source and event.",
                     {{"environment", environment_}, {"key_source", key_source_}, {"event", event.name}})
        .Increment();
  }
}

}  // namespace kmsplugin::daemon
