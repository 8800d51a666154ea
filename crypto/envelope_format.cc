#include "crypto/envelope_format.h"

#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace kmsplugin::crypto {

namespace {

// Offsets and sizes of the fixed-size fields (crypto/FORMAT.md).
constexpr size_t kVersionSize = 1;
constexpr size_t kKindSize = 1;
constexpr size_t kEnvironmentLengthSize = 1;
constexpr size_t kKeyRefLengthSize = 1;
constexpr size_t kWrappedLengthSize = 2;

std::string Hex(uint8_t byte) {
  constexpr char kDigits[] = "0123456789abcdef";
  return {'0', 'x', kDigits[byte >> 4], kDigits[byte & 0x0f]};
}

bool IsKnownKind(uint8_t kind) {
  return kind == static_cast<uint8_t>(KeySourceKind::kLocal) ||
         kind == static_cast<uint8_t>(KeySourceKind::kVault) ||
         kind == static_cast<uint8_t>(KeySourceKind::kPkcs11);
}

absl::Status CheckKind(uint8_t kind) {
  if (!IsKnownKind(kind)) {
    return absl::InvalidArgumentError(absl::StrCat("unknown key source kind ", Hex(kind)));
  }
  return absl::OkStatus();
}

absl::Status CheckEnvironment(std::string_view name) {
  if (name.empty()) {
    return absl::InvalidArgumentError("environment name is empty");
  }
  if (name.size() > kMaxEnvironmentNameSize) {
    return absl::InvalidArgumentError(
        absl::StrCat("environment name is ", name.size(), " bytes; at most ", kMaxEnvironmentNameSize));
  }
  for (size_t i = 0; i < name.size(); ++i) {
    const char c = name[i];
    const bool ok = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-';
    if (!ok) {
      return absl::InvalidArgumentError(absl::StrCat("environment name has byte ", Hex(static_cast<uint8_t>(c)),
                                                     " at position ", i, "; allowed are a-z, 0-9 and '-'"));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckKeyRef(std::string_view key_ref) {
  if (key_ref.empty()) {
    return absl::InvalidArgumentError("key reference is empty");
  }
  if (key_ref.size() > kMaxKeyRefSize) {
    return absl::InvalidArgumentError(
        absl::StrCat("key reference is ", key_ref.size(), " bytes; at most ", kMaxKeyRefSize));
  }
  return absl::OkStatus();
}

// Header bytes up to (not including) the wrapped length. Requires a valid header.
void AppendHeader(const EnvelopeHeader& header, std::string& out) {
  out.push_back(static_cast<char>(kEnvelopeFormatVersion));
  out.push_back(static_cast<char>(header.kind));
  out.push_back(static_cast<char>(header.environment.size()));
  out.append(header.environment);
  out.push_back(static_cast<char>(header.key_ref.size()));
  out.append(header.key_ref);
}

// Reads untrusted bytes front to back; every read checks the remaining length first.
class Reader {
 public:
  explicit Reader(std::string_view bytes) : bytes_(bytes) {}

  size_t offset() const { return offset_; }
  size_t remaining() const { return bytes_.size() - offset_; }

  absl::Status Take(size_t size, const char* field, std::string_view& out) {
    if (size > remaining()) {
      return absl::InvalidArgumentError(absl::StrCat("ciphertext truncated in ", field, ": need ", offset_ + size,
                                                     " bytes, have ", bytes_.size()));
    }
    out = bytes_.substr(offset_, size);
    offset_ += size;
    return absl::OkStatus();
  }
  absl::Status TakeByte(const char* field, uint8_t& out) {
    std::string_view byte;
    if (absl::Status status = Take(1, field, byte); !status.ok()) {
      return status;
    }
    out = static_cast<uint8_t>(byte[0]);
    return absl::OkStatus();
  }
  absl::Status TakeUint16(const char* field, uint16_t& out) {
    std::string_view bytes;
    if (absl::Status status = Take(2, field, bytes); !status.ok()) {
      return status;
    }
    out = static_cast<uint16_t>((static_cast<uint8_t>(bytes[0]) << 8) | static_cast<uint8_t>(bytes[1]));
    return absl::OkStatus();
  }

 private:
  std::string_view bytes_;
  size_t offset_ = 0;
};

}  // namespace

std::string KeySourceKindName(KeySourceKind kind) {
  switch (kind) {
    case KeySourceKind::kLocal:
      return "local";
    case KeySourceKind::kVault:
      return "vault";
    case KeySourceKind::kPkcs11:
      return "pkcs11";
  }
  return absl::StrCat("unknown(", Hex(static_cast<uint8_t>(kind)), ")");
}

absl::Status ValidateEnvelopeHeader(const EnvelopeHeader& header) {
  if (absl::Status status = CheckKind(static_cast<uint8_t>(header.kind)); !status.ok()) {
    return status;
  }
  if (absl::Status status = CheckEnvironment(header.environment); !status.ok()) {
    return status;
  }
  return CheckKeyRef(header.key_ref);
}

std::string EnvelopeAssociatedData(const EnvelopeHeader& header) {
  std::string aad;
  aad.reserve(kEnvelopeAadLabel.size() + 1 + 4 + header.environment.size() + header.key_ref.size());
  aad.append(kEnvelopeAadLabel);
  aad.push_back('\0');
  AppendHeader(header, aad);
  return aad;
}

absl::StatusOr<std::string> EncodeEnvelope(const Envelope& envelope) {
  if (absl::Status status = ValidateEnvelopeHeader(envelope.header); !status.ok()) {
    return status;
  }
  if (envelope.wrapped.empty()) {
    return absl::InvalidArgumentError("wrapped key is empty");
  }
  const size_t size = kVersionSize + kKindSize + kEnvironmentLengthSize + envelope.header.environment.size() +
                      kKeyRefLengthSize + envelope.header.key_ref.size() + kWrappedLengthSize +
                      envelope.wrapped.size();
  if (size > kMaxEnvelopeSize) {
    return absl::InvalidArgumentError(absl::StrCat("ciphertext would be ", size, " bytes; at most ",
                                                   kMaxEnvelopeSize, " (wrapped key is ", envelope.wrapped.size(),
                                                   " bytes)"));
  }
  std::string out;
  out.reserve(size);
  AppendHeader(envelope.header, out);
  out.push_back(static_cast<char>((envelope.wrapped.size() >> 8) & 0xff));
  out.push_back(static_cast<char>(envelope.wrapped.size() & 0xff));
  out.append(envelope.wrapped);
  return out;
}

absl::StatusOr<Envelope> ParseEnvelope(std::string_view bytes) {
  if (bytes.empty()) {
    return absl::InvalidArgumentError("ciphertext is empty");
  }
  if (bytes.size() > kMaxEnvelopeSize) {
    return absl::InvalidArgumentError(
        absl::StrCat("ciphertext is ", bytes.size(), " bytes; at most ", kMaxEnvelopeSize));
  }
  Reader reader(bytes);
  uint8_t version = 0;
  if (absl::Status status = reader.TakeByte("format version", version); !status.ok()) {
    return status;
  }
  if (version != kEnvelopeFormatVersion) {
    return absl::InvalidArgumentError(absl::StrCat("unsupported ciphertext format version ", Hex(version),
                                                   " (this build reads ", Hex(kEnvelopeFormatVersion), ")"));
  }
  uint8_t kind = 0;
  if (absl::Status status = reader.TakeByte("key source kind", kind); !status.ok()) {
    return status;
  }
  if (absl::Status status = CheckKind(kind); !status.ok()) {
    return status;
  }

  uint8_t environment_size = 0;
  if (absl::Status status = reader.TakeByte("environment length", environment_size); !status.ok()) {
    return status;
  }
  if (environment_size == 0) {
    return absl::InvalidArgumentError("environment name is empty");
  }
  if (environment_size > kMaxEnvironmentNameSize) {
    return absl::InvalidArgumentError(absl::StrCat("environment name length is ", environment_size,
                                                   "; at most ", kMaxEnvironmentNameSize));
  }
  std::string_view environment;
  if (absl::Status status = reader.Take(environment_size, "environment name", environment); !status.ok()) {
    return status;
  }
  if (absl::Status status = CheckEnvironment(environment); !status.ok()) {
    return status;
  }

  uint8_t key_ref_size = 0;
  if (absl::Status status = reader.TakeByte("key reference length", key_ref_size); !status.ok()) {
    return status;
  }
  if (key_ref_size == 0) {
    return absl::InvalidArgumentError("key reference is empty");
  }
  std::string_view key_ref;
  if (absl::Status status = reader.Take(key_ref_size, "key reference", key_ref); !status.ok()) {
    return status;
  }

  uint16_t wrapped_size = 0;
  if (absl::Status status = reader.TakeUint16("wrapped key length", wrapped_size); !status.ok()) {
    return status;
  }
  if (wrapped_size == 0) {
    return absl::InvalidArgumentError("wrapped key is empty");
  }
  std::string_view wrapped;
  if (absl::Status status = reader.Take(wrapped_size, "wrapped key", wrapped); !status.ok()) {
    return status;
  }
  if (reader.remaining() != 0) {
    return absl::InvalidArgumentError(absl::StrCat(reader.remaining(), " trailing bytes after wrapped key"));
  }

  Envelope envelope;
  envelope.header.kind = static_cast<KeySourceKind>(kind);
  envelope.header.environment = std::string(environment);
  envelope.header.key_ref = std::string(key_ref);
  envelope.wrapped = std::string(wrapped);
  return envelope;
}

}  // namespace kmsplugin::crypto
