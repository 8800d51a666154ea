#include "kmsplugin/doctor/doctor.h"

#include <algorithm>
#include <filesystem>
#include <map>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "kmsplugin/core/sv.h"

// Facts the checks rely on, and where they come from (kubernetes/kubernetes, staging/src/k8s.io/apiserver, unless
// noted; also /work/shared/reference/kms-protocol.md):
//  - Resource lookup (pkg/server/options/encryptionconfig/config.go, transformerFromOverrides): the exact
//    group/resource first, then "*.<group>", then "*.*", else identity (plaintext). A resource listed after a
//    wildcard that already covers it is refused at start ("is masked by earlier rule"), so in an accepted file the
//    first entry (in file order) that matches Secrets is the one that applies. "secrets" listed in two entries is
//    accepted: the providers are concatenated in file order, and the first of them writes.
//  - kms names (pkg/apis/apiserver/validation/validation_encryption.go): v2 names must not contain ':' and must be
//    unique across all kms providers; v1 names may contain ':' and need to be unique only with
//    --encryption-provider-config-automatic-reload.
//  - kms defaults (pkg/apis/apiserver/v1/defaults.go): apiVersion v1, timeout 3s; the timeout must be > 0.
//  - KMS v1: deprecated since 1.28, disabled by default since 1.29 (KMSv1 feature gate; kubernetes.io
//    "Using a KMS provider for data encryption").
//  - Status (config.go, isKMSv2ProviderHealthyAndMaybeRotateDEK): healthz must be "ok", version "v2" or
//    "v2beta1", key_id non-empty and at most 1 kB.

