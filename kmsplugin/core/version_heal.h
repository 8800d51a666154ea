#pragma once

// The heal-on-unknown-version rule, written once for every key source whose versions reach a node as a copy (the
// local keyring file, a per-node HSM token).
//
// On a control plane of several nodes, another node may promote (or, with a plain rotate, create) a version and
// its kube-apiserver write Secrets under it while this node's copy of the keys has just arrived but its poll has
// not run yet. A ciphertext that names a version NEWER than every version this source knows is therefore worth one
// re-read of the backend before it is refused: if the copy is there, the call succeeds without waiting for SIGHUP
// or the poll. A version at or below the newest known one is not re-read for (another keyring, a destroyed key:
// re-reading would not help), and re-reads are rate-limited to one per `min_interval` per source on the injected
// clock's monotonic reading, so a flood of ciphertexts naming a version that does not exist costs at most one
// keyring read or token listing per second.

#include <cstdint>
#include <optional>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "kmsplugin/core/clock.h"
#include "kmsplugin/core/key_source.h"

namespace kmsplugin::core {

inline constexpr absl::Duration kHealMinInterval = absl::Seconds(1);

class UnknownVersionHeal {
 public:
  explicit UnknownVersionHeal(Clock& clock, absl::Duration min_interval = kHealMinInterval)
      : clock_(clock), min_interval_(min_interval) {}

  // Runs `reread` (the source's Refresh) when `wanted` is newer than every version in `known` and no re-read ran
  // in the last min_interval; returns true when it ran and succeeded, or when another caller's re-read finished
  // while this one waited for it (re-reads are serialised): then the caller looks the version up again.
  bool MaybeReread(uint64_t wanted, const std::vector<KeyVersion>& known, absl::FunctionRef<absl::Status()> reread);

  // Re-reads this object has run (for tests and logs).
  uint64_t rereads() const;

 private:
  Clock& clock_;
  const absl::Duration min_interval_;
  absl::Mutex mu_ ABSL_ACQUIRED_BEFORE(seen_mu_);            // held across a re-read
  std::optional<absl::Duration> last_ ABSL_GUARDED_BY(mu_);  // clock_.Elapsed() of the last re-read
  mutable absl::Mutex seen_mu_;
  uint64_t rereads_ ABSL_GUARDED_BY(seen_mu_) = 0;  // re-reads finished
};

}  // namespace kmsplugin::core
