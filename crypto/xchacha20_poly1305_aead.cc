#include "crypto/xchacha20_poly1305_aead.h"

#include <sodium.h>

#include <memory>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace kmsplugin::crypto {

namespace {

static_assert(XChaCha20Poly1305Aead::kKeySize == crypto_aead_xchacha20poly1305_ietf_KEYBYTES);
static_assert(XChaCha20Poly1305Aead::kNonceSize == crypto_aead_xchacha20poly1305_ietf_NPUBBYTES);
static_assert(XChaCha20Poly1305Aead::kTagSize == crypto_aead_xchacha20poly1305_ietf_ABYTES);

// libsodium accepts a null pointer with length 0, but a non-null pointer keeps every call well defined.
const unsigned char kEmpty[1] = {0};
const unsigned char* Bytes(std::string_view bytes) {
  return bytes.empty() ? kEmpty : reinterpret_cast<const unsigned char*>(bytes.data());
}

absl::Status CheckNonce(std::string_view nonce) {
  if (nonce.size() != XChaCha20Poly1305Aead::kNonceSize) {
    return absl::InvalidArgumentError(absl::StrCat("XChaCha20-Poly1305 nonce must be ",
                                                   XChaCha20Poly1305Aead::kNonceSize, " bytes, got ", nonce.size()));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<XChaCha20Poly1305Aead>> XChaCha20Poly1305Aead::New(const SecretBytes& key,
                                                                                  Random& random) {
  if (key.size() != kKeySize) {
    return absl::InvalidArgumentError(
        absl::StrCat("XChaCha20-Poly1305 key must be ", kKeySize, " bytes, got ", key.size()));
  }
  EnsureSodiumInitialised();
  return std::unique_ptr<XChaCha20Poly1305Aead>(
      new XChaCha20Poly1305Aead(SecretBytes::CopyOf(key.view()), random));
}

absl::StatusOr<std::string> XChaCha20Poly1305Aead::Seal(std::string_view nonce, std::string_view plaintext,
                                                        std::string_view associated_data) const {
  if (absl::Status status = CheckNonce(nonce); !status.ok()) {
    return status;
  }
  if (plaintext.size() > crypto_aead_xchacha20poly1305_ietf_MESSAGEBYTES_MAX) {
    return absl::InvalidArgumentError(absl::StrCat("plaintext is ", plaintext.size(), " bytes; too long"));
  }
  std::string out(plaintext.size() + kTagSize, '\0');
  unsigned long long out_len = 0;
  if (crypto_aead_xchacha20poly1305_ietf_encrypt(reinterpret_cast<unsigned char*>(out.data()), &out_len,
                                                 Bytes(plaintext), plaintext.size(), Bytes(associated_data),
                                                 associated_data.size(), nullptr, Bytes(nonce), key_.data()) != 0 ||
      out_len != out.size()) {
    return absl::InternalError("libsodium failed to encrypt with XChaCha20-Poly1305");
  }
  return out;
}

absl::StatusOr<SecretBytes> XChaCha20Poly1305Aead::Open(std::string_view nonce,
                                                        std::string_view ciphertext_and_tag,
                                                        std::string_view associated_data) const {
  if (absl::Status status = CheckNonce(nonce); !status.ok()) {
    return status;
  }
  if (ciphertext_and_tag.size() < kTagSize) {
    return absl::InvalidArgumentError(absl::StrCat("ciphertext too short: ", ciphertext_and_tag.size(),
                                                   " bytes, need at least ", kTagSize));
  }
  SecretBytes out(ciphertext_and_tag.size() - kTagSize);
  unsigned char unused[1];
  unsigned long long out_len = 0;
  // libsodium verifies the tag before it decrypts anything.
  if (crypto_aead_xchacha20poly1305_ietf_decrypt(out.empty() ? unused : out.data(), &out_len, nullptr,
                                                 Bytes(ciphertext_and_tag), ciphertext_and_tag.size(),
                                                 Bytes(associated_data), associated_data.size(), Bytes(nonce),
                                                 key_.data()) != 0 ||
      out_len != out.size()) {
    Wipe(out.data(), out.size());
    return absl::InvalidArgumentError("authentication failed");
  }
  return out;
}

absl::StatusOr<std::string> XChaCha20Poly1305Aead::Encrypt(std::string_view plaintext,
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

absl::StatusOr<SecretBytes> XChaCha20Poly1305Aead::Decrypt(std::string_view ciphertext,
                                                           std::string_view associated_data) const {
  if (ciphertext.size() < kNonceSize + kTagSize) {
    return absl::InvalidArgumentError(absl::StrCat("ciphertext too short: ", ciphertext.size(),
                                                   " bytes, need at least ", kNonceSize + kTagSize));
  }
  return Open(ciphertext.substr(0, kNonceSize), ciphertext.substr(kNonceSize), associated_data);
}

}  // namespace kmsplugin::crypto
