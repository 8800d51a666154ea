#include "kmsplugin/keysource/local/local_key_source.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <algorithm>
#include <functional>

#include "absl/strings/escaping.h"
#include "absl/time/clock.h"
#include "absl/strings/str_cat.h"
#include "kmsplugin/core/sv.h"
#include "kmsplugin/core/version_rules.h"
#include "crypto/hkdf.h"
#include "crypto/xchacha20_poly1305_aead.h"
#include "kmsplugin/config/file_checks.h"

namespace kmsplugin::keysource::local {
namespace {

constexpr char kWrapLabel[] = "kmsplugin/local/wrap/v1";

// Holds an exclusive flock on `<keyring>.lock` for its lifetime, so two rotations never interleave. The lock file
// must be our own regular file (someone else's, planted first in a shared directory, could be held for ever), and
// waiting for it ends at the caller's deadline, saying who to look for.
class KeyringLock {
 public:
  static absl::StatusOr<std::unique_ptr<KeyringLock>> Acquire(const std::string& keyring, absl::Time deadline) {
    const std::string path = keyring + ".lock";
    const int fd = open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK, 0600);
    if (fd < 0) {
      return absl::FailedPreconditionError(absl::StrCat("cannot open lock file ", path, ": ", std::strerror(errno),
                                                        "; fix: check that it is a regular file of this user"));
    }
    struct stat info {};
    if (fstat(fd, &info) != 0 || !S_ISREG(info.st_mode) || (info.st_uid != 0 && info.st_uid != geteuid())) {
      close(fd);
      return absl::FailedPreconditionError(absl::StrCat(
          "lock file ", path, " is not a regular file owned by root or by the user kmsplugin runs as; fix: remove "
          "it (nothing else may create files next to the keyring)"));
    }
    while (flock(fd, LOCK_EX | LOCK_NB) != 0) {
      const int error = errno;
      if (error != EWOULDBLOCK && error != EINTR) {
        close(fd);
        return absl::FailedPreconditionError(absl::StrCat("cannot lock ", path, ": ", std::strerror(error)));
      }
      if (absl::Now() >= deadline) {
        close(fd);
        return absl::DeadlineExceededError(absl::StrCat(
            "another kmsplugin rotate, retire or init holds ", path,
            " and did not finish before the deadline; fix: wait for it, or find it with `fuser ", path, "`"));
      }
      absl::SleepFor(absl::Milliseconds(20));
    }
    return std::unique_ptr<KeyringLock>(new KeyringLock(fd));
  }
  ~KeyringLock() { close(fd_); }  // closing releases the lock

 private:
  explicit KeyringLock(int fd) : fd_(fd) {}
  int fd_;
};

}  // namespace

absl::StatusOr<config::CheckedFile> ReadKeyring(const std::string& path) {
  // One descriptor for the checks and the read; a link is refused (a rewrite would replace it with a file).
  auto file = config::ReadCheckedFile(path, "keyring", config::FileKind::kSecret, kMaxKeyFileBytes,
                                      /*follow_links=*/false);
  if (absl::IsNotFound(file.status())) {
    return absl::NotFoundError(absl::StrCat(
        "keyring ", path, " does not exist; fix: restore it from a backup if this environment has stored anything "
        "(kmsplugin init would create new, unrelated keys), or run kmsplugin init --config FILE for a new one"));
  }
  return file;
}

absl::StatusOr<crypto::SecretBytes> LoadRootKey(const LocalOptions& options) {
  if (!options.root_key_file.empty()) {
    return ReadRootKeyFile(options.root_key_file);
  }
  auto passphrase = ReadPassphraseFile(options.passphrase_file);
  if (!passphrase.ok()) {
    return passphrase.status();
  }
  auto file = ReadKeyring(options.keyring);
  if (!file.ok()) {
    return file.status();
  }
  auto params = ReadRootKeyParams(file->bytes, options.keyring);
  if (!params.ok()) {
    return params.status();
  }
  if (params->kind != RootKeyParams::Kind::kPassphrase) {
    return absl::FailedPreconditionError(absl::StrCat(
        "keyring ", options.keyring, " is sealed under a root key file, not a passphrase; fix: set rootKeyFile "
        "instead of passphraseFile"));
  }
  return DeriveRootKey(*passphrase, *params);
}

