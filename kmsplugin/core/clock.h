#pragma once

// Clock: the only source of "now" in the core, so tests can move time by hand (tests/support/fake_clock.h).

#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace kmsplugin::core {

class Clock {
 public:
  virtual ~Clock() = default;
  virtual absl::Time Now() const = 0;
};

// Wall clock. Process-wide, thread-safe.
Clock& SystemClock();

}  // namespace kmsplugin::core
