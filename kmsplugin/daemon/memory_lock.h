#pragma once

// The start-up rule for locked memory (issue 13, item 4): `serve` keeps root keys, KEKs, passphrases and tokens
// in SecretBytes, which must be locked in RAM so they never reach swap. libsodium ignores a failed mlock, so this
// checks once, before any key source opens, that the process can lock what it needs: the arena of small secrets
// (crypto::kSecretArenaBytes) plus kLockedHeadroomBytes for secrets that get their own guarded pages (a Vault
// token, a PIN, the passphrase, a derived root key: a few pages each).
//
// - It can: the gauge kmsplugin_memory_locked is 1.
// - It cannot: FAILED_PRECONDITION naming RLIMIT_MEMLOCK's value and the fix for systemd, a shell and Kubernetes,
//   unless server.allowUnlockedMemory is true; then one warning in the log and the gauge at 0.
// The gauge keeps reading crypto::SecretLockFailures(), so a secret that could not be locked later shows too.

#include "absl/status/status.h"
#include "kmsplugin/observe/metrics.h"

namespace kmsplugin::daemon {

inline constexpr size_t kLockedHeadroomBytes = 64 * 1024;

absl::Status CheckLockedMemory(bool allow_unlocked, observe::Registry& registry);

}  // namespace kmsplugin::daemon
