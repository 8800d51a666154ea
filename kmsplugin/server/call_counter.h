#pragma once

// CallCounter: how many calls a gRPC server is handling right now, counted by a server interceptor (one is
// created when a call reaches its handler and destroyed when the call is done).
//
// Why: grpc::Server::Shutdown(deadline) returns only when every connection is gone, and a client connection
// with no call in flight (an idle kube-apiserver channel, a `kmsplugin status` that hung, a bare connect) stays
// until the deadline, so SIGTERM took the whole grace period (issue 11, item 13). The runner drains while calls
// are in flight and closes the connections as soon as none is (grpc_server_cancel_all_calls: there is nothing
// left to cancel but idle connections). Thread-safe.

#include <atomic>
#include <memory>

#include <grpcpp/support/server_interceptor.h>

namespace kmsplugin::server {

class CallCounter {
 public:
  // An interceptor factory for ServerBuilder::experimental().SetInterceptorCreators; it counts into this
  // object's counter.
  std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> Factory();
  int InFlight() const { return in_flight_->load(); }

 private:
  // Shared with the factory and every interceptor: gRPC destroys an interceptor with its call's ServerContext, on
  // its own thread, and nothing in gRPC's API orders that before grpc::Server's destruction returns to us, so the
  // counter lives as long as the last interceptor instead of as long as this object (the ThreadSanitizer run
  // reported the interceptor's decrement against the counter's deletion in server_serving_test).
  std::shared_ptr<std::atomic<int>> in_flight_ = std::make_shared<std::atomic<int>>(0);
};

}  // namespace kmsplugin::server
