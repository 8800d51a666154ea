#include "kmsplugin/server/call_counter.h"

#include <cstring>
#include <utility>

namespace kmsplugin::server {
namespace {

class CountingInterceptor final : public grpc::experimental::Interceptor {
 public:
  CountingInterceptor(std::shared_ptr<CallCounter::Counts> counts, int method)
      : counts_(std::move(counts)), method_(method) {
    counts_->in_flight.fetch_add(1);
    if (method_ >= 0) {
      counts_->by_method[method_].fetch_add(1, std::memory_order_relaxed);
    }
  }
  ~CountingInterceptor() override {
    if (method_ >= 0) {
      counts_->by_method[method_].fetch_sub(1, std::memory_order_relaxed);
    }
    counts_->in_flight.fetch_sub(1);
  }
  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override { methods->Proceed(); }

 private:
  const std::shared_ptr<CallCounter::Counts> counts_;
  const int method_;
};

class CountingFactory final : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit CountingFactory(std::shared_ptr<CallCounter::Counts> counts) : counts_(std::move(counts)) {}
  grpc::experimental::Interceptor* CreateServerInterceptor(grpc::experimental::ServerRpcInfo* info) override {
    return new CountingInterceptor(counts_, info == nullptr ? -1 : CallCounter::IndexOf(info->method()));
  }

 private:
  const std::shared_ptr<CallCounter::Counts> counts_;
};

}  // namespace

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> CallCounter::Factory() {
  return std::make_unique<CountingFactory>(counts_);
}

int CallCounter::IndexOf(const char* method) {
  if (method == nullptr) {
    return -1;
  }
  for (size_t i = 0; i < kMethods.size(); ++i) {
    if (std::strcmp(kMethods[i].path, method) == 0) {
      return static_cast<int>(i);
    }
  }
  return -1;
}

std::array<int, CallCounter::kMethods.size()> CallCounter::InFlightByMethod() const {
  std::array<int, kMethods.size()> counts{};
  for (size_t i = 0; i < kMethods.size(); ++i) {
    counts[i] = counts_->by_method[i].load(std::memory_order_relaxed);
  }
  return counts;
}

}  // namespace kmsplugin::server
