#pragma once

// Helpers shared by the vault key source tests.

#include <memory>
#include <string>

#include <catch2/catch.hpp>

#include "kmsplugin/core/clock.h"
#include "kmsplugin/keysource/vault/vault_key_source.h"
#include "tests/keysource/vault/vault_test_server.h"
#include "tests/support/status_matchers.h"

namespace kmsplugin::testing {

inline constexpr char kTestToken[] = "hvs.TOKEN-SECRET-8c1f2e";

// Options for a server, with a token file holding kTestToken (registered on the server) and fast retries.
inline keysource::vault::VaultOptions TokenOptions(VaultTestServer& server, const std::string& dir,
                                                   const std::string& token = kTestToken, int ttl = 0) {
  server.Control({{"add_token", {{"id", token}, {"ttl", ttl}, {"renewable", true}, {"max_ttl", 0}}}});
  keysource::vault::VaultOptions o;
  for (int i = 0; i < static_cast<int>(server.Stats()["listeners"].size()); ++i) {
    o.addresses.push_back(server.Address(i));
  }
  o.key_name = "kms";
  o.tls.ca_file = TestPki::Get().ca;
  o.auth.kind = keysource::vault::AuthKind::kToken;
  o.auth.token_file = dir + "/token";
  WriteFile(o.auth.token_file, token + "\n");
  o.request_timeout = absl::Seconds(3);
  o.retry.min_wait = absl::Milliseconds(10);
  o.retry.max_wait = absl::Milliseconds(50);
  o.poll_interval = absl::ZeroDuration();
  return o;
}

inline absl::Time In(absl::Duration d) { return absl::Now() + d; }

}  // namespace kmsplugin::testing
