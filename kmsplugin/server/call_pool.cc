#include "kmsplugin/server/call_pool.h"

#include <malloc.h>

#include <algorithm>

namespace kmsplugin::server {
namespace {

void TrimMemory() {
#ifdef __GLIBC__
  malloc_trim(0);
#endif
}

}  // namespace

CallPool::CallPool(Options options) : options_{std::max(1, options.workers), std::max(0, options.queue_limit)} {
  threads_.reserve(options_.workers);
  for (int i = 0; i < options_.workers; ++i) {
    threads_.emplace_back([this] { Work(); });
  }
}

CallPool::~CallPool() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    work_.SignalAll();
  }
  for (std::thread& thread : threads_) {
    thread.join();
  }
}

bool CallPool::TrySubmit(Job& job) {
  absl::MutexLock lock(&mu_);
  if (stopping_ || static_cast<int>(queue_.size()) + running_ >= options_.workers + options_.queue_limit) {
    return false;
  }
  queue_.push_back(std::move(job));
  work_.Signal();
  return true;
}

CallPool::Load CallPool::CurrentLoad() const {
  absl::MutexLock lock(&mu_);
  return Load{static_cast<int>(queue_.size()), running_};
}

void CallPool::Work() {
  while (true) {
    Job job;
    bool trim = false;
    {
      absl::MutexLock lock(&mu_);
      while (queue_.empty() && !stopping_ && !trim) {
        const bool timed_out = work_.WaitWithTimeout(&mu_, kTrimAfterIdle);
        const int64_t last_call = last_call_nanos_.load(std::memory_order_relaxed);
        if (timed_out && queue_.empty() && running_ == 0 && last_call != trimmed_after_nanos_ &&
            absl::GetCurrentTimeNanos() - last_call >= absl::ToInt64Nanoseconds(kTrimAfterIdle)) {
          trimmed_after_nanos_ = last_call;  // this worker trims; the others go back to sleep
          trim = true;
        }
      }
      if (!trim) {
        if (queue_.empty()) {
          return;  // stopping, and nothing left to answer
        }
        job = std::move(queue_.front());
        queue_.pop_front();
        ++running_;
      }
    }
    if (trim) {
      TrimMemory();
      continue;
    }
    if (absl::Now() >= job.deadline) {
      job.expired();
    } else {
      job.run();
    }
    absl::MutexLock lock(&mu_);
    --running_;
  }
}

}  // namespace kmsplugin::server
