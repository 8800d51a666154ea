#pragma once

// Small helpers shared by vault_client.cc and vault_auth.cc (internal to keysource/vault).

#include <random>
#include <string>

#include <nlohmann/json.hpp>

#include "absl/strings/string_view.h"
#include "kmsplugin/keysource/vault/http_transport.h"

namespace kmsplugin::keysource::vault::internal {

// A uniformly random double in [lo, hi) (jitter).
inline double Uniform(double lo, double hi) {
  thread_local std::mt19937_64 gen{std::random_device{}()};
  return std::uniform_real_distribution<double>(lo, hi)(gen);
}

// JSON string literal of `value` (escaped). The caller wipes the result if `value` is secret.
inline std::string JsonString(absl::string_view value) {
  nlohmann::json j = std::string(value);
  std::string out = j.dump();
  WipeString(j.get_ref<std::string&>());
  return out;
}

}  // namespace kmsplugin::keysource::vault::internal