namespace kmsplugin::doctor {
namespace {

constexpr char kNoFix[] = "-";
constexpr size_t kMaxKeyIdBytes = 1024;
constexpr size_t kMaxListed = 3;

CheckResult Row(std::string id, Verdict verdict, std::string found, std::string fix = kNoFix) {
  return CheckResult{std::move(id), verdict, std::move(found), std::move(fix)};
}

std::string Listed(const std::vector<std::string>& items) {
  std::vector<std::string> shown(items.begin(), items.begin() + std::min(items.size(), kMaxListed));
  std::string text = absl::StrJoin(shown, "; ");
  if (items.size() > kMaxListed) {
    absl::StrAppend(&text, "; and ", items.size() - kMaxListed, " more");
  }
  return text;
}

std::string DurationText(absl::Duration d) { return absl::FormatDuration(d); }

std::string ProviderLabel(const Provider& provider) {
  if (provider.type != ProviderType::kKms) {
    return std::string(ProviderTypeName(provider.type));
  }
  return absl::StrCat("kms ", provider.kms.EffectiveApiVersion(), " \"", provider.kms.name, "\"");
}

std::string KmsLabel(const Provider& provider) {
  return provider.kms.name.empty() ? provider.path : absl::StrCat("\"", provider.kms.name, "\"");
}

std::string NormalPath(const std::string& path) {
  return std::filesystem::path(path).lexically_normal().string();
}

// ---------------------------------------------------------------------------------------------------------------
// Which entry covers Secrets.

struct Coverage {
  // Entries that match Secrets, in file order, with the resource string that matched and its breadth
  // (0 exact "secrets", 1 "*." core-group wildcard, 2 "*.*").
  struct Match {
    const ResourceEntry* entry;
    std::string text;
    int breadth;
  };
  std::vector<Match> matches;
  std::vector<const Provider*> providers;   // what kube-apiserver uses for Secrets, the first writes
  std::string masked;                       // non-empty when kube-apiserver refuses the file over these matches
};

Coverage SecretsCoverage(const EncryptionConfigFile& file) {
  Coverage coverage;
  for (const ResourceEntry& entry : file.entries) {
    for (const std::string& text : entry.resources) {
      const GroupResource gr = ParseGroupResource(text);
      int breadth = -1;
      if (gr == GroupResource{"", "secrets"}) {
        breadth = 0;
      } else if (gr == GroupResource{"", "*"}) {
        breadth = 1;
      } else if (gr == GroupResource{"*", "*"}) {
        breadth = 2;
      }
      if (breadth >= 0) {
        coverage.matches.push_back({&entry, text, breadth});
        break;
      }
    }
  }
  if (coverage.matches.empty()) {
    return coverage;
  }
  for (size_t i = 1; i < coverage.matches.size(); ++i) {
    for (size_t j = 0; j < i; ++j) {
      if (coverage.matches[i].breadth <= coverage.matches[j].breadth && coverage.matches[j].breadth > 0) {
        coverage.masked = absl::StrCat("\"", coverage.matches[i].text, "\" in ", coverage.matches[i].entry->path,
                                       " is masked by the earlier \"", coverage.matches[j].text, "\" in ",
                                       coverage.matches[j].entry->path);
        break;
      }
    }
    if (!coverage.masked.empty()) {
      break;
    }
  }
  const int narrowest = std::min_element(coverage.matches.begin(), coverage.matches.end(),
                                         [](const Coverage::Match& a, const Coverage::Match& b) {
                                           return a.breadth < b.breadth;
                                         })->breadth;
  for (const Coverage::Match& match : coverage.matches) {
    if (match.breadth != narrowest) {
      continue;
    }
    for (const Provider& provider : match.entry->providers) {
      coverage.providers.push_back(&provider);
    }
    if (narrowest > 0) {
      break;  // a second identical wildcard would be masked; the first one applies
    }
  }
  return coverage;
}

const Provider* WriteProvider(const Coverage& coverage) {
  return coverage.providers.empty() ? nullptr : coverage.providers.front();
}

// ---------------------------------------------------------------------------------------------------------------

CheckResult FileFormat(const EncryptionConfigFile& file) {
  constexpr char kApiVersion[] = "apiserver.config.k8s.io/v1";
  constexpr char kKind[] = "EncryptionConfiguration";
  if (file.api_version == kApiVersion && file.kind == kKind) {
    return Row("file.format", Verdict::kPass, absl::StrCat(kApiVersion, " ", kKind));
  }
  return Row("file.format", Verdict::kFail,
             absl::StrCat("apiVersion \"", file.api_version, "\", kind \"", file.kind,
                          "\": kube-apiserver does not load it as an EncryptionConfiguration"),
             absl::StrCat("set apiVersion: ", kApiVersion, " and kind: ", kKind));
}

CheckResult FileSchema(const EncryptionConfigFile& file) {
  if (file.problems.empty()) {
    return Row("file.schema", Verdict::kPass,
               "no unknown or repeated fields; every provider element names exactly one provider");
  }
  return Row("file.schema", Verdict::kFail,
             absl::StrCat(file.problems.size(), " problem(s) kube-apiserver refuses the file for: ",
                          Listed(file.problems)),
             "correct each field named (kube-apiserver decodes this file strictly and validates it at start)");
}

CheckResult FilePermissions(const EncryptionConfigFile& file, mode_t mode) {
  const std::string mode_text = absl::StrFormat("mode %04o", mode & 07777);
  const std::string fix = absl::StrCat("chmod 600 ", file.file);
  const bool keys = file.HoldsStaticKeys();
  if ((mode & 0022) != 0) {
    return Row("file.permissions", Verdict::kFail,
               absl::StrCat(mode_text, ": ", (mode & 0002) != 0 ? "others" : "group",
                            " can write it, and so redirect Secrets to another endpoint or key"),
               fix);
  }
  if ((mode & 0044) != 0) {
    // Static keys readable by others are leaked keys; endpoints alone are not secret, but there is no reason for
    // anyone but kube-apiserver (root) to read the file.
    return Row("file.permissions", keys ? Verdict::kFail : Verdict::kWarn,
               absl::StrCat(mode_text, ": ", (mode & 0004) != 0 ? "anyone on the host" : "its group",
                            " can read it", keys ? ", including the static keys it holds" : " (it names the KMS endpoints)"),
               fix);
  }
  return Row("file.permissions", Verdict::kPass, absl::StrCat(mode_text, ": only its owner can read or write it"));
}

CheckResult SecretsCoverageRow(const Coverage& coverage) {
  if (coverage.matches.empty()) {
    return Row("secrets.coverage", Verdict::kFail,
               "no resources entry lists secrets, \"*.\" or \"*.*\": Secrets are stored in etcd as plaintext",
               "add an entry with resources: [secrets] and a kms v2 provider first (kmsplugin render prints one)");
  }
  if (!coverage.masked.empty()) {
    return Row("secrets.coverage", Verdict::kFail,
               absl::StrCat(coverage.masked, ": kube-apiserver refuses the file"),
               "list secrets before any wildcard entry that also covers it, or drop one of the two");
  }
  const Coverage::Match& first = coverage.matches.front();
  std::string found = absl::StrCat(first.entry->path, " covers Secrets (\"", first.text, "\")");
  std::vector<std::string> later;
  for (size_t i = 1; i < coverage.matches.size(); ++i) {
    const Coverage::Match& m = coverage.matches[i];
    if (m.breadth == 0 && first.breadth == 0) {
      later.push_back(absl::StrCat(m.entry->path, " also lists secrets: its providers are appended after ",
                                   first.entry->path, "'s (they only read)"));
    } else {
      later.push_back(absl::StrCat(m.entry->path, " (\"", m.text, "\") does not apply to Secrets"));
    }
  }
  if (!later.empty()) {
    absl::StrAppend(&found, "; ", absl::StrJoin(later, "; "));
  }
  return Row("secrets.coverage", Verdict::kPass, found);
}

CheckResult SecretsWriteProvider(const Coverage& coverage) {
  const std::string id = "secrets.write-provider";
  const Provider* first = WriteProvider(coverage);
  if (first == nullptr) {
    return Row(id, Verdict::kFail, "none: Secrets are not covered, so they are written as plaintext",
               "add an entry for secrets whose first provider is kms apiVersion v2");
  }
  const std::string where = absl::StrCat(" (", first->path, ")");
  switch (first->type) {
    case ProviderType::kNone:
      return Row(id, Verdict::kFail, absl::StrCat("the first provider element names no provider", where),
                 "make the first provider a kms apiVersion v2 provider");
    case ProviderType::kIdentity:
      return Row(id, Verdict::kFail,
                 absl::StrCat("identity", where, ": every Secret is written to etcd as plaintext"),
                 "put a kms apiVersion v2 provider first; identity may only follow it while migrating");
    case ProviderType::kAesCbc:
    case ProviderType::kAesGcm:
    case ProviderType::kSecretbox:
      return Row(id, Verdict::kWarn,
                 absl::StrCat(Sv(ProviderTypeName(first->type)), where,
                              ": the key protecting Secrets sits in this file, on the control-plane disk"),
                 absl::StrCat("put a kms apiVersion v2 provider first (kmsplugin render) and keep ",
                              Sv(ProviderTypeName(first->type)),
                              " after it only until every Secret is rewritten"));
    case ProviderType::kKms:
      break;
  }
  const KmsSettings& kms = first->kms;
  if (kms.IsV2()) {
    return Row(id, Verdict::kPass, absl::StrCat("kms v2 \"", kms.name, "\" at ", kms.endpoint));
  }
  if (kms.EffectiveApiVersion() == "v1") {
    return Row(id, Verdict::kWarn,
               absl::StrCat("kms v1 \"", kms.name, "\"", where,
                            ": KMS v1 is deprecated since Kubernetes 1.28 and off by default since 1.29 (KMSv1 "
                            "feature gate)"),
               "add a kms apiVersion v2 provider with a new name first; keep the v1 provider second until "
               "every Secret is rewritten");
  }
  return Row(id, Verdict::kFail,
             absl::StrCat("kms \"", kms.name, "\" with unsupported apiVersion \"", kms.api_version, "\"", where),
             "set apiVersion: v2");
}

CheckResult IdentityFallback(const EncryptionConfigFile& file) {
  std::vector<std::string> found;
  for (const ResourceEntry& entry : file.entries) {
    const Provider* kms = nullptr;
    for (const Provider& provider : entry.providers) {
      if (provider.type == ProviderType::kKms && kms == nullptr) {
        kms = &provider;
      } else if (provider.type == ProviderType::kIdentity && kms != nullptr) {
        found.push_back(absl::StrCat(provider.path, " follows ", ProviderLabel(*kms)));
      }
    }
  }
  if (found.empty()) {
    return Row("identity.fallback", Verdict::kPass, "no identity provider after a kms provider");
  }
  return Row("identity.fallback", Verdict::kWarn,
             absl::StrCat("migration in progress: reads unencrypted Secrets (", Listed(found), ")"),
             "remove identity once `kmsplugin audit` reports none unencrypted");
}

// kube-apiserver 1.29+ refuses to start with any kms v1 provider in the file unless the KMSv1 feature gate is on
// (pkg/apis/apiserver/validation/validation_encryption.go checks every provider, not only the first one), so a
// v1 fallback that reads old Secrets is a start-up failure waiting for the next apiserver upgrade.
CheckResult KmsV1FeatureGate(const EncryptionConfigFile& file) {
  std::vector<std::string> found;
  for (const Provider* p : file.KmsProviders()) {
    if (p->kms.EffectiveApiVersion() == "v1") {
      found.push_back(absl::StrCat(KmsLabel(*p), " (", p->path, ")"));
    }
  }
  if (found.empty()) {
    return Row("kms.v1-feature-gate", Verdict::kPass, "no kms v1 provider");
  }
  return Row("kms.v1-feature-gate", Verdict::kWarn,
             absl::StrCat("kms v1 provider ", Listed(found),
                          ": kube-apiserver 1.29 and later refuses to load it unless started with "
                          "--feature-gates=KMSv1=true (KMS v1 is deprecated since 1.28)"),
             "start kube-apiserver with --feature-gates=KMSv1=true while the v1 provider is needed; remove it once "
             "`kmsplugin audit` reports no kms-v1 objects");
}

CheckResult KmsNames(const EncryptionConfigFile& file) {
  const std::vector<const Provider*> providers = file.KmsProviders();
  if (providers.empty()) {
    return Row("kms.names", Verdict::kPass, "no kms providers");
  }
  Verdict verdict = Verdict::kPass;
  std::vector<std::string> found;
  std::vector<std::string> fixes;
  std::map<std::string, std::vector<const Provider*>> by_name;
  for (const Provider* p : providers) {
    if (p->kms.name.empty()) {
      verdict = Verdict::kFail;
      found.push_back(absl::StrCat(p->path, " has no name"));
      fixes.push_back("give every kms provider a name (kmsplugin render uses kmsplugin-<env>)");
      continue;
    }
    by_name[p->kms.name].push_back(p);
    if (absl::StrContains(p->kms.name, ":")) {
      // kube-apiserver refuses ':' in v2 names (it ends the etcd prefix k8s:enc:kms:v2:<name>:); v1 allows it.
      if (p->kms.IsV2()) {
        verdict = Verdict::kFail;
        found.push_back(absl::StrCat("\"", p->kms.name, "\" (", p->path, ") contains ':'"));
      } else {
        verdict = std::max(verdict, Verdict::kWarn);
        found.push_back(absl::StrCat("v1 name \"", p->kms.name, "\" contains ':' (allowed for v1 only)"));
      }
      fixes.push_back("use a name without ':' (for data already written, add a new provider first)");
    }
  }
  for (const auto& [name, same] : by_name) {
    if (same.size() < 2) {
      continue;
    }
    const bool any_v2 = std::any_of(same.begin(), same.end(), [](const Provider* p) { return p->kms.IsV2(); });
    std::vector<std::string> paths;
    for (const Provider* p : same) {
      paths.push_back(p->path);
    }
    if (any_v2) {
      verdict = Verdict::kFail;
      found.push_back(absl::StrCat("\"", name, "\" is used ", same.size(), " times (", absl::StrJoin(paths, ", "),
                                   "); kube-apiserver refuses duplicate v2 names"));
    } else {
      verdict = std::max(verdict, Verdict::kWarn);
      found.push_back(absl::StrCat("v1 name \"", name, "\" is used ", same.size(),
                                   " times; refused with --encryption-provider-config-automatic-reload"));
    }
    fixes.push_back("give every kms provider its own name");
  }
  if (verdict == Verdict::kPass) {
    std::vector<std::string> names;
    for (const Provider* p : providers) {
      names.push_back(p->kms.name);
    }
    return Row("kms.names", Verdict::kPass, absl::StrCat("unique, without ':': ", absl::StrJoin(names, ", ")));
  }
  std::sort(fixes.begin(), fixes.end());
  fixes.erase(std::unique(fixes.begin(), fixes.end()), fixes.end());
  return Row("kms.names", verdict, Listed(found), absl::StrJoin(fixes, "; "));
}

struct ProbeCache {
  StatusProber& prober;
  absl::Duration timeout;
  std::map<std::string, absl::StatusOr<StatusReply>> answers;

