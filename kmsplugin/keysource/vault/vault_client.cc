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
#include "kmsplugin/keysource/vault/client_util.h"

namespace kmsplugin::keysource::vault {

using internal::Uniform;

namespace {

bool IsRetryableStatus(long status) {
  return status == 412 || status == 429 || (status >= 500 && status != 501) || status == 0;
}

bool IsRedirect(long status) { return status == 301 || status == 302 || status == 307 || status == 308; }

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

absl::StatusOr<std::unique_ptr<VaultClient>> VaultClient::New(VaultOptions options, core::Clock* clock,
                                                              std::unique_ptr<HttpTransport> transport,
                                                              core::EventSink* events) {
  if (options.addresses.empty()) {
    return absl::InvalidArgumentError("no Vault address given");
  }
  return std::unique_ptr<VaultClient>(new VaultClient(std::move(options), clock, std::move(transport), events));
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

VaultClient::~VaultClient() { StopBackground(); }

absl::Duration VaultClient::Backoff(int attempt) const {
  absl::Duration base = options_.retry.min_wait;
  for (int i = 1; i < attempt && base < options_.retry.max_wait; ++i) {
    base *= 2;
  }
  base = std::min(base, options_.retry.max_wait);
  return base * Uniform(0.5, 1.0);
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

}  // namespace kmsplugin::keysource::vault
