#include "kmsplugin/cli/cli_common.h"

#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include <iostream>

#include "crypto/random.h"
#include "kmsplugin/cli/key_sources.h"
#include "kmsplugin/core/clock.h"

namespace kmsplugin::cli {

int Fail(const absl::Status& status) {
  std::cerr << "kmsplugin: " << status.message() << "\n";
  return status.code() == absl::StatusCode::kUnavailable ? 3 : 1;
}

void HardenProcess() {
  prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
  const rlimit no_core{0, 0};
  setrlimit(RLIMIT_CORE, &no_core);
  umask(077);
}

config::OpenContext ContextFor(const std::string& environment, int worker_threads) {
  config::OpenContext context;
  context.environment = environment;
  context.worker_threads = worker_threads;
  context.clock = &core::SystemClock();
  context.random = &crypto::SystemRandom();
  return context;
}

absl::StatusOr<OpenedEnvironment> OpenEnvironment(const std::string& config_path, const std::string& environment) {
  auto config = config::LoadConfig(config_path, BuiltInKeySources());
  if (!config.ok()) {
    return config.status();
  }
  auto env = config->Find(environment);
  if (!env.ok()) {
    return env.status();
  }
  auto source = (*env)->key_source->Open(ContextFor((*env)->name, config->server.max_threads));
  if (!source.ok()) {
    return source.status();
  }
  return OpenedEnvironment{std::move(*config), std::move(source->source), std::move(source->admin)};
}

}  // namespace kmsplugin::cli