const LocalKeySource::Entry* LocalKeySource::View::Find(std::string_view key_ref) const {
  for (const Entry& entry : entries) {
    if (entry.info.key_ref == key_ref) {
      return &entry;
    }
  }
  return nullptr;
}

std::vector<core::KeyVersion> LocalKeySource::View::Infos() const {
  std::vector<core::KeyVersion> out;
  out.reserve(entries.size());
  for (const Entry& entry : entries) {
    out.push_back(entry.info);
  }
  return out;
}

LocalKeySource::LocalKeySource(LocalOptions options, std::string environment, crypto::SecretBytes root_key,
                               core::Clock& clock, crypto::Random& random, core::EventSink& events)
    : options_(std::move(options)),
      environment_(std::move(environment)),
      root_key_(std::move(root_key)),
      clock_(clock),
      random_(random),
      events_(events),
      heal_(clock) {}

absl::StatusOr<std::shared_ptr<LocalKeySource>> LocalKeySource::Open(const LocalOptions& options,
                                                                     std::string environment, core::Clock& clock,
                                                                     crypto::Random& random,
                                                                     core::EventSink& events) {
  if (auto status = ReadKeyring(options.keyring).status(); !status.ok()) {
    return status;  // before the root key: a missing keyring says restore-or-init, not a passphrase problem
  }
  auto root_key = LoadRootKey(options);
  if (!root_key.ok()) {
    return root_key.status();
  }
  std::shared_ptr<LocalKeySource> source(
      new LocalKeySource(options, std::move(environment), std::move(*root_key), clock, random, events));
  auto view = source->Load();
  if (!view.ok()) {
    return view.status();
  }
  absl::MutexLock lock(&source->mu_);
  source->view_ = std::move(*view);
  return source;
}

absl::StatusOr<std::shared_ptr<const LocalKeySource::View>> LocalKeySource::Load() const {
  auto file = ReadKeyring(options_.keyring);
  if (!file.ok()) {
    return file.status();
  }
  const struct stat& info = file->info;
  auto keyring = OpenKeyring(file->bytes, root_key_, options_.keyring);
  if (!keyring.ok()) {
    return keyring.status();
  }
  auto view = std::make_shared<View>();
  view->keyring_id = keyring->keyring_id;
  view->stamp = StampOf(info);
  const std::string info_label = absl::StrCat(kWrapLabel, absl::string_view("\0", 1), environment_);
  view->entries.reserve(keyring->versions.size());
  for (KeyringVersion& version : keyring->versions) {
    auto wrap_key = crypto::HkdfSha256(version.kek.view(), keyring->keyring_id, info_label,
                                       crypto::XChaCha20Poly1305Aead::kKeySize);
    if (!wrap_key.ok()) {
      return wrap_key.status();
    }
    auto aead = crypto::XChaCha20Poly1305Aead::New(*wrap_key, random_);
    if (!aead.ok()) {
      return aead.status();
    }
    view->entries.push_back(Entry{version.info, std::move(*aead)});
  }
  for (const Entry& entry : view->entries) {
    if (entry.info.state == core::KeyState::kCurrent) {
      view->current = &entry;
    }
  }
  return std::shared_ptr<const View>(std::move(view));
}

std::shared_ptr<const LocalKeySource::View> LocalKeySource::Snapshot() const {
  absl::ReaderMutexLock lock(&mu_);
  return view_;
}

absl::StatusOr<core::KeyVersion> LocalKeySource::Current() const {
  absl::ReaderMutexLock lock(&mu_);
  return view_->current->info;
}

