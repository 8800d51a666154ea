#include "kmsplugin/server/call_counter.h"

#include <utility>

namespace kmsplugin::server {
namespace {

class CountingInterceptor final : public grpc::experimental::Interceptor {
 public:
  explicit CountingInterceptor(std::shared_ptr<std::atomic<int>> in_flight) : in_flight_(std::move(in_flight)) {
    in_flight_->fetch_add(1);
  }
  ~CountingInterceptor() override { in_flight_->fetch_sub(1); }
  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override { methods->Proceed(); }

 private:
  const std::shared_ptr<std::atomic<int>> in_flight_;
};

class CountingFactory final : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit CountingFactory(std::shared_ptr<std::atomic<int>> in_flight) : in_flight_(std::move(in_flight)) {}
  grpc::experimental::Interceptor* CreateServerInterceptor(grpc::experimental::ServerRpcInfo*) override {
    return new CountingInterceptor(in_flight_);
  }

 private:
  const std::shared_ptr<std::atomic<int>> in_flight_;
};

}  // namespace

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> CallCounter::Factory() {
  return std::make_unique<CountingFactory>(in_flight_);
}

}  // namespace kmsplugin::server
