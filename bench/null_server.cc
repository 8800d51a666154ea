// kms_null_server: the benchmark's null baseline. It serves KMS v2 and v1beta1 on a Unix socket with exactly the
// gRPC settings of the plugin (ApplyServerTuning(ServerTuning{}), gRPC's callback API) but does no cryptography,
// so the difference between the plugin and this server is the plugin's own cost.
//
//   v2 Encrypt   -> ciphertext = plaintext, key_id "null", annotations {"format.kmsplugin.io": "1"} (the one
//                   annotation the plugin returns, so response sizes match)
//   v2 Decrypt   -> plaintext = ciphertext
//   v2 Status    -> {version "v2", healthz "ok", key_id "null"}
//   v1 Version   -> {version "v1beta1", runtime_name "null", runtime_version "0.0.0"}
//   v1 Encrypt   -> cipher = plain;  v1 Decrypt -> plain = cipher
//
// Usage: kms_null_server --socket PATH. SIGTERM or SIGINT shuts down (in-flight calls get 5 s) and exits 0.
// Not for anything but benchmarks: it "encrypts" nothing.

#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>

#include <CLI/CLI.hpp>
#include <grpcpp/grpcpp.h>

#include "kms_v1beta1.grpc.pb.h"
#include "kms_v2.grpc.pb.h"
#include "kmsplugin/server/server_tuning.h"

namespace {

constexpr char kKeyId[] = "null";
constexpr char kFormatAnnotation[] = "format.kmsplugin.io";

// Answered inline on gRPC's callback thread: no key source, so nothing can block. (The plugin hands Encrypt and
// Decrypt to its CallPool; that hop is part of the plugin's own cost this baseline measures.)
grpc::ServerUnaryReactor* Answer(grpc::CallbackServerContext* context) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

class NullV2 final : public v2::KeyManagementService::CallbackService {
 public:
  grpc::ServerUnaryReactor* Status(grpc::CallbackServerContext* context, const v2::StatusRequest*,
                                   v2::StatusResponse* resp) override {
    resp->set_version("v2");
    resp->set_healthz("ok");
    resp->set_key_id(kKeyId);
    return Answer(context);
  }
  grpc::ServerUnaryReactor* Decrypt(grpc::CallbackServerContext* context, const v2::DecryptRequest* req,
                                    v2::DecryptResponse* resp) override {
    resp->set_plaintext(req->ciphertext());
    return Answer(context);
  }
  grpc::ServerUnaryReactor* Encrypt(grpc::CallbackServerContext* context, const v2::EncryptRequest* req,
                                    v2::EncryptResponse* resp) override {
    resp->set_ciphertext(req->plaintext());
    resp->set_key_id(kKeyId);
    (*resp->mutable_annotations())[kFormatAnnotation] = "1";
    return Answer(context);
  }
};

class NullV1 final : public v1beta1::KeyManagementService::CallbackService {
 public:
  grpc::ServerUnaryReactor* Version(grpc::CallbackServerContext* context, const v1beta1::VersionRequest*,
                                    v1beta1::VersionResponse* resp) override {
    resp->set_version("v1beta1");
    resp->set_runtime_name("null");
    resp->set_runtime_version("0.0.0");
    return Answer(context);
  }
  grpc::ServerUnaryReactor* Decrypt(grpc::CallbackServerContext* context, const v1beta1::DecryptRequest* req,
                                    v1beta1::DecryptResponse* resp) override {
    resp->set_plain(req->cipher());
    return Answer(context);
  }
  grpc::ServerUnaryReactor* Encrypt(grpc::CallbackServerContext* context, const v1beta1::EncryptRequest* req,
                                    v1beta1::EncryptResponse* resp) override {
    resp->set_cipher(req->plain());
    return Answer(context);
  }
};

}  // namespace

int main(int argc, char** argv) {
  std::string socket;
  CLI::App app{"kms_null_server: KMS v2/v1beta1 server that does no cryptography (benchmark baseline)"};
  app.add_option("--socket", socket, "Unix socket path (no unix: prefix)")->required();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);
    return rc == 0 ? 0 : 2;
  }

  // Block the stop signals in every thread (gRPC's threads inherit this mask); one thread waits for them.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  NullV2 v2_service;
  NullV1 v1_service;
  grpc::ServerBuilder builder;
  kmsplugin::server::ApplyServerTuning(kmsplugin::server::ServerTuning{}, builder);
  builder.AddListeningPort("unix:" + socket, grpc::InsecureServerCredentials());
  builder.RegisterService(&v2_service);
  builder.RegisterService(&v1_service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr) {
    std::fprintf(stderr, "kms_null_server: cannot listen on unix:%s\n", socket.c_str());
    return 1;
  }
  std::fprintf(stderr, "kms_null_server: listening on unix:%s\n", socket.c_str());

  std::thread stopper([&server, &stop_signals] {
    int sig = 0;
    sigwait(&stop_signals, &sig);
    std::fprintf(stderr, "kms_null_server: signal %d, shutting down\n", sig);
    server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  });
  server->Wait();
  stopper.join();
  unlink(socket.c_str());
  return 0;
}
