#include "kmsplugin/core/envelope_service.h"

#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "crypto/envelope_format.h"

namespace kmsplugin::core {
namespace {

constexpr char kFormatAnnotationValue[] = "1";
constexpr size_t kProbeSize = 32;

absl::Status CheckDeadline(absl::Time now, absl::Time deadline) {
  if (now >= deadline) {
    return absl::DeadlineExceededError("the request's deadline passed before the key source was called");
  }
  return absl::OkStatus();
}

absl::Status CheckAnnotations(const Annotations& annotations) {
  const auto format = annotations.find(kFormatAnnotationKey);
  if (format == annotations.end()) {
    return absl::InvalidArgumentError(absl::StrCat("annotation ", kFormatAnnotationKey,
                                                   " is missing; send back the annotations Encrypt returned"));
  }
  if (format->second != kFormatAnnotationValue) {
    return absl::InvalidArgumentError(absl::StrCat("annotation ", kFormatAnnotationKey, " is \"",
                                                   absl::CHexEscape(format->second.substr(0, 16)),
                                                   "\"; this plugin writes \"", kFormatAnnotationValue, "\""));
  }
  for (const auto& [key, value] : annotations) {
    if (key != std::string_view(kFormatAnnotationKey)) {
      return absl::InvalidArgumentError(absl::StrCat("unexpected annotation \"", absl::CHexEscape(key.substr(0, 64)),
                                                     "\"; Encrypt returns only ", kFormatAnnotationKey));
    }
  }
  return absl::OkStatus();
}

}  // namespace

EnvelopeService::EnvelopeService(Options options, std::shared_ptr<KeySource> key_source, Clock& clock,
                                 crypto::Random& random)
    : options_(std::move(options)), key_source_(std::move(key_source)), clock_(clock), random_(random) {}

absl::StatusOr<EncryptResult> EnvelopeService::Encrypt(std::string_view plaintext, absl::Time deadline) {
  if (plaintext.empty()) {
    return absl::InvalidArgumentError("plaintext is empty; kube-apiserver sends a 32-byte seed or key");
  }
  if (plaintext.size() > kMaxPlaintextSize) {
    return absl::InvalidArgumentError(absl::StrCat("plaintext is ", plaintext.size(), " bytes; at most ",
                                                   kMaxPlaintextSize, " are accepted (kube-apiserver sends 32)"));
  }
  if (auto status = CheckDeadline(clock_.Now(), deadline); !status.ok()) {
    return status;
  }
  // Pin the version once: the key_id returned below is the one Status reports at this instant.
  absl::StatusOr<KeyVersion> current = key_source_->Current();
  if (!current.ok()) {
    return current.status();
  }
  return EncryptUnder(*current, plaintext, deadline);
}

absl::StatusOr<EncryptResult> EnvelopeService::EncryptUnder(const KeyVersion& version, std::string_view plaintext,
                                                            absl::Time deadline) {
  crypto::Envelope envelope;
  envelope.header.kind = key_source_->Kind();
  envelope.header.environment = options_.environment;
  envelope.header.key_ref = version.key_ref;
  if (auto status = crypto::ValidateEnvelopeHeader(envelope.header); !status.ok()) {
    return absl::InternalError(absl::StrCat("key source produced an invalid key reference: ", status.message()));
  }
  absl::StatusOr<std::string> wrapped =
      key_source_->Wrap(version, plaintext, crypto::EnvelopeAssociatedData(envelope.header), deadline);
  if (!wrapped.ok()) {
    return wrapped.status();
  }
  envelope.wrapped = std::move(*wrapped);
  absl::StatusOr<std::string> ciphertext = crypto::EncodeEnvelope(envelope);
  if (!ciphertext.ok()) {
    return absl::InternalError(absl::StrCat("cannot encode the ciphertext: ", ciphertext.status().message()));
  }
  EncryptResult result;
  result.ciphertext = std::move(*ciphertext);
  result.key_id = version.key_id;
  result.annotations.emplace(kFormatAnnotationKey, kFormatAnnotationValue);
  return result;
}

absl::StatusOr<crypto::SecretBytes> EnvelopeService::Decrypt(std::string_view ciphertext,
                                                             const DecryptMetadata* metadata, absl::Time deadline) {
  if (ciphertext.empty()) {
    return absl::InvalidArgumentError("ciphertext is empty");
  }
  absl::StatusOr<crypto::Envelope> envelope = crypto::ParseEnvelope(ciphertext);
  if (!envelope.ok()) {
    return envelope.status();
  }
  const crypto::EnvelopeHeader& header = envelope->header;
  if (header.environment != options_.environment) {
    return absl::FailedPreconditionError(absl::StrCat("ciphertext belongs to environment \"", header.environment,
                                                      "\"; this socket serves environment \"",
                                                      options_.environment, "\""));
  }
  if (header.kind != key_source_->Kind()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "ciphertext was made by a ", crypto::KeySourceKindName(header.kind), " key source; environment \"",
        options_.environment, "\" uses a ", crypto::KeySourceKindName(key_source_->Kind()), " key source"));
  }
  if (metadata != nullptr) {
    if (auto status = CheckAnnotations(metadata->annotations); !status.ok()) {
      return status;
    }
    if (metadata->key_id.empty()) {
      return absl::InvalidArgumentError("key_id is empty; send the key_id Encrypt returned");
    }
  }
  absl::StatusOr<KeyVersion> version = key_source_->Lookup(header.key_ref);
  if (!version.ok()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "ciphertext names key version ", absl::BytesToHexString(header.key_ref), ", which environment \"",
        options_.environment, "\" does not have: ", version.status().message()));
  }
  if (metadata != nullptr && metadata->key_id != version->key_id) {
    return absl::InvalidArgumentError(absl::StrCat("key_id \"", absl::CHexEscape(metadata->key_id.substr(0, 128)),
                                                   "\" is not the key_id of the key version the ciphertext names (\"",
                                                   version->key_id, "\")"));
  }
  if (version->state == KeyState::kRetired) {
    return absl::FailedPreconditionError(absl::StrCat("key version ", version->version, " (", version->key_id,
                                                      ") is retired and no longer decrypts"));
  }
  if (auto status = CheckDeadline(clock_.Now(), deadline); !status.ok()) {
    return status;
  }
  return key_source_->Unwrap(header.key_ref, envelope->wrapped, crypto::EnvelopeAssociatedData(header), deadline);
}

