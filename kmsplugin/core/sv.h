#pragma once

// Debian's Abseil is built with its own absl::string_view (ABSL_OPTION_USE_STD_STRING_VIEW is 0), so a
// std::string_view does not convert to it implicitly. Our interfaces use std::string_view; Sv() bridges the two
// at the call into Abseil (StrCat, Status messages) without copying.

#include <string_view>

#include "absl/strings/string_view.h"

namespace kmsplugin {

inline absl::string_view Sv(std::string_view text) { return absl::string_view(text.data(), text.size()); }

}  // namespace kmsplugin
