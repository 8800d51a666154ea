#pragma once

// The `vault` key source's config section (keySource.vault) and its KeySourceSpec.
//
//   keySource:
//     vault:
//       addresses: [https://vault-1:8200, https://vault-2:8200]   # or address: https://vault:8200 ($VAULT_ADDR)
//       transitMount: transit          # default "transit"
//       keyName: kms                   # required
//       namespace: team/prod           # optional ($VAULT_NAMESPACE)
//       tls: {caFile: ..., certFile: ..., keyFile: ..., serverName: vault.internal}   # caFile: $VAULT_CACERT
//       auth:                          # exactly one of:
//         token: {file: /etc/kmsplugin/vault-token}
//         appRole: {mount: approle, roleIdFile: ..., secretIdFile: ...}
//         jwt: {mount: kubernetes, role: kms, tokenFile: /var/run/secrets/.../token}
//         cert: {mount: cert, name: kms}   # needs tls.certFile and tls.keyFile
//       pollInterval: 1m               # key metadata refresh in the background (positive)
//       requestTimeout: 10s            # cap on one HTTP attempt; the caller's deadline caps the whole call
//       maxRetries: 2                  # retry rounds (all addresses) after the first
//       retryMinWait: 100ms            # first backoff; doubles up to retryMaxWait, with jitter
//       retryMaxWait: 1500ms
//
// Plain http:// is accepted only for loopback addresses (tests, a local Vault Agent).

#include <memory>

#include <yaml-cpp/yaml.h>

#include "absl/status/statusor.h"
#include "kmsplugin/config/field_context.h"
#include "kmsplugin/config/key_source_spec.h"
#include "kmsplugin/keysource/vault/vault_options.h"

namespace kmsplugin::keysource::vault {

absl::StatusOr<std::unique_ptr<config::KeySourceSpec>> ParseSpec(const YAML::Node& node,
                                                                 const config::FieldContext& context);

// The same, returning the options (for tests and tools).
absl::StatusOr<VaultOptions> ParseOptions(const YAML::Node& node, const config::FieldContext& context);

// A spec for already-validated options.
std::unique_ptr<config::KeySourceSpec> MakeSpec(VaultOptions options);

}  // namespace kmsplugin::keysource::vault
