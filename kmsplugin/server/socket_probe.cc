#include "kmsplugin/server/socket_probe.h"

#include <grpcpp/create_channel.h>
#include <grpcpp/grpcpp.h>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "kms_v2.grpc.pb.h"

namespace kmsplugin::server {

absl::Status ProbeSocket(const std::string& path, absl::Duration timeout) {
  grpc::ChannelArguments args;
  // A connection of its own, never one shared with another channel: the probe must go through accept().
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  auto channel = grpc::CreateCustomChannel(absl::StrCat("unix:", path), grpc::InsecureChannelCredentials(), args);
  auto stub = v2::KeyManagementService::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  v2::StatusResponse response;
  const grpc::Status status = stub->Status(&context, v2::StatusRequest(), &response);
  if (status.error_code() == grpc::StatusCode::UNAVAILABLE ||
      status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED) {
    return absl::Status(static_cast<absl::StatusCode>(status.error_code()),
                        absl::StrCat("Status over ", path, " got no answer: ", status.error_message()));
  }
  return absl::OkStatus();
}

}  // namespace kmsplugin::server
