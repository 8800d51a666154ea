#pragma once

// tests/support/status_matchers.h derives from Catch::MatcherUntypedBase, but Catch2 v2.13 (Debian bookworm)
// declares it as Catch::Matchers::Impl::MatcherUntypedBase, so the shared header does not compile on its own.
// Until it is fixed there, bring the name into scope first. A repeated using-declaration is harmless, so this
// keeps working after the fix.

#include <catch2/catch.hpp>

namespace Catch {
using Matchers::Impl::MatcherUntypedBase;
}  // namespace Catch

#include "tests/support/status_matchers.h"
