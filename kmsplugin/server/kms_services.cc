#include "kmsplugin/server/kms_services.h"

#include <cstring>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "crypto/secret_bytes.h"
#include "kmsplugin/observe/log.h"
#include "kmsplugin/server/grpc_status.h"
#include "kmsplugin/server/pooled_call.h"

namespace kmsplugin::server {
namespace {

constexpr char kV1beta1[] = "v1beta1";

// A seed or DEK the protobuf parser copied into a string of its own: wiped once used, on every path.
struct WipeOnExit {
  std::string& bytes;
  ~WipeOnExit() { crypto::Wipe(bytes.data(), bytes.size()); }
};

absl::Status CheckV1Version(const std::string& version) {
  if (!version.empty() && version != kV1beta1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "unsupported KMS API version \"", absl::CHexEscape(version.substr(0, 32)), "\"; this service speaks v1beta1"));
  }
  return absl::OkStatus();
}

absl::Status Unparseable(const char* message) {
  return absl::InvalidArgumentError(absl::StrCat("the request is not a valid ", message, " protobuf message"));
}

bool Parse(google::protobuf::MessageLite& message, std::string_view bytes) {
  return message.ParseFromArray(bytes.data(), static_cast<int>(bytes.size()));
}

// Only the local keyring is known never to block (it computes in memory under a short lock); every other key
// source talks to a backend and goes through the pool. A key source's kind never changes while served
// (EnvelopeService::CheckReplacement refuses that).
Blocking BlockingOf(const core::EnvelopeService& service) {
  return service.key_source()->Kind() == crypto::KeySourceKind::kLocal ? Blocking::kNeverBlocks : Blocking::kMayBlock;
}

grpc::ServerUnaryReactor* FinishInline(grpc::CallbackServerContext* context, grpc::Status status) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(std::move(status));
  return reactor;
}

}  // namespace

RpcRecorder::RpcSeries::RpcSeries(const std::string& environment, const std::string& api, const char* rpc,
                                  observe::Registry& registry)
    : rpc(rpc),
      requests(registry.CounterFamily("kmsplugin_grpc_requests_total",
                                      "KMS gRPC calls by environment, API, RPC and status code."),
               {{"environment", environment}, {"api", api}, {"rpc", rpc}}, "code", "OK"),
      suppressed(registry.CounterFamily("kmsplugin_log_lines_suppressed_total",
                                        "Failure log lines not written because their kind exceeded its rate limit."),
                 {{"environment", environment}, {"api", api}, {"rpc", rpc}}, "code", "OK"),
      latency(registry.GetHistogram("kmsplugin_grpc_request_duration_seconds", "KMS gRPC call latency in the plugin.",
                                    {{"environment", environment}, {"api", api}, {"rpc", rpc}})) {}

RpcRecorder::RpcRecorder(std::string environment, std::string api, std::vector<const char*> rpcs,
                         observe::Registry* registry)
    : environment_(std::move(environment)), api_(std::move(api)) {
  if (registry != nullptr) {
    for (const char* rpc : rpcs) {
      series_.push_back(std::make_unique<RpcSeries>(environment_, api_, rpc, *registry));
    }
  }
}

const RpcRecorder::RpcSeries* RpcRecorder::SeriesOf(const char* rpc) const {
  for (const auto& series : series_) {
    if (series->rpc == rpc || std::strcmp(series->rpc, rpc) == 0) {
      return series.get();
    }
  }
  return nullptr;
}

