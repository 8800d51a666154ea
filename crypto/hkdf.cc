#include "crypto/hkdf.h"

#include <openssl/core_names.h>
#include <openssl/kdf.h>
#include <openssl/params.h>

#include <memory>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace kmsplugin::crypto {

namespace {

constexpr size_t kSha256Size = 32;
constexpr size_t kMaxOutputSize = 255 * kSha256Size;

struct KdfDeleter {
  void operator()(EVP_KDF* kdf) const { EVP_KDF_free(kdf); }
  void operator()(EVP_KDF_CTX* ctx) const { EVP_KDF_CTX_free(ctx); }
};

// OSSL_PARAM wants a non-const pointer even for inputs it only reads; an empty input still needs a valid one.
void* ParamBytes(std::string_view bytes) {
  static char empty[1] = {0};
  return bytes.empty() ? empty : const_cast<char*>(bytes.data());
}

absl::StatusOr<SecretBytes> Derive(int mode, std::string_view key, std::string_view salt, std::string_view info,
                                   size_t length) {
  if (length == 0 || length > kMaxOutputSize) {
    return absl::InvalidArgumentError(
        absl::StrCat("HKDF-SHA256 output length must be 1..", kMaxOutputSize, " bytes, got ", length));
  }
  std::unique_ptr<EVP_KDF, KdfDeleter> kdf(EVP_KDF_fetch(nullptr, OSSL_KDF_NAME_HKDF, nullptr));
  if (kdf == nullptr) {
    return absl::InternalError("OpenSSL has no HKDF implementation");
  }
  std::unique_ptr<EVP_KDF_CTX, KdfDeleter> ctx(EVP_KDF_CTX_new(kdf.get()));
  if (ctx == nullptr) {
    return absl::ResourceExhaustedError("OpenSSL could not allocate an HKDF context");
  }
  char digest[] = "SHA256";
  OSSL_PARAM params[6];
  size_t n = 0;
  params[n++] = OSSL_PARAM_construct_int(OSSL_KDF_PARAM_MODE, &mode);
  params[n++] = OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, digest, 0);
  params[n++] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY, ParamBytes(key), key.size());
  if (mode == EVP_KDF_HKDF_MODE_EXTRACT_AND_EXPAND && !salt.empty()) {
    // An absent salt is HashLen zero bytes (RFC 5869 2.2), which HMAC treats exactly like an empty one.
    params[n++] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_SALT, ParamBytes(salt), salt.size());
  }
  if (!info.empty()) {
    params[n++] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO, ParamBytes(info), info.size());
  }
  params[n] = OSSL_PARAM_construct_end();
  SecretBytes out(length);
  if (EVP_KDF_derive(ctx.get(), out.data(), out.size(), params) != 1) {
    Wipe(out.data(), out.size());
    // Inputs were range-checked above; OpenSSL still caps the info size, which is the caller's to fix.
    return absl::InvalidArgumentError(absl::StrCat("HKDF-SHA256 derivation rejected by OpenSSL (info ",
                                                   info.size(), " bytes, key ", key.size(), " bytes)"));
  }
  return out;
}

}  // namespace

absl::StatusOr<SecretBytes> HkdfSha256(std::string_view ikm, std::string_view salt, std::string_view info,
                                       size_t length) {
  return Derive(EVP_KDF_HKDF_MODE_EXTRACT_AND_EXPAND, ikm, salt, info, length);
}

absl::StatusOr<SecretBytes> HkdfSha256Expand(std::string_view prk, std::string_view info, size_t length) {
  if (prk.empty()) {
    return absl::InvalidArgumentError("HKDF-SHA256 pseudorandom key is empty");
  }
  return Derive(EVP_KDF_HKDF_MODE_EXPAND_ONLY, prk, /*salt=*/{}, info, length);
}

}  // namespace kmsplugin::crypto
