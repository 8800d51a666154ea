#pragma once

// Random: the source of nonces, keys and seeds. Behind an interface so tests can inject a deterministic fake
// (tests/support/fake_random.h) to freeze golden vectors. Implementations are thread-safe.

#include <cstdint>

#include "absl/types/span.h"
#include "crypto/secret_bytes.h"

namespace kmsplugin::crypto {

class Random {
 public:
  virtual ~Random() = default;
  // Fills `out` with random bytes. Never fails: a CSPRNG that cannot deliver aborts the process.
  virtual void Fill(absl::Span<uint8_t> out) = 0;

  // A fresh secret of `size` random bytes.
  SecretBytes NewSecret(size_t size);
};

// The operating system's CSPRNG (libsodium randombytes_buf, i.e. getrandom(2)). Process-wide, thread-safe.
Random& SystemRandom();

}  // namespace kmsplugin::crypto
