#pragma once

// `keySource.pkcs11.uri`: an RFC 7512 PKCS#11 URI, the convention every other PKCS#11 tool (p11tool, pkcs11-tool,
// OpenSSL's pkcs11 provider, GnuTLS) uses, parsed with p11-kit's own URI parser. What kmsplugin takes from it:
//   token=LABEL or serial=SERIAL   which token (never a slot: slot numbers are not stable)
//   object=PREFIX                  the label prefix of the key versions (<PREFIX>-v1, -v2, ...)
//   module-path=/abs/path.so       the module (query attribute), instead of `module:`
//   pin-source=file:/abs/path      the PIN file (query attribute), instead of `pinFile:`
// Refused, each with the reason: pin-value (a PIN in the config), id= (one object, where each key version is its
// own object), type= other than secret-key, slot and library attributes, module-name (needs p11-kit's module
// registry, which the trust checks on the module file do not cover), and anything p11-kit does not recognise.
// This header does not include Cryptoki (see cryptoki.h).

#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "kmsplugin/config/field_context.h"

namespace kmsplugin::keysource::pkcs11 {

struct Pkcs11UriFields {
  std::optional<std::string> module_path;
  std::optional<std::string> token_label;
  std::optional<std::string> token_serial;
  std::optional<std::string> object_label;
  std::optional<std::string> pin_file;
};

// Parses `uri`; errors name `context` (the uri field), what is wrong and the fix.
absl::StatusOr<Pkcs11UriFields> ParsePkcs11Uri(const std::string& uri, const config::FieldContext& context);

}  // namespace kmsplugin::keysource::pkcs11
