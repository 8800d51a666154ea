#include "kmsplugin/keysource/vault/vault_key_source.h"

#include <algorithm>
#include <limits>
#include <optional>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kmsplugin/core/sv.h"
#include "kmsplugin/core/version_rules.h"
#include "kmsplugin/keysource/vault/client_util.h"

namespace kmsplugin::keysource::vault {
namespace {

constexpr size_t kMaxWrappedBytes = 1024;

std::string Base64(absl::string_view bytes) { return absl::Base64Escape(bytes); }

// Creation time of one entry of the key's "keys" map: Unix seconds (symmetric keys) or an object with an
// RFC 3339 "creation_time" (asymmetric keys, newer Vault).
bool ParseCreated(const nlohmann::json& value, int64_t* created) {
  if (value.is_number_integer()) {
    *created = value.get<int64_t>();
    return true;
  }
  if (value.is_object() && value.contains("creation_time") && value["creation_time"].is_string()) {
    absl::Time t;
    std::string err;
    if (absl::ParseTime(absl::RFC3339_full, value["creation_time"].get<std::string>(), &t, &err)) {
      *created = absl::ToUnixSeconds(t);
      return true;
    }
  }
  return false;
}

}  // namespace

absl::Status ParseKeyRef(absl::string_view key_ref, uint64_t* version, int64_t* created) {
  size_t at = key_ref.find('@');
  if (key_ref.size() > 64 || !absl::StartsWith(key_ref, "v") || at == absl::string_view::npos ||
      !absl::SimpleAtoi(key_ref.substr(1, at - 1), version) || *version == 0 ||
      !absl::SimpleAtoi(key_ref.substr(at + 1), created)) {
    return absl::InvalidArgumentError(
        absl::StrCat("malformed Vault key reference \"", absl::CHexEscape(key_ref.substr(0, 64)),
                     "\" (expected v<version>@<creation time>)"));
  }
  return absl::OkStatus();
}

VaultKeySource::VaultKeySource(std::unique_ptr<VaultClient> client, core::Clock* clock, core::EventSink* events)
    : client_(std::move(client)),
      clock_(clock),
      options_(client_->options()),
      events_(events != nullptr ? events : &core::NullEventSink()),
      heal_(clock != nullptr ? *clock : core::SystemClock()) {}

void VaultKeySource::Emit(const char* name, std::string message, bool warning) const {
  core::SourceEvent e;
  e.name = name;
  e.message = std::move(message);
  e.warning = warning;
  e.fields = {{"key", absl::StrCat(options_.transit_mount, "/keys/", options_.key_name)}};
  events_->Emit(e);
}

VaultKeySource::~VaultKeySource() { client_->StopBackground(); }

absl::StatusOr<std::shared_ptr<VaultKeySource>> VaultKeySource::Open(VaultOptions options, core::Clock* clock,
                                                                     int worker_threads, bool background,
                                                                     core::EventSink* events) {
  auto client =
      VaultClient::New(std::move(options), clock, static_cast<size_t>(std::max(1, worker_threads)), events);
  if (!client.ok()) {
    return client.status();
  }
  return Open(std::move(*client), clock, background, events);
}

absl::StatusOr<std::shared_ptr<VaultKeySource>> VaultKeySource::Open(std::unique_ptr<VaultClient> client,
                                                                     core::Clock* clock, bool background,
                                                                     core::EventSink* events) {
  std::shared_ptr<VaultKeySource> source(new VaultKeySource(std::move(client), clock, events));
  const absl::Duration first = std::min(source->options_.request_timeout, absl::Seconds(10));
  auto fatal = [](const absl::Status& s) {
    return s.code() != absl::StatusCode::kUnavailable && s.code() != absl::StatusCode::kDeadlineExceeded;
  };
  if (absl::Status s = source->client_->Authenticate(absl::Now() + first); !s.ok() && fatal(s)) {
    return s;
  }
  if (absl::Status s = source->Refresh(absl::Now() + first); !s.ok() && fatal(s)) {
    return s;
  }
  if (background) {
    VaultKeySource* self = source.get();
    source->client_->StartBackground([self] { self->BackgroundTick(); }, absl::Milliseconds(500));
  }
  return source;
}

absl::StatusOr<std::string> VaultKeySource::CreateKey(const VaultOptions& options, core::Clock* clock,
                                                      absl::Time deadline) {
  auto client = VaultClient::New(options, clock, 1);
  if (!client.ok()) {
    return client.status();
  }
  return CreateKey(**client, deadline);
}

absl::StatusOr<std::string> VaultKeySource::CreateKey(VaultClient& client, absl::Time deadline) {
  const VaultOptions& options = client.options();
  if (absl::Status s = client.Authenticate(deadline); !s.ok()) {
    return s;
  }
  const std::string path = absl::StrCat(options.transit_mount, "/keys/", options.key_name);
  const std::string where = absl::StrCat("Vault transit key ", path, " at ", options.addresses.front(),
                                         options.vault_namespace.empty() ? "" : " namespace ",
                                         options.vault_namespace);
  auto read = client.Call("GET", path, "", deadline);
  if (!read.ok()) {
    return read.status();
  }
  if (read->status == 200) {
    const uint64_t latest = read->body.is_object() && read->body["data"].is_object()
                                ? internal::UintField(read->body["data"], "latest_version", 0).value_or(0)
                                : 0;
    return absl::AlreadyExistsError(absl::StrCat(where, " already exists (latest version ", latest,
                                                 "); nothing was changed"));
  }
  if (read->status != 404) {
    return VaultClient::ErrorStatus(*read, absl::StrCat("reading ", where));
  }
  auto created = client.Call("POST", path, "{\"type\":\"aes256-gcm96\"}", deadline);
  if (!created.ok()) {
    return created.status();
  }
  if (created->status != 200 && created->status != 204) {
    return VaultClient::ErrorStatus(*created, absl::StrCat("creating ", where));
  }
  return absl::StrCat("created ", where, " (aes256-gcm96, version 1)");
}

std::string VaultKeySource::KeyPath(absl::string_view op) const {
  return absl::StrCat(options_.transit_mount, "/", op, "/", options_.key_name);
}

std::string VaultKeySource::Describe() const {
  return absl::StrCat("Vault transit key ", options_.transit_mount, "/keys/", options_.key_name);
}

core::KeyVersion VaultKeySource::MakeVersion(uint64_t version, int64_t created, core::KeyState state) const {
  core::KeyVersion v;
  v.version = version;
  v.created = absl::FromUnixSeconds(created);
  v.key_ref = absl::StrCat("v", version, "@", created);
  v.key_id = absl::StrCat("vault:", options_.vault_namespace.empty() ? "" : options_.vault_namespace + "/",
                          options_.transit_mount, "/", options_.key_name, ":v", version, ":", created);
  v.state = state;
  return v;
}

std::string VaultKeySource::FloorDetail() const {
  return absl::StrCat("min_decryption_version is ", min_decryption_);
}

absl::Status VaultKeySource::CheckIdentity(uint64_t version, int64_t created) const {
  auto it = vault_created_.find(version);
  if (it != vault_created_.end() && it->second != created) {
    return absl::FailedPreconditionError(absl::StrCat(
        Describe(), " key version ", version, " was created at ", it->second,
        " in Vault, but this one was created at ", created,
        ": the key was deleted and re-created, so Vault's version ", version,
        " is another key; fix: restore the original key (Vault backup), or restart once nothing uses the old one"));
  }
  return absl::OkStatus();
}

absl::StatusOr<core::KeyVersion> VaultKeySource::Current() const {
  absl::MutexLock lock(&mu_);
  if (!loaded_) {
    return absl::UnavailableError(absl::StrCat(Describe(), ": no key version known yet: ", refresh_error_));
  }
  std::optional<core::KeyVersion> current = core::CurrentOf(versions_);
  if (!current) {
    return absl::FailedPreconditionError(absl::StrCat(Describe(), " has no current version"));
  }
  return *current;
}

absl::StatusOr<core::KeyVersion> VaultKeySource::Lookup(std::string_view key_ref) const {
  uint64_t version;
  int64_t created;
  if (absl::Status s = ParseKeyRef(Sv(key_ref), &version, &created); !s.ok()) {
    return s;
  }
  absl::MutexLock lock(&mu_);
  std::optional<core::KeyVersion> known = core::FindVersionNumber(versions_, version);
  if (known) {
    if (known->key_ref != Sv(key_ref)) {
      return absl::NotFoundError(absl::StrCat(
          Describe(), " key version ", version, " was created at ", absl::ToUnixSeconds(known->created),
          ", but the ciphertext names one created at ", created,
          ": the key was deleted and re-created, so this ciphertext cannot be decrypted"));
    }
    return *known;
  }
  if (loaded_ && version < min_decryption_) {
    // Archived by Vault before this process saw it: retired, as the floor says; identity from the key_ref.
    return MakeVersion(version, created, core::KeyState::kRetired);
  }
  std::vector<std::string> numbers;
  for (const core::KeyVersion& v : versions_) {
    numbers.push_back(absl::StrCat(v.version));
  }
  return absl::NotFoundError(absl::StrCat(Describe(), " has no key version ", version, " (versions: ",
                                          numbers.empty() ? "none known yet" : absl::StrJoin(numbers, ", "), ")"));
}

absl::StatusOr<std::vector<core::KeyVersion>> VaultKeySource::Versions() const {
  absl::MutexLock lock(&mu_);
  if (!loaded_) {
    return absl::UnavailableError(absl::StrCat(Describe(), ": versions not known yet: ", refresh_error_));
  }
  return versions_;
}

absl::Status VaultKeySource::Refresh(absl::Time deadline) {
  {
    absl::MutexLock lock(&mu_);
    last_attempt_ = clock_->Now();
  }
  auto response = client_->Call("GET", KeyPath("keys"), "", deadline);
  absl::Status status;
  std::map<uint64_t, int64_t> created;
  uint64_t latest = 0, min_decryption = 1;
  if (!response.ok()) {
    status = response.status();
  } else if (response->status == 404) {
    status = absl::FailedPreconditionError(
        absl::StrCat(Describe(), " does not exist at ", response->address,
                     "; fix: run `kmsplugin init` or check transitMount, keyName and namespace"));
  } else if (response->status != 200) {
    status = VaultClient::ErrorStatus(*response, absl::StrCat("reading ", Describe()));
  } else {
    const nlohmann::json& body = response->body;
    const nlohmann::json* data = body.is_object() && body.contains("data") ? &body["data"] : nullptr;
    bool good = data != nullptr && data->is_object() && data->contains("keys") && (*data)["keys"].is_object();
    if (good) {
      for (const auto& [name, value] : (*data)["keys"].items()) {
        uint64_t v;
        int64_t t;
        if (!absl::SimpleAtoi(name, &v) || !ParseCreated(value, &t)) {
          good = false;
          break;
        }
        created[v] = t;
      }
      // Through internal::UintField/BoolField: a field of another type makes the metadata unusable, where
      // nlohmann's value() would throw and end the process.
      const std::optional<uint64_t> latest_field = internal::UintField(*data, "latest_version", 0);
      const std::optional<uint64_t> floor_field = internal::UintField(*data, "min_decryption_version", 1);
      const std::optional<bool> encrypts = internal::BoolField(*data, "supports_encryption", true);
      good = good && latest_field.has_value() && floor_field.has_value() && encrypts.has_value();
      latest = latest_field.value_or(0);
      min_decryption = std::max<uint64_t>(1, floor_field.value_or(1));
      good = good && latest > 0 && created.count(latest) == 1;
      if (encrypts == false) {
        status = absl::FailedPreconditionError(
            absl::StrCat(Describe(), " does not support encryption; fix: use an aes256-gcm96 key"));
      }
    }
    if (status.ok() && !good) {
      status = absl::UnavailableError(
          absl::StrCat("reading ", Describe(), ": Vault at ", response->address, " returned unusable key metadata"));
    }
  }

  std::vector<std::pair<const char*, std::string>> events;  // emitted once the lock is released
  absl::Status result;
  {
    absl::MutexLock lock(&mu_);
    if (!status.ok()) {
      refresh_error_ = std::string(status.message());
      if (!failing_) {
        failing_ = true;
        events.push_back({core::event::kUnavailable, absl::StrCat("reading ", Describe(), " failed: ",
                                                                  status.message())});
      }
      result = status;
    } else {
      // The view Vault gives now. Vault lists only versions >= min_decryption_version (older ones are archived:
      // keysutil handleArchiving deletes them from p.Keys, formatKeyPolicy lists p.Keys), so the versions of
      // the old view below the floor are retired by that floor, not gone: they stay, as retired.
      std::vector<core::KeyVersion> fresh;
      for (const auto& [version, when] : created) {
        const core::KeyState state = version < min_decryption ? core::KeyState::kRetired
                                     : version == latest     ? core::KeyState::kCurrent
                                                             : core::KeyState::kActive;
        fresh.push_back(MakeVersion(version, when, state));
      }
      for (const core::KeyVersion& was : versions_) {
        if (was.version < min_decryption && created.count(was.version) == 0) {
          core::KeyVersion retired = was;
          retired.state = core::KeyState::kRetired;
          fresh.push_back(std::move(retired));
        }
      }
      vault_created_ = created;
      auto advanced = core::CheckAdvance(versions_, fresh, Describe());
      if (!advanced.ok()) {
        if (refused_ != advanced.status().message()) {
          refused_ = std::string(advanced.status().message());
          events.push_back({core::event::kVersionViewRefused, refused_});
        }
        refresh_error_ = refused_;
        result = advanced.status();
      } else {
        const bool first = versions_.empty();
        versions_ = std::move(advanced->versions);
        min_decryption_ = min_decryption;
        loaded_ = true;
        refresh_error_.clear();
        refused_.clear();
        last_refresh_ = clock_->Now();
        if (!first && !advanced->change.empty()) {
          events.push_back({core::event::kKeyVersionsChanged,
                            absl::StrCat(Describe(), ": ", advanced->change.Summary())});
        }
      }
      if (failing_) {
        failing_ = false;
        events.push_back({core::event::kRecovered, absl::StrCat(Describe(), " can be read again")});
      }
    }
  }
  for (auto& [name, message] : events) {
    const bool warning = name == core::event::kUnavailable || name == core::event::kVersionViewRefused;
    Emit(name, std::move(message), warning);
  }
  return result;
}

void VaultKeySource::BackgroundTick() {
  bool due;
  {
    absl::MutexLock lock(&mu_);
    const absl::Time now = clock_->Now();
    if (!loaded_ || failing_) {
      // Retried every second while failing (at most every poll interval when that is shorter), so recovery is
      // noticed within one poll interval of Vault coming back.
      absl::Duration every = absl::Seconds(1);
      if (options_.poll_interval > absl::ZeroDuration()) {
        every = std::min(every, options_.poll_interval);
      } else if (loaded_) {
        every = absl::InfiniteDuration();  // polling is off: calls find out
      }
      due = now - last_attempt_ >= every;
    } else {
      due = options_.poll_interval > absl::ZeroDuration() && now - last_refresh_ >= options_.poll_interval &&
            now - last_attempt_ >= std::min(options_.poll_interval, absl::Seconds(1));
    }
  }
  if (due) {
    (void)Refresh(absl::Now() + std::min(options_.request_timeout, absl::Seconds(10)));
  }
}

namespace {

constexpr char kNoStaging[] =
    "a vault key source cannot stage a key version: every control-plane node reads the same Transit key, so there "
    "is no per-node copy to distribute and no window to close; fix: use plain `kmsplugin rotate`, which is safe on "
    "Vault";

}  // namespace

bool VaultKeySource::HealUnknown(std::string_view key_ref, absl::Time deadline) {
  uint64_t number;
  int64_t created;
  if (!ParseKeyRef(Sv(key_ref), &number, &created).ok()) {
    return false;
  }
  std::vector<core::KeyVersion> known;
  {
    absl::MutexLock lock(&mu_);
    known = versions_;
  }
  return heal_.MaybeReread(number, known, [&] { return Refresh(deadline); });
}

absl::StatusOr<core::KeyVersion> VaultKeySource::Stage(absl::Time /*deadline*/) {
  return absl::FailedPreconditionError(kNoStaging);
}

absl::StatusOr<core::KeyVersion> VaultKeySource::Promote(absl::Time /*deadline*/) {
  return absl::FailedPreconditionError(kNoStaging);
}

absl::StatusOr<core::KeyVersion> VaultKeySource::Rotate(absl::Time deadline) {
  auto response = client_->Call("POST", absl::StrCat(KeyPath("keys"), "/rotate"), "", deadline);
  if (!response.ok()) {
    return response.status();
  }
  if (response->status != 200 && response->status != 204) {
    return VaultClient::ErrorStatus(*response, absl::StrCat("rotating ", Describe()));
  }
  if (absl::Status s = Refresh(deadline); !s.ok()) {
    return s;
  }
  return Current();
}

absl::Status VaultKeySource::PostMinDecryptionVersion(uint64_t floor, absl::Time deadline) {
  auto response = client_->Call("POST", absl::StrCat(KeyPath("keys"), "/config"),
                                absl::StrCat("{\"min_decryption_version\":", floor, "}"), deadline);
  if (!response.ok()) {
    return response.status();
  }
  if (response->status != 200 && response->status != 204) {
    absl::Status refused = VaultClient::ErrorStatus(
        *response, absl::StrCat("setting min_decryption_version of ", Describe(), " to ", floor));
    // 400: the key's own settings forbid it (e.g. min_encryption_version below the new floor).
    return response->status == 400 ? absl::FailedPreconditionError(refused.message()) : refused;
  }
  return Refresh(deadline);
}

absl::StatusOr<std::vector<core::KeyVersion>> VaultKeySource::SetMinDecryptionVersion(
    uint64_t version, absl::StatusOr<std::vector<core::KeyVersion>> (*select)(const std::vector<core::KeyVersion>&,
                                                                               uint64_t),
    uint64_t floor, absl::Time deadline) {
  // Decided on Vault's metadata as it is now (the caller refreshed), not on a view up to a poll interval old.
  auto versions = Versions();
  if (!versions.ok()) {
    return versions.status();
  }
  auto changed = select(*versions, version);
  if (!changed.ok() || changed->empty()) {
    return changed;
  }
  if (absl::Status s = PostMinDecryptionVersion(floor, deadline); !s.ok()) {
    return s;
  }
  for (core::KeyVersion& v : *changed) {
    auto now = Lookup(v.key_ref);
    if (!now.ok()) {
      return now.status();
    }
    v = *now;
  }
  return changed;
}

absl::StatusOr<std::vector<core::KeyVersion>> VaultKeySource::Retire(uint64_t version, absl::Time deadline) {
  if (absl::Status s = Refresh(deadline); !s.ok()) {
    return s;
  }
  return SetMinDecryptionVersion(version, core::VersionsToRetire, version + 1, deadline);
}

absl::StatusOr<std::vector<core::KeyVersion>> VaultKeySource::Reinstate(uint64_t version, absl::Time deadline) {
  if (absl::Status s = Refresh(deadline); !s.ok()) {
    return s;
  }
  uint64_t floor;
  bool listed;
  {
    absl::MutexLock lock(&mu_);
    floor = min_decryption_;
    listed = core::FindVersionNumber(versions_, version).has_value();
  }
  if (listed || version == 0 || version >= floor) {
    return SetMinDecryptionVersion(version, core::VersionsToReinstate, version, deadline);
  }
  // Archived by Vault before this process could see it listed (the retire ran in another process: the previous
  // `kmsplugin retire`, or a daemon before its restart). The floor says it exists and is retired; lowering the
  // floor to it brings it back, and every archived version above it, listed again by Vault with their creation
  // times, so their key_ids are the ones their ciphertexts carry. Vault refuses (400) a version it trimmed.
  if (absl::Status s = PostMinDecryptionVersion(version, deadline); !s.ok()) {
    return s;
  }
  std::vector<core::KeyVersion> back;
  {
    absl::MutexLock lock(&mu_);
    for (const core::KeyVersion& v : versions_) {
      if (v.version >= version && v.version < floor) {
        back.push_back(v);
      }
    }
  }
  if (back.empty() || back.front().version != version) {
    return absl::NotFoundError(absl::StrCat(Describe(), " does not list version ", version,
                                            " after its min_decryption_version was lowered to it (trimmed?)"));
  }
  return back;
}

absl::StatusOr<std::vector<core::KeyVersion>> VaultKeySource::DestroyRetired(uint64_t version, absl::Time deadline) {
  (void)deadline;
  return absl::UnimplementedError(absl::StrCat(
      Describe(), ": kmsplugin does not destroy Vault key versions; a retired version stays recoverable with "
      "`kmsplugin retire --reinstate`. To delete versions up to ", version, " for good, use Vault's trim yourself: "
      "`vault write ", options_.transit_mount, "/keys/", options_.key_name, "/trim min_available_version=",
      version + 1, "` (it needs min_encryption_version set and at least that high)"));
}

absl::StatusOr<std::string> VaultKeySource::Wrap(const core::KeyVersion& version, std::string_view plaintext,
                                                 std::string_view associated_data, absl::Time deadline) {
  uint64_t number;
  int64_t created;
  if (absl::Status s = ParseKeyRef(version.key_ref, &number, &created); !s.ok()) {
    return s;
  }
  if (plaintext.empty() || associated_data.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("refusing to encrypt with ", Describe(), ": the ",
                                                   plaintext.empty() ? "plaintext" : "associated data",
                                                   " is empty"));
  }
  // "vault:vN:" + base64(nonce[12] || ciphertext || tag[16]) must fit in kMaxWrappedBytes (backends.md A3).
  const size_t wrapped_size =
      absl::StrCat("vault:v", number, ":").size() + 4 * ((12 + plaintext.size() + 16 + 2) / 3);
  if (wrapped_size > kMaxWrappedBytes) {
    return absl::InvalidArgumentError(absl::StrCat("refusing to encrypt ", plaintext.size(), " bytes with ",
                                                   Describe(), ": the Transit ciphertext would be ", wrapped_size,
                                                   " bytes, more than ", kMaxWrappedBytes));
  }
  {
    absl::MutexLock lock(&mu_);
    if (loaded_ && number < min_decryption_) {
      return absl::FailedPreconditionError(absl::StrCat("key version ", number, " of ", Describe(),
                                                        " is retired (", FloorDetail(),
                                                        "); refusing to encrypt under it"));
    }
    if (absl::Status s = CheckIdentity(number, created); !s.ok()) {
      return s;
    }
  }
  std::string encoded = Base64(Sv(plaintext));
  std::string body = absl::StrCat("{\"plaintext\":\"", encoded, "\",\"associated_data\":\"", Base64(Sv(associated_data)),
                                  "\",\"key_version\":", number, "}");
  WipeString(encoded);
  auto response = client_->Call("POST", KeyPath("encrypt"), std::move(body), deadline);
  if (!response.ok()) {
    return response.status();
  }
  if (response->status != 200) {
    absl::Status s = VaultClient::ErrorStatus(*response, absl::StrCat("encrypting with ", Describe(), " version ",
                                                                      number));
    if (response->status == 400) {
      return absl::FailedPreconditionError(s.message());
    }
    return s;
  }
  // Not const: nlohmann's const operator[] on a missing key is undefined behaviour (an assert in debug builds), and a
  // 200 answer without "data" reached it (tests/fuzz/regressions/vault_response_fuzz/encrypt-200-without-data).
  nlohmann::json& body_json = response->body;
  if (!body_json.is_object() || !body_json["data"].is_object() || !body_json["data"]["ciphertext"].is_string()) {
    return absl::UnavailableError(absl::StrCat("encrypting with ", Describe(), ": Vault at ", response->address,
                                               " returned no data.ciphertext"));
  }
  std::string ciphertext = body_json["data"]["ciphertext"].get<std::string>();
  std::string prefix = absl::StrCat("vault:v", number, ":");
  if (!absl::StartsWith(ciphertext, prefix) || ciphertext.size() > kMaxWrappedBytes) {
    return absl::UnavailableError(absl::StrCat("encrypting with ", Describe(), ": Vault at ", response->address,
                                               " returned a ciphertext that does not start with ", prefix,
                                               " or is too long"));
  }
  return ciphertext;
}

