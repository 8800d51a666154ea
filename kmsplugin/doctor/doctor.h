#pragma once

// The checks behind `kmsplugin doctor --encryption-config FILE`: a kube-apiserver EncryptionConfiguration held
// against the running plugin(s), and optionally against kmsplugin's own config. They make the CIS Kubernetes
// Benchmark's encryption-at-rest items ("--encryption-provider-config is set", "encryption providers are
// appropriately configured") concrete for a KMS v2 setup.
//
// RunChecks is a pure function of its inputs plus the prober's answers: no file or socket I/O of its own. Each
// result is one row: a stable id, a verdict, what was found and the fix. Ids (one row each, in this order):
//   file.format              apiVersion apiserver.config.k8s.io/v1, kind EncryptionConfiguration
//   file.schema              nothing kube-apiserver would refuse (unknown/repeated fields, shapes, overlaps)
//   file.permissions         neither group nor others can write it, nor read it (keys, endpoints)
//   secrets.coverage         which resources entry covers Secrets (first match, as kube-apiserver resolves)
//   secrets.write-provider   Secrets' first provider is KMS v2
//   identity.fallback        no identity after a kms provider (a migration still in progress)
//   kms.names                kms names unique across the file, no ':'
//   kms.endpoint[NAME]       one per kms provider: unix:///absolute path, answers Status healthily in time
//   kms.timeouts             every kms timeout parses and lies in sane bounds
//   kmsplugin.endpoints      (with a kmsplugin config) every kms endpoint is an environment's socket
//   kmsplugin.secrets-environment  (with a kmsplugin config) Secrets are written through a configured environment
//
// Thread-compatible; the prober is called once per distinct socket, sequentially.

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <sys/types.h>

#include "absl/time/time.h"
#include "kmsplugin/config/config.h"
#include "kmsplugin/doctor/encryption_config.h"
#include "kmsplugin/doctor/status_prober.h"

namespace kmsplugin::doctor {

// Ordered by severity.
enum class Verdict { kPass = 0, kWarn = 1, kFail = 2 };

std::string_view VerdictName(Verdict verdict);  // "PASS", "WARN", "FAIL"

struct CheckResult {
  std::string id;
  Verdict verdict = Verdict::kPass;
  std::string found;
  std::string fix;   // "-" when there is nothing to do
};

struct DoctorOptions {
  // st_mode of the EncryptionConfiguration file; nullopt skips file.permissions' mode test.
  std::optional<mode_t> file_mode;
  // Deadline for each Status call.
  absl::Duration probe_timeout = absl::Seconds(3);
  // kmsplugin's own config (--config), for the kmsplugin.* checks; null skips them.
  const config::Config* plugin_config = nullptr;
};

// Timeout bounds for kms.timeouts (the reasoning is in doctor.cc).
inline constexpr absl::Duration kMinSaneTimeout = absl::Seconds(1);
inline constexpr absl::Duration kMaxSaneTimeout = absl::Seconds(10);
inline constexpr absl::Duration kDefaultKmsTimeout = absl::Seconds(3);

std::vector<CheckResult> RunChecks(const EncryptionConfigFile& file, const DoctorOptions& options,
                                   StatusProber& prober);

// The worst verdict (PASS for an empty list).
Verdict Overall(const std::vector<CheckResult>& results);

// Parses a kms `timeout` as kube-apiserver's metav1.Duration does (Go time.ParseDuration: "3s", "500ms",
// "1m30s"). nullopt when it does not parse.
std::optional<absl::Duration> ParseGoDuration(std::string_view text);

// The socket path of a kms endpoint: "unix:///run/x.sock" -> "/run/x.sock". nullopt (with `why`) unless the
// endpoint is unix:// followed by an absolute path that is not an abstract socket ("/@name").
std::optional<std::string> SocketPathOf(std::string_view endpoint, std::string* why);

}  // namespace kmsplugin::doctor
