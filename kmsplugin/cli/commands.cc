#include "kmsplugin/cli/commands.h"

#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include <iostream>
#include <memory>
#include <string>

#include <CLI/CLI.hpp>
#include <grpcpp/create_channel.h>
#include <nlohmann/json.hpp>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "crypto/random.h"
#include "kms_v2.grpc.pb.h"
#include "kmsplugin/cli/key_sources.h"
#include "kmsplugin/config/config.h"
#include "kmsplugin/core/clock.h"
#include "kmsplugin/core/envelope_service.h"
#include "kmsplugin/server/server_runner.h"

namespace kmsplugin::cli {
namespace {

constexpr char kDefaultConfig[] = "/etc/kmsplugin/config.yaml";
constexpr absl::Duration kCommandDeadline = absl::Seconds(30);
constexpr absl::Duration kProbeTimeout = absl::Seconds(5);

int Fail(const absl::Status& status) {
  std::cerr << "kmsplugin: " << status.message() << "\n";
  return status.code() == absl::StatusCode::kUnavailable ? 3 : 1;
}

// No core dumps (they would hold keys), no files readable by others.
void HardenProcess() {
  prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
  const rlimit no_core{0, 0};
  setrlimit(RLIMIT_CORE, &no_core);
  umask(077);
}

void SetUpLogging(const std::string& level) {
  auto logger = spdlog::stderr_logger_mt("kmsplugin");
  logger->set_pattern("%Y-%m-%dT%H:%M:%S.%fZ %l %v", spdlog::pattern_time_type::utc);
  logger->set_level(spdlog::level::from_str(level));
  spdlog::set_default_logger(logger);
}

config::OpenContext ContextFor(const std::string& environment, int worker_threads) {
  config::OpenContext context;
  context.environment = environment;
  context.worker_threads = worker_threads;
  context.clock = &core::SystemClock();
  context.random = &crypto::SystemRandom();
  return context;
}

absl::StatusOr<std::shared_ptr<core::KeySource>> OpenEnvironment(const config::Config& config,
                                                                 const std::string& name) {
  auto env = config.Find(name);
  if (!env.ok()) {
    return env.status();
  }
  return (*env)->key_source->Open(ContextFor((*env)->name, config.server.max_threads));
}

int Serve(const std::string& config_path) {
  HardenProcess();
  server::BlockServerSignals();
  auto config = config::LoadConfig(config_path, BuiltInKeySources());
  if (!config.ok()) {
    return Fail(config.status());
  }
  std::vector<server::ServedEnvironment> served;
  for (const config::EnvironmentConfig& env : config->environments) {
    auto source = env.key_source->Open(ContextFor(env.name, config->server.max_threads));
    if (!source.ok()) {
      return Fail(absl::Status(source.status().code(), absl::StrCat("environment \"", env.name, "\": ",
                                                                    source.status().message())));
    }
    core::EnvelopeService::Options options;
    options.environment = env.name;
    options.status_version = env.status_version;
    // Two missed probes are tolerated before Status turns unhealthy on age alone.
    options.health_max_age = 3 * config->server.poll_interval + kProbeTimeout;
    served.push_back(server::ServedEnvironment{
        env.socket, env.socket_group,
        std::make_shared<core::EnvelopeService>(options, std::move(*source), core::SystemClock(),
                                                crypto::SystemRandom())});
  }
  server::RunnerOptions options;
  options.poll_interval = config->server.poll_interval;
  options.shutdown_grace_period = config->server.shutdown_grace_period;
  options.probe_timeout = kProbeTimeout;
  options.tuning.max_threads = config->server.max_threads;
  server::ServerRunner runner(options, std::move(served));
  if (auto status = runner.Start(); !status.ok()) {
    return Fail(status);
  }
  spdlog::info("kmsplugin {} ready: {} environment(s); SIGHUP refreshes keys, SIGTERM drains and stops",
               KMSPLUGIN_VERSION, config->environments.size());
  return runner.RunUntilSignalled().ok() ? 0 : 1;
}

int Init(const std::string& config_path, const std::string& only_env) {
  HardenProcess();
  auto config = config::LoadConfig(config_path, BuiltInKeySources());
  if (!config.ok()) {
    return Fail(config.status());
  }
  if (!only_env.empty()) {
    if (auto env = config->Find(only_env); !env.ok()) {
      return Fail(env.status());
    }
  }
  int failures = 0;
  for (const config::EnvironmentConfig& env : config->environments) {
    if (!only_env.empty() && env.name != only_env) {
      continue;
    }
    auto summary = env.key_source->Init(ContextFor(env.name, config->server.max_threads));
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

int Rotate(const std::string& config_path, const std::string& env_name) {
  HardenProcess();
  auto config = config::LoadConfig(config_path, BuiltInKeySources());
  if (!config.ok()) {
    return Fail(config.status());
  }
  auto source = OpenEnvironment(*config, env_name);
  if (!source.ok()) {
    return Fail(source.status());
  }
  auto before = (*source)->Current();
  auto created = (*source)->Rotate(absl::Now() + kCommandDeadline);
  if (!created.ok()) {
    return Fail(created.status());
  }
  std::cout << "environment " << env_name << ": rotated from "
            << (before.ok() ? before->key_id : std::string("(none)")) << " to version " << created->version << " ("
            << created->key_id << ")\n"
            << "A running kmsplugin serves it within its poll interval (" << config->server.poll_interval
            << "), or at once after SIGHUP. Earlier ciphertexts keep decrypting.\n";
  return 0;
}

int Keys(const std::string& config_path, const std::string& env_name, bool as_json) {
  HardenProcess();
  auto config = config::LoadConfig(config_path, BuiltInKeySources());
  if (!config.ok()) {
    return Fail(config.status());
  }
  auto source = OpenEnvironment(*config, env_name);
  if (!source.ok()) {
    return Fail(source.status());
  }
  auto versions = (*source)->Versions();
  if (!versions.ok()) {
    return Fail(versions.status());
  }
  if (as_json) {
    nlohmann::json out = nlohmann::json::array();
    for (const core::KeyVersion& v : *versions) {
      out.push_back({{"version", v.version},
                     {"keyId", v.key_id},
                     {"created", absl::FormatTime(absl::RFC3339_sec, v.created, absl::UTCTimeZone())},
                     {"state", std::string(core::KeyStateName(v.state))}});
    }
    std::cout << nlohmann::json{{"environment", env_name}, {"versions", out}}.dump(2) << "\n";
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
  return 0;
}

// The EncryptionConfiguration kube-apiserver needs for `env_name`: KMS v2 first for Secrets, then identity so
// objects written before encryption was switched on stay readable (drop it once they are rewritten).
int Render(const std::string& config_path, const std::string& env_name, const std::string& provider_name,
           const std::string& timeout, bool identity_fallback) {
  auto config = config::LoadConfig(config_path, BuiltInKeySources());
  if (!config.ok()) {
    return Fail(config.status());
  }
  auto env = config->Find(env_name);
  if (!env.ok()) {
    return Fail(env.status());
  }
  const std::string name = provider_name.empty() ? absl::StrCat("kmsplugin-", (*env)->name) : provider_name;
  if (name.find(':') != std::string::npos) {
    return Fail(absl::InvalidArgumentError("--provider-name must not contain ':' (it is part of the etcd prefix)"));
  }
  std::cout << "# kube-apiserver --encryption-provider-config=<this file>\n"
            << "apiVersion: apiserver.config.k8s.io/v1\n"
            << "kind: EncryptionConfiguration\n"
            << "resources:\n"
            << "  - resources:\n"
            << "      - secrets\n"
            << "    providers:\n"
            << "      - kms:\n"
            << "          apiVersion: v2\n"
            << "          name: " << name << "\n"
            << "          endpoint: unix://" << (*env)->socket << "\n"
            << "          timeout: " << timeout << "\n";
  if (identity_fallback) {
    std::cout << "      - identity: {}  # reads Secrets written before encryption; remove after rewriting them\n";
  }
  return 0;
}

int StatusCommand(const std::string& socket, bool as_json, double timeout_seconds) {
  grpc::ChannelArguments args;
  auto channel = grpc::CreateCustomChannel(absl::StrCat("unix:", socket), grpc::InsecureChannelCredentials(), args);
  auto stub = v2::KeyManagementService::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::milliseconds(static_cast<int64_t>(timeout_seconds * 1000)));
  v2::StatusResponse response;
  const grpc::Status status = stub->Status(&context, v2::StatusRequest(), &response);
  if (!status.ok()) {
    std::cerr << "kmsplugin: Status on " << socket << " failed: " << status.error_message()
              << " (code " << status.error_code() << "); fix: check that kmsplugin serve is running on it\n";
    return 3;
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
  return response.healthz() == "ok" ? 0 : 1;
}

}  // namespace

int Main(int argc, char** argv) {
  CLI::App app{"kmsplugin: a Kubernetes KMS v2 (and v1beta1) plugin; KEKs in a sealed local keyring, Vault "
               "Transit or a PKCS#11 HSM"};
  app.require_subcommand(1);
  std::string log_level = "info";
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error")->capture_default_str();

  std::string config_path = kDefaultConfig;
  std::string env_name;
  bool as_json = false;

  CLI::App* serve = app.add_subcommand("serve", "Serve every configured environment on its socket");
  serve->add_option("--config", config_path, "config file")->capture_default_str();

  CLI::App* init = app.add_subcommand("init", "Create key material for environments that have none (never overwrites)");
  init->add_option("--config", config_path, "config file")->capture_default_str();
  init->add_option("--env", env_name, "only this environment");

  CLI::App* rotate = app.add_subcommand("rotate", "Create a new key version and make it current");
  rotate->add_option("--config", config_path, "config file")->capture_default_str();
  rotate->add_option("--env", env_name, "environment")->required();

  CLI::App* keys = app.add_subcommand("keys", "List key versions with creation time and state");
  keys->add_option("--config", config_path, "config file")->capture_default_str();
  keys->add_option("--env", env_name, "environment")->required();
  keys->add_flag("--json", as_json, "machine-readable output");

  std::string socket;
  double timeout_seconds = 3;
  CLI::App* status = app.add_subcommand("status", "Call Status on a running socket and print it");
  status->add_option("--socket", socket, "Unix socket path")->required();
  status->add_option("--timeout", timeout_seconds, "seconds")->capture_default_str();
  status->add_flag("--json", as_json, "machine-readable output");

  CLI::App* version = app.add_subcommand("version", "Print the version");

  std::string provider_name;
  std::string timeout = "3s";
  bool identity_fallback = false;
  CLI::App* render = app.add_subcommand("render", "Print the EncryptionConfiguration for an environment");
  render->add_option("--config", config_path, "config file")->capture_default_str();
  render->add_option("--env", env_name, "environment")->required();
  render->add_option("--provider-name", provider_name, "KMS provider name (default kmsplugin-<env>)");
  render->add_option("--timeout", timeout, "kube-apiserver's per-call timeout")->capture_default_str();
  render->add_flag("--identity-fallback", identity_fallback,
                   "also read unencrypted Secrets (while migrating from no encryption)");

  CLI11_PARSE(app, argc, argv);
  SetUpLogging(log_level);

  if (*serve) {
    return Serve(config_path);
  }
  if (*init) {
    return Init(config_path, env_name);
  }
  if (*rotate) {
    return Rotate(config_path, env_name);
  }
  if (*keys) {
    return Keys(config_path, env_name, as_json);
  }
  if (*status) {
    return StatusCommand(socket, as_json, timeout_seconds);
  }
  if (*render) {
    return Render(config_path, env_name, provider_name, timeout, identity_fallback);
  }
  if (*version) {
    std::cout << "kmsplugin " << KMSPLUGIN_VERSION << "\n";
    return 0;
  }
  return 1;
}

}  // namespace kmsplugin::cli
