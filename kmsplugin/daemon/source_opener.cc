#include "kmsplugin/daemon/source_opener.h"

#include "absl/strings/str_cat.h"
#include "crypto/random.h"
#include "kmsplugin/core/clock.h"
#include "kmsplugin/daemon/starting_key_source.h"
#include "kmsplugin/keysource/registry.h"
#include "kmsplugin/observe/instrumented_key_source.h"

namespace kmsplugin::daemon {
namespace {

absl::Status ForEnvironment(const std::string& environment, const absl::Status& status) {
  return absl::Status(status.code(), absl::StrCat("environment \"", environment, "\": ", status.message()));
}

// The files the key source reads (PIN, token, secret-id, certificates, key material): a refused credential is tried
// again only after one of them changed.
std::vector<std::string> HostFiles(const config::EnvironmentConfig& env) {
  std::vector<std::string> files;
  for (const config::HostPath& path : env.key_source->HostPaths()) {
    files.push_back(path.path);
  }
  return files;
}

}  // namespace

SourceOpener::SourceOpener(observe::Registry& registry, int max_threads, absl::Duration retry_interval)
    : registry_(registry), max_threads_(max_threads), retry_interval_(retry_interval) {}

core::EventSink& SourceOpener::SinkFor(const config::EnvironmentConfig& env) {
  const std::string kind(env.key_source->Kind());
  absl::MutexLock lock(&mu_);
  std::unique_ptr<EventLogSink>& sink = sinks_[absl::StrCat(env.name, "/", kind)];
  if (sink == nullptr) {
    sink = std::make_unique<EventLogSink>(env.name, kind, &registry_);
  }
  return *sink;
}

absl::StatusOr<std::shared_ptr<core::KeySource>> SourceOpener::OpenRaw(const config::EnvironmentConfig& env) {
  auto opened = env.key_source->Open(keysource::SystemOpenContext(env.name, max_threads_, &SinkFor(env)));
  if (!opened.ok()) {
    return ForEnvironment(env.name, opened.status());
  }
  return std::move(opened->source);
}

std::shared_ptr<core::KeySource> SourceOpener::OpenOrKeepTrying(const config::EnvironmentConfig& env) {
  const keysource::KeySourceKindInfo* kind = keysource::FindKeySourceKind(env.key_source->Kind());
  // The spec came from the registry's own parsers, so the kind is always there.
  const crypto::KeySourceKind kind_byte = kind != nullptr ? kind->kind : crypto::KeySourceKind::kLocal;
  std::shared_ptr<core::KeySource> source = StartingKeySource::OpenOrKeepTrying(
      env.name, kind_byte, [this, env] { return OpenRaw(env); }, retry_interval_, HostFiles(env), SinkFor(env),
      [this] {
        // Under the lock, so that OnStarted({}) before the runner goes away waits for a call in flight.
        absl::MutexLock lock(&mu_);
        if (on_started_) {
          on_started_();
        }
      });
  return std::make_shared<observe::InstrumentedKeySource>(std::move(source), env.name, registry_);
}

void SourceOpener::OnStarted(std::function<void()> callback) {
  absl::MutexLock lock(&mu_);
  on_started_ = std::move(callback);
}

absl::StatusOr<std::shared_ptr<core::KeySource>> SourceOpener::Open(const config::EnvironmentConfig& env) {
  auto source = OpenRaw(env);
  if (!source.ok()) {
    return source.status();
  }
  return std::shared_ptr<core::KeySource>(
      std::make_shared<observe::InstrumentedKeySource>(std::move(*source), env.name, registry_));
}

std::shared_ptr<core::EnvelopeService> MakeService(const config::EnvironmentConfig& env,
                                                   const config::ServerConfig& server,
                                                   std::shared_ptr<core::KeySource> source) {
  core::EnvelopeService::Options options;
  options.environment = env.name;
  options.status_version = env.status_version;
  // Two missed probes are tolerated before Status turns unhealthy on age alone.
  options.health_max_age = 3 * server.poll_interval + kProbeTimeout;
  return std::make_shared<core::EnvelopeService>(options, std::move(source), core::SystemClock(),
                                                 crypto::SystemRandom());
}

}  // namespace kmsplugin::daemon
