// Fuzz target: the duration flag parser (core/duration_flag.h), which reads argv as typed.
// Properties: never crashes; what it accepts is positive and finite; the usage error never grows with the input
// beyond the 64 bytes it quotes.

#include <cstdint>
#include <cstdlib>
#include <string>

#include "kmsplugin/core/duration_flag.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  std::optional<absl::Duration> duration = kmsplugin::core::ParseDurationFlag(text);
  if (duration.has_value() && (*duration <= absl::ZeroDuration() || *duration == absl::InfiniteDuration())) {
    std::abort();
  }
  const std::string error = kmsplugin::core::DurationFlagError("--timeout", text);
  if (error.size() > 200) {
    std::abort();
  }
  return 0;
}
