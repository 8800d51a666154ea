#pragma once

// InstrumentedKeySource: wraps any KeySource and counts and times every backend call, so all three key sources
// get the same backend metrics without knowing about metrics:
//   kmsplugin_backend_requests_total{environment,key_source,operation,outcome}
//   kmsplugin_backend_request_duration_seconds{environment,key_source,operation}
// `outcome` is "ok" or the status code name. Thread-safe. Each series is resolved once (the constructor, or the
// first call with a given outcome) and kept, so a call costs one counter add and one histogram observation
// (metrics.h: what that locks).

#include <memory>
#include <string>

#include "kmsplugin/core/key_source.h"
#include "kmsplugin/observe/metrics.h"

namespace kmsplugin::observe {

class InstrumentedKeySource final : public core::KeySource {
 public:
  InstrumentedKeySource(std::shared_ptr<core::KeySource> inner, std::string environment, Registry& registry);

  crypto::KeySourceKind Kind() const override { return inner_->Kind(); }
  absl::StatusOr<core::KeyVersion> Current() const override { return inner_->Current(); }
  absl::StatusOr<std::string> Wrap(const core::KeyVersion& version, std::string_view plaintext,
                                   std::string_view associated_data, absl::Time deadline) override;
  absl::StatusOr<crypto::SecretBytes> Unwrap(std::string_view key_ref, std::string_view wrapped,
                                             std::string_view associated_data, absl::Time deadline) override;
  absl::StatusOr<core::KeyVersion> Lookup(std::string_view key_ref) const override { return inner_->Lookup(key_ref); }
  absl::Status Refresh(absl::Time deadline) override;
  absl::StatusOr<std::vector<core::KeyVersion>> Versions() const override { return inner_->Versions(); }
  bool HealUnknown(std::string_view key_ref, absl::Time deadline) override {
    return inner_->HealUnknown(key_ref, deadline);
  }
  std::vector<core::BackendGauge> BackendGauges() const override { return inner_->BackendGauges(); }

 private:
  struct Operation {
    Operation(Registry& registry, const Labels& labels);
    CodeCounters outcomes;
    Histogram& latency;
  };
  Operation MakeOperation(const std::string& name);
  static void Record(Operation& operation, const absl::Status& status, absl::Time start);

  const std::shared_ptr<core::KeySource> inner_;
  const std::string environment_;
  const std::string kind_;
  Registry& registry_;
  Operation wrap_, unwrap_, refresh_;
};

}  // namespace kmsplugin::observe
