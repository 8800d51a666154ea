#include "kmsplugin/core/key_source.h"

#include "absl/strings/str_cat.h"

namespace kmsplugin::core {

std::string_view KeyStateName(KeyState state) {
  switch (state) {
    case KeyState::kCurrent:
      return "current";
    case KeyState::kActive:
      return "active";
    case KeyState::kRetired:
      return "retired";
    case KeyState::kStaged:
      return "staged";
  }
  return "unknown";
}

absl::Status CheckWrapInput(std::string_view plaintext, std::string_view associated_data) {
  if (plaintext.empty() || plaintext.size() > kMaxWrapPlaintextSize) {
    return absl::InvalidArgumentError(absl::StrCat("wrap refused: a plaintext of ", plaintext.size(),
                                                   " bytes (a key source wraps 1..", kMaxWrapPlaintextSize, ")"));
  }
  if (associated_data.empty()) {
    return absl::InvalidArgumentError(
        "wrap refused: the associated data is empty (it must bind the environment and key version)");
  }
  return absl::OkStatus();
}

absl::Status CheckUnwrapInput(std::string_view wrapped, std::string_view associated_data) {
  if (wrapped.empty() || wrapped.size() > kMaxWrappedSize) {
    return absl::InvalidArgumentError(absl::StrCat("unwrap refused: wrapped bytes of ", wrapped.size(),
                                                   " bytes (1..", kMaxWrappedSize, " expected)"));
  }
  if (associated_data.empty()) {
    return absl::InvalidArgumentError("unwrap refused: the associated data is empty");
  }
  return absl::OkStatus();
}

}  // namespace kmsplugin::core
