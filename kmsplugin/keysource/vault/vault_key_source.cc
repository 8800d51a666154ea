#include "kmsplugin/keysource/vault/vault_key_source.h"

#include <algorithm>
#include <limits>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "kmsplugin/core/sv.h"
#include "kmsplugin/core/version_rules.h"

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

VaultKeySource::VaultKeySource(std::unique_ptr<VaultClient> client, core::Clock* clock)
    : client_(std::move(client)), clock_(clock), options_(client_->options()) {}

VaultKeySource::~VaultKeySource() { client_->StopBackground(); }

absl::StatusOr<std::shared_ptr<VaultKeySource>> VaultKeySource::Open(VaultOptions options, core::Clock* clock,
                                                                     int worker_threads, bool background) {
  auto client = VaultClient::New(std::move(options), clock, static_cast<size_t>(std::max(1, worker_threads)));
  if (!client.ok()) {
    return client.status();
  }
  std::shared_ptr<VaultKeySource> source(new VaultKeySource(std::move(*client), clock));
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
  if (absl::Status s = (*client)->Authenticate(deadline); !s.ok()) {
    return s;
  }
  const std::string path = absl::StrCat(options.transit_mount, "/keys/", options.key_name);
  const std::string where = absl::StrCat("Vault transit key ", path, " at ", options.addresses.front(),
                                         options.vault_namespace.empty() ? "" : " namespace ",
                                         options.vault_namespace);
  auto read = (*client)->Call("GET", path, "", deadline);
  if (!read.ok()) {
    return read.status();
  }
  if (read->status == 200) {
    int64_t latest = read->body.is_object() && read->body["data"].is_object()
                         ? read->body["data"].value("latest_version", int64_t{0})
                         : 0;
    return absl::AlreadyExistsError(absl::StrCat(where, " already exists (latest version ", latest,
                                                 "); nothing was changed"));
  }
  if (read->status != 404) {
    return VaultClient::ErrorStatus(*read, absl::StrCat("reading ", where));
  }
  auto created = (*client)->Call("POST", path, "{\"type\":\"aes256-gcm96\"}", deadline);
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

core::KeyVersion VaultKeySource::MakeVersion(uint64_t version, int64_t created) const {
  core::KeyVersion v;
  v.version = version;
  v.created = absl::FromUnixSeconds(created);
  v.key_ref = absl::StrCat("v", version, "@", created);
  v.key_id = absl::StrCat("vault:", options_.vault_namespace.empty() ? "" : options_.vault_namespace + "/",
                          options_.transit_mount, "/", options_.key_name, ":v", version, ":", created);
  v.state = version < min_decryption_ ? core::KeyState::kRetired
            : version == latest_      ? core::KeyState::kCurrent
                                      : core::KeyState::kActive;
  return v;
}

absl::StatusOr<core::KeyVersion> VaultKeySource::Current() const {
  absl::MutexLock lock(&mu_);
  if (!loaded_) {
    return absl::UnavailableError(absl::StrCat(Describe(), ": no key version known yet: ", refresh_error_));
  }
  auto it = created_.find(latest_);
  if (it == created_.end()) {
    return absl::FailedPreconditionError(
        absl::StrCat(Describe(), ": latest_version ", latest_, " is missing from the key's versions"));
  }
  return MakeVersion(latest_, it->second);
}

absl::StatusOr<core::KeyVersion> VaultKeySource::Lookup(std::string_view key_ref) const {
  uint64_t version;
  int64_t created;
  if (absl::Status s = ParseKeyRef(Sv(key_ref), &version, &created); !s.ok()) {
    return s;
  }
  absl::MutexLock lock(&mu_);
  auto it = created_.find(version);
  if (it == created_.end() || it->second != created) {
    return absl::NotFoundError(absl::StrCat(Describe(), " has no version ", Sv(key_ref)));
  }
  return MakeVersion(version, created);
}

absl::StatusOr<std::vector<core::KeyVersion>> VaultKeySource::Versions() const {
  absl::MutexLock lock(&mu_);
  if (!loaded_) {
    return absl::UnavailableError(absl::StrCat(Describe(), ": versions not known yet: ", refresh_error_));
  }
  std::vector<core::KeyVersion> out;
  for (const auto& [version, created] : created_) {
    out.push_back(MakeVersion(version, created));
  }
  return out;
}

absl::Status VaultKeySource::Refresh(absl::Time deadline) {
  auto response = client_->Call("GET", KeyPath("keys"), "", deadline);
  absl::Status status;
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
    std::map<uint64_t, int64_t> created;
    uint64_t latest = 0, min_decryption = 1;
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
      latest = data->value("latest_version", uint64_t{0});
      min_decryption = std::max<uint64_t>(1, data->value("min_decryption_version", uint64_t{1}));
      good = good && latest > 0 && created.count(latest) == 1;
      if (data->value("supports_encryption", true) == false) {
        status = absl::FailedPreconditionError(
            absl::StrCat(Describe(), " does not support encryption; fix: use an aes256-gcm96 key"));
      }
    }
    if (status.ok() && !good) {
      status = absl::UnavailableError(
          absl::StrCat("reading ", Describe(), ": Vault at ", response->address, " returned unusable key metadata"));
    }
    if (status.ok()) {
      absl::MutexLock lock(&mu_);
      // An older view (a lagging replica) never moves the current version back for the same key.
      bool same_key = !created_.empty() && created.count(created_.begin()->first) == 1 &&
                      created[created_.begin()->first] == created_.begin()->second;
      if (!(loaded_ && same_key && latest < latest_)) {
        created_ = std::move(created);
        latest_ = latest;
        min_decryption_ = min_decryption;
      }
      loaded_ = true;
      refresh_error_.clear();
      last_refresh_ = clock_->Now();
      return absl::OkStatus();
    }
  }
  absl::MutexLock lock(&mu_);
  refresh_error_ = std::string(status.message());
  return status;
}

