#include "crypto/digest.h"

#include <openssl/evp.h>

#include <cstdlib>

namespace kmsplugin::crypto {

std::string Sha256(std::string_view data) {
  std::string out(EVP_MAX_MD_SIZE, '\0');
  unsigned int size = 0;
  // EVP_Digest with the built-in SHA-256 fails only when the library cannot allocate: nothing to report but that.
  if (EVP_Digest(data.data(), data.size(), reinterpret_cast<unsigned char*>(out.data()), &size, EVP_sha256(),
                 nullptr) != 1) {
    std::abort();
  }
  out.resize(size);
  return out;
}

}  // namespace kmsplugin::crypto
