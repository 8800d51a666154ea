#include "kmsplugin/daemon/systemd_notifier.h"

#include <systemd/sd-daemon.h>

#include <cstring>

#include <spdlog/spdlog.h>

#include "absl/strings/str_cat.h"
#include "kmsplugin/core/clock.h"
#include "kmsplugin/observe/log.h"

namespace kmsplugin::daemon {
namespace {

// STATUS= is one line; systemd shows it as is. Our texts are our own, but keep them one short line anyway.
std::string OneLine(const std::string& text) {
  std::string line = text.substr(0, 200);
  for (char& c : line) {
    if (c == '\n' || c == '\r') {
      c = ' ';
    }
  }
  return line;
}

}  // namespace

SystemdNotifier::~SystemdNotifier() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  if (watchdog_.joinable()) {
    watchdog_.join();
  }
}

void SystemdNotifier::Send(const std::string& message) {
  // unset_environment=0: a child (none today) could still notify; sd_notify returns 0 when NOTIFY_SOCKET is unset.
  if (const int result = sd_notify(0, message.c_str()); result < 0) {
    observe::Log(spdlog::level::warn, "sd_notify failed",
                 {{"error", std::string(std::strerror(-result))}, {"fix", "check NotifyAccess= in the unit"}});
  }
}

void SystemdNotifier::Ready(const std::string& status) { Send(absl::StrCat("READY=1\nSTATUS=", OneLine(status))); }

void SystemdNotifier::Reloading(const std::string& status) {
  Send(absl::StrCat("RELOADING=1\nSTATUS=", OneLine(status)));
}

void SystemdNotifier::Stopping(const std::string& status) {
  Send(absl::StrCat("STOPPING=1\nSTATUS=", OneLine(status)));
}

void SystemdNotifier::Status(const std::string& status) { Send(absl::StrCat("STATUS=", OneLine(status))); }

absl::Duration SystemdNotifier::WatchdogInterval() {
  uint64_t usec = 0;
  if (sd_watchdog_enabled(0, &usec) <= 0 || usec == 0) {
    return absl::ZeroDuration();
  }
  return absl::Microseconds(static_cast<int64_t>(usec));
}

void SystemdNotifier::StartWatchdog(std::function<bool()> alive) {
  const absl::Duration interval = WatchdogInterval();
  if (interval == absl::ZeroDuration() || watchdog_.joinable()) {
    return;
  }
  observe::Log(spdlog::level::info, "systemd watchdog on", {{"interval_seconds", absl::ToDoubleSeconds(interval)}});
  watchdog_ = std::thread([this, interval, alive = std::move(alive)] {
    bool said_stuck = false;
    while (true) {
      // Half the interval on the monotonic clock (core/clock.h: abseil's timed waits follow the wall clock).
      auto stop = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stopping_; };
      if (core::WaitMonotonic(mu_, absl::Condition(&stop), interval / 2)) {
        return;
      }
      if (alive()) {
        Send("WATCHDOG=1");
        said_stuck = false;
      } else if (!said_stuck) {
        // No ping: systemd restarts the service once WatchdogSec passes (Restart=on-failure covers it).
        observe::Log(spdlog::level::err, "watchdog withheld: the daemon made no progress",
                     {{"event", "watchdog"}, {"fix", "see the lines above; systemd restarts the service"}});
        said_stuck = true;
      }
    }
  });
}

}  // namespace kmsplugin::daemon
