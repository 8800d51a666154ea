// Fuzz target: the audit's etcd value classifier (audit/value_classifier.h), which reads whatever etcd holds:
// k8s:enc:kms:v2 EncryptedObject protobufs, k8s:enc:kms:v1 length-prefixed DEKs, the aescbc/aesgcm/secretbox
// prefixes, and this plugin's envelope header inside either KMS form.
// Properties: never crashes; a malformed value says why; only kMalformed carries a problem; a value outside the
// k8s:enc: namespace is identity.

#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "kmsplugin/audit/value_classifier.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace kmsplugin::audit;
  const std::string_view value(reinterpret_cast<const char*>(data), size);
  const Classification c = ClassifyValue(value);
  if ((c.kind == StorageKind::kMalformed) == c.problem.empty()) {
    std::abort();
  }
  if (value.substr(0, 8) != "k8s:enc:" && c.kind != StorageKind::kIdentity) {
    std::abort();
  }
  if (c.envelope.has_value() && c.kind != StorageKind::kKmsV2 && c.kind != StorageKind::kKmsV1) {
    std::abort();
  }
  (void)StorageKindName(c.kind);
  (void)DekSourceTypeName(c.dek_source_type);
  return 0;
}
