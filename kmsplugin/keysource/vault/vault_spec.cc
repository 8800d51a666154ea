#include "kmsplugin/keysource/vault/vault_spec.h"

#include <cstdlib>
#include <set>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "kmsplugin/keysource/vault/vault_key_source.h"

namespace kmsplugin::keysource::vault {
namespace {

std::optional<std::string> Env(const char* name) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') {
    return std::nullopt;
  }
  return std::string(value);
}

bool NameChars(absl::string_view s, bool allow_slash) {
  if (s.empty() || s.size() > 128 || absl::StrContains(s, "..")) {
    return false;
  }
  for (char c : s) {
    if (!(absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.' ||
          (allow_slash && c == '/'))) {
      return false;
    }
  }
  return !(allow_slash && (s.front() == '/' || s.back() == '/' || absl::StrContains(s, "//")));
}

// Validates "scheme://host[:port]" (a trailing slash is dropped); returns the normalised address.
absl::StatusOr<std::string> CheckAddress(std::string address, const config::FieldContext& context) {
  while (absl::EndsWith(address, "/")) {
    address.pop_back();
  }
  const bool https = absl::StartsWith(address, "https://");
  const bool http = absl::StartsWith(address, "http://");
  absl::string_view rest = address;
  if (!absl::ConsumePrefix(&rest, https ? "https://" : "http://") || (!https && !http)) {
    return context.Error(absl::StrCat("\"", address, "\" is not an http(s) URL"),
                         "write it as https://HOST:PORT, e.g. https://vault.example.com:8200");
  }
  if (rest.empty() || absl::StrContains(rest, "/") || absl::StrContains(rest, "@") ||
      absl::StrContains(rest, "?") || absl::StrContains(rest, "#")) {
    return context.Error(absl::StrCat("\"", address, "\" must be scheme://HOST[:PORT] without a path"),
                         "drop the path: the plugin adds /v1/... itself");
  }
  for (char c : rest) {
    if (absl::ascii_isspace(static_cast<unsigned char>(c)) || !absl::ascii_isprint(static_cast<unsigned char>(c))) {
      return context.Error(absl::StrCat("\"", absl::CHexEscape(address), "\" holds blanks or control characters"),
                           "write it as https://HOST:PORT");
    }
  }
  if (http) {
    absl::string_view host = rest.substr(0, rest.rfind(':') == absl::string_view::npos || absl::StartsWith(rest, "[")
                                               ? rest.size()
                                               : rest.rfind(':'));
    if (absl::StartsWith(rest, "[::1]")) {
      host = "[::1]";
    }
    if (host != "127.0.0.1" && host != "localhost" && host != "[::1]") {
      return context.Error(absl::StrCat("\"", address, "\" uses plain http to a non-loopback host, which would send "
                                        "the Vault token in clear"),
                           "use https:// (plain http is only accepted for 127.0.0.1, localhost and [::1])");
    }
  }
  return address;
}

class VaultSpec final : public config::KeySourceSpec {
 public:
  explicit VaultSpec(VaultOptions options) : options_(std::move(options)) {}

  std::string_view Kind() const override { return "vault"; }

  absl::StatusOr<config::OpenedKeySource> Open(const config::OpenContext& context) const override {
    core::Clock* clock = context.clock != nullptr ? context.clock : &core::SystemClock();
    auto source =
        VaultKeySource::Open(options_, clock, context.worker_threads, /*background=*/true, context.events);
    if (!source.ok()) {
      return source.status();
    }
    return config::MakeOpened(std::move(*source));
  }

  absl::StatusOr<std::string> Init(const config::OpenContext& context) const override {
    core::Clock* clock = context.clock != nullptr ? context.clock : &core::SystemClock();
    return VaultKeySource::CreateKey(options_, clock, absl::Now() + std::max(options_.request_timeout,
                                                                             absl::Seconds(30)));
  }

  std::string BackendKeyIdentity() const override {
    return absl::StrCat("vault:", options_.addresses.front(), "/",
                        options_.vault_namespace.empty() ? "" : options_.vault_namespace + "/",
                        options_.transit_mount, "/keys/", options_.key_name);
  }