void VaultKeySource::BackgroundTick() {
  bool due;
  {
    absl::MutexLock lock(&mu_);
    due = !loaded_ || (options_.poll_interval > absl::ZeroDuration() &&
                       clock_->Now() - last_refresh_ >= options_.poll_interval);
    if (!loaded_ && clock_->Now() - last_refresh_ < absl::Seconds(1)) {
      due = false;
    }
    if (!loaded_) {
      last_refresh_ = clock_->Now();  // rate-limit retries while Vault is unreachable
    }
  }
  if (due) {
    (void)Refresh(absl::Now() + std::min(options_.request_timeout, absl::Seconds(10)));
  }
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

absl::StatusOr<std::vector<core::KeyVersion>> VaultKeySource::SetMinDecryptionVersion(
    uint64_t version, absl::StatusOr<std::vector<core::KeyVersion>> (*select)(const std::vector<core::KeyVersion>&,
                                                                               uint64_t),
    uint64_t floor, absl::Time deadline) {
  // Decided on Vault's metadata as it is now, not on a view up to a poll interval old.
  if (absl::Status s = Refresh(deadline); !s.ok()) {
    return s;
  }
  auto versions = Versions();
  if (!versions.ok()) {
    return versions.status();
  }
  auto changed = select(*versions, version);
  if (!changed.ok() || changed->empty()) {
    return changed;
  }
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
  if (absl::Status s = Refresh(deadline); !s.ok()) {
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
  return SetMinDecryptionVersion(version, core::VersionsToRetire, version + 1, deadline);
}

absl::StatusOr<std::vector<core::KeyVersion>> VaultKeySource::Reinstate(uint64_t version, absl::Time deadline) {
  return SetMinDecryptionVersion(version, core::VersionsToReinstate, version, deadline);
}

absl::StatusOr<std::string> VaultKeySource::Wrap(const core::KeyVersion& version, std::string_view plaintext,
                                                 std::string_view associated_data, absl::Time deadline) {
  uint64_t number;
  int64_t created;
  if (absl::Status s = ParseKeyRef(version.key_ref, &number, &created); !s.ok()) {
    return s;
  }
  {
    absl::MutexLock lock(&mu_);
    if (loaded_ && number < min_decryption_) {
      return absl::FailedPreconditionError(absl::StrCat(Describe(), " version ", number,
                                                        " is retired (below min_decryption_version ",
                                                        min_decryption_, "); refusing to encrypt under it"));
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
  const nlohmann::json& body_json = response->body;
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
  std::string prefix = absl::StrCat("vault:v", number, ":");
  if (!absl::StartsWith(Sv(wrapped), prefix) || wrapped.size() > kMaxWrappedBytes) {
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
      auto it = created_.find(number);
      if (it != created_.end() && it->second != created) {
        return absl::FailedPreconditionError(absl::StrCat(
            Describe(), " version ", number, " was created at ", it->second, ", but the ciphertext names one created at ",
            created, ": the key was deleted and re-created, so this ciphertext cannot be decrypted"));
      }
      if (number < min_decryption_) {
        return absl::FailedPreconditionError(absl::StrCat(Describe(), " version ", number,
                                                          " is retired (below min_decryption_version ",
                                                          min_decryption_, "); fix: lower min_decryption_version "
                                                          "if this data must still be read"));
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
      return absl::FailedPreconditionError(absl::StrCat(Describe(), " version ", number,
                                                        " is retired in Vault (below min_decryption_version): ",
                                                        errors));
    }
    if (response->status == 400 && absl::StrContains(errors, "too new")) {
      return absl::FailedPreconditionError(absl::StrCat(Describe(), " has no version ", number,
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
