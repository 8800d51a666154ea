#pragma once

// Metrics: a small Prometheus registry with text exposition (format 0.0.4).
//
// Counters and histograms are created once per label set and then updated lock-free on the hot path. Values that
// are read from state at scrape time (current key_id, health, token TTL) come from collectors, so a series that
// no longer exists (an old key_id) disappears instead of lingering. Names follow Prometheus conventions: units in
// the name, `_total` on counters. No label value is ever a secret. Thread-safe.

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace kmsplugin::observe {

using Labels = std::vector<std::pair<std::string, std::string>>;

class Counter {
 public:
  void Increment(uint64_t by = 1) { value_.fetch_add(by, std::memory_order_relaxed); }
  uint64_t Value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<uint64_t> value_{0};
};

class Histogram {
 public:
  explicit Histogram(std::vector<double> upper_bounds);
  void Observe(double value);
  void Observe(absl::Duration duration) { Observe(absl::ToDoubleSeconds(duration)); }
  const std::vector<double>& upper_bounds() const { return upper_bounds_; }
  // Cumulative counts per bucket (the last is +Inf), sum and count.
  void Snapshot(std::vector<uint64_t>& cumulative, double& sum, uint64_t& count) const;

 private:
  const std::vector<double> upper_bounds_;
  std::unique_ptr<std::atomic<uint64_t>[]> buckets_;  // upper_bounds_.size() + 1
  std::atomic<uint64_t> sum_micros_{0};
  std::atomic<uint64_t> count_{0};
};

// What a collector writes at scrape time.
struct Sample {
  Labels labels;
  double value = 0;
};

class Registry {
 public:
  // Latency buckets from 100 µs to 10 s.
  static std::vector<double> LatencyBuckets();

  Counter& GetCounter(const std::string& name, const std::string& help, const Labels& labels);
  Histogram& GetHistogram(const std::string& name, const std::string& help, const Labels& labels,
                          const std::vector<double>& upper_bounds = LatencyBuckets());
  // A gauge family whose samples `collect` produces at each scrape.
  void AddGaugeCollector(const std::string& name, const std::string& help,
                         std::function<std::vector<Sample>()> collect);

  std::string Render() const;

 private:
  template <typename T>
  struct Family {
    std::string help;
    std::string type;
    std::map<Labels, std::unique_ptr<T>> series;
  };
  struct GaugeFamily {
    std::string help;
    std::function<std::vector<Sample>()> collect;
  };

  mutable absl::Mutex mu_;
  std::map<std::string, Family<Counter>> counters_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, Family<Histogram>> histograms_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, GaugeFamily> gauges_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kmsplugin::observe
