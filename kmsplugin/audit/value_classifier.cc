#include "kmsplugin/audit/value_classifier.h"

#include "absl/strings/str_cat.h"
#include "encrypted_object.pb.h"
#include "kmsplugin/core/sv.h"

namespace kmsplugin::audit {
namespace {

constexpr std::string_view kEncPrefix = "k8s:enc:";
constexpr std::string_view kKmsV2Prefix = "k8s:enc:kms:v2:";
constexpr std::string_view kKmsV1Prefix = "k8s:enc:kms:v1:";
constexpr std::string_view kAesCbcPrefix = "k8s:enc:aescbc:v1:";
constexpr std::string_view kAesGcmPrefix = "k8s:enc:aesgcm:v1:";
constexpr std::string_view kSecretboxPrefix = "k8s:enc:secretbox:v1:";

// kube-apiserver's limits (kms-protocol.md §2).
constexpr size_t kMaxKeyIdSize = 1024;
constexpr size_t kMaxDekSourceSize = 1024;
// Seed mode: info(32) ‖ nonce(12) ‖ ct ‖ tag(16). Legacy: nonce(12) ‖ ct ‖ tag(16).
constexpr size_t kSeedModeMinData = 32 + 12 + 16;
constexpr size_t kGcmMinData = 12 + 16;
// v1 data: AES-GCM nonce(12) ‖ ct ‖ tag(16), or for old data AES-CBC iv(16) ‖ ≥1 block.
constexpr size_t kV1MinData = 12 + 16;

// Well-formed UTF-8 (no overlongs, no surrogates, at most U+10FFFF), as proto3 requires of a string field.
bool IsUtf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    size_t n = 0;
    uint32_t cp = 0;
    if (c < 0x80) {
      ++i;
      continue;
    } else if (c >= 0xc2 && c <= 0xdf) {
      n = 1;
      cp = c & 0x1f;
    } else if (c >= 0xe0 && c <= 0xef) {
      n = 2;
      cp = c & 0x0f;
    } else if (c >= 0xf0 && c <= 0xf4) {
      n = 3;
      cp = c & 0x07;
    } else {
      return false;
    }
    if (i + n >= s.size()) {
      return false;
    }
    for (size_t k = 1; k <= n; ++k) {
      const unsigned char cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xc0) != 0x80) {
        return false;
      }
      cp = (cp << 6) | (cc & 0x3f);
    }
    if ((n == 2 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) || (n == 3 && (cp < 0x10000 || cp > 0x10ffff))) {
      return false;
    }
    i += n + 1;
  }
  return true;
}

Classification Malformed(StorageKind was, std::string provider, std::string problem) {
  Classification c;
  c.kind = StorageKind::kMalformed;
  c.provider = std::move(provider);
  c.problem = absl::StrCat(Sv(StorageKindName(was)), ": ", problem);
  return c;
}

// Splits "<name>:<rest>" after `prefix`. False when there is no ':' or the name is empty.
bool SplitName(std::string_view value, std::string_view prefix, std::string& name, std::string_view& rest) {
  std::string_view after = value.substr(prefix.size());
  const size_t colon = after.find(':');
  if (colon == std::string_view::npos || colon == 0) {
    return false;
  }
  name = std::string(after.substr(0, colon));
  rest = after.substr(colon + 1);
  return true;
}

std::optional<crypto::EnvelopeHeader> OurEnvelope(std::string_view bytes) {
  auto envelope = crypto::ParseEnvelope(bytes);
  if (!envelope.ok()) {
    return std::nullopt;
  }
  return std::move(envelope->header);
}

Classification ClassifyV2(std::string_view value) {
  std::string provider;
  std::string_view body;
  if (!SplitName(value, kKmsV2Prefix, provider, body)) {
    return Malformed(StorageKind::kKmsV2, "", "no provider name followed by ':' after k8s:enc:kms:v2:");
  }
  kmsplugin::etcd::EncryptedObjectView object;
  if (body.empty()) {
    return Malformed(StorageKind::kKmsV2, provider, "empty EncryptedObject");
  }
  if (!object.ParseFromArray(body.data(), static_cast<int>(body.size()))) {
    return Malformed(StorageKind::kKmsV2, provider,
                     absl::StrCat("EncryptedObject does not parse as protobuf (", body.size(),
                                  " bytes; truncated or corrupt)"));
  }
  if (object.keyid().empty()) {
    return Malformed(StorageKind::kKmsV2, provider, "EncryptedObject has no keyID");
  }
  if (!IsUtf8(object.keyid())) {
    return Malformed(StorageKind::kKmsV2, provider, "EncryptedObject keyID is not valid UTF-8");
  }
  if (object.keyid().size() > kMaxKeyIdSize) {
    return Malformed(StorageKind::kKmsV2, provider,
                     absl::StrCat("EncryptedObject keyID is ", object.keyid().size(), " bytes (limit 1024)"));
  }
  if (object.encrypteddeksource().empty() || object.encrypteddeksource().size() > kMaxDekSourceSize) {
    return Malformed(StorageKind::kKmsV2, provider,
                     absl::StrCat("EncryptedObject encryptedDEKSource is ", object.encrypteddeksource().size(),
                                  " bytes (must be 1..1024)"));
  }
  const int type = static_cast<int>(object.encrypteddeksourcetype());
  if (type != kDekSourceAesGcmKey && type != kDekSourceHkdfSeed) {
    return Malformed(StorageKind::kKmsV2, provider,
                     absl::StrCat("EncryptedObject has unknown encryptedDEKSourceType ", type));
  }
  const size_t min_data = type == kDekSourceHkdfSeed ? kSeedModeMinData : kGcmMinData;
  if (object.encrypteddata().size() < min_data) {
    return Malformed(StorageKind::kKmsV2, provider,
                     absl::StrCat("EncryptedObject encryptedData is ", object.encrypteddata().size(),
                                  " bytes, shorter than the ", min_data, " that ", DekSourceTypeName(type),
                                  " needs"));
  }
  Classification c;
  c.kind = StorageKind::kKmsV2;
  c.provider = std::move(provider);
  c.key_id = object.keyid();
  c.dek_source_type = type;
  c.envelope = OurEnvelope(object.encrypteddeksource());
  return c;
}