absl::StatusOr<std::string> LocalKeySource::Wrap(const core::KeyVersion& version, std::string_view plaintext,
                                                 std::string_view associated_data, absl::Time /*deadline*/) {
  if (auto input = core::CheckWrapInput(plaintext, associated_data); !input.ok()) {
    return input;
  }
  const std::shared_ptr<const View> view = Snapshot();
  const Entry* entry = view->Find(version.key_ref);
  if (entry == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat("key version ", version.version, " is not in keyring ",
                                                      options_.keyring));
  }
  if (entry->info.state == core::KeyState::kRetired) {
    return absl::FailedPreconditionError(absl::StrCat("key version ", version.version, " is retired"));
  }
  if (entry->info.state == core::KeyState::kStaged) {
    return absl::FailedPreconditionError(absl::StrCat(
        "key version ", version.version, " is staged: it decrypts but never encrypts until it is promoted"));
  }
  return entry->wrap->Encrypt(plaintext, associated_data);
}

absl::StatusOr<crypto::SecretBytes> LocalKeySource::Unwrap(std::string_view key_ref, std::string_view wrapped,
                                                           std::string_view associated_data,
                                                           absl::Time /*deadline*/) {
  if (auto input = core::CheckUnwrapInput(wrapped, associated_data); !input.ok()) {
    return input;
  }
  std::shared_ptr<const View> view = Snapshot();
  const Entry* entry = view->Find(key_ref);
  if (entry == nullptr && HealUnknown(key_ref, absl::InfiniteFuture())) {
    view = Snapshot();
    entry = view->Find(key_ref);
  }
  if (entry == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat("key reference ", absl::BytesToHexString(Sv(key_ref)),
                                                      " names no version in keyring ", options_.keyring));
  }
  if (entry->info.state == core::KeyState::kRetired) {
    return absl::FailedPreconditionError(absl::StrCat("key version ", entry->info.version, " (", entry->info.key_id,
                                                      ") is retired and no longer decrypts"));
  }
  auto plaintext = entry->wrap->Decrypt(wrapped, associated_data);
  if (!plaintext.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("ciphertext does not authenticate under key version ",
                                                   entry->info.version, ": ", plaintext.status().message()));
  }
  return plaintext;
}

absl::StatusOr<core::KeyVersion> LocalKeySource::Lookup(std::string_view key_ref) const {
  const std::shared_ptr<const View> view = Snapshot();
  const Entry* entry = view->Find(key_ref);
  if (entry == nullptr) {
    if (key_ref.size() >= kKeyringIdSize && key_ref.substr(0, kKeyringIdSize) != view->keyring_id) {
      return absl::NotFoundError(absl::StrCat("it belongs to keyring ",
                                              absl::BytesToHexString(Sv(key_ref.substr(0, kKeyringIdSize))),
                                              ", not to keyring ", absl::BytesToHexString(view->keyring_id)));
    }
    return absl::NotFoundError(absl::StrCat("keyring ", options_.keyring, " has no such version"));
  }
  return entry->info;
}

void LocalKeySource::NoteRefresh(const absl::Status& status) {
  const std::string error(status.message());
  if (error == last_refresh_error_) {
    return;
  }
  const bool recovered = status.ok();
  last_refresh_error_ = error;
  core::SourceEvent event;
  event.name = recovered ? core::event::kRecovered : core::event::kUnavailable;
  event.message = recovered ? absl::StrCat("keyring ", options_.keyring, " reads again")
                            : absl::StrCat("keyring ", options_.keyring, " cannot be reloaded: ", error);
  event.fields = {{"keyring", options_.keyring}};
  event.warning = !recovered;
  events_.Emit(event);
}

