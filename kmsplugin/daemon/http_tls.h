#pragma once

// LoadHttpTls: reads http.tls's three files and builds the TLS context of the metrics listener. The key file is
// read as every secret file is (keysource::ReadSecretFile: a regular file owned by root or the effective user,
// mode 0600 or stricter, into locked memory); the certificate and the client CA as trusted files (not writable
// by others). Called at start and again at each SIGHUP, so renewed certificates are served without a restart.
// Errors name the config file, the field, the file and the fix.

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "kmsplugin/config/config.h"
#include "kmsplugin/observe/tls_context.h"

namespace kmsplugin::daemon {

absl::StatusOr<std::shared_ptr<const observe::TlsServerContext>> LoadHttpTls(const std::string& config_file,
                                                                              const config::HttpTlsConfig& tls);

}  // namespace kmsplugin::daemon