grpc::Status RpcRecorder::Finish(const absl::Status& status, const char* rpc, const std::string& uid,
                                 const std::string& key_id, absl::Time start) const {
  const absl::Duration latency = absl::Now() - start;
  const std::string code = status.ok() ? "OK" : absl::StatusCodeToString(status.code());
  const RpcSeries* series = SeriesOf(rpc);
  if (series != nullptr) {
    series->requests.Get(status.code()).Increment();
    series->latency.Observe(absl::ToDoubleSeconds(latency));
  }
  const auto level = status.ok() ? spdlog::level::debug : spdlog::level::warn;
  if (spdlog::should_log(level)) {
    uint64_t suppressed = 0;
    if (!status.ok()) {
      // A flood of failing calls (a hostile or broken client) must not become a flood of log lines.
      const observe::LineLimiter::Decision decision = failure_lines_.Admit(absl::StrCat(rpc, "/", code), absl::Now());
      if (!decision.write) {
        if (series != nullptr) {
          series->suppressed.Get(status.code()).Increment();
        }
        return ToGrpcStatus(status);
      }
      suppressed = decision.suppressed_before;
    }
    nlohmann::json fields = {{"environment", environment_},
                             {"rpc", api_ + "." + rpc},
                             {"uid", uid},
                             {"key_id", key_id},
                             {"code", code},
                             {"latency_ms", absl::ToDoubleMilliseconds(latency)},
                             {"error", std::string(status.message())}};
    if (suppressed > 0) {
      fields["suppressed"] = suppressed;  // like lines held back since the last one written
    }
    observe::LogJson(level, status.ok() ? "rpc" : "rpc failed", fields);
  }
  return ToGrpcStatus(status);
}

grpc::ServerUnaryReactor* KmsV2Service::Status(grpc::CallbackServerContext* context, const v2::StatusRequest*,
                                               v2::StatusResponse* response) {
  const absl::Time start = absl::Now();
  const core::StatusResult status = service_.Status();  // non-blocking: answered on the callback thread
  response->set_version(status.version);
  response->set_healthz(status.healthz);
  response->set_key_id(status.key_id);
  return FinishInline(context, recorder_.Finish(absl::OkStatus(), "Status", "", status.key_id, start));
}

grpc::ServerUnaryReactor* KmsV2Service::Encrypt(grpc::CallbackServerContext* context, const grpc::ByteBuffer* request,
                                                grpc::ByteBuffer* response) {
  return StartPooledCall(context, request, response, pool_, recorder_, "Encrypt", RequestSecrecy::kSecret,
                         BlockingOf(service_),
                         [this](std::string_view bytes, absl::Time deadline) { return RunEncrypt(bytes, deadline); });
}

CallOutcome KmsV2Service::RunEncrypt(std::string_view bytes, absl::Time deadline) {
  CallOutcome outcome;
  v2::EncryptRequest parsed;
  WipeOnExit wipe{*parsed.mutable_plaintext()};
  if (!Parse(parsed, bytes)) {
    outcome.status = Unparseable("v2.EncryptRequest");
    return outcome;
  }
  outcome.uid = parsed.uid();
  absl::StatusOr<core::EncryptResult> result = service_.Encrypt(parsed.plaintext(), deadline);
  outcome.status = result.status();
  if (result.ok()) {
    v2::EncryptResponse answer;
    answer.set_ciphertext(std::move(result->ciphertext));
    answer.set_key_id(std::move(result->key_id));
    for (auto& [key, value] : result->annotations) {
      (*answer.mutable_annotations())[key] = std::move(value);
    }
    outcome.key_id = answer.key_id();
    outcome.response = SerializePublic(answer);
  }
  return outcome;
}

grpc::ServerUnaryReactor* KmsV2Service::Decrypt(grpc::CallbackServerContext* context, const grpc::ByteBuffer* request,
                                                grpc::ByteBuffer* response) {
  return StartPooledCall(context, request, response, pool_, recorder_, "Decrypt", RequestSecrecy::kPublic,
                         BlockingOf(service_),
                         [this](std::string_view bytes, absl::Time deadline) { return RunDecrypt(bytes, deadline); });
}

