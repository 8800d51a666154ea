#pragma once

// KeySourceSpec: the validated options of one environment's key source, parsed from its YAML section
// (keySource.local / keySource.vault / keySource.pkcs11) by that key source's own parser. The config loader
// knows key sources only through the parsers it is handed (kmsplugin/cli/key_sources.cc lists them), so each
// key source lives entirely in its own folder.

#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <yaml-cpp/yaml.h>

#include "absl/status/statusor.h"
#include "crypto/random.h"
#include "kmsplugin/config/field_context.h"
#include "kmsplugin/core/clock.h"
#include "kmsplugin/core/events.h"
#include "kmsplugin/core/key_admin.h"
#include "kmsplugin/core/key_source.h"

namespace kmsplugin::config {

// A file the key source uses on the host, for `kmsplugin render` (static-pod hostPath mounts, systemd sandbox
// paths). `writable`: the key source (or `rotate`/`retire` run beside it) writes in its directory.
struct HostPath {
  std::string path;
  bool writable = false;
};

struct OpenContext {
  std::string environment;  // validated environment name
  int worker_threads = 8;   // gRPC worker threads that may call the source at once
  core::Clock* clock = nullptr;
  crypto::Random* random = nullptr;
  // Where the source reports recoveries, failovers, re-logins, credential files picked up and version changes.
  core::EventSink* events = &core::NullEventSink();
};

// An opened key source: its serving side and its administration side, one object.
struct OpenedKeySource {
  std::shared_ptr<core::KeySource> source;
  std::shared_ptr<core::KeyAdmin> admin;
};
template <typename Source>
OpenedKeySource MakeOpened(std::shared_ptr<Source> both) {
  return OpenedKeySource{both, both};
}

class KeySourceSpec {
 public:
  virtual ~KeySourceSpec() = default;

  // "local", "vault" or "pkcs11".
  virtual std::string_view Kind() const = 0;

  // Opens the key source for serving or for the CLI. Refuses credential and key files that group or others can
  // read, naming the file and the fix.
  virtual absl::StatusOr<OpenedKeySource> Open(const OpenContext& context) const = 0;

  // `kmsplugin init`: creates the key material this environment needs (first key version, and for local the
  // root key and keyring). ALREADY_EXISTS, naming what exists, when there is already key material; it never
  // overwrites anything. Returns a one-line human summary of what it created.
  virtual absl::StatusOr<std::string> Init(const OpenContext& context) const = 0;

  // A stable, non-secret name of the backend key, used to refuse two environments on one key
  // (e.g. "local:/var/lib/kmsplugin/dev.keyring", "vault:https://v:8200/transit/keys/k", "pkcs11:token/label").
  virtual std::string BackendKeyIdentity() const = 0;

  // Every file this key source reads or writes (key material, credentials, CA bundles, modules), absolute paths.
  virtual std::vector<HostPath> HostPaths() const = 0;

  // Settings that are valid but will fail an operator in a known way (one line each, naming the field and the
  // fix). `serve` logs them at start and `render` prints them; they never stop anything.
  virtual std::vector<std::string> Warnings() const { return {}; }
};

// Parses `node` (the mapping under keySource.<kind>); `context` points at that node.
using KeySourceParser =
    std::function<absl::StatusOr<std::unique_ptr<KeySourceSpec>>(const YAML::Node& node, const FieldContext& context)>;

}  // namespace kmsplugin::config
