// ThreadSanitizer build only: tells TSan what the packaged (uninstrumented) absl::Mutex does.
//
// Debian's libabsl_synchronization is built without -fsanitize=thread, so the TSan annotations that abseil puts
// in its own mutex.cc (ABSL_TSAN_MUTEX_PRE_LOCK and friends) are compiled out. Its Mutex then synchronises
// through an atomic word and futex system calls that TSan never sees: every ABSL_GUARDED_BY member of ours, and
// every gRPC hand-off through grpc_core::Mutex, would be reported as a data race that is not there. Suppressing
// those reports would mean suppressing our own frames (and hiding real races with them), so instead this file
// interposes the out-of-line entry points of Mutex, CondVar and Notification, calls the real ones (dlsym
// RTLD_NEXT), and around each call makes the same __tsan_mutex_* annotations abseil itself makes when it is built
// with TSan. gRPC and abseil call these through the PLT, so their own locks are annotated too.
//
// An instrumented abseil cannot replace the package: gRPC links the packaged one. This is linked into every
// executable of a KMSPLUGIN_TSAN build and nowhere else (CMakeLists.txt); it checks at start-up that the
// dynamic linker resolves the entry points to it, and aborts if not, so a broken interposition cannot make the
// suite look clean by reporting false races, nor by silently annotating nothing.
//
// Not annotated: the accesses a Condition's function makes while abseil evaluates it inside a lock, unlock or
// wait (TSan ignores accesses between the pre_ and post_ annotations; abseil's own build re-enables them with
// more bookkeeping than the gain is worth here). Such functions only read state the mutex guards.
#include <dlfcn.h>
#include <sanitizer/tsan_interface.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "absl/synchronization/internal/kernel_timeout.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"

namespace {

#define KMS_TSAN_STR2(x) #x
#define KMS_TSAN_STR(x) KMS_TSAN_STR2(x)

// The Itanium-mangled name of absl::<inline namespace>::<rest>: rest is already mangled ("5Mutex4LockEv").
std::string Mangled(const char* prefix, const char* rest) {
  const char* ns = KMS_TSAN_STR(ABSL_OPTION_INLINE_NAMESPACE_NAME);
  return std::string(prefix) + "4absl" + std::to_string(std::strlen(ns)) + ns + rest;
}

void* Real(const char* prefix, const char* rest) {
  const std::string name = Mangled(prefix, rest);
  void* fn = dlsym(RTLD_NEXT, name.c_str());
  if (fn == nullptr) {
    std::fprintf(stderr, "absl_sync_annotations: %s not found in the libraries after this one\n", name.c_str());
    std::abort();
  }
  return fn;
}

#define KMS_REAL(type, prefix, rest) (reinterpret_cast<type>(Real(prefix, rest)))

// Nested public calls inside abseil (LockWhenWithTimeout calls LockWhenWithDeadline) are annotated once, by the
// outermost call.
thread_local int tls_depth = 0;

// The mutexes this thread holds and how (0 or __tsan_mutex_read_lock): Await and CondVar waits release and retake
// the mutex in the mode it is held in, which abseil reads from its private state word.
constexpr int kMaxHeld = 64;
thread_local const void* tls_held[kMaxHeld];
thread_local unsigned tls_held_flags[kMaxHeld];
thread_local int tls_held_count = 0;

void PushHeld(const void* mu, unsigned flags) {
  if (tls_held_count < kMaxHeld) {
    tls_held[tls_held_count] = mu;
    tls_held_flags[tls_held_count] = flags;
  }
  ++tls_held_count;
}

void PopHeld(const void* mu) {
  for (int i = std::min(tls_held_count, kMaxHeld) - 1; i >= 0; --i) {
    if (tls_held[i] == mu) {
      for (int j = i; j + 1 < std::min(tls_held_count, kMaxHeld); ++j) {
        tls_held[j] = tls_held[j + 1];
        tls_held_flags[j] = tls_held_flags[j + 1];
      }
      --tls_held_count;
      return;
    }
  }
  if (tls_held_count > kMaxHeld) --tls_held_count;
}

unsigned HeldFlags(const void* mu) {
  for (int i = std::min(tls_held_count, kMaxHeld) - 1; i >= 0; --i) {
    if (tls_held[i] == mu) return tls_held_flags[i];
  }
  return 0;
}

struct Depth {
  Depth() { ++tls_depth; }
  ~Depth() { --tls_depth; }
};

// Lock-type calls that always end holding the mutex (the *When* calls with a timeout return whether the
// condition held, but take the mutex either way).
template <typename Call>
auto Locking(const void* mu, unsigned flags, Call call) {
  if (tls_depth > 0) return call();
  __tsan_mutex_pre_lock(const_cast<void*>(mu), flags);
  auto result = [&] {
    Depth d;
    return call();
  }();
  __tsan_mutex_post_lock(const_cast<void*>(mu), flags, 0);
  PushHeld(mu, flags);
  return result;
}

template <typename Call>
bool TryLocking(const void* mu, unsigned flags, Call call) {
  if (tls_depth > 0) return call();
  flags |= __tsan_mutex_try_lock;
  __tsan_mutex_pre_lock(const_cast<void*>(mu), flags);
  bool locked;
  {
    Depth d;
    locked = call();
  }
  __tsan_mutex_post_lock(const_cast<void*>(mu), locked ? flags : flags | __tsan_mutex_try_lock_failed, 0);
  if (locked) PushHeld(mu, flags & __tsan_mutex_read_lock);
  return locked;
}

template <typename Call>
void Unlocking(const void* mu, unsigned flags, Call call) {
  if (tls_depth > 0) return call();
  __tsan_mutex_pre_unlock(const_cast<void*>(mu), flags);
  {
    Depth d;
    call();
  }
  __tsan_mutex_post_unlock(const_cast<void*>(mu), flags);
  PopHeld(mu);
}

// A wait that releases the held mutex and has taken it again when it returns.
template <typename Call>
bool Waiting(const void* mu, Call call) {
  if (tls_depth > 0) return call();
  const unsigned flags = HeldFlags(mu);
  __tsan_mutex_pre_unlock(const_cast<void*>(mu), flags);
  bool result;
  {
    Depth d;
    result = call();
  }
  __tsan_mutex_post_unlock(const_cast<void*>(mu), flags);
  __tsan_mutex_pre_lock(const_cast<void*>(mu), flags);
  __tsan_mutex_post_lock(const_cast<void*>(mu), flags, 0);
  return result;
}

}  // namespace

