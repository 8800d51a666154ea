#pragma once

// The key-source registry: the one list of key source kinds this build knows. Config parsing, render, the CLI and
// the daemon read it; nothing else names a kind. Adding a key source is its own folder plus one entry here (and a
// kind byte reserved in crypto/FORMAT.md, since the envelope format is a wire format and stays pure).

#include <string>
#include <string_view>
#include <vector>

#include "crypto/envelope_format.h"
#include "kmsplugin/config/config.h"
#include "kmsplugin/config/key_source_spec.h"
#include "kmsplugin/core/events.h"

namespace kmsplugin::keysource {

struct KeySourceKindInfo {
  std::string_view name;      // the YAML key under keySource: ("local", "vault", "pkcs11")
  crypto::KeySourceKind kind;  // the kind byte its ciphertexts carry
  config::KeySourceParser parser;
  std::string_view display;    // for people: "local keyring", "Vault Transit", "PKCS#11 token"
  // A line `kmsplugin render --kind systemd-unit` adds as a comment for an environment of this kind ("" if none).
  std::string_view systemd_note;
};

// Every kind, in a stable order.
const std::vector<KeySourceKindInfo>& KeySourceKinds();

// The kind named `name` (as in the config), or nullptr.
const KeySourceKindInfo* FindKeySourceKind(std::string_view name);

// The parsers, for config::LoadConfig.
config::KeySourceParsers KeySourceParsers();

// What a key source is opened with for `environment`, on the system clock and randomness.
config::OpenContext SystemOpenContext(const std::string& environment, int worker_threads,
                                      core::EventSink* events = nullptr);

}  // namespace kmsplugin::keysource