absl::Status LocalKeySource::Refresh(absl::Time /*deadline*/) {
  absl::MutexLock serial(&refresh_mu_);
  const std::shared_ptr<const View> old = Snapshot();
  absl::Status status = [&]() -> absl::Status {
    // The root key stays loaded, but its file made readable by others is a leak the operator must hear about.
    const std::string& secret = options_.root_key_file.empty() ? options_.passphrase_file : options_.root_key_file;
    if (auto checked = config::CheckSecretFile(
            secret, options_.root_key_file.empty() ? "passphrase file" : "root key file");
        !checked.ok()) {
      return absl::Status(checked.code(),
                          absl::StrCat(checked.message(), " (still serving the versions loaded before)"));
    }
    const std::optional<FileStamp> stamp = StatStamp(options_.keyring);
    if (!stamp.has_value()) {
      return absl::NotFoundError(absl::StrCat("keyring ", options_.keyring, " is gone (", std::strerror(errno),
                                              "); still serving the versions loaded before; fix: restore it from "
                                              "a backup (kmsplugin init would create new, unrelated keys)"));
    }
    if (*stamp == old->stamp) {
      return absl::OkStatus();
    }
    auto fresh = Load();
    if (!fresh.ok()) {
      return absl::Status(fresh.status().code(),
                          absl::StrCat(fresh.status().message(), " (still serving the versions loaded before)"));
    }
    if ((*fresh)->keyring_id != old->keyring_id) {
      return absl::FailedPreconditionError(absl::StrCat(
          "keyring ", options_.keyring, " was replaced by a different keyring; refusing to switch, since "
          "ciphertexts of the loaded keyring would stop decrypting; fix: restore the original file"));
    }
    auto advanced = core::CheckAdvance(old->Infos(), (*fresh)->Infos(), absl::StrCat("keyring ", options_.keyring));
    if (!advanced.ok()) {
      events_.Emit(core::SourceEvent{core::event::kVersionViewRefused, std::string(advanced.status().message()),
                                     {{"keyring", options_.keyring}}, true});
      return advanced.status();
    }
    auto view = std::const_pointer_cast<View>(*fresh);
    // Retired versions the file no longer holds stay listed (rule 4); they never decrypt, so no key is needed.
    for (uint64_t number : advanced->change.kept_retired) {
      for (const Entry& entry : old->entries) {
        if (entry.info.version == number) {
          view->entries.push_back(Entry{entry.info, nullptr});
        }
      }
    }
    std::sort(view->entries.begin(), view->entries.end(),
              [](const Entry& a, const Entry& b) { return a.info.version < b.info.version; });
    view->current = nullptr;
    for (const Entry& entry : view->entries) {
      if (entry.info.state == core::KeyState::kCurrent) {
        view->current = &entry;
      }
    }
    {
      absl::MutexLock lock(&mu_);
      view_ = std::move(view);
    }
    if (!advanced->change.empty()) {
      events_.Emit(core::SourceEvent{core::event::kKeyVersionsChanged,
                                     absl::StrCat("keyring ", options_.keyring, ": ", advanced->change.Summary()),
                                     {{"keyring", options_.keyring}, {"change", advanced->change.Summary()}}});
    }
    return absl::OkStatus();
  }();
  NoteRefresh(status);
  return status;
}

absl::Status LocalKeySource::EditKeyring(const std::function<absl::Status(Keyring&)>& edit, absl::Time deadline) {
  {
    auto lock = KeyringLock::Acquire(options_.keyring, deadline);
    if (!lock.ok()) {
      return lock.status();
    }
    RemoveStaleTemporaries(options_.keyring);  // a writer killed before its rename left them
    auto file = ReadKeyring(options_.keyring);
    if (!file.ok()) {
      return file.status();
    }
    auto keyring = OpenKeyring(file->bytes, root_key_, options_.keyring);
    if (!keyring.ok()) {
      return keyring.status();
    }
    if (auto status = edit(*keyring); !status.ok()) {
      return status;
    }
    auto sealed = SealKeyring(*keyring, root_key_, random_);
    if (!sealed.ok()) {
      return sealed.status();
    }
    if (auto status = WriteFileAtomically(options_.keyring, *sealed, /*exclusive=*/false); !status.ok()) {
      return status;
    }
  }
  return Refresh(deadline);
}

namespace {

std::vector<core::KeyVersion> InfosOf(const Keyring& keyring) {
  std::vector<core::KeyVersion> infos;
  for (const KeyringVersion& v : keyring.versions) {
    infos.push_back(v.info);
  }
  return infos;
}

}  // namespace

