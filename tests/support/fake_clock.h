#pragma once

// FakeClock: time moves only when a test says so. Advance() moves both readings; StepWall() moves only the wall
// clock, as `date -s` or NTP does, leaving the monotonic reading (Elapsed) where it was.

#include "absl/synchronization/mutex.h"
#include "kmsplugin/core/clock.h"

namespace kmsplugin::testing {

class FakeClock : public core::Clock {
 public:
  explicit FakeClock(absl::Time start = absl::FromUnixSeconds(1'800'000'000)) : now_(start) {}
  absl::Time Now() const override {
    absl::MutexLock lock(&mu_);
    return now_;
  }
  absl::Duration Elapsed() const override {
    absl::MutexLock lock(&mu_);
    return elapsed_;
  }
  void Advance(absl::Duration by) {
    absl::MutexLock lock(&mu_);
    now_ += by;
    elapsed_ += by;
  }
  void StepWall(absl::Duration by) {
    absl::MutexLock lock(&mu_);
    now_ += by;
  }

 private:
  mutable absl::Mutex mu_;
  absl::Time now_;
  absl::Duration elapsed_ = absl::Hours(1);
};

}  // namespace kmsplugin::testing
