#pragma once

// RecordingEventSink: a core::EventSink that keeps every event, for tests that check what a key source reported.
// Thread-safe.

#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "kmsplugin/core/events.h"

namespace kmsplugin::testing {

class RecordingEventSink final : public core::EventSink {
 public:
  void Emit(const core::SourceEvent& event) override {
    absl::MutexLock lock(&mu_);
    events_.push_back(event);
  }
  std::vector<core::SourceEvent> Events() const {
    absl::MutexLock lock(&mu_);
    return events_;
  }
  // How many events named `name` were emitted.
  int Count(const std::string& name) const {
    absl::MutexLock lock(&mu_);
    int n = 0;
    for (const core::SourceEvent& e : events_) {
      n += e.name == name ? 1 : 0;
    }
    return n;
  }
  // The message of the last event named `name` ("" if none).
  std::string Last(const std::string& name) const {
    absl::MutexLock lock(&mu_);
    for (auto it = events_.rbegin(); it != events_.rend(); ++it) {
      if (it->name == name) {
        return it->message;
      }
    }
    return "";
  }
  // Every event as "name: message" lines, for INFO on failure.
  std::string All() const {
    absl::MutexLock lock(&mu_);
    std::string out;
    for (const core::SourceEvent& e : events_) {
      out += e.name + ": " + e.message + "\n";
    }
    return out;
  }
  void Clear() {
    absl::MutexLock lock(&mu_);
    events_.clear();
  }

 private:
  mutable absl::Mutex mu_;
  std::vector<core::SourceEvent> events_;
};

}  // namespace kmsplugin::testing
