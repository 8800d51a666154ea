#include "kmsplugin/keysource/vault/vault_client.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <random>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "kmsplugin/core/sv.h"

namespace kmsplugin::keysource::vault {
namespace {

constexpr size_t kMaxCredentialBytes = 64 * 1024;

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

absl::Status CheckCredentialFile(const std::string& path, absl::string_view what) {
  struct stat st;
  if (stat(path.c_str(), &st) != 0) {
    return absl::FailedPreconditionError(absl::StrCat("cannot read the ", what, " file ", path, ": ",
                                                      strerror(errno), "; fix: create it or correct the path"));
  }
  if (!S_ISREG(st.st_mode)) {
    return absl::FailedPreconditionError(
        absl::StrCat("the ", what, " file ", path, " is not a regular file; fix: point at the file itself"));
  }
  if ((st.st_mode & 077) != 0) {
    char mode[8];
    snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 07777));
    return absl::FailedPreconditionError(absl::StrCat("the ", what, " file ", path, " has mode ", mode,
                                                      ", so group or others can access it; fix: chmod 600 ", path));
  }
  return absl::OkStatus();
}

absl::StatusOr<crypto::SecretBytes> ReadCredentialFile(const std::string& path, absl::string_view what) {
  if (absl::Status s = CheckCredentialFile(path, what); !s.ok()) {
    return s;
  }
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot open the ", what, " file ", path, ": ", strerror(errno), "; fix: check its owner"));
  }
  crypto::SecretBytes buffer(kMaxCredentialBytes);
  size_t used = 0;
  while (used < buffer.size()) {
    ssize_t n = read(fd, buffer.data() + used, buffer.size() - used);
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n <= 0) {
      break;
    }
    used += static_cast<size_t>(n);
  }
  close(fd);
  if (used == buffer.size()) {
    return absl::FailedPreconditionError(absl::StrCat("the ", what, " file ", path, " is larger than 64 KiB"));
  }
  absl::string_view content(reinterpret_cast<const char*>(buffer.data()), used);
  content = absl::StripAsciiWhitespace(content);
  if (content.empty()) {
    return absl::FailedPreconditionError(
        absl::StrCat("the ", what, " file ", path, " is empty; fix: write the credential into it"));
  }
  for (char c : content) {
    if (!absl::ascii_isprint(static_cast<unsigned char>(c))) {
      return absl::FailedPreconditionError(absl::StrCat("the ", what, " file ", path,
                                                        " holds non-printable characters; fix: write only the "
                                                        "credential, on one line"));
    }
  }
  return crypto::SecretBytes::CopyOf(std::string_view(content.data(), content.size()));
}

absl::StatusOr<std::unique_ptr<VaultClient>> VaultClient::New(VaultOptions options, core::Clock* clock,
                                                              size_t max_concurrency) {
  if (options.addresses.empty()) {
    return absl::InvalidArgumentError("no Vault address given");
  }
  if (!options.tls.key_file.empty()) {
    if (absl::Status s = CheckCredentialFile(options.tls.key_file, "TLS client key"); !s.ok()) {
      return s;
    }
  }
  auto transport = HttpTransport::New(options.tls, max_concurrency + 2);  // + renewal thread + spare
  if (!transport.ok()) {
    return transport.status();
  }
  return std::unique_ptr<VaultClient>(new VaultClient(std::move(options), clock, std::move(*transport)));
}

