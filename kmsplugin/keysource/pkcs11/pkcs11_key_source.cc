#include "kmsplugin/keysource/pkcs11/pkcs11_key_source.h"

#include <algorithm>
#include <map>
#include <set>
#include <tuple>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "kmsplugin/core/sv.h"
#include "kmsplugin/core/version_heal.h"
#include "kmsplugin/core/version_rules.h"
#include "kmsplugin/keysource/pkcs11/version_view.h"
// Last: these include cryptoki.h.
#include "kmsplugin/keysource/pkcs11/errors.h"
#include "kmsplugin/keysource/pkcs11/module.h"
#include "kmsplugin/keysource/pkcs11/session_pool.h"
#include "kmsplugin/keysource/pkcs11/token_keys.h"

namespace kmsplugin::keysource::pkcs11 {
namespace {

std::string TokenName(const Pkcs11Options& options) {
  return options.token_label.has_value() ? absl::StrCat("token labelled \"", *options.token_label, "\"")
                                         : absl::StrCat("token with serial \"", *options.token_serial, "\"");
}

}  // namespace

class Pkcs11KeySource::Impl {
  using Entry = ViewEntry;

 public:
  Impl(Pkcs11Options options, std::shared_ptr<Module> module, SecretFile pin)
      : options_(std::move(options)),
        clock_(options_.clock != nullptr ? options_.clock : &core::SystemClock()),
        random_(options_.random != nullptr ? options_.random : &crypto::SystemRandom()),
        events_(options_.events != nullptr ? options_.events : &core::NullEventSink()),
        heal_(*clock_),
        token_name_(TokenName(options_)),
        pool_(PoolConfig{options_.token_label, options_.token_serial, token_name_, options_.pin_file,
                         options_.session_pool_size, options_.reinit_backoff_initial, options_.reinit_backoff_max,
                         events_},
              std::move(module), std::move(pin)),
        f_(pool_.f()) {}

  absl::Status Start(absl::Time deadline) {
    if (auto status = pool_.Start(); !status.ok()) {
      return status;
    }
    return RefreshVersions(deadline, /*emit=*/false);
  }

  std::string TokenSerial() const { return pool_.TokenSerial(); }

  SessionPoolStats PoolStats() const {
    const SessionPool::Stats stats = pool_.PoolStats();
    return SessionPoolStats{stats.size, stats.open, stats.idle};
  }

  absl::StatusOr<core::KeyVersion> Current() const {
    absl::MutexLock lock(&mu_);
    if (versions_.empty()) {
      return absl::FailedPreconditionError(
          absl::StrCat("no key version \"", options_.key_label, "-v<N>\" on the PKCS#11 ", token_name_,
                       "; fix: run `kmsplugin init` to create the first version (or check keyLabel)"));
    }
    if (auto current = core::CurrentOf(VersionsLocked());
        current.has_value() && !token_retired_.contains(current->key_ref)) {
      return *current;
    }
    // Only tools other than kmsplugin get here (Retire refuses the current version). Encrypting under a version
    // that no longer decrypts would lose the Secret, and falling back to an older one would move the key_id
    // backwards: neither.
    core::KeyVersion newest = versions_.back().version;
    newest.state = core::KeyState::kRetired;
    return absl::FailedPreconditionError(absl::StrCat(
        "the newest pkcs11 key ", core::DescribeVersion(newest),
        " is retired on the token (CKA_DECRYPT is false), so there is no version to encrypt under; fix: reinstate "
        "it (`kmsplugin retire --reinstate`) or rotate"));
  }

  absl::StatusOr<core::KeyVersion> Lookup(std::string_view key_ref) const {
    absl::MutexLock lock(&mu_);
    if (const Entry* entry = FindLocked(key_ref); entry != nullptr) {
      return entry->version;
    }
    auto decoded = DecodeKeyRef(key_ref);
    return absl::NotFoundError(decoded.ok() ? absl::StrCat("key version ", decoded->version,
                                                           " is not known to this pkcs11 key source")
                                            : "the key reference is not one of this pkcs11 key source");
  }

  absl::StatusOr<std::vector<core::KeyVersion>> Versions() const {
    absl::MutexLock lock(&mu_);
    return VersionsLocked();
  }

