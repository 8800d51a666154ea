#pragma once

// AES-256-GCM (OpenSSL EVP), 12-byte nonce, 16-byte tag. Output layout: nonce(12) ‖ ciphertext ‖ tag(16).
// Random 96-bit nonces: keep the number of encryptions under one key well below 2^32 (NIST SP 800-38D 8.3).
// The key is held in SecretBytes. Thread-safe: every call makes its own EVP_CIPHER_CTX.

#include <memory>

#include "crypto/aead.h"
#include "crypto/random.h"

namespace kmsplugin::crypto {

class AesGcmAead final : public Aead {
 public:
  static constexpr size_t kKeySize = 32;
  static constexpr size_t kNonceSize = 12;
  static constexpr size_t kTagSize = 16;

  // INVALID_ARGUMENT unless key is exactly 32 bytes. `random` must outlive the Aead.
  static absl::StatusOr<std::unique_ptr<AesGcmAead>> New(const SecretBytes& key, Random& random);

  absl::StatusOr<std::string> Encrypt(std::string_view plaintext,
                                      std::string_view associated_data) const override;
  absl::StatusOr<SecretBytes> Decrypt(std::string_view ciphertext,
                                      std::string_view associated_data) const override;

  // Explicit-nonce forms (for test vectors and for formats that carry the nonce elsewhere).
  // Seal returns ciphertext ‖ tag; Open takes ciphertext ‖ tag. Nonce must be 12 bytes.
  absl::StatusOr<std::string> Seal(std::string_view nonce, std::string_view plaintext,
                                   std::string_view associated_data) const;
  absl::StatusOr<SecretBytes> Open(std::string_view nonce, std::string_view ciphertext_and_tag,
                                   std::string_view associated_data) const;

 private:
  AesGcmAead(SecretBytes key, Random& random) : key_(std::move(key)), random_(random) {}
  SecretBytes key_;
  Random& random_;
};

}  // namespace kmsplugin::crypto
