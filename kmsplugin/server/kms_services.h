#pragma once

// The gRPC adapters: KMS v2 and v1beta1 services for one environment, on gRPC's callback API. Each handler
// converts the request, calls the environment's EnvelopeService and converts the answer; no crypto happens here.
//
// Threads (see call_pool.h):
// - Status (v2) and Version (v1beta1) are answered inline on gRPC's callback thread: EnvelopeService::Status()
//   reads health state and the key source's cached current version under a short mutex and never calls the
//   backend (ARCHITECTURE rule 4), so they never wait behind Encrypt or Decrypt.
// - Encrypt and Decrypt may block on a backend (Vault, an HSM) for up to the call's deadline, so with such a key
//   source they never run on a callback thread: they go to the socket's CallPool. The local keyring only
//   computes in memory and is served on the callback thread (a hop to a worker was its largest cost). When its workers
//   and queue are full, the call is refused at once with RESOURCE_EXHAUSTED naming server.workers /
//   server.maxQueuedCalls; a call whose deadline passes while it waits gets DEADLINE_EXCEEDED without reaching the key
//   source. Both are counted and logged like any call.
//
// Secrets in buffers: Encrypt and Decrypt are raw methods (grpc::ByteBuffer), so the plugin parses the request
// itself. An Encrypt request (it carries the seed) is copied into SecretBytes, and every received slice gRPC
// handed us is wiped before parsing; the parsed protobuf string is wiped after use. A Decrypt response (it carries
// the plaintext) is serialised straight into SecretBytes that gRPC sends from by reference and that are wiped
// when gRPC releases them. What cannot be reached from here, and so is not wiped:
// - the transport's read buffer beyond the message's own slices (HTTP/2 frame headers, partly read frames), and
//   any copy chttp2 makes when a message spans several reads (it reassembles into its own slice buffer: those
//   slices are the ones we wipe, but earlier staging copies are freed unwiped inside gRPC);
// - on the send side, a response small enough for gRPC to copy into its frame buffer (chttp2 may coalesce small
//   writes) and the kernel's socket buffers;
// - the client side, which is not ours.
//
// Logs: each call is logged (uid, environment, rpc, key_id, code, latency; never the plaintext or ciphertext).
// Failure lines are limited per (rpc, code) to kFailureLinesPerSecond; the first line written after a pause says
// how many were held back ("suppressed"), and kmsplugin_log_lines_suppressed_total counts them all.

#include <memory>
#include <string>
#include <vector>

#include "kms_v1beta1.grpc.pb.h"
#include "kms_v2.grpc.pb.h"
#include "kmsplugin/core/envelope_service.h"
#include "kmsplugin/observe/log.h"
#include "kmsplugin/observe/metrics.h"
#include "kmsplugin/server/call_pool.h"

namespace kmsplugin::server {

struct CallOutcome;  // pooled_call.h

// Failure log lines per second per environment, API, RPC and code; the rest are counted, not written.
inline constexpr int kFailureLinesPerSecond = 10;

// Logs each call (uid, environment, rpc, key_id, code, latency) and records
// kmsplugin_grpc_requests_total{environment,api,rpc,code} and kmsplugin_grpc_request_duration_seconds.
// Every series is resolved when the recorder is made (or, for a status code, at its first call) and kept, so
// Finish takes no registry lock (observe/metrics.h: what a counter add and a histogram observation lock).
class RpcRecorder {
 public:
  // `rpcs`: the RPC names this API serves (the names Finish is called with).
  RpcRecorder(std::string environment, std::string api, std::vector<const char*> rpcs, observe::Registry* registry);
  grpc::Status Finish(const absl::Status& status, const char* rpc, const std::string& uid, const std::string& key_id,
                      absl::Time start) const;
  const std::string& environment() const { return environment_; }

 private:
  struct RpcSeries {
    RpcSeries(const std::string& environment, const std::string& api, const char* rpc, observe::Registry& registry);
    const char* const rpc;
    const observe::CodeCounters requests;
    const observe::CodeCounters suppressed;
    observe::Histogram& latency;
  };
  // The series of `rpc`, or null when there is no registry.
  const RpcSeries* SeriesOf(const char* rpc) const;

  const std::string environment_;
  const std::string api_;
  std::vector<std::unique_ptr<RpcSeries>> series_;  // fixed after construction
  mutable observe::LineLimiter failure_lines_{kFailureLinesPerSecond};
};

class KmsV2Service final
    : public v2::KeyManagementService::WithRawCallbackMethod_Encrypt<
          v2::KeyManagementService::WithRawCallbackMethod_Decrypt<
              v2::KeyManagementService::WithCallbackMethod_Status<v2::KeyManagementService::Service>>> {
 public:
  // `pool` runs this socket's Encrypt and Decrypt calls and must outlive the gRPC server.
  KmsV2Service(core::EnvelopeService& service, CallPool& pool, observe::Registry* registry)
      : service_(service), pool_(pool), recorder_(service.environment(), "v2", {"Status", "Encrypt", "Decrypt"}, registry) {}

  grpc::ServerUnaryReactor* Status(grpc::CallbackServerContext* context, const v2::StatusRequest* request,
                                   v2::StatusResponse* response) override;
  grpc::ServerUnaryReactor* Encrypt(grpc::CallbackServerContext* context, const grpc::ByteBuffer* request,
                                    grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* Decrypt(grpc::CallbackServerContext* context, const grpc::ByteBuffer* request,
                                    grpc::ByteBuffer* response) override;

 private:
  // Run on a worker (or inline for the local keyring); `bytes` is the serialised request.
  CallOutcome RunEncrypt(std::string_view bytes, absl::Time deadline);
  CallOutcome RunDecrypt(std::string_view bytes, absl::Time deadline);

  core::EnvelopeService& service_;
  CallPool& pool_;
  const RpcRecorder recorder_;
};

class KmsV1beta1Service final
    : public v1beta1::KeyManagementService::WithRawCallbackMethod_Encrypt<
          v1beta1::KeyManagementService::WithRawCallbackMethod_Decrypt<
              v1beta1::KeyManagementService::WithCallbackMethod_Version<v1beta1::KeyManagementService::Service>>> {
 public:
  KmsV1beta1Service(core::EnvelopeService& service, CallPool& pool, observe::Registry* registry)
      : service_(service),
        pool_(pool),
        recorder_(service.environment(), "v1beta1", {"Version", "Encrypt", "Decrypt"}, registry) {}

  grpc::ServerUnaryReactor* Version(grpc::CallbackServerContext* context, const v1beta1::VersionRequest* request,
                                    v1beta1::VersionResponse* response) override;
  grpc::ServerUnaryReactor* Encrypt(grpc::CallbackServerContext* context, const grpc::ByteBuffer* request,
                                    grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* Decrypt(grpc::CallbackServerContext* context, const grpc::ByteBuffer* request,
                                    grpc::ByteBuffer* response) override;

 private:
  // Run on a worker (or inline for the local keyring); `bytes` is the serialised request.
  CallOutcome RunEncrypt(std::string_view bytes, absl::Time deadline);
  CallOutcome RunDecrypt(std::string_view bytes, absl::Time deadline);

  core::EnvelopeService& service_;
  CallPool& pool_;
  const RpcRecorder recorder_;
};

}  // namespace kmsplugin::server
