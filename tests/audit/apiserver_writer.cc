#include "tests/audit/apiserver_writer.h"

#include <chrono>

#include <grpcpp/create_channel.h>

#include "absl/strings/str_cat.h"
#include "crypto/aes_gcm_aead.h"
#include "crypto/hkdf.h"
#include "crypto/random.h"
#include "encrypted_object.pb.h"
#include "kmsplugin/core/sv.h"

namespace kmsplugin::testing {
namespace {

constexpr size_t kSeedSize = 32;
constexpr size_t kInfoSize = 32;
constexpr size_t kDekSize = 32;
constexpr size_t kNonceSize = 12;
constexpr char kV2Prefix[] = "k8s:enc:kms:v2:";
constexpr char kV1Prefix[] = "k8s:enc:kms:v1:";

std::string RandomBytes(size_t n) {
  std::string out(n, '\0');
  crypto::SystemRandom().Fill(absl::Span<uint8_t>(reinterpret_cast<uint8_t*>(out.data()), out.size()));
  return out;
}

absl::Status FromGrpc(const grpc::Status& status, const std::string& what) {
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()),
                      absl::StrCat(what, ": ", status.error_message()));
}

std::chrono::system_clock::time_point Deadline() {
  return std::chrono::system_clock::now() + std::chrono::seconds(10);
}

// AES-256-GCM under `dek`: returns nonce ‖ ct ‖ tag with AAD = the etcd key.
absl::StatusOr<std::string> SealWithKey(const crypto::SecretBytes& dek, const std::string& key,
                                        std::string_view plaintext) {
  auto aead = crypto::AesGcmAead::New(dek, crypto::SystemRandom());
  if (!aead.ok()) {
    return aead.status();
  }
  const std::string nonce = RandomBytes(kNonceSize);
  auto sealed = (*aead)->Seal(nonce, plaintext, key);
  if (!sealed.ok()) {
    return sealed.status();
  }
  return nonce + *sealed;
}

absl::StatusOr<std::string> OpenWithKey(const crypto::SecretBytes& dek, const std::string& key,
                                        std::string_view nonce_ct_tag) {
  if (nonce_ct_tag.size() < kNonceSize + crypto::AesGcmAead::kTagSize) {
    return absl::InvalidArgumentError("AES-GCM data too short");
  }
  auto aead = crypto::AesGcmAead::New(dek, crypto::SystemRandom());
  if (!aead.ok()) {
    return aead.status();
  }
  auto opened = (*aead)->Open(nonce_ct_tag.substr(0, kNonceSize), nonce_ct_tag.substr(kNonceSize), key);
  if (!opened.ok()) {
    return opened.status();
  }
  return std::string(opened->view());
}

}  // namespace

std::string SecretPayload(const std::string& name) {
  // Not a full Secret encoding: the magic and a body that names the object are what storage sees.
  return absl::StrCat(std::string("k8s\0", 4), "\n\x0c\n\x02v1\x12\x06Secret\x12", name, "\x1a\x05value");
}

ApiserverWriter::ApiserverWriter(const std::string& etcd_endpoint, KmsClient& kms, std::string v2_provider,
                                 std::string v1_provider, std::shared_ptr<grpc::ChannelCredentials> credentials)
    : kms_(kms), v2_provider_(std::move(v2_provider)), v1_provider_(std::move(v1_provider)) {
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, 1 << 30);
  channel_ = grpc::CreateCustomChannel(etcd_endpoint, credentials ? credentials : grpc::InsecureChannelCredentials(),
                                      args);
  stub_ = etcdserverpb::KV::NewStub(channel_);
}

ApiserverWriter::~ApiserverWriter() = default;

absl::Status ApiserverWriter::NewSeed() {
  crypto::SecretBytes seed = crypto::SystemRandom().NewSecret(kSeedSize);
  v2::EncryptResponse response;
  const grpc::Status status = kms_.Encrypt(std::string(seed.view()), response);
  if (!status.ok()) {
    return FromGrpc(status, "plugin Encrypt of a new seed");
  }
  seed_ = std::move(seed);
  key_id_ = response.key_id();
  encrypted_seed_ = response.ciphertext();
  annotations_ = std::map<std::string, std::string>(response.annotations().begin(), response.annotations().end());
  return absl::OkStatus();
}

