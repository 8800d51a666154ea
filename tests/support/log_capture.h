#pragma once

// LogCapture: an spdlog sink that keeps the formatted lines in memory, for tests that check what a running server
// logs. The server writes it from its own threads under the sink's lock; Text() copies it under the same lock
// (an ostream_sink_mt over an ostringstream cannot be read safely while a server thread may still log: the
// ThreadSanitizer run found that race in server_serving_test).

#include <spdlog/details/log_msg.h>
#include <spdlog/sinks/base_sink.h>

#include <mutex>
#include <string>

namespace kmsplugin::testing {

class LogCapture final : public spdlog::sinks::base_sink<std::mutex> {
 public:
  // Everything logged so far.
  std::string Text() {
    std::lock_guard<std::mutex> lock(mutex_);
    return text_;
  }

 protected:
  void sink_it_(const spdlog::details::log_msg& msg) override {
    spdlog::memory_buf_t formatted;
    formatter_->format(msg, formatted);
    text_.append(formatted.data(), formatted.size());
  }
  void flush_() override {}

 private:
  std::string text_;  // guarded by base_sink's mutex_ (spdlog's lock, which every sink_it_ call holds)
};

}  // namespace kmsplugin::testing