  // A control-plane plugin starts before kube-apiserver: a static pod gets no projected service-account token,
  // and Vault's Kubernetes auth method asks kube-apiserver (TokenReview) to vouch for the token, while
  // kube-apiserver waits for this plugin. So Kubernetes/JWT auth from a service-account token cannot start a cold
  // control plane, and is said so.
  std::vector<std::string> Warnings() const override {
    if (options_.auth.kind != AuthKind::kJwt) {
      return {};
    }
    const bool service_account_token = absl::StrContains(options_.auth.jwt_file, "/secrets/kubernetes.io/");
    if (!service_account_token && options_.auth.mount != "kubernetes") {
      return {};
    }
    return {absl::StrCat(
        "keySource.vault.auth.jwt logs in with ",
        service_account_token ? absl::StrCat("a Kubernetes service-account token (", options_.auth.jwt_file, ")")
                              : "Vault's Kubernetes auth method (mount \"kubernetes\")",
        ": a static pod gets no projected token, and Vault would ask kube-apiserver, which waits for this plugin, "
        "to review it, so a cold control plane cannot start; fix: use auth.cert with the node's certificate, "
        "auth.appRole from root-owned files, or auth.token.file written by a Vault Agent sink (RUNBOOK 1b)")};
  }

  std::vector<config::HostPath> HostPaths() const override {
    std::vector<config::HostPath> paths;
    for (const std::string* file : {&options_.tls.ca_file, &options_.tls.cert_file, &options_.tls.key_file,
                                    &options_.auth.token_file, &options_.auth.role_id_file,
                                    &options_.auth.secret_id_file, &options_.auth.jwt_file}) {
      if (!file->empty()) {
        paths.push_back({*file, false});
      }
    }
    return paths;
  }

 private:
  VaultOptions options_;
};

#define KMS_ASSIGN(lhs, expr)         \
  do {                                \
    auto _r = (expr);                 \
    if (!_r.ok()) return _r.status(); \
    lhs = std::move(*_r);             \
  } while (0)

