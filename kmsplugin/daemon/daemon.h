#pragma once

// The daemon: `kmsplugin serve` composed. Loads the config, opens every environment's key source (one that
// cannot start serves unhealthy and keeps trying: starting_key_source.h), serves each on its socket through
// ServerRunner, exports metrics and health over HTTP, and applies SIGHUP reloads (config_reloader.h), until
// SIGTERM or SIGINT. kmsplugin/cli/serve.h describes what the operator sees.

#include <string>

#include "absl/status/status.h"

namespace kmsplugin::daemon {

struct DaemonOptions {
  std::string config_path;
  std::string version;  // for kmsplugin_build_info and the "ready" line
};

// Runs until signalled. OK after a clean shutdown; otherwise why it could not start or stopped (the config file
// itself, a socket that cannot be bound, the HTTP listener). A key source that cannot start is not a reason.
absl::Status RunDaemon(const DaemonOptions& options);

}  // namespace kmsplugin::daemon
