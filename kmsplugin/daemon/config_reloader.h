#pragma once

// ConfigReloader: SIGHUP re-reads the config file and applies it through ServerRunner::Apply, all or nothing
// (reload_plan.h says what counts as a change; kmsplugin/cli/serve.h says what the operator sees).
// Only the signal thread calls Reload().

#include <atomic>
#include <set>
#include <string>

#include "kmsplugin/daemon/reload_plan.h"
#include "kmsplugin/daemon/source_opener.h"
#include "kmsplugin/daemon/state_metrics.h"
#include "kmsplugin/observe/metrics.h"
#include "kmsplugin/server/server_runner.h"

namespace kmsplugin::daemon {

class ConfigReloader {
 public:
  ConfigReloader(std::string path, LoadedConfig running, observe::Registry& registry, server::ServerRunner& runner,
                 SourceOpener& opener);

  // Re-reads the file and applies it, or leaves the running configuration as it is; logs and counts either way.
  void Reload();

 private:
  absl::Status TryReload(ReloadPlan& plan);

  const std::string path_;
  LoadedConfig running_;  // only the signal thread touches it
  observe::Registry& registry_;
  server::ServerRunner& runner_;
  SourceOpener& opener_;
  ServicesFn services_;
  std::set<std::string> backend_gauges_;
  observe::Counter* applied_ = nullptr;
  observe::Counter* rejected_ = nullptr;
  std::atomic<bool> last_ok_{true};
  std::atomic<int64_t> last_success_{0};
};

}  // namespace kmsplugin::daemon