absl::StatusOr<std::string> ApiserverWriter::EncodeV2(const std::string& key, std::string_view plaintext) const {
  if (seed_.empty()) {
    return absl::FailedPreconditionError("no seed: call NewSeed() first");
  }
  const std::string info = RandomBytes(kInfoSize);
  auto dek = crypto::HkdfSha256Expand(seed_.view(), info, kDekSize);
  if (!dek.ok()) {
    return dek.status();
  }
  auto sealed = SealWithKey(*dek, key, plaintext);
  if (!sealed.ok()) {
    return sealed.status();
  }
  kmsplugin::etcd::EncryptedObject object;
  object.set_encrypteddata(info + *sealed);
  object.set_keyid(key_id_);
  object.set_encrypteddeksource(encrypted_seed_);
  for (const auto& [name, value] : annotations_) {
    (*object.mutable_annotations())[name] = value;
  }
  object.set_encrypteddeksourcetype(kmsplugin::etcd::HKDF_SHA256_XNONCE_AES_GCM_SEED);
  return absl::StrCat(kV2Prefix, v2_provider_, ":", object.SerializeAsString());
}

absl::StatusOr<std::string> ApiserverWriter::EncodeV1(const std::string& key, std::string_view plaintext) {
  crypto::SecretBytes dek = crypto::SystemRandom().NewSecret(kDekSize);
  v1beta1::EncryptResponse response;
  const grpc::Status status = kms_.V1Encrypt(std::string(dek.view()), response);
  if (!status.ok()) {
    return FromGrpc(status, "plugin v1beta1 Encrypt of a DEK");
  }
  const std::string& wrapped = response.cipher();
  if (wrapped.empty() || wrapped.size() > 0xffff) {
    return absl::InternalError("v1beta1 ciphertext length out of range");
  }
  auto sealed = SealWithKey(dek, key, plaintext);
  if (!sealed.ok()) {
    return sealed.status();
  }
  std::string length;
  length.push_back(static_cast<char>(wrapped.size() >> 8));
  length.push_back(static_cast<char>(wrapped.size() & 0xff));
  return absl::StrCat(kV1Prefix, v1_provider_, ":", length, wrapped, *sealed);
}

absl::Status ApiserverWriter::Put(const std::string& key, const std::string& value) {
  grpc::ClientContext context;
  context.set_deadline(Deadline());
  etcdserverpb::PutRequest request;
  request.set_key(key);
  request.set_value(value);
  etcdserverpb::PutResponse response;
  const grpc::Status status = stub_->Put(&context, request, &response);
  return status.ok() ? absl::OkStatus() : FromGrpc(status, absl::StrCat("etcd Put ", key));
}

absl::Status ApiserverWriter::PutV2(const std::string& key, std::string_view plaintext) {
  auto value = EncodeV2(key, plaintext);
  return value.ok() ? Put(key, *value) : value.status();
}

absl::Status ApiserverWriter::PutV1(const std::string& key, std::string_view plaintext) {
  auto value = EncodeV1(key, plaintext);
  return value.ok() ? Put(key, *value) : value.status();
}

absl::Status ApiserverWriter::PutIdentityProtobuf(const std::string& key, std::string_view payload) {
  return Put(key, absl::StrCat(std::string("k8s\0", 4), Sv(payload)));
}

absl::Status ApiserverWriter::PutJson(const std::string& key, const std::string& json) { return Put(key, json); }

absl::StatusOr<std::string> ApiserverWriter::Get(const std::string& key) {
  grpc::ClientContext context;
  context.set_deadline(Deadline());
  etcdserverpb::RangeRequest request;
  request.set_key(key);
  etcdserverpb::RangeResponse response;
  const grpc::Status status = stub_->Range(&context, request, &response);
  if (!status.ok()) {
    return FromGrpc(status, absl::StrCat("etcd Range ", key));
  }
  if (response.kvs_size() != 1) {
    return absl::NotFoundError(absl::StrCat("no etcd key ", key));
  }
  return response.kvs(0).value();
}

