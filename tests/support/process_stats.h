#pragma once

// ProcessStats: what a running process holds, read from /proc/PID: resident memory (VmRSS), threads (Threads:)
// and open file descriptors (entries of /proc/PID/fd). For tests that check a daemon gives back what a load or a
// fault made it take. A field is -1 when the process is gone.

#include <sys/types.h>

#include <filesystem>
#include <fstream>
#include <string>

namespace kmsplugin::testing {

struct ProcessStats {
  long rss_kb = -1;
  long threads = -1;
  long fds = -1;

  static ProcessStats Of(pid_t pid) {
    ProcessStats stats;
    const std::string proc = "/proc/" + std::to_string(pid);
    std::ifstream status(proc + "/status");
    std::string key;
    while (status >> key) {
      if (key == "VmRSS:") {
        status >> stats.rss_kb;
      } else if (key == "Threads:") {
        status >> stats.threads;
      }
      status.ignore(4096, '\n');
    }
    std::error_code error;
    long fds = 0;
    for (std::filesystem::directory_iterator it(proc + "/fd", error), end; !error && it != end; it.increment(error)) {
      ++fds;
    }
    stats.fds = error ? -1 : fds;
    return stats;
  }
};

// A /proc/PID/status field in kB, e.g. "VmHWM:" (the resident peak); -1 when the process or the field is gone.
inline long ProcStatusKb(pid_t pid, const std::string& field) {
  std::ifstream status("/proc/" + std::to_string(pid) + "/status");
  std::string key;
  while (status >> key) {
    if (key == field) {
      long value = -1;
      status >> value;
      return value;
    }
    status.ignore(4096, '\n');
  }
  return -1;
}

// The resident memory of `pid` in kB (-1 when it is gone).
inline long RssKb(pid_t pid) { return ProcessStats::Of(pid).rss_kb; }

}  // namespace kmsplugin::testing
