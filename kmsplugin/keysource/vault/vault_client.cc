#include "kmsplugin/keysource/vault/vault_client.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <random>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "kmsplugin/core/sv.h"

namespace kmsplugin::keysource::vault {
namespace {

double Uniform(double lo, double hi) {
  thread_local std::mt19937_64 gen{std::random_device{}()};
  return std::uniform_real_distribution<double>(lo, hi)(gen);
}

bool IsRetryableStatus(long status) {
  return status == 412 || status == 429 || (status >= 500 && status != 501) || status == 0;
}

bool IsRedirect(long status) { return status == 301 || status == 302 || status == 307 || status == 308; }

// JSON string literal of `value` (escaped). The caller wipes the result if `value` is secret.
std::string JsonString(absl::string_view value) {
  nlohmann::json j = std::string(value);
  std::string out = j.dump();
  WipeString(j.get_ref<std::string&>());
  return out;
}

// Splits "scheme://host[:port]" into its parts; the port defaults by scheme.
struct ParsedAddress {
  std::string scheme, host, port;
};
ParsedAddress ParseAddress(absl::string_view address) {
  ParsedAddress p;
  size_t sep = address.find("://");
  p.scheme = std::string(address.substr(0, sep));
  absl::string_view rest = address.substr(sep == absl::string_view::npos ? 0 : sep + 3);
  size_t slash = rest.find('/');
  rest = rest.substr(0, slash);
  size_t colon = rest.rfind(':');
  if (colon != absl::string_view::npos && rest.find(']', colon) == absl::string_view::npos) {
    p.host = std::string(rest.substr(0, colon));
    p.port = std::string(rest.substr(colon + 1));
  } else {
    p.host = std::string(rest);
    p.port = p.scheme == "https" ? "443" : "80";
  }
  return p;
}

}  // namespace

std::string VaultResponse::Errors() const {
  std::vector<std::string> out;
  if (body.is_object() && body.contains("errors") && body["errors"].is_array()) {
    for (const auto& e : body["errors"]) {
      if (e.is_string()) {
        std::string s = e.get<std::string>();
        absl::StrReplaceAll({{"\n\t* ", " "}, {"\n", " "}}, &s);
        out.push_back(std::string(absl::StripAsciiWhitespace(s)));
      }
    }
  }
  return absl::StrJoin(out, "; ");
}

absl::StatusOr<keysource::SecretFile> ReadCredentialFile(const std::string& path, std::string_view what) {
  keysource::SecretFileOptions options;
  options.printable_only = true;
  options.trim_blanks = true;
  auto file = keysource::ReadSecretFile(path, what, options);
  if (!file.ok() && file.status().code() == absl::StatusCode::kNotFound) {
    // A missing credential is the operator's to fix, like every other refusal (KeySource error policy).
    return absl::FailedPreconditionError(file.status().message());
  }
  return file;
}

absl::StatusOr<std::unique_ptr<VaultClient>> VaultClient::New(VaultOptions options, core::Clock* clock,
                                                              size_t max_concurrency, core::EventSink* events) {
  if (options.addresses.empty()) {
    return absl::InvalidArgumentError("no Vault address given");
  }
  if (!options.tls.key_file.empty()) {
    // The owner and mode checks, on the opened file (curl reads it again itself).
    keysource::SecretFileOptions pem;
    pem.trim_newlines = false;
    auto key = keysource::ReadSecretFile(options.tls.key_file, "TLS client key file", pem);
    if (!key.ok()) {
      return absl::FailedPreconditionError(key.status().message());
    }
  }
  auto transport = HttpTransport::New(options.tls, max_concurrency + 2);  // + renewal thread + spare
  if (!transport.ok()) {
    return transport.status();
  }
  return std::unique_ptr<VaultClient>(
      new VaultClient(std::move(options), clock, std::move(*transport), events));
}

VaultClient::VaultClient(VaultOptions options, core::Clock* clock, std::unique_ptr<HttpTransport> transport,
                         core::EventSink* events)
    : options_(std::move(options)),
      clock_(clock),
      transport_(std::move(transport)),
      events_(events != nullptr ? events : &core::NullEventSink()) {}

void VaultClient::Emit(const char* name, std::string message,
                       std::vector<std::pair<std::string, std::string>> fields, bool warning) const {
  core::SourceEvent e;
  e.name = name;
  e.message = std::move(message);
  e.fields = std::move(fields);
  e.warning = warning;
  events_->Emit(e);
}

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

VaultClient::~VaultClient() { StopBackground(); }

absl::Duration VaultClient::Backoff(int attempt) const {
  absl::Duration base = options_.retry.min_wait;
  for (int i = 1; i < attempt && base < options_.retry.max_wait; ++i) {
    base *= 2;
  }
  base = std::min(base, options_.retry.max_wait);
  return base * Uniform(0.5, 1.0);
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

HttpResponse VaultClient::SendOnce(const std::string& url, const std::string& connect_to, absl::string_view method,
                                   const std::string& body, const crypto::SecretBytes* token,
                                   absl::Duration timeout, absl::Time deadline) {
  HttpRequest request;
  request.method = std::string(method);
  request.url = url;
  request.connect_to = connect_to;
  request.body = body;
  request.headers.push_back("X-Vault-Request: true");
  if (!options_.vault_namespace.empty()) {
    request.headers.push_back(absl::StrCat("X-Vault-Namespace: ", options_.vault_namespace));
  }
  if (token != nullptr && !token->empty()) {
    request.headers.push_back(absl::StrCat("X-Vault-Token: ", Sv(token->view())));
  }
  HttpResponse response = transport_->Send(request, timeout, deadline);
  WipeString(request.body);
  return response;
}

void VaultClient::NoteAnswered(const std::string& address, absl::string_view reason) {
  std::string before;
  {
    absl::MutexLock lock(&route_mu_);
    if (last_answered_ == address) {
      return;
    }
    before = std::exchange(last_answered_, address);
  }
  if (!before.empty()) {
    Emit(core::event::kFailover,
         absl::StrCat("Vault requests now go to ", address, " instead of ", before, " (", reason, ")"),
         {{"from", before}, {"to", address}, {"reason", std::string(reason)}});
  }
}

void VaultClient::LearnActive(const std::string& standby, const std::string& base) {
  const ParsedAddress learnt = ParseAddress(base);
  for (size_t i = 0; i < options_.addresses.size(); ++i) {
    const ParsedAddress configured = ParseAddress(options_.addresses[i]);
    if (configured.scheme == learnt.scheme && configured.host == learnt.host && configured.port == learnt.port) {
      preferred_.store(i);
      absl::MutexLock lock(&route_mu_);
      remembered_.clear();
      return;
    }
  }
  // Not a configured address: Vault's api_addr of the active node, named by a configured (trusted) standby over
  // the same or a stronger scheme (Send refused https -> http). It is kept in memory only, for this client's
  // lifetime, and forgotten at its first failure; the configuration is never changed by it.
  (void)standby;
  absl::MutexLock lock(&route_mu_);
  remembered_ = base;
}

absl::StatusOr<VaultResponse> VaultClient::Send(absl::string_view method, absl::string_view path,
                                                const std::string& body, const crypto::SecretBytes* token,
                                                absl::Time deadline) {
  const size_t n = options_.addresses.size();
  size_t index = preferred_.load() % n;
  size_t tried_in_round = 0;
  int round = 0;
  int throttled = 0;
  std::vector<std::string> errors;
  auto summary = [&errors]() { return absl::StrJoin(errors.end() - std::min<size_t>(errors.size(), 4), errors.end(), "; "); };
  auto parse = [](HttpResponse& h, const std::string& answered_by) {
    VaultResponse response;
    response.status = h.status;
    response.address = answered_by;
    if (!h.body.empty()) {
      response.body = nlohmann::json::parse(h.body, nullptr, /*allow_exceptions=*/false);
      if (response.body.is_discarded()) {
        response.body = nullptr;
      }
    }
    WipeString(h.body);
    return response;
  };
  const std::string suffix = absl::StrCat("/v1/", path);

  // The active node a standby redirected us to earlier: asked first, once; forgotten when it fails.
  std::string remembered;
  {
    absl::MutexLock lock(&route_mu_);
    remembered = remembered_;
  }
  if (!remembered.empty()) {
    absl::Duration remaining = deadline - absl::Now();
    absl::Duration timeout = std::min(options_.request_timeout, std::max(remaining / 2, absl::Milliseconds(100)));
    HttpResponse h = SendOnce(absl::StrCat(remembered, suffix), "", method, body, token, timeout, deadline);
    if (h.transport.ok() && !IsRetryableStatus(h.status) && !IsRedirect(h.status)) {
      NoteAnswered(remembered, "redirected there by a standby");
      return parse(h, remembered);
    }
    errors.push_back(h.transport.ok() ? absl::StrCat(remembered, " answered HTTP ", h.status)
                                      : std::string(h.transport.message()));
    WipeString(h.body);
    absl::MutexLock lock(&route_mu_);
    if (remembered_ == remembered) {
      remembered_.clear();
    }
  }

  for (;;) {
    absl::Time now = absl::Now();
    if (now >= deadline) {
      return absl::DeadlineExceededError(
          absl::StrCat("deadline passed before Vault answered ", method, " ", path,
                       errors.empty() ? "" : absl::StrCat(" (", summary(), ")")));
    }
    absl::Duration remaining = deadline - now;
    absl::Duration timeout = std::min(options_.request_timeout, remaining);
    if (n > 1 && tried_in_round + 1 < n) {
      timeout = std::min(timeout, std::max(remaining / 2, absl::Milliseconds(100)));
    }
    const std::string& address = options_.addresses[index];
    ParsedAddress parsed = ParseAddress(address);
    std::string url, connect_to;
    if (!options_.tls.server_name.empty() && parsed.scheme == "https") {
      url = absl::StrCat("https://", options_.tls.server_name, ":", parsed.port, suffix);
      connect_to = absl::StrCat(options_.tls.server_name, ":", parsed.port, ":", parsed.host, ":", parsed.port);
    } else {
      url = absl::StrCat(address, suffix);
    }
    HttpResponse h = SendOnce(url, connect_to, method, body, token, timeout, deadline);
    std::string answered_by = address;
    std::string learnt;  // the redirect target's "scheme://host:port", when it answered
    if (h.transport.ok() && IsRedirect(h.status) && !h.location.empty()) {
      std::string location = h.location;
      if (absl::StartsWith(location, "/")) {
        location = absl::StrCat(address, location);
      }
      if (parsed.scheme == "https" && !absl::StartsWith(location, "https://")) {
        return absl::UnavailableError(absl::StrCat("Vault at ", address, " redirected ", method, " ", path,
                                                   " from https to ", location,
                                                   ", which is refused; fix: set the standby's api_addr to https"));
      }
      absl::Duration left = deadline - absl::Now();
      h = SendOnce(location, "", method, body, token, std::min(options_.request_timeout, left), deadline);
      answered_by = location;
      // Vault's standby puts the active node's api_addr in front of the request URI (handler.go respondStandby),
      // so the active node's base is the Location minus "/v1/<path>" (and any query).
      absl::string_view target = location;
      target = target.substr(0, target.find('?'));
      if (absl::EndsWith(target, suffix)) {
        learnt = std::string(target.substr(0, target.size() - suffix.size()));
        answered_by = learnt;
      }
      if (h.transport.ok() && IsRedirect(h.status)) {
        h.transport = absl::UnavailableError(
            absl::StrCat("Vault at ", address, " redirected twice (to ", location, "); only one redirect is followed"));
        learnt.clear();
      }
    }
    if (!h.transport.ok()) {
      if (h.transport.code() == absl::StatusCode::kDeadlineExceeded || !h.retryable) {
        if (!errors.empty()) {
          return absl::Status(h.transport.code(), absl::StrCat(h.transport.message(), " (earlier: ", summary(), ")"));
        }
        return h.transport;
      }
      errors.push_back(std::string(h.transport.message()));
    } else {
      VaultResponse response = parse(h, answered_by);
      if (!IsRetryableStatus(response.status)) {
        preferred_.store(index);
        if (!learnt.empty() && learnt != address) {
          LearnActive(address, learnt);
          NoteAnswered(learnt, absl::StrCat("the standby at ", address, " redirected there"));
        } else {
          NoteAnswered(address, errors.empty() ? "it answered" : absl::StrCat("after: ", summary()));
        }
        return response;
      }
      std::string errs = response.Errors();
      errors.push_back(absl::StrCat(answered_by, " answered HTTP ", response.status, errs.empty() ? "" : ": ", errs));
      if (response.status == 429 || response.status == 412) {
        ++throttled;
        if (throttled > options_.retry.max_retries) {
          return absl::UnavailableError(absl::StrCat("Vault kept refusing ", method, " ", path, " after ", throttled,
                                                     " attempts: ", summary()));
        }
        absl::Duration wait = h.retry_after.value_or(Backoff(throttled));
        if (absl::Now() + wait >= deadline) {
          return absl::UnavailableError(absl::StrCat("Vault asked to retry ", method, " ", path, " after ",
                                                     absl::FormatDuration(wait),
                                                     ", past the deadline: ", summary()));
        }
        absl::SleepFor(wait);
        continue;
      }
    }
    // Failover: the next address at once; after a full round, back off.
    ++tried_in_round;
    index = (index + 1) % n;
    if (tried_in_round < n) {
      continue;
    }
    tried_in_round = 0;
    ++round;
    if (round > options_.retry.max_retries) {
      return absl::UnavailableError(absl::StrCat("no Vault address could serve ", method, " ", path, " after ",
                                                 round, " round(s): ", summary()));
    }
    absl::Duration wait = Backoff(round);
    if (absl::Now() + wait >= deadline) {
      return absl::UnavailableError(absl::StrCat("no Vault address could serve ", method, " ", path,
                                                 " before the deadline: ", summary()));
    }
    absl::SleepFor(wait);
  }
}

namespace {

// The ACL capability Vault checks for `method` on `path` (Vault maps POST/PUT to create or update, GET to read).
std::string CapabilityFor(absl::string_view method, absl::string_view path) {
  if (method == "GET") {
    return "read";
  }
  if (method == "DELETE") {
    return "delete";
  }
  if (method == "LIST") {
    return "list";
  }
  std::vector<absl::string_view> parts = absl::StrSplit(path, '/');
  if (parts.size() == 3 && parts[1] == "keys") {
    return "create";  // writing <mount>/keys/<name> creates the key (kmsplugin init)
  }
  return "update";
}

}  // namespace

absl::StatusOr<std::vector<std::string>> VaultClient::ProbeToken(const crypto::SecretBytes& token,
                                                                 absl::Time deadline) {
  auto response = Send("GET", "auth/token/lookup-self", "", &token, deadline);
  if (!response.ok()) {
    return response.status();
  }
  if (response->status == 403) {
    return absl::PermissionDeniedError(response->Errors());
  }
  if (response->status != 200) {
    return ErrorStatus(*response, "token lookup-self");
  }
  std::vector<std::string> policies;
  const nlohmann::json& data = response->body.is_object() ? response->body["data"] : nlohmann::json();
  if (data.is_object() && data.contains("policies") && data["policies"].is_array()) {
    for (const auto& p : data["policies"]) {
      if (p.is_string()) {
        policies.push_back(p.get<std::string>());
      }
    }
  }
  return policies;
}

absl::StatusOr<VaultResponse> VaultClient::Call(absl::string_view method, absl::string_view path, std::string body,
                                                absl::Time deadline, bool authenticated) {
  bool reauthenticated = false;
  for (;;) {
    uint64_t generation = 0;
    crypto::SecretBytes token;
    if (authenticated) {
      auto t = CurrentToken(deadline, &generation);
      if (!t.ok()) {
        WipeString(body);
        return t.status();
      }
      token = std::move(*t);
    }
    auto response = Send(method, path, body, authenticated ? &token : nullptr, deadline);
    if (!response.ok()) {
      WipeString(body);
      return response.status();
    }
    if (!authenticated || response->status != 403) {
      WipeString(body);
      return response;
    }
    // Vault answers 403 both when the token's policies do not grant the path and when the token is invalid or
    // expired; since hashicorp/vault#26687 (2024) the latter adds "invalid token" to the errors. Without it (an
    // older Vault, or a real ACL denial) lookup-self, which every token's default policy allows, tells them apart.
    const std::string errors = response->Errors();
    bool invalid = absl::StrContains(errors, "invalid token");
    if (!invalid) {
      auto policies = ProbeToken(token, deadline);
      if (policies.ok()) {
        WipeString(body);
        const std::string capability = CapabilityFor(method, path);
        return absl::PermissionDeniedError(absl::StrCat(
            "permission denied by policy: Vault at ", response->address, " refused ", method, " ", path,
            options_.vault_namespace.empty() ? "" : absl::StrCat(" (namespace ", options_.vault_namespace, ")"),
            " with HTTP 403 (", errors, ") although ", CredentialName(),
            " is valid (lookup-self works; its policies: ", absl::StrJoin(*policies, ", "),
            "); fix: grant \"", capability, "\" on ", path, " in one of those policies, e.g. path \"", path,
            "\" { capabilities = [\"", capability, "\"] }"));
      }
      invalid = policies.status().code() == absl::StatusCode::kPermissionDenied;
      if (!invalid) {
        WipeString(body);
        return absl::Status(policies.status().code(),
                            absl::StrCat("Vault at ", response->address, " refused ", method, " ", path,
                                         " with HTTP 403 (", errors,
                                         "), and lookup-self could not tell whether the token is still valid: ",
                                         policies.status().message()));
      }
    }
    if (!reauthenticated) {
      reauthenticated = true;
      if (absl::Status s = Reauthenticate(deadline, generation, *response); !s.ok()) {
        WipeString(body);
        return s;
      }
      continue;
    }
    WipeString(body);
    return absl::PermissionDeniedError(absl::StrCat(
        "token invalid or expired: Vault at ", response->address, " refused ", method, " ", path,
        " with HTTP 403 even after a fresh login (", errors, "); fix: check that the role's token_ttl is not "
        "shorter than a request and that nothing revokes its tokens"));
  }
}

absl::Status VaultClient::ErrorStatus(const VaultResponse& response, absl::string_view what) {
  std::string message = absl::StrCat(what, ": Vault at ", response.address, " answered HTTP ", response.status);
  std::string errors = response.Errors();
  if (!errors.empty()) {
    absl::StrAppend(&message, ": ", errors);
  }
  switch (response.status) {
    case 400: return absl::InvalidArgumentError(message);
    case 403: return absl::PermissionDeniedError(message);
    case 404: return absl::FailedPreconditionError(message);
    default: return absl::UnavailableError(message);
  }
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
  int64_t lease = j["auth"].value("lease_duration", int64_t{0});
  bool renewable = j["auth"].value("renewable", false);
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
  int64_t ttl = data.is_object() ? data.value("ttl", int64_t{0}) : 0;
  int64_t creation_ttl = data.is_object() ? data.value("creation_ttl", int64_t{0}) : 0;
  bool renewable = data.is_object() ? data.value("renewable", false) : false;
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
    if (response.ok() && response->status == 200 && response->body.is_object() &&
        response->body["auth"].is_object()) {
      nlohmann::json& auth = response->body["auth"];
      if (auth.contains("client_token") && auth["client_token"].is_string()) {
        WipeString(auth["client_token"].get_ref<std::string&>());
      }
      absl::Duration new_lease = absl::Seconds(auth.value("lease_duration", int64_t{0}));
      bool still_renewable = auth.value("renewable", false);
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
    result = response.ok() ? ErrorStatus(*response, "token renew-self") : response.status();
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
    if (tick && tick_every > absl::ZeroDuration() && clock_->Now() >= next_tick) {
      tick();
      next_tick = clock_->Now() + tick_every;
    }
  }
}

}  // namespace kmsplugin::keysource::vault
