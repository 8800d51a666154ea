#pragma once

// HKDF-SHA256 (RFC 5869) over OpenSSL's EVP_KDF "HKDF". Outputs are SecretBytes.
// INVALID_ARGUMENT when the output length is 0 or over 255*32 bytes.

#include <string_view>

#include "absl/status/statusor.h"
#include "crypto/secret_bytes.h"

namespace kmsplugin::crypto {

// Extract-then-expand.
absl::StatusOr<SecretBytes> HkdfSha256(std::string_view ikm, std::string_view salt, std::string_view info,
                                       size_t length);
// Expand only, with `prk` as the pseudorandom key (what kube-apiserver's KMS v2 seed mode does per object).
absl::StatusOr<SecretBytes> HkdfSha256Expand(std::string_view prk, std::string_view info, size_t length);

}  // namespace kmsplugin::crypto