  absl::StatusOr<std::string> Wrap(const core::KeyVersion& version, std::string_view plaintext,
                                   std::string_view associated_data, absl::Time deadline) {
    if (associated_data.empty()) {
      return absl::InvalidArgumentError(
          "pkcs11 wrap refused: the associated data is empty (it must bind the environment and key version)");
    }
    if (plaintext.empty() || plaintext.size() > kMaxWrapPlaintextSize) {
      return absl::InvalidArgumentError(absl::StrCat("pkcs11 wrap refused: plaintext of ", plaintext.size(),
                                                     " bytes (must be 1..", kMaxWrapPlaintextSize, ")"));
    }
    auto known = Lookup(version.key_ref);
    if (!known.ok()) {
      return absl::FailedPreconditionError(
          absl::StrCat("pkcs11 wrap refused: key version ", version.version, " is not known to this key source"));
    }
    if (known->state == core::KeyState::kRetired || TokenSaysRetired(known->key_ref)) {
      known->state = core::KeyState::kRetired;
      return Prefixed("pkcs11 wrap refused: ", core::RetiredVersionError(*known, RetiredDetail(*known)));
    }
    if (known->state == core::KeyState::kStaged) {
      return absl::FailedPreconditionError(absl::StrCat(
          "pkcs11 wrap refused: key version ", version.version,
          " is staged (CKA_ENCRYPT is false on the token): it decrypts but never encrypts until it is promoted"));
    }
    std::string out(kGcmIvSize + plaintext.size() + kGcmTagSize, '\0');
    // A fresh IV from our CSPRNG every call: the token never chooses it (SoftHSM would accept an empty one).
    random_->Fill(absl::Span<uint8_t>(reinterpret_cast<uint8_t*>(out.data()), kGcmIvSize));
    CK_ULONG out_len = 0;
    auto status = pool_.RunWithKey(
        deadline, "C_Encrypt", version.key_ref, /*decrypt=*/false,
        [&](CK_SESSION_HANDLE session, CK_OBJECT_HANDLE key) {
          out_len = out.size() - kGcmIvSize;
          return GcmEncrypt(f_, session, key, out.data(), associated_data, plaintext, out.data() + kGcmIvSize,
                            &out_len);
        });
    if (status.code() == absl::StatusCode::kNotFound) {
      return absl::FailedPreconditionError(
          absl::StrCat("pkcs11 wrap refused: key ", core::DescribeVersion(*known), " ", status.message()));
    }
    if (status.code() == absl::StatusCode::kFailedPrecondition) {
      // The token refused: another process retired this version after our last Refresh (Retire clears
      // CKA_ENCRYPT along with CKA_DECRYPT, so a stale view cannot encrypt new Secrets under it).
      core::KeyVersion retired = *known;
      retired.state = core::KeyState::kRetired;
      return Prefixed("pkcs11 wrap refused: ",
                      core::RetiredVersionError(retired, absl::StrCat("CKA_ENCRYPT is false on the token: ",
                                                                      status.message())));
    }
    if (!status.ok()) {
      return status;
    }
    if (out_len != plaintext.size() + kGcmTagSize) {
      return absl::InternalError(absl::StrCat("pkcs11 token returned ", out_len, " bytes of AES-GCM output for ",
                                              plaintext.size(), " bytes of plaintext (expected a 16-byte tag)"));
    }
    return out;
  }

