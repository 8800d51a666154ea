#include "kmsplugin/core/key_source.h"

namespace kmsplugin::core {

std::string_view KeyStateName(KeyState state) {
  switch (state) {
    case KeyState::kCurrent:
      return "current";
    case KeyState::kActive:
      return "active";
    case KeyState::kRetired:
      return "retired";
  }
  return "unknown";
}

}  // namespace kmsplugin::core
