#include "kmsplugin/config/config.h"

#include <sys/un.h>

#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kmsplugin/config/file_checks.h"
#include "kmsplugin/config/input_limits.h"
#include "kmsplugin/core/sv.h"

namespace kmsplugin::config {
namespace {

constexpr size_t kMaxSocketPath = sizeof(sockaddr_un::sun_path) - 1;

absl::Status ParseServer(const YAML::Node& node, const FieldContext& context, ServerConfig& server) {
  if (auto status = context.RejectUnknownKeys(node, {"pollInterval", "shutdownGracePeriod", "maxThreads", "workers",
                                                       "maxQueuedCalls", "allowUnlockedMemory"});
      !status.ok()) {
    return status;
  }
  auto poll = context.OptionalDuration(node, "pollInterval");
  if (!poll.ok()) {
    return poll.status();
  }
  if (poll->has_value()) {
    if (**poll < absl::Seconds(1)) {
      return context.Child("pollInterval").Error("is shorter than 1s", "use 1s or more (the default is 10s)");
    }
    server.poll_interval = **poll;
  }
  auto grace = context.OptionalDuration(node, "shutdownGracePeriod");
  if (!grace.ok()) {
    return grace.status();
  }
  if (grace->has_value()) {
    server.shutdown_grace_period = **grace;
  }
  auto threads = context.OptionalInt(node, "maxThreads", 4, 1024);
  if (!threads.ok()) {
    return threads.status();
  }
  if (threads->has_value()) {
    server.max_threads = static_cast<int>(**threads);
  }
  auto unlocked = context.OptionalBool(node, "allowUnlockedMemory");
  if (!unlocked.ok()) {
    return unlocked.status();
  }
  server.allow_unlocked_memory = unlocked->value_or(false);
  auto workers = context.OptionalInt(node, "workers", 1, 1024);
  if (!workers.ok()) {
    return workers.status();
  }
  if (workers->has_value()) {
    server.workers = static_cast<int>(**workers);
  }
  auto queued = context.OptionalInt(node, "maxQueuedCalls", 0, 65536);
  if (!queued.ok()) {
    return queued.status();
  }
  if (queued->has_value()) {
    server.max_queued_calls = static_cast<int>(**queued);
  }
  return absl::OkStatus();
}

absl::Status CheckListen(const std::string& value, const FieldContext& context, std::string_view example) {
  const size_t colon = value.rfind(':');
  int64_t port = -1;
  if (colon == std::string::npos || colon == 0 || !absl::SimpleAtoi(value.substr(colon + 1), &port) || port < 0 ||
      port > 65535) {
    return context.Error(absl::StrCat("\"", value, "\" is not HOST:PORT"), example);
  }
  return absl::OkStatus();
}

// http.tls: a listener for an in-cluster Prometheus (TLS 1.2+, client certificate required).
absl::Status ParseHttpTls(const YAML::Node& node, const FieldContext& context, HttpTlsConfig& tls) {
  if (!node.IsMap()) {
    return context.Error("is not a map", "write listen, certFile, keyFile and clientCAFile under http.tls");
  }
  if (auto status = context.RejectUnknownKeys(node, {"listen", "certFile", "keyFile", "clientCAFile"});
      !status.ok()) {
    return status;
  }
  auto listen = context.RequiredString(node, "listen", "set it to HOST:PORT, e.g. 0.0.0.0:9881");
  if (!listen.ok()) {
    return listen.status();
  }
  if (auto status = CheckListen(*listen, context.Child("listen"), "write an address such as 0.0.0.0:9881");
      !status.ok()) {
    return status;
  }
  auto cert = context.RequiredString(node, "certFile", "set it to the server certificate (PEM) Prometheus verifies");
  if (!cert.ok()) {
    return cert.status();
  }
  auto key = context.RequiredString(node, "keyFile", "set it to the certificate's private key (PEM, mode 0600)");
  if (!key.ok()) {
    return key.status();
  }
  auto ca = context.RequiredString(node, "clientCAFile",
                                   "set it to the CA (PEM) that issued Prometheus' client certificate");
  if (!ca.ok()) {
    return ca.status();
  }
  for (const auto& [field, value] : {std::pair{"certFile", &*cert}, {"keyFile", &*key}, {"clientCAFile", &*ca}}) {
    if (value->empty() || value->front() != '/') {
      return context.Child(field).Error(absl::StrCat("\"", *value, "\" is not an absolute path"),
                                        "write the file's absolute path");
    }
  }
  tls = HttpTlsConfig{*listen, *cert, *key, *ca};
  return absl::OkStatus();
}

absl::Status ParseHttp(const YAML::Node& node, const FieldContext& context, HttpConfig& http) {
  if (auto status = context.RejectUnknownKeys(node, {"listen", "enabled", "tls"}); !status.ok()) {
    return status;
  }
  if (node["tls"]) {
    HttpTlsConfig tls;
    if (auto status = ParseHttpTls(node["tls"], context.Child("tls"), tls); !status.ok()) {
      return status;
    }
    http.tls = std::move(tls);
  }
  auto enabled = context.OptionalBool(node, "enabled");
  if (!enabled.ok()) {
    return enabled.status();
  }
  http.enabled = enabled->value_or(true);
  auto listen = context.OptionalString(node, "listen");
  if (!listen.ok()) {
    return listen.status();
  }
  if (listen->has_value()) {
    const std::string& value = **listen;
    const size_t colon = value.rfind(':');
    int64_t port = -1;
    if (colon == std::string::npos || colon == 0 || !absl::SimpleAtoi(value.substr(colon + 1), &port) || port < 0 ||
        port > 65535) {
      return context.Child("listen").Error(absl::StrCat("\"", value, "\" is not HOST:PORT"),
                                           "write an address such as 127.0.0.1:9880 (loopback keeps metrics private)");
    }
    http.listen = value;
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<const KeySourceSpec>> ParseKeySource(const YAML::Node& node,
                                                                    const FieldContext& context,
                                                                    const KeySourceParsers& parsers) {
  std::vector<std::string> kinds;
  for (const auto& [kind, parser] : parsers) {
    kinds.push_back(kind);
  }
  const std::string choices = absl::StrJoin(kinds, ", ");
  if (!node.IsDefined() || node.IsNull()) {
    return context.Error("is missing", absl::StrCat("add keySource with exactly one of: ", choices));
  }
  if (!node.IsMap() || node.size() != 1) {
    return context.Error("must hold exactly one key source",
                         absl::StrCat("keep exactly one of: ", choices));
  }
  const std::string kind = node.begin()->first.Scalar();
  const auto parser = parsers.find(kind);
  if (parser == parsers.end()) {
    return context.Child(kind).Error("is not a key source this build knows",
                                     absl::StrCat("use one of: ", choices));
  }
  auto spec = parser->second(node.begin()->second, context.Child(kind));
  if (!spec.ok()) {
    return spec.status();
  }
  return std::shared_ptr<const KeySourceSpec>(std::move(*spec));
}

absl::StatusOr<EnvironmentConfig> ParseEnvironment(const YAML::Node& node, const FieldContext& context,
                                                   const KeySourceParsers& parsers) {
  if (auto status = context.RejectUnknownKeys(
          node, {"name", "socket", "socketGroup", "statusVersion", "allowSharedBackendKey", "keySource"});
      !status.ok()) {
    return status;
  }
  EnvironmentConfig env;
  auto name = context.RequiredString(node, "name", "name the environment, e.g. name: prod");
  if (!name.ok()) {
    return name.status();
  }
  if (!IsValidEnvironmentName(*name)) {
    return context.Child("name").Error(
        absl::StrCat("\"", *name, "\" is not a valid environment name"),
        "use 1 to 63 lowercase letters, digits and '-', starting and ending with a letter or digit");
  }
  env.name = *name;

  auto socket = context.RequiredString(node, "socket", "set the Unix socket path, e.g. /run/kmsplugin/prod.sock");
  if (!socket.ok()) {
    return socket.status();
  }
  if (socket->front() != '/') {
    return context.Child("socket").Error(absl::StrCat("\"", *socket, "\" is not an absolute path"),
                                         "write an absolute path such as /run/kmsplugin/prod.sock "
                                         "(abstract sockets are refused: they have no permissions)");
  }
  if (socket->size() > kMaxSocketPath) {
    return context.Child("socket").Error(
        absl::StrCat("is ", socket->size(), " bytes; a Unix socket path holds at most ", kMaxSocketPath),
        "choose a shorter path");
  }
  env.socket = std::filesystem::path(*socket).lexically_normal().string();

  auto group = context.OptionalString(node, "socketGroup");
  if (!group.ok()) {
    return group.status();
  }
  if (group->has_value() && (*group)->empty()) {
    return context.Child("socketGroup").Error("is empty", "name a group, or remove socketGroup for a 0600 socket");
  }
  env.socket_group = *group;

  auto version = context.OptionalString(node, "statusVersion");
  if (!version.ok()) {
    return version.status();
  }
  if (version->has_value()) {
    if (**version != "v2" && **version != "v2beta1") {
      return context.Child("statusVersion")
          .Error(absl::StrCat("\"", **version, "\" is not a KMS v2 Status version"),
                 "use v2 for Kubernetes 1.29 and later, v2beta1 for 1.27 and 1.28");
    }
    env.status_version = **version;
  }

  auto shared = context.OptionalBool(node, "allowSharedBackendKey");
  if (!shared.ok()) {
    return shared.status();
  }
  env.allow_shared_backend_key = shared->value_or(false);

  auto key_source = ParseKeySource(node["keySource"], context.Child("keySource"), parsers);
  if (!key_source.ok()) {
    return key_source.status();
  }
  env.key_source = std::move(*key_source);
  return env;
}

}  // namespace

bool IsValidEnvironmentName(std::string_view name) {
  if (name.empty() || name.size() > 63 || name.front() == '-' || name.back() == '-') {
    return false;
  }
  for (char c : name) {
    if (!absl::ascii_islower(c) && !absl::ascii_isdigit(c) && c != '-') {
      return false;
    }
  }
  return true;
}

absl::StatusOr<const EnvironmentConfig*> Config::Find(std::string_view name) const {
  std::vector<std::string> names;
  for (const EnvironmentConfig& env : environments) {
    if (env.name == name) {
      return &env;
    }
    names.push_back(env.name);
  }
  return absl::NotFoundError(absl::StrCat(file, ": no environment named \"", Sv(name), "\"; the environments are: ",
                                          absl::StrJoin(names, ", ")));
}

absl::StatusOr<Config> ParseConfig(const std::string& yaml, const std::string& file,
                                   const KeySourceParsers& parsers) {
  const FieldContext top(file, "");
  if (auto nesting = CheckYamlNesting(yaml, file); !nesting.ok()) {
    return top.Error(std::string(nesting.message()), "write the config as documented (deploy/config.example.yaml)");
  }
  YAML::Node root;
  try {
    root = YAML::Load(yaml);
  } catch (const YAML::Exception& e) {
    return top.Error(absl::StrCat("is not valid YAML (line ", e.mark.line + 1, ", column ", e.mark.column + 1,
                                  ": ", e.msg, ")"),
                     "correct the YAML syntax at that position");
  }
  if (!root.IsMap()) {
    return top.Error("is not a YAML mapping", "start the file with \"environments:\"");
  }
  if (auto status = top.RejectUnknownKeys(root, {"http", "server", "environments"}); !status.ok()) {
    return status;
  }
  Config config;
  config.file = file;
  if (root["server"]) {
    if (auto status = ParseServer(root["server"], top.Child("server"), config.server); !status.ok()) {
      return status;
    }
  }
  if (root["http"]) {
    if (auto status = ParseHttp(root["http"], top.Child("http"), config.http); !status.ok()) {
      return status;
    }
  }
  const YAML::Node envs = root["environments"];
  const FieldContext envs_context = top.Child("environments");
  if (!envs || !envs.IsSequence() || envs.size() == 0) {
    return envs_context.Error("is missing or empty", "list at least one environment with name, socket and keySource");
  }
  std::set<std::string> names;
  std::set<std::string> sockets;
  std::map<std::string, std::string> backend_keys;  // identity → environment
  for (size_t i = 0; i < envs.size(); ++i) {
    const FieldContext env_context = envs_context.Index(i);
    auto env = ParseEnvironment(envs[i], env_context, parsers);
    if (!env.ok()) {
      return env.status();
    }
    if (!names.insert(env->name).second) {
      return env_context.Child("name").Error(absl::StrCat("\"", env->name, "\" is used by another environment"),
                                             "give every environment its own name");
    }
    if (!sockets.insert(env->socket).second) {
      return env_context.Child("socket").Error(
          absl::StrCat("\"", env->socket, "\" is used by another environment"),
          "give every environment its own socket: a socket belongs to exactly one environment");
    }
    const std::string identity = env->key_source->BackendKeyIdentity();
    if (auto [it, inserted] = backend_keys.emplace(identity, env->name); !inserted && !env->allow_shared_backend_key) {
      return env_context.Child("keySource").Error(
          absl::StrCat("uses the same backend key as environment \"", it->second, "\" (", identity, ")"),
          "give each environment its own key, or set allowSharedBackendKey: true on this environment if the "
          "sharing is deliberate (ciphertexts stay bound to their environment either way)");
    }
    config.environments.push_back(std::move(*env));
  }
  return config;
}

absl::StatusOr<std::string> ReadConfigFile(const std::string& path) {
  // Checked and read on one descriptor: a path swapped between the two is never used.
  auto file = ReadCheckedFile(path, "config file", FileKind::kTrusted, kMaxConfigBytes);
  if (!file.ok()) {
    return file.status();
  }
  return std::move(file->bytes);
}

absl::StatusOr<Config> LoadConfig(const std::string& path, const KeySourceParsers& parsers) {
  auto text = ReadConfigFile(path);
  if (!text.ok()) {
    return text.status();
  }
  return ParseConfig(*text, path, parsers);
}

}  // namespace kmsplugin::config
