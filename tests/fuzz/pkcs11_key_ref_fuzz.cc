// Fuzz target: the PKCS#11 key_ref (pkcs11/key_ref.h), carried by every ciphertext (so read from etcd) and stored
// as CKA_ID on the token, and the version number in a token object's CKA_LABEL.
// Properties: never crashes; a key_ref that decodes re-encodes to the same 17 bytes; a label's version round-trips.

#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "kmsplugin/keysource/pkcs11/key_ref.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace kmsplugin::keysource::pkcs11;
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<DecodedKeyRef> decoded = DecodeKeyRef(bytes);
  if (decoded.ok()) {
    if (decoded->version == 0 || EncodeKeyRef(decoded->version, decoded->created) != bytes) {
      std::abort();
    }
  } else if (decoded.status().code() != absl::StatusCode::kInvalidArgument) {
    std::abort();
  }
  // The same bytes as a CKA_LABEL, against a prefix taken from its own start (up to the last '-').
  const size_t dash = bytes.rfind('-');
  const std::string_view prefix = dash == std::string_view::npos ? std::string_view("kek") : bytes.substr(0, dash);
  const uint64_t version = VersionFromLabel(bytes, prefix);
  if (version != 0 && std::string(prefix) + "-v" + std::to_string(version) != bytes) {
    std::abort();
  }
  return 0;
}
