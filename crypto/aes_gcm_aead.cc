#include "crypto/aes_gcm_aead.h"

#include <openssl/evp.h>

#include <algorithm>
#include <climits>
#include <memory>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace kmsplugin::crypto {

namespace {

struct CipherCtxDeleter {
  void operator()(EVP_CIPHER_CTX* ctx) const { EVP_CIPHER_CTX_free(ctx); }
};
using CipherCtx = std::unique_ptr<EVP_CIPHER_CTX, CipherCtxDeleter>;

const unsigned char* Bytes(std::string_view bytes) { return reinterpret_cast<const unsigned char*>(bytes.data()); }

// OpenSSL counts lengths in int. Anything near that is far beyond what a KMS plugin handles.
constexpr size_t kMaxInputSize = static_cast<size_t>(INT_MAX) - AesGcmAead::kTagSize;

absl::Status CheckNonce(std::string_view nonce) {
  if (nonce.size() != AesGcmAead::kNonceSize) {
    return absl::InvalidArgumentError(absl::StrCat("AES-256-GCM nonce must be ", AesGcmAead::kNonceSize,
                                                   " bytes, got ", nonce.size()));
  }
  return absl::OkStatus();
}

// A fresh context keyed for one operation, with the associated data already absorbed.
absl::StatusOr<CipherCtx> NewContext(bool encrypt, const SecretBytes& key, std::string_view nonce,
                                     std::string_view associated_data) {
  if (associated_data.size() > kMaxInputSize) {
    return absl::InvalidArgumentError(
        absl::StrCat("associated data is ", associated_data.size(), " bytes; at most ", kMaxInputSize));
  }
  CipherCtx ctx(EVP_CIPHER_CTX_new());
  if (ctx == nullptr) {
    return absl::ResourceExhaustedError("OpenSSL could not allocate an AES-256-GCM context");
  }
  const int init_ok =
      encrypt ? EVP_EncryptInit_ex(ctx.get(), EVP_aes_256_gcm(), nullptr, key.data(), Bytes(nonce))
              : EVP_DecryptInit_ex(ctx.get(), EVP_aes_256_gcm(), nullptr, key.data(), Bytes(nonce));
  if (init_ok != 1) {
    return absl::InternalError("OpenSSL refused to initialise AES-256-GCM");
  }
  if (!associated_data.empty()) {
    int len = 0;
    if (EVP_CipherUpdate(ctx.get(), nullptr, &len, Bytes(associated_data),
                         static_cast<int>(associated_data.size())) != 1) {
      return absl::InternalError("OpenSSL failed to absorb AES-256-GCM associated data");
    }
  }
  return ctx;
}

}  // namespace

absl::StatusOr<std::unique_ptr<AesGcmAead>> AesGcmAead::New(const SecretBytes& key, Random& random) {
  if (key.size() != kKeySize) {
    return absl::InvalidArgumentError(
        absl::StrCat("AES-256-GCM key must be ", kKeySize, " bytes, got ", key.size()));
  }
  return std::unique_ptr<AesGcmAead>(new AesGcmAead(SecretBytes::CopyOf(key.view()), random));
}

absl::StatusOr<std::string> AesGcmAead::Seal(std::string_view nonce, std::string_view plaintext,
                                             std::string_view associated_data) const {
  if (absl::Status status = CheckNonce(nonce); !status.ok()) {
    return status;
  }
  if (plaintext.size() > kMaxInputSize) {
    return absl::InvalidArgumentError(
        absl::StrCat("plaintext is ", plaintext.size(), " bytes; at most ", kMaxInputSize));
  }
  absl::StatusOr<CipherCtx> ctx = NewContext(/*encrypt=*/true, key_, nonce, associated_data);
  if (!ctx.ok()) {
    return ctx.status();
  }
  std::string out(plaintext.size() + kTagSize, '\0');
  unsigned char* out_bytes = reinterpret_cast<unsigned char*>(out.data());
  int len = 0;
  if (!plaintext.empty() &&
      EVP_EncryptUpdate(ctx->get(), out_bytes, &len, Bytes(plaintext), static_cast<int>(plaintext.size())) != 1) {
    return absl::InternalError("OpenSSL failed to encrypt with AES-256-GCM");
  }
  int final_len = 0;
  if (EVP_EncryptFinal_ex(ctx->get(), out_bytes + len, &final_len) != 1 ||
      static_cast<size_t>(len + final_len) != plaintext.size()) {
    return absl::InternalError("OpenSSL failed to finish AES-256-GCM encryption");
  }
  if (EVP_CIPHER_CTX_ctrl(ctx->get(), EVP_CTRL_GCM_GET_TAG, static_cast<int>(kTagSize),
                          out_bytes + plaintext.size()) != 1) {
    return absl::InternalError("OpenSSL failed to produce the AES-256-GCM tag");
  }
  return out;
}

