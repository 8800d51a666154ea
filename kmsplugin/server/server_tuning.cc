#include "kmsplugin/server/server_tuning.h"

namespace kmsplugin::server {

void ApplyServerTuning(const ServerTuning& tuning, grpc::ServerBuilder& builder) {
  builder.SetMaxReceiveMessageSize(tuning.max_receive_bytes);
  builder.SetMaxSendMessageSize(tuning.max_send_bytes);
}

}  // namespace kmsplugin::server
