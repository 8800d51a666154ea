#pragma once

// CallPool: a fixed number of worker threads with a bounded queue in front, for the KMS calls that may block on a
// key source (Encrypt and Decrypt: a Vault or HSM call may take up to the call's deadline).
//
// - The workers start in the constructor and live until the destructor: no thread is created or destroyed while
//   serving (gRPC's synchronous server created and destroyed threads all the time under load).
// - At most workers + queue_limit calls are taken at once (running plus waiting). TrySubmit() refuses the next
//   one at once instead of letting a queue grow without limit (ARCHITECTURE rule 5).
// - A job whose deadline has passed when a worker takes it gets `expired` instead of `run`: a call the caller has
//   given up on never reaches the key source.
// - One pool per socket, so per environment: one environment's slow backend fills only its own workers and queue.
// - The destructor lets the workers finish what is queued (each job runs or expires), then joins them.
// - Memory back to the system: once calls were served and then none came for kTrimAfterIdle, one worker
//   calls glibc's malloc_trim(0). A flood of 1,000 clients grew RSS by 25 MB that glibc kept in its arenas after
//   the clients had gone (MALLOC_ARENA_MAX=2 did not help: the free memory sits in the middle of the heaps, and
//   only malloc_trim returns those pages). Idle-only, so the trim never costs a serving call.
// Thread-safe. Jobs must not throw.
//
// Written here rather than taken from a library: the packaged gRPC 1.51 has no public bounded executor, and
// abseil's thread pool (absl/synchronization/internal) is internal and unbounded.

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace kmsplugin::server {

class CallPool {
 public:
  struct Options {
    int workers = 8;
    int queue_limit = 64;
  };
  static constexpr absl::Duration kTrimAfterIdle = absl::Seconds(5);
  struct Job {
    absl::Time deadline = absl::InfiniteFuture();
    std::function<void()> run;
    std::function<void()> expired;
  };

  explicit CallPool(Options options);
  ~CallPool();
  CallPool(const CallPool&) = delete;
  CallPool& operator=(const CallPool&) = delete;

  // Takes `job` unless workers + queue_limit jobs are already taken; false (job untouched) when full.
  [[nodiscard]] bool TrySubmit(Job& job);

  // Every call on the socket says so here (also those served without the pool), so the idle trim knows when
  // the socket last served. Lock-free.
  void NoteCall() { last_call_nanos_.store(absl::GetCurrentTimeNanos(), std::memory_order_relaxed); }

  int workers() const { return options_.workers; }
  int queue_limit() const { return options_.queue_limit; }

  // What the pool holds now (for the gauges kmsplugin_call_pool_*; takes the pool's mutex briefly).
  struct Load {
    int queued = 0;        // waiting for a worker
    int busy_workers = 0;  // running a job
  };
  Load CurrentLoad() const;

 private:
  void Work();

  const Options options_;
  mutable absl::Mutex mu_;
  // Signalled once per job queued (wakes one idle worker) and on stop (wakes all). A CondVar rather than
  // Mutex::Await: with every worker waiting on a Condition, each unlock would evaluate them all.
  absl::CondVar work_;
  std::deque<Job> queue_ ABSL_GUARDED_BY(mu_);
  int running_ ABSL_GUARDED_BY(mu_) = 0;
  std::atomic<int64_t> last_call_nanos_{0};
  int64_t trimmed_after_nanos_ ABSL_GUARDED_BY(mu_) = 0;  // last_call_nanos_ when we last trimmed
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

}  // namespace kmsplugin::server
