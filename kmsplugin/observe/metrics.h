#pragma once

// Metrics: the process's Prometheus registry (prometheus-cpp core) and its text exposition (format 0.0.4).
//
// What is locked, and when:
// - Registering a family or a series (GetCounter, GetHistogram, CounterFamily, AddGaugeCollector) takes
//   prometheus-cpp's registry mutex and the family's mutex. That happens at start, at a reload, or once per new
//   label set: never once per RPC. Hot paths resolve each series once and keep the pointer (CodeCounters below
//   for the one label, a status code, that is known only when a call ends).
// - Updating a series takes no registry-wide or family-wide lock: prometheus::Counter and Gauge are a
//   std::atomic<double> (a compare-and-swap loop); prometheus::Histogram takes its own per-series mutex for the
//   bucket add and the sum (the same series from two threads contend; different series never do).
// - A scrape (Render) takes the registry mutex, each family's mutex and each histogram's mutex in turn, and
//   calls the collectors, which read state at that moment (so a series that no longer exists, such as an old
//   key_id, disappears instead of lingering).
// Names follow Prometheus conventions: units in the name, `_total` on counters. No label value is ever a secret.
// prometheus::Labels is a sorted map, so series of registered families expose their labels in name order;
// collectors expose them in the order they give. Thread-safe.

#include <prometheus/collectable.h>
#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <array>
#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"

namespace kmsplugin::observe {

using Labels = std::vector<std::pair<std::string, std::string>>;
using Counter = prometheus::Counter;
using Histogram = prometheus::Histogram;

// What a collector writes at scrape time.
struct Sample {
  Labels labels;
  double value = 0;
};

class Registry {
 public:
  Registry();
  ~Registry();
  Registry(const Registry&) = delete;
  Registry& operator=(const Registry&) = delete;

  // Latency buckets from 100 µs to 10 s.
  static std::vector<double> LatencyBuckets();

  // The family `name`, created on first use. The series of a family live as long as the registry.
  prometheus::Family<Counter>& CounterFamily(const std::string& name, const std::string& help);
  prometheus::Family<Histogram>& HistogramFamily(const std::string& name, const std::string& help);
  // One series; the same object for the same name and labels. Takes locks: keep the reference.
  Counter& GetCounter(const std::string& name, const std::string& help, const Labels& labels);
  Histogram& GetHistogram(const std::string& name, const std::string& help, const Labels& labels,
                          const std::vector<double>& upper_bounds = LatencyBuckets());
  // A gauge family whose samples `collect` produces at each scrape.
  void AddGaugeCollector(const std::string& name, const std::string& help,
                         std::function<std::vector<Sample>()> collect);
  // Any other collector (prometheus::Collectable) called at each scrape; its families follow the registry's.
  void AddCollectable(std::shared_ptr<prometheus::Collectable> collectable);

  std::string Render() const;

 private:
  const std::shared_ptr<prometheus::Registry> registry_;
  mutable absl::Mutex mu_;
  std::vector<std::shared_ptr<prometheus::Collectable>> collectables_ ABSL_GUARDED_BY(mu_);
};

// The series of one counter family that differ only in a status-code label, each resolved on first use and then
// kept: Get() is a relaxed atomic load once a code has been seen, and never takes a lock after that.
class CodeCounters {
 public:
  // `base`: the labels every series shares; `code_label`: the name of the code label; `ok_value`: its value for
  // OK (the others are absl::StatusCodeToString names, as gRPC names them).
  CodeCounters(prometheus::Family<Counter>& family, Labels base, std::string code_label, std::string ok_value);
  Counter& Get(absl::StatusCode code) const;

 private:
  static constexpr size_t kCodes = 17;  // OK .. UNAUTHENTICATED
  prometheus::Family<Counter>* const family_;
  const Labels base_;
  const std::string code_label_;
  const std::string ok_value_;
  mutable std::array<std::atomic<Counter*>, kCodes + 1> series_{};  // the last: any code beyond the known ones
};

}  // namespace kmsplugin::observe