absl::StatusOr<SecretBytes> AesGcmAead::Open(std::string_view nonce, std::string_view ciphertext_and_tag,
                                             std::string_view associated_data) const {
  if (absl::Status status = CheckNonce(nonce); !status.ok()) {
    return status;
  }
  if (ciphertext_and_tag.size() < kTagSize) {
    return absl::InvalidArgumentError(absl::StrCat("ciphertext too short: ", ciphertext_and_tag.size(),
                                                   " bytes, need at least ", kTagSize));
  }
  if (ciphertext_and_tag.size() > kMaxInputSize) {
    return absl::InvalidArgumentError(
        absl::StrCat("ciphertext is ", ciphertext_and_tag.size(), " bytes; at most ", kMaxInputSize));
  }
  const std::string_view ciphertext = ciphertext_and_tag.substr(0, ciphertext_and_tag.size() - kTagSize);
  const std::string_view tag = ciphertext_and_tag.substr(ciphertext.size());
  absl::StatusOr<CipherCtx> ctx = NewContext(/*encrypt=*/false, key_, nonce, associated_data);
  if (!ctx.ok()) {
    return ctx.status();
  }
  // GCM decrypts before the tag is known to be good, so the plaintext goes straight into locked memory that
  // is wiped unless the tag verifies; nothing leaves this function before EVP_DecryptFinal_ex succeeds.
  SecretBytes out(ciphertext.size());
  int len = 0;
  if (!ciphertext.empty() &&
      EVP_DecryptUpdate(ctx->get(), out.data(), &len, Bytes(ciphertext), static_cast<int>(ciphertext.size())) !=
          1) {
    Wipe(out.data(), out.size());
    return absl::InternalError("OpenSSL failed to decrypt with AES-256-GCM");
  }
  // OpenSSL takes a non-const pointer but only reads the tag.
  unsigned char tag_copy[kTagSize];
  std::copy(tag.begin(), tag.end(), tag_copy);
  if (EVP_CIPHER_CTX_ctrl(ctx->get(), EVP_CTRL_GCM_SET_TAG, static_cast<int>(kTagSize), tag_copy) != 1) {
    Wipe(out.data(), out.size());
    return absl::InternalError("OpenSSL refused the AES-256-GCM tag");
  }
  int final_len = 0;
  unsigned char unused[1];
  if (EVP_DecryptFinal_ex(ctx->get(), out.data() == nullptr ? unused : out.data() + len, &final_len) != 1) {
    Wipe(out.data(), out.size());
    return absl::InvalidArgumentError("authentication failed");
  }
  return out;
}

absl::StatusOr<std::string> AesGcmAead::Encrypt(std::string_view plaintext,
                                                std::string_view associated_data) const {
  std::string out(kNonceSize, '\0');
  random_.Fill(absl::MakeSpan(reinterpret_cast<uint8_t*>(out.data()), kNonceSize));
  absl::StatusOr<std::string> sealed = Seal(out, plaintext, associated_data);
  if (!sealed.ok()) {
    return sealed.status();
  }
  out.append(*sealed);
  return out;
}

absl::StatusOr<SecretBytes> AesGcmAead::Decrypt(std::string_view ciphertext,
                                                std::string_view associated_data) const {
  if (ciphertext.size() < kNonceSize + kTagSize) {
    return absl::InvalidArgumentError(absl::StrCat("ciphertext too short: ", ciphertext.size(),
                                                   " bytes, need at least ", kNonceSize + kTagSize));
  }
  return Open(ciphertext.substr(0, kNonceSize), ciphertext.substr(kNonceSize), associated_data);
}

}  // namespace kmsplugin::crypto
