#include "kmsplugin/keysource/pkcs11/key_ref.h"

#include <algorithm>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace kmsplugin::keysource::pkcs11 {

std::string EncodeKeyRef(uint64_t version, absl::Time created) {
  std::string out(kKeyRefSize, '\0');
  out[0] = 0x01;
  const uint64_t micros = static_cast<uint64_t>(absl::ToUnixMicros(created));
  for (int i = 0; i < 8; ++i) {
    out[1 + i] = static_cast<char>((version >> (56 - 8 * i)) & 0xff);
    out[9 + i] = static_cast<char>((micros >> (56 - 8 * i)) & 0xff);
  }
  return out;
}

absl::StatusOr<DecodedKeyRef> DecodeKeyRef(std::string_view key_ref) {
  if (key_ref.size() != kKeyRefSize || static_cast<uint8_t>(key_ref[0]) != 0x01) {
    return absl::InvalidArgumentError(
        absl::StrCat("pkcs11 key reference of ", key_ref.size(), " bytes is not in the expected 17-byte format 0x01"));
  }
  uint64_t version = 0;
  uint64_t micros = 0;
  for (int i = 0; i < 8; ++i) {
    version = (version << 8) | static_cast<uint8_t>(key_ref[1 + i]);
    micros = (micros << 8) | static_cast<uint8_t>(key_ref[9 + i]);
  }
  if (version == 0) {
    return absl::InvalidArgumentError("pkcs11 key reference names version 0");
  }
  return DecodedKeyRef{version, absl::FromUnixMicros(static_cast<int64_t>(micros))};
}

uint64_t VersionFromLabel(std::string_view label, std::string_view prefix) {
  if (label.size() <= prefix.size() + 2 || label.substr(0, prefix.size()) != prefix ||
      label.substr(prefix.size(), 2) != "-v") {
    return 0;
  }
  std::string_view digits = label.substr(prefix.size() + 2);
  if (digits.empty() || digits.size() > 19 || digits[0] == '0' ||
      !std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; })) {
    return 0;
  }
  uint64_t version = 0;
  return absl::SimpleAtoi(absl::string_view(digits.data(), digits.size()), &version) ? version : 0;
}

}  // namespace kmsplugin::keysource::pkcs11
