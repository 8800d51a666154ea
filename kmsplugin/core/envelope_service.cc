#include "kmsplugin/core/envelope_service.h"

#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "crypto/envelope_format.h"
#include "kmsplugin/core/version_rules.h"

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
    : options_(std::move(options)), clock_(clock), random_(random), key_source_(std::move(key_source)) {}

std::shared_ptr<KeySource> EnvelopeService::key_source() const {
  absl::ReaderMutexLock lock(&source_mu_);
  return key_source_;
}

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
  // One source for the whole call, even if a reload swaps it meanwhile.
  const std::shared_ptr<KeySource> source = key_source();
  // Pin the version once: the key_id returned below is the one Status reports at this instant.
  absl::StatusOr<KeyVersion> current = source->Current();
  if (!current.ok()) {
    return current.status();
  }
  return EncryptUnder(*source, *current, plaintext, deadline);
}

absl::StatusOr<EncryptResult> EnvelopeService::EncryptUnder(KeySource& source, const KeyVersion& version,
                                                            std::string_view plaintext, absl::Time deadline) {
  crypto::Envelope envelope;
  envelope.header.kind = source.Kind();
  envelope.header.environment = options_.environment;
  envelope.header.key_ref = version.key_ref;
  if (auto status = crypto::ValidateEnvelopeHeader(envelope.header); !status.ok()) {
    return absl::InternalError(absl::StrCat("key source produced an invalid key reference: ", status.message()));
  }
  absl::StatusOr<std::string> wrapped =
      source.Wrap(version, plaintext, crypto::EnvelopeAssociatedData(envelope.header), deadline);
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
  const std::shared_ptr<KeySource> source = key_source();
  return DecryptWith(*source, ciphertext, metadata, deadline);
}

absl::StatusOr<crypto::SecretBytes> EnvelopeService::DecryptWith(KeySource& source, std::string_view ciphertext,
                                                                 const DecryptMetadata* metadata,
                                                                 absl::Time deadline) {
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
  if (header.kind != source.Kind()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "ciphertext was made by a ", crypto::KeySourceKindName(header.kind), " key source; environment \"",
        options_.environment, "\" uses a ", crypto::KeySourceKindName(source.Kind()), " key source"));
  }
  if (metadata != nullptr) {
    if (auto status = CheckAnnotations(metadata->annotations); !status.ok()) {
      return status;
    }
    if (metadata->key_id.empty()) {
      return absl::InvalidArgumentError("key_id is empty; send the key_id Encrypt returned");
    }
  }
  absl::StatusOr<KeyVersion> version = source.Lookup(header.key_ref);
  if (absl::IsNotFound(version.status()) && source.HealUnknown(header.key_ref, deadline)) {
    version = source.Lookup(header.key_ref);  // another node's newer version, whose copy just arrived here
  }
  if (!version.ok()) {
    // A source that is away (or has not started) says so with its own code: UNAVAILABLE is not "unknown version".
    if (!absl::IsNotFound(version.status())) {
      return version.status();
    }
    return absl::FailedPreconditionError(absl::StrCat("the ciphertext names a key version that environment \"",
                                                      options_.environment,
                                                      "\" does not have: ", version.status().message()));
  }
  if (metadata != nullptr && metadata->key_id != version->key_id) {
    return absl::InvalidArgumentError(absl::StrCat("key_id \"", absl::CHexEscape(metadata->key_id.substr(0, 128)),
                                                   "\" is not the key_id of the key version the ciphertext names (\"",
                                                   version->key_id, "\")"));
  }
  if (version->state == KeyState::kRetired) {
    return RetiredVersionError(*version, "");
  }
  if (auto status = CheckDeadline(clock_.Now(), deadline); !status.ok()) {
    return status;
  }
  return source.Unwrap(header.key_ref, envelope->wrapped, crypto::EnvelopeAssociatedData(header), deadline);
}

StatusResult EnvelopeService::Status() const {
  StatusResult result;
  result.version = options_.status_version;
  absl::StatusOr<KeyVersion> current = key_source()->Current();
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
  } else if ((health.checked_elapsed.has_value() ? clock_.Elapsed() - *health.checked_elapsed
                                                 : clock_.Now() - health.checked) > options_.health_max_age) {
    result.healthz = absl::StrCat("last successful health probe is older than ",
                                  absl::FormatDuration(options_.health_max_age));
  } else {
    result.healthz = "ok";
  }
  return result;
}

