#pragma once

// The one mapping from absl::Status to grpc::Status (the numeric codes are the same by design), and the
// conversion of a call's deadline into absl::Time.

#include <grpcpp/server_context.h>
#include <grpcpp/support/status.h>

#include "absl/status/status.h"
#include "absl/time/time.h"

namespace kmsplugin::server {

inline grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) {
    return grpc::Status::OK;
  }
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

// Calls without a deadline (kube-apiserver always sets one, 3 s by default) get this much.
inline constexpr absl::Duration kDefaultCallDeadline = absl::Seconds(30);

inline absl::Time CallDeadline(const grpc::ServerContextBase& context) {
  const absl::Time now = absl::Now();
  const auto deadline = context.deadline();
  if (deadline == std::chrono::system_clock::time_point::max()) {
    return now + kDefaultCallDeadline;
  }
  return std::min(absl::FromChrono(deadline), now + kDefaultCallDeadline);
}

}  // namespace kmsplugin::server
