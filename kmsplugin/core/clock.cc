#include "kmsplugin/core/clock.h"

namespace kmsplugin::core {
namespace {

class SystemClockImpl final : public Clock {
 public:
  absl::Time Now() const override { return absl::Now(); }
};

}  // namespace

Clock& SystemClock() {
  static SystemClockImpl* const clock = new SystemClockImpl();
  return *clock;
}

}  // namespace kmsplugin::core
