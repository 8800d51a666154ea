#pragma once

// ServerTuning: the gRPC server settings every kmsplugin socket uses, in one place so the benchmark's null
// baseline server (bench/) runs on exactly the same gRPC stack.
//
// - Synchronous server; a ResourceQuota caps its threads, so the thread count is bounded whatever the load.
// - Requests are tiny (a 32-byte seed, a ciphertext of at most 1 KiB, annotations of at most 32 KiB), so the
//   receive limit is small; gRPC answers a larger message with RESOURCE_EXHAUSTED before any handler runs.
// - No `:authority` check anywhere: kube-apiserver before 1.32, and for v1beta1 always, sends the socket path.

#include <string>

#include <grpcpp/server_builder.h>

namespace kmsplugin::server {

struct ServerTuning {
  // gRPC sync server threads (pollers and handlers) per socket. Each in-flight call holds one; a call that
  // arrives while all are busy is refused with RESOURCE_EXHAUSTED ("Server Threadpool Exhausted"), not queued.
  // kube-apiserver makes few concurrent calls (one seed per key_id), so 128 leaves wide room for a slow backend.
  int max_threads = 128;
  int max_receive_bytes = 64 * 1024;      // larger requests get RESOURCE_EXHAUSTED
  int max_send_bytes = 64 * 1024;
};

// Applies `tuning` to `builder`. Call before BuildAndStart().
void ApplyServerTuning(const ServerTuning& tuning, grpc::ServerBuilder& builder);

}  // namespace kmsplugin::server
