#include "kmsplugin/server/pooled_call.h"

#include <cstring>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "crypto/secret_bytes.h"
#include "kmsplugin/server/grpc_status.h"

namespace kmsplugin::server {
namespace {

// A secret request larger than this goes to ordinary memory (wiped after use) instead of locked memory: a real
// one is a seed of at most 128 bytes plus a uid, and queued hostile 64 KiB requests must not exhaust
// RLIMIT_MEMLOCK (SecretBytes aborts when it cannot lock).
constexpr size_t kMaxLockedRequestBytes = 4096;

// The outcome of a call that never reached its body.
CallOutcome Refused(absl::Status status) {
  CallOutcome outcome;
  outcome.status = std::move(status);
  return outcome;
}

class PooledCall final : public grpc::ServerUnaryReactor {
 public:
  PooledCall(grpc::CallbackServerContext* context, grpc::ByteBuffer* response, const RpcRecorder& recorder,
             const char* rpc, CallBody body)
      : context_(context), response_(response), recorder_(recorder), rpc_(rpc), body_(std::move(body)) {}

  // Copies the request out of gRPC's slices. A secret request goes into locked memory and the slices gRPC
  // received it in are wiped: they are reference-counted views of the transport's receive buffer, which would
  // otherwise keep the seed in the heap until the allocator reuses it.
  void TakeRequest(const grpc::ByteBuffer& request, RequestSecrecy secrecy) {
    std::vector<grpc::Slice> slices;
    if (!request.Dump(&slices).ok()) {
      return;
    }
    size_t size = 0;
    for (const grpc::Slice& slice : slices) {
      size += slice.size();
    }
    uint8_t* out = nullptr;
    if (secrecy == RequestSecrecy::kSecret && size <= kMaxLockedRequestBytes) {
      secret_ = crypto::SecretBytes(size);
      out = secret_.data();
      in_secret_ = true;
    } else {
      public_.resize(size);
      out = reinterpret_cast<uint8_t*>(public_.data());
    }
    for (const grpc::Slice& slice : slices) {
      if (slice.size() == 0) {
        continue;
      }
      std::memcpy(out, slice.begin(), slice.size());
      out += slice.size();
      if (secrecy == RequestSecrecy::kSecret) {
        // We hold a reference, so the memory is live; nothing reads the message's bytes after this.
        crypto::Wipe(const_cast<uint8_t*>(slice.begin()), slice.size());
      }
    }
    secrecy_ = secrecy;
  }

  void Submit(CallPool& pool, absl::Time deadline) {
    CallPool::Job job;
    job.deadline = deadline;
    job.run = [this, deadline] { Run(deadline); };
    job.expired = [this] {
      End(Refused(absl::DeadlineExceededError(absl::StrCat(
          "the call's deadline passed after ",
          absl::FormatDuration(absl::Trunc(absl::Now() - start_, absl::Milliseconds(1))),
          " waiting in the queue for a free worker; the key source was not called; fix: give the call a longer "
          "deadline, or raise server.workers if the key source is slow"))));
    };
    if (!pool.TrySubmit(job)) {
      End(Refused(absl::ResourceExhaustedError(
          absl::StrCat("environment \"", recorder_.environment(), "\": the call queue is full (", pool.workers(),
                       " workers busy and ", pool.queue_limit(),
                       " calls waiting); retry later, or raise server.maxQueuedCalls "
                       "(calls that may wait) or server.workers (calls that run at once)"))));
    }
  }

  void RunHere(absl::Time deadline) { Run(deadline); }

  void OnDone() override { delete this; }
  void OnCancel() override {}  // a queued call sees IsCancelled() when a worker takes it

 private:
  void Run(absl::Time deadline) {
    if (context_->IsCancelled()) {
      End(Refused(absl::CancelledError("the caller cancelled the call while it waited for a free worker")));
      return;
    }
    const std::string_view request = in_secret_ ? secret_.view() : std::string_view(public_);
    End(body_(request, deadline));
  }

  void End(CallOutcome outcome) {
    secret_ = crypto::SecretBytes();  // wiped now, not when gRPC gets round to OnDone
    if (secrecy_ == RequestSecrecy::kSecret) {
      crypto::Wipe(public_.data(), public_.size());
    }
    if (outcome.status.ok()) {
      *response_ = grpc::ByteBuffer(&outcome.response, 1);
    }
    Finish(recorder_.Finish(outcome.status, rpc_, outcome.uid, outcome.key_id, start_));
  }

  grpc::CallbackServerContext* const context_;
  grpc::ByteBuffer* const response_;
  const RpcRecorder& recorder_;
  const char* const rpc_;
  const CallBody body_;
  const absl::Time start_ = absl::Now();
  RequestSecrecy secrecy_ = RequestSecrecy::kPublic;
  bool in_secret_ = false;
  crypto::SecretBytes secret_;
  std::string public_;
};

}  // namespace

grpc::ServerUnaryReactor* StartPooledCall(grpc::CallbackServerContext* context, const grpc::ByteBuffer* request,
                                          grpc::ByteBuffer* response, CallPool& pool, const RpcRecorder& recorder,
                                          const char* rpc, RequestSecrecy secrecy, Blocking blocking, CallBody body) {
  pool.NoteCall();
  auto* call = new PooledCall(context, response, recorder, rpc, std::move(body));
  call->TakeRequest(*request, secrecy);
  if (blocking == Blocking::kNeverBlocks) {
    call->RunHere(CallDeadline(*context));
  } else {
    call->Submit(pool, CallDeadline(*context));
  }
  return call;
}

grpc::Slice SerializePublic(const google::protobuf::MessageLite& message) {
  return grpc::Slice(message.SerializeAsString());
}

grpc::Slice SerializeSecret(const google::protobuf::MessageLite& message) {
  const size_t size = message.ByteSizeLong();
  if (size == 0) {
    return grpc::Slice();
  }
  auto* bytes = new crypto::SecretBytes(size);
  message.SerializeWithCachedSizesToArray(bytes->data());
  return grpc::Slice(
      bytes->data(), size, [](void* owner) { delete static_cast<crypto::SecretBytes*>(owner); }, bytes);
}

}  // namespace kmsplugin::server
