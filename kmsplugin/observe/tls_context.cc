#include "kmsplugin/observe/tls_context.h"

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include "absl/strings/str_cat.h"

namespace kmsplugin::observe {
namespace {

struct BioFree {
  void operator()(BIO* bio) const { BIO_free(bio); }
};
struct X509Free {
  void operator()(X509* cert) const { X509_free(cert); }
};
struct KeyFree {
  void operator()(EVP_PKEY* key) const { EVP_PKEY_free(key); }
};
struct CtxFree {
  void operator()(SSL_CTX* ctx) const { SSL_CTX_free(ctx); }
};

std::unique_ptr<BIO, BioFree> MemoryBio(std::string_view bytes) {
  return std::unique_ptr<BIO, BioFree>(BIO_new_mem_buf(bytes.data(), static_cast<int>(bytes.size())));
}

// OpenSSL's reason for the last failure (never key material: the error queue holds codes and file names only).
std::string OpenSslReason() {
  const unsigned long code = ERR_peek_last_error();
  ERR_clear_error();
  if (code == 0) {
    return "no PEM data found";
  }
  char text[256];
  ERR_error_string_n(code, text, sizeof(text));
  return text;
}

}  // namespace

absl::StatusOr<std::shared_ptr<const TlsServerContext>> TlsServerContext::FromPem(std::string_view cert_pem,
                                                                                  const crypto::SecretBytes& key_pem,
                                                                                  std::string_view client_ca_pem) {
  ERR_clear_error();
  std::unique_ptr<SSL_CTX, CtxFree> ctx(SSL_CTX_new(TLS_server_method()));
  if (ctx == nullptr || SSL_CTX_set_min_proto_version(ctx.get(), TLS1_2_VERSION) != 1) {
    return absl::InternalError(absl::StrCat("cannot create a TLS context: ", OpenSslReason()));
  }
  // No session tickets or cache: a scrape is one request per connection, and no ticket key to keep or rotate.
  SSL_CTX_set_options(ctx.get(), SSL_OP_NO_TICKET | SSL_OP_NO_RENEGOTIATION);
  SSL_CTX_set_session_cache_mode(ctx.get(), SSL_SESS_CACHE_OFF);

  auto cert_bio = MemoryBio(cert_pem);
  std::unique_ptr<X509, X509Free> cert(PEM_read_bio_X509(cert_bio.get(), nullptr, nullptr, nullptr));
  if (cert == nullptr || SSL_CTX_use_certificate(ctx.get(), cert.get()) != 1) {
    return absl::InvalidArgumentError(absl::StrCat("the certificate is not a PEM certificate: ", OpenSslReason()));
  }
  while (X509* extra = PEM_read_bio_X509(cert_bio.get(), nullptr, nullptr, nullptr)) {
    if (SSL_CTX_add0_chain_cert(ctx.get(), extra) != 1) {  // takes ownership on success
      X509_free(extra);
      return absl::InvalidArgumentError(absl::StrCat("a chain certificate is not usable: ", OpenSslReason()));
    }
  }
  ERR_clear_error();  // the loop ends on "no start line"

  auto key_bio = MemoryBio(key_pem.view());
  std::unique_ptr<EVP_PKEY, KeyFree> key(PEM_read_bio_PrivateKey(key_bio.get(), nullptr, nullptr, nullptr));
  if (key == nullptr || SSL_CTX_use_PrivateKey(ctx.get(), key.get()) != 1) {
    return absl::InvalidArgumentError(absl::StrCat("the key is not a PEM private key: ", OpenSslReason()));
  }
  if (SSL_CTX_check_private_key(ctx.get()) != 1) {
    return absl::InvalidArgumentError("the key does not belong to the certificate");
  }

  auto ca_bio = MemoryBio(client_ca_pem);
  X509_STORE* store = SSL_CTX_get_cert_store(ctx.get());
  STACK_OF(X509_NAME)* names = sk_X509_NAME_new_null();
  int cas = 0;
  while (X509* ca = PEM_read_bio_X509(ca_bio.get(), nullptr, nullptr, nullptr)) {
    X509_STORE_add_cert(store, ca);
    sk_X509_NAME_push(names, X509_NAME_dup(X509_get_subject_name(ca)));
    X509_free(ca);
    ++cas;
  }
  ERR_clear_error();
  if (cas == 0) {
    sk_X509_NAME_pop_free(names, X509_NAME_free);
    return absl::InvalidArgumentError("the client CA file holds no PEM certificate");
  }
  SSL_CTX_set_client_CA_list(ctx.get(), names);  // takes ownership
  SSL_CTX_set_verify(ctx.get(), SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nullptr);
  return std::shared_ptr<const TlsServerContext>(new TlsServerContext(ctx.release()));
}

TlsServerContext::~TlsServerContext() { SSL_CTX_free(ctx_); }

}  // namespace kmsplugin::observe
