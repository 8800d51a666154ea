// Fuzz target: the local keyring file (keysource/local/keyring.h): the JSON parser, the passphrase parameters
// (ReadRootKeyParams, read before any key is derived) and the unseal path (OpenKeyring: root-key check, MAC,
// each sealed KEK) under a fixed root key. The seeds are keyrings sealed under that key, so mutations reach past
// the MAC only where the fuzzer keeps it intact; the JSON and field checks before it are all reached.
// Properties: never crashes, throws or leaks; refuses with a status whose message never holds key bytes; a
// keyring that opens has exactly one current version and re-seals and re-opens to the same versions.

#include <cstdint>
#include <cstdlib>
#include <string>

#include "crypto/secret_bytes.h"
#include "kmsplugin/keysource/local/keyring.h"
#include "tests/support/fake_random.h"

namespace {

using kmsplugin::crypto::SecretBytes;
using namespace kmsplugin::keysource::local;

// The root key every seed is sealed under (tests/fuzz/corpus/keyring_fuzz/README names it): 32 bytes of 0x4b.
const SecretBytes& RootKey() {
  static const SecretBytes* key = new SecretBytes(SecretBytes::CopyOf(std::string(kRootKeySize, '\x4b')));
  return *key;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<RootKeyParams> params = ReadRootKeyParams(bytes, "fuzz.keyring");
  if (params.ok() && params->kind == RootKeyParams::Kind::kPassphrase &&
      (params->ops_limit > kMaxArgon2OpsLimit || params->mem_limit > kMaxArgon2MemLimit)) {
    std::abort();  // the caps must hold before anything derives a key
  }
  absl::StatusOr<Keyring> keyring = OpenKeyring(bytes, RootKey(), "fuzz.keyring");
  if (!keyring.ok()) {
    if (keyring.status().message().empty()) {
      std::abort();
    }
    return 0;
  }
  if (keyring->Current() == nullptr) {
    std::abort();
  }
  kmsplugin::testing::FakeRandom random("keyring fuzz");
  absl::StatusOr<std::string> resealed = SealKeyring(*keyring, RootKey(), random);
  if (!resealed.ok()) {
    std::abort();
  }
  absl::StatusOr<Keyring> reopened = OpenKeyring(*resealed, RootKey(), "resealed.keyring");
  if (!reopened.ok() || reopened->versions.size() != keyring->versions.size()) {
    std::abort();
  }
  for (size_t i = 0; i < keyring->versions.size(); ++i) {
    if (reopened->versions[i].info.key_id != keyring->versions[i].info.key_id ||
        !reopened->versions[i].kek.Equals(keyring->versions[i].kek)) {
      std::abort();
    }
  }
  return 0;
}
