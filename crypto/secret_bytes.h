#pragma once

// SecretBytes: a fixed-size buffer for key material, seeds and tokens.
//
// Memory comes from libsodium's sodium_malloc: it sits between guard pages, is locked (mlock) so it is never
// swapped, is excluded from core dumps (MADV_DONTDUMP) and is zeroed when the object dies. Secrets of at most
// kArenaSlotSize bytes (keys, seeds, DEKs: the per-request case) take a slot of one process-wide arena that was
// itself allocated that way, so the hot path costs a free-list pop instead of four system calls; a slot is wiped
// on release. Larger secrets, and any when the arena is full, get their own sodium_malloc.
// Equality is constant-time. The buffer is move-only: a secret is never copied by accident.
//
// Every access to the raw bytes goes through data()/view()/span(), so `grep -n "SecretBytes\|\.view()"` finds
// each place a secret is touched. Not thread-safe for mutation; const access from several threads is fine.

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "absl/status/status.h"
#include "absl/types/span.h"

namespace kmsplugin::crypto {

class SecretBytes {
 public:
  static constexpr size_t kArenaSlotSize = 128;

  // An empty secret (size 0, no allocation).
  SecretBytes() = default;
  // A zero-filled secret of `size` bytes. Aborts if locked memory cannot be had (a broken invariant: the
  // process cannot keep secrets safely).
  explicit SecretBytes(size_t size);
  // A secret holding a copy of `bytes`. The caller should wipe its own copy.
  static SecretBytes CopyOf(std::string_view bytes);
  static SecretBytes CopyOf(absl::Span<const uint8_t> bytes);

  SecretBytes(SecretBytes&& other) noexcept;
  SecretBytes& operator=(SecretBytes&& other) noexcept;
  SecretBytes(const SecretBytes&) = delete;
  SecretBytes& operator=(const SecretBytes&) = delete;
  ~SecretBytes();

  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }

  // Raw access. Every call site handles secret bytes: keep the bytes out of logs, errors and metrics.
  uint8_t* data() { return data_; }
  const uint8_t* data() const { return data_; }
  std::string_view view() const { return {reinterpret_cast<const char*>(data_), size_}; }
  absl::Span<const uint8_t> span() const { return {data_, size_}; }

  // Constant-time comparison (sodium_memcmp); sizes are not secret.
  bool Equals(const SecretBytes& other) const;

 private:
  void Release();
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

// Overwrites `bytes` with zeros in a way the compiler cannot elide (sodium_memzero). For the few secrets that
// must pass through memory we do not own, such as a protobuf string.
void Wipe(void* bytes, size_t size);

// Initialises libsodium once; safe to call from any thread, any number of times. Aborts if it fails.
void EnsureSodiumInitialised();

// Locked memory. sodium_malloc locks what it hands out but ignores a failure to (RLIMIT_MEMLOCK too low and no
// CAP_IPC_LOCK), which leaves the secret in swappable memory without a word. So SecretBytes locks each block
// again itself and counts the blocks it could not lock; a daemon checks at start that it can lock what it needs
// (kmsplugin/daemon/memory_lock.h).
//
// Bytes the process-wide arena of small secrets takes (locked once, for the life of the process).
inline constexpr size_t kSecretArenaBytes = 1024 * SecretBytes::kArenaSlotSize;
// Whether the arena of small secrets exists and is locked; creates the arena on first use.
bool SecretArenaLocked();
// Secret blocks (arena or own allocation) that could not be locked since the process started.
size_t SecretLockFailures();
// Locks `bytes` of fresh guarded memory on top of what is locked already, then frees it: whether `bytes` more
// secret memory could be locked now. On failure, the errno of mlock (ENOMEM: over RLIMIT_MEMLOCK; EPERM).
absl::Status ProbeLockedMemory(size_t bytes);

}  // namespace kmsplugin::crypto
