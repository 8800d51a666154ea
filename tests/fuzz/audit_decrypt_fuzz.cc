// Fuzz target: the audit's decrypt path for what etcd holds (audit/object_decryptor.h): ParseKmsValue over the
// raw etcd value, then OpenEncryptedData over the value's data half under a fixed DEK source, for both DEK source
// types kube-apiserver writes (an HKDF seed, a plain AES-GCM key) and for whatever type the value names.
// Properties: never crashes or reads past the value; a parsed value is KMS v1 or v2 and its parts are copies of
// bytes of the value; a fixed key never authenticates fuzzer-made data, so OpenEncryptedData must refuse it
// (the 2^-128 chance of a forged GCM tag is not a finding).

#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "crypto/secret_bytes.h"
#include "kmsplugin/audit/object_decryptor.h"
#include "kmsplugin/audit/value_classifier.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace kmsplugin::audit;
  const std::string_view value(reinterpret_cast<const char*>(data), size);
  auto parsed = ParseKmsValue(value);
  if (!parsed.ok()) {
    if (parsed.status().message().empty()) {
      std::abort();  // every refusal names its problem
    }
    return 0;
  }
  if (parsed->kind != StorageKind::kKmsV2 && parsed->kind != StorageKind::kKmsV1) {
    std::abort();
  }
  if (parsed->encrypted_data.size() > size || parsed->encrypted_dek_source.size() > size) {
    std::abort();
  }
  static const kmsplugin::crypto::SecretBytes* const kFixed = [] {
    auto* key = new kmsplugin::crypto::SecretBytes(32);
    for (size_t i = 0; i < key->size(); ++i) {
      key->data()[i] = static_cast<uint8_t>(i * 7 + 1);
    }
    return key;
  }();
  for (int type : {kDekSourceHkdfSeed, kDekSourceAesGcmKey, parsed->dek_source_type}) {
    if (OpenEncryptedData(*kFixed, type, "/registry/secrets/default/fuzz", parsed->encrypted_data).ok()) {
      std::abort();
    }
  }
  return 0;
}
