#pragma once

// StartPooledCall: one raw unary KMS call (Encrypt or Decrypt) run on the socket's CallPool, with every way it
// can end recorded by the RpcRecorder (so refusals show in kmsplugin_grpc_requests_total and the log).
//
//   callback thread: take the request bytes out of gRPC's buffer (into SecretBytes and wipe gRPC's slices when
//                    the request carries a secret) -> CallPool::TrySubmit
//                    full queue -> RESOURCE_EXHAUSTED at once
//   worker:          deadline passed while queued -> DEADLINE_EXCEEDED; caller cancelled -> CANCELLED
//                    (neither calls `body`); otherwise `body(request bytes, deadline)`, then Finish.
//
// The reactor deletes itself in OnDone.

#include <google/protobuf/message_lite.h>
#include <grpcpp/support/byte_buffer.h>
#include <grpcpp/support/server_callback.h>

#include <functional>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "kmsplugin/server/call_pool.h"
#include "kmsplugin/server/kms_services.h"

namespace kmsplugin::server {

struct CallOutcome {
  absl::Status status;
  grpc::Slice response;  // the serialised response message; sent only when status is OK
  std::string uid;       // for the log line
  std::string key_id;
};

// `request`: the serialised request message. Runs on a worker; may block until `deadline`.
using CallBody = std::function<CallOutcome(std::string_view request, absl::Time deadline)>;

enum class RequestSecrecy { kPublic, kSecret };
// kMayBlock: through the pool. kNeverBlocks: `body` runs on the callback thread itself, for a key source that
// only computes in memory (the local keyring): a hop to a worker and back would be its largest cost.
enum class Blocking { kMayBlock, kNeverBlocks };

grpc::ServerUnaryReactor* StartPooledCall(grpc::CallbackServerContext* context, const grpc::ByteBuffer* request,
                                          grpc::ByteBuffer* response, CallPool& pool, const RpcRecorder& recorder,
                                          const char* rpc, RequestSecrecy secrecy, Blocking blocking, CallBody body);

// `message` serialised into a plain gRPC slice (for responses without a secret).
grpc::Slice SerializePublic(const google::protobuf::MessageLite& message);
// `message` serialised into SecretBytes that gRPC sends from by reference; they are wiped and freed when gRPC
// releases the slice. The caller still wipes the secret fields of `message` itself.
grpc::Slice SerializeSecret(const google::protobuf::MessageLite& message);

}  // namespace kmsplugin::server
