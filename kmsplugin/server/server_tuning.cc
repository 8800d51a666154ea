#include "kmsplugin/server/server_tuning.h"

#include <grpcpp/resource_quota.h>

namespace kmsplugin::server {

void ApplyServerTuning(const ServerTuning& tuning, grpc::ServerBuilder& builder) {
  grpc::ResourceQuota quota("kmsplugin");
  quota.SetMaxThreads(tuning.max_threads);
  builder.SetResourceQuota(quota);
  builder.SetSyncServerOption(grpc::ServerBuilder::SyncServerOption::NUM_CQS, 1);
  builder.SetSyncServerOption(grpc::ServerBuilder::SyncServerOption::MIN_POLLERS, 1);
  builder.SetSyncServerOption(grpc::ServerBuilder::SyncServerOption::MAX_POLLERS, 2);
  builder.SetMaxReceiveMessageSize(tuning.max_receive_bytes);
  builder.SetMaxSendMessageSize(tuning.max_send_bytes);
}

}  // namespace kmsplugin::server
