#include "kmsplugin/core/version_heal.h"

namespace kmsplugin::core {

bool UnknownVersionHeal::MaybeReread(uint64_t wanted, const std::vector<KeyVersion>& known,
                                     absl::FunctionRef<absl::Status()> reread) {
  for (const KeyVersion& v : known) {
    if (v.version >= wanted) {
      return false;  // not newer than what this source holds: a re-read would not bring it
    }
  }
  uint64_t seen = 0;
  {
    absl::MutexLock lock(&seen_mu_);
    seen = rereads_;
  }
  absl::MutexLock lock(&mu_);
  if (rereads() != seen) {
    return true;  // another caller's re-read finished while this one waited: look again
  }
  const absl::Duration now = clock_.Elapsed();
  if (last_.has_value() && now - *last_ < min_interval_) {
    return false;
  }
  last_ = now;
  const bool ok = reread().ok();
  absl::MutexLock count(&seen_mu_);
  ++rereads_;
  return ok;
}

uint64_t UnknownVersionHeal::rereads() const {
  absl::MutexLock lock(&seen_mu_);
  return rereads_;
}

}  // namespace kmsplugin::core
