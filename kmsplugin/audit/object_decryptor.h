#pragma once

// ObjectDecryptor: proof that an etcd value decrypts, done exactly as kube-apiserver reads it back
// (kms-protocol.md §3; Kubernetes staging/src/k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2 and
// .../encrypt/aes/aes_extended_nonce.go):
//
//   KMS v2, HKDF_SHA256_XNONCE_AES_GCM_SEED: seed = plugin Decrypt(encryptedDEKSource, keyID, annotations);
//       encryptedData = info(32) ‖ nonce(12) ‖ ct ‖ tag(16); DEK = HKDF-SHA256-Expand(PRK = seed, info, 32)
//       (expand only: no extract step, no salt); plaintext = AES-256-GCM-Open(DEK, nonce, ct ‖ tag,
//       AAD = the etcd key).
//   KMS v2, AES_GCM_KEY: DEK = plugin Decrypt(encryptedDEKSource, ...); encryptedData = nonce(12) ‖ ct ‖ tag(16).
//   KMS v1: k8s:enc:kms:v1:<name>:<uint16 BE n><n bytes wrapped DEK><nonce(12) ‖ ct ‖ tag(16)>, AAD = etcd key;
//       the DEK through v1beta1 Decrypt (no key_id, no annotations).
//   aescbc/aesgcm/secretbox: keys sit in the apiserver's own EncryptionConfiguration: not checkable here.
//
// The plugin side is this kmsplugin's own EnvelopeService (core/envelope_service.h) over the environment's key
// source, opened read-only from the config, so the checks are the ones a serving plugin makes: the ciphertext's
// environment, the key_id and annotations it was returned with, retired versions. An unwrapped seed or DEK is
// kept, per distinct encrypted DEK source, in a bounded cache of SecretBytes (kube-apiserver reuses one seed for
// many objects, so one unwrap serves them all); derived DEKs and plaintexts live in SecretBytes only for the
// one object and are wiped when it is done. Nothing secret reaches a reason string.
//
// Not thread-safe (one scan at a time).

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "crypto/secret_bytes.h"
#include "kmsplugin/audit/value_classifier.h"
#include "kmsplugin/core/clock.h"
#include "kmsplugin/core/envelope_service.h"
#include "kmsplugin/core/key_source.h"

namespace kmsplugin::audit {

// The public parts of a KMS value that decryption needs. Every field is a copy of bytes from the value (none is
// secret). Byte-oriented so it can be fuzzed: ParseKmsValue takes the raw etcd value and never reads past it.
struct KmsValue {
  StorageKind kind = StorageKind::kIdentity;  // kKmsV2 or kKmsV1 when ok
  std::string provider;
  std::string key_id;                // v2 only
  int dek_source_type = -1;          // v2 only
  std::string encrypted_dek_source;  // v2: encryptedDEKSource; v1: the wrapped DEK
  core::Annotations annotations;     // v2 only
  std::string encrypted_data;        // v2: encryptedData; v1: what follows the wrapped DEK
};

// INVALID_ARGUMENT naming the problem (the classifier's words) for a malformed KMS value; FAILED_PRECONDITION for
// a value that is not KMS (identity, aescbc, aesgcm, secretbox).
absl::StatusOr<KmsValue> ParseKmsValue(std::string_view value);

// The data half of a read, given the unwrapped DEK source (the seed, or the DEK itself): `dek_source_type` is
// kDekSourceHkdfSeed or kDekSourceAesGcmKey (KMS v1 data is read as kDekSourceAesGcmKey). The plaintext, in
// SecretBytes. INVALID_ARGUMENT when the data does not authenticate under the derived DEK with `etcd_key` as
// associated data, is too short, or the seed or DEK has a size kube-apiserver could not use either;
// FAILED_PRECONDITION for a 16- or 24-byte DEK (kube-apiserver makes 32; Go would also take 16 or 24, which
// crypto/ has no AES-128/192 for: not checkable here).
// Byte-oriented, for fixed vectors and fuzzing.
absl::StatusOr<crypto::SecretBytes> OpenEncryptedData(const crypto::SecretBytes& dek_source, int dek_source_type,
                                                      std::string_view etcd_key, std::string_view encrypted_data);

enum class DecryptVerdict {
  kDecrypts,      // authenticated and decrypted
  kFails,         // does not decrypt: `reason` says why
  kNotCheckable,  // aescbc/aesgcm/secretbox, or a DEK size this audit does not handle: `reason` says why
  kNotEncrypted,  // identity
};
std::string_view DecryptVerdictName(DecryptVerdict verdict);

struct DecryptResult {
  DecryptVerdict verdict = DecryptVerdict::kFails;
  std::string reason;  // empty for kDecrypts; never holds secret bytes
};

class ObjectDecryptor {
 public:
  struct Options {
    // Distinct unwrapped DEK sources kept (FIFO). kube-apiserver makes one seed per start and key_id change.
    size_t cache_entries = 256;
    // Deadline of each key source unwrap.
    absl::Duration timeout = absl::Seconds(10);
    // (environment, key_ref) pairs to treat as retired although they are not yet: `retire --verify` proves that
    // nothing needs the versions it is about to retire. `reason` names the version.
    std::map<std::pair<std::string, std::string>, uint64_t> assume_retired;
  };

  // `sources`: environment name -> its opened key source (KeyCatalog's OpenKeySources). The clock must outlive.
  ObjectDecryptor(const std::map<std::string, std::shared_ptr<core::KeySource>>& sources, Options options,
                  core::Clock& clock);
  ~ObjectDecryptor();

  // `key` is the full etcd key (it is the AES-GCM associated data), `value` the stored bytes.
  DecryptResult Check(std::string_view key, std::string_view value);

  // Key source unwraps made so far (each distinct DEK source once while it stays cached).
  uint64_t unwraps() const { return unwraps_; }

 private:
  struct CachedSource {
    absl::StatusOr<crypto::SecretBytes> unwrapped;  // the seed or DEK, or why it does not unwrap
  };
  const CachedSource& Unwrap(const KmsValue& value);
  absl::StatusOr<crypto::SecretBytes> UnwrapUncached(const KmsValue& value);

  Options options_;
  core::Clock& clock_;
  std::map<std::string, std::unique_ptr<core::EnvelopeService>> services_;
  std::unordered_map<std::string, CachedSource> cache_;
  std::deque<std::string> cache_order_;
  uint64_t unwraps_ = 0;
};

}  // namespace kmsplugin::audit
