// VaultClient's token upkeep: the token file, logins, lookup-self and renew-self, and the background thread that
// keeps the token alive from the TTL Vault reports (vault_client.h). Requests go through VaultClient::Send.

#include <algorithm>
#include <optional>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "kmsplugin/core/sv.h"
#include "kmsplugin/keysource/vault/client_util.h"
#include "kmsplugin/keysource/vault/vault_client.h"

namespace kmsplugin::keysource::vault {

using internal::BoolField;
using internal::IntField;
using internal::JsonString;
using internal::Uniform;

absl::Duration VaultClient::CheckEvery() const {
  return options_.poll_interval > absl::ZeroDuration() ? options_.poll_interval : absl::Minutes(1);
}

std::string VaultClient::CredentialName() const {
  switch (options_.auth.kind) {
    case AuthKind::kToken: return absl::StrCat("the token from ", options_.auth.token_file);
    case AuthKind::kAppRole: return absl::StrCat("the token from the AppRole login at ", AuthMountPath());
    case AuthKind::kJwt: return absl::StrCat("the token from the JWT login at ", AuthMountPath());
    case AuthKind::kCert: return absl::StrCat("the token from the certificate login at ", AuthMountPath());
  }
  return "the token";
}

std::string VaultClient::AuthMountPath() const {
  std::string mount = options_.auth.mount;
  if (mount.empty()) {
    switch (options_.auth.kind) {
      case AuthKind::kAppRole: mount = "approle"; break;
      case AuthKind::kJwt: mount = "kubernetes"; break;
      case AuthKind::kCert: mount = "cert"; break;
      case AuthKind::kToken: mount = "token"; break;
    }
  }
  return absl::StrCat("auth/", mount, "/login");
}

absl::StatusOr<crypto::SecretBytes> VaultClient::CurrentToken(absl::Time deadline, uint64_t* generation) {
  if (options_.auth.kind == AuthKind::kToken) {
    bool changed = false;
    {
      absl::MutexLock file(&file_mu_);
      // issue 15: one stat of the token file per second at most, not one per call. A 403 re-reads it at once.
      const absl::Time now = clock_->Now();
      if (!file_stamp_.has_value() || now - file_checked_ >= absl::Seconds(1)) {
        if (absl::Status s = LoadTokenFile(/*force=*/false, &changed); !s.ok()) {
          return s;
        }
        file_checked_ = now;
      }
    }
    if (changed) {
      Emit(core::event::kCredentialReloaded,
           absl::StrCat("picked up a new Vault token from ", options_.auth.token_file),
           {{"file", options_.auth.token_file}});
    }
  } else {
    bool need_login;
    {
      absl::MutexLock lock(&mu_);
      need_login = token_.empty() || clock_->Now() >= expire_;
    }
    if (need_login) {
      absl::MutexLock login(&login_mu_);
      bool still;
      {
        absl::MutexLock lock(&mu_);
        still = token_.empty() || clock_->Now() >= expire_;
      }
      if (still) {
        if (absl::Status s = Login(deadline); !s.ok()) {
          return s;
        }
      }
    }
  }
  absl::MutexLock lock(&mu_);
  *generation = generation_;
  return crypto::SecretBytes::CopyOf(token_.view());
}

absl::Status VaultClient::LoadTokenFile(bool force, bool* changed) {
  const std::string& path = options_.auth.token_file;
  *changed = false;
  if (!force && file_stamp_.has_value()) {
    std::optional<keysource::FileStamp> stamp = keysource::StatStamp(path);
    if (stamp.has_value() && *stamp == *file_stamp_) {
      return absl::OkStatus();
    }
  }
  auto file = ReadCredentialFile(path, "Vault token file");
  if (!file.ok()) {
    return file.status();
  }
  file_stamp_ = file->stamp;
  absl::MutexLock lock(&mu_);
  if (!token_.Equals(file->bytes)) {
    *changed = !token_.empty();
    token_ = std::move(file->bytes);
    ++generation_;
    // Learn the new token's TTL from Vault soon (background lookup-self).
    lease_ = absl::ZeroDuration();
    renewable_ = false;
    capped_ = false;
    expire_ = absl::InfiniteFuture();
    renew_at_ = absl::InfiniteFuture();
    verify_at_ = clock_->Now();
  }
  return absl::OkStatus();
}

void VaultClient::Report(absl::Duration remaining, absl::Duration lease, bool renewable) {
  const absl::Time now = clock_->Now();
  const bool can_login = options_.auth.kind != AuthKind::kToken;
  renewable_ = renewable;
  renew_failures_ = 0;
  if (remaining <= absl::ZeroDuration()) {  // a token that never expires (root, periodic without TTL)
    expire_ = absl::InfiniteFuture();
    renew_at_ = absl::InfiniteFuture();
    grace_ = absl::ZeroDuration();
    verify_at_ = now + CheckEvery();  // still re-checked: it can be revoked
    return;
  }
  lease_ = std::max(lease, remaining);
  expire_ = now + remaining;
  grace_ = lease_ * Uniform(0.1, 0.2);
  if (renewable && !capped_) {
    // Renew once two thirds of the lease are gone, by Vault's count (LifetimeWatcher's schedule).
    renew_at_ = now + std::max(absl::ZeroDuration(), remaining - lease_ / 3);
  } else if (can_login) {
    renew_at_ = now + std::max(absl::ZeroDuration(), remaining - grace_);  // time to log in again
  } else {
    renew_at_ = absl::InfiniteFuture();
  }
  // Re-read the TTL at least every poll interval, and more often as the end nears (a suspended host or a skewed
  // clock makes the local countdown wrong; Vault's is the one that counts).
  verify_at_ = now + std::min(CheckEvery(), std::max(remaining / 2, absl::Seconds(1)));
}

absl::Status VaultClient::Login(absl::Time deadline) {
  const AuthOptions& auth = options_.auth;
  std::string body;
  std::optional<keysource::FileStamp> secret_stamp;
  switch (auth.kind) {
    case AuthKind::kToken:
      return absl::InternalError("Login called for token auth");
    case AuthKind::kAppRole: {
      auto role_id = ReadCredentialFile(auth.role_id_file, "AppRole role_id file");
      if (!role_id.ok()) {
        return role_id.status();
      }
      auto secret_id = ReadCredentialFile(auth.secret_id_file, "AppRole secret_id file");
      if (!secret_id.ok()) {
        return secret_id.status();
      }
      secret_stamp = secret_id->stamp;
      std::string r = JsonString(Sv(role_id->bytes.view())), s = JsonString(Sv(secret_id->bytes.view()));
      body = absl::StrCat("{\"role_id\":", r, ",\"secret_id\":", s, "}");
      WipeString(r);
      WipeString(s);
      break;
    }
    case AuthKind::kJwt: {
      auto jwt = ReadCredentialFile(auth.jwt_file, "JWT file");
      if (!jwt.ok()) {
        return jwt.status();
      }
      std::string j = JsonString(Sv(jwt->bytes.view()));
      body = absl::StrCat("{\"role\":", JsonString(auth.role), ",\"jwt\":", j, "}");
      WipeString(j);
      break;
    }
    case AuthKind::kCert:
      body = auth.cert_name.empty() ? "{}" : absl::StrCat("{\"name\":", JsonString(auth.cert_name), "}");
      break;
  }
  std::string path = AuthMountPath();
  auto response = Send("POST", path, body, nullptr, deadline);
  WipeString(body);
  if (!response.ok()) {
    return absl::Status(response.status().code(),
                        absl::StrCat("Vault login at ", path, " failed: ", response.status().message()));
  }
  if (response->status != 200) {
    std::string message = absl::StrCat("Vault refused the login at ", path, " (", response->address, " answered HTTP ",
                                       response->status, ": ", response->Errors(),
                                       "); fix: check the role and the credential files");
    return absl::PermissionDeniedError(message);
  }
  nlohmann::json& j = response->body;
  if (!j.is_object() || !j.contains("auth") || !j["auth"].is_object() || !j["auth"].contains("client_token") ||
      !j["auth"]["client_token"].is_string()) {
    return absl::UnavailableError(absl::StrCat("Vault login at ", path, " returned no auth.client_token"));
  }
  std::string& token = j["auth"]["client_token"].get_ref<std::string&>();
  crypto::SecretBytes secret = crypto::SecretBytes::CopyOf(token);
  WipeString(token);
  const std::optional<int64_t> lease_field = IntField(j["auth"], "lease_duration", 0);
  const std::optional<bool> renewable_field = BoolField(j["auth"], "renewable", false);
  if (!lease_field.has_value() || !renewable_field.has_value()) {
    return absl::UnavailableError(absl::StrCat("Vault login at ", path,
                                               " returned an auth.lease_duration or auth.renewable of the wrong type"));
  }
  const int64_t lease = *lease_field;
  const bool renewable = *renewable_field;
  const bool new_secret = secret_stamp.has_value() && secret_stamp_.has_value() && *secret_stamp != *secret_stamp_;
  if (secret_stamp.has_value()) {
    secret_stamp_ = secret_stamp;
  }
  {
    absl::MutexLock lock(&mu_);
    token_ = std::move(secret);
    ++generation_;
    capped_ = false;
    Report(absl::Seconds(lease), absl::Seconds(lease), renewable);
  }
  if (new_secret) {
    Emit(core::event::kCredentialReloaded,
         absl::StrCat("logged in with a new AppRole secret_id from ", auth.secret_id_file),
         {{"file", auth.secret_id_file}});
  }
  return absl::OkStatus();
}

absl::Status VaultClient::LookupSelf(absl::Time deadline) {
  crypto::SecretBytes token;
  uint64_t generation;
  {
    absl::MutexLock lock(&mu_);
    token = crypto::SecretBytes::CopyOf(token_.view());
    generation = generation_;
  }
  auto response = Send("GET", "auth/token/lookup-self", "", &token, deadline);
  if (!response.ok()) {
    return response.status();
  }
  if (response->status == 403) {
    return absl::PermissionDeniedError(absl::StrCat(
        "token invalid or expired: Vault at ", response->address, " refused ", CredentialName(),
        " (lookup-self: HTTP 403: ", response->Errors(), ")",
        options_.auth.kind == AuthKind::kToken
            ? absl::StrCat("; fix: write a valid, unexpired token to ", options_.auth.token_file)
            : ""));
  }
  if (response->status != 200) {
    return ErrorStatus(*response, "token lookup-self");
  }
  const nlohmann::json& data = response->body.is_object() ? response->body["data"] : nlohmann::json();
  const nlohmann::json none = nlohmann::json::object();
  const nlohmann::json& fields = data.is_object() ? data : none;
  const std::optional<int64_t> ttl_field = IntField(fields, "ttl", 0);
  const std::optional<int64_t> creation_ttl_field = IntField(fields, "creation_ttl", 0);
  const std::optional<bool> renewable_field = BoolField(fields, "renewable", false);
  if (!ttl_field.has_value() || !creation_ttl_field.has_value() || !renewable_field.has_value()) {
    return absl::UnavailableError(absl::StrCat("token lookup-self: Vault at ", response->address,
                                               " returned a data.ttl, data.creation_ttl or data.renewable of the "
                                               "wrong type"));
  }
  const int64_t ttl = *ttl_field;
  const int64_t creation_ttl = *creation_ttl_field;
  const bool renewable = *renewable_field;
  absl::MutexLock lock(&mu_);
  if (generation == generation_) {
    absl::Duration lease = std::max(absl::Seconds(creation_ttl), lease_);
    Report(absl::Seconds(ttl), lease, renewable);
  }
  return absl::OkStatus();
}

absl::Status VaultClient::Authenticate(absl::Time deadline) {
  if (options_.auth.kind == AuthKind::kToken) {
    {
      absl::MutexLock file(&file_mu_);
      bool changed = false;
      if (absl::Status s = LoadTokenFile(/*force=*/true, &changed); !s.ok()) {
        return s;
      }
      file_checked_ = clock_->Now();
    }
    return LookupSelf(deadline);
  }
  absl::MutexLock login(&login_mu_);
  return Login(deadline);
}

absl::Status VaultClient::Reauthenticate(absl::Time deadline, uint64_t generation, const VaultResponse& refused) {
  bool changed = false;
  {
    absl::MutexLock login(&login_mu_);
    {
      absl::MutexLock lock(&mu_);
      if (generation_ != generation) {
        return absl::OkStatus();  // another caller already has a fresh token
      }
    }
    if (options_.auth.kind == AuthKind::kToken) {
      absl::MutexLock file(&file_mu_);
      if (absl::Status s = LoadTokenFile(/*force=*/true, &changed); !s.ok()) {
        return s;
      }
      file_checked_ = clock_->Now();
      if (!changed) {
        return absl::PermissionDeniedError(absl::StrCat(
            "token invalid or expired: Vault at ", refused.address, " refused the token from ",
            options_.auth.token_file, " (HTTP 403: ", refused.Errors(), "); fix: write a valid, unexpired token to ",
            options_.auth.token_file));
      }
    } else if (absl::Status s = Login(deadline); !s.ok()) {
      return s;
    }
  }
  if (options_.auth.kind == AuthKind::kToken) {
    Emit(core::event::kCredentialReloaded,
         absl::StrCat("picked up a new Vault token from ", options_.auth.token_file,
                      " after Vault refused the old one as invalid or expired"),
         {{"file", options_.auth.token_file}});
  } else {
    Emit(core::event::kRelogin,
         absl::StrCat("logged in again at ", AuthMountPath(), " after Vault at ", refused.address,
                      " refused the token as invalid or expired"),
         {{"path", AuthMountPath()}, {"address", refused.address}});
  }
  return absl::OkStatus();
}

absl::Duration VaultClient::TokenTimeToLive() const {
  absl::MutexLock lock(&mu_);
  if (expire_ == absl::InfiniteFuture()) {
    return absl::InfiniteDuration();
  }
  return std::max(absl::ZeroDuration(), expire_ - clock_->Now());
}

void VaultClient::TokenDead(uint64_t generation, absl::Time deadline) {
  bool changed = false;
  absl::Status result;
  {
    absl::MutexLock login(&login_mu_);
    {
      absl::MutexLock lock(&mu_);
      if (generation_ != generation) {
        return;  // a caller already replaced it
      }
    }
    if (options_.auth.kind == AuthKind::kToken) {
      absl::MutexLock file(&file_mu_);
      result = LoadTokenFile(/*force=*/true, &changed);
      file_checked_ = clock_->Now();
      if (result.ok() && !changed) {
        // Nothing better on disk: calls fail PERMISSION_DENIED ("token invalid or expired") until the file
        // changes; its stamp is checked on every call (at most once a second) and here at each check.
        absl::MutexLock lock(&mu_);
        renew_at_ = absl::InfiniteFuture();
        verify_at_ = clock_->Now() + std::min(CheckEvery(), absl::Seconds(5));
        return;
      }
    } else {
      result = Login(deadline);
    }
  }
  if (!result.ok()) {
    absl::MutexLock lock(&mu_);
    verify_at_ = clock_->Now() + std::min(CheckEvery(), absl::Seconds(5));
    return;
  }
  if (options_.auth.kind == AuthKind::kToken) {
    Emit(core::event::kCredentialReloaded,
         absl::StrCat("picked up a new Vault token from ", options_.auth.token_file,
                      " after Vault reported the old one invalid or expired"),
         {{"file", options_.auth.token_file}});
    (void)LookupSelf(deadline);
  } else {
    Emit(core::event::kRelogin,
         absl::StrCat("logged in again at ", AuthMountPath(), " because Vault reported the token invalid or expired"),
         {{"path", AuthMountPath()}});
  }
}

void VaultClient::VerifyOnce() {
  uint64_t generation;
  bool empty;
  {
    absl::MutexLock lock(&mu_);
    generation = generation_;
    empty = token_.empty();
    verify_at_ = clock_->Now() + std::min(CheckEvery(), absl::Seconds(5));  // until a report reschedules it
  }
  if (empty) {
    return;
  }
  absl::Time deadline = absl::Now() + std::min(options_.request_timeout, absl::Seconds(10));
  absl::Status s = LookupSelf(deadline);
  if (s.code() == absl::StatusCode::kPermissionDenied) {
    TokenDead(generation, deadline);
  }
}

void VaultClient::RenewOnce() {
  // Only the background thread renews; login_mu_ is held only around logins, so callers never wait for a
  // renew-self round trip.
  auto login = [this](absl::Time deadline) {
    absl::MutexLock lock(&login_mu_);
    return Login(deadline);
  };
  absl::Time now = clock_->Now();
  crypto::SecretBytes token;
  bool renewable, capped;
  absl::Duration lease, grace, remaining;
  uint64_t generation;
  {
    absl::MutexLock lock(&mu_);
    if (now < renew_at_) {
      return;
    }
    generation = generation_;
    token = crypto::SecretBytes::CopyOf(token_.view());
    renewable = renewable_;
    capped = capped_;
    lease = lease_;
    grace = grace_;
    remaining = expire_ == absl::InfiniteFuture() ? absl::InfiniteDuration() : expire_ - now;
  }
  const bool can_login = options_.auth.kind != AuthKind::kToken;
  absl::Time deadline = absl::Now() + std::min(options_.request_timeout, absl::Seconds(10));
  absl::Status result;
  if (token.empty()) {
    absl::MutexLock lock(&mu_);
    renew_at_ = absl::InfiniteFuture();
    return;
  }
  if (renewable && !capped) {
    std::string body = absl::StrCat("{\"increment\":\"", absl::ToInt64Seconds(lease), "s\"}");
    auto response = Send("POST", "auth/token/renew-self", body, &token, deadline);
    bool malformed = false;
    if (response.ok() && response->status == 200 && response->body.is_object() &&
        response->body["auth"].is_object()) {
      nlohmann::json& auth = response->body["auth"];
      if (auth.contains("client_token") && auth["client_token"].is_string()) {
        WipeString(auth["client_token"].get_ref<std::string&>());
      }
      const std::optional<int64_t> lease_field = IntField(auth, "lease_duration", 0);
      const std::optional<bool> renewable_field = BoolField(auth, "renewable", false);
      malformed = !lease_field.has_value() || !renewable_field.has_value();
    }
    if (!malformed && response.ok() && response->status == 200 && response->body.is_object() &&
        response->body["auth"].is_object()) {
      const nlohmann::json& auth = response->body["auth"];
      absl::Duration new_lease = absl::Seconds(*IntField(auth, "lease_duration", 0));
      bool still_renewable = *BoolField(auth, "renewable", false);
      {
        absl::MutexLock lock(&mu_);
        if (generation != generation_) {
          return;  // a caller logged in meanwhile; that token has its own lease
        }
        // Vault granted less than asked: the max TTL is near, renewing again cannot extend it (LifetimeWatcher
        // stops renewing then too); log in again before the end, or (token file) let it run out.
        capped_ = new_lease > absl::ZeroDuration() && new_lease + absl::Seconds(1) < lease;
        Report(new_lease, lease, still_renewable);
      }
      Emit(core::event::kTokenRenewed,
           absl::StrCat("renewed ", CredentialName(), " for ", absl::FormatDuration(new_lease)),
           {{"ttl_seconds", absl::StrCat(absl::ToInt64Seconds(new_lease))}});
      return;
    }
    if (response.ok() && response->status == 403) {
      TokenDead(generation, deadline);  // Vault says the token is gone: do not wait for the next call to find out
      return;
    }
    result = malformed     ? absl::UnavailableError(absl::StrCat("token renew-self: Vault at ", response->address,
                                                                 " returned an auth.lease_duration or auth.renewable "
                                                                 "of the wrong type"))
             : response.ok() ? ErrorStatus(*response, "token renew-self")
                             : response.status();
  } else if (can_login) {
    result = login(deadline);  // non-renewable or at its max TTL: time to log in again
    if (result.ok()) {
      return;
    }
  } else {
    absl::MutexLock lock(&mu_);
    renew_at_ = absl::InfiniteFuture();
    return;
  }
  // Renewal (or login) failed: log in again when the lease is nearly gone, else back off.
  if (can_login && (remaining <= grace * 2 || result.code() == absl::StatusCode::kPermissionDenied)) {
    if (login(deadline).ok()) {
      return;
    }
  }
  absl::MutexLock lock(&mu_);
  ++renew_failures_;
  absl::Duration wait = absl::Seconds(10);
  for (int i = 1; i < renew_failures_ && wait < absl::Minutes(5); ++i) {
    wait *= 2;
  }
  wait = std::min(wait, absl::Minutes(5));
  if (remaining != absl::InfiniteDuration()) {
    wait = std::min(wait, std::max(remaining / 3, absl::Milliseconds(100)));
  }
  renew_at_ = clock_->Now() + wait * Uniform(0.8, 1.0);
  verify_at_ = std::max(verify_at_, renew_at_);  // a lookup would only reschedule the renewal that just failed
}

void VaultClient::StartBackground(std::function<void()> tick, absl::Duration tick_every) {
  {
    absl::MutexLock lock(&bg_mu_);
    stop_ = false;
  }
  background_ = std::thread([this, tick = std::move(tick), tick_every] { BackgroundLoop(tick, tick_every); });
}

void VaultClient::StopBackground() {
  {
    absl::MutexLock lock(&bg_mu_);
    stop_ = true;
  }
  if (background_.joinable()) {
    background_.join();
  }
}

void VaultClient::UpkeepOnce() {
  bool renew_due, verify_due;
  {
    absl::MutexLock lock(&mu_);
    const absl::Time now = clock_->Now();
    renew_due = now >= renew_at_;
    verify_due = now >= verify_at_;
  }
  if (renew_due) {
    RenewOnce();
  } else if (verify_due) {
    VerifyOnce();
  }
}

void VaultClient::BackgroundLoop(std::function<void()> tick, absl::Duration tick_every) {
  absl::Time next_tick = clock_->Now() + tick_every;
  for (;;) {
    {
      absl::MutexLock lock(&bg_mu_);
      auto stopped = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(bg_mu_) { return stop_; };
      bg_mu_.AwaitWithTimeout(absl::Condition(&stopped), absl::Milliseconds(50));
      if (stop_) {
        return;
      }
    }
    UpkeepOnce();
    if (tick && tick_every > absl::ZeroDuration() && clock_->Now() >= next_tick) {
      tick();
      next_tick = clock_->Now() + tick_every;
    }
  }
}

}  // namespace kmsplugin::keysource::vault
