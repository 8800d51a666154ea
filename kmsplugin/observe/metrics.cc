#include "kmsplugin/observe/metrics.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace kmsplugin::observe {
namespace {

std::string EscapeLabelValue(const std::string& value) {
  std::string out;
  out.reserve(value.size());
  for (char c : value) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '"') {
      out += "\\\"";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

std::string FormatLabels(const Labels& labels, const std::string& extra_name = "", const std::string& extra = "") {
  if (labels.empty() && extra_name.empty()) {
    return "";
  }
  std::string out = "{";
  bool first = true;
  for (const auto& [name, value] : labels) {
    absl::StrAppend(&out, first ? "" : ",", name, "=\"", EscapeLabelValue(value), "\"");
    first = false;
  }
  if (!extra_name.empty()) {
    absl::StrAppend(&out, first ? "" : ",", extra_name, "=\"", extra, "\"");
  }
  out += "}";
  return out;
}

std::string FormatValue(double value) {
  if (std::isinf(value)) {
    return value > 0 ? "+Inf" : "-Inf";
  }
  if (value == std::floor(value) && std::fabs(value) < 1e15) {
    return absl::StrFormat("%.0f", value);
  }
  return absl::StrFormat("%.9g", value);
}

std::string EscapeHelp(const std::string& help) {
  std::string out;
  for (char c : help) {
    out += c == '\n' ? std::string("\\n") : c == '\\' ? std::string("\\\\") : std::string(1, c);
  }
  return out;
}

}  // namespace

Histogram::Histogram(std::vector<double> upper_bounds)
    : upper_bounds_(std::move(upper_bounds)), buckets_(new std::atomic<uint64_t>[upper_bounds_.size() + 1]) {
  for (size_t i = 0; i <= upper_bounds_.size(); ++i) {
    buckets_[i].store(0, std::memory_order_relaxed);
  }
}

void Histogram::Observe(double value) {
  const size_t bucket =
      std::lower_bound(upper_bounds_.begin(), upper_bounds_.end(), value) - upper_bounds_.begin();
  buckets_[bucket].fetch_add(1, std::memory_order_relaxed);
  sum_micros_.fetch_add(static_cast<uint64_t>(std::max(0.0, value) * 1e6), std::memory_order_relaxed);
  count_.fetch_add(1, std::memory_order_relaxed);
}

void Histogram::Snapshot(std::vector<uint64_t>& cumulative, double& sum, uint64_t& count) const {
  cumulative.assign(upper_bounds_.size() + 1, 0);
  uint64_t running = 0;
  for (size_t i = 0; i <= upper_bounds_.size(); ++i) {
    running += buckets_[i].load(std::memory_order_relaxed);
    cumulative[i] = running;
  }
  count = running;
  sum = static_cast<double>(sum_micros_.load(std::memory_order_relaxed)) / 1e6;
}

std::vector<double> Registry::LatencyBuckets() {
  return {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10};
}

Counter& Registry::GetCounter(const std::string& name, const std::string& help, const Labels& labels) {
  absl::MutexLock lock(&mu_);
  Family<Counter>& family = counters_[name];
  family.help = help;
  family.type = "counter";
  std::unique_ptr<Counter>& series = family.series[labels];
  if (series == nullptr) {
    series = std::make_unique<Counter>();
  }
  return *series;
}

Histogram& Registry::GetHistogram(const std::string& name, const std::string& help, const Labels& labels,
                                  const std::vector<double>& upper_bounds) {
  absl::MutexLock lock(&mu_);
  Family<Histogram>& family = histograms_[name];
  family.help = help;
  family.type = "histogram";
  std::unique_ptr<Histogram>& series = family.series[labels];
  if (series == nullptr) {
    series = std::make_unique<Histogram>(upper_bounds);
  }
  return *series;
}

void Registry::AddGaugeCollector(const std::string& name, const std::string& help,
                                 std::function<std::vector<Sample>()> collect) {
  absl::MutexLock lock(&mu_);
  gauges_[name] = GaugeFamily{help, std::move(collect)};
}

std::string Registry::Render() const {
  std::string out;
  absl::MutexLock lock(&mu_);
  for (const auto& [name, family] : counters_) {
    absl::StrAppend(&out, "# HELP ", name, " ", EscapeHelp(family.help), "\n# TYPE ", name, " counter\n");
    for (const auto& [labels, counter] : family.series) {
      absl::StrAppend(&out, name, FormatLabels(labels), " ", counter->Value(), "\n");
    }
  }
  for (const auto& [name, family] : histograms_) {
    absl::StrAppend(&out, "# HELP ", name, " ", EscapeHelp(family.help), "\n# TYPE ", name, " histogram\n");
    for (const auto& [labels, histogram] : family.series) {
      std::vector<uint64_t> cumulative;
      double sum = 0;
      uint64_t count = 0;
      histogram->Snapshot(cumulative, sum, count);
      const std::vector<double>& bounds = histogram->upper_bounds();
      for (size_t i = 0; i < bounds.size(); ++i) {
        absl::StrAppend(&out, name, "_bucket", FormatLabels(labels, "le", FormatValue(bounds[i])), " ",
                        cumulative[i], "\n");
      }
      absl::StrAppend(&out, name, "_bucket", FormatLabels(labels, "le", "+Inf"), " ", cumulative.back(), "\n");
      absl::StrAppend(&out, name, "_sum", FormatLabels(labels), " ", FormatValue(sum), "\n");
      absl::StrAppend(&out, name, "_count", FormatLabels(labels), " ", count, "\n");
    }
  }
  for (const auto& [name, family] : gauges_) {
    absl::StrAppend(&out, "# HELP ", name, " ", EscapeHelp(family.help), "\n# TYPE ", name, " gauge\n");
    for (const Sample& sample : family.collect()) {
      absl::StrAppend(&out, name, FormatLabels(sample.labels), " ", FormatValue(sample.value), "\n");
    }
  }
  return out;
}

}  // namespace kmsplugin::observe