bool LocalKeySource::HealUnknown(std::string_view key_ref, absl::Time deadline) {
  const std::shared_ptr<const View> view = Snapshot();
  // Only a reference of this keyring names a version a re-read could bring (MakeKeyRef: keyring id, version).
  if (key_ref.size() != kKeyringIdSize + 4 || key_ref.substr(0, kKeyringIdSize) != view->keyring_id) {
    return false;
  }
  uint64_t wanted = 0;
  for (char c : key_ref.substr(kKeyringIdSize)) {
    wanted = (wanted << 8) | static_cast<uint8_t>(c);
  }
  return heal_.MaybeReread(wanted, view->Infos(), [&] { return Refresh(deadline); });
}

absl::StatusOr<core::KeyVersion> LocalKeySource::Append(core::KeyState state,
                                                        absl::Status (*check)(const std::vector<core::KeyVersion>&),
                                                        absl::Time deadline) {
  core::KeyVersion created;
  auto status = EditKeyring(
      [&](Keyring& keyring) -> absl::Status {
        // Decided on the file as it is under the lock, not on this process's view, which may lag behind.
        if (auto checked = check(InfosOf(keyring)); !checked.ok()) {
          return checked;
        }
        created = AppendVersion(keyring, clock_.Now(), random_, state).info;
        return absl::OkStatus();
      },
      deadline);
  if (!status.ok()) {
    return status;
  }
  return created;
}

absl::StatusOr<core::KeyVersion> LocalKeySource::Rotate(absl::Time deadline) {
  return Append(core::KeyState::kCurrent, core::CheckRotate, deadline);
}

absl::StatusOr<core::KeyVersion> LocalKeySource::Stage(absl::Time deadline) {
  return Append(core::KeyState::kStaged, core::CheckStage, deadline);
}

absl::StatusOr<core::KeyVersion> LocalKeySource::Promote(absl::Time deadline) {
  core::KeyVersion promoted;
  auto status = EditKeyring(
      [&](Keyring& keyring) -> absl::Status {
        auto changed = core::VersionsToPromote(InfosOf(keyring));
        if (!changed.ok()) {
          return changed.status();
        }
        for (const core::KeyVersion& pick : *changed) {
          for (KeyringVersion& v : keyring.versions) {
            if (v.info.version == pick.version) {
              v.info.state = pick.state;
              if (pick.state == core::KeyState::kCurrent) {
                promoted = v.info;
              }
            }
          }
        }
        return absl::OkStatus();
      },
      deadline);
  if (!status.ok()) {
    return status;
  }
  return promoted;
}

absl::StatusOr<std::vector<core::KeyVersion>> LocalKeySource::SetStates(
    uint64_t version, core::KeyState state,
    absl::StatusOr<std::vector<core::KeyVersion>> (*select)(const std::vector<core::KeyVersion>&, uint64_t),
    absl::Time deadline) {
  std::vector<core::KeyVersion> changed;
  auto status = EditKeyring(
      [&](Keyring& keyring) -> absl::Status {
        // Decided on the file as it is under the lock, not on this process's view, which may lag behind.
        auto selected = select(InfosOf(keyring), version);
        if (!selected.ok()) {
          return selected.status();
        }
        for (KeyringVersion& v : keyring.versions) {
          for (const core::KeyVersion& pick : *selected) {
            if (pick.version == v.info.version) {
              v.info.state = state;
              changed.push_back(v.info);
            }
          }
        }
        return absl::OkStatus();
      },
      deadline);
  if (!status.ok()) {
    return status;
  }
  return changed;
}

absl::StatusOr<std::vector<core::KeyVersion>> LocalKeySource::Retire(uint64_t version, absl::Time deadline) {
  return SetStates(version, core::KeyState::kRetired, core::VersionsToRetire, deadline);
}

absl::StatusOr<std::vector<core::KeyVersion>> LocalKeySource::Reinstate(uint64_t version, absl::Time deadline) {
  return SetStates(version, core::KeyState::kActive, core::VersionsToReinstate, deadline);
}

absl::StatusOr<std::vector<core::KeyVersion>> LocalKeySource::Versions() const {
  const std::shared_ptr<const View> view = Snapshot();
  std::vector<core::KeyVersion> versions;
  for (const Entry& entry : view->entries) {
    versions.push_back(entry.info);
  }
  return versions;
}

}  // namespace kmsplugin::keysource::local
