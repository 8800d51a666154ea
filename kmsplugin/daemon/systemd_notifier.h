#pragma once

// SystemdNotifier: tells systemd (Type=notify) what the daemon is doing, through libsystemd's sd_notify:
// READY=1 once every socket listens (and the HTTP endpoint, if any), RELOADING=1 ... READY=1 around a SIGHUP
// reload, STOPPING=1 when a drain starts, and STATUS= lines an operator sees in `systemctl status`. When the unit
// sets WatchdogSec=, a thread sends WATCHDOG=1 at half that interval, but only while `alive()` says the daemon
// makes progress, so a wedged daemon is restarted by systemd. Without NOTIFY_SOCKET (not under systemd, or
// Type=simple) every call does nothing.

#include <atomic>
#include <functional>
#include <string>
#include <thread>

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace kmsplugin::daemon {

class SystemdNotifier {
 public:
  SystemdNotifier() = default;
  ~SystemdNotifier();
  SystemdNotifier(const SystemdNotifier&) = delete;
  SystemdNotifier& operator=(const SystemdNotifier&) = delete;

  void Ready(const std::string& status);
  void Reloading(const std::string& status);
  void Stopping(const std::string& status);
  void Status(const std::string& status);

  // Starts the watchdog thread when the unit asked for one (WATCHDOG_USEC for this pid); `alive` is asked before
  // every ping. Call once, after Ready().
  void StartWatchdog(std::function<bool()> alive);
  // The watchdog interval systemd asked for, or zero when none.
  static absl::Duration WatchdogInterval();

 private:
  void Send(const std::string& message);

  absl::Mutex mu_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread watchdog_;
};

}  // namespace kmsplugin::daemon
