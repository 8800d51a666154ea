#pragma once

// `kmsplugin audit`: reads etcd (never writes) and reports, per resource prefix, how many objects sit under each
// KMS provider and key_id, which are not encrypted, and which are under a key_id no configured environment
// knows or under a retired key version.
//
//   kmsplugin audit [--config FILE] --endpoints host:port[,host:port] [--cacert F --cert F --key F]
//                   [--prefix /registry/secrets/ ...] [--page-size 500] [--timeout 10] [--json]
//                   [--decrypt] [--snapshot FILE]
//
// --decrypt (needs --config): every encrypted object is decrypted for real (object_decryptor.h), through the
// configured environments' key sources; one that does not decrypt is named with the reason and fails the audit.
// --snapshot FILE: instead of a live etcd, audits an etcd snapshot, restored and served by a private etcd on
// loopback that is removed afterwards (snapshot_etcd.h): "would this backup be readable with today's keys?".
//
// Exit codes: 0 all objects encrypted under known, unretired keys; 1 something is unencrypted, malformed, or
// under an unknown or retired key; 2 usage, config, key source or etcd connection error (one line on stderr
// naming the problem and the fix). Without --config, key_ids are listed but not checked.
//
// Also the etcd part of `kmsplugin keys --env NAME --endpoints ...` (KeyUsageFromEtcd): per key version, how many
// objects still use it.

#include <cstdint>
#include <map>
#include <utility>
#include <ostream>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "absl/status/statusor.h"
#include "kmsplugin/audit/auditor.h"
#include "kmsplugin/audit/etcd_client.h"
#include "kmsplugin/config/config.h"

namespace kmsplugin::audit {

struct AuditFlags {
  std::string config_path;                    // optional: without it key_ids are not checked
  std::string endpoints = "127.0.0.1:2379";   // comma-separated host:port (http:// or https:// allowed)
  std::string cacert;
  std::string cert;
  std::string key;
  std::vector<std::string> prefixes;          // empty: /registry/secrets/
  int64_t page_size = kDefaultPageSize;
  bool json = false;
  double timeout_seconds = 10;                // per etcd call
  bool decrypt = false;                       // decrypt every object (needs config_path)
  std::string snapshot;                       // audit this etcd snapshot instead of --endpoints
};

// Registers the flags above on `subcommand` (e.g. app.add_subcommand("audit", ...)).
void AddAuditFlags(CLI::App& subcommand, AuditFlags& flags);

// Runs the audit; prints the table (or JSON with --json) on stdout, errors on stderr. Returns the exit code
// (core/exit_codes.h): 0 nothing needs attention, 1 something does, 2 a flag, config or TLS file is unusable,
// 3 etcd cannot be reached.
int RunAudit(const AuditFlags& flags, const config::KeySourceParsers& parsers);
int RunAudit(const AuditFlags& flags, const config::KeySourceParsers& parsers, std::ostream& out,
             std::ostream& err);

// The etcd connection the flags describe (endpoints, TLS files, timeout). INVALID_ARGUMENT naming a bad flag.
absl::StatusOr<EtcdOptions> EtcdOptionsFromFlags(const AuditFlags& flags);
// The audit options the flags describe (prefixes normalised to end in '/', page size checked).
absl::StatusOr<AuditOptions> AuditOptionsFromFlags(const AuditFlags& flags);

// `kmsplugin keys --config FILE --env NAME --endpoints ...`: opens only `environment`'s key source (read-only),
// scans the flags' prefixes and counts the objects under each of its key versions. Uses flags.endpoints, the
// TLS files, prefixes, page size and timeout; flags.config_path and flags.json are ignored.
absl::StatusOr<KeyUsageReport> KeyUsageFromEtcd(const AuditFlags& flags, const config::Config& config,
                                                const std::string& environment);
std::string RenderKeyUsage(const KeyUsageReport& usage);

nlohmann::json KeyUsageJson(const KeyUsageReport& usage);

// `kmsplugin retire --verify`: decrypts every object under the flags' prefixes with every environment of `config`,
// treating the (environment, key_ref) pairs of `retiring` as retired already, so the report names each object that
// would stop decrypting (or already does not). Uses the etcd flags as KeyUsageFromEtcd does.
absl::StatusOr<AuditReport> DecryptAuditFromEtcd(
    const AuditFlags& flags, const config::Config& config,
    const std::map<std::pair<std::string, std::string>, uint64_t>& retiring);

}  // namespace kmsplugin::audit
