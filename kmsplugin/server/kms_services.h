#pragma once

// The gRPC adapters: KMS v2 and v1beta1 services for one environment. Each handler converts the request, calls
// the environment's EnvelopeService and converts the answer; no crypto happens here. The request uid is logged
// with the outcome (never the plaintext or ciphertext). A plaintext seed is wiped from the request buffer once
// it is wrapped.

#include <memory>
#include <string>

#include "kms_v1beta1.grpc.pb.h"
#include "kms_v2.grpc.pb.h"
#include "kmsplugin/core/envelope_service.h"
#include "kmsplugin/observe/metrics.h"

namespace kmsplugin::server {

// Logs each call (uid, environment, rpc, key_id, code, latency) and records
// kmsplugin_grpc_requests_total{environment,api,rpc,code} and kmsplugin_grpc_request_duration_seconds.
class RpcRecorder {
 public:
  RpcRecorder(std::string environment, std::string api, observe::Registry* registry)
      : environment_(std::move(environment)), api_(std::move(api)), registry_(registry) {}
  grpc::Status Finish(const absl::Status& status, const char* rpc, const std::string& uid, const std::string& key_id,
                      absl::Time start) const;

 private:
  const std::string environment_;
  const std::string api_;
  observe::Registry* const registry_;
};

class KmsV2Service final : public v2::KeyManagementService::Service {
 public:
  KmsV2Service(core::EnvelopeService& service, observe::Registry* registry)
      : service_(service), recorder_(service.environment(), "v2", registry) {}

  grpc::Status Status(grpc::ServerContext* context, const v2::StatusRequest* request,
                      v2::StatusResponse* response) override;
  grpc::Status Encrypt(grpc::ServerContext* context, const v2::EncryptRequest* request,
                       v2::EncryptResponse* response) override;
  grpc::Status Decrypt(grpc::ServerContext* context, const v2::DecryptRequest* request,
                       v2::DecryptResponse* response) override;

 private:
  core::EnvelopeService& service_;
  const RpcRecorder recorder_;
};

class KmsV1beta1Service final : public v1beta1::KeyManagementService::Service {
 public:
  KmsV1beta1Service(core::EnvelopeService& service, observe::Registry* registry)
      : service_(service), recorder_(service.environment(), "v1beta1", registry) {}

  grpc::Status Version(grpc::ServerContext* context, const v1beta1::VersionRequest* request,
                       v1beta1::VersionResponse* response) override;
  grpc::Status Encrypt(grpc::ServerContext* context, const v1beta1::EncryptRequest* request,
                       v1beta1::EncryptResponse* response) override;
  grpc::Status Decrypt(grpc::ServerContext* context, const v1beta1::DecryptRequest* request,
                       v1beta1::DecryptResponse* response) override;

 private:
  core::EnvelopeService& service_;
  const RpcRecorder recorder_;
};

}  // namespace kmsplugin::server
