#include "kmsplugin/server/kms_services.h"

#include "absl/strings/str_cat.h"
#include "crypto/secret_bytes.h"
#include "kmsplugin/observe/log.h"
#include "kmsplugin/server/grpc_status.h"

namespace kmsplugin::server {
namespace {

constexpr char kV1beta1[] = "v1beta1";

// The seed or DEK came in a buffer gRPC owns; once wrapped, it is wiped there too.
void WipeRequestBytes(const std::string& bytes) {
  crypto::Wipe(const_cast<char*>(bytes.data()), bytes.size());
}

absl::Status CheckV1Version(const std::string& version) {
  if (!version.empty() && version != kV1beta1) {
    return absl::InvalidArgumentError(absl::StrCat("unsupported KMS API version \"", version.substr(0, 32),
                                                   "\"; this service speaks v1beta1"));
  }
  return absl::OkStatus();
}

}  // namespace

grpc::Status RpcRecorder::Finish(const absl::Status& status, const char* rpc, const std::string& uid,
                                 const std::string& key_id, absl::Time start) const {
  const absl::Duration latency = absl::Now() - start;
  const std::string code = status.ok() ? "OK" : absl::StatusCodeToString(status.code());
  if (registry_ != nullptr) {
    registry_
        ->GetCounter("kmsplugin_grpc_requests_total", "KMS gRPC calls by environment, API, RPC and status code.",
                     {{"environment", environment_}, {"api", api_}, {"rpc", rpc}, {"code", code}})
        .Increment();
    registry_
        ->GetHistogram("kmsplugin_grpc_request_duration_seconds", "KMS gRPC call latency in the plugin.",
                       {{"environment", environment_}, {"api", api_}, {"rpc", rpc}})
        .Observe(latency);
  }
  const auto level = status.ok() ? spdlog::level::debug : spdlog::level::warn;
  if (spdlog::should_log(level)) {
    observe::Log(level, status.ok() ? "rpc" : "rpc failed",
                 {{"environment", environment_},
                  {"rpc", api_ + "." + rpc},
                  {"uid", uid},
                  {"key_id", key_id},
                  {"code", code},
                  {"latency_ms", absl::ToDoubleMilliseconds(latency)},
                  {"error", std::string(status.message())}});
  }
  return ToGrpcStatus(status);
}

grpc::Status KmsV2Service::Status(grpc::ServerContext*, const v2::StatusRequest*, v2::StatusResponse* response) {
  const absl::Time start = absl::Now();
  const core::StatusResult status = service_.Status();
  response->set_version(status.version);
  response->set_healthz(status.healthz);
  response->set_key_id(status.key_id);
  return recorder_.Finish(absl::OkStatus(), "Status", "", status.key_id, start);
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
  return recorder_.Finish(result.status(), "Encrypt", request->uid(), response->key_id(), start);
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
  return recorder_.Finish(plaintext.status(), "Decrypt", request->uid(), request->key_id(), start);
}

grpc::Status KmsV1beta1Service::Version(grpc::ServerContext*, const v1beta1::VersionRequest* request,
                                        v1beta1::VersionResponse* response) {
  const absl::Time start = absl::Now();
  if (auto status = CheckV1Version(request->version()); !status.ok()) {
    return recorder_.Finish(status, "Version", "", "", start);
  }
  response->set_version(kV1beta1);
  response->set_runtime_name("kmsplugin");
  response->set_runtime_version(KMSPLUGIN_VERSION);
  return recorder_.Finish(absl::OkStatus(), "Version", "", "", start);
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
  return recorder_.Finish(status, "Encrypt", "", "", start);
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
  return recorder_.Finish(status, "Decrypt", "", "", start);
}

}  // namespace kmsplugin::server
