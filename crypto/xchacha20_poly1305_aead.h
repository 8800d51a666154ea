#pragma once

// XChaCha20-Poly1305 (libsodium crypto_aead_xchacha20poly1305_ietf_*), 24-byte nonce, 16-byte tag.
// Output layout: nonce(24) ‖ ciphertext ‖ tag(16). The 192-bit nonce makes random nonces safe for any number
// of messages, so this is the construction the local key source uses. Thread-safe.

#include <memory>

#include "crypto/aead.h"
#include "crypto/random.h"

namespace kmsplugin::crypto {

class XChaCha20Poly1305Aead final : public Aead {
 public:
  static constexpr size_t kKeySize = 32;
  static constexpr size_t kNonceSize = 24;
  static constexpr size_t kTagSize = 16;

  static absl::StatusOr<std::unique_ptr<XChaCha20Poly1305Aead>> New(const SecretBytes& key, Random& random);

  absl::StatusOr<std::string> Encrypt(std::string_view plaintext,
                                      std::string_view associated_data) const override;
  absl::StatusOr<SecretBytes> Decrypt(std::string_view ciphertext,
                                      std::string_view associated_data) const override;

  // Explicit-nonce forms; nonce must be 24 bytes. Seal returns ciphertext ‖ tag.
  absl::StatusOr<std::string> Seal(std::string_view nonce, std::string_view plaintext,
                                   std::string_view associated_data) const;
  absl::StatusOr<SecretBytes> Open(std::string_view nonce, std::string_view ciphertext_and_tag,
                                   std::string_view associated_data) const;

 private:
  XChaCha20Poly1305Aead(SecretBytes key, Random& random) : key_(std::move(key)), random_(random) {}
  SecretBytes key_;
  Random& random_;
};

}  // namespace kmsplugin::crypto