  absl::StatusOr<crypto::SecretBytes> Unwrap(std::string_view key_ref, std::string_view wrapped,
                                             std::string_view associated_data, absl::Time deadline) {
    if (associated_data.empty()) {
      return absl::InvalidArgumentError("pkcs11 unwrap refused: the associated data is empty");
    }
    // Checked here, before the token sees anything: SoftHSM would accept a short IV or a missing tag.
    if (wrapped.size() < kGcmIvSize + 1 + kGcmTagSize ||
        wrapped.size() > kGcmIvSize + kMaxWrapPlaintextSize + kGcmTagSize) {
      return absl::InvalidArgumentError(absl::StrCat("pkcs11 wrapped key of ", wrapped.size(),
                                                     " bytes is malformed (expected a 12-byte IV, 1..",
                                                     kMaxWrapPlaintextSize, " bytes of ciphertext and a 16-byte tag)"));
    }
    auto decoded = DecodeKeyRef(key_ref);
    if (!decoded.ok()) {
      return absl::InvalidArgumentError(decoded.status().message());
    }
    auto known = Lookup(key_ref);
    if (!known.ok() && HealUnknown(key_ref, deadline)) {
      known = Lookup(key_ref);
    }
    if (!known.ok()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "pkcs11 key version ", decoded->version, " named by the ciphertext is not on the ", token_name_,
          " under label prefix \"", options_.key_label, "\" (another token, another environment, or a deleted key)"));
    }
    if (known->state == core::KeyState::kRetired) {
      return core::RetiredVersionError(*known, RetiredDetail(*known));
    }
    const size_t body = wrapped.size() - kGcmIvSize;
    crypto::SecretBytes buffer(body);
    CK_ULONG out_len = 0;
    auto status = pool_.RunWithKey(
        deadline, "C_Decrypt", key_ref, /*decrypt=*/true,
        [&](CK_SESSION_HANDLE session, CK_OBJECT_HANDLE key) {
          out_len = buffer.size();
          return GcmDecrypt(f_, session, key, wrapped.data(), associated_data, wrapped.substr(kGcmIvSize),
                            buffer.data(), &out_len);
        });
    if (status.code() == absl::StatusCode::kNotFound) {
      return absl::FailedPreconditionError(
          absl::StrCat("pkcs11 key ", core::DescribeVersion(*known), " named by the ciphertext ", status.message()));
    }
    if (status.code() == absl::StatusCode::kFailedPrecondition) {
      // Our view said active, the token says CKA_DECRYPT is false: another process retired it since our last
      // Refresh.
      core::KeyVersion retired = *known;
      retired.state = core::KeyState::kRetired;
      return core::RetiredVersionError(retired,
                                       absl::StrCat("CKA_DECRYPT is false on the token: ", status.message()));
    }
    if (!status.ok()) {
      return status;
    }
    if (out_len != body - kGcmTagSize) {
      return absl::InvalidArgumentError("pkcs11 wrapped key does not authenticate (unexpected plaintext length)");
    }
    return crypto::SecretBytes::CopyOf(absl::Span<const uint8_t>(buffer.data(), out_len));
  }

  absl::Status Refresh(absl::Time deadline) {
    // The PIN file first: a changed one is read for the next login, also while healthy (SIGHUP after a PIN
    // change), and a refused PIN stays refused until the file changes.
    auto reloaded = pool_.ReloadPin();
    if (!reloaded.ok() && reloaded.status().code() == absl::StatusCode::kPermissionDenied) {
      return reloaded.status();
    }
    absl::Status listed = RefreshVersions(deadline, /*emit=*/true);
    if (!listed.ok()) {
      return listed;
    }
    return reloaded.status();
  }

  // The ciphertext names a version this view does not have: the core rule (version_heal.h) decides whether the
  // token is listed again (another node's newer version, whose object just reached this node's token).
  bool HealUnknown(std::string_view key_ref, absl::Time deadline) {
    auto decoded = DecodeKeyRef(key_ref);
    if (!decoded.ok()) {
      return false;
    }
    std::vector<core::KeyVersion> known;
    {
      absl::MutexLock lock(&mu_);
      known = VersionsLocked();
    }
    return heal_.MaybeReread(decoded->version, known, [&] { return RefreshVersions(deadline, /*emit=*/true); });
  }

  absl::StatusOr<core::KeyVersion> Rotate(absl::Time deadline) {
    return MakeVersion(/*staged=*/false, deadline);
  }

  absl::StatusOr<core::KeyVersion> Stage(absl::Time deadline) { return MakeVersion(/*staged=*/true, deadline); }

  // Promote: CKA_ENCRYPT set again on the newest staged version, then on any older staged one, newest first (a
  // promote that stops halfway leaves the newest current and the others active: FinishEntries).
  absl::StatusOr<core::KeyVersion> Promote(absl::Time deadline) {
    absl::MutexLock admin_lock(&admin_mu_);
    auto token = RefreshForAdmin(deadline);
    if (!token.ok()) {
      return token.status();
    }
    auto changed = core::VersionsToPromote(*token);
    if (!changed.ok()) {
      return changed.status();
    }
    std::vector<core::KeyVersion> targets;
    std::optional<core::KeyVersion> promoted;
    for (const core::KeyVersion& v : *changed) {
      if (v.state == core::KeyState::kCurrent) {
        promoted = v;
      }
      if (auto was = core::FindVersionNumber(*token, v.version); was && was->state == core::KeyState::kStaged) {
        targets.push_back(*was);
      }
    }
    std::sort(targets.begin(), targets.end(),
              [](const core::KeyVersion& a, const core::KeyVersion& b) { return a.version > b.version; });
    for (const core::KeyVersion& target : targets) {
      if (auto entry = EntryOf(target.key_ref); entry.has_value() && !entry->modifiable) {
        return absl::FailedPreconditionError(NotModifiableMessage(*entry, options_.module_path, token_name_, ""));
      }
    }
    auto done = ChangeUsage(*token, targets, /*usable=*/true, "promoted", deadline);
    if (!done.ok()) {
      return done.status();
    }
    auto current = Current();
    if (!current.ok() || current->version != promoted->version) {
      return absl::InternalError(absl::StrCat("promoted key version ", promoted->version,
                                              " on the token, but it is not the current version of the view"));
    }
    return *current;
  }

 private:
  absl::StatusOr<core::KeyVersion> MakeVersion(bool staged, absl::Time deadline) {
    absl::MutexLock admin_lock(&admin_mu_);
    auto token = RefreshForAdmin(deadline);
    if (!token.ok()) {
      return token.status();
    }
    if (auto checked = staged ? core::CheckStage(*token) : core::CheckRotate(*token); !checked.ok()) {
      return checked;
    }
    uint64_t next = 1;
    {
      absl::MutexLock lock(&mu_);
      next = std::max(versions_.empty() ? 0 : versions_.back().version.version, token_newest_) + 1;
    }
    const absl::Time created = absl::FromUnixMicros(absl::ToUnixMicros(clock_->Now()));
    const std::string label = absl::StrCat(options_.key_label, "-v", next);
    const std::string id = EncodeKeyRef(next, created);
    CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;
    auto status = pool_.Run(deadline, "C_GenerateKey",
                            [&](CK_SESSION_HANDLE session) {
                              return GenerateKey(f_, session, label, id, /*encrypt=*/!staged, &key);
                            });
    if (!status.ok()) {
      return status;
    }
    if (auto refreshed = RefreshVersions(deadline, /*emit=*/true); !refreshed.ok()) {
      return refreshed;
    }
    absl::MutexLock lock(&mu_);
    if (const Entry* entry = FindLocked(id); entry != nullptr) {
      return entry->version;
    }
    return absl::InternalError(absl::StrCat("created key ", label, " but it is not listed on the token"));
  }

 public:

  // Retire: CKA_ENCRYPT and CKA_DECRYPT cleared on each chosen object, oldest first, so that the retired set
  // stays a floor even when a call fails halfway.
  absl::StatusOr<std::vector<core::KeyVersion>> Retire(uint64_t version, absl::Time deadline) {
    absl::MutexLock admin_lock(&admin_mu_);
    auto token = RefreshForAdmin(deadline);
    if (!token.ok()) {
      return token.status();
    }
    auto targets = core::VersionsToRetire(*token, version);
    if (!targets.ok()) {
      return targets.status();
    }
    // Every object must accept the change before the first one is touched.
    for (const core::KeyVersion& target : *targets) {
      if (auto entry = EntryOf(target.key_ref); entry.has_value() && !entry->modifiable) {
        return absl::FailedPreconditionError(NotModifiableMessage(*entry, options_.module_path, token_name_, ""));
      }
    }
    return ChangeUsage(*token, *targets, /*usable=*/false, "retired", deadline);
  }

  // Reinstate: CKA_ENCRYPT and CKA_DECRYPT set again, newest first (the retired set stays a floor).
  absl::StatusOr<std::vector<core::KeyVersion>> Reinstate(uint64_t version, absl::Time deadline) {
    absl::MutexLock admin_lock(&admin_mu_);
    auto token = RefreshForAdmin(deadline);
    if (!token.ok()) {
      return token.status();
    }
    auto targets = core::VersionsToReinstate(*token, version);
    if (!targets.ok()) {
      return targets.status();
    }
    std::reverse(targets->begin(), targets->end());
    auto done = ChangeUsage(*token, *targets, /*usable=*/true, "reinstated", deadline);
    if (done.ok()) {
      std::reverse(done->begin(), done->end());
    }
    return done;
  }

  // DestroyRetired: C_DestroyObject on `version` and every older version, all retired already, oldest first.
  // An admin action: what it destroyed leaves the view (a refresh would keep it listed as retired).
  absl::StatusOr<std::vector<core::KeyVersion>> DestroyRetired(uint64_t version, absl::Time deadline) {
    absl::MutexLock admin_lock(&admin_mu_);
    auto token = RefreshForAdmin(deadline);
    if (!token.ok()) {
      return token.status();
    }
    auto targets = core::VersionsToDestroy(*token, version);
    if (!targets.ok()) {
      return targets.status();
    }
    std::vector<core::KeyVersion> destroyed;
    for (const core::KeyVersion& target : *targets) {
      auto status = pool_.RunWithKey(
          deadline, absl::StrCat("C_DestroyObject of key version ", target.version), target.key_ref,
          /*decrypt=*/false,
          [&](CK_SESSION_HANDLE session, CK_OBJECT_HANDLE key) -> CK_RV { return f_->C_DestroyObject(session, key); });
      // NOT_FOUND: another process destroyed it meanwhile, which is what this call wanted too.
      if (!status.ok() && status.code() != absl::StatusCode::kNotFound) {
        EmitDestroyed(destroyed);
        return PartialFailure(status, "destroyed", destroyed);
      }
      pool_.ForgetHandle(target.key_ref);
      {
        absl::MutexLock lock(&mu_);
        versions_.erase(std::remove_if(versions_.begin(), versions_.end(),
                                       [&](const Entry& e) { return e.version.key_ref == target.key_ref; }),
                        versions_.end());
      }
      destroyed.push_back(target);
    }
    EmitDestroyed(destroyed);
    // The view is updated already; a failing re-read only leaves it as it is.
    RefreshVersions(deadline, /*emit=*/true).IgnoreError();
    return destroyed;
  }

 private:

  static absl::Status Prefixed(std::string_view prefix, const absl::Status& status) {
    return absl::Status(status.code(), absl::StrCat(Sv(prefix), status.message()));
  }

  std::string RetiredDetail(const core::KeyVersion& version) const {
    if (auto entry = EntryOf(version.key_ref); entry.has_value() && !entry->present) {
      return absl::StrCat("destroyed: its object is no longer on the ", token_name_);
    }
    return "CKA_DECRYPT is false on the token";
  }

  bool TokenSaysRetired(const std::string& key_ref) const {
    absl::MutexLock lock(&mu_);
    return token_retired_.contains(key_ref);
  }

  std::vector<core::KeyVersion> VersionsLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return VersionsOf(versions_);
  }
  const Entry* FindLocked(std::string_view key_ref) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return FindEntry(versions_, key_ref);
  }

  std::optional<Entry> EntryOf(std::string_view key_ref) const {
    absl::MutexLock lock(&mu_);
    if (const Entry* entry = FindLocked(key_ref); entry != nullptr) {
      return *entry;
    }
    return std::nullopt;
  }

  // ---- the view ----

  absl::StatusOr<core::VersionChange> InstallLocked(std::vector<Entry> fresh) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    FinishEntries(fresh, pool_.TokenSerial());
    auto change = AdvanceView(&versions_, std::move(fresh), absl::StrCat("the PKCS#11 ", token_name_));
    if (change.ok()) {
      last_refusal_.clear();
    }
    return change;
  }

  void EmitChange(const core::VersionChange& change) {
    if (change.empty()) {
      return;
    }
    events_->Emit(core::SourceEvent{core::event::kKeyVersionsChanged, change.Summary(),
                                    {{"token", token_name_}, {"key_label", options_.key_label}},
                                    false});
  }

  void EmitDestroyed(const std::vector<core::KeyVersion>& destroyed) {
    if (destroyed.empty()) {
      return;
    }
    events_->Emit(core::SourceEvent{core::event::kKeyVersionsChanged, absl::StrCat("destroyed ", NumberList(destroyed)),
                                    {{"token", token_name_}, {"key_label", options_.key_label}},
                                    false});
  }

  // Lists the key objects and installs them through InstallLocked. A listing that misses versions of the view
  // that still decrypt while no private key is visible at all never gets here: the pool treats it as the token
  // away (kRvKeysVanished) and answers UNAVAILABLE, leaving the view in force. `listed` (optional) receives the
  // versions as the token lists them, also when the view refuses them.
  absl::Status RefreshVersions(absl::Time deadline, bool emit, std::vector<core::KeyVersion>* listed = nullptr) {
    std::vector<std::string> expected;
    {
      absl::MutexLock lock(&mu_);
      for (const Entry& entry : versions_) {
        if (entry.present && entry.version.state != core::KeyState::kRetired) {
          expected.push_back(entry.version.key_ref);
        }
      }
    }
    std::vector<TokenKey> keys;
    auto status = pool_.Run(deadline, "listing key objects", [&](CK_SESSION_HANDLE session) -> CK_RV {
      const CK_RV rv = ListKeys(f_, session, options_.key_label, &keys);
      if (rv != CKR_OK) {
        return rv;
      }
      const bool missing = std::any_of(expected.begin(), expected.end(), [&](const std::string& ref) {
        return std::none_of(keys.begin(), keys.end(), [&](const TokenKey& k) { return k.key_ref == ref; });
      });
      return missing && !AnyPrivateAesKeyVisible(f_, session) ? kRvKeysVanished : CKR_OK;
    });
    if (!status.ok()) {
      return status;
    }
    std::vector<Entry> fresh;
    for (TokenKey& key : keys) {
      Entry entry;
      entry.label = std::move(key.label);
      entry.modifiable = key.modifiable;
      entry.version.version = key.version;
      entry.version.key_ref = std::move(key.key_ref);
      entry.version.created = key.created;
      entry.version.state = !key.decrypt   ? core::KeyState::kRetired
                            : !key.encrypt ? core::KeyState::kStaged
                                           : core::KeyState::kActive;
      fresh.push_back(std::move(entry));
    }
    std::optional<core::SourceEvent> refused;
    absl::StatusOr<core::VersionChange> change;
    {
      absl::MutexLock lock(&mu_);
      token_newest_ = 0;
      for (const Entry& entry : fresh) {
        token_newest_ = std::max(token_newest_, entry.version.version);
      }
      if (listed != nullptr) {
        std::vector<Entry> as_listed = fresh;
        FinishEntries(as_listed, pool_.TokenSerial());
        listed->clear();
        for (const Entry& entry : as_listed) {
          listed->push_back(entry.version);
        }
      }
      // While the view refuses a listing, what the token marks retired is still never encrypted under.
      token_retired_.clear();
      for (const Entry& entry : fresh) {
        if (entry.version.state == core::KeyState::kRetired) {
          token_retired_.insert(entry.version.key_ref);
        }
      }
      change = InstallLocked(std::move(fresh));
      if (!change.ok() && std::string(change.status().message()) != last_refusal_) {
        last_refusal_ = std::string(change.status().message());
        refused = core::SourceEvent{core::event::kVersionViewRefused, last_refusal_, {{"token", token_name_}}, true};
      }
    }
    if (refused.has_value()) {
      events_->Emit(*refused);
    }
    if (!change.ok()) {
      return change.status();
    }
    if (emit) {
      EmitChange(*change);
    }
    return absl::OkStatus();
  }

  // The re-read every admin call starts with. Decisions are made on the token's state now: when the view refuses
  // the listing (a rule broken by other tools, e.g. the newest version retired behind our back), the admin call
  // still decides on the token's own listing, so that an operator can repair it (rotate, reinstate) with
  // kmsplugin; the view itself changes only through CheckAdvance afterwards.
  absl::StatusOr<std::vector<core::KeyVersion>> RefreshForAdmin(absl::Time deadline) {
    std::vector<core::KeyVersion> listed;
    absl::Status status = RefreshVersions(deadline, /*emit=*/true, &listed);
    if (status.code() == absl::StatusCode::kFailedPrecondition) {
      return listed;
    }
    if (!status.ok()) {
      return status;
    }
    return Versions();
  }

  // Sets CKA_ENCRYPT and CKA_DECRYPT of each target (in the order given) to `usable`, updating the view through
  // CheckAdvance after each object, so that this process agrees with the token at once; one key_versions_changed
  // for the whole call. Returns the targets in their new state.
  absl::StatusOr<std::vector<core::KeyVersion>> ChangeUsage(const std::vector<core::KeyVersion>& before,
                                                            const std::vector<core::KeyVersion>& targets,
                                                            bool usable, std::string_view verb,
                                                            absl::Time deadline) {
    std::vector<core::KeyVersion> done;
    absl::Status failure;
    for (const core::KeyVersion& target : targets) {
      auto status = pool_.RunWithKey(
          deadline, absl::StrCat("C_SetAttributeValue of key version ", target.version), target.key_ref,
          /*decrypt=*/false,
          [&](CK_SESSION_HANDLE session, CK_OBJECT_HANDLE key) { return SetUsage(f_, session, key, usable); });
      if (status.code() == absl::StatusCode::kFailedPrecondition) {
        // The token refuses to change the object although we read CKA_MODIFIABLE true (or it changed since).
        if (auto entry = EntryOf(target.key_ref); entry.has_value()) {
          status = absl::FailedPreconditionError(
              NotModifiableMessage(*entry, options_.module_path, token_name_,
                                   absl::StrCat(" (the token answered ", status.message(), ")")));
        }
      } else if (status.code() == absl::StatusCode::kNotFound) {
        status = absl::NotFoundError(absl::StrCat("pkcs11 key version ", target.version, " ", status.message()));
      }
      if (!status.ok()) {
        failure = PartialFailure(status, verb, done);
        break;
      }
      absl::MutexLock lock(&mu_);
      std::vector<Entry> changed = versions_;
      for (Entry& entry : changed) {
        if (entry.version.key_ref == target.key_ref) {
          entry.version.state = usable ? core::KeyState::kActive : core::KeyState::kRetired;
        }
      }
      // The token changed already: if the view refuses (only a concurrent change by other tools could make it),
      // the re-read below tells.
      InstallLocked(std::move(changed)).IgnoreError();
      if (const Entry* entry = FindLocked(target.key_ref); entry != nullptr) {
        done.push_back(entry->version);
      }
    }
    // The view is updated already; a failing re-read only leaves it as it is.
    RefreshVersions(deadline, /*emit=*/false).IgnoreError();
    std::vector<core::KeyVersion> after;
    {
      absl::MutexLock lock(&mu_);
      after = VersionsLocked();
      // Report the targets as the token now has them.
      for (core::KeyVersion& v : done) {
        if (const Entry* entry = FindLocked(v.key_ref); entry != nullptr) {
          v = entry->version;
        }
      }
    }
    if (auto change = core::CheckAdvance(before, after, "the view"); change.ok()) {
      EmitChange(change->change);
    }
    if (!failure.ok()) {
      return failure;
    }
    return done;
  }

  const Pkcs11Options options_;
  core::Clock* const clock_;
  crypto::Random* const random_;
  core::EventSink* const events_;
  core::UnknownVersionHeal heal_;
  const std::string token_name_;
  SessionPool pool_;
  CK_FUNCTION_LIST_PTR const f_;

  absl::Mutex admin_mu_ ABSL_ACQUIRED_BEFORE(mu_);  // Rotate, Retire, Reinstate, DestroyRetired: one at a time
  mutable absl::Mutex mu_;
  std::vector<Entry> versions_ ABSL_GUARDED_BY(mu_);  // the view, oldest first
  uint64_t token_newest_ ABSL_GUARDED_BY(mu_) = 0;    // highest version number the last listing saw
  std::string last_refusal_ ABSL_GUARDED_BY(mu_);     // the last version_view_refused said, said once
  std::set<std::string> token_retired_ ABSL_GUARDED_BY(mu_);  // key_refs the last listing saw retired
};

