#pragma once

// ProcessCollector: the process metrics every official Prometheus client library exports under these names
// (client_golang's process collector, client_python's ProcessCollector), read from /proc/self at each scrape:
//   process_cpu_seconds_total          user + system CPU time (counter)
//   process_resident_memory_bytes      resident set size
//   process_virtual_memory_bytes       virtual memory size
//   process_open_fds                   open file descriptors
//   process_max_fds                    the soft RLIMIT_NOFILE
//   process_start_time_seconds         start time, seconds since the Unix epoch
//   process_threads                    threads in the process (client_golang exports it as go_threads; the name
//                                      here follows client_python's and the Rust client's process_threads)
// Written here because prometheus-cpp has no process collector (its core library only holds the registry and
// the serialisers). A value that cannot be read (no /proc) is left out of the scrape rather than reported as 0.
// Thread-safe (each scrape reads its own files).

#include <prometheus/collectable.h>
#include <prometheus/metric_family.h>

#include <string>
#include <vector>

namespace kmsplugin::observe {

class ProcessCollector final : public prometheus::Collectable {
 public:
  // `proc_dir`: the /proc/<pid> directory to read (tests may point it at another process).
  explicit ProcessCollector(std::string proc_dir = "/proc/self");
  std::vector<prometheus::MetricFamily> Collect() const override;

 private:
  const std::string proc_dir_;
};

}  // namespace kmsplugin::observe
