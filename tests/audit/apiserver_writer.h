#pragma once

// ApiserverWriter: stores objects in etcd exactly as kube-apiserver's storage transformers do (kms-protocol.md
// §2-§3), using a real kmsplugin over gRPC for the KEK part, so the audit is tested against true-to-life values:
//
// - KMS v2, seed mode: NewSeed() asks the plugin to Encrypt a 32-byte random seed (as the apiserver does at
//   start and on every key_id change). Per object: info = 32 random bytes, DEK = HKDF-SHA256-Expand(seed, info,
//   32), AES-256-GCM with a random 12-byte nonce and AAD = the etcd key; encryptedData = info ‖ nonce ‖ ct ‖ tag;
//   value = "k8s:enc:kms:v2:<provider>:" + EncryptedObject{encryptedData, keyID, encryptedDEKSource,
//   annotations, HKDF_SHA256_XNONCE_AES_GCM_SEED}.
// - KMS v1: a fresh 32-byte DEK per object, wrapped by v1beta1 Encrypt; value = "k8s:enc:kms:v1:<provider>:" +
//   uint16 BE length + wrapped DEK + AES-GCM(nonce ‖ ct ‖ tag, AAD = etcd key).
// - Identity: Kubernetes protobuf ("k8s\0" + bytes) or JSON, stored as is.
// Read() does the reverse through the plugin (Decrypt over gRPC, then HKDF + AES-GCM open) and returns the
// plaintext, proving the stored objects decrypt. Put() is the only write; the audit never uses this class.
// Test code only; not thread-safe unless noted.

#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/status/statusor.h"
#include "crypto/secret_bytes.h"
#include "kv.grpc.pb.h"
#include "tests/support/kms_client.h"

namespace kmsplugin::testing {

class ApiserverWriter {
 public:
  // `etcd_endpoint` is host:port (plaintext unless `credentials`); `kms` a client for the plugin's socket.
  ApiserverWriter(const std::string& etcd_endpoint, KmsClient& kms, std::string v2_provider = "kmsplugin-dev",
                  std::string v1_provider = "kmsplugin-dev-v1",
                  std::shared_ptr<grpc::ChannelCredentials> credentials = nullptr);
  ~ApiserverWriter();

  // A new seed wrapped by the plugin (Encrypt). Afterwards key_id() is the plugin's key_id for it.
  absl::Status NewSeed();
  const std::string& key_id() const { return key_id_; }

  // The value kube-apiserver would store for `plaintext` at etcd key `key` (thread-safe after NewSeed).
  absl::StatusOr<std::string> EncodeV2(const std::string& key, std::string_view plaintext) const;
  absl::StatusOr<std::string> EncodeV1(const std::string& key, std::string_view plaintext);

  absl::Status Put(const std::string& key, const std::string& value);  // thread-safe
  absl::Status PutV2(const std::string& key, std::string_view plaintext);
  absl::Status PutV1(const std::string& key, std::string_view plaintext);
  absl::Status PutIdentityProtobuf(const std::string& key, std::string_view payload);  // "k8s\0" + payload
  absl::Status PutJson(const std::string& key, const std::string& json);

  // The stored value of `key`, and the plaintext it decrypts to through the plugin.
  absl::StatusOr<std::string> Get(const std::string& key);
  absl::StatusOr<std::string> Read(const std::string& key);
  absl::StatusOr<std::string> Decrypt(const std::string& key, const std::string& value);
  // Every key under `prefix`.
  absl::StatusOr<std::vector<std::string>> Keys(const std::string& prefix);
  // etcd's current revision (header.revision of a Range).
  absl::StatusOr<int64_t> Revision();

 private:
  KmsClient& kms_;
  std::string v2_provider_;
  std::string v1_provider_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<etcdserverpb::KV::StubInterface> stub_;
  crypto::SecretBytes seed_;
  std::string key_id_;
  std::string encrypted_seed_;
  std::map<std::string, std::string> annotations_;
};

// A plaintext that looks like a Kubernetes Secret in protobuf (the "k8s\0" magic, then bytes).
std::string SecretPayload(const std::string& name);

}  // namespace kmsplugin::testing
