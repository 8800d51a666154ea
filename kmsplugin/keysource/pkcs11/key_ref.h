#pragma once

// The key_ref of a PKCS#11 key version, stored as the object's CKA_ID and carried by every ciphertext:
//   0x01 || version (8 bytes, big-endian) || creation time in unix microseconds (8 bytes, big-endian, two's
//   complement)
// 17 bytes, no secret. The object's CKA_LABEL is "<key_label>-v<N>" with the same N. Pure functions.

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace kmsplugin::keysource::pkcs11 {

inline constexpr size_t kKeyRefSize = 17;

// The key_ref (CKA_ID) of version `version` created at `created`.
std::string EncodeKeyRef(uint64_t version, absl::Time created);

struct DecodedKeyRef {
  uint64_t version = 0;
  absl::Time created;
};
// INVALID_ARGUMENT when `key_ref` is not in the layout above (or names version 0).
absl::StatusOr<DecodedKeyRef> DecodeKeyRef(std::string_view key_ref);

// N of "<prefix>-v<N>" (no leading zero, at most 19 digits); 0 when `label` is not one of ours.
uint64_t VersionFromLabel(std::string_view label, std::string_view prefix);

}  // namespace kmsplugin::keysource::pkcs11