StatusResult EnvelopeService::Status() const {
  StatusResult result;
  result.version = options_.status_version;
  absl::StatusOr<KeyVersion> current = key_source_->Current();
  const Health health = CurrentHealth();
  if (!current.ok()) {
    // key_id must never be empty; this placeholder names the environment and is never reused for a real key.
    result.key_id = absl::StrCat("kmsplugin:", options_.environment, ":no-current-key");
    result.healthz = absl::StrCat("no current key version: ", current.status().message());
    return result;
  }
  result.key_id = current->key_id;
  if (!health.ok) {
    result.healthz = health.message;
  } else if (clock_.Now() - health.checked > options_.health_max_age) {
    result.healthz = absl::StrCat("last successful health probe is older than ",
                                  absl::FormatDuration(options_.health_max_age));
  } else {
    result.healthz = "ok";
  }
  return result;
}

Health EnvelopeService::Probe(absl::Time deadline) {
  Health health;
  health.checked = clock_.Now();
  absl::StatusOr<KeyVersion> current = key_source_->Current();
  if (!current.ok()) {
    health.message = absl::StrCat("no current key version: ", current.status().message());
    Record(health);
    return health;
  }
  const crypto::SecretBytes probe = random_.NewSecret(kProbeSize);
  absl::StatusOr<EncryptResult> encrypted = EncryptUnder(*current, probe.view(), deadline);
  if (!encrypted.ok()) {
    health.message = absl::StrCat("probe wrap failed: ", encrypted.status().message());
    Record(health);
    return health;
  }
  const DecryptMetadata metadata{encrypted->key_id, encrypted->annotations};
  absl::StatusOr<crypto::SecretBytes> decrypted = Decrypt(encrypted->ciphertext, &metadata, deadline);
  if (!decrypted.ok()) {
    health.message = absl::StrCat("probe unwrap failed: ", decrypted.status().message());
  } else if (!decrypted->Equals(probe)) {
    health.message = "probe unwrap returned different bytes than were wrapped";
  } else {
    health.ok = true;
    health.message = "ok";
  }
  Record(health);
  return health;
}

Health EnvelopeService::CurrentHealth() const {
  absl::MutexLock lock(&mu_);
  return health_;
}

void EnvelopeService::Record(Health health) {
  absl::MutexLock lock(&mu_);
  health_ = std::move(health);
}

}  // namespace kmsplugin::core
