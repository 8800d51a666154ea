#pragma once

// Small helpers shared by vault_client.cc and vault_auth.cc (internal to keysource/vault).

#include <cstdint>
#include <limits>
#include <optional>
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

// Fields of a Vault answer, read as Vault's API types them. Every number and flag kmsplugin takes from a Vault
// answer goes through these, never through nlohmann's value() or get<>(): value() throws type_error when the field
// has another type ("ttl": "3600"), which nothing catches, so one odd answer would end the daemon; and get<int64_t>()
// of a float beyond int64 ("ttl": 1e300) is undefined behaviour. Found by tests/fuzz/vault_response_fuzz.
// Absent or null: `fallback` (Vault leaves optional fields out). Another type, or a value outside the type's range:
// std::nullopt, and the caller treats the whole answer as unusable.
inline std::optional<int64_t> IntField(const nlohmann::json& object, const char* key, int64_t fallback) {
  const auto it = object.find(key);
  if (it == object.end() || it->is_null()) {
    return fallback;
  }
  if (it->is_number_unsigned()) {
    const uint64_t value = it->get<uint64_t>();
    if (value > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return std::nullopt;
    }
    return static_cast<int64_t>(value);
  }
  if (it->is_number_integer()) {
    return it->get<int64_t>();
  }
  return std::nullopt;
}

inline std::optional<uint64_t> UintField(const nlohmann::json& object, const char* key, uint64_t fallback) {
  const auto it = object.find(key);
  if (it == object.end() || it->is_null()) {
    return fallback;
  }
  if (it->is_number_unsigned()) {
    return it->get<uint64_t>();
  }
  return std::nullopt;  // negative, float, string, ...
}

inline std::optional<bool> BoolField(const nlohmann::json& object, const char* key, bool fallback) {
  const auto it = object.find(key);
  if (it == object.end() || it->is_null()) {
    return fallback;
  }
  if (it->is_boolean()) {
    return it->get<bool>();
  }
  return std::nullopt;
}

}  // namespace kmsplugin::keysource::vault::internal
