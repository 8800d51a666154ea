#pragma once

// LocalKeySource: the embedded default key source. KEK versions live in a keyring file sealed under a root key
// (keyring.h); this class serves them to one environment.
//
// - Each environment wraps under its own key, HKDF-SHA256(KEK, salt = keyringId, info = label ‖ environment),
//   with XChaCha20-Poly1305 (wrapped = nonce(24) ‖ ct ‖ tag(16)), so two environments that share a keyring by
//   mistake still cannot open each other's ciphertexts.
// - Refresh() re-reads the keyring only when the file changed (device, inode, size, mtime). Every new view passes
//   core::CheckAdvance (a reload that would drop a version, change a version's key_id or move the current version
//   backwards is refused and the old view stays in force: key_ids never flip-flop and nothing that decrypted stops
//   decrypting). A keyring that vanishes or cannot be read keeps the loaded versions serving. Changes and refusals
//   are reported to the EventSink, once per transition.
// - A ciphertext naming a version newer than any loaded one makes Unwrap (and HealUnknown, which the core calls on
//   an unknown key_ref) re-read the keyring once before refusing, at most once per second (core/version_heal.h):
//   a node that already received another node's keyring copy answers without waiting for SIGHUP or its poll.
// - Stage() appends version max+1 as staged, Promote() makes the newest staged version current
//   (core::VersionsToPromote), both in the keyring file, so the copy an operator distributes carries the states.
// - Rotate(), Retire() and Reinstate() change the keyring under an exclusive lock (keyring path + ".lock") and
//   write it atomically; a retired version keeps its sealed KEK, so Reinstate() can bring it back.
// The root key stays in locked memory for the life of the object; KEKs are never copied out. Thread-safe.

#include <sys/stat.h>

#include <functional>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "crypto/aead.h"
#include "crypto/random.h"
#include "kmsplugin/config/file_checks.h"
#include "kmsplugin/core/clock.h"
#include "kmsplugin/core/events.h"
#include "kmsplugin/core/key_admin.h"
#include "kmsplugin/core/key_source.h"
#include "kmsplugin/core/version_heal.h"
#include "kmsplugin/keysource/common/secret_file.h"
#include "kmsplugin/keysource/local/keyring.h"

namespace kmsplugin::keysource::local {

struct LocalOptions {
  std::string keyring;          // keyring file
  std::string root_key_file;    // exactly one of root_key_file and passphrase_file
  std::string passphrase_file;
};

// Reads the root key the options name: the root key file, or the passphrase stretched with the parameters the
// keyring at `options.keyring` was made with.
absl::StatusOr<crypto::SecretBytes> LoadRootKey(const LocalOptions& options);

// The keyring file, checked (owner, mode, directories) and read on one descriptor; NOT_FOUND says to restore a
// backup before creating new keys.
absl::StatusOr<config::CheckedFile> ReadKeyring(const std::string& path);

class LocalKeySource final : public core::KeySource, public core::KeyAdmin {
 public:
  // Opens and verifies the keyring. Refuses key files that group or others can read.
  static absl::StatusOr<std::shared_ptr<LocalKeySource>> Open(const LocalOptions& options, std::string environment,
                                                              core::Clock& clock, crypto::Random& random,
                                                              core::EventSink& events = core::NullEventSink());

  crypto::KeySourceKind Kind() const override { return crypto::KeySourceKind::kLocal; }
  absl::StatusOr<core::KeyVersion> Current() const override;
  absl::StatusOr<std::string> Wrap(const core::KeyVersion& version, std::string_view plaintext,
                                   std::string_view associated_data, absl::Time deadline) override;
  absl::StatusOr<crypto::SecretBytes> Unwrap(std::string_view key_ref, std::string_view wrapped,
                                             std::string_view associated_data, absl::Time deadline) override;
  absl::StatusOr<core::KeyVersion> Lookup(std::string_view key_ref) const override;
  absl::Status Refresh(absl::Time deadline) override;
  absl::StatusOr<core::KeyVersion> Rotate(absl::Time deadline) override;
  absl::StatusOr<core::KeyVersion> Stage(absl::Time deadline) override;
  absl::StatusOr<core::KeyVersion> Promote(absl::Time deadline) override;
  bool HealUnknown(std::string_view key_ref, absl::Time deadline) override;
  absl::StatusOr<std::vector<core::KeyVersion>> Versions() const override;
  // Mark versions retired (or active again) in the keyring file, under the rotation lock.
  absl::StatusOr<std::vector<core::KeyVersion>> Retire(uint64_t version, absl::Time deadline) override;
  absl::StatusOr<std::vector<core::KeyVersion>> Reinstate(uint64_t version, absl::Time deadline) override;

 private:
  struct Entry {
    core::KeyVersion info;
    std::unique_ptr<crypto::Aead> wrap;  // keyed with this environment's wrap key for the version
  };
  struct View {
    std::string keyring_id;
    std::vector<Entry> entries;  // ascending by version
    const Entry* current = nullptr;
    FileStamp stamp;
    const Entry* Find(std::string_view key_ref) const;
    std::vector<core::KeyVersion> Infos() const;
  };

  LocalKeySource(LocalOptions options, std::string environment, crypto::SecretBytes root_key, core::Clock& clock,
                 crypto::Random& random, core::EventSink& events);
  // Reports `status` once when it differs from the last refresh outcome (a failing keyring is not logged per poll).
  void NoteRefresh(const absl::Status& status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(refresh_mu_);
  absl::StatusOr<std::shared_ptr<const View>> Load() const;
  // Reads the keyring under the exclusive lock, applies `edit`, writes it back atomically, then Refresh()es.
  absl::Status EditKeyring(const std::function<absl::Status(Keyring&)>& edit, absl::Time deadline);
  absl::StatusOr<std::vector<core::KeyVersion>> SetStates(
      uint64_t version, core::KeyState state,
      absl::StatusOr<std::vector<core::KeyVersion>> (*select)(const std::vector<core::KeyVersion>&, uint64_t),
      absl::Time deadline);
  std::shared_ptr<const View> Snapshot() const;
  // Appends a version in `state` (current: Rotate; staged: Stage) after `check` accepts the file's versions.
  absl::StatusOr<core::KeyVersion> Append(core::KeyState state,
                                          absl::Status (*check)(const std::vector<core::KeyVersion>&),
                                          absl::Time deadline);

  const LocalOptions options_;
  const std::string environment_;
  const crypto::SecretBytes root_key_;
  core::Clock& clock_;
  crypto::Random& random_;
  core::EventSink& events_;
  std::string last_refresh_error_ ABSL_GUARDED_BY(refresh_mu_);
  core::UnknownVersionHeal heal_;

  // Refresh (poll, SIGHUP, Rotate) runs one at a time, so a slow reload of an older file can never replace a
  // newer view another reload installed.
  absl::Mutex refresh_mu_ ABSL_ACQUIRED_BEFORE(mu_);
  mutable absl::Mutex mu_;
  std::shared_ptr<const View> view_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kmsplugin::keysource::local