CallOutcome KmsV2Service::RunDecrypt(std::string_view bytes, absl::Time deadline) {
  CallOutcome outcome;
  v2::DecryptRequest parsed;
  if (!Parse(parsed, bytes)) {
    outcome.status = Unparseable("v2.DecryptRequest");
    return outcome;
  }
  outcome.uid = parsed.uid();
  outcome.key_id = parsed.key_id();
  core::DecryptMetadata metadata;
  metadata.key_id = parsed.key_id();
  metadata.annotations.insert(parsed.annotations().begin(), parsed.annotations().end());
  absl::StatusOr<crypto::SecretBytes> plaintext = service_.Decrypt(parsed.ciphertext(), &metadata, deadline);
  outcome.status = plaintext.status();
  if (plaintext.ok()) {
    v2::DecryptResponse answer;
    WipeOnExit wipe{*answer.mutable_plaintext()};
    answer.set_plaintext(plaintext->data(), plaintext->size());
    outcome.response = SerializeSecret(answer);
  }
  return outcome;
}

grpc::ServerUnaryReactor* KmsV1beta1Service::Version(grpc::CallbackServerContext* context,
                                                     const v1beta1::VersionRequest* request,
                                                     v1beta1::VersionResponse* response) {
  const absl::Time start = absl::Now();
  if (auto status = CheckV1Version(request->version()); !status.ok()) {
    return FinishInline(context, recorder_.Finish(status, "Version", "", "", start));
  }
  response->set_version(kV1beta1);
  response->set_runtime_name("kmsplugin");
  response->set_runtime_version(KMSPLUGIN_VERSION);
  return FinishInline(context, recorder_.Finish(absl::OkStatus(), "Version", "", "", start));
}

grpc::ServerUnaryReactor* KmsV1beta1Service::Encrypt(grpc::CallbackServerContext* context,
                                                     const grpc::ByteBuffer* request, grpc::ByteBuffer* response) {
  return StartPooledCall(context, request, response, pool_, recorder_, "Encrypt", RequestSecrecy::kSecret,
                         BlockingOf(service_),
                         [this](std::string_view bytes, absl::Time deadline) { return RunEncrypt(bytes, deadline); });
}

CallOutcome KmsV1beta1Service::RunEncrypt(std::string_view bytes, absl::Time deadline) {
  CallOutcome outcome;
  v1beta1::EncryptRequest parsed;
  WipeOnExit wipe{*parsed.mutable_plain()};
  if (!Parse(parsed, bytes)) {
    outcome.status = Unparseable("v1beta1.EncryptRequest");
    return outcome;
  }
  outcome.status = CheckV1Version(parsed.version());
  if (!outcome.status.ok()) {
    return outcome;
  }
  absl::StatusOr<core::EncryptResult> result = service_.Encrypt(parsed.plain(), deadline);
  outcome.status = result.status();
  if (result.ok()) {
    v1beta1::EncryptResponse answer;
    answer.set_cipher(std::move(result->ciphertext));
    outcome.response = SerializePublic(answer);
  }
  return outcome;
}

grpc::ServerUnaryReactor* KmsV1beta1Service::Decrypt(grpc::CallbackServerContext* context,
                                                     const grpc::ByteBuffer* request, grpc::ByteBuffer* response) {
  return StartPooledCall(context, request, response, pool_, recorder_, "Decrypt", RequestSecrecy::kPublic,
                         BlockingOf(service_),
                         [this](std::string_view bytes, absl::Time deadline) { return RunDecrypt(bytes, deadline); });
}

CallOutcome KmsV1beta1Service::RunDecrypt(std::string_view bytes, absl::Time deadline) {
  CallOutcome outcome;
  v1beta1::DecryptRequest parsed;
  if (!Parse(parsed, bytes)) {
    outcome.status = Unparseable("v1beta1.DecryptRequest");
    return outcome;
  }
  outcome.status = CheckV1Version(parsed.version());
  if (!outcome.status.ok()) {
    return outcome;
  }
  absl::StatusOr<crypto::SecretBytes> plaintext = service_.Decrypt(parsed.cipher(), /*metadata=*/nullptr, deadline);
  outcome.status = plaintext.status();
  if (plaintext.ok()) {
    v1beta1::DecryptResponse answer;
    WipeOnExit wipe{*answer.mutable_plain()};
    answer.set_plain(plaintext->data(), plaintext->size());
    outcome.response = SerializeSecret(answer);
  }
  return outcome;
}

}  // namespace kmsplugin::server