absl::StatusOr<std::string> ApiserverWriter::Read(const std::string& key) {
  auto value = Get(key);
  return value.ok() ? Decrypt(key, *value) : value.status();
}

absl::StatusOr<std::string> ApiserverWriter::Decrypt(const std::string& key, const std::string& value) {
  std::string_view rest(value);
  if (rest.starts_with(kV2Prefix)) {
    rest.remove_prefix(sizeof(kV2Prefix) - 1);
    const size_t colon = rest.find(':');
    if (colon == std::string_view::npos) {
      return absl::InvalidArgumentError("v2 value without provider");
    }
    rest.remove_prefix(colon + 1);
    kmsplugin::etcd::EncryptedObject object;
    if (!object.ParseFromArray(rest.data(), static_cast<int>(rest.size()))) {
      return absl::InvalidArgumentError("EncryptedObject does not parse");
    }
    std::map<std::string, std::string> annotations(object.annotations().begin(), object.annotations().end());
    v2::DecryptResponse response;
    const grpc::Status status = kms_.Decrypt(object.encrypteddeksource(), object.keyid(), annotations, response);
    if (!status.ok()) {
      return FromGrpc(status, "plugin Decrypt of the seed");
    }
    crypto::SecretBytes source = crypto::SecretBytes::CopyOf(response.plaintext());
    std::string_view data = object.encrypteddata();
    if (object.encrypteddeksourcetype() == kmsplugin::etcd::AES_GCM_KEY) {
      return OpenWithKey(source, key, data);
    }
    if (data.size() < kInfoSize) {
      return absl::InvalidArgumentError("encryptedData shorter than the HKDF info");
    }
    auto dek = crypto::HkdfSha256Expand(source.view(), data.substr(0, kInfoSize), kDekSize);
    if (!dek.ok()) {
      return dek.status();
    }
    return OpenWithKey(*dek, key, data.substr(kInfoSize));
  }
  if (rest.starts_with(kV1Prefix)) {
    rest.remove_prefix(sizeof(kV1Prefix) - 1);
    const size_t colon = rest.find(':');
    if (colon == std::string_view::npos || rest.size() < colon + 3) {
      return absl::InvalidArgumentError("v1 value without provider or length");
    }
    rest.remove_prefix(colon + 1);
    const size_t n = (static_cast<size_t>(static_cast<unsigned char>(rest[0])) << 8) |
                     static_cast<unsigned char>(rest[1]);
    if (n > rest.size() - 2) {
      return absl::InvalidArgumentError("v1 length prefix too large");
    }
    v1beta1::DecryptResponse response;
    const grpc::Status status = kms_.V1Decrypt(std::string(rest.substr(2, n)), response);
    if (!status.ok()) {
      return FromGrpc(status, "plugin v1beta1 Decrypt of the DEK");
    }
    return OpenWithKey(crypto::SecretBytes::CopyOf(response.plain()), key, rest.substr(2 + n));
  }
  return value;  // identity
}

absl::StatusOr<std::vector<std::string>> ApiserverWriter::Keys(const std::string& prefix) {
  grpc::ClientContext context;
  context.set_deadline(Deadline());
  etcdserverpb::RangeRequest request;
  request.set_key(prefix);
  std::string end = prefix;
  end.back() = static_cast<char>(end.back() + 1);
  request.set_range_end(end);
  request.set_keys_only(true);
  etcdserverpb::RangeResponse response;
  const grpc::Status status = stub_->Range(&context, request, &response);
  if (!status.ok()) {
    return FromGrpc(status, "etcd Range keys");
  }
  std::vector<std::string> keys;
  for (const mvccpb::KeyValue& kv : response.kvs()) {
    keys.push_back(kv.key());
  }
  return keys;
}

absl::StatusOr<int64_t> ApiserverWriter::Revision() {
  grpc::ClientContext context;
  context.set_deadline(Deadline());
  etcdserverpb::RangeRequest request;
  request.set_key("/");
  request.set_count_only(true);
  etcdserverpb::RangeResponse response;
  const grpc::Status status = stub_->Range(&context, request, &response);
  if (!status.ok()) {
    return FromGrpc(status, "etcd Range for the revision");
  }
  return response.header().revision();
}

}  // namespace kmsplugin::testing
