#include "kmsplugin/cli/key_sources.h"

#include "kmsplugin/keysource/local/local_spec.h"
#include "kmsplugin/keysource/pkcs11/pkcs11_spec.h"
#include "kmsplugin/keysource/vault/vault_spec.h"

namespace kmsplugin::cli {

config::KeySourceParsers BuiltInKeySources() {
  return {
      {"local", keysource::local::ParseSpec},
      {"pkcs11", keysource::pkcs11::ParseSpec},
      {"vault", keysource::vault::ParseSpec},
  };
}

}  // namespace kmsplugin::cli
