#include "kmsplugin/cli/cli_common.h"

#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include <iostream>

#include "kmsplugin/core/exit_codes.h"
#include "kmsplugin/daemon/event_log_sink.h"
#include "kmsplugin/keysource/registry.h"

namespace kmsplugin::cli {

int Fail(const absl::Status& status) {
  std::cerr << "kmsplugin: " << status.message() << "\n";
  return core::ExitCodeFor(status, core::IsUsageError(status) ? core::kExitUsage : core::kExitFailed);
}

int FailConfig(const absl::Status& status) { return Fail(core::AsUsageError(status)); }

void HardenProcess() {
  prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
  const rlimit no_core{0, 0};
  setrlimit(RLIMIT_CORE, &no_core);
  umask(077);
}

absl::StatusOr<OpenedEnvironment> OpenEnvironment(const std::string& config_path, const std::string& environment) {
  auto config = config::LoadConfig(config_path, keysource::KeySourceParsers());
  if (!config.ok()) {
    return core::AsUsageError(config.status());
  }
  auto env = config->Find(environment);
  if (!env.ok()) {
    return core::AsUsageError(env.status());
  }
  auto events = std::make_shared<daemon::EventLogSink>((*env)->name, std::string((*env)->key_source->Kind()),
                                                       /*registry=*/nullptr);
  auto source = (*env)->key_source->Open(
      keysource::SystemOpenContext((*env)->name, config->server.max_threads, events.get()));
  if (!source.ok()) {
    return source.status();
  }
  return OpenedEnvironment{std::move(events), std::move(*config), std::move(source->source),
                           std::move(source->admin)};
}

}  // namespace kmsplugin::cli
