#include "kmsplugin/core/clock.h"

#include <time.h>

#include <algorithm>

#include "absl/synchronization/mutex.h"

namespace kmsplugin::core {
namespace {

class SystemClockImpl final : public Clock {
 public:
  absl::Time Now() const override { return absl::Now(); }
  absl::Duration Elapsed() const override {
    // absl has no monotonic clock reading (absl::Now is CLOCK_REALTIME), hence clock_gettime.
    timespec ts{};
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return absl::DurationFromTimespec(ts);
  }
};

}  // namespace

Clock& SystemClock() {
  static SystemClockImpl* const clock = new SystemClockImpl();
  return *clock;
}

bool WaitMonotonic(absl::Mutex& mu, const absl::Condition& done, absl::Duration timeout,
                   absl::Duration check_every) {
  const Clock& clock = SystemClock();
  const absl::Duration until = clock.Elapsed() + timeout;
  while (true) {
    {
      absl::MutexLock lock(&mu);
      if (done.Eval()) {
        return true;
      }
    }
    const absl::Duration left = until - clock.Elapsed();
    if (left <= absl::ZeroDuration()) {
      return false;
    }
    absl::SleepFor(std::min(left, check_every));  // nanosleep: relative, monotonic
  }
}

}  // namespace kmsplugin::core
