// Fuzz target: keySource.pkcs11.uri, an RFC 7512 URI parsed by p11-kit plus kmsplugin's checks on what it names
// (pkcs11/pkcs11_uri.h). Properties: never crashes; refuses only with INVALID_ARGUMENT and a message naming the
// field; never accepts a pin-value.

#include <cstdint>
#include <cstdlib>
#include <string>

#include "kmsplugin/config/field_context.h"
#include "kmsplugin/keysource/pkcs11/pkcs11_uri.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace kmsplugin;
  const std::string uri(reinterpret_cast<const char*>(data), size);
  const config::FieldContext context("config.yaml", "environments[0].keySource.pkcs11.uri");
  absl::StatusOr<keysource::pkcs11::Pkcs11UriFields> fields = keysource::pkcs11::ParsePkcs11Uri(uri, context);
  if (!fields.ok()) {
    if (fields.status().code() != absl::StatusCode::kInvalidArgument ||
        fields.status().message().find("uri") == std::string::npos) {
      std::abort();
    }
  }
  return 0;
}
