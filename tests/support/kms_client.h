#pragma once

// KmsClient: a real gRPC client for both KMS APIs over a Unix socket, for tests. Every call has a deadline.

#include <chrono>
#include <map>
#include <memory>
#include <string>

#include <grpcpp/create_channel.h>
#include <grpcpp/grpcpp.h>

#include "kms_v1beta1.grpc.pb.h"
#include "kms_v2.grpc.pb.h"

namespace kmsplugin::testing {

class KmsClient {
 public:
  // `authority` overrides :authority (kube-apiserver before 1.32 sends the socket path).
  explicit KmsClient(const std::string& socket, const std::string& authority = "") {
    grpc::ChannelArguments args;
    if (!authority.empty()) {
      args.SetString(GRPC_ARG_DEFAULT_AUTHORITY, authority);
    }
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    args.SetInt(GRPC_ARG_MAX_SEND_MESSAGE_LENGTH, -1);
    channel_ = grpc::CreateCustomChannel("unix:" + socket, grpc::InsecureChannelCredentials(), args);
    v2_ = v2::KeyManagementService::NewStub(channel_);
    v1_ = v1beta1::KeyManagementService::NewStub(channel_);
  }

  grpc::Status Status(v2::StatusResponse& response, std::chrono::milliseconds timeout = Default()) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + timeout);
    return v2_->Status(&context, v2::StatusRequest(), &response);
  }
  grpc::Status Encrypt(const std::string& plaintext, v2::EncryptResponse& response,
                       std::chrono::milliseconds timeout = Default()) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + timeout);
    v2::EncryptRequest request;
    request.set_plaintext(plaintext);
    request.set_uid("test-encrypt");
    return v2_->Encrypt(&context, request, &response);
  }
  grpc::Status Decrypt(const std::string& ciphertext, const std::string& key_id,
                       const std::map<std::string, std::string>& annotations, v2::DecryptResponse& response,
                       std::chrono::milliseconds timeout = Default()) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + timeout);
    v2::DecryptRequest request;
    request.set_ciphertext(ciphertext);
    request.set_key_id(key_id);
    request.set_uid("test-decrypt");
    for (const auto& [key, value] : annotations) {
      (*request.mutable_annotations())[key] = value;
    }
    return v2_->Decrypt(&context, request, &response);
  }
  // Decrypts what Encrypt returned, as kube-apiserver does.
  grpc::Status DecryptResponseOf(const v2::EncryptResponse& encrypted, v2::DecryptResponse& response) {
    std::map<std::string, std::string> annotations(encrypted.annotations().begin(), encrypted.annotations().end());
    return Decrypt(encrypted.ciphertext(), encrypted.key_id(), annotations, response);
  }

  grpc::Status V1Version(v1beta1::VersionResponse& response, const std::string& version = "v1beta1") {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + Default());
    v1beta1::VersionRequest request;
    request.set_version(version);
    return v1_->Version(&context, request, &response);
  }
  grpc::Status V1Encrypt(const std::string& plain, v1beta1::EncryptResponse& response,
                         const std::string& version = "v1beta1", std::chrono::milliseconds timeout = Default()) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + timeout);
    v1beta1::EncryptRequest request;
    request.set_version(version);
    request.set_plain(plain);
    return v1_->Encrypt(&context, request, &response);
  }
  grpc::Status V1Decrypt(const std::string& cipher, v1beta1::DecryptResponse& response,
                         const std::string& version = "v1beta1", std::chrono::milliseconds timeout = Default()) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + timeout);
    v1beta1::DecryptRequest request;
    request.set_version(version);
    request.set_cipher(cipher);
    return v1_->Decrypt(&context, request, &response);
  }

  v2::KeyManagementService::Stub& v2() { return *v2_; }
  // The connection itself, for calls the typed stubs cannot make (raw bytes through grpc::GenericStub).
  const std::shared_ptr<grpc::Channel>& channel() const { return channel_; }

 private:
  static std::chrono::milliseconds Default() { return std::chrono::milliseconds(5000); }
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v2::KeyManagementService::Stub> v2_;
  std::unique_ptr<v1beta1::KeyManagementService::Stub> v1_;
};

}  // namespace kmsplugin::testing
