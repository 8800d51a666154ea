#include "kmsplugin/server/kms_services.h"

#include <spdlog/spdlog.h>

#include "absl/strings/str_cat.h"
#include "crypto/secret_bytes.h"
#include "kmsplugin/server/grpc_status.h"

namespace kmsplugin::server {
namespace {

constexpr char kV1beta1[] = "v1beta1";

// The seed or DEK came in a buffer gRPC owns; once wrapped, it is wiped there too.
void WipeRequestBytes(const std::string& bytes) {
  crypto::Wipe(const_cast<char*>(bytes.data()), bytes.size());
}

grpc::Status Finish(const absl::Status& status, std::string_view environment, std::string_view rpc,
                    std::string_view uid, absl::Time start) {
  const double ms = absl::ToDoubleMilliseconds(absl::Now() - start);
  if (status.ok()) {
    spdlog::debug("rpc env={} rpc={} uid={} code=OK latency_ms={:.3f}", environment, rpc, uid, ms);
  } else {
    spdlog::warn("rpc env={} rpc={} uid={} code={} latency_ms={:.3f} error=\"{}\"", environment, rpc, uid,
                 absl::StatusCodeToString(status.code()), ms, std::string(status.message()));
  }
  return ToGrpcStatus(status);
}

absl::Status CheckV1Version(const std::string& version) {
  if (!version.empty() && version != kV1beta1) {
    return absl::InvalidArgumentError(absl::StrCat("unsupported KMS API version \"", version.substr(0, 32),
                                                   "\"; this service speaks v1beta1"));
  }
  return absl::OkStatus();
}

}  // namespace

grpc::Status KmsV2Service::Status(grpc::ServerContext*, const v2::StatusRequest*, v2::StatusResponse* response) {
  const core::StatusResult status = service_.Status();
  response->set_version(status.version);
  response->set_healthz(status.healthz);
  response->set_key_id(status.key_id);
  return grpc::Status::OK;
}

grpc::Status KmsV2Service::Encrypt(grpc::ServerContext* context, const v2::EncryptRequest* request,
                                   v2::EncryptResponse* response) {
  const absl::Time start = absl::Now();
  absl::StatusOr<core::EncryptResult> result = service_.Encrypt(request->plaintext(), CallDeadline(*context));
  WipeRequestBytes(request->plaintext());
  if (result.ok()) {
    response->set_ciphertext(std::move(result->ciphertext));
    response->set_key_id(std::move(result->key_id));
    for (auto& [key, value] : result->annotations) {
      (*response->mutable_annotations())[key] = std::move(value);
    }
  }
  return Finish(result.status(), service_.environment(), "v2.Encrypt", request->uid(), start);
}

grpc::Status KmsV2Service::Decrypt(grpc::ServerContext* context, const v2::DecryptRequest* request,
                                   v2::DecryptResponse* response) {
  const absl::Time start = absl::Now();
  core::DecryptMetadata metadata;
  metadata.key_id = request->key_id();
  metadata.annotations.insert(request->annotations().begin(), request->annotations().end());
  absl::StatusOr<crypto::SecretBytes> plaintext =
      service_.Decrypt(request->ciphertext(), &metadata, CallDeadline(*context));
  if (plaintext.ok()) {
    response->set_plaintext(plaintext->data(), plaintext->size());
  }
  return Finish(plaintext.status(), service_.environment(), "v2.Decrypt", request->uid(), start);
}

grpc::Status KmsV1beta1Service::Version(grpc::ServerContext*, const v1beta1::VersionRequest* request,
                                        v1beta1::VersionResponse* response) {
  if (auto status = CheckV1Version(request->version()); !status.ok()) {
    return ToGrpcStatus(status);
  }
  response->set_version(kV1beta1);
  response->set_runtime_name("kmsplugin");
  response->set_runtime_version(KMSPLUGIN_VERSION);
  return grpc::Status::OK;
}

grpc::Status KmsV1beta1Service::Encrypt(grpc::ServerContext* context, const v1beta1::EncryptRequest* request,
                                        v1beta1::EncryptResponse* response) {
  const absl::Time start = absl::Now();
  absl::Status status = CheckV1Version(request->version());
  if (status.ok()) {
    absl::StatusOr<core::EncryptResult> result = service_.Encrypt(request->plain(), CallDeadline(*context));
    if (result.ok()) {
      response->set_cipher(std::move(result->ciphertext));
    }
    status = result.status();
  }
  WipeRequestBytes(request->plain());
  return Finish(status, service_.environment(), "v1beta1.Encrypt", "", start);
}

grpc::Status KmsV1beta1Service::Decrypt(grpc::ServerContext* context, const v1beta1::DecryptRequest* request,
                                        v1beta1::DecryptResponse* response) {
  const absl::Time start = absl::Now();
  absl::Status status = CheckV1Version(request->version());
  if (status.ok()) {
    absl::StatusOr<crypto::SecretBytes> plaintext =
        service_.Decrypt(request->cipher(), /*metadata=*/nullptr, CallDeadline(*context));
    if (plaintext.ok()) {
      response->set_plain(plaintext->data(), plaintext->size());
    }
    status = plaintext.status();
  }
  return Finish(status, service_.environment(), "v1beta1.Decrypt", "", start);
}

}  // namespace kmsplugin::server
