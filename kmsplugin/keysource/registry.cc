#include "kmsplugin/keysource/registry.h"

#include "crypto/random.h"
#include "kmsplugin/core/clock.h"
#include "kmsplugin/keysource/local/local_spec.h"
#include "kmsplugin/keysource/pkcs11/pkcs11_spec.h"
#include "kmsplugin/keysource/vault/vault_spec.h"

namespace kmsplugin::keysource {

const std::vector<KeySourceKindInfo>& KeySourceKinds() {
  static const auto* kinds = new std::vector<KeySourceKindInfo>{
      {"local", crypto::KeySourceKind::kLocal, local::ParseSpec, "local keyring", ""},
      {"pkcs11", crypto::KeySourceKind::kPkcs11, pkcs11::ParseSpec, "PKCS#11 token",
       "uses a PKCS#11 module: a device-node HSM needs PrivateDevices=no and DeviceAllow=; a module keeping token "
       "state on disk (SoftHSM2) needs ReadWritePaths= for it"},
      {"vault", crypto::KeySourceKind::kVault, vault::ParseSpec, "Vault Transit", ""},
  };
  return *kinds;
}

const KeySourceKindInfo* FindKeySourceKind(std::string_view name) {
  for (const KeySourceKindInfo& info : KeySourceKinds()) {
    if (info.name == name) {
      return &info;
    }
  }
  return nullptr;
}

config::KeySourceParsers KeySourceParsers() {
  config::KeySourceParsers parsers;
  for (const KeySourceKindInfo& info : KeySourceKinds()) {
    parsers.emplace(std::string(info.name), info.parser);
  }
  return parsers;
}

config::OpenContext SystemOpenContext(const std::string& environment, int worker_threads, core::EventSink* events) {
  config::OpenContext context;
  context.environment = environment;
  context.worker_threads = worker_threads;
  context.clock = &core::SystemClock();
  context.random = &crypto::SystemRandom();
  if (events != nullptr) {
    context.events = events;
  }
  return context;
}

}  // namespace kmsplugin::keysource
