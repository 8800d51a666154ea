#pragma once

// Config: the validated contents of kmsplugin's YAML file.
//
//   http:                        # optional: /metrics, /healthz, /readyz
//     listen: 127.0.0.1:9880     # HOST:PORT, loopback by default; port 0 picks a free one
//     enabled: true
//     tls:                       # optional second listener: the same paths over TLS with client certificates
//       listen: 0.0.0.0:9881     # HOST:PORT
//       certFile: /etc/kmsplugin/metrics-tls/tls.crt     # server certificate (PEM; chain after it)
//       keyFile: /etc/kmsplugin/metrics-tls/tls.key      # its private key: mode 0600, owned by the plugin's user
//       clientCAFile: /etc/kmsplugin/metrics-tls/ca.crt  # only clients with a certificate from this CA are served
//                                # (the three files are read again at SIGHUP)
//   server:                      # optional
//     pollInterval: 10s          # how often each key source is refreshed and health-probed (SIGHUP: at once)
//     shutdownGracePeriod: 10s   # SIGTERM drains in-flight calls for at most this long
//     maxThreads: 128            # threads a key source may use (the PKCS#11 session pool)
//     workers: 16                # Encrypt/Decrypt calls run at once per socket (each may block on the backend)
//     maxQueuedCalls: 128        # Encrypt/Decrypt calls that may wait per socket; more get RESOURCE_EXHAUSTED
//     allowUnlockedMemory: false # serve even when secrets cannot be locked in RAM (RLIMIT_MEMLOCK); warns
//   environments:
//     - name: dev                # [a-z0-9-], 1..63; bound into every ciphertext
//       socket: /run/kmsplugin/dev.sock
//       socketGroup: kube        # optional: socket mode 0660 with this group (else 0600)
//       statusVersion: v2        # v2 (Kubernetes 1.29+) or v2beta1 (1.27, 1.28)
//       allowSharedBackendKey: false
//       keySource:
//         local: {...}           # exactly one of local / vault / pkcs11
//
// Every error names the file, the field and the fix (FieldContext).

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "kmsplugin/config/key_source_spec.h"

namespace kmsplugin::config {

struct EnvironmentConfig {
  std::string name;
  std::string socket;
  std::optional<std::string> socket_group;
  std::string status_version = "v2";
  bool allow_shared_backend_key = false;
  std::shared_ptr<const KeySourceSpec> key_source;
};

struct ServerConfig {
  absl::Duration poll_interval = absl::Seconds(10);
  absl::Duration shutdown_grace_period = absl::Seconds(10);
  int max_threads = 128;
  bool allow_unlocked_memory = false;
  int workers = 16;
  int max_queued_calls = 128;
};

struct HttpTlsConfig {
  std::string listen;
  std::string cert_file;
  std::string key_file;
  std::string client_ca_file;
};

struct HttpConfig {
  bool enabled = true;
  std::string listen = "127.0.0.1:9880";
  std::optional<HttpTlsConfig> tls;
};

struct Config {
  std::string file;
  ServerConfig server;
  HttpConfig http;
  std::vector<EnvironmentConfig> environments;

  // The environment called `name`; NOT_FOUND listing the names there are.
  absl::StatusOr<const EnvironmentConfig*> Find(std::string_view name) const;
};

// Key source kind ("local", "vault", "pkcs11") → its parser. The CLI hands in the ones the build has.
using KeySourceParsers = std::map<std::string, KeySourceParser, std::less<>>;

// The text of the config file `path`. Refuses one that group or others can write.
// The most a config file may hold; a larger one is refused before it is parsed.
inline constexpr size_t kMaxConfigBytes = size_t{1} << 20;
absl::StatusOr<std::string> ReadConfigFile(const std::string& path);
// Reads and validates `path`. Refuses a config file that group or others can write.
absl::StatusOr<Config> LoadConfig(const std::string& path, const KeySourceParsers& parsers);
// Validates YAML text; `file` only names the source in error messages.
absl::StatusOr<Config> ParseConfig(const std::string& yaml, const std::string& file,
                                   const KeySourceParsers& parsers);

// Whether `name` is a valid environment name ([a-z0-9-], 1..63, starting and ending alphanumeric).
bool IsValidEnvironmentName(std::string_view name);

}  // namespace kmsplugin::config