  const absl::StatusOr<StatusReply>& Get(const std::string& socket) {
    auto it = answers.find(socket);
    if (it == answers.end()) {
      it = answers.emplace(socket, prober.Status(socket, timeout)).first;
    }
    return it->second;
  }
};

std::optional<absl::Duration> TimeoutOf(const KmsSettings& kms) {
  return kms.timeout.has_value() ? ParseGoDuration(*kms.timeout) : std::optional(kDefaultKmsTimeout);
}

CheckResult KmsEndpoint(const Provider& provider, ProbeCache& probes) {
  const KmsSettings& kms = provider.kms;
  const std::string id = absl::StrCat("kms.endpoint[", kms.name.empty() ? provider.path : kms.name, "]");
  std::string why;
  const std::optional<std::string> socket = SocketPathOf(kms.endpoint, &why);
  if (!socket.has_value()) {
    return Row(id, Verdict::kFail, absl::StrCat("endpoint \"", kms.endpoint, "\" (", provider.path, "): ", why),
               "write unix:// followed by the absolute socket path, e.g. unix:///run/kmsplugin/dev.sock");
  }
  const absl::StatusOr<StatusReply>& reply = probes.Get(*socket);
  if (!reply.ok()) {
    if (!kms.IsV2() && reply.status().code() == absl::StatusCode::kUnimplemented) {
      return Row(id, Verdict::kWarn,
                 absl::StrCat(*socket, " answers but has no KMS v2 Status (a v1beta1-only plugin?); its health "
                                       "was not checked"),
                 "move this provider to a KMS v2 plugin (kmsplugin serves v2 and v1beta1 on the same socket)");
    }
    return Row(id, Verdict::kFail,
               absl::StrCat("Status on ", *socket, " failed: ", absl::StatusCodeToString(reply.status().code()), ": ",
                            reply.status().message()),
               absl::StrCat("start the plugin (kmsplugin serve --config FILE), check `kmsplugin status --socket ",
                            *socket, "`, and that this path is the socket the plugin serves"));
  }
  Verdict verdict = Verdict::kPass;
  std::vector<std::string> problems;
  std::vector<std::string> fixes;
  if (reply->healthz != "ok") {
    verdict = Verdict::kFail;
    problems.push_back(absl::StrCat("healthz \"", reply->healthz, "\""));
    fixes.push_back("see the plugin's log and /readyz; the backend (keyring, Vault, HSM) is not answering");
  }
  if (reply->key_id.empty() || reply->key_id.size() > kMaxKeyIdBytes) {
    verdict = Verdict::kFail;
    problems.push_back(reply->key_id.empty() ? "empty key_id"
                                             : absl::StrCat("key_id of ", reply->key_id.size(), " bytes (max 1024)"));
    fixes.push_back("the plugin must report its current key: run kmsplugin init for the environment");
  }
  if (reply->version == "v2beta1") {
    verdict = std::max(verdict, Verdict::kWarn);
    problems.push_back("version v2beta1 (accepted by kube-apiserver 1.29+, required by 1.27 and 1.28)");
    fixes.push_back("once every kube-apiserver runs 1.29 or later, set statusVersion: v2 in kmsplugin's config");
  } else if (reply->version != "v2") {
    verdict = Verdict::kFail;
    problems.push_back(absl::StrCat("version \"", reply->version, "\" (kube-apiserver wants v2 or v2beta1)"));
    fixes.push_back("point the endpoint at a KMS v2 plugin");
  }
  const std::optional<absl::Duration> timeout = TimeoutOf(kms);
  if (timeout.has_value() && reply->latency > *timeout) {
    verdict = Verdict::kFail;
    problems.push_back(absl::StrCat("answered in ", DurationText(reply->latency), ", beyond the file's timeout ",
                                    DurationText(*timeout)));
    fixes.push_back("find what slows the plugin's Status (it must answer from cached health), or raise timeout");
  }
  const std::string summary =
      absl::StrCat("Status on ", *socket, ": healthz ", reply->healthz, ", version ", reply->version, ", key_id ",
                   reply->key_id.empty() ? "(empty)" : reply->key_id, ", ", DurationText(reply->latency));
  if (problems.empty()) {
    std::string found = summary;
    if (!kms.IsV2()) {
      absl::StrAppend(&found, " (a kms v1 provider on a socket that also answers KMS v2)");
    }
    return Row(id, Verdict::kPass, found);
  }
  return Row(id, verdict, absl::StrCat(absl::StrJoin(problems, "; "), " (", summary, ")"),
             absl::StrJoin(fixes, "; "));
}

// Bounds for a kms timeout, which kube-apiserver applies as the deadline of every Status, Encrypt and Decrypt:
//  - below kMinSaneTimeout (1 s) FAIL: a KEK held remotely (Vault Transit over HTTPS, an HSM) costs tens to
//    hundreds of milliseconds per call before any retry or failover, so a sub-second deadline turns one slow
//    backend call into a failed Secret read or write and a flapping healthz;
//  - above kMaxSaneTimeout (10 s) WARN: kube-apiserver calls with WaitForReady(true), so while the plugin is down
//    each call waits out the whole timeout (kms-protocol.md, Timeouts), holding the request that needed a DEK
//    (a Decrypt on a cache miss sits on the read path); its kms-providers health check runs every provider's
//    Status one after another (config.go), so long timeouts add up there, and old providers are closed only after
//    2 x the sum of all timeouts on reload. 10 s is already more than three times the default of 3 s.
// These bounds are judgement, not kube-apiserver limits: it accepts any positive duration.
CheckResult KmsTimeouts(const EncryptionConfigFile& file) {
  const std::vector<const Provider*> providers = file.KmsProviders();
  if (providers.empty()) {
    return Row("kms.timeouts", Verdict::kPass, "no kms providers");
  }
  Verdict verdict = Verdict::kPass;
  std::vector<std::string> all;
  std::vector<std::string> bad;
  for (const Provider* p : providers) {
    const std::string label = KmsLabel(*p);
    if (!p->kms.timeout.has_value()) {
      all.push_back(absl::StrCat(label, " 3s (default)"));
      continue;
    }
    const std::optional<absl::Duration> timeout = ParseGoDuration(*p->kms.timeout);
    if (!timeout.has_value()) {
      verdict = Verdict::kFail;
      bad.push_back(absl::StrCat(label, " timeout \"", *p->kms.timeout, "\" is not a duration"));
    } else if (*timeout <= absl::ZeroDuration()) {
      verdict = Verdict::kFail;
      bad.push_back(absl::StrCat(label, " timeout ", *p->kms.timeout, " is not positive (refused)"));
    } else if (*timeout < kMinSaneTimeout) {
      verdict = Verdict::kFail;
      bad.push_back(absl::StrCat(label, " timeout ", DurationText(*timeout), " is below ",
                                 DurationText(kMinSaneTimeout), ": one slow backend call fails a request"));
    } else if (*timeout > kMaxSaneTimeout) {
      verdict = std::max(verdict, Verdict::kWarn);
      bad.push_back(absl::StrCat(label, " timeout ", DurationText(*timeout), " is above ",
                                 DurationText(kMaxSaneTimeout),
                                 ": a stalled plugin holds kube-apiserver requests that long"));
    }
    all.push_back(absl::StrCat(label, " ", *p->kms.timeout));
  }
  if (verdict == Verdict::kPass) {
    return Row("kms.timeouts", Verdict::kPass, absl::StrJoin(all, ", "));
  }
  return Row("kms.timeouts", verdict, Listed(bad),
             "write a duration from 1s to 10s, e.g. timeout: 3s (the default when absent)");
}

const config::EnvironmentConfig* EnvironmentFor(const config::Config& config, const std::string& socket) {
  const std::string wanted = NormalPath(socket);
  for (const config::EnvironmentConfig& env : config.environments) {
    if (NormalPath(env.socket) == wanted) {
      return &env;
    }
  }
  return nullptr;
}

std::string EnvironmentList(const config::Config& config) {
  std::vector<std::string> items;
  for (const config::EnvironmentConfig& env : config.environments) {
    items.push_back(absl::StrCat(env.name, " (", env.socket, ")"));
  }
  return items.empty() ? std::string("(none)") : absl::StrJoin(items, ", ");
}

CheckResult PluginEndpoints(const EncryptionConfigFile& file, const config::Config& config) {
  const std::vector<const Provider*> providers = file.KmsProviders();
  if (providers.empty()) {
    return Row("kmsplugin.endpoints", Verdict::kPass, "no kms providers to match");
  }
  std::vector<std::string> matched;
  std::vector<std::string> unmatched;
  for (const Provider* p : providers) {
    std::string why;
    const std::optional<std::string> socket = SocketPathOf(p->kms.endpoint, &why);
    const config::EnvironmentConfig* env = socket.has_value() ? EnvironmentFor(config, *socket) : nullptr;
    if (env != nullptr) {
      matched.push_back(absl::StrCat(KmsLabel(*p), " -> environment ", env->name));
    } else {
      unmatched.push_back(absl::StrCat(KmsLabel(*p), " (", p->kms.endpoint, ")"));
    }
  }
  if (unmatched.empty()) {
    return Row("kmsplugin.endpoints", Verdict::kPass, absl::StrJoin(matched, ", "));
  }
  return Row("kmsplugin.endpoints", Verdict::kWarn,
             absl::StrCat("not the socket of any environment in ", config.file, ": ", Listed(unmatched)),
             absl::StrCat("point each endpoint at an environment's socket: ", EnvironmentList(config),
                          " (another plugin's socket is fine while migrating away from it)"));
}

CheckResult PluginSecretsEnvironment(const Coverage& coverage, const config::Config& config) {
  const std::string id = "kmsplugin.secrets-environment";
  const std::string fix = absl::StrCat("make the first provider for secrets the kms v2 provider of one of: ",
                                       EnvironmentList(config), " (kmsplugin render --config ", config.file,
                                       " --env NAME)");
  const Provider* first = WriteProvider(coverage);
  if (first == nullptr || first->type != ProviderType::kKms) {
    return Row(id, Verdict::kFail,
               absl::StrCat("Secrets are written by ", first == nullptr ? "no provider" : ProviderLabel(*first),
                            ", not through kmsplugin"),
               fix);
  }
  std::string why;
  const std::optional<std::string> socket = SocketPathOf(first->kms.endpoint, &why);
  const config::EnvironmentConfig* env = socket.has_value() ? EnvironmentFor(config, *socket) : nullptr;
  if (env == nullptr) {
    return Row(id, Verdict::kFail,
               absl::StrCat("Secrets are written through ", ProviderLabel(*first), " at ", first->kms.endpoint,
                            ", which is no environment in ", config.file),
               fix);
  }
  return Row(id, Verdict::kPass,
             absl::StrCat("Secrets are written through environment ", env->name, " (", ProviderLabel(*first), ", ",
                          env->socket, ")"));
}

}  // namespace

std::string_view VerdictName(Verdict verdict) {
  switch (verdict) {
    case Verdict::kPass:
      return "PASS";
    case Verdict::kWarn:
      return "WARN";
    case Verdict::kFail:
      return "FAIL";
  }
  return "FAIL";
}

Verdict Overall(const std::vector<CheckResult>& results) {
  Verdict worst = Verdict::kPass;
  for (const CheckResult& r : results) {
    worst = std::max(worst, r.verdict);
  }
  return worst;
}

std::optional<absl::Duration> ParseGoDuration(std::string_view text) {
  absl::Duration duration;
  if (text.empty() || !absl::ParseDuration(Sv(text), &duration) || duration == absl::InfiniteDuration() ||
      duration == -absl::InfiniteDuration()) {
    return std::nullopt;
  }
  return duration;
}

std::optional<std::string> SocketPathOf(std::string_view endpoint, std::string* why) {
  constexpr std::string_view kScheme = "unix://";
  if (endpoint.empty()) {
    *why = "is missing";
    return std::nullopt;
  }
  if (endpoint.substr(0, kScheme.size()) != kScheme) {
    *why = "kube-apiserver only dials unix:// endpoints";
    return std::nullopt;
  }
  const std::string_view path = endpoint.substr(kScheme.size());
  if (path.empty() || path.front() != '/') {
    *why = "the socket path after unix:// must be absolute (three slashes in total)";
    return std::nullopt;
  }
  if (path.size() > 1 && path[1] == '@') {
    *why = "an abstract socket (/@name) has no file permissions: any local process can use it";
    return std::nullopt;
  }
  return std::string(path);
}

std::vector<CheckResult> RunChecks(const EncryptionConfigFile& file, const DoctorOptions& options,
                                   StatusProber& prober) {
  std::vector<CheckResult> results;
  results.push_back(FileFormat(file));
  results.push_back(FileSchema(file));
  if (options.file_mode.has_value()) {
    results.push_back(FilePermissions(file, *options.file_mode));
  }
  const Coverage coverage = SecretsCoverage(file);
  results.push_back(SecretsCoverageRow(coverage));
  results.push_back(SecretsWriteProvider(coverage));
  results.push_back(IdentityFallback(file));
  results.push_back(KmsNames(file));
  results.push_back(KmsV1FeatureGate(file));
  ProbeCache probes{prober, options.probe_timeout, {}};
  for (const Provider* provider : file.KmsProviders()) {
    results.push_back(KmsEndpoint(*provider, probes));
  }
  results.push_back(KmsTimeouts(file));
  if (options.plugin_config != nullptr) {
    results.push_back(PluginEndpoints(file, *options.plugin_config));
    results.push_back(PluginSecretsEnvironment(coverage, *options.plugin_config));
  }
  return results;
}

}  // namespace kmsplugin::doctor
