#pragma once

// SHA-256 of public data (OpenSSL EVP), for fingerprints that are compared, never for secrets or MACs.

#include <string>
#include <string_view>

namespace kmsplugin::crypto {

// The 32-byte SHA-256 digest of `data`.
std::string Sha256(std::string_view data);

}  // namespace kmsplugin::crypto
