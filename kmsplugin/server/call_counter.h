#pragma once

// CallCounter: how many calls a gRPC server is handling right now, counted by a server interceptor (one is
// created when a call reaches its handler and destroyed when the call is done).
//
// Why: grpc::Server::Shutdown(deadline) returns only when every connection is gone, and a client connection
// with no call in flight (an idle kube-apiserver channel, a `kmsplugin status` that hung, a bare connect) stays
// until the deadline, so SIGTERM took the whole grace period (issue 11, item 13). The runner drains while calls
// are in flight and closes the connections as soon as none is (grpc_server_cancel_all_calls: there is nothing
// left to cancel but idle connections). The same count, split by KMS method, is the in-flight gauge
// kmsplugin_grpc_requests_in_flight (ServerRunner exposes it). Thread-safe; lock-free.

#include <array>
#include <atomic>
#include <memory>
#include <vector>

#include <grpcpp/support/server_interceptor.h>

namespace kmsplugin::server {

class CallCounter {
 public:
  // An interceptor factory for ServerBuilder::experimental().SetInterceptorCreators. The interceptors share the
  // counts with this object, so they may outlive it: gRPC destroys an interceptor (with its ServerContext) on one
  // of its own threads, in an order its API does not tie to ~Server (ThreadSanitizer caught a decrement landing
  // in a freed CallCounter after ServerRunner::Shutdown, in server_serving_test).
  std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> Factory();
  int InFlight() const { return counts_->in_flight.load(); }

  // The KMS methods counted one by one; a call of any other method counts only in InFlight().
  struct Method {
    const char* path;  // as gRPC names it: "/v2.KeyManagementService/Encrypt"
    const char* api;
    const char* rpc;
  };
  static constexpr std::array<Method, 6> kMethods{{
      {"/v2.KeyManagementService/Status", "v2", "Status"},
      {"/v2.KeyManagementService/Encrypt", "v2", "Encrypt"},
      {"/v2.KeyManagementService/Decrypt", "v2", "Decrypt"},
      {"/v1beta1.KeyManagementService/Version", "v1beta1", "Version"},
      {"/v1beta1.KeyManagementService/Encrypt", "v1beta1", "Encrypt"},
      {"/v1beta1.KeyManagementService/Decrypt", "v1beta1", "Decrypt"},
  }};
  // Calls in flight per entry of kMethods (same order).
  std::array<int, kMethods.size()> InFlightByMethod() const;

  // The index in kMethods of `method` (a gRPC method path), or -1 for another method.
  static int IndexOf(const char* method);

  struct Counts {
    std::atomic<int> in_flight{0};
    std::array<std::atomic<int>, kMethods.size()> by_method{};
  };

 private:
  const std::shared_ptr<Counts> counts_ = std::make_shared<Counts>();
};

}  // namespace kmsplugin::server