Health EnvelopeService::Probe(absl::Time deadline) {
  const std::shared_ptr<KeySource> source = key_source();
  Health health = ProbeWith(*source, deadline);
  // A probe of a source that a reload replaced meanwhile says nothing about the new one.
  absl::MutexLock lock(&mu_);
  if (key_source() == source) {
    health_ = health;
  }
  return health;
}

Health EnvelopeService::ProbeWith(KeySource& source, absl::Time deadline) {
  Health health;
  health.checked = clock_.Now();
  health.checked_elapsed = clock_.Elapsed();
  absl::StatusOr<KeyVersion> current = source.Current();
  if (!current.ok()) {
    health.message = absl::StrCat("no current key version: ", current.status().message());
    return health;
  }
  const crypto::SecretBytes probe = random_.NewSecret(kProbeSize);
  absl::StatusOr<EncryptResult> encrypted = EncryptUnder(source, *current, probe.view(), deadline);
  if (!encrypted.ok()) {
    health.message = absl::StrCat("probe wrap failed: ", encrypted.status().message());
    return health;
  }
  const DecryptMetadata metadata{encrypted->key_id, encrypted->annotations};
  absl::StatusOr<crypto::SecretBytes> decrypted = DecryptWith(source, encrypted->ciphertext, &metadata, deadline);
  if (!decrypted.ok()) {
    health.message = absl::StrCat("probe unwrap failed: ", decrypted.status().message());
  } else if (!decrypted->Equals(probe)) {
    health.message = "probe unwrap returned different bytes than were wrapped";
  } else {
    health.ok = true;
    health.message = "ok";
  }
  return health;
}

absl::StatusOr<Health> EnvelopeService::CheckReplacement(KeySource& candidate, absl::Time deadline) {
  const std::shared_ptr<KeySource> serving = key_source();
  if (candidate.Kind() != serving->Kind()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "environment \"", options_.environment, "\" uses a ", crypto::KeySourceKindName(serving->Kind()),
        " key source and the new one is ", crypto::KeySourceKindName(candidate.Kind()),
        ": its ciphertexts would stop decrypting; fix: move to another key source through a new environment "
        "(deploy/kubernetes/encryption-config/migrate-between-key-sources.yaml)"));
  }
  Health health = ProbeWith(candidate, deadline);
  if (!health.ok) {
    return absl::UnavailableError(absl::StrCat("the new key source of environment \"", options_.environment,
                                               "\" failed its wrap+unwrap probe: ", health.message));
  }
  absl::StatusOr<std::vector<KeyVersion>> versions = serving->Versions();
  if (!versions.ok()) {
    return absl::UnavailableError(absl::StrCat("cannot list the key versions environment \"", options_.environment,
                                               "\" serves now, to compare: ", versions.status().message()));
  }
  for (const KeyVersion& version : *versions) {
    if (version.state == KeyState::kRetired) {
      continue;
    }
    absl::StatusOr<KeyVersion> known = candidate.Lookup(version.key_ref);
    if (!known.ok() || known->key_id != version.key_id) {
      return absl::FailedPreconditionError(absl::StrCat(
          "the new key source of environment \"", options_.environment, "\" does not know key version ",
          version.version, " (key_id ", version.key_id, "), which the running one serves",
          known.ok() ? absl::StrCat(" (under that key reference it has key_id ", known->key_id, ")") : std::string(),
          ": ciphertexts stored under it would stop decrypting; fix: point keySource at the key material that "
          "holds every version (the newest keyring copy, the same Vault key or token objects)"));
    }
  }
  absl::StatusOr<KeyVersion> now = serving->Current();
  absl::StatusOr<KeyVersion> next = candidate.Current();
  if (now.ok() && next.ok() && next->version < now->version) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the new key source of environment \"", options_.environment, "\" would move the current key version back "
        "from ", now->version, " (", now->key_id, ") to ", next->version, " (", next->key_id,
        "); fix: point keySource at the newest key material"));
  }
  return health;
}

void EnvelopeService::ReplaceKeySource(std::shared_ptr<KeySource> source, Health health) {
  absl::MutexLock health_lock(&mu_);
  absl::MutexLock source_lock(&source_mu_);
  key_source_ = std::move(source);
  health_ = std::move(health);
}

Health EnvelopeService::CurrentHealth() const {
  absl::MutexLock lock(&mu_);
  return health_;
}

}  // namespace kmsplugin::core
