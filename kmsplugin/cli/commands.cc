#include "kmsplugin/cli/commands.h"

#include <algorithm>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>

#include <CLI/CLI.hpp>
#include <grpcpp/create_channel.h>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "crypto/random.h"
#include "kms_v2.grpc.pb.h"
#include "kmsplugin/admin/retire_policy.h"
#include "kmsplugin/admin/version_times.h"
#include "kmsplugin/audit/audit_command.h"
#include "kmsplugin/cli/cli_common.h"
#include "kmsplugin/cli/doctor.h"
#include "kmsplugin/cli/render.h"
#include "kmsplugin/cli/serve.h"
#include "kmsplugin/config/config.h"
#include "kmsplugin/keysource/registry.h"
#include "kmsplugin/core/clock.h"
#include "kmsplugin/core/duration_flag.h"
#include "kmsplugin/core/exit_codes.h"
#include "kmsplugin/core/envelope_service.h"
#include "kmsplugin/core/version_rules.h"
#include "kmsplugin/observe/http_endpoint.h"
#include "kmsplugin/observe/instrumented_key_source.h"
#include "kmsplugin/observe/log.h"
#include "kmsplugin/observe/metrics.h"
#include "kmsplugin/server/server_runner.h"

namespace kmsplugin::cli {
namespace {

constexpr absl::Duration kCommandDeadline = absl::Seconds(30);

int Init(const std::string& config_path, const std::string& only_env) {
  HardenProcess();
  auto config = config::LoadConfig(config_path, keysource::KeySourceParsers());
  if (!config.ok()) {
    return FailConfig(config.status());
  }
  if (!only_env.empty()) {
    if (auto env = config->Find(only_env); !env.ok()) {
      return FailConfig(env.status());
    }
  }
  int failures = 0;
  for (const config::EnvironmentConfig& env : config->environments) {
    if (!only_env.empty() && env.name != only_env) {
      continue;
    }
    auto summary = env.key_source->Init(keysource::SystemOpenContext(env.name, config->server.max_threads));
    if (summary.ok()) {
      std::cout << "environment " << env.name << ": " << *summary << "\n";
    } else if (absl::IsAlreadyExists(summary.status())) {
      std::cout << "environment " << env.name << ": already initialised, left untouched: "
                << summary.status().message() << "\n";
    } else {
      std::cerr << "kmsplugin: environment " << env.name << ": " << summary.status().message() << "\n";
      ++failures;
    }
  }
  return failures == 0 ? 0 : 1;
}

// Versions created in the future (a clock that was ahead), with the repair, on stderr and in the log.
void PrintFutureCreationWarnings(const core::KeySource& source, const std::string& env_name) {
  auto versions = source.Versions();
  if (!versions.ok()) {
    return;
  }
  for (const std::string& warning : admin::FutureCreationWarnings(*versions, absl::Now(), env_name)) {
    observe::Log(spdlog::level::warn, "key version created in the future",
                 {{"event", "future_creation_time"}, {"environment", env_name}, {"detail", warning}});
    std::cerr << "kmsplugin: warning: environment " << env_name << ": " << warning << "\n";
  }
}

enum class RotateStep { kRotate, kStage, kPromote };

int Rotate(const std::string& config_path, const std::string& env_name, RotateStep step) {
  HardenProcess();
  auto opened = OpenEnvironment(config_path, env_name);
  if (!opened.ok()) {
    return Fail(opened.status());
  }
  const config::Config& config = opened->config;
  const std::shared_ptr<core::KeySource>& source = opened->source;
  auto before = source->Current();
  const absl::Time deadline = absl::Now() + kCommandDeadline;
  if (step != RotateStep::kRotate) {
    const bool stage = step == RotateStep::kStage;
    auto changed = stage ? opened->admin->Stage(deadline) : opened->admin->Promote(deadline);
    if (!changed.ok()) {
      return Fail(changed.status());
    }
    auto versions = source->Versions();
    const std::string fingerprint = versions.ok() ? core::KeySetFingerprint(*versions) : std::string("unknown");
    observe::Log(spdlog::level::info, stage ? "key version staged" : "key version promoted",
                 {{"event", stage ? "stage" : "promote"},
                  {"environment", env_name},
                  {"old_key_id", before.ok() ? before->key_id : std::string()},
                  {"key_id", changed->key_id},
                  {"version", changed->version},
                  {"fingerprint", fingerprint}});
    if (stage) {
      std::cout << "environment " << env_name << ": staged version " << changed->version << " ("
                << changed->key_id << "); version " << (before.ok() ? absl::StrCat(before->version) : "(none)")
                << " stays current\n";
    } else {
      std::cout << "environment " << env_name << ": promoted version " << changed->version << " ("
                << changed->key_id << ") to current, from "
                << (before.ok() ? before->key_id : std::string("(none)")) << "\n";
    }
    std::cout << "key set fingerprint: " << fingerprint << "\n"
              << (stage ? "Next: copy the keys to every other node, check that `kmsplugin keys` (or "
                          "kmsplugin_key_set_info) shows this fingerprint on each, then run kmsplugin rotate "
                          "--promote on this node.\n"
                        : "Next: copy the keys to every other node; until a node has the copy it keeps encrypting "
                          "under the previous version, which every node decrypts.\n");
    return 0;
  }
  auto created = opened->admin->Rotate(deadline);
  if (!created.ok()) {
    return Fail(created.status());
  }
  observe::Log(spdlog::level::info, "key rotated",
               {{"event", "rotate"},
                {"environment", env_name},
                {"old_key_id", before.ok() ? before->key_id : std::string()},
                {"key_id", created->key_id},
                {"version", created->version}});
  std::cout << "environment " << env_name << ": rotated from "
            << (before.ok() ? before->key_id : std::string("(none)")) << " to version " << created->version << " ("
            << created->key_id << ")\n"
            << "A running kmsplugin serves it within its poll interval (" << config.server.poll_interval
            << "), or at once after SIGHUP. Earlier ciphertexts keep decrypting.\n";
  PrintFutureCreationWarnings(*source, env_name);
  return 0;
}

using admin::RetireAction;
using admin::VersionList;

// Objects etcd still holds under `versions` of `env_name` and of every environment configured on the same backend
// key (allowSharedBackendKey), where a retire reaches too. Prints them (names capped) to `out`; returns the total.
absl::StatusOr<uint64_t> ObjectsStillUsing(const config::Config& config, const std::string& env_name,
                                           const std::vector<core::KeyVersion>& versions,
                                           const audit::AuditFlags& etcd, std::ostream& out) {
  constexpr size_t kNamesShown = 20;
  auto env = config.Find(env_name);
  if (!env.ok()) {
    return env.status();
  }
  const std::string identity = (*env)->key_source->BackendKeyIdentity();
  uint64_t total = 0;
  for (const config::EnvironmentConfig& other : config.environments) {
    if (other.name != env_name && other.key_source->BackendKeyIdentity() != identity) {
      continue;
    }
    auto usage = audit::KeyUsageFromEtcd(etcd, config, other.name);
    if (!usage.ok()) {
      return usage.status();
    }
    for (const audit::KeyUsage& u : usage->keys) {
      const bool affected = std::any_of(versions.begin(), versions.end(), [&](const core::KeyVersion& v) {
        return v.key_id == u.key.key_id || (other.name != env_name && v.version == u.key.version);
      });
      if (!affected || u.objects == 0) {
        continue;
      }
      total += u.objects;
      out << "  environment " << other.name << ", version " << u.key.version << " (" << u.key.key_id
          << "): " << u.objects << " object(s) in etcd (revision " << usage->revision << ")\n";
      for (size_t i = 0; i < u.names.size() && i < kNamesShown; ++i) {
        out << "    " << u.names[i] << "\n";
      }
      if (u.objects > std::min(u.names.size(), kNamesShown)) {
        out << "    ... and " << u.objects - std::min(u.names.size(), kNamesShown) << " more\n";
      }
    }
  }
  return total;
}

// `retire`: checks etcd (unless --force), then retires `version` and every older version. `--reinstate` undoes
// it; `--destroy` deletes retired versions' key material where the backend has that step (PKCS#11).
// `retire --verify`: decrypts every object etcd holds (every configured environment's key source), treating the
// versions about to be retired as retired already. Prints each object that would not decrypt; returns how many.
absl::StatusOr<uint64_t> ObjectsThatWouldNotDecrypt(const config::Config& config, const std::string& env_name,
                                                    const std::vector<core::KeyVersion>& versions,
                                                    const audit::AuditFlags& etcd, std::ostream& out) {
  constexpr size_t kNamesShown = 20;
  std::map<std::pair<std::string, std::string>, uint64_t> retiring;
  for (const core::KeyVersion& v : versions) {
    retiring[{env_name, v.key_ref}] = v.version;
  }
  auto report = audit::DecryptAuditFromEtcd(etcd, config, retiring);
  if (!report.ok()) {
    return report.status();
  }
  uint64_t failing = 0;
  uint64_t decrypting = 0;
  for (const audit::PrefixReport& p : report->prefixes) {
    failing += p.undecryptable;
    decrypting += p.decrypted;
    size_t shown = 0;
    for (const audit::UndecryptableObject& u : p.undecryptable_objects) {
      if (shown++ < kNamesShown) {
        out << "    " << p.prefix << u.name << ": " << u.reason << "\n";
      }
    }
    if (p.undecryptable > std::min(shown, kNamesShown)) {
      out << "    ... and " << p.undecryptable - std::min(shown, kNamesShown) << " more under " << p.prefix << "\n";
    }
  }
  std::cout << "etcd (revision " << report->revision << "): " << decrypting
            << " object(s) decrypt without versions " << VersionList(versions) << ", " << failing << " do not\n";
  return failing;
}

int Retire(const std::string& config_path, const std::string& env_name, uint64_t version, RetireAction action,
           bool force, bool allow_recent, bool verify, const audit::AuditFlags& etcd) {
  HardenProcess();
  auto opened = OpenEnvironment(config_path, env_name);
  if (!opened.ok()) {
    return Fail(opened.status());
  }
  const config::Config& config = opened->config;
  const std::shared_ptr<core::KeySource>& source = opened->source;
  auto versions = source->Versions();
  if (!versions.ok()) {
    return Fail(versions.status());
  }
  const char* verb = admin::Verb(action);
  const char* done = admin::PastTense(action);
  // What would change: the same rule the key source applies.
  absl::StatusOr<std::vector<core::KeyVersion>> plan = admin::PlanRetireAction(action, *versions, version);
  // A version retired by another process may be missing from this listing although the backend keeps it (Vault
  // archives versions below min_decryption_version and stops listing them): a reinstate of a version the listing
  // does not have is left to the key source, which knows its backend's retired versions.
  const bool left_to_source = action == RetireAction::kReinstate && plan.status().code() == absl::StatusCode::kNotFound;
  if (!plan.ok() && !left_to_source) {
    return Fail(plan.status());
  }
  if (plan.ok() && plan->empty()) {
    std::cout << "environment " << env_name << ": nothing to " << verb << " (versions up to " << version
              << " already are)\n";
    return 0;
  }
  if (action == RetireAction::kRetire && !allow_recent) {
    if (auto settled = admin::CheckSettled(*versions, version, config.server.poll_interval, absl::Now(), env_name);
        !settled.ok()) {
      return Fail(settled);
    }
  }
  if (action != RetireAction::kReinstate) {
    const std::string effect = action == RetireAction::kRetire ? "would no longer decrypt" : "would be lost for good";
    if (etcd.endpoints.empty()) {
      if (!force) {
        return Fail(absl::FailedPreconditionError(absl::StrCat(
            verb, " checks etcd first that no object still uses versions ", VersionList(*plan),
            "; fix: pass --endpoints host:port (and --cacert/--cert/--key as for etcdctl), or --force to ", verb,
            " without checking")));
      }
      std::cout << "--force without --endpoints: not checked whether objects still use versions " << VersionList(*plan)
                << "; any that do " << effect << ".\n";
    } else {
      std::ostringstream in_use;
      auto objects = ObjectsStillUsing(config, env_name, *plan, etcd, in_use);
      if (!objects.ok()) {
        return Fail(objects.status());
      }
      if (*objects > 0 && !force) {
        std::cerr << "kmsplugin: refusing to " << verb << " versions " << VersionList(*plan) << " of environment "
                  << env_name << ": " << *objects << " object(s) in etcd still use them and " << effect << ":\n"
                  << in_use.str()
                  << "fix: rewrite them under the current key (kubectl get secrets -A -o json | kubectl replace -f -),"
                     " check with `kmsplugin keys --env "
                  << env_name << " --endpoints ...`, then run this again\n";
        return 1;
      }
      if (*objects > 0) {
        std::cout << "--force: " << *objects << " object(s) in etcd " << effect << ":\n" << in_use.str();
      } else {
        std::cout << "etcd: no object uses versions " << VersionList(*plan) << "\n";
      }
      if (verify) {
        std::ostringstream failing_names;
        auto failing = ObjectsThatWouldNotDecrypt(config, env_name, *plan, etcd, failing_names);
        if (!failing.ok()) {
          return Fail(failing.status());
        }
        if (*failing > 0) {
          std::cerr << "kmsplugin: refusing to " << verb << " versions " << VersionList(*plan) << " of environment "
                    << env_name << ": --verify decrypted every object in etcd and " << *failing
                    << " would not decrypt afterwards:\n"
                    << failing_names.str()
                    << "fix: rewrite them under the current key (kubectl get secrets -A -o json | kubectl replace -f "
                       "-), or see `kmsplugin audit --decrypt`, then run this again\n";
          return 1;
        }
      }
    }
  }
  const absl::Time deadline = absl::Now() + kCommandDeadline;
  core::KeyAdmin& admin = *opened->admin;
  auto changed = action == RetireAction::kRetire      ? admin.Retire(version, deadline)
                 : action == RetireAction::kReinstate ? admin.Reinstate(version, deadline)
                                                      : admin.DestroyRetired(version, deadline);
  if (!changed.ok()) {
    return Fail(changed.status());
  }
  std::vector<std::string> key_ids;
  std::vector<uint64_t> numbers;
  for (const core::KeyVersion& v : *changed) {
    key_ids.push_back(v.key_id);
    numbers.push_back(v.version);
  }
  observe::Log(spdlog::level::warn, absl::StrCat("key versions ", done),
               {{"event", verb},
                {"environment", env_name},
                {"versions", numbers},
                {"key_ids", key_ids},
                {"forced", force},
                {"etcd_checked", !etcd.endpoints.empty()}});
  std::cout << "environment " << env_name << ": " << done << " versions " << VersionList(*changed) << "\n";
  if (action != RetireAction::kDestroy) {
    std::cout << "A running kmsplugin applies it within its poll interval (" << config.server.poll_interval
              << "), or at once after SIGHUP.";
    if (action == RetireAction::kRetire) {
      std::cout << " Undo with: kmsplugin retire --env " << env_name << " --version " << version << " --reinstate";
    }
    std::cout << "\n";
  }
  return 0;
}

// With etcd flags (audit.endpoints non-empty), also counts the objects etcd holds under each version.
int Keys(const std::string& config_path, const std::string& env_name, bool as_json, audit::AuditFlags* etcd) {
  HardenProcess();
  auto opened = OpenEnvironment(config_path, env_name);
  if (!opened.ok()) {
    return Fail(opened.status());
  }
  const config::Config& config = opened->config;
  const std::shared_ptr<core::KeySource>& source = opened->source;
  auto versions = source->Versions();
  if (!versions.ok()) {
    return Fail(versions.status());
  }
  std::optional<audit::KeyUsageReport> usage;
  if (etcd != nullptr) {
    auto counted = audit::KeyUsageFromEtcd(*etcd, config, env_name);
    if (!counted.ok()) {
      return Fail(counted.status());
    }
    usage = std::move(*counted);
  }
  const absl::Time now = absl::Now();
  const std::vector<std::string> warnings = admin::FutureCreationWarnings(*versions, now, env_name);
  if (as_json) {
    nlohmann::json out = nlohmann::json::array();
    for (const core::KeyVersion& v : *versions) {
      out.push_back({{"version", v.version},
                     {"keyId", v.key_id},
                     {"created", absl::FormatTime(absl::RFC3339_sec, v.created, absl::UTCTimeZone())},
                     {"state", std::string(core::KeyStateName(v.state))},
                     {"createdInFuture", admin::CreatedInFuture(v, now)}});
    }
    nlohmann::json doc{{"environment", env_name}, {"fingerprint", core::KeySetFingerprint(*versions)},
                       {"versions", out}};
    if (!warnings.empty()) {
      doc["warnings"] = warnings;
    }
    if (usage.has_value()) {
      doc["etcd"] = audit::KeyUsageJson(*usage);
    }
    std::cout << doc.dump(2) << "\n";
    return 0;
  }
  std::cout << "environment " << env_name << "\n";
  std::cout << "VERSION  STATE    CREATED (UTC)         KEY_ID\n";
  for (const core::KeyVersion& v : *versions) {
    std::string state(core::KeyStateName(v.state));
    state.resize(8, ' ');
    std::cout << std::left;
    std::cout.width(9);
    std::cout << v.version << state << " "
              << absl::FormatTime(absl::RFC3339_sec, v.created, absl::UTCTimeZone()) << "  " << v.key_id << "\n";
  }
  std::cout << "key set fingerprint: " << core::KeySetFingerprint(*versions)
            << " (compare across control-plane nodes; no key material)\n";
  for (const std::string& warning : warnings) {
    std::cout << "warning: " << warning << "\n";
  }
  if (usage.has_value()) {
    std::cout << "\n" << audit::RenderKeyUsage(*usage);
  }
  return 0;
}

int StatusCommand(const std::string& socket, bool as_json, absl::Duration timeout) {
  grpc::ChannelArguments args;
  auto channel = grpc::CreateCustomChannel(absl::StrCat("unix:", socket), grpc::InsecureChannelCredentials(), args);
  auto stub = v2::KeyManagementService::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  v2::StatusResponse response;
  const grpc::Status status = stub->Status(&context, v2::StatusRequest(), &response);
  if (!status.ok()) {
    std::cerr << "kmsplugin: Status on " << socket << " failed: " << status.error_message()
              << " (code " << status.error_code() << "); fix: check that kmsplugin serve is running on it\n";
    return core::kExitUnreachable;
  }
  if (as_json) {
    std::cout << nlohmann::json{{"socket", socket},
                                {"version", response.version()},
                                {"healthz", response.healthz()},
                                {"keyId", response.key_id()}}
                     .dump()
              << "\n";
  } else {
    std::cout << "socket:  " << socket << "\nversion: " << response.version() << "\nhealthz: " << response.healthz()
              << "\nkey_id:  " << response.key_id() << "\n";
  }
  // Reached but unhealthy (its backend is down, say) is 1; not reached at all is 3.
  return response.healthz() == "ok" ? core::kExitOk : core::kExitFailed;
}

}  // namespace

int Main(int argc, char** argv) {
  CLI::App app{"kmsplugin: a Kubernetes KMS v2 (and v1beta1) plugin; KEKs in a sealed local keyring, Vault "
               "Transit or a PKCS#11 HSM"};
  app.require_subcommand(1);
  // Global flags are accepted before or after the subcommand.
  app.fallthrough();
  std::string log_level = "info";
  // spdlog reads an unknown name as "off" (so "verbose" silenced every line): only its own names are accepted.
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error, critical or off")
      ->capture_default_str()
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "warning", "error", "critical", "off"}));
  std::string log_format = "json";
  app.add_option("--log-format", log_format, "json (one object per line) or text (for a person at a terminal)")
      ->capture_default_str()
      ->check(CLI::IsMember({"json", "text"}));

  std::string config_path = kDefaultConfig;
  std::string env_name;
  bool as_json = false;

  CLI::App* serve = app.add_subcommand("serve", "Serve every configured environment on its socket");
  serve->add_option("--config", config_path, "config file")->capture_default_str();

  CLI::App* init = app.add_subcommand("init", "Create key material for environments that have none (never overwrites)");
  init->add_option("--config", config_path, "config file")->capture_default_str();
  init->add_option("--env", env_name, "only this environment");

  CLI::App* rotate = app.add_subcommand(
      "rotate", "Create a new key version and make it current; on several nodes: --stage, copy, --promote");
  rotate->add_option("--config", config_path, "config file")->capture_default_str();
  rotate->add_option("--env", env_name, "environment")->required();
  bool stage = false;
  bool promote = false;
  CLI::Option* stage_flag = rotate->add_flag(
      "--stage", stage,
      "add the new version as staged: it decrypts but is not used to encrypt until --promote (local, pkcs11)");
  rotate->add_flag("--promote", promote, "make the newest staged version current")->excludes(stage_flag);

  CLI::App* keys = app.add_subcommand("keys", "List key versions with creation time and state");
  keys->add_option("--config", config_path, "config file")->capture_default_str();
  keys->add_option("--env", env_name, "environment")->required();
  keys->add_flag("--json", as_json, "machine-readable output");
  audit::AuditFlags keys_etcd;
  keys_etcd.endpoints.clear();
  keys->add_option("--endpoints", keys_etcd.endpoints,
                   "also count the objects etcd holds under each version: host:port[,host:port] (read-only)");
  keys->add_option("--etcd", keys_etcd.endpoints, "old spelling of --endpoints")->group("");
  keys->add_option("--cacert", keys_etcd.cacert, "etcd CA bundle (like etcdctl --cacert)");
  keys->add_option("--cert", keys_etcd.cert, "etcd client certificate");
  keys->add_option("--key", keys_etcd.key, "etcd client key");
  keys->add_option("--prefix", keys_etcd.prefixes, "etcd key prefix to scan (repeatable; default /registry/secrets/)");

  uint64_t retire_version = 0;
  bool force = false;
  bool reinstate = false;
  bool destroy = false;
  CLI::App* retire = app.add_subcommand(
      "retire", "Retire a key version and every older one (they stop decrypting), after checking etcd that no "
                "object still uses them");
  retire->add_option("--config", config_path, "config file")->capture_default_str();
  retire->add_option("--env", env_name, "environment")->required();
  retire->add_option("--version", retire_version, "key version (see `kmsplugin keys`)")->required();
  CLI::Option* force_flag =
      retire->add_flag("--force", force, "retire even if objects still use it (they become undecryptable)");
  bool verify = false;
  retire
      ->add_flag("--verify", verify,
                 "also decrypt every object in etcd for real, as if the versions were retired already, and refuse "
                 "unless all decrypt (needs --endpoints)")
      ->excludes(force_flag);
  bool allow_recent = false;
  retire->add_flag("--allow-recent", allow_recent,
                   "retire even though the next version became current less than 8 minutes + pollInterval ago");
  CLI::Option* reinstate_flag =
      retire->add_flag("--reinstate", reinstate, "undo: this version and every newer retired one decrypt again");
  retire->add_flag("--destroy", destroy,
                   "delete the key material of retired versions up to this one for good (PKCS#11 only)")
      ->excludes(reinstate_flag);
  audit::AuditFlags retire_etcd;
  retire_etcd.endpoints.clear();
  retire->add_option("--endpoints", retire_etcd.endpoints, "etcd host:port[,host:port] to check (read-only)");
  retire->add_option("--etcd", retire_etcd.endpoints, "old spelling of --endpoints")->group("");
  retire->add_option("--cacert", retire_etcd.cacert, "etcd CA bundle (like etcdctl --cacert)");
  retire->add_option("--cert", retire_etcd.cert, "etcd client certificate");
  retire->add_option("--key", retire_etcd.key, "etcd client key");
  retire->add_option("--prefix", retire_etcd.prefixes,
                     "etcd key prefix to scan (repeatable; default /registry/secrets/)");

  audit::AuditFlags audit_flags;
  CLI::App* audit_command = app.add_subcommand(
      "audit", "Report, from etcd (read-only), how Secrets are stored: by provider and key_id, unencrypted objects, "
               "unknown or retired keys; non-zero exit when anything needs attention");
  audit::AddAuditFlags(*audit_command, audit_flags);

  DoctorFlags doctor_flags;
  CLI::App* doctor_command = app.add_subcommand(
      "doctor", "Check a kube-apiserver EncryptionConfiguration against the running plugin(s): PASS/WARN/FAIL per "
                "check; exit 1 when any check fails");
  AddDoctorFlags(*doctor_command, doctor_flags);

  std::string socket;
  absl::Duration status_timeout = absl::Seconds(3);
  CLI::App* status = app.add_subcommand("status", "Call Status on a running socket and print it");
  status->add_option("--socket", socket, "Unix socket path")->required();
  status
      ->add_option_function<std::string>(
          "--timeout",
          [&status_timeout](const std::string& text) {
            const std::optional<absl::Duration> timeout = core::ParseDurationFlag(text);
            if (!timeout.has_value()) {
              throw CLI::ValidationError(core::DurationFlagError("--timeout", text));
            }
            status_timeout = *timeout;
          },
          "deadline of the Status call (3s, 500ms; a bare number is seconds)")
      ->default_str("3s");
  status->add_flag("--json", as_json, "machine-readable output");

  CLI::App* version = app.add_subcommand("version", "Print the version");

  RenderOptions render_options;
  CLI::App* render = app.add_subcommand(
      "render", "Print what to deploy for the current config: the EncryptionConfiguration for an environment, the "
                "static-pod manifest or the systemd unit");
  render->add_option("--config", render_options.config_path, "config file")->default_str(kDefaultConfig);
  render->add_option("--kind", render_options.kind, "encryption-config, static-pod or systemd-unit")
      ->capture_default_str();
  render->add_option("--env", render_options.environment, "environment (encryption-config)");
  render->add_option("--provider-name", render_options.provider_name, "KMS provider name (default kmsplugin-<env>)");
  render->add_option("--timeout", render_options.timeout, "kube-apiserver's per-call timeout")->capture_default_str();
  render->add_flag("--identity-fallback", render_options.identity_fallback,
                   "also read unencrypted Secrets (while migrating from no encryption)");
  render->add_flag("--v1-fallback", render_options.v1_fallback,
                   "also read Secrets written through KMS v1 (while migrating from v1 to v2; kube-apiserver 1.29+ "
                   "then needs --feature-gates=KMSv1=true)");
  render->add_option("--image", render_options.image, "container image (static-pod)")->capture_default_str();
  render->add_option("--uid", render_options.uid, "user and group id the pod runs as (static-pod)")
      ->capture_default_str();
  render->add_option("--binary", render_options.binary, "installed kmsplugin binary (systemd-unit, probes)")
      ->capture_default_str();

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& error) {
    if (error.get_exit_code() == static_cast<int>(CLI::ExitCodes::Success)) {
      return app.exit(error);  // --help
    }
    // One line naming the flag, and exit 2, whatever CLI11's own code for the kind of mistake is.
    std::string command = "kmsplugin";
    for (const CLI::App* sub : app.get_subcommands()) {
      absl::StrAppend(&command, " ", sub->get_name());
    }
    if (app.get_subcommands().empty()) {
      // CLI11 says "A subcommand is required" for a misspelt one too: name the word and the commands there are.
      std::vector<std::string> names;
      for (const CLI::App* sub : app.get_subcommands({})) {
        names.push_back(sub->get_name());
      }
      for (int i = 1; i < argc; ++i) {
        const std::string word = argv[i];
        if (word == "--log-level" || word == "--log-format") {
          ++i;  // its value
        } else if (!word.empty() && word[0] != '-') {
          std::cerr << "kmsplugin: unknown command \"" << Printable(word, 64) << "\"; fix: use one of "
                    << absl::StrJoin(names, ", ") << " (kmsplugin --help)\n";
          return core::kExitUsage;
        }
      }
    }
    std::cerr << "kmsplugin: " << Printable(error.what()) << "; fix: see `" << command << " --help`\n";
    return core::kExitUsage;
  }
  observe::SetUpLogging(log_level, observe::ParseLogFormat(log_format).value_or(observe::LogFormat::kJson));

  if (*serve) {
    return Serve(config_path);
  }
  if (*init) {
    return Init(config_path, env_name);
  }
  if (*rotate) {
    return Rotate(config_path, env_name,
                  stage ? RotateStep::kStage : promote ? RotateStep::kPromote : RotateStep::kRotate);
  }
  if (*keys) {
    return Keys(config_path, env_name, as_json, keys_etcd.endpoints.empty() ? nullptr : &keys_etcd);
  }
  if (*retire) {
    return Retire(config_path, env_name, retire_version,
                  reinstate ? RetireAction::kReinstate : destroy ? RetireAction::kDestroy : RetireAction::kRetire,
                  force, allow_recent, verify, retire_etcd);
  }
  if (*audit_command) {
    return audit::RunAudit(audit_flags, keysource::KeySourceParsers());
  }
  if (*doctor_command) {
    return RunDoctor(doctor_flags, keysource::KeySourceParsers());
  }
  if (*status) {
    return StatusCommand(socket, as_json, status_timeout);
  }
  if (*render) {
    if (render_options.config_path.empty()) {
      render_options.config_path = kDefaultConfig;
    }
    return RunRender(render_options, keysource::KeySourceParsers());
  }
  if (*version) {
    std::cout << "kmsplugin " << KMSPLUGIN_VERSION << "\n";
    return 0;
  }
  return 1;
}

}  // namespace kmsplugin::cli