VaultClient::VaultClient(VaultOptions options, core::Clock* clock, std::unique_ptr<HttpTransport> transport)
    : options_(std::move(options)), clock_(clock), transport_(std::move(transport)) {}

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
      url = absl::StrCat("https://", options_.tls.server_name, ":", parsed.port, "/v1/", path);
      connect_to = absl::StrCat(options_.tls.server_name, ":", parsed.port, ":", parsed.host, ":", parsed.port);
    } else {
      url = absl::StrCat(address, "/v1/", path);
    }
    HttpResponse h = SendOnce(url, connect_to, method, body, token, timeout, deadline);
    std::string answered_by = address;
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
      if (h.transport.ok() && IsRedirect(h.status)) {
        h.transport = absl::UnavailableError(
            absl::StrCat("Vault at ", address, " redirected twice (to ", location, "); only one redirect is followed"));
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
      if (!IsRetryableStatus(h.status)) {
        preferred_.store(index);
        return response;
      }
      std::string errs = response.Errors();
      errors.push_back(absl::StrCat(answered_by, " answered HTTP ", h.status, errs.empty() ? "" : ": ", errs));
      if (h.status == 429 || h.status == 412) {
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
    if (authenticated && response->status == 403) {
      if (!reauthenticated) {
        reauthenticated = true;
        if (absl::Status s = Reauthenticate(deadline, generation, *response); !s.ok()) {
          WipeString(body);
          return s;
        }
        continue;
      }
      WipeString(body);
      return absl::PermissionDeniedError(absl::StrCat("Vault at ", response->address, " refused ", method, " ",
                                                      path, " with HTTP 403 even after a fresh login: ",
                                                      response->Errors(),
                                                      "; fix: grant the role's policy 'update' on this path"));
    }
    WipeString(body);
    return response;
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
    absl::MutexLock file(&file_mu_);
    bool changed = false;
    if (absl::Status s = LoadTokenFile(/*force=*/false, deadline, &changed); !s.ok()) {
      return s;
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

absl::Status VaultClient::LoadTokenFile(bool force, absl::Time deadline, bool* changed) {
  (void)deadline;
  const std::string& path = options_.auth.token_file;
  struct stat st;
  if (stat(path.c_str(), &st) != 0) {
    return absl::FailedPreconditionError(absl::StrCat("cannot read the Vault token file ", path, ": ",
                                                      strerror(errno), "; fix: create it or correct auth.token.file"));
  }
  int64_t mtime_ns = static_cast<int64_t>(st.st_mtim.tv_sec) * 1'000'000'000 + st.st_mtim.tv_nsec;
  bool same = mtime_ns == file_mtime_ns_ && st.st_size == file_size_ && st.st_ino == file_inode_;
  *changed = false;
  if (same && !force) {
    return absl::OkStatus();
  }
  auto token = ReadCredentialFile(path, "Vault token");
  if (!token.ok()) {
    return token.status();
  }
  file_mtime_ns_ = mtime_ns;
  file_size_ = st.st_size;
  file_inode_ = st.st_ino;
  absl::MutexLock lock(&mu_);
  if (!token_.Equals(*token)) {
    token_ = std::move(*token);
    ++generation_;
    *changed = true;
    // Learn the new token's lease soon (background lookup-self).
    lease_ = absl::ZeroDuration();
    renewable_ = false;
    expire_ = absl::InfiniteFuture();
    renew_at_ = clock_->Now();
  }
  return absl::OkStatus();
}

void VaultClient::SetLease(absl::Duration lease, bool renewable) {
  absl::Time now = clock_->Now();
  lease_ = lease;
  renewable_ = renewable;
  renew_failures_ = 0;
  if (lease <= absl::ZeroDuration()) {  // a token that never expires (root, periodic without TTL)
    expire_ = absl::InfiniteFuture();
    renew_at_ = absl::InfiniteFuture();
    grace_ = absl::ZeroDuration();
    return;
  }
  expire_ = now + lease;
  grace_ = lease * Uniform(0.1, 0.2);
  if (renewable) {
    renew_at_ = now + lease * 2 / 3;
  } else if (options_.auth.kind != AuthKind::kToken) {
    renew_at_ = expire_ - grace_;  // time to log in again
  } else {
    renew_at_ = absl::InfiniteFuture();
  }
}

absl::Status VaultClient::Login(absl::Time deadline) {
  const AuthOptions& auth = options_.auth;
  std::string body;
  switch (auth.kind) {
    case AuthKind::kToken:
      return absl::InternalError("Login called for token auth");
    case AuthKind::kAppRole: {
      auto role_id = ReadCredentialFile(auth.role_id_file, "AppRole role_id");
      if (!role_id.ok()) {
        return role_id.status();
      }
      auto secret_id = ReadCredentialFile(auth.secret_id_file, "AppRole secret_id");
      if (!secret_id.ok()) {
        return secret_id.status();
      }
      std::string r = JsonString(Sv(role_id->view())), s = JsonString(Sv(secret_id->view()));
      body = absl::StrCat("{\"role_id\":", r, ",\"secret_id\":", s, "}");
      WipeString(r);
      WipeString(s);
      break;
    }
    case AuthKind::kJwt: {
      auto jwt = ReadCredentialFile(auth.jwt_file, "JWT");
      if (!jwt.ok()) {
        return jwt.status();
      }
      std::string j = JsonString(Sv(jwt->view()));
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
  absl::MutexLock lock(&mu_);
  token_ = std::move(secret);
  ++generation_;
  SetLease(absl::Seconds(lease), renewable);
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
  if (response->status != 200) {
    return ErrorStatus(*response, "token lookup-self");
  }
  const nlohmann::json& data = response->body.is_object() ? response->body["data"] : nlohmann::json();
  int64_t ttl = data.is_object() ? data.value("ttl", int64_t{0}) : 0;
  bool renewable = data.is_object() ? data.value("renewable", false) : false;
  absl::MutexLock lock(&mu_);
  if (generation == generation_) {
    SetLease(absl::Seconds(ttl), renewable);
  }
  return absl::OkStatus();
}

absl::Status VaultClient::Authenticate(absl::Time deadline) {
  if (options_.auth.kind == AuthKind::kToken) {
    {
      absl::MutexLock file(&file_mu_);
      bool changed = false;
      if (absl::Status s = LoadTokenFile(/*force=*/true, deadline, &changed); !s.ok()) {
        return s;
      }
    }
    return LookupSelf(deadline);
  }
  absl::MutexLock login(&login_mu_);
  return Login(deadline);
}

absl::Status VaultClient::Reauthenticate(absl::Time deadline, uint64_t generation, const VaultResponse& refused) {
  absl::MutexLock login(&login_mu_);
  {
    absl::MutexLock lock(&mu_);
    if (generation_ != generation) {
      return absl::OkStatus();  // another caller already has a fresh token
    }
  }
  if (options_.auth.kind == AuthKind::kToken) {
    absl::MutexLock file(&file_mu_);
    bool changed = false;
    if (absl::Status s = LoadTokenFile(/*force=*/true, deadline, &changed); !s.ok()) {
      return s;
    }
    if (!changed) {
      return absl::PermissionDeniedError(absl::StrCat(
          "Vault at ", refused.address, " refused the token from ", options_.auth.token_file, " (HTTP 403: ",
          refused.Errors(), "); fix: write a valid, unexpired token to ", options_.auth.token_file));
    }
    return absl::OkStatus();
  }
  return Login(deadline);
}

absl::Duration VaultClient::TokenTimeToLive() const {
  absl::MutexLock lock(&mu_);
  if (expire_ == absl::InfiniteFuture()) {
    return absl::InfiniteDuration();
  }
  return std::max(absl::ZeroDuration(), expire_ - clock_->Now());
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
  bool renewable;
  bool lease_known;
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
    lease = lease_;
    lease_known = lease_ > absl::ZeroDuration() || expire_ != absl::InfiniteFuture();
    grace = grace_;
    remaining = expire_ == absl::InfiniteFuture() ? absl::InfiniteDuration() : expire_ - now;
  }
  const bool can_login = options_.auth.kind != AuthKind::kToken;
  absl::Time deadline = absl::Now() + std::min(options_.request_timeout, absl::Seconds(10));
  absl::Status result;
  if (options_.auth.kind == AuthKind::kToken && !lease_known) {
    result = token.empty() ? absl::OkStatus() : LookupSelf(deadline);
  } else if (renewable) {
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
        SetLease(new_lease, still_renewable);
        if (new_lease > absl::ZeroDuration() && new_lease <= grace && can_login) {
          renew_at_ = clock_->Now();  // max TTL reached: log in again
          renewable_ = false;
        }
      }
      return;
    }
    result = response.ok() ? ErrorStatus(*response, "token renew-self") : response.status();
  } else if (can_login) {
    result = login(deadline);  // non-renewable: time to log in again
    if (result.ok()) {
      return;
    }
  } else {
    absl::MutexLock lock(&mu_);
    renew_at_ = absl::InfiniteFuture();
    return;
  }
  if (result.ok()) {
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
    bool due;
    {
      absl::MutexLock lock(&mu_);
      due = clock_->Now() >= renew_at_;
    }
    if (due) {
      RenewOnce();
    }
    if (tick && tick_every > absl::ZeroDuration() && clock_->Now() >= next_tick) {
      tick();
      next_tick = clock_->Now() + tick_every;
    }
  }
}

}  // namespace kmsplugin::keysource::vault
