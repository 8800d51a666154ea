#pragma once

// TlsServerContext: an OpenSSL server context for HttpEndpoint's TLS listener, built from PEM bytes: TLS 1.2 or
// newer, and a client certificate issued by the given CA is required (the handshake fails without one). The key
// arrives in SecretBytes and is parsed from them; the caller reads the files (the daemon does, with the secret-file
// checks: kmsplugin/daemon/http_tls.h). Immutable once built; a reload builds a new one. Thread-safe.

#include <openssl/ssl.h>

#include <memory>
#include <string_view>

#include "absl/status/statusor.h"
#include "crypto/secret_bytes.h"

namespace kmsplugin::observe {

class TlsServerContext {
 public:
  // `cert_pem`: the server certificate, then any intermediates; `key_pem`: its private key; `client_ca_pem`: the
  // CA certificates a client's certificate must chain to. INVALID_ARGUMENT naming which part is wrong.
  static absl::StatusOr<std::shared_ptr<const TlsServerContext>> FromPem(std::string_view cert_pem,
                                                                         const crypto::SecretBytes& key_pem,
                                                                         std::string_view client_ca_pem);
  ~TlsServerContext();
  TlsServerContext(const TlsServerContext&) = delete;
  TlsServerContext& operator=(const TlsServerContext&) = delete;

  SSL_CTX* get() const { return ctx_; }

 private:
  explicit TlsServerContext(SSL_CTX* ctx) : ctx_(ctx) {}
  SSL_CTX* const ctx_;
};

}  // namespace kmsplugin::observe
