#pragma once

// Clock: the only source of "now" in the core, so tests can move time by hand (tests/support/fake_clock.h).
//
// Two readings, for two questions:
// - Now(): the wall clock, for dates that are stored or shown (a key version's creation time, a token's expiry).
//   An operator or NTP may step it by any amount, forwards or back.
// - Elapsed(): a monotonic reading (CLOCK_MONOTONIC) for "how long since", "is it time yet" and freshness. It
//   never steps, so a wall-clock step neither stalls the maintenance loop nor makes a fresh probe look stale.
//   Only differences of two readings mean anything.

#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace kmsplugin::core {

class Clock {
 public:
  virtual ~Clock() = default;
  virtual absl::Time Now() const = 0;
  // Defaults to the wall clock, so a fake clock that only moves Now() moves both.
  virtual absl::Duration Elapsed() const { return Now() - absl::UnixEpoch(); }
};

// Wall clock and CLOCK_MONOTONIC. Process-wide, thread-safe.
Clock& SystemClock();

// Sleeps until `done()` holds (checked under `mu`) or `timeout` has passed on the monotonic clock; true if done()
// held. abseil's own timed waits (Mutex::AwaitWithTimeout, CondVar::WaitWithTimeout) turn the timeout into an
// absolute CLOCK_REALTIME deadline for the futex (FUTEX_CLOCK_REALTIME), so a wall clock stepped back a day
// stretches such a wait by a day, and one stepped ahead makes it return at once, again and again. This checks
// done() every `check_every` and sleeps in between with nanosleep, which counts monotonic time.
bool WaitMonotonic(absl::Mutex& mu, const absl::Condition& done, absl::Duration timeout,
                   absl::Duration check_every = absl::Milliseconds(50));

}  // namespace kmsplugin::core