absl::Status ParseAuth(const YAML::Node& node, const config::FieldContext& context, VaultOptions& options) {
  if (!node.IsDefined() || node.IsNull()) {
    return context.Error("is missing", "set exactly one of auth.token, auth.appRole, auth.jwt or auth.cert, e.g. "
                                       "auth: {token: {file: /etc/kmsplugin/vault-token}}");
  }
  if (absl::Status s = context.RejectUnknownKeys(node, {"token", "appRole", "jwt", "cert"}); !s.ok()) {
    return s;
  }
  if (node.size() != 1) {
    return context.Error(absl::StrCat("has ", node.size(), " methods"),
                         "set exactly one of token, appRole, jwt or cert");
  }
  AuthOptions& auth = options.auth;
  if (node["token"]) {
    config::FieldContext c = context.Child("token");
    const YAML::Node n = node["token"];
    if (absl::Status s = c.RejectUnknownKeys(n, {"file"}); !s.ok()) return s;
    auth.kind = AuthKind::kToken;
    KMS_ASSIGN(auth.token_file, c.RequiredString(n, "file", "set it to the file holding the Vault token (mode 0600)"));
  } else if (node["appRole"]) {
    config::FieldContext c = context.Child("appRole");
    const YAML::Node n = node["appRole"];
    if (absl::Status s = c.RejectUnknownKeys(n, {"mount", "roleIdFile", "secretIdFile"}); !s.ok()) return s;
    auth.kind = AuthKind::kAppRole;
    std::optional<std::string> mount;
    KMS_ASSIGN(mount, c.OptionalString(n, "mount"));
    auth.mount = mount.value_or("approle");
    KMS_ASSIGN(auth.role_id_file, c.RequiredString(n, "roleIdFile", "set it to the file holding the AppRole role_id"));
    KMS_ASSIGN(auth.secret_id_file,
               c.RequiredString(n, "secretIdFile", "set it to the file holding the AppRole secret_id (mode 0600)"));
  } else if (node["jwt"]) {
    config::FieldContext c = context.Child("jwt");
    const YAML::Node n = node["jwt"];
    if (absl::Status s = c.RejectUnknownKeys(n, {"mount", "role", "tokenFile"}); !s.ok()) return s;
    auth.kind = AuthKind::kJwt;
    std::optional<std::string> mount;
    KMS_ASSIGN(mount, c.OptionalString(n, "mount"));
    auth.mount = mount.value_or("kubernetes");
    KMS_ASSIGN(auth.role, c.RequiredString(n, "role", "set it to the Vault role bound to this service account"));
    KMS_ASSIGN(auth.jwt_file, c.RequiredString(n, "tokenFile", "set it to the service-account token file"));
  } else {
    config::FieldContext c = context.Child("cert");
    const YAML::Node n = node["cert"];
    if (n.IsDefined() && !n.IsNull()) {
      if (absl::Status s = c.RejectUnknownKeys(n, {"mount", "name"}); !s.ok()) return s;
    }
    auth.kind = AuthKind::kCert;
    std::optional<std::string> mount, name;
    if (n.IsMap()) {
      KMS_ASSIGN(mount, c.OptionalString(n, "mount"));
      KMS_ASSIGN(name, c.OptionalString(n, "name"));
    }
    auth.mount = mount.value_or("cert");
    auth.cert_name = name.value_or("");
  }
  if (!NameChars(auth.kind == AuthKind::kToken ? "token" : auth.mount, /*allow_slash=*/true)) {
    return context.Error(absl::StrCat("mount \"", auth.mount, "\" is not a valid Vault path"),
                         "use letters, digits, '-', '_', '.' and inner '/'");
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<VaultOptions> ParseOptions(const YAML::Node& node, const config::FieldContext& context) {
  if (absl::Status s = context.RejectUnknownKeys(
          node, {"addresses", "address", "transitMount", "keyName", "namespace", "tls", "auth", "pollInterval",
                 "requestTimeout", "maxRetries", "retryMinWait", "retryMaxWait"});
      !s.ok()) {
    return s;
  }
  VaultOptions options;
  std::optional<std::vector<std::string>> addresses;
  std::optional<std::string> address;
  KMS_ASSIGN(addresses, context.OptionalStringList(node, "addresses"));
  KMS_ASSIGN(address, context.OptionalString(node, "address"));
  if (addresses && address) {
    return context.Child("address").Error("is set together with addresses", "keep only one of address and addresses");
  }
  std::vector<std::string> raw;
  config::FieldContext address_context = context.Child(addresses ? "addresses" : "address");
  if (addresses) {
    raw = *addresses;
    if (raw.empty()) {
      return address_context.Error("is empty", "list at least one Vault address, e.g. [https://vault:8200]");
    }
  } else if (address) {
    raw.push_back(*address);
  } else if (auto env = Env("VAULT_ADDR")) {
    raw.push_back(*env);
    address_context = config::FieldContext(context.file(), "$VAULT_ADDR");
  } else {
    return address_context.Error("is missing (and $VAULT_ADDR is not set)",
                                 "set addresses: [https://vault.example.com:8200]");
  }
  std::set<std::string> seen;
  for (size_t i = 0; i < raw.size(); ++i) {
    config::FieldContext c = addresses ? address_context.Index(i) : address_context;
    std::string normalised;
    KMS_ASSIGN(normalised, CheckAddress(raw[i], c));
    if (!seen.insert(normalised).second) {
      return c.Error(absl::StrCat("repeats ", normalised), "list each address once");
    }
    options.addresses.push_back(normalised);
  }

  std::optional<std::string> mount;
  KMS_ASSIGN(mount, context.OptionalString(node, "transitMount"));
  if (mount) {
    std::string m(absl::StripSuffix(absl::StripPrefix(*mount, "/"), "/"));
    if (!NameChars(m, /*allow_slash=*/true)) {
      return context.Child("transitMount").Error(absl::StrCat("\"", *mount, "\" is not a valid Vault mount path"),
                                                 "use letters, digits, '-', '_', '.' and inner '/', e.g. transit");
    }
    options.transit_mount = m;
  }
  KMS_ASSIGN(options.key_name,
             context.RequiredString(node, "keyName", "set it to the Transit key's name, e.g. keyName: kms"));
  if (!NameChars(options.key_name, /*allow_slash=*/false)) {
    return context.Child("keyName").Error(absl::StrCat("\"", options.key_name, "\" is not a valid Transit key name"),
                                          "use 1-128 letters, digits, '-', '_' or '.'");
  }
  std::optional<std::string> ns;
  KMS_ASSIGN(ns, context.OptionalString(node, "namespace"));
  if (!ns) {
    ns = Env("VAULT_NAMESPACE");
  }
  if (ns) {
    std::string n(absl::StripSuffix(absl::StripPrefix(*ns, "/"), "/"));
    if (!n.empty() && !NameChars(n, /*allow_slash=*/true)) {
      return context.Child("namespace").Error(absl::StrCat("\"", *ns, "\" is not a valid Vault namespace"),
                                              "use letters, digits, '-', '_', '.' and '/', e.g. team/prod");
    }
    options.vault_namespace = n;
  }

  const YAML::Node tls = node["tls"];
  config::FieldContext tls_context = context.Child("tls");
  if (tls.IsDefined() && !tls.IsNull()) {
    if (absl::Status s = tls_context.RejectUnknownKeys(tls, {"caFile", "certFile", "keyFile", "serverName"});
        !s.ok()) {
      return s;
    }
    std::optional<std::string> v;
    KMS_ASSIGN(v, tls_context.OptionalString(tls, "caFile"));
    options.tls.ca_file = v.value_or("");
    KMS_ASSIGN(v, tls_context.OptionalString(tls, "certFile"));
    options.tls.cert_file = v.value_or("");
    KMS_ASSIGN(v, tls_context.OptionalString(tls, "keyFile"));
    options.tls.key_file = v.value_or("");
    KMS_ASSIGN(v, tls_context.OptionalString(tls, "serverName"));
    options.tls.server_name = v.value_or("");
  }
  if (options.tls.ca_file.empty()) {
    options.tls.ca_file = Env("VAULT_CACERT").value_or("");
  }
  if (options.tls.cert_file.empty() != options.tls.key_file.empty()) {
    return tls_context.Child(options.tls.cert_file.empty() ? "certFile" : "keyFile")
        .Error("is missing while the other half of the client certificate is set",
               "set both tls.certFile and tls.keyFile, or neither");
  }
  if (!options.tls.server_name.empty() && !NameChars(options.tls.server_name, /*allow_slash=*/false)) {
    return tls_context.Child("serverName").Error("is not a host name", "write a DNS name, e.g. vault.internal");
  }

  if (absl::Status s = ParseAuth(node["auth"], context.Child("auth"), options); !s.ok()) {
    return s;
  }
  if (options.auth.kind == AuthKind::kCert && options.tls.cert_file.empty()) {
    return context.Child("auth").Child("cert").Error("needs a client certificate",
                                                     "set tls.certFile and tls.keyFile");
  }

  std::optional<absl::Duration> d;
  KMS_ASSIGN(d, context.OptionalDuration(node, "pollInterval"));
  if (d) {
    if (*d < absl::ZeroDuration()) {
      return context.Child("pollInterval").Error("is negative", "use a duration such as 1m, or 0 to disable");
    }
    options.poll_interval = *d;
  }
  KMS_ASSIGN(d, context.OptionalDuration(node, "requestTimeout"));
  if (d) {
    if (*d <= absl::ZeroDuration() || *d > absl::Minutes(5)) {
      return context.Child("requestTimeout").Error("must be between 1ms and 5m", "use e.g. 10s");
    }
    options.request_timeout = *d;
  }
  std::optional<int64_t> retries;
  KMS_ASSIGN(retries, context.OptionalInt(node, "maxRetries", 0, 20));
  if (retries) {
    options.retry.max_retries = static_cast<int>(*retries);
  }
  KMS_ASSIGN(d, context.OptionalDuration(node, "retryMinWait"));
  if (d) {
    options.retry.min_wait = *d;
  }
  KMS_ASSIGN(d, context.OptionalDuration(node, "retryMaxWait"));
  if (d) {
    options.retry.max_wait = *d;
  }
  if (options.retry.min_wait < absl::ZeroDuration() || options.retry.max_wait < options.retry.min_wait) {
    return context.Child("retryMaxWait").Error("is smaller than retryMinWait (or a wait is negative)",
                                               "use e.g. retryMinWait: 100ms, retryMaxWait: 1500ms");
  }
  return options;
}

std::unique_ptr<config::KeySourceSpec> MakeSpec(VaultOptions options) {
  return std::make_unique<VaultSpec>(std::move(options));
}

absl::StatusOr<std::unique_ptr<config::KeySourceSpec>> ParseSpec(const YAML::Node& node,
                                                                 const config::FieldContext& context) {
  auto options = ParseOptions(node, context);
  if (!options.ok()) {
    return options.status();
  }
  return MakeSpec(std::move(*options));
}

}  // namespace kmsplugin::keysource::vault
