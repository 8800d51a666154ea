#include "kmsplugin/observe/process_metrics.h"

#include <dirent.h>
#include <unistd.h>

#include <fstream>
#include <optional>
#include <sstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"

namespace kmsplugin::observe {
namespace {

std::optional<std::string> ReadSmallFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) {
    return std::nullopt;
  }
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

prometheus::MetricFamily Family(const char* name, const char* help, prometheus::MetricType type, double value) {
  prometheus::ClientMetric metric;
  if (type == prometheus::MetricType::Counter) {
    metric.counter.value = value;
  } else {
    metric.gauge.value = value;
  }
  return prometheus::MetricFamily{name, help, type, {metric}};
}

// Fields of /proc/PID/stat after "(comm)", which may itself hold spaces and parentheses: [0] is field 3 (state).
std::vector<std::string> StatFields(const std::string& stat) {
  const size_t close = stat.rfind(')');
  if (close == std::string::npos) {
    return {};
  }
  return absl::StrSplit(absl::StripAsciiWhitespace(absl::string_view(stat).substr(close + 1)), ' ', absl::SkipEmpty());
}

std::optional<double> Field(const std::vector<std::string>& fields, size_t stat_field) {
  double value = 0;
  if (stat_field < 3 || stat_field - 3 >= fields.size() || !absl::SimpleAtod(fields[stat_field - 3], &value)) {
    return std::nullopt;
  }
  return value;
}

std::optional<double> BootTime() {
  const std::optional<std::string> stat = ReadSmallFile("/proc/stat");
  if (!stat) {
    return std::nullopt;
  }
  for (absl::string_view line : absl::StrSplit(*stat, '\n')) {
    if (absl::ConsumePrefix(&line, "btime ")) {
      double value = 0;
      if (absl::SimpleAtod(line, &value)) {
        return value;
      }
    }
  }
  return std::nullopt;
}

std::optional<double> OpenFds(const std::string& proc_dir) {
  DIR* dir = opendir((proc_dir + "/fd").c_str());
  if (dir == nullptr) {
    return std::nullopt;
  }
  double count = 0;
  while (const dirent* entry = readdir(dir)) {
    if (entry->d_name[0] != '.') {
      ++count;
    }
  }
  closedir(dir);
  return count;
}

// The soft limit from /proc/PID/limits: "Max open files            1024                 524288               files".
std::optional<double> MaxFds(const std::string& proc_dir) {
  const std::optional<std::string> limits = ReadSmallFile(proc_dir + "/limits");
  if (!limits) {
    return std::nullopt;
  }
  for (absl::string_view line : absl::StrSplit(*limits, '\n')) {
    if (absl::ConsumePrefix(&line, "Max open files")) {
      const std::vector<absl::string_view> parts = absl::StrSplit(line, ' ', absl::SkipEmpty());
      double value = 0;
      if (!parts.empty() && absl::SimpleAtod(parts[0], &value)) {
        return value;  // "unlimited" fails to parse and is left out
      }
    }
  }
  return std::nullopt;
}

}  // namespace

ProcessCollector::ProcessCollector(std::string proc_dir) : proc_dir_(std::move(proc_dir)) {}

std::vector<prometheus::MetricFamily> ProcessCollector::Collect() const {
  using prometheus::MetricType;
  std::vector<prometheus::MetricFamily> families;
  const double ticks = static_cast<double>(sysconf(_SC_CLK_TCK));
  const double page = static_cast<double>(sysconf(_SC_PAGESIZE));
  const std::optional<std::string> stat = ReadSmallFile(proc_dir_ + "/stat");
  const std::vector<std::string> fields = stat ? StatFields(*stat) : std::vector<std::string>{};
  const auto utime = Field(fields, 14);
  const auto stime = Field(fields, 15);
  if (utime && stime && ticks > 0) {
    families.push_back(Family("process_cpu_seconds_total", "Total user and system CPU time spent in seconds.",
                              MetricType::Counter, (*utime + *stime) / ticks));
  }
  if (const auto rss = Field(fields, 24)) {
    families.push_back(
        Family("process_resident_memory_bytes", "Resident memory size in bytes.", MetricType::Gauge, *rss * page));
  }
  if (const auto vsize = Field(fields, 23)) {
    families.push_back(
        Family("process_virtual_memory_bytes", "Virtual memory size in bytes.", MetricType::Gauge, *vsize));
  }
  const auto start = Field(fields, 22);
  const auto boot = BootTime();
  if (start && boot && ticks > 0) {
    families.push_back(Family("process_start_time_seconds", "Start time of the process since unix epoch in seconds.",
                              MetricType::Gauge, *boot + *start / ticks));
  }
  if (const auto threads = Field(fields, 20)) {
    families.push_back(Family("process_threads", "Number of OS threads in the process.", MetricType::Gauge, *threads));
  }
  if (const auto open = OpenFds(proc_dir_)) {
    families.push_back(Family("process_open_fds", "Number of open file descriptors.", MetricType::Gauge, *open));
  }
  if (const auto max = MaxFds(proc_dir_)) {
    families.push_back(Family("process_max_fds", "Maximum number of open file descriptors.", MetricType::Gauge, *max));
  }
  return families;
}

}  // namespace kmsplugin::observe
