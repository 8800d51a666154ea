#pragma once

// StatusProber: calls KMS v2 Status on a plugin's Unix socket, as kube-apiserver does. The doctor checks depend
// only on this interface, so they run in unit tests without sockets (a fake answers); the CLI supplies the real
// gRPC one (kmsplugin/cli/doctor.cc). Implementations must be safe to call from one thread at a time.

#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace kmsplugin::doctor {

struct StatusReply {
  std::string version;   // "v2" or "v2beta1" from a KMS v2 plugin
  std::string healthz;   // "ok" when healthy
  std::string key_id;    // public name of the current KEK version
  absl::Duration latency = absl::ZeroDuration();
};

class StatusProber {
 public:
  virtual ~StatusProber() = default;
  // Status on the socket file `socket_path`, giving up after `timeout`. The error carries the gRPC code
  // (UNAVAILABLE when nothing listens, DEADLINE_EXCEEDED, UNIMPLEMENTED for a v1beta1-only plugin) and message.
  virtual absl::StatusOr<StatusReply> Status(const std::string& socket_path, absl::Duration timeout) = 0;
};

}  // namespace kmsplugin::doctor
