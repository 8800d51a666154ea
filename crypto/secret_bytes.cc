#include "crypto/secret_bytes.h"

#include <sodium.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <cerrno>
#include <atomic>
#include <utility>
#include <vector>

namespace kmsplugin::crypto {
namespace {

std::atomic<size_t> lock_failures{0};

// sodium_malloc has already tried to lock `p` and ignored the outcome; mlock is idempotent, so a second try tells
// whether the block is locked. Cost: one system call per block (the arena once; then only secrets of more than
// kArenaSlotSize bytes, or when the arena is full).
bool LockAgain(void* p, size_t size) {
  if (sodium_mlock(p, size) == 0) {
    return true;
  }
  lock_failures.fetch_add(1, std::memory_order_relaxed);
  return false;
}

// One sodium_malloc'd block (guard pages around it, locked, not dumped) cut into fixed slots.
class SecretArena {
 public:
  static constexpr size_t kSlots = kSecretArenaBytes / SecretBytes::kArenaSlotSize;  // 128 KiB locked

  static SecretArena& Get() {
    static SecretArena* const arena = new SecretArena();  // lives as long as the process
    return *arena;
  }

  uint8_t* Allocate() {
    std::lock_guard<std::mutex> lock(mu_);
    if (free_.empty()) {
      return nullptr;
    }
    const uint32_t slot = free_.back();
    free_.pop_back();
    return base_ + size_t{slot} * SecretBytes::kArenaSlotSize;
  }

  bool Owns(const uint8_t* p) const {
    return base_ != nullptr && p >= base_ && p < base_ + kSlots * SecretBytes::kArenaSlotSize;
  }

  bool locked() const { return locked_; }

  void Release(uint8_t* p) {
    sodium_memzero(p, SecretBytes::kArenaSlotSize);
    const auto slot = static_cast<uint32_t>((p - base_) / SecretBytes::kArenaSlotSize);
    std::lock_guard<std::mutex> lock(mu_);
    free_.push_back(slot);
  }

 private:
  SecretArena() {
    EnsureSodiumInitialised();
    base_ = static_cast<uint8_t*>(sodium_malloc(kSlots * SecretBytes::kArenaSlotSize));
    if (base_ == nullptr) {
      return;  // every secret then gets its own sodium_malloc
    }
    sodium_memzero(base_, kSlots * SecretBytes::kArenaSlotSize);
    locked_ = LockAgain(base_, kSlots * SecretBytes::kArenaSlotSize);
    free_.reserve(kSlots);
    for (uint32_t slot = kSlots; slot > 0; --slot) {
      free_.push_back(slot - 1);
    }
  }

  uint8_t* base_ = nullptr;
  bool locked_ = false;
  std::mutex mu_;
  std::vector<uint32_t> free_;
};

}  // namespace

bool SecretArenaLocked() { return SecretArena::Get().locked(); }

size_t SecretLockFailures() { return lock_failures.load(std::memory_order_relaxed); }

absl::Status ProbeLockedMemory(size_t bytes) {
  EnsureSodiumInitialised();
  void* probe = sodium_malloc(bytes);
  if (probe == nullptr) {
    return absl::ResourceExhaustedError("cannot allocate guarded memory for the probe");
  }
  errno = 0;
  const bool locked = sodium_mlock(probe, bytes) == 0;
  const int error = errno;
  sodium_free(probe);  // unlocks it again
  if (!locked) {
    return absl::ErrnoToStatus(error, "mlock");
  }
  return absl::OkStatus();
}

void EnsureSodiumInitialised() {
  // sodium_init is thread-safe and idempotent; the static makes the common path free.
  static const bool initialised = [] {
    if (sodium_init() < 0) {
      std::fputs("kmsplugin: libsodium failed to initialise; refusing to handle secrets\n", stderr);
      std::abort();
    }
    return true;
  }();
  (void)initialised;
}

SecretBytes::SecretBytes(size_t size) : size_(size) {
  if (size == 0) {
    return;
  }
  EnsureSodiumInitialised();
  if (size <= kArenaSlotSize) {
    data_ = SecretArena::Get().Allocate();
  }
  if (data_ == nullptr) {
    data_ = static_cast<uint8_t*>(sodium_malloc(size));
    if (data_ != nullptr) {
      (void)LockAgain(data_, size);
    }
  }
  if (data_ == nullptr) {
    // Cannot keep a secret safely (RLIMIT_MEMLOCK or memory exhausted): a broken invariant, not an input error.
    std::fputs("kmsplugin: cannot allocate locked memory for a secret (check RLIMIT_MEMLOCK)\n", stderr);
    std::abort();
  }
  sodium_memzero(data_, size);
}

SecretBytes SecretBytes::CopyOf(std::string_view bytes) {
  SecretBytes secret(bytes.size());
  if (!bytes.empty()) {
    std::memcpy(secret.data_, bytes.data(), bytes.size());
  }
  return secret;
}

SecretBytes SecretBytes::CopyOf(absl::Span<const uint8_t> bytes) {
  return CopyOf(std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()));
}

SecretBytes::SecretBytes(SecretBytes&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}

SecretBytes& SecretBytes::operator=(SecretBytes&& other) noexcept {
  if (this != &other) {
    Release();
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

SecretBytes::~SecretBytes() { Release(); }

void SecretBytes::Release() {
  if (data_ == nullptr) {
    return;
  }
  if (SecretArena::Get().Owns(data_)) {
    SecretArena::Get().Release(data_);  // wipes the whole slot
  } else {
    sodium_free(data_);  // zeroes, unlocks and unmaps
  }
  data_ = nullptr;
  size_ = 0;
}

bool SecretBytes::Equals(const SecretBytes& other) const {
  if (size_ != other.size_) {
    return false;
  }
  if (size_ == 0) {
    return true;
  }
  return sodium_memcmp(data_, other.data_, size_) == 0;
}

void Wipe(void* bytes, size_t size) {
  if (bytes != nullptr && size > 0) {
    sodium_memzero(bytes, size);
  }
}

}  // namespace kmsplugin::crypto
