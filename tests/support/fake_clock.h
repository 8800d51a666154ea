#pragma once

// FakeClock: time moves only when a test says so.

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
  void Advance(absl::Duration by) {
    absl::MutexLock lock(&mu_);
    now_ += by;
  }

 private:
  mutable absl::Mutex mu_;
  absl::Time now_;
};

}  // namespace kmsplugin::testing
