#pragma once

// SourceOpener: how the daemon opens an environment's key source, at start and on a reload. The source is found
// through the key-source registry, reports its events to an EventLogSink of its environment (one log line and one
// kmsplugin_key_source_events_total increment each), and is wrapped in InstrumentedKeySource (backend metrics).
// Thread-safe (start runs on the main thread, reloads on the signal thread).

#include <functional>
#include <map>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "kmsplugin/config/config.h"
#include "kmsplugin/core/envelope_service.h"
#include "kmsplugin/core/key_source.h"
#include "kmsplugin/daemon/event_log_sink.h"
#include "kmsplugin/observe/metrics.h"

namespace kmsplugin::daemon {

class SourceOpener {
 public:
  SourceOpener(observe::Registry& registry, int max_threads, absl::Duration retry_interval);

  // At start: the environment's key source, or, when it cannot be opened, a StartingKeySource that serves it
  // unhealthy and keeps trying (starting_key_source.h). Never fails.
  std::shared_ptr<core::KeySource> OpenOrKeepTrying(const config::EnvironmentConfig& env);

  // What to do when a source that could not start has started (the daemon: re-probe at once). Set once, before
  // serving; sources opened earlier see it too.
  void OnStarted(std::function<void()> callback);

  // On a reload (all or nothing): the key source, or why it cannot be opened, naming the environment.
  absl::StatusOr<std::shared_ptr<core::KeySource>> Open(const config::EnvironmentConfig& env);

 private:
  core::EventSink& SinkFor(const config::EnvironmentConfig& env);
  absl::StatusOr<std::shared_ptr<core::KeySource>> OpenRaw(const config::EnvironmentConfig& env);

  observe::Registry& registry_;
  const int max_threads_;
  const absl::Duration retry_interval_;
  absl::Mutex mu_;
  // One sink per environment and kind, kept for the process's life (sources hold a reference to it).
  std::map<std::string, std::unique_ptr<EventLogSink>> sinks_ ABSL_GUARDED_BY(mu_);
  std::function<void()> on_started_ ABSL_GUARDED_BY(mu_);
};

// The environment's EnvelopeService on `source`, with the server's health rules.
std::shared_ptr<core::EnvelopeService> MakeService(const config::EnvironmentConfig& env,
                                                   const config::ServerConfig& server,
                                                   std::shared_ptr<core::KeySource> source);

// How long a health probe may take (also the deadline of a reload's checks).
inline constexpr absl::Duration kProbeTimeout = absl::Seconds(5);

}  // namespace kmsplugin::daemon