absl::StatusOr<crypto::SecretBytes> VaultKeySource::Unwrap(std::string_view key_ref, std::string_view wrapped,
                                                           std::string_view associated_data, absl::Time deadline) {
  uint64_t number;
  int64_t created;
  if (absl::Status s = ParseKeyRef(Sv(key_ref), &number, &created); !s.ok()) {
    return s;
  }
  if (associated_data.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("refusing to decrypt with ", Describe(),
                                                   ": the associated data is empty"));
  }
  std::string prefix = absl::StrCat("vault:v", number, ":");
  if (!absl::StartsWith(Sv(wrapped), prefix) || wrapped.size() > kMaxWrappedBytes) {
    {
      // A key_ref naming a version this source does not have: say that, rather than blame the bytes.
      absl::MutexLock lock(&mu_);
      if (loaded_ && number >= min_decryption_ && !core::FindVersionNumber(versions_, number)) {
        return absl::FailedPreconditionError(
            absl::StrCat(Describe(), " has no key version ", number, " (the ciphertext names it)"));
      }
    }
    return absl::InvalidArgumentError(absl::StrCat(
        "wrapped key is not a Transit ciphertext of version ", number, " (expected the prefix ", prefix, ")"));
  }
  for (char c : wrapped) {
    if (!absl::ascii_isprint(static_cast<unsigned char>(c))) {
      return absl::InvalidArgumentError("wrapped key holds non-printable bytes");
    }
  }
  {
    absl::MutexLock lock(&mu_);
    if (loaded_) {
      std::optional<core::KeyVersion> known = core::FindVersionNumber(versions_, number);
      if (known && known->key_ref != Sv(key_ref)) {
        return absl::FailedPreconditionError(absl::StrCat(
            Describe(), " key version ", number, " was created at ", absl::ToUnixSeconds(known->created),
            ", but the ciphertext names one created at ", created,
            ": the key was deleted and re-created, so this ciphertext cannot be decrypted"));
      }
      if (absl::Status s = CheckIdentity(number, created); !s.ok()) {
        return s;
      }
      if (number < min_decryption_ || (known && known->state == core::KeyState::kRetired)) {
        return core::RetiredVersionError(known ? *known : MakeVersion(number, created, core::KeyState::kRetired),
                                         FloorDetail());
      }
    }
  }
  nlohmann::json ct = std::string(wrapped);
  std::string body = absl::StrCat("{\"ciphertext\":", ct.dump(), ",\"associated_data\":\"", Base64(Sv(associated_data)),
                                  "\"}");
  auto response = client_->Call("POST", KeyPath("decrypt"), std::move(body), deadline);
  if (!response.ok()) {
    return response.status();
  }
  if (response->status != 200) {
    std::string errors = response->Errors();
    if (response->status == 400 && (absl::StrContains(errors, "too old") || absl::StrContains(errors, "disallowed"))) {
      // Vault raised min_decryption_version after our last refresh (keysutil ErrTooOld).
      return core::RetiredVersionError(MakeVersion(number, created, core::KeyState::kRetired),
                                       absl::StrCat("Vault's min_decryption_version is above it: ", errors));
    }
    if (response->status == 400 && absl::StrContains(errors, "too new")) {
      return absl::FailedPreconditionError(absl::StrCat(Describe(), " has no key version ", number,
                                                        " (Vault: ", errors, "); was the key re-created?"));
    }
    if (response->status == 400 && absl::StrContains(errors, "key not found")) {
      return absl::FailedPreconditionError(
          absl::StrCat(Describe(), " not found at ", response->address, ": ", errors));
    }
    return VaultClient::ErrorStatus(*response, absl::StrCat("decrypting with ", Describe(), " version ", number));
  }
  nlohmann::json& data = response->body.is_object() ? response->body["data"] : response->body;
  if (!data.is_object() || !data["plaintext"].is_string()) {
    return absl::UnavailableError(absl::StrCat("decrypting with ", Describe(), ": Vault at ", response->address,
                                               " returned no data.plaintext"));
  }
  std::string& encoded = data["plaintext"].get_ref<std::string&>();
  std::string decoded;
  bool ok = absl::Base64Unescape(encoded, &decoded);
  WipeString(encoded);
  if (!ok) {
    WipeString(decoded);
    return absl::UnavailableError(absl::StrCat("decrypting with ", Describe(), ": Vault at ", response->address,
                                               " returned a plaintext that is not base64"));
  }
  crypto::SecretBytes out = crypto::SecretBytes::CopyOf(decoded);
  WipeString(decoded);
  return out;
}

}  // namespace kmsplugin::keysource::vault

namespace kmsplugin::keysource::vault {

std::vector<core::BackendGauge> VaultKeySource::BackendGauges() const {
  const absl::Duration ttl = client_->TokenTimeToLive();
  return {{"kmsplugin_vault_token_ttl_seconds", "Seconds left on the Vault token (+Inf: it does not expire).",
           ttl == absl::InfiniteDuration() ? std::numeric_limits<double>::infinity() : absl::ToDoubleSeconds(ttl)}};
}

}  // namespace kmsplugin::keysource::vault
