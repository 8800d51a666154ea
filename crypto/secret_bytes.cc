#include "crypto/secret_bytes.h"

#include <sodium.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <utility>

namespace kmsplugin::crypto {

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
  data_ = static_cast<uint8_t*>(sodium_malloc(size));
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
  if (data_ != nullptr) {
    sodium_free(data_);  // zeroes, unlocks and unmaps
    data_ = nullptr;
    size_ = 0;
  }
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
