#include "kmsplugin/audit/object_decryptor.h"

#include "absl/strings/str_cat.h"
#include "crypto/aes_gcm_aead.h"
#include "crypto/envelope_format.h"
#include "crypto/hkdf.h"
#include "crypto/random.h"
#include "encrypted_object.pb.h"
#include "kmsplugin/core/sv.h"

namespace kmsplugin::audit {
namespace {

// kube-apiserver's sizes (aes_extended_nonce.go: infoSizeExtendedNonceGCM = derivedKeySizeExtendedNonceGCM =
// MinSeedSizeExtendedNonceGCM = 32; aes.go: 12-byte GCM nonce, asserted by TestGCMDataStable).
constexpr size_t kInfoSize = 32;
constexpr size_t kDerivedKeySize = 32;
constexpr size_t kMinSeedSize = 32;
constexpr size_t kNonceSize = crypto::AesGcmAead::kNonceSize;
constexpr std::string_view kKmsV2Prefix = "k8s:enc:kms:v2:";
constexpr std::string_view kKmsV1Prefix = "k8s:enc:kms:v1:";

DecryptResult Fails(std::string reason) { return DecryptResult{DecryptVerdict::kFails, std::move(reason)}; }

void AppendField(std::string& out, std::string_view field) { absl::StrAppend(&out, field.size(), ":", Sv(field)); }

// What one cache entry stands for: the same encrypted DEK source sent with the same key_id and annotations
// unwraps to the same bytes or fails the same way.
std::string CacheKey(const KmsValue& value) {
  std::string key(1, value.kind == StorageKind::kKmsV2 ? '2' : '1');
  AppendField(key, value.encrypted_dek_source);
  AppendField(key, value.key_id);
  for (const auto& [name, annotation] : value.annotations) {
    AppendField(key, name);
    AppendField(key, annotation);
  }
  return key;
}

// AES-256-GCM open of nonce(12) ‖ ct ‖ tag under `dek`, with the etcd key as associated data. The plaintext
// stays in SecretBytes and is wiped when the caller drops it.
absl::StatusOr<crypto::SecretBytes> OpenData(const crypto::SecretBytes& dek, std::string_view key,
                                             std::string_view nonce_ct_tag) {
  if (nonce_ct_tag.size() < kNonceSize + crypto::AesGcmAead::kTagSize) {
    return absl::InvalidArgumentError("the encrypted data is shorter than an AES-GCM nonce and tag");
  }
  auto aead = crypto::AesGcmAead::New(dek, crypto::SystemRandom());
  if (!aead.ok()) {
    return aead.status();
  }
  auto opened = (*aead)->Open(nonce_ct_tag.substr(0, kNonceSize), nonce_ct_tag.substr(kNonceSize), key);
  if (!opened.ok()) {
    return absl::InvalidArgumentError(
        "the data does not authenticate under its DEK with this etcd key as associated data (tampered, truncated, "
        "or copied from another etcd key)");
  }
  return opened;
}

}  // namespace

absl::StatusOr<crypto::SecretBytes> OpenEncryptedData(const crypto::SecretBytes& dek_source, int dek_source_type,
                                                      std::string_view etcd_key, std::string_view encrypted_data) {
  if (dek_source_type == kDekSourceHkdfSeed) {
    if (dek_source.size() < kMinSeedSize) {
      return absl::InvalidArgumentError(absl::StrCat("the seed unwraps to ", dek_source.size(),
                                                     " bytes; kube-apiserver needs at least ", kMinSeedSize));
    }
    if (encrypted_data.size() < kInfoSize) {
      return absl::InvalidArgumentError("the encrypted data is shorter than the 32-byte HKDF info");
    }
    auto dek = crypto::HkdfSha256Expand(dek_source.view(), encrypted_data.substr(0, kInfoSize), kDerivedKeySize);
    if (!dek.ok()) {
      return dek.status();
    }
    return OpenData(*dek, etcd_key, encrypted_data.substr(kInfoSize));
  }
  if (dek_source_type != kDekSourceAesGcmKey) {
    return absl::FailedPreconditionError(absl::StrCat("unknown encryptedDEKSourceType ", dek_source_type));
  }
  if (dek_source.size() != crypto::AesGcmAead::kKeySize) {
    if (dek_source.size() != 16 && dek_source.size() != 24) {
      return absl::InvalidArgumentError(
          absl::StrCat("the DEK unwraps to ", dek_source.size(), " bytes, not an AES key size"));
    }
    return absl::FailedPreconditionError(
        absl::StrCat("the DEK unwraps to ", dek_source.size(),
                     " bytes; only 32-byte (AES-256) DEKs, which kube-apiserver makes, are checked"));
  }
  return OpenData(dek_source, etcd_key, encrypted_data);
}

std::string_view DecryptVerdictName(DecryptVerdict verdict) {
  switch (verdict) {
    case DecryptVerdict::kDecrypts:
      return "decrypts";
    case DecryptVerdict::kFails:
      return "fails";
    case DecryptVerdict::kNotCheckable:
      return "not-checkable";
    case DecryptVerdict::kNotEncrypted:
      return "not-encrypted";
  }
  return "?";
}

absl::StatusOr<KmsValue> ParseKmsValue(std::string_view value) {
  // The classifier checks every length and field first; what it accepts is safe to slice below.
  const Classification c = ClassifyValue(value);
  if (c.kind == StorageKind::kMalformed) {
    return absl::InvalidArgumentError(c.problem);
  }
  if (c.kind != StorageKind::kKmsV2 && c.kind != StorageKind::kKmsV1) {
    return absl::FailedPreconditionError(absl::StrCat("not a KMS value (", Sv(StorageKindName(c.kind)), ")"));
  }
  KmsValue out;
  out.kind = c.kind;
  out.provider = c.provider;
  if (c.kind == StorageKind::kKmsV2) {
    std::string_view body = value.substr(kKmsV2Prefix.size() + c.provider.size() + 1);
    kmsplugin::etcd::EncryptedObjectView object;
    if (!object.ParseFromArray(body.data(), static_cast<int>(body.size()))) {
      return absl::InvalidArgumentError("EncryptedObject does not parse as protobuf");
    }
    out.key_id = object.keyid();
    out.dek_source_type = c.dek_source_type;
    out.encrypted_dek_source = object.encrypteddeksource();
    out.encrypted_data = object.encrypteddata();
    for (const auto& entry : object.annotations()) {
      out.annotations[entry.key()] = entry.value();  // a repeated map key: the last one wins, as in Go
    }
    return out;
  }
  std::string_view body = value.substr(kKmsV1Prefix.size() + c.provider.size() + 1);
  const size_t dek_size =
      (static_cast<size_t>(static_cast<unsigned char>(body[0])) << 8) | static_cast<unsigned char>(body[1]);
  out.encrypted_dek_source = std::string(body.substr(2, dek_size));
  out.encrypted_data = std::string(body.substr(2 + dek_size));
  return out;
}

ObjectDecryptor::ObjectDecryptor(const std::map<std::string, std::shared_ptr<core::KeySource>>& sources,
                                 Options options, core::Clock& clock)
    : options_(std::move(options)), clock_(clock) {
  for (const auto& [environment, source] : sources) {
    core::EnvelopeService::Options service_options;
    service_options.environment = environment;
    services_[environment] =
        std::make_unique<core::EnvelopeService>(service_options, source, clock_, crypto::SystemRandom());
  }
  if (options_.cache_entries == 0) {
    options_.cache_entries = 1;
  }
}

ObjectDecryptor::~ObjectDecryptor() = default;

absl::StatusOr<crypto::SecretBytes> ObjectDecryptor::UnwrapUncached(const KmsValue& value) {
  const std::string_view what = value.kind == StorageKind::kKmsV2 ? "encryptedDEKSource" : "the wrapped DEK";
  auto envelope = crypto::ParseEnvelope(value.encrypted_dek_source);
  if (!envelope.ok()) {
    return absl::FailedPreconditionError(absl::StrCat(Sv(what), " is not a kmsplugin ciphertext (",
                                                      envelope.status().message(),
                                                      "): another KMS plugin wrote this object"));
  }
  const crypto::EnvelopeHeader& header = envelope->header;
  auto service = services_.find(header.environment);
  if (service == services_.end()) {
    return absl::FailedPreconditionError(
        absl::StrCat(Sv(what), " was made by environment \"", header.environment,
                     "\", which the config does not have: another environment's (or cluster's) key"));
  }
  if (auto retiring = options_.assume_retired.find({header.environment, header.key_ref});
      retiring != options_.assume_retired.end()) {
    return absl::FailedPreconditionError(absl::StrCat("it is under version ", retiring->second, " of environment \"",
                                                      header.environment, "\", which this retire would retire"));
  }
  ++unwraps_;
  core::DecryptMetadata metadata{value.key_id, value.annotations};
  auto unwrapped =
      service->second->Decrypt(value.encrypted_dek_source, value.kind == StorageKind::kKmsV2 ? &metadata : nullptr,
                               clock_.Now() + options_.timeout);
  if (!unwrapped.ok()) {
    return absl::Status(unwrapped.status().code(),
                        absl::StrCat(Sv(what), " does not unwrap in environment \"", header.environment,
                                     "\": ", unwrapped.status().message()));
  }
  return unwrapped;
}

const ObjectDecryptor::CachedSource& ObjectDecryptor::Unwrap(const KmsValue& value) {
  std::string key = CacheKey(value);
  if (auto it = cache_.find(key); it != cache_.end()) {
    return it->second;
  }
  while (cache_.size() >= options_.cache_entries && !cache_order_.empty()) {
    cache_.erase(cache_order_.front());  // SecretBytes wipe the seed as the entry dies
    cache_order_.pop_front();
  }
  CachedSource entry{UnwrapUncached(value)};
  cache_order_.push_back(key);
  return cache_.emplace(std::move(key), std::move(entry)).first->second;
}

DecryptResult ObjectDecryptor::Check(std::string_view key, std::string_view value) {
  absl::StatusOr<KmsValue> parsed = ParseKmsValue(value);
  if (!parsed.ok()) {
    if (absl::IsInvalidArgument(parsed.status())) {
      return Fails(absl::StrCat("malformed: ", parsed.status().message()));
    }
    const StorageKind kind = ClassifyValue(value).kind;
    if (kind == StorageKind::kIdentity) {
      return DecryptResult{DecryptVerdict::kNotEncrypted, "not encrypted"};
    }
    return DecryptResult{DecryptVerdict::kNotCheckable,
                         absl::StrCat(Sv(StorageKindName(kind)),
                                      ": its key is in kube-apiserver's EncryptionConfiguration, not a KMS; not "
                                      "checkable without it")};
  }
  const CachedSource& source = Unwrap(*parsed);
  if (!source.unwrapped.ok()) {
    return Fails(std::string(source.unwrapped.status().message()));
  }
  const absl::StatusOr<crypto::SecretBytes> plaintext = OpenEncryptedData(
      *source.unwrapped, parsed->kind == StorageKind::kKmsV2 ? parsed->dek_source_type : kDekSourceAesGcmKey, key,
      parsed->encrypted_data);
  if (absl::IsFailedPrecondition(plaintext.status())) {
    return DecryptResult{DecryptVerdict::kNotCheckable, std::string(plaintext.status().message())};
  }
  if (!plaintext.ok()) {
    std::string reason(plaintext.status().message());
    if (parsed->kind == StorageKind::kKmsV1) {
      absl::StrAppend(&reason, "; if written before Kubernetes 1.25 it may be AES-CBC, which is not checked");
    }
    return Fails(std::move(reason));
  }
  return DecryptResult{DecryptVerdict::kDecrypts, ""};
}

}  // namespace kmsplugin::audit
