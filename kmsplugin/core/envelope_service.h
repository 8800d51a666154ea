#pragma once

// EnvelopeService: Encrypt, Decrypt and Status for one environment, in plain C++ types. The gRPC adapters for
// KMS v2 and v1beta1 (kmsplugin/server) only translate to and from this class.
//
// - Encrypt pins Current() once and wraps under exactly that version, so the key_id it returns is the one Status
//   reported at the same instant; the ciphertext is a crypto/envelope_format envelope whose header names this
//   environment and the key version, bound as associated data.
// - Decrypt refuses a ciphertext of another environment (FAILED_PRECONDITION naming both), a key_id that is not
//   the one the ciphertext's version carries, and annotations other than the ones Encrypt returned.
// - Status never touches the backend: it answers from the health that Probe() records.
// - The key source can be replaced while serving (a config reload that changes keySource): CheckReplacement()
//   proves the candidate can take over without losing a ciphertext, ReplaceKeySource() swaps it in. Every call
//   takes one reference to the source when it starts and uses only that one, so calls in flight finish on the
//   source they started with and new calls use the new one.
// Thread-safe.

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "crypto/random.h"
#include "crypto/secret_bytes.h"
#include "kmsplugin/core/clock.h"
#include "kmsplugin/core/key_source.h"

namespace kmsplugin::core {

// Largest plaintext Encrypt accepts. kube-apiserver sends 32 bytes (KMS v2 seed, KMS v1 DEK) and the v1 health
// probe sends 4 ("ping"); 128 leaves room and keeps every envelope far below 1024 bytes.
inline constexpr size_t kMaxPlaintextSize = 128;
// The one annotation Encrypt returns; Decrypt expects exactly it back.
inline constexpr char kFormatAnnotationKey[] = "format.kmsplugin.io";

using Annotations = std::map<std::string, std::string>;

struct EncryptResult {
  std::string ciphertext;
  std::string key_id;
  Annotations annotations;
};

struct StatusResult {
  std::string version;  // "v2" or "v2beta1"
  std::string healthz;  // "ok", or why not
  std::string key_id;   // never empty: a placeholder naming the environment when no key is known
};

// What a v2 DecryptRequest carries besides the ciphertext. v1beta1 has neither.
struct DecryptMetadata {
  std::string key_id;
  Annotations annotations;
};

struct Health {
  bool ok = false;
  std::string message = "not probed yet";
  absl::Time checked = absl::InfinitePast();  // wall clock, for display
  // Clock::Elapsed() when it was checked: freshness is measured on the monotonic clock, so a wall-clock step
  // neither ages a fresh probe nor keeps a stale one young.
  std::optional<absl::Duration> checked_elapsed;
};

class EnvelopeService {
 public:
  struct Options {
    std::string environment;           // validated name, [a-z0-9-], 1..63
    std::string status_version = "v2";  // "v2" or "v2beta1"
    // Status reports unhealthy when the last successful probe is older than this.
    absl::Duration health_max_age = absl::Seconds(60);
  };

  EnvelopeService(Options options, std::shared_ptr<KeySource> key_source, Clock& clock, crypto::Random& random);

  const std::string& environment() const { return options_.environment; }
  const Options& options() const { return options_; }
  // The key source new calls use. Hold the returned reference for the whole of one operation.
  std::shared_ptr<KeySource> key_source() const;

  absl::StatusOr<EncryptResult> Encrypt(std::string_view plaintext, absl::Time deadline);
  // `metadata` is null for v1beta1 requests, which carry no key_id or annotations.
  absl::StatusOr<crypto::SecretBytes> Decrypt(std::string_view ciphertext, const DecryptMetadata* metadata,
                                              absl::Time deadline);
  StatusResult Status() const;

  // One real wrap and unwrap of a fresh random value under the current version; records the outcome.
  Health Probe(absl::Time deadline);
  Health CurrentHealth() const;

  // Whether `candidate` can take over from the current key source without losing anything; changes nothing.
  // Checks, in order: the same key source kind; a real wrap and unwrap round trip under the candidate's current
  // version (bound to this environment, as Encrypt does); that the candidate knows every version of the current
  // source that is not retired, under the same key_ref with the same key_id (else ciphertexts stored under it
  // would stop decrypting); and that its current version is not older than the current one (key_ids never move
  // backwards). FAILED_PRECONDITION naming the version and key_id otherwise (UNAVAILABLE etc. from the probe).
  // Returns the probe's health, for ReplaceKeySource. Refresh the candidate first.
  absl::StatusOr<Health> CheckReplacement(KeySource& candidate, absl::Time deadline);

  // Makes `source` the key source of new calls and records `health` (from CheckReplacement).
  void ReplaceKeySource(std::shared_ptr<KeySource> source, Health health);

 private:
  absl::StatusOr<EncryptResult> EncryptUnder(KeySource& source, const KeyVersion& version,
                                             std::string_view plaintext, absl::Time deadline);
  absl::StatusOr<crypto::SecretBytes> DecryptWith(KeySource& source, std::string_view ciphertext,
                                                  const DecryptMetadata* metadata, absl::Time deadline);
  // One wrap and unwrap round trip through `source`; the health it shows (not recorded).
  Health ProbeWith(KeySource& source, absl::Time deadline);

  const Options options_;
  Clock& clock_;
  crypto::Random& random_;

  mutable absl::Mutex source_mu_;
  std::shared_ptr<KeySource> key_source_ ABSL_GUARDED_BY(source_mu_);

  mutable absl::Mutex mu_;
  Health health_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kmsplugin::core
