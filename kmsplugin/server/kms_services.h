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

namespace kmsplugin::server {

class KmsV2Service final : public v2::KeyManagementService::Service {
 public:
  explicit KmsV2Service(core::EnvelopeService& service) : service_(service) {}

  grpc::Status Status(grpc::ServerContext* context, const v2::StatusRequest* request,
                      v2::StatusResponse* response) override;
  grpc::Status Encrypt(grpc::ServerContext* context, const v2::EncryptRequest* request,
                       v2::EncryptResponse* response) override;
  grpc::Status Decrypt(grpc::ServerContext* context, const v2::DecryptRequest* request,
                       v2::DecryptResponse* response) override;

 private:
  core::EnvelopeService& service_;
};

class KmsV1beta1Service final : public v1beta1::KeyManagementService::Service {
 public:
  explicit KmsV1beta1Service(core::EnvelopeService& service) : service_(service) {}

  grpc::Status Version(grpc::ServerContext* context, const v1beta1::VersionRequest* request,
                       v1beta1::VersionResponse* response) override;
  grpc::Status Encrypt(grpc::ServerContext* context, const v1beta1::EncryptRequest* request,
                       v1beta1::EncryptResponse* response) override;
  grpc::Status Decrypt(grpc::ServerContext* context, const v1beta1::DecryptRequest* request,
                       v1beta1::DecryptResponse* response) override;

 private:
  core::EnvelopeService& service_;
};

}  // namespace kmsplugin::server
