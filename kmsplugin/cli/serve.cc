#include "kmsplugin/cli/serve.h"

#include "kmsplugin/cli/cli_common.h"
#include "kmsplugin/daemon/daemon.h"

namespace kmsplugin::cli {

int Serve(const std::string& config_path) {
  HardenProcess();
  daemon::DaemonOptions options;
  options.config_path = config_path;
  options.version = KMSPLUGIN_VERSION;
  const absl::Status status = daemon::RunDaemon(options);
  return status.ok() ? 0 : Fail(status);
}

}  // namespace kmsplugin::cli
