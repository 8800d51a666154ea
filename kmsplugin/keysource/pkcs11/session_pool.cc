#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "kmsplugin/core/sv.h"
// Last: these include cryptoki.h.
#include "kmsplugin/keysource/pkcs11/errors.h"
#include "kmsplugin/keysource/pkcs11/session_pool.h"
#include "kmsplugin/keysource/pkcs11/token_keys.h"

namespace kmsplugin::keysource::pkcs11 {

absl::StatusOr<SecretFile> ReadPinFile(const std::string& path) {
  SecretFileOptions options;
  options.max_bytes = 256;
  options.trim_newlines = true;
  return ReadSecretFile(path, "PIN file", options);
}

// Emits the events queued under mu_ once the scope ends, after every lock of the call is released.
class SessionPool::Flush {
 public:
  explicit Flush(SessionPool* pool) : pool_(pool) {}
  ~Flush() {
    std::vector<core::SourceEvent> events;
    {
      absl::MutexLock lock(&pool_->mu_);
      events.swap(pool_->pending_);
    }
    for (const core::SourceEvent& event : events) {
      pool_->config_.events->Emit(event);
    }
  }

 private:
  SessionPool* const pool_;
};

SessionPool::SessionPool(PoolConfig config, std::shared_ptr<Module> module, SecretFile pin)
    : config_(std::move(config)),
      module_(std::move(module)),
      f_(module_->f()),
      pin_(std::move(pin.bytes)),
      pin_stamp_(pin.stamp),
      backoff_(config_.backoff_initial) {}

SessionPool::~SessionPool() {
  absl::MutexLock lock(&mu_);
  if (ready_ && generation_ == module_->generation()) {
    absl::ReaderMutexLock call_lock(&module_->call_mu());
    for (CK_SESSION_HANDLE session : free_) {
      f_->C_CloseSession(session);
    }
    if (anchor_ != CK_INVALID_HANDLE) {
      f_->C_CloseSession(anchor_);
    }
  }
}

absl::Status SessionPool::Start() {
  Flush flush(this);
  absl::MutexLock lock(&mu_);
  return SetUpLocked();
}

std::string SessionPool::TokenSerial() const {
  absl::MutexLock lock(&mu_);
  return token_serial_;
}

SessionPool::Stats SessionPool::PoolStats() const {
  absl::MutexLock lock(&mu_);
  return Stats{config_.size, open_count_, static_cast<int>(free_.size())};
}

void SessionPool::EmitLocked(core::SourceEvent event) {
  event.fields.emplace_back("token", config_.token_name);
  pending_.push_back(std::move(event));
}

absl::StatusOr<bool> SessionPool::ReloadPin() {
  Flush flush(this);
  absl::MutexLock lock(&mu_);
  const std::optional<FileStamp> stamp = StatStamp(config_.pin_file);
  if (stamp.has_value() && *stamp == pin_stamp_) {
    if (!pin_error_.ok()) {
      return absl::Status(pin_error_.code(),
                          absl::StrCat(pin_error_.message(), " (the PIN file has not changed since)"));
    }
    return false;
  }
  auto pin = ReadPinFile(config_.pin_file);
  if (!pin.ok()) {
    // The PIN in use stays; a refused one stays refused.
    return !pin_error_.ok() ? pin_error_ : pin.status();
  }
  pin_ = std::move(pin->bytes);
  pin_stamp_ = pin->stamp;
  if (!pin_error_.ok()) {
    relogin_due_ = true;
  }
  pin_error_ = absl::OkStatus();
  EmitLocked(core::SourceEvent{core::event::kCredentialReloaded,
                               absl::StrCat("PIN file ", config_.pin_file, " changed: read again for the next login"),
                               {{"file", config_.pin_file}},
                               false});
  return true;
}

void SessionPool::ForgetHandle(std::string_view key_ref) {
  absl::MutexLock lock(&mu_);
  if (auto it = handles_.find(key_ref); it != handles_.end()) {
    handles_.erase(it);
  }
}

// ---- set-up, login, re-initialisation (all under mu_) ----

absl::Status SessionPool::SetUpLocked() {
  // Sessions of the same module generation may still be open: close them once the new anchor holds the login
  // (closing the last session of the application would log it out).
  std::vector<CK_SESSION_HANDLE> stale;
  if (generation_ == module_->generation()) {
    stale = free_;
    if (anchor_ != CK_INVALID_HANDLE) {
      stale.push_back(anchor_);
    }
  }
  open_count_ -= static_cast<int>(free_.size());
  free_.clear();
  ready_ = false;
  logged_in_ = false;
  anchor_ = CK_INVALID_HANDLE;
  handles_.clear();
  generation_ = module_->generation();
  absl::ReaderMutexLock call_lock(&module_->call_mu());
  CK_ULONG n = 0;
  CK_RV rv = f_->C_GetSlotList(CK_TRUE, nullptr, &n);
  std::vector<CK_SLOT_ID> slots(n);
  if (rv == CKR_OK && n > 0) {
    rv = f_->C_GetSlotList(CK_TRUE, slots.data(), &n);
    slots.resize(n);
  }
  if (rv != CKR_OK) {
    return MarkDeviceGoneLocked(absl::StrCat("C_GetSlotList failed: ", Rv(rv)));
  }
  std::vector<CK_SLOT_ID> matches;
  std::vector<std::string> seen;
  std::string serial;
  for (CK_SLOT_ID slot : slots) {
    CK_TOKEN_INFO info{};
    if (f_->C_GetTokenInfo(slot, &info) != CKR_OK || (info.flags & CKF_TOKEN_INITIALIZED) == 0) {
      continue;
    }
    const std::string label = PaddedText(info.label, sizeof(info.label));
    const std::string token_serial = PaddedText(info.serialNumber, sizeof(info.serialNumber));
    seen.push_back(absl::StrCat("\"", label, "\" (serial ", token_serial, ")"));
    if ((config_.token_label.has_value() && label == *config_.token_label) ||
        (config_.token_serial.has_value() && token_serial == *config_.token_serial)) {
      matches.push_back(slot);
      serial = token_serial;
    }
  }
  if (matches.empty()) {
    return MarkDeviceGoneLocked(absl::StrCat("no PKCS#11 ", config_.token_name, " in module ", module_->path(),
                                             " (tokens present: ", seen.empty() ? "none" : absl::StrJoin(seen, ", "),
                                             ")"));
  }
  if (matches.size() > 1) {
    return absl::FailedPreconditionError(absl::StrCat("more than one PKCS#11 ", config_.token_name,
                                                      "; fix: select the token with tokenSerial instead"));
  }
  slot_ = matches[0];
  token_serial_ = serial;
  rv = f_->C_OpenSession(slot_, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr, &anchor_);
  if (rv != CKR_OK) {
    anchor_ = CK_INVALID_HANDLE;
    return MarkDeviceGoneLocked(absl::StrCat("C_OpenSession on the ", config_.token_name, " failed: ", Rv(rv)));
  }
  ready_ = true;
  absl::Status login = LoginLocked();
  for (CK_SESSION_HANDLE session : stale) {
    f_->C_CloseSession(session);
  }
  return login;
}

absl::Status SessionPool::LoginLocked() {
  if (!pin_error_.ok()) {
    return pin_error_;
  }
  const CK_RV rv = f_->C_Login(anchor_, CKU_USER, pin_.data(), pin_.size());
  if (rv == CKR_OK || rv == CKR_USER_ALREADY_LOGGED_IN) {
    logged_in_ = true;
    handles_.clear();
    if (relogin_due_) {
      relogin_due_ = false;
      EmitLocked(core::SourceEvent{core::event::kRelogin,
                                   absl::StrCat("logged in to the PKCS#11 ", config_.token_name, " again"),
                                   {},
                                   false});
    }
    return absl::OkStatus();
  }
  if (IsPinRefused(rv)) {
    std::string why;
    std::string fix;
    switch (rv) {
      case CKR_PIN_LOCKED:
        why = "the user PIN is locked after too many wrong attempts";
        fix = absl::StrCat(
            "have the token's security officer reset the user PIN (e.g. pkcs11-tool --init-pin --login "
            "--login-type so), write it to ",
            config_.pin_file, ", then reload the plugin (SIGHUP) or rerun the command");
        break;
      case CKR_PIN_EXPIRED:
        why = "the user PIN has expired";
        fix = absl::StrCat("set a new user PIN with the token's tools, write it to ", config_.pin_file,
                           ", then reload the plugin (SIGHUP) or rerun the command");
        break;
      default:
        why = "the token refused the PIN";
        fix = absl::StrCat("write the token's correct user PIN to ", config_.pin_file,
                           ", then reload the plugin (SIGHUP) or rerun the command");
        break;
    }
    pin_error_ = absl::PermissionDeniedError(absl::StrCat(
        "PKCS#11 login to the ", config_.token_name, " failed: ", why, " (", Rv(rv), ", PIN from ", config_.pin_file,
        "); the plugin will not try this PIN again, because repeated attempts can lock or wipe a token; fix: ",
        fix));
    return pin_error_;
  }
  if (IsSessionGone(rv)) {
    ready_ = false;
    return absl::UnavailableError(absl::StrCat("PKCS#11 login lost its session: ", Rv(rv)));
  }
  if (IsDeviceGone(rv)) {
    return MarkDeviceGoneLocked(absl::StrCat("PKCS#11 login failed: ", Rv(rv)));
  }
  return absl::UnavailableError(absl::StrCat("PKCS#11 login to the ", config_.token_name, " failed: ", Rv(rv)));
}

absl::Status SessionPool::MarkDeviceGoneLocked(std::string reason) {
  if (!need_reinit_) {
    need_reinit_ = true;
    // The first attempt after a healthy spell is immediate; while it stays away, attempts back off.
    next_reinit_ = unavailable_ ? absl::Now() + backoff_ : absl::Now();
    if (unavailable_) {
      backoff_ = std::min(backoff_ * 2, config_.backoff_max);
    }
  }
  if (!unavailable_) {
    unavailable_ = true;
    EmitLocked(core::SourceEvent{core::event::kUnavailable,
                                 absl::StrCat("PKCS#11 ", config_.token_name, " is unavailable: ", reason,
                                              "; re-initialising with backoff"),
                                 {{"reason", reason}},
                                 true});
  }
  ready_ = false;
  unavailable_reason_ = reason;
  return absl::UnavailableError(absl::StrCat("PKCS#11 ", config_.token_name, " is unavailable: ", reason));
}

void SessionPool::NoteSuccessLocked() {
  if (unavailable_) {
    unavailable_ = false;
    backoff_ = config_.backoff_initial;
    EmitLocked(core::SourceEvent{core::event::kRecovered,
                                 absl::StrCat("PKCS#11 ", config_.token_name, " answers again (was: ",
                                              unavailable_reason_, ")"),
                                 {},
                                 false});
  }
}

absl::Status SessionPool::EnsureReadyLocked() {
  if (!pin_error_.ok()) {
    return pin_error_;
  }
  if (need_reinit_) {
    const absl::Time now = absl::Now();
    if (now < next_reinit_) {
      return absl::UnavailableError(absl::StrCat("PKCS#11 ", config_.token_name, " is unavailable (",
                                                 unavailable_reason_, "); next re-initialisation in ",
                                                 absl::FormatDuration(next_reinit_ - now)));
    }
    absl::Status status = module_->Reinitialise(generation_);
    if (status.ok()) {
      status = SetUpLocked();
    }
    if (!status.ok()) {
      if (status.code() == absl::StatusCode::kPermissionDenied) {
        need_reinit_ = false;
        return status;
      }
      need_reinit_ = true;
      unavailable_reason_ = std::string(status.message());
      next_reinit_ = absl::Now() + backoff_;
      backoff_ = std::min(backoff_ * 2, config_.backoff_max);
      return absl::UnavailableError(absl::StrCat("PKCS#11 ", config_.token_name, " is unavailable: ",
                                                 status.message(), " (retrying with backoff)"));
    }
    need_reinit_ = false;
    return absl::OkStatus();
  }
  if (!ready_ || generation_ != module_->generation()) {
    return SetUpLocked();
  }
  if (!logged_in_) {
    absl::ReaderMutexLock call_lock(&module_->call_mu());
    return LoginLocked();
  }
  return absl::OkStatus();
}

void SessionPool::NoteHandlesLostLocked() {
  handles_.clear();
  if (!ready_ || generation_ != module_->generation()) {
    return;
  }
  absl::ReaderMutexLock call_lock(&module_->call_mu());
  CK_SESSION_INFO info{};
  const CK_RV rv = f_->C_GetSessionInfo(anchor_, &info);
  if (rv != CKR_OK) {
    if (IsDeviceGone(rv)) {
      MarkDeviceGoneLocked(absl::StrCat("C_GetSessionInfo failed: ", Rv(rv))).IgnoreError();
    } else {
      ready_ = false;
    }
    return;
  }
  if (info.state != CKS_RO_USER_FUNCTIONS && info.state != CKS_RW_USER_FUNCTIONS) {
    if (logged_in_) {
      relogin_due_ = true;
    }
    logged_in_ = false;
  }
}

// ---- the pool ----

absl::StatusOr<SessionPool::Session> SessionPool::AcquireLocked(absl::Time deadline) {
  auto available = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return !free_.empty() || open_count_ < config_.size;
  };
  if (!mu_.AwaitWithDeadline(absl::Condition(&available), deadline)) {
    return absl::DeadlineExceededError(
        absl::StrCat("no PKCS#11 session became free before the deadline (pool of ", config_.size, ")"));
  }
  if (!free_.empty()) {
    Session session{free_.back(), generation_};
    free_.pop_back();
    return session;
  }
  CK_SESSION_HANDLE handle = CK_INVALID_HANDLE;
  CK_RV rv;
  {
    absl::ReaderMutexLock call_lock(&module_->call_mu());
    rv = f_->C_OpenSession(slot_, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr, &handle);
  }
  if (rv != CKR_OK) {
    if (IsDeviceGone(rv)) {
      return MarkDeviceGoneLocked(absl::StrCat("C_OpenSession failed: ", Rv(rv)));
    }
    return absl::UnavailableError(absl::StrCat("C_OpenSession on the ", config_.token_name, " failed: ", Rv(rv)));
  }
  ++open_count_;
  return Session{handle, generation_};
}

