#pragma once

// ServerFixture: a real kmsplugin server in this process (local key source on a fresh keyring, EnvelopeService,
// ServerRunner on a Unix socket in a temp dir) and a real gRPC client for it.

#include <memory>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "crypto/random.h"
#include "kmsplugin/config/key_source_spec.h"
#include "kmsplugin/core/clock.h"
#include "kmsplugin/core/envelope_service.h"
#include "kmsplugin/keysource/local/local_key_source.h"
#include "kmsplugin/keysource/local/local_spec.h"
#include "kmsplugin/server/server_runner.h"
#include "tests/support/kms_client.h"
#include "tests/support/temp_dir.h"

namespace kmsplugin::testing {

// Creates a keyring (and root key) in `dir` and returns options naming them.
inline keysource::local::LocalOptions MakeKeyring(const TempDir& dir, const std::string& name) {
  YAML::Node node;
  node["keyring"] = dir.File(name + ".keyring");
  node["rootKeyFile"] = dir.File(name + ".rootkey");
  auto spec = keysource::local::ParseSpec(node, config::FieldContext("test.yaml", "keySource.local"));
  REQUIRE(spec.ok());
  config::OpenContext context;
  context.environment = name;
  context.clock = &core::SystemClock();
  context.random = &crypto::SystemRandom();
  REQUIRE((*spec)->Init(context).ok());
  return keysource::local::LocalOptions{dir.File(name + ".keyring"), dir.File(name + ".rootkey"), ""};
}

inline std::shared_ptr<keysource::local::LocalKeySource> OpenLocal(const keysource::local::LocalOptions& options,
                                                                   const std::string& environment) {
  auto source = keysource::local::LocalKeySource::Open(options, environment, core::SystemClock(),
                                                       crypto::SystemRandom());
  REQUIRE(source.ok());
  return *source;
}

inline std::shared_ptr<core::EnvelopeService> MakeService(std::shared_ptr<core::KeySource> source,
                                                          const std::string& environment,
                                                          const std::string& status_version = "v2") {
  core::EnvelopeService::Options options;
  options.environment = environment;
  options.status_version = status_version;
  return std::make_shared<core::EnvelopeService>(options, std::move(source), core::SystemClock(),
                                                 crypto::SystemRandom());
}

struct ServerFixture {
  // `environment` names the environment and its keyring and socket files ("dev" unless a test needs another).
  explicit ServerFixture(server::RunnerOptions runner_options = {}, const std::string& environment = "dev") {
    keyring = MakeKeyring(dir, environment);
    source = OpenLocal(keyring, environment);
    service = MakeService(source, environment);
    socket = dir.File(environment + ".sock");
    std::vector<server::ServedEnvironment> envs;
    envs.push_back(server::ServedEnvironment{socket, std::nullopt, service});
    runner = std::make_unique<server::ServerRunner>(runner_options, std::move(envs));
    const absl::Status started = runner->Start();
    INFO(started.ToString());
    REQUIRE(started.ok());
    client = std::make_unique<KmsClient>(socket);
  }

  TempDir dir;
  keysource::local::LocalOptions keyring;
  std::shared_ptr<keysource::local::LocalKeySource> source;
  std::shared_ptr<core::EnvelopeService> service;
  std::string socket;
  std::unique_ptr<server::ServerRunner> runner;
  std::unique_ptr<KmsClient> client;
};

}  // namespace kmsplugin::testing
