#include "crypto/random.h"

#include <sodium.h>

namespace kmsplugin::crypto {

SecretBytes Random::NewSecret(size_t size) {
  SecretBytes secret(size);
  Fill(absl::MakeSpan(secret.data(), secret.size()));
  return secret;
}

namespace {

class SystemRandomImpl final : public Random {
 public:
  void Fill(absl::Span<uint8_t> out) override {
    if (!out.empty()) {
      randombytes_buf(out.data(), out.size());
    }
  }
};

}  // namespace

Random& SystemRandom() {
  EnsureSodiumInitialised();
  static SystemRandomImpl* const instance = new SystemRandomImpl();
  return *instance;
}

}  // namespace kmsplugin::crypto
