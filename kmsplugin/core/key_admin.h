#pragma once

// KeyAdmin: what changes one environment's key versions: rotate, retire, reinstate, destroy. The CLI holds it
// (`kmsplugin rotate`, `kmsplugin retire`); the serving path (EnvelopeService, the gRPC server) only ever sees the
// KeySource, so no request can reach these. Each key source implements both interfaces on one object; the sets of
// versions each call changes are decided by version_rules.h, the same for every source.
//
// Every call re-reads the backend first (the decision is made on its state now, not on a view up to a poll interval
// old), honours `deadline`, and leaves the source's own view updated through CheckAdvance. Thread-safe.

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "kmsplugin/core/key_source.h"

namespace kmsplugin::core {

class KeyAdmin {
 public:
  virtual ~KeyAdmin() = default;

  // Creates a new version and makes it current. Returns it. Refused while a version is staged (CheckRotate).
  virtual absl::StatusOr<KeyVersion> Rotate(absl::Time deadline) = 0;

  // The two-step rotation for several nodes that each hold a copy of the versions (version_rules.h, "Staged
  // versions"): Stage creates version max+1 as kStaged (it decrypts, it is listed, it never encrypts and Status
  // never reports it); once every node has the copy, Promote makes the newest staged version current
  // (VersionsToPromote). Both return the version they created or promoted. A source whose nodes share one backend
  // key (Vault) has nothing to copy and refuses both with FAILED_PRECONDITION saying so; the default answers
  // UNIMPLEMENTED.
  virtual absl::StatusOr<KeyVersion> Stage(absl::Time deadline);
  virtual absl::StatusOr<KeyVersion> Promote(absl::Time deadline);

  // Retires `version` and every older version not retired yet (VersionsToRetire): from then on Unwrap refuses them
  // (FAILED_PRECONDITION) and Versions() reports them kRetired, in this process and in every other one after its
  // next Refresh. Always a floor, never a single version, because Vault's min_decryption_version is one.
  // Returns the versions this call retired, oldest first (empty when all already were).
  // Callers check first that nothing in etcd still uses them (the `retire` command does).
  virtual absl::StatusOr<std::vector<KeyVersion>> Retire(uint64_t version, absl::Time deadline) = 0;

  // Undoes Retire for `version` and every newer retired version (VersionsToReinstate). Returns them, oldest first.
  // A version whose key material was destroyed cannot come back (NOT_FOUND).
  virtual absl::StatusOr<std::vector<KeyVersion>> Reinstate(uint64_t version, absl::Time deadline) = 0;

  // Destroys, for good, the key material of `version` and every older version (VersionsToDestroy: all retired
  // already). Only a source with an explicit deletion step has it (PKCS#11); the others keep this default, which
  // answers UNIMPLEMENTED saying why.
  virtual absl::StatusOr<std::vector<KeyVersion>> DestroyRetired(uint64_t version, absl::Time deadline);
};

}  // namespace kmsplugin::core
