// Clock: the monotonic reading and WaitMonotonic, the wait the maintenance loop and start retries use instead of
// abseil's timed waits (which wait for a CLOCK_REALTIME deadline).

#include "kmsplugin/core/clock.h"

#include <thread>

#include <catch2/catch.hpp>

#include "absl/synchronization/mutex.h"

namespace kmsplugin::core {
namespace {

TEST_CASE("Clock: Elapsed never goes back and follows real time", "[core][clock]") {
  const Clock& clock = SystemClock();
  const absl::Duration a = clock.Elapsed();
  absl::SleepFor(absl::Milliseconds(20));
  const absl::Duration b = clock.Elapsed();
  CHECK(b - a >= absl::Milliseconds(20));
  CHECK(b - a < absl::Seconds(30));
}

TEST_CASE("Clock: WaitMonotonic returns at once when done, after the timeout when not, early when woken",
          "[core][clock]") {
  absl::Mutex mu;
  bool flag = false;
  auto done = [&]() { return flag; };
  const Clock& clock = SystemClock();

  absl::Duration start = clock.Elapsed();
  CHECK_FALSE(WaitMonotonic(mu, absl::Condition(&done), absl::Milliseconds(120)));
  CHECK(clock.Elapsed() - start >= absl::Milliseconds(120));

  {
    absl::MutexLock lock(&mu);
    flag = true;
  }
  CHECK(WaitMonotonic(mu, absl::Condition(&done), absl::Hours(1)));
  CHECK(WaitMonotonic(mu, absl::Condition(&done), -absl::Seconds(1)));  // a past deadline still looks once

  {
    absl::MutexLock lock(&mu);
    flag = false;
  }
  std::thread waker([&] {
    absl::SleepFor(absl::Milliseconds(50));
    absl::MutexLock lock(&mu);
    flag = true;
  });
  start = clock.Elapsed();
  CHECK(WaitMonotonic(mu, absl::Condition(&done), absl::Hours(1)));
  CHECK(clock.Elapsed() - start < absl::Minutes(5));  // woken, not timed out (generous: a loaded machine)
  waker.join();
}

}  // namespace
}  // namespace kmsplugin::core