// ---------------------------------------------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<Pkcs11KeySource>> Pkcs11KeySource::Open(const Pkcs11Options& options,
                                                                       absl::Time deadline) {
  if (options.token_label.has_value() == options.token_serial.has_value()) {
    return absl::InvalidArgumentError("pkcs11 key source needs exactly one of token label and token serial");
  }
  if (options.key_label.empty() || options.key_label.size() > 64) {
    return absl::InvalidArgumentError("pkcs11 key label prefix must be 1..64 characters");
  }
  if (options.session_pool_size < 1) {
    return absl::InvalidArgumentError("pkcs11 session pool size must be at least 1");
  }
  auto pin = ReadPinFile(options.pin_file);
  if (!pin.ok()) {
    return pin.status();
  }
  auto module = Module::Load(options.module_path);
  if (!module.ok()) {
    return module.status();
  }
  auto impl = std::make_unique<Impl>(options, *std::move(module), *std::move(pin));
  if (auto status = impl->Start(deadline); !status.ok()) {
    return status;
  }
  return std::unique_ptr<Pkcs11KeySource>(new Pkcs11KeySource(std::move(impl)));
}

Pkcs11KeySource::Pkcs11KeySource(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Pkcs11KeySource::~Pkcs11KeySource() = default;

absl::StatusOr<core::KeyVersion> Pkcs11KeySource::Current() const { return impl_->Current(); }
absl::StatusOr<std::string> Pkcs11KeySource::Wrap(const core::KeyVersion& version, std::string_view plaintext,
                                                  std::string_view associated_data, absl::Time deadline) {
  return impl_->Wrap(version, plaintext, associated_data, deadline);
}
absl::StatusOr<crypto::SecretBytes> Pkcs11KeySource::Unwrap(std::string_view key_ref, std::string_view wrapped,
                                                            std::string_view associated_data, absl::Time deadline) {
  return impl_->Unwrap(key_ref, wrapped, associated_data, deadline);
}
absl::StatusOr<core::KeyVersion> Pkcs11KeySource::Lookup(std::string_view key_ref) const {
  return impl_->Lookup(key_ref);
}
absl::Status Pkcs11KeySource::Refresh(absl::Time deadline) { return impl_->Refresh(deadline); }
absl::StatusOr<core::KeyVersion> Pkcs11KeySource::Rotate(absl::Time deadline) { return impl_->Rotate(deadline); }
absl::StatusOr<core::KeyVersion> Pkcs11KeySource::Stage(absl::Time deadline) { return impl_->Stage(deadline); }
absl::StatusOr<core::KeyVersion> Pkcs11KeySource::Promote(absl::Time deadline) { return impl_->Promote(deadline); }
bool Pkcs11KeySource::HealUnknown(std::string_view key_ref, absl::Time deadline) {
  return impl_->HealUnknown(key_ref, deadline);
}
absl::StatusOr<std::vector<core::KeyVersion>> Pkcs11KeySource::Versions() const { return impl_->Versions(); }
std::string Pkcs11KeySource::TokenSerial() const { return impl_->TokenSerial(); }
SessionPoolStats Pkcs11KeySource::PoolStats() const { return impl_->PoolStats(); }

std::vector<core::BackendGauge> Pkcs11KeySource::BackendGauges() const {
  const SessionPoolStats stats = PoolStats();
  return {{"kmsplugin_pkcs11_session_pool_size", "Configured maximum of PKCS#11 sessions for calls.",
           static_cast<double>(stats.size)},
          {"kmsplugin_pkcs11_sessions_open", "PKCS#11 sessions open now, idle or in use (the anchor not counted).",
           static_cast<double>(stats.open)},
          {"kmsplugin_pkcs11_sessions_in_use", "PKCS#11 sessions running a call now.",
           static_cast<double>(stats.open - stats.idle)}};
}

absl::StatusOr<std::vector<core::KeyVersion>> Pkcs11KeySource::Retire(uint64_t version, absl::Time deadline) {
  return impl_->Retire(version, deadline);
}
absl::StatusOr<std::vector<core::KeyVersion>> Pkcs11KeySource::Reinstate(uint64_t version, absl::Time deadline) {
  return impl_->Reinstate(version, deadline);
}
absl::StatusOr<std::vector<core::KeyVersion>> Pkcs11KeySource::DestroyRetired(uint64_t version, absl::Time deadline) {
  return impl_->DestroyRetired(version, deadline);
}

}  // namespace kmsplugin::keysource::pkcs11
