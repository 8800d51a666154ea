#pragma once

// ClassifyValue: what kube-apiserver's storage transformer stored in one etcd value, read from its prefix
// (kms-protocol.md §3). Nothing is decrypted; only public parts are read:
//
//   k8s:enc:kms:v2:<provider>:<EncryptedObject protobuf>       key_id, DEK source type, and, when the
//                                                              encryptedDEKSource is this plugin's ciphertext,
//                                                              its environment and key_ref
//   k8s:enc:kms:v1:<provider>:<uint16 BE n><n bytes DEK><data>  when the DEK ciphertext is this plugin's:
//                                                              environment and key_ref
//   k8s:enc:aescbc:v1:<key name>:...   k8s:enc:aesgcm:v1:<key name>:...   k8s:enc:secretbox:v1:<key name>:...
//   anything else                                              identity (not encrypted)
//
// A value with a known prefix whose body does not parse, or an unrecognised "k8s:enc:" prefix, is kMalformed
// with `problem` naming what is wrong. Safe on any input (the parsers check every length before slicing).

#include <optional>
#include <string>
#include <string_view>

#include "crypto/envelope_format.h"

namespace kmsplugin::audit {

enum class StorageKind {
  kIdentity,   // not encrypted
  kKmsV2,
  kKmsV1,
  kAesCbc,
  kAesGcm,
  kSecretbox,
  kMalformed,  // a known prefix with a body that does not parse; or an unknown k8s:enc: prefix
};

// "identity", "kms-v2", "kms-v1", "aescbc", "aesgcm", "secretbox", "malformed".
std::string_view StorageKindName(StorageKind kind);

// EncryptedObject.encryptedDEKSourceType values.
inline constexpr int kDekSourceAesGcmKey = 0;
inline constexpr int kDekSourceHkdfSeed = 1;
std::string DekSourceTypeName(int type);

struct Classification {
  StorageKind kind = StorageKind::kIdentity;
  std::string provider;    // KMS provider name, or the aescbc/aesgcm/secretbox key name
  std::string key_id;      // kKmsV2: EncryptedObject.keyID (v1 values carry none)
  int dek_source_type = -1;  // kKmsV2 only
  // The DEK ciphertext's header, when it is this plugin's envelope format (v1 and v2).
  std::optional<crypto::EnvelopeHeader> envelope;
  std::string problem;     // kMalformed: what is wrong, never secret bytes
};

Classification ClassifyValue(std::string_view value);

}  // namespace kmsplugin::audit
