#include "kmsplugin/server/call_counter.h"

#include <cstring>

namespace kmsplugin::server {
namespace {

class CountingInterceptor final : public grpc::experimental::Interceptor {
 public:
  CountingInterceptor(std::atomic<int>* in_flight, std::atomic<int>* method) : in_flight_(in_flight), method_(method) {
    in_flight_->fetch_add(1);
    if (method_ != nullptr) {
      method_->fetch_add(1, std::memory_order_relaxed);
    }
  }
  ~CountingInterceptor() override {
    if (method_ != nullptr) {
      method_->fetch_sub(1, std::memory_order_relaxed);
    }
    in_flight_->fetch_sub(1);
  }
  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override { methods->Proceed(); }

 private:
  std::atomic<int>* const in_flight_;
  std::atomic<int>* const method_;
};

class CountingFactory final : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit CountingFactory(CallCounter* counter, std::atomic<int>* in_flight)
      : counter_(counter), in_flight_(in_flight) {}
  grpc::experimental::Interceptor* CreateServerInterceptor(grpc::experimental::ServerRpcInfo* info) override {
    return new CountingInterceptor(in_flight_, info == nullptr ? nullptr : counter_->CounterOf(info->method()));
  }

 private:
  CallCounter* const counter_;
  std::atomic<int>* const in_flight_;
};

}  // namespace

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> CallCounter::Factory() {
  return std::make_unique<CountingFactory>(this, &in_flight_);
}

std::atomic<int>* CallCounter::CounterOf(const char* method) {
  if (method == nullptr) {
    return nullptr;
  }
  for (size_t i = 0; i < kMethods.size(); ++i) {
    if (std::strcmp(kMethods[i].path, method) == 0) {
      return &by_method_[i];
    }
  }
  return nullptr;
}

std::array<int, CallCounter::kMethods.size()> CallCounter::InFlightByMethod() const {
  std::array<int, kMethods.size()> counts{};
  for (size_t i = 0; i < kMethods.size(); ++i) {
    counts[i] = by_method_[i].load(std::memory_order_relaxed);
  }
  return counts;
}

}  // namespace kmsplugin::server
