#include "kmsplugin/daemon/event_log_sink.h"

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "kmsplugin/observe/log.h"

namespace kmsplugin::daemon {
namespace {

constexpr size_t kMaxFieldBytes = 512;

std::string Capped(const std::string& value) {
  if (value.size() <= kMaxFieldBytes) {
    return value;
  }
  return value.substr(0, kMaxFieldBytes) + "...(truncated)";
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
      fields[name] = Capped(value);
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