Classification ClassifyV1(std::string_view value) {
  std::string provider;
  std::string_view body;
  if (!SplitName(value, kKmsV1Prefix, provider, body)) {
    return Malformed(StorageKind::kKmsV1, "", "no provider name followed by ':' after k8s:enc:kms:v1:");
  }
  if (body.size() < 2) {
    return Malformed(StorageKind::kKmsV1, provider, "no 2-byte DEK length prefix");
  }
  const size_t dek_size = (static_cast<size_t>(static_cast<unsigned char>(body[0])) << 8) |
                          static_cast<unsigned char>(body[1]);
  if (dek_size == 0) {
    return Malformed(StorageKind::kKmsV1, provider, "DEK length prefix is 0");
  }
  if (dek_size > body.size() - 2) {
    return Malformed(StorageKind::kKmsV1, provider,
                     absl::StrCat("DEK length prefix says ", dek_size, " bytes but only ", body.size() - 2,
                                  " follow"));
  }
  const size_t data_size = body.size() - 2 - dek_size;
  if (data_size < kV1MinData) {
    return Malformed(StorageKind::kKmsV1, provider,
                     absl::StrCat("encrypted data after the DEK is ", data_size, " bytes, shorter than ",
                                  kV1MinData));
  }
  Classification c;
  c.kind = StorageKind::kKmsV1;
  c.provider = std::move(provider);
  c.envelope = OurEnvelope(body.substr(2, dek_size));
  return c;
}

Classification ClassifyLocal(std::string_view value, std::string_view prefix, StorageKind kind) {
  std::string name;
  std::string_view body;
  if (!SplitName(value, prefix, name, body)) {
    return Malformed(kind, "", absl::StrCat("no key name followed by ':' after ", Sv(prefix)));
  }
  if (body.empty()) {
    return Malformed(kind, name, "no encrypted data after the key name");
  }
  Classification c;
  c.kind = kind;
  c.provider = std::move(name);
  return c;
}

}  // namespace

std::string_view StorageKindName(StorageKind kind) {
  switch (kind) {
    case StorageKind::kIdentity:
      return "identity";
    case StorageKind::kKmsV2:
      return "kms-v2";
    case StorageKind::kKmsV1:
      return "kms-v1";
    case StorageKind::kAesCbc:
      return "aescbc";
    case StorageKind::kAesGcm:
      return "aesgcm";
    case StorageKind::kSecretbox:
      return "secretbox";
    case StorageKind::kMalformed:
      return "malformed";
  }
  return "unknown";
}

std::string DekSourceTypeName(int type) {
  switch (type) {
    case kDekSourceAesGcmKey:
      return "AES_GCM_KEY";
    case kDekSourceHkdfSeed:
      return "HKDF_SHA256_XNONCE_AES_GCM_SEED";
    default:
      return absl::StrCat("unknown(", type, ")");
  }
}

Classification ClassifyValue(std::string_view value) {
  if (value.substr(0, kEncPrefix.size()) != kEncPrefix) {
    return Classification{};
  }
  if (value.starts_with(kKmsV2Prefix)) {
    return ClassifyV2(value);
  }
  if (value.starts_with(kKmsV1Prefix)) {
    return ClassifyV1(value);
  }
  if (value.starts_with(kAesCbcPrefix)) {
    return ClassifyLocal(value, kAesCbcPrefix, StorageKind::kAesCbc);
  }
  if (value.starts_with(kAesGcmPrefix)) {
    return ClassifyLocal(value, kAesGcmPrefix, StorageKind::kAesGcm);
  }
  if (value.starts_with(kSecretboxPrefix)) {
    return ClassifyLocal(value, kSecretboxPrefix, StorageKind::kSecretbox);
  }
  Classification c;
  c.kind = StorageKind::kMalformed;
  // Shown up to the scheme's version (k8s:enc:<scheme>:<version>:), at most 32 bytes, printable only.
  std::string shown(value.substr(0, 32));
  if (size_t colons = 0; true) {
    for (size_t i = 0; i < shown.size(); ++i) {
      if (shown[i] == ':' && ++colons == 4) {
        shown.resize(i + 1);
        break;
      }
    }
  }
  for (char& ch : shown) {
    if (static_cast<unsigned char>(ch) < 0x20 || static_cast<unsigned char>(ch) > 0x7e) {
      ch = '?';
    }
  }
  c.problem = absl::StrCat("unrecognised encryption prefix \"", shown, "\" (not kms v1/v2, aescbc, aesgcm, secretbox)");
  return c;
}

}  // namespace kmsplugin::audit
