#pragma once

// A process's memory as /proc/PID/status reports it, in kB (-1 when the process or the field is gone).

#include <sys/types.h>

#include <fstream>
#include <string>

namespace kmsplugin::testing {

// `field` is a /proc/PID/status key with its colon, e.g. "VmRSS:" (resident now) or "VmHWM:" (resident peak).
inline long ProcStatusKb(pid_t pid, const std::string& field) {
  std::ifstream status("/proc/" + std::to_string(pid) + "/status");
  std::string key;
  long value = -1;
  while (status >> key) {
    if (key == field) {
      status >> value;
      return value;
    }
    status.ignore(4096, '\n');
  }
  return value;
}

inline long RssKb(pid_t pid) { return ProcStatusKb(pid, "VmRSS:"); }

}  // namespace kmsplugin::testing
