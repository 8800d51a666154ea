#pragma once

// FakeRandom: a deterministic Random for golden vectors. Emits bytes from a counter-driven SHA-256 stream of
// `seed`, so the same seed always gives the same bytes. Never use outside tests.

#include <cstdint>
#include <string>

#include <openssl/sha.h>

#include "absl/synchronization/mutex.h"
#include "crypto/random.h"

namespace kmsplugin::testing {

class FakeRandom : public crypto::Random {
 public:
  explicit FakeRandom(std::string seed = "kmsplugin test") : seed_(std::move(seed)) {}
  void Fill(absl::Span<uint8_t> out) override {
    absl::MutexLock lock(&mu_);
    for (uint8_t& byte : out) {
      if (pos_ == sizeof(block_)) {
        std::string input = seed_ + std::to_string(counter_++);
        SHA256(reinterpret_cast<const uint8_t*>(input.data()), input.size(), block_);
        pos_ = 0;
      }
      byte = block_[pos_++];
    }
  }

 private:
  absl::Mutex mu_;
  const std::string seed_;
  uint64_t counter_ = 0;
  uint8_t block_[32] = {};
  size_t pos_ = sizeof(block_);
};

}  // namespace kmsplugin::testing