namespace absl {
ABSL_NAMESPACE_BEGIN

using synchronization_internal::KernelTimeout;
constexpr unsigned kRead = __tsan_mutex_read_lock;

void Mutex::Lock() {
  static const auto real = KMS_REAL(void (*)(Mutex*), "_ZN", "5Mutex4LockEv");
  Locking(this, 0, [&] { return real(this), 0; });
}

void Mutex::ReaderLock() {
  static const auto real = KMS_REAL(void (*)(Mutex*), "_ZN", "5Mutex10ReaderLockEv");
  Locking(this, kRead, [&] { return real(this), 0; });
}

bool Mutex::TryLock() {
  static const auto real = KMS_REAL(bool (*)(Mutex*), "_ZN", "5Mutex7TryLockEv");
  return TryLocking(this, 0, [&] { return real(this); });
}

bool Mutex::ReaderTryLock() {
  static const auto real = KMS_REAL(bool (*)(Mutex*), "_ZN", "5Mutex13ReaderTryLockEv");
  return TryLocking(this, kRead, [&] { return real(this); });
}

void Mutex::Unlock() {
  static const auto real = KMS_REAL(void (*)(Mutex*), "_ZN", "5Mutex6UnlockEv");
  Unlocking(this, 0, [&] { real(this); });
}

void Mutex::ReaderUnlock() {
  static const auto real = KMS_REAL(void (*)(Mutex*), "_ZN", "5Mutex12ReaderUnlockEv");
  Unlocking(this, kRead, [&] { real(this); });
}

void Mutex::LockWhen(const Condition& cond) {
  static const auto real = KMS_REAL(void (*)(Mutex*, const Condition&), "_ZN", "5Mutex8LockWhenERKNS0_9ConditionE");
  Locking(this, 0, [&] { return real(this, cond), 0; });
}

void Mutex::ReaderLockWhen(const Condition& cond) {
  static const auto real =
      KMS_REAL(void (*)(Mutex*, const Condition&), "_ZN", "5Mutex14ReaderLockWhenERKNS0_9ConditionE");
  Locking(this, kRead, [&] { return real(this, cond), 0; });
}

bool Mutex::LockWhenWithTimeout(const Condition& cond, Duration timeout) {
  static const auto real = KMS_REAL(bool (*)(Mutex*, const Condition&, Duration), "_ZN",
                                    "5Mutex19LockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  return Locking(this, 0, [&] { return real(this, cond, timeout); });
}

bool Mutex::LockWhenWithDeadline(const Condition& cond, Time deadline) {
  static const auto real = KMS_REAL(bool (*)(Mutex*, const Condition&, Time), "_ZN",
                                    "5Mutex20LockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  return Locking(this, 0, [&] { return real(this, cond, deadline); });
}

bool Mutex::ReaderLockWhenWithTimeout(const Condition& cond, Duration timeout) {
  static const auto real = KMS_REAL(bool (*)(Mutex*, const Condition&, Duration), "_ZN",
                                    "5Mutex25ReaderLockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  return Locking(this, kRead, [&] { return real(this, cond, timeout); });
}

bool Mutex::ReaderLockWhenWithDeadline(const Condition& cond, Time deadline) {
  static const auto real = KMS_REAL(bool (*)(Mutex*, const Condition&, Time), "_ZN",
                                    "5Mutex26ReaderLockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  return Locking(this, kRead, [&] { return real(this, cond, deadline); });
}

// Await, AwaitWithTimeout and AwaitWithDeadline first evaluate the condition with the mutex held, then, if it is
// false, call this, which releases the mutex, waits and takes it again.
bool Mutex::AwaitCommon(const Condition& cond, KernelTimeout t) {
  static const auto real =
      KMS_REAL(bool (*)(Mutex*, const Condition&, KernelTimeout), "_ZN",
               "5Mutex11AwaitCommonERKNS0_9ConditionENS0_24synchronization_internal13KernelTimeoutE");
  return Waiting(this, [&] { return real(this, cond, t); });
}

// Wait, WaitWithTimeout and WaitWithDeadline.
bool CondVar::WaitCommon(Mutex* mutex, KernelTimeout t) {
  static const auto real = KMS_REAL(bool (*)(CondVar*, Mutex*, KernelTimeout), "_ZN",
                                    "7CondVar10WaitCommonEPNS0_5MutexENS0_24synchronization_internal13KernelTimeoutE");
  return Waiting(mutex, [&] { return real(this, mutex, t); });
}

// A Mutex's memory may be reused for another one (the stack, a pool): TSan forgets the old one here.
Mutex::~Mutex() {
  static const auto real = KMS_REAL(void (*)(Mutex*), "_ZN", "5MutexD2Ev");
  __tsan_mutex_destroy(this, 0);
  real(this);
}

// Notify publishes through an atomic flag that WaitForNotification* may read without taking the mutex: the
// release/acquire pair on the Notification stands for it.
void Notification::Notify() {
  static const auto real = KMS_REAL(void (*)(Notification*), "_ZN", "12Notification6NotifyEv");
  __tsan_release(this);
  real(this);
}

void Notification::WaitForNotification() const {
  static const auto real = KMS_REAL(void (*)(const Notification*), "_ZNK", "12Notification19WaitForNotificationEv");
  real(this);
  __tsan_acquire(const_cast<Notification*>(this));
}

bool Notification::WaitForNotificationWithTimeout(Duration timeout) const {
  static const auto real = KMS_REAL(bool (*)(const Notification*, Duration), "_ZNK",
                                    "12Notification30WaitForNotificationWithTimeoutENS0_8DurationE");
  const bool notified = real(this, timeout);
  if (notified) __tsan_acquire(const_cast<Notification*>(this));
  return notified;
}

bool Notification::WaitForNotificationWithDeadline(Time deadline) const {
  static const auto real = KMS_REAL(bool (*)(const Notification*, Time), "_ZNK",
                                    "12Notification31WaitForNotificationWithDeadlineENS0_4TimeE");
  const bool notified = real(this, deadline);
  if (notified) __tsan_acquire(const_cast<Notification*>(this));
  return notified;
}

ABSL_NAMESPACE_END
}  // namespace absl

namespace {

// The interposition only works if the dynamic linker binds abseil's and gRPC's calls to the definitions above,
// i.e. if the executable exports them. Checked once at start-up, before any test runs.
__attribute__((constructor)) void CheckInterposed() {
  void (absl::Mutex::*ours)() = &absl::Mutex::Lock;
  void* bound = dlsym(RTLD_DEFAULT, Mangled("_ZN", "5Mutex4LockEv").c_str());
  void* mine = nullptr;
  static_assert(sizeof(ours) >= sizeof(void*));
  std::memcpy(&mine, &ours, sizeof(void*));
  if (bound != mine) {
    std::fprintf(stderr,
                 "absl_sync_annotations: absl::Mutex::Lock binds to %p, not to the annotated %p: the executable must "
                 "export it (see CMakeLists.txt, KMSPLUGIN_TSAN)\n",
                 bound, mine);
    std::abort();
  }
}

}  // namespace