void SessionPool::Release(const Session& session, bool discard) {
  absl::MutexLock lock(&mu_);
  if (session.generation != generation_ || generation_ != module_->generation()) {
    --open_count_;  // the module was re-initialised: the handle is gone already
    return;
  }
  if (discard) {
    absl::ReaderMutexLock call_lock(&module_->call_mu());
    f_->C_CloseSession(session.handle);
    --open_count_;
    return;
  }
  free_.push_back(session.handle);
}

// ---- calls with recovery ----

absl::Status SessionPool::RunWithKey(absl::Time deadline, std::string_view what, std::string_view key_ref,
                                     bool decrypt, KeyOp op) {
  Flush flush(this);
  return RunImpl(deadline, what, key_ref, decrypt, op);
}

absl::Status SessionPool::Run(absl::Time deadline, std::string_view what, SessionOp op) {
  Flush flush(this);
  return RunImpl(deadline, what, "", false,
                 [&](CK_SESSION_HANDLE session, CK_OBJECT_HANDLE) -> CK_RV { return op(session); });
}

absl::Status SessionPool::RunImpl(absl::Time deadline, std::string_view what, std::string_view key_ref, bool decrypt,
                                  KeyOp op) {
  absl::Status last = absl::UnavailableError(absl::StrCat(Sv(what), " did not run"));
  for (int attempt = 0; attempt < 2; ++attempt) {
    if (absl::Now() >= deadline) {
      return absl::DeadlineExceededError(absl::StrCat("PKCS#11 ", Sv(what), ": deadline exceeded"));
    }
    Session session;
    CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;
    {
      absl::MutexLock lock(&mu_);
      if (auto status = EnsureReadyLocked(); !status.ok()) {
        return status;
      }
      auto acquired = AcquireLocked(deadline);
      if (!acquired.ok()) {
        if (acquired.status().code() == absl::StatusCode::kUnavailable && need_reinit_ && attempt == 0) {
          last = acquired.status();
          continue;
        }
        return acquired.status();
      }
      session = *acquired;
      if (auto it = handles_.find(key_ref); !key_ref.empty() && it != handles_.end()) {
        key = it->second;
      }
    }
    // Lock order: mu_ before the module's call lock, never the other way round.
    CK_RV rv = CKR_OK;
    bool key_missing = false;
    bool others_visible = false;
    {
      absl::ReaderMutexLock call_lock(&module_->call_mu());
      if (!key_ref.empty() && key == CK_INVALID_HANDLE) {
        rv = FindKey(f_, session.handle, key_ref, &key);
        key_missing = rv == CKR_OK && key == CK_INVALID_HANDLE;
        if (key_missing) {
          others_visible = AnyPrivateAesKeyVisible(f_, session.handle);
        }
      }
      if (rv == CKR_OK && !key_missing) {
        rv = op(session.handle, key);
      }
    }
    if (rv == CKR_OK && !key_missing) {
      const uint64_t generation = session.generation;
      Release(session, false);
      absl::MutexLock lock(&mu_);
      if (!key_ref.empty() && generation == generation_) {
        handles_[std::string(key_ref)] = key;
      }
      NoteSuccessLocked();
      return absl::OkStatus();
    }
    const bool discard = IsSessionGone(rv) || rv == CKR_OPERATION_ACTIVE;
    Release(session, discard);
    absl::MutexLock lock(&mu_);
    if (key_missing || rv == kRvKeysVanished) {
      // Private objects are invisible after a logout; otherwise the token lost the key or went away, and a
      // re-initialisation (with backoff) finds out which.
      NoteHandlesLostLocked();
      if (key_missing && logged_in_ && ready_ && others_visible) {
        // Logged in and other private keys are there: this one was destroyed (DestroyRetired in another
        // process, or other tools). Not a device failure: re-initialising would stall every other call.
        NoteSuccessLocked();
        return absl::NotFoundError(absl::StrCat("is no longer on the ", config_.token_name,
                                                " (destroyed by the retire command's destroy step in another "
                                                "process, or deleted with other tools)"));
      }
      if (logged_in_ && ready_) {
        last = MarkDeviceGoneLocked(
            key_missing ? "the key object of this key version is not on the token (deleted, or the token is "
                          "unavailable)"
                        : "the token lists none of the key versions in use and no private key at all (the token "
                          "is unavailable, or its keys were deleted)");
      } else {
        last = absl::UnavailableError("PKCS#11 key lookup ran while the token was not logged in");
      }
      continue;
    }
    const std::string failure = absl::StrCat("PKCS#11 ", Sv(what), " failed: ", Rv(rv));
    if (decrypt && IsDecryptFailure(rv)) {
      NoteSuccessLocked();
      return absl::InvalidArgumentError(
          "pkcs11 wrapped key does not authenticate under this key version and associated data (wrong "
          "environment, tampered bytes, or another key)");
    }
    if (IsRefusedByObject(rv)) {
      NoteSuccessLocked();
      return absl::FailedPreconditionError(failure);
    }
    if (IsSessionGone(rv) || rv == CKR_OPERATION_ACTIVE) {
      last = absl::UnavailableError(failure);
      continue;
    }
    if (IsHandleGone(rv)) {
      NoteHandlesLostLocked();
      last = absl::UnavailableError(failure);
      continue;
    }
    if (IsDeviceGone(rv)) {
      last = MarkDeviceGoneLocked(failure);
      continue;
    }
    if (rv == CKR_PIN_EXPIRED || rv == CKR_PIN_LOCKED) {
      return absl::PermissionDeniedError(failure);
    }
    return absl::UnavailableError(failure);
  }
  if (last.code() == absl::StatusCode::kUnavailable) {
    return last;
  }
  return absl::UnavailableError(last.message());
}

}  // namespace kmsplugin::keysource::pkcs11
