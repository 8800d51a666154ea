#include "kmsplugin/observe/log_fields.h"

#include <algorithm>
#include <map>

#include "absl/strings/str_cat.h"

namespace kmsplugin::observe {
namespace {

using T = LogFieldType;

std::string Shown(const nlohmann::json& value) {
  std::string text = value.dump(-1, ' ', true, nlohmann::json::error_handler_t::replace);
  return text.size() > 80 ? text.substr(0, 80) + "..." : text;
}

}  // namespace

const std::vector<LogField>& LogFieldTable() {
  static const auto* const table = new std::vector<LogField>{
      // Every line.
      {"time", T::kString, "when, UTC, RFC 3339 with microseconds (2026-12-07T20:00:00.000000Z)"},
      {"level", T::kString, "trace, debug, info, warn, error or critical: the --log-level names"},
      {"msg", T::kString, "what happened, one line for a person"},
      // Who and where.
      {"environment", T::kString, "the environment (config `environments[].name`) the line is about"},
      {"socket", T::kString, "a Unix socket path the plugin serves"},
      {"key_source", T::kString, "the environment's key source kind: local, vault or pkcs11"},
      {"event", T::kString,
       "what kind of thing happened, for grep and alerts (reload, rotation, retire, unhealthy, recovered, failover, "
       "accept_failed, ...)"},
      // Calls.
      {"rpc", T::kString, "the gRPC call: API and method (v2.Encrypt, v1beta1.Decrypt, ...)"},
      {"uid", T::kString, "the request uid kube-apiserver sent (caller-supplied)"},
      {"code", T::kString, "the call's gRPC status code name (OK, INVALID_ARGUMENT, UNAVAILABLE, ...)"},
      {"latency_ms", T::kNumber, "the call's time in the plugin, in milliseconds"},
      {"suppressed", T::kInteger, "failure lines of the same kind not written since the last one (rate limit)"},
      // Keys.
      {"key_id", T::kString, "a key_id (the current one, or the one a call used)"},
      {"old_key_id", T::kString, "the key_id before a rotation"},
      {"key_ids", T::kStringList, "the key_ids of the versions a retire, reinstate or destroy touched"},
      {"fingerprint", T::kString,
       "the key set's fingerprint after a stage or promote (ks1-..., compared across nodes; never key material)"},
      {"version", T::kInteger, "a key version number"},
      {"versions", T::kIntegerList, "the key version numbers a retire, reinstate or destroy touched"},
      {"retired", T::kIntegerList, "the retired key versions now in force"},
      {"retired_before", T::kIntegerList, "the retired key versions before the change"},
      {"forced", T::kBoolean, "the retire ran with --force"},
      {"etcd_checked", T::kBoolean, "the retire counted etcd's objects first"},
      {"change", T::kString, "what a key-version change did (added, retired, reinstated, current moved)"},
      {"key", T::kString, "the Vault Transit key (mount/keys/name)"},
      {"key_label", T::kString, "the PKCS#11 key label"},
      {"token", T::kString, "the PKCS#11 token (label or serial)"},
      {"keyring", T::kString, "the local keyring file"},
      // Backends and credentials.
      {"address", T::kString, "a network address: the HTTP listen address, or the Vault address that answered"},
      {"from", T::kString, "the Vault address requests went to before a failover"},
      {"to", T::kString, "the Vault address requests go to after a failover"},
      {"path", T::kString, "the Vault auth mount path of a login"},
      {"file", T::kString, "a credential file that was read again (token, secret_id, PIN)"},
      {"ttl_seconds", T::kInteger, "the Vault token's lease after a renewal, in seconds"},
      // Config and reload.
      {"config", T::kString, "the config file"},
      {"result", T::kString, "a reload's outcome: applied or rejected"},
      {"summary", T::kString, "what a reload changed, one line"},
      {"added", T::kStringList, "environments a reload added"},
      {"removed", T::kStringList, "environments a reload removed"},
      {"changed", T::kStringList, "environments a reload changed, with what changed"},
      {"serving", T::kString, "what serves after a rejected reload"},
      {"warning", T::kString, "a config warning"},
      {"setting", T::kString, "the config setting that allowed what the line reports"},
      // Process and sockets.
      {"program_version", T::kString, "kmsplugin's own version (`kmsplugin version`)"},
      {"environments", T::kInteger, "how many environments serve"},
      {"healthz", T::kString, "an environment's health at start (ok, or the reason)"},
      {"port", T::kInteger, "the HTTP port bound"},
      {"paths", T::kString, "the HTTP paths served"},
      {"grace_period_seconds", T::kNumber, "how long in-flight calls may take to finish at shutdown, in seconds"},
      {"interval_seconds", T::kNumber, "systemd's watchdog interval, in seconds"},
      {"soft", T::kInteger, "the soft file descriptor limit"},
      {"hard", T::kInteger, "the hard file descriptor limit"},
      {"raised_from", T::kInteger, "the soft file descriptor limit before the plugin raised it"},
      {"failures_so_far", T::kInteger, "accept() failures on the socket since start"},
      {"refused_so_far", T::kInteger, "connections closed at once over the limit since start"},
      {"max_connections", T::kInteger, "the connection limit of one socket"},
      {"max_connections_per_uid", T::kInteger, "the connection limit of one peer user on one socket"},
      {"peer_uid", T::kInteger, "the peer's user id (4294967295 when unknown)"},
      // Problems.
      {"error", T::kString, "what failed (never on a success)"},
      {"reason", T::kString, "why (a backend unavailable, memory unlocked, a failover)"},
      {"detail", T::kString, "more about a warning"},
      {"fix", T::kString, "what an operator can do about it"},
  };
  return *table;
}

const LogField* FindLogField(std::string_view key) {
  static const auto* const index = [] {
    auto* map = new std::map<std::string, const LogField*, std::less<>>;
    for (const LogField& field : LogFieldTable()) {
      (*map)[field.key] = &field;
    }
    return map;
  }();
  const auto it = index->find(key);
  return it == index->end() ? nullptr : it->second;
}

std::string_view LogFieldTypeName(LogFieldType type) {
  switch (type) {
    case T::kString:
      return "string";
    case T::kInteger:
      return "integer";
    case T::kNumber:
      return "number";
    case T::kBoolean:
      return "boolean";
    case T::kStringList:
      return "list of strings";
    case T::kIntegerList:
      return "list of integers";
  }
  return "?";
}

bool HasLogFieldType(const nlohmann::json& value, LogFieldType type) {
  switch (type) {
    case T::kString:
      return value.is_string();
    case T::kInteger:
      return value.is_number_integer();
    case T::kNumber:
      return value.is_number();
    case T::kBoolean:
      return value.is_boolean();
    case T::kStringList:
      return value.is_array() && std::all_of(value.begin(), value.end(), [](const auto& v) { return v.is_string(); });
    case T::kIntegerList:
      return value.is_array() &&
             std::all_of(value.begin(), value.end(), [](const auto& v) { return v.is_number_integer(); });
  }
  return false;
}

const std::vector<std::string>& LogLevelNames() {
  static const auto* const names = new std::vector<std::string>{"trace", "debug", "info", "warn", "error", "critical"};
  return *names;
}

std::vector<std::string> CheckLogLine(const nlohmann::json& line) {
  std::vector<std::string> problems;
  if (!line.is_object()) {
    problems.push_back("not a JSON object");
    return problems;
  }
  for (const char* required : {"time", "level", "msg"}) {
    if (!line.contains(required)) {
      problems.push_back(absl::StrCat("no \"", required, "\""));
    }
  }
  if (line.contains("level")) {
    const auto& names = LogLevelNames();
    if (!line["level"].is_string() ||
        std::find(names.begin(), names.end(), line["level"].get<std::string>()) == names.end()) {
      problems.push_back(absl::StrCat("level ", Shown(line["level"]), " is not a --log-level name"));
    }
  }
  for (const auto& [key, value] : line.items()) {
    const bool empty = value.is_null() || (value.is_string() && value.get_ref<const std::string&>().empty()) ||
                       (value.is_structured() && value.empty());
    if (empty) {
      problems.push_back(absl::StrCat("\"", key, "\" is empty (", Shown(value), ")"));
    }
    const LogField* field = FindLogField(key);
    if (field == nullptr) {
      problems.push_back(absl::StrCat("\"", key, "\" is not in the field list (kmsplugin/observe/log_fields.cc)"));
    } else if (!HasLogFieldType(value, field->type)) {
      problems.push_back(absl::StrCat("\"", key, "\" is ", Shown(value), ", but the field list says ",
                                      std::string(LogFieldTypeName(field->type))));
    }
  }
  return problems;
}

}  // namespace kmsplugin::observe
