#pragma once

// The plugin's ciphertext format: what EncryptResponse.ciphertext carries and etcd stores (as
// EncryptedObject.encryptedDEKSource). Byte-exact specification: crypto/FORMAT.md. Summary:
//
//   off  size  field
//   0    1     format version            0x01
//   1    1     key source kind           0x01 local, 0x02 vault, 0x03 pkcs11
//   2    1     environment length E      1..63
//   3    E     environment name          [a-z0-9-], as configured
//   3+E  1     key reference length R    1..255
//   4+E  R     key reference             opaque to this layer; the key source's name for the KEK version
//   4+E+R 2    wrapped length W          big-endian, 1..(1024 - header)
//   6+E+R W    wrapped                   the key source's AEAD output over the plaintext
//
// The whole envelope is at most 1024 bytes (kube-apiserver's limit). Nothing may follow `wrapped`.
// Associated data for the key source's AEAD is EnvelopeAssociatedData(): a domain-separation label followed by
// every header byte before the wrapped length, so version, kind, environment and key version are all bound and
// a header edit fails authentication.
//
// Parsing never reads past the input and checks every length before slicing it. Errors are INVALID_ARGUMENT
// and name the field at fault.

#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace kmsplugin::crypto {

enum class KeySourceKind : uint8_t {
  kLocal = 0x01,
  kVault = 0x02,
  kPkcs11 = 0x03,
};

// "local", "vault", "pkcs11", or "unknown(0xNN)".
std::string KeySourceKindName(KeySourceKind kind);

struct EnvelopeHeader {
  KeySourceKind kind = KeySourceKind::kLocal;
  std::string environment;
  std::string key_ref;
};

struct Envelope {
  EnvelopeHeader header;
  std::string wrapped;
};

inline constexpr uint8_t kEnvelopeFormatVersion = 0x01;
inline constexpr size_t kMaxEnvelopeSize = 1024;
inline constexpr size_t kMaxEnvironmentNameSize = 63;
inline constexpr size_t kMaxKeyRefSize = 255;
// Label that starts the associated data, so no other use of the same key can collide with ours.
inline constexpr std::string_view kEnvelopeAadLabel = "kmsplugin/envelope/v1";

// Validates the header (environment name charset and length, key_ref length, kind known).
absl::Status ValidateEnvelopeHeader(const EnvelopeHeader& header);

// The bytes the key source must bind as associated data when it wraps or unwraps under this header.
// Requires a header that passes ValidateEnvelopeHeader.
std::string EnvelopeAssociatedData(const EnvelopeHeader& header);

// Serialises; INVALID_ARGUMENT if a field is out of range or the result would exceed kMaxEnvelopeSize.
absl::StatusOr<std::string> EncodeEnvelope(const Envelope& envelope);

// Parses untrusted bytes. INVALID_ARGUMENT naming the problem: empty, unsupported format version (with the
// byte), unknown key source kind, truncated field, trailing bytes, oversize.
absl::StatusOr<Envelope> ParseEnvelope(std::string_view bytes);

}  // namespace kmsplugin::crypto
