#include "kmsplugin/observe/instrumented_key_source.h"

#include "absl/time/clock.h"

namespace kmsplugin::observe {
namespace {

constexpr char kRequests[] = "kmsplugin_backend_requests_total";
constexpr char kRequestsHelp[] = "Key source backend calls by operation and outcome (ok or a gRPC code name).";
constexpr char kLatency[] = "kmsplugin_backend_request_duration_seconds";
constexpr char kLatencyHelp[] = "Key source backend call latency by operation.";

}  // namespace

InstrumentedKeySource::InstrumentedKeySource(std::shared_ptr<core::KeySource> inner, std::string environment,
                                             Registry& registry)
    : inner_(std::move(inner)),
      environment_(std::move(environment)),
      kind_(crypto::KeySourceKindName(inner_->Kind())),
      registry_(registry),
      wrap_(MakeOperation("wrap")),
      unwrap_(MakeOperation("unwrap")),
      refresh_(MakeOperation("refresh")) {}

InstrumentedKeySource::Operation::Operation(Registry& registry, const Labels& labels)
    : outcomes(registry.CounterFamily(kRequests, kRequestsHelp), labels, "outcome", "ok"),
      latency(registry.GetHistogram(kLatency, kLatencyHelp, labels)) {
  outcomes.Get(absl::StatusCode::kOk);  // the ok series shows (as 0) before the first call
}

InstrumentedKeySource::Operation InstrumentedKeySource::MakeOperation(const std::string& name) {
  return Operation(registry_, {{"environment", environment_}, {"key_source", kind_}, {"operation", name}});
}

void InstrumentedKeySource::Record(Operation& operation, const absl::Status& status, absl::Time start) {
  operation.latency.Observe(absl::ToDoubleSeconds(absl::Now() - start));
  operation.outcomes.Get(status.code()).Increment();
}

absl::StatusOr<std::string> InstrumentedKeySource::Wrap(const core::KeyVersion& version, std::string_view plaintext,
                                                        std::string_view associated_data, absl::Time deadline) {
  const absl::Time start = absl::Now();
  auto result = inner_->Wrap(version, plaintext, associated_data, deadline);
  Record(wrap_, result.status(), start);
  return result;
}

absl::StatusOr<crypto::SecretBytes> InstrumentedKeySource::Unwrap(std::string_view key_ref, std::string_view wrapped,
                                                                  std::string_view associated_data,
                                                                  absl::Time deadline) {
  const absl::Time start = absl::Now();
  auto result = inner_->Unwrap(key_ref, wrapped, associated_data, deadline);
  Record(unwrap_, result.status(), start);
  return result;
}

absl::Status InstrumentedKeySource::Refresh(absl::Time deadline) {
  const absl::Time start = absl::Now();
  absl::Status status = inner_->Refresh(deadline);
  Record(refresh_, status, start);
  return status;
}

}  // namespace kmsplugin::observe
