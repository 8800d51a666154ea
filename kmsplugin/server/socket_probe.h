#pragma once

// ProbeSocket: whether a KMS server answers on a Unix socket, asked the way kube-apiserver asks: a fresh gRPC
// connection and a v2 Status call with a short deadline. Any answer from the server counts (even an error code
// such as RESOURCE_EXHAUSTED: something accepted and spoke gRPC); no connection, or no answer by the deadline, is
// UNAVAILABLE or DEADLINE_EXCEEDED with gRPC's reason. Used by the maintenance thread to notice a socket that no
// longer accepts (ServerRunner) and by nobody on a request path.

#include <string>

#include "absl/status/status.h"
#include "absl/time/time.h"

namespace kmsplugin::server {

absl::Status ProbeSocket(const std::string& path, absl::Duration timeout);

}  // namespace kmsplugin::server
