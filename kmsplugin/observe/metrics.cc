#include "kmsplugin/observe/metrics.h"

#include <prometheus/metric_family.h>
#include <prometheus/text_serializer.h>

#include <algorithm>
#include <sstream>

namespace kmsplugin::observe {
namespace {

prometheus::Labels ToMap(const Labels& labels) { return prometheus::Labels(labels.begin(), labels.end()); }

// prometheus-cpp 1.0.1's TextSerializer escapes label values but writes HELP text as given, and a backslash or a
// newline there breaks the exposition (promtool: "invalid escape sequence"). Escaped once, at registration.
std::string EscapeHelp(const std::string& help) {
  std::string out;
  out.reserve(help.size());
  for (char c : help) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

// A gauge family read from state at scrape time.
class GaugeCollector final : public prometheus::Collectable {
 public:
  GaugeCollector(std::string name, std::string help, std::function<std::vector<Sample>()> collect)
      : name_(std::move(name)), help_(EscapeHelp(help)), collect_(std::move(collect)) {}

  std::vector<prometheus::MetricFamily> Collect() const override {
    prometheus::MetricFamily family{name_, help_, prometheus::MetricType::Gauge, {}};
    for (const Sample& sample : collect_()) {
      prometheus::ClientMetric metric;
      for (const auto& [name, value] : sample.labels) {
        metric.label.push_back({name, value});
      }
      metric.gauge.value = sample.value;
      family.metric.push_back(std::move(metric));
    }
    return {std::move(family)};
  }

 private:
  const std::string name_;
  const std::string help_;
  const std::function<std::vector<Sample>()> collect_;
};

}  // namespace

Registry::Registry() : registry_(std::make_shared<prometheus::Registry>()) {}
Registry::~Registry() = default;

std::vector<double> Registry::LatencyBuckets() {
  return {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10};
}

prometheus::Family<Counter>& Registry::CounterFamily(const std::string& name, const std::string& help) {
  return prometheus::BuildCounter().Name(name).Help(EscapeHelp(help)).Register(*registry_);
}

prometheus::Family<Histogram>& Registry::HistogramFamily(const std::string& name, const std::string& help) {
  return prometheus::BuildHistogram().Name(name).Help(EscapeHelp(help)).Register(*registry_);
}

Counter& Registry::GetCounter(const std::string& name, const std::string& help, const Labels& labels) {
  return CounterFamily(name, help).Add(ToMap(labels));
}

Histogram& Registry::GetHistogram(const std::string& name, const std::string& help, const Labels& labels,
                                  const std::vector<double>& upper_bounds) {
  return HistogramFamily(name, help).Add(ToMap(labels), upper_bounds);
}

void Registry::AddGaugeCollector(const std::string& name, const std::string& help,
                                 std::function<std::vector<Sample>()> collect) {
  AddCollectable(std::make_shared<GaugeCollector>(name, help, std::move(collect)));
}

void Registry::AddCollectable(std::shared_ptr<prometheus::Collectable> collectable) {
  absl::MutexLock lock(&mu_);
  collectables_.push_back(std::move(collectable));
}

std::string Registry::Render() const {
  std::vector<prometheus::MetricFamily> families = registry_->Collect();
  {
    absl::MutexLock lock(&mu_);
    for (const auto& collectable : collectables_) {
      for (prometheus::MetricFamily& family : collectable->Collect()) {
        families.push_back(std::move(family));
      }
    }
  }
  std::ostringstream out;
  prometheus::TextSerializer().Serialize(out, families);
  return out.str();
}

CodeCounters::CodeCounters(prometheus::Family<Counter>& family, Labels base, std::string code_label,
                           std::string ok_value)
    : family_(&family), base_(std::move(base)), code_label_(std::move(code_label)), ok_value_(std::move(ok_value)) {}

Counter& CodeCounters::Get(absl::StatusCode code) const {
  const size_t index = std::min(static_cast<size_t>(code), kCodes);
  std::atomic<Counter*>& slot = series_[index];
  if (Counter* counter = slot.load(std::memory_order_acquire); counter != nullptr) {
    return *counter;
  }
  // First call with this code: the family's mutex, once. Two threads racing here get the same series (Family::Add
  // returns the existing one), so either store is right.
  prometheus::Labels labels = ToMap(base_);
  labels[code_label_] = code == absl::StatusCode::kOk ? ok_value_ : absl::StatusCodeToString(code);
  Counter* counter = &family_->Add(labels);
  slot.store(counter, std::memory_order_release);
  return *counter;
}

}  // namespace kmsplugin::observe
