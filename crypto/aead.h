#pragma once

// Aead: authenticated encryption with associated data.
//
// Encrypt returns nonce ‖ ciphertext ‖ tag with a fresh random nonce from the injected Random.
// Decrypt verifies the tag before it releases anything; on any failure the output is wiped and the status is
// INVALID_ARGUMENT with a message that names the problem (too short, authentication failed), never the key.
// Implementations are immutable after construction and thread-safe.

#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "crypto/secret_bytes.h"

namespace kmsplugin::crypto {

class Aead {
 public:
  virtual ~Aead() = default;
  [[nodiscard]] virtual absl::StatusOr<std::string> Encrypt(std::string_view plaintext,
                                                            std::string_view associated_data) const = 0;
  [[nodiscard]] virtual absl::StatusOr<SecretBytes> Decrypt(std::string_view ciphertext,
                                                            std::string_view associated_data) const = 0;
};

}  // namespace kmsplugin::crypto
