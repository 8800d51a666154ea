#pragma once

// VaultOptions: the validated settings of one Vault Transit key source (parsed from keySource.vault by
// vault_spec.h). Plain data; holds file paths, never secrets.

#include <string>
#include <vector>

#include "absl/time/time.h"

namespace kmsplugin::keysource::vault {

struct TlsOptions {
  std::string ca_file;      // PEM bundle that signs Vault's certificate; empty = system store
  std::string cert_file;    // client certificate (PEM), for mutual TLS and cert auth
  std::string key_file;     // its private key (PEM), must be mode 0600 or stricter
  std::string server_name;  // name to verify (and send as SNI) instead of the address's host
};

enum class AuthKind { kToken, kAppRole, kJwt, kCert };

struct AuthOptions {
  AuthKind kind = AuthKind::kToken;
  std::string mount;           // auth mount (approle, kubernetes/jwt, cert); unused for token
  std::string token_file;      // token: file holding the Vault token
  std::string role_id_file;    // appRole
  std::string secret_id_file;  // appRole
  std::string role;            // jwt: role name
  std::string jwt_file;        // jwt: service-account token file, re-read at every login
  std::string cert_name;       // cert: the role name (optional)
};

struct RetryOptions {
  int max_retries = 2;                             // retry rounds after the first, like Vault's Go client
  absl::Duration min_wait = absl::Milliseconds(100);  // first backoff (then doubled, with jitter)
  absl::Duration max_wait = absl::Milliseconds(1500);
};

struct VaultOptions {
  std::vector<std::string> addresses;  // "https://vault-1:8200", ... tried in order, failover to the next
  std::string transit_mount = "transit";
  std::string key_name;
  std::string vault_namespace;  // X-Vault-Namespace, empty = none
  TlsOptions tls;
  AuthOptions auth;
  absl::Duration poll_interval = absl::Minutes(1);     // key metadata refresh; 0 = never in the background
  absl::Duration request_timeout = absl::Seconds(10);  // cap on one HTTP attempt (the deadline caps the call)
  RetryOptions retry;
};

}  // namespace kmsplugin::keysource::vault
