// libFuzzer target for the ciphertext parser, which reads untrusted bytes from etcd and kube-apiserver.
// Properties: never crashes or reads out of bounds (ASan/UBSan); rejects only with INVALID_ARGUMENT; whatever
// parses re-encodes to exactly the input (one encoding per value) and yields a header that validates.
//
//   Build and run: see tests/crypto/CMakeLists.txt.

#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "crypto/envelope_format.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace kmsplugin::crypto;
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<Envelope> parsed = ParseEnvelope(bytes);
  if (!parsed.ok()) {
    if (parsed.status().code() != absl::StatusCode::kInvalidArgument || parsed.status().message().empty()) {
      std::abort();
    }
    return 0;
  }
  if (!ValidateEnvelopeHeader(parsed->header).ok()) {
    std::abort();
  }
  absl::StatusOr<std::string> encoded = EncodeEnvelope(*parsed);
  if (!encoded.ok() || *encoded != bytes) {
    std::abort();
  }
  (void)EnvelopeAssociatedData(parsed->header);
  return 0;
}
