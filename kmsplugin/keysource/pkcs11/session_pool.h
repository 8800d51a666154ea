#pragma once

// SessionPool: the connection to one token, and the recovery rules (reference: backends.md B4).
//
// - Sessions: a pool (one operation per session at a time, at most `size` open) plus one anchor session held
//   for the pool's life so the login persists (closing the last session logs the application out).
// - Login: exactly one C_Login attempt per need. A refused PIN (incorrect, locked, expired) is never retried:
//   every call reports PERMISSION_DENIED until ReloadPin() finds that the PIN file changed. The PIN lives in
//   SecretBytes, is read with keysource::ReadSecretFile, and never appears in a message or event.
// - Run(): a call on a pooled session, retried once after a lost session, a lost key handle (logout: re-login,
//   fresh lookup) or a removed device. A removed device (or a key lookup that finds nothing while no key at all is
//   visible) marks the token unavailable: full re-initialisation (C_Finalize, C_Initialize, find the slot, open
//   the anchor, log in) with backoff, UNAVAILABLE meanwhile. The backoff starts again only once a call succeeded.
// - Events (core::EventSink), one per transition, emitted outside every lock: `unavailable` (the token stopped
//   answering), `recovered` (a call succeeded again after that), `relogin` (a login after the login was lost or
//   the PIN refused), `credential_reloaded` (a changed PIN file read).
// Lock order: mu_ before the module's call lock. Internal to this folder (includes cryptoki.h). Thread-safe.

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "crypto/secret_bytes.h"
#include "kmsplugin/core/events.h"
#include "kmsplugin/keysource/common/secret_file.h"
// Last: these include cryptoki.h.
#include "kmsplugin/keysource/pkcs11/module.h"

namespace kmsplugin::keysource::pkcs11 {

// The PIN file: at most 256 bytes, trailing newlines trimmed, owner and mode checked on the open descriptor.
absl::StatusOr<SecretFile> ReadPinFile(const std::string& path);

struct PoolConfig {
  std::optional<std::string> token_label;  // exactly one of the two
  std::optional<std::string> token_serial;
  std::string token_name;  // 'token labelled "kms"', for messages
  std::string pin_file;
  int size = 9;
  absl::Duration backoff_initial = absl::Milliseconds(100);
  absl::Duration backoff_max = absl::Seconds(5);
  core::EventSink* events = nullptr;  // never null
};

class SessionPool {
 public:
  using KeyOp = absl::FunctionRef<CK_RV(CK_SESSION_HANDLE, CK_OBJECT_HANDLE)>;
  using SessionOp = absl::FunctionRef<CK_RV(CK_SESSION_HANDLE)>;

  SessionPool(PoolConfig config, std::shared_ptr<Module> module, SecretFile pin);
  ~SessionPool();
  SessionPool(const SessionPool&) = delete;
  SessionPool& operator=(const SessionPool&) = delete;

  // Finds the token, opens the anchor session, logs in. UNAVAILABLE (no such token: the message names the
  // tokens present), FAILED_PRECONDITION (two tokens match), PERMISSION_DENIED (PIN refused).
  absl::Status Start();

  // Runs `op` with the key `key_ref` resolved to a handle (cached per login), honouring `deadline`. Errors:
  // NOT_FOUND (the key is missing while other keys are visible: destroyed), INVALID_ARGUMENT (`decrypt` and the
  // bytes do not authenticate), FAILED_PRECONDITION (the object refuses: IsRefusedByObject), PERMISSION_DENIED,
  // DEADLINE_EXCEEDED, UNAVAILABLE. `what` names the call in messages.
  absl::Status RunWithKey(absl::Time deadline, std::string_view what, std::string_view key_ref, bool decrypt,
                          KeyOp op);
  // Runs `op` on a pooled session. `op` may return kRvKeysVanished (errors.h).
  absl::Status Run(absl::Time deadline, std::string_view what, SessionOp op);

  // Re-reads the PIN file when its stamp changed since it was read (true), for the next login; clears a PIN
  // refusal. Unchanged: false, or the refusal (PERMISSION_DENIED, "has not changed since") when there is one.
  // A file that cannot be read keeps the PIN in use and returns why.
  absl::StatusOr<bool> ReloadPin();

  // Forgets the cached handle of `key_ref` (its object was destroyed).
  void ForgetHandle(std::string_view key_ref);

  CK_FUNCTION_LIST_PTR f() const { return f_; }
  const std::string& token_name() const { return config_.token_name; }
  std::string TokenSerial() const;
  struct Stats {
    int size = 0;
    int open = 0;
    int idle = 0;
  };
  Stats PoolStats() const;

 private:
  struct Session {
    CK_SESSION_HANDLE handle = CK_INVALID_HANDLE;
    uint64_t generation = 0;
  };
  class Flush;

  absl::Status RunImpl(absl::Time deadline, std::string_view what, std::string_view key_ref, bool decrypt,
                       KeyOp op);
  absl::Status SetUpLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status LoginLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) ABSL_SHARED_LOCKS_REQUIRED(module_->call_mu());
  absl::Status MarkDeviceGoneLocked(std::string reason) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status EnsureReadyLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void NoteHandlesLostLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void NoteSuccessLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<Session> AcquireLocked(absl::Time deadline) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Release(const Session& session, bool discard);
  void EmitLocked(core::SourceEvent event) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const PoolConfig config_;
  const std::shared_ptr<Module> module_;
  CK_FUNCTION_LIST_PTR const f_;

  mutable absl::Mutex mu_;
  crypto::SecretBytes pin_ ABSL_GUARDED_BY(mu_);
  FileStamp pin_stamp_ ABSL_GUARDED_BY(mu_);
  absl::Status pin_error_ ABSL_GUARDED_BY(mu_);
  uint64_t generation_ ABSL_GUARDED_BY(mu_) = 0;
  bool ready_ ABSL_GUARDED_BY(mu_) = false;
  bool logged_in_ ABSL_GUARDED_BY(mu_) = false;
  bool relogin_due_ ABSL_GUARDED_BY(mu_) = false;  // the login was lost or refused: the next one is a re-login
  bool need_reinit_ ABSL_GUARDED_BY(mu_) = false;
  bool unavailable_ ABSL_GUARDED_BY(mu_) = false;  // marked gone, and no call has succeeded since
  absl::Time next_reinit_ ABSL_GUARDED_BY(mu_);
  absl::Duration backoff_ ABSL_GUARDED_BY(mu_);
  std::string unavailable_reason_ ABSL_GUARDED_BY(mu_);
  CK_SLOT_ID slot_ ABSL_GUARDED_BY(mu_) = 0;
  std::string token_serial_ ABSL_GUARDED_BY(mu_);
  CK_SESSION_HANDLE anchor_ ABSL_GUARDED_BY(mu_) = CK_INVALID_HANDLE;
  std::vector<CK_SESSION_HANDLE> free_ ABSL_GUARDED_BY(mu_);
  int open_count_ ABSL_GUARDED_BY(mu_) = 0;
  std::map<std::string, CK_OBJECT_HANDLE, std::less<>> handles_ ABSL_GUARDED_BY(mu_);  // key_ref -> handle
  std::vector<core::SourceEvent> pending_ ABSL_GUARDED_BY(mu_);  // emitted by Flush, outside the lock
};

}  // namespace kmsplugin::keysource::pkcs11
