#pragma once

// EventLogSink: where one environment's key source reports what happened to it (core::EventSink). Each event is
// one JSON log line, `"event":<name>` with the environment and key source kind, at info (a recovery or a change)
// or warn (a failure), and one increment of
//   kmsplugin_key_source_events_total{environment,key_source,event}
// when a metrics registry is given (the daemon; the CLI logs only). Field values are capped at 512 bytes, so a
// backend's error text cannot flood the log. Thread-safe.

#include <string>

#include "kmsplugin/core/events.h"
#include "kmsplugin/observe/metrics.h"

namespace kmsplugin::daemon {

class EventLogSink final : public core::EventSink {
 public:
  EventLogSink(std::string environment, std::string key_source, observe::Registry* registry);
  void Emit(const core::SourceEvent& event) override;

 private:
  const std::string environment_;
  const std::string key_source_;
  observe::Registry* const registry_;
};

}  // namespace kmsplugin::daemon
