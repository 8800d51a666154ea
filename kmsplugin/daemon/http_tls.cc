#include "kmsplugin/daemon/http_tls.h"

#include "absl/strings/str_cat.h"
#include "kmsplugin/config/file_checks.h"
#include "kmsplugin/keysource/common/secret_file.h"

namespace kmsplugin::daemon {
namespace {

constexpr size_t kMaxPemBytes = 256 * 1024;  // a certificate chain or a CA bundle

absl::Status InField(const std::string& config_file, const char* field, const absl::Status& status) {
  return absl::Status(status.code(), absl::StrCat(config_file, ": http.tls.", field, ": ", status.message()));
}

}  // namespace

absl::StatusOr<std::shared_ptr<const observe::TlsServerContext>> LoadHttpTls(const std::string& config_file,
                                                                              const config::HttpTlsConfig& tls) {
  auto cert = config::ReadCheckedFile(tls.cert_file, "TLS certificate file", config::FileKind::kTrusted, kMaxPemBytes);
  if (!cert.ok()) {
    return InField(config_file, "certFile", cert.status());
  }
  keysource::SecretFileOptions key_options;
  key_options.trim_newlines = false;
  auto key = keysource::ReadSecretFile(tls.key_file, "TLS key file", key_options);
  if (!key.ok()) {
    return InField(config_file, "keyFile", key.status());
  }
  auto ca = config::ReadCheckedFile(tls.client_ca_file, "client CA file", config::FileKind::kTrusted, kMaxPemBytes);
  if (!ca.ok()) {
    return InField(config_file, "clientCAFile", ca.status());
  }
  auto context = observe::TlsServerContext::FromPem(cert->bytes, key->bytes, ca->bytes);
  if (!context.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(config_file, ": http.tls: ", context.status().message(),
                                                   " (certFile ", tls.cert_file, ", keyFile ", tls.key_file,
                                                   ", clientCAFile ", tls.client_ca_file,
                                                   "); fix: give a PEM certificate, its PEM private key and the "
                                                   "PEM CA that issues the scrapers' client certificates"));
  }
  return context;
}

}  // namespace kmsplugin::daemon
