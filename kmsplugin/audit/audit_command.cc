#include "kmsplugin/audit/audit_command.h"

#include <sys/prctl.h>
#include <sys/resource.h>

#include <cmath>
#include <iostream>
#include <optional>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/time.h"
#include "kmsplugin/audit/snapshot_etcd.h"
#include "kmsplugin/core/clock.h"
#include "kmsplugin/core/duration_flag.h"
#include "kmsplugin/core/exit_codes.h"
#include "kmsplugin/core/sv.h"

namespace kmsplugin::audit {
namespace {

constexpr int64_t kMaxPageSize = 10000;

// Opening a key source may bring key material into memory: no core dumps from here on.
void NoCoreDumps() {
  prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
  const rlimit no_core{0, 0};
  setrlimit(RLIMIT_CORE, &no_core);
}

// Flags, config and TLS files that cannot be used are usage errors (2); etcd that cannot be reached is 3.
int Fail(std::ostream& err, const absl::Status& status) {
  err << "kmsplugin audit: " << status.message() << "\n";
  return core::ExitCodeFor(status, core::kExitUsage);
}

}  // namespace

void AddAuditFlags(CLI::App& subcommand, AuditFlags& flags) {
  subcommand.add_option("--config", flags.config_path,
                        "kmsplugin config: key_ids are checked against its environments' key versions");
  CLI::Option* endpoints =
      subcommand.add_option("--endpoints", flags.endpoints, "etcd endpoints, host:port[,host:port]")
          ->capture_default_str();
  CLI::Option* cacert =
      subcommand.add_option("--cacert", flags.cacert, "CA bundle (PEM) that signs etcd's server certificate");
  CLI::Option* cert = subcommand.add_option("--cert", flags.cert, "client certificate (PEM) for etcd");
  CLI::Option* key = subcommand.add_option("--key", flags.key, "client certificate's private key (PEM)");
  subcommand.add_flag("--decrypt", flags.decrypt,
                      "decrypt every object for real through the config's key sources (needs --config); name each "
                      "that does not decrypt");
  subcommand
      .add_option("--snapshot", flags.snapshot,
                  "audit an etcd snapshot file (etcdctl snapshot save) instead of a live etcd: it is restored and "
                  "served by a private etcd on loopback, removed afterwards")
      ->excludes(endpoints)
      ->excludes(cacert)
      ->excludes(cert)
      ->excludes(key);
  subcommand.add_option("--prefix", flags.prefixes,
                        "etcd key prefix to audit, repeatable (default /registry/secrets/)");
  subcommand.add_option("--page-size", flags.page_size, "keys read per etcd request")->capture_default_str();
  subcommand.add_flag("--json", flags.json, "machine-readable output");
  subcommand
      .add_option_function<std::string>(
          "--timeout",
          [&flags](const std::string& text) {
            const std::optional<absl::Duration> timeout = core::ParseDurationFlag(text);
            if (!timeout.has_value()) {
              throw CLI::ValidationError(core::DurationFlagError("--timeout", text));
            }
            flags.timeout_seconds = absl::ToDoubleSeconds(*timeout);
          },
          "deadline of each etcd request (5s, 500ms; a bare number is seconds)")
      ->default_str(absl::StrCat(flags.timeout_seconds, "s"));
}

absl::StatusOr<EtcdOptions> EtcdOptionsFromFlags(const AuditFlags& flags) {
  EtcdOptions options;
  for (absl::string_view endpoint : absl::StrSplit(flags.endpoints, ',', absl::SkipWhitespace())) {
    options.endpoints.emplace_back(endpoint);
  }
  if (options.endpoints.empty()) {
    return absl::InvalidArgumentError("--endpoints is empty; fix: --endpoints host:port[,host:port]");
  }
  if (!(flags.timeout_seconds > 0) || !std::isfinite(flags.timeout_seconds)) {
    return absl::InvalidArgumentError(absl::StrCat("--timeout must be a positive number of seconds, got ",
                                                   flags.timeout_seconds));
  }
  options.ca_file = flags.cacert;
  options.cert_file = flags.cert;
  options.key_file = flags.key;
  options.timeout = absl::Seconds(flags.timeout_seconds);
  return options;
}

absl::StatusOr<AuditOptions> AuditOptionsFromFlags(const AuditFlags& flags) {
  AuditOptions options;
  if (flags.page_size < 1 || flags.page_size > kMaxPageSize) {
    return absl::InvalidArgumentError(
        absl::StrCat("--page-size must be 1..", kMaxPageSize, ", got ", flags.page_size));
  }
  options.page_size = flags.page_size;
  if (!flags.prefixes.empty()) {
    options.prefixes.clear();
    for (std::string prefix : flags.prefixes) {
      if (prefix.empty() || prefix.front() != '/') {
        return absl::InvalidArgumentError(
            absl::StrCat("--prefix \"", prefix, "\" must start with '/' (e.g. /registry/secrets/)"));
      }
      // "/registry/secrets" would also match "/registry/secretsfoo/...".
      if (prefix.back() != '/') {
        prefix.push_back('/');
      }
      options.prefixes.push_back(prefix);
    }
  }
  return options;
}

int RunAudit(const AuditFlags& flags, const config::KeySourceParsers& parsers) {
  return RunAudit(flags, parsers, std::cout, std::cerr);
}

int RunAudit(const AuditFlags& flags, const config::KeySourceParsers& parsers, std::ostream& out,
             std::ostream& err) {
  auto etcd_options = EtcdOptionsFromFlags(flags);
  if (!etcd_options.ok()) {
    return Fail(err, etcd_options.status());
  }
  auto audit_options = AuditOptionsFromFlags(flags);
  if (!audit_options.ok()) {
    return Fail(err, audit_options.status());
  }
  if (flags.decrypt && flags.config_path.empty()) {
    return Fail(err,
                absl::InvalidArgumentError("--decrypt needs --config: the environments' key sources unwrap the DEKs"));
  }
  // The snapshot's etcd first, so that whatever fails later (config, key sources) still removes it.
  std::unique_ptr<SnapshotEtcd> snapshot;
  if (!flags.snapshot.empty()) {
    SnapshotEtcdOptions snapshot_options;
    snapshot_options.snapshot = flags.snapshot;
    auto started = SnapshotEtcd::Start(snapshot_options);
    if (!started.ok()) {
      return Fail(err, started.status());
    }
    snapshot = *std::move(started);
    etcd_options->endpoints = {snapshot->endpoint()};
    etcd_options->ca_file.clear();
    etcd_options->cert_file.clear();
    etcd_options->key_file.clear();
  }
  std::optional<KeyCatalog> catalog;
  std::map<std::string, std::shared_ptr<core::KeySource>> sources;
  std::unique_ptr<ObjectDecryptor> decryptor;
  if (!flags.config_path.empty()) {
    NoCoreDumps();
    auto config = config::LoadConfig(flags.config_path, parsers);
    if (!config.ok()) {
      return Fail(err, config.status());
    }
    auto opened = OpenKeySources(*config);
    if (!opened.ok()) {
      return Fail(err, opened.status());
    }
    sources = *std::move(opened);
    auto loaded = KeyCatalog::FromSources(sources);
    if (!loaded.ok()) {
      return Fail(err, loaded.status());
    }
    catalog = *std::move(loaded);
    if (flags.decrypt) {
      ObjectDecryptor::Options decrypt_options;
      decrypt_options.timeout = etcd_options->timeout;
      decryptor = std::make_unique<ObjectDecryptor>(sources, decrypt_options, core::SystemClock());
      audit_options->decryptor = decryptor.get();
    }
  }
  auto client = EtcdClient::New(*etcd_options);
  if (!client.ok()) {
    return Fail(err, client.status());
  }
  auto report = RunAuditScan(**client, catalog.has_value() ? &*catalog : nullptr, *audit_options);
  if (!report.ok()) {
    return Fail(err, report.status());
  }
  if (snapshot != nullptr) {
    report->endpoint = absl::StrCat("snapshot ", flags.snapshot);
  }
  if (flags.json) {
    out << ToJson(*report).dump(2) << "\n";
  } else {
    out << RenderTable(*report);
  }
  out.flush();
  return ExitCodeFor(*report);
}

absl::StatusOr<AuditReport> DecryptAuditFromEtcd(
    const AuditFlags& flags, const config::Config& config,
    const std::map<std::pair<std::string, std::string>, uint64_t>& retiring) {
  auto etcd_options = EtcdOptionsFromFlags(flags);
  if (!etcd_options.ok()) {
    return etcd_options.status();
  }
  auto audit_options = AuditOptionsFromFlags(flags);
  if (!audit_options.ok()) {
    return audit_options.status();
  }
  NoCoreDumps();
  auto sources = OpenKeySources(config);
  if (!sources.ok()) {
    return sources.status();
  }
  auto catalog = KeyCatalog::FromSources(*sources);
  if (!catalog.ok()) {
    return catalog.status();
  }
  ObjectDecryptor::Options decrypt_options;
  decrypt_options.timeout = etcd_options->timeout;
  decrypt_options.assume_retired = retiring;
  ObjectDecryptor decryptor(*sources, decrypt_options, core::SystemClock());
  audit_options->decryptor = &decryptor;
  auto client = EtcdClient::New(*etcd_options);
  if (!client.ok()) {
    return client.status();
  }
  return RunAuditScan(**client, &*catalog, *audit_options);
}

absl::StatusOr<KeyUsageReport> KeyUsageFromEtcd(const AuditFlags& flags, const config::Config& config,
                                                const std::string& environment) {
  auto etcd_options = EtcdOptionsFromFlags(flags);
  if (!etcd_options.ok()) {
    return etcd_options.status();
  }
  auto audit_options = AuditOptionsFromFlags(flags);
  if (!audit_options.ok()) {
    return audit_options.status();
  }
  NoCoreDumps();
  auto catalog = KeyCatalog::FromConfig(config, environment);
  if (!catalog.ok()) {
    return catalog.status();
  }
  auto client = EtcdClient::New(*etcd_options);
  if (!client.ok()) {
    return client.status();
  }
  return CountKeyUsage(**client, *catalog, environment, *audit_options);
}

std::string RenderKeyUsage(const KeyUsageReport& usage) {
  std::ostringstream out;
  out << "environment " << usage.environment << ": objects in etcd per key version (revision " << usage.revision
      << ")\n";
  out << "VERSION  STATE    OBJECTS  KEY_ID\n";
  for (const KeyUsage& u : usage.keys) {
    std::string version = absl::StrCat(u.key.version);
    version.resize(std::max<size_t>(version.size(), 9), ' ');
    std::string state(KeyStatusName(u.key.state == core::KeyState::kCurrent  ? KeyStatus::kCurrent
                                    : u.key.state == core::KeyState::kRetired ? KeyStatus::kRetired
                                                                              : KeyStatus::kActive));
    state.resize(std::max<size_t>(state.size(), 9), ' ');
    std::string objects = absl::StrCat(u.objects);
    objects.resize(std::max<size_t>(objects.size(), 9), ' ');
    out << version << state << objects << u.key.key_id << "\n";
  }
  return out.str();
}

nlohmann::json KeyUsageJson(const KeyUsageReport& usage) {
  nlohmann::json keys = nlohmann::json::array();
  for (const KeyUsage& u : usage.keys) {
    keys.push_back({{"version", u.key.version},
                    {"keyId", u.key.key_id},
                    {"state", std::string(core::KeyStateName(u.key.state))},
                    {"objects", u.objects}});
  }
  return {{"environment", usage.environment}, {"revision", usage.revision}, {"versions", keys}};
}

}  // namespace kmsplugin::audit
