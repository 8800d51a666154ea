#include "kmsplugin/daemon/starting_key_source.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "kmsplugin/core/clock.h"

namespace kmsplugin::daemon {
namespace {

constexpr absl::Duration kMinRetryInterval = absl::Seconds(1);

}  // namespace

StartingKeySource::StartingKeySource(std::string environment, crypto::KeySourceKind kind, Opener open,
                                     absl::Status first_error, absl::Duration retry_interval,
                                     std::vector<std::string> files, core::EventSink& events,
                                     std::function<void()> on_started)
    : environment_(std::move(environment)),
      kind_(kind),
      open_(std::move(open)),
      retry_interval_(std::max(retry_interval, kMinRetryInterval)),
      files_(std::move(files)),
      on_started_(std::move(on_started)),
      events_(events),
      error_(std::move(first_error)) {
  for (const std::string& file : files_) {
    stamps_.push_back(keysource::StatStamp(file));
  }
  retry_ = std::thread([this] { RetryLoop(); });
}

StartingKeySource::~StartingKeySource() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  retry_.join();
}

std::shared_ptr<core::KeySource> StartingKeySource::OpenOrKeepTrying(std::string environment,
                                                                     crypto::KeySourceKind kind, Opener open,
                                                                     absl::Duration retry_interval,
                                                                     std::vector<std::string> files,
                                                                     core::EventSink& events,
                                                                     std::function<void()> on_started) {
  auto opened = open();
  if (opened.ok()) {
    return std::move(*opened);
  }
  events.Emit(core::SourceEvent{core::event::kUnavailable,
                                absl::StrCat("the key source of environment \"", environment,
                                             "\" could not start; it serves unhealthy and is retried every ",
                                             absl::FormatDuration(std::max(retry_interval, kMinRetryInterval)),
                                             " and on SIGHUP: ", opened.status().message()),
                                {{"error", std::string(opened.status().message())}},
                                true});
  return std::make_shared<StartingKeySource>(std::move(environment), kind, std::move(open), opened.status(),
                                             retry_interval, std::move(files), events, std::move(on_started));
}

bool StartingKeySource::WorthTrying(const absl::Status& last_error) {
  bool changed = false;
  for (size_t i = 0; i < files_.size(); ++i) {
    std::optional<keysource::FileStamp> now = keysource::StatStamp(files_[i]);
    if (now != stamps_[i]) {
      changed = true;
      stamps_[i] = std::move(now);
    }
  }
  return changed || last_error.code() != absl::StatusCode::kPermissionDenied;
}

void StartingKeySource::RetryLoop() {
  // Retry times on the monotonic clock (core/clock.h): a wall clock stepped back must not stall the retries.
  const core::Clock& clock = core::SystemClock();
  absl::Duration last_attempt = clock.Elapsed();
  while (true) {
    {
      auto woken = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stopping_ || wake_; };
      core::WaitMonotonic(mu_, absl::Condition(&woken), last_attempt + retry_interval_ - clock.Elapsed());
      absl::MutexLock lock(&mu_);
      if (stopping_) {
        return;
      }
      wake_ = false;
    }
    absl::Status last_error;
    {
      absl::MutexLock lock(&mu_);
      last_error = error_;
    }
    if (!WorthTrying(last_error)) {
      last_attempt = clock.Elapsed();
      continue;
    }
    // SIGHUP storms: at most one attempt a second.
    if (const absl::Duration since = clock.Elapsed() - last_attempt; since < kMinRetryInterval) {
      absl::SleepFor(kMinRetryInterval - since);
    }
    last_attempt = clock.Elapsed();
    auto opened = open_();  // outside mu_: an open may take the backend's whole timeout
    if (!opened.ok()) {
      absl::MutexLock lock(&mu_);
      error_ = opened.status();
      continue;
    }
    std::shared_ptr<core::KeySource> source = std::move(*opened);
    // Versions as the backend has them now, before the first call sees the source.
    (void)source->Refresh(absl::Now() + absl::Seconds(5));
    {
      absl::MutexLock lock(&mu_);
      started_ = std::move(source);
    }
    events_.Emit(core::SourceEvent{
        core::event::kStarted,
        absl::StrCat("the key source of environment \"", environment_, "\" has started after failing to"), {}});
    if (on_started_) {
      on_started_();
    }
    return;
  }
}

std::shared_ptr<core::KeySource> StartingKeySource::Started() const {
  absl::MutexLock lock(&mu_);
  return started_;
}

absl::Status StartingKeySource::NotStarted() const {
  absl::MutexLock lock(&mu_);
  return NotStartedLocked();
}

absl::Status StartingKeySource::NotStartedLocked() const {
  const std::string message = absl::StrCat("the key source of environment \"", environment_,
                                           "\" has not started: ", error_.message(),
                                           " (retried at every poll and on SIGHUP)");
  // PERMISSION_DENIED keeps its meaning (our credentials are refused); everything else is "not available yet".
  if (error_.code() == absl::StatusCode::kPermissionDenied) {
    return absl::PermissionDeniedError(message);
  }
  return absl::UnavailableError(message);
}

absl::StatusOr<core::KeyVersion> StartingKeySource::Current() const {
  if (auto source = Started()) {
    return source->Current();
  }
  return NotStarted();
}

absl::StatusOr<std::string> StartingKeySource::Wrap(const core::KeyVersion& version, std::string_view plaintext,
                                                    std::string_view associated_data, absl::Time deadline) {
  if (auto source = Started()) {
    return source->Wrap(version, plaintext, associated_data, deadline);
  }
  return NotStarted();
}

absl::StatusOr<crypto::SecretBytes> StartingKeySource::Unwrap(std::string_view key_ref, std::string_view wrapped,
                                                              std::string_view associated_data, absl::Time deadline) {
  if (auto source = Started()) {
    return source->Unwrap(key_ref, wrapped, associated_data, deadline);
  }
  return NotStarted();
}

absl::StatusOr<core::KeyVersion> StartingKeySource::Lookup(std::string_view key_ref) const {
  if (auto source = Started()) {
    return source->Lookup(key_ref);
  }
  return NotStarted();
}

bool StartingKeySource::HealUnknown(std::string_view key_ref, absl::Time deadline) {
  if (auto source = Started()) {
    return source->HealUnknown(key_ref, deadline);
  }
  return false;
}

absl::StatusOr<std::vector<core::KeyVersion>> StartingKeySource::Versions() const {
  if (auto source = Started()) {
    return source->Versions();
  }
  return NotStarted();
}

std::vector<core::BackendGauge> StartingKeySource::BackendGauges() const {
  if (auto source = Started()) {
    return source->BackendGauges();
  }
  return {};
}

absl::Status StartingKeySource::Refresh(absl::Time deadline) {
  if (auto source = Started()) {
    return source->Refresh(deadline);
  }
  absl::MutexLock lock(&mu_);
  wake_ = true;  // SIGHUP: try again now, on the retry thread
  return NotStartedLocked();
}

}  // namespace kmsplugin::daemon
