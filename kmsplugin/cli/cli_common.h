#pragma once

// What every kmsplugin command shares: the one-line failure, process hardening, and opening key sources.

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kmsplugin/config/config.h"
#include "kmsplugin/core/events.h"
#include "kmsplugin/core/key_admin.h"
#include "kmsplugin/core/key_source.h"

namespace kmsplugin::cli {

inline constexpr char kDefaultConfig[] = "/etc/kmsplugin/config.yaml";

// Prints "kmsplugin: <message>" on stderr and returns the exit code (core/exit_codes.h): 3 when something could
// not be reached, 2 for an invalid argument or a config error (core::IsUsageError), else 1.
int Fail(const absl::Status& status);
// The same for a config that cannot be loaded or an environment it does not have: 2 (a config error), or 3.
int FailConfig(const absl::Status& status);

// `text` for a terminal, on one line: control characters (ESC, newline, ...) as \xNN, at most `max` bytes. For
// anything that may echo what the caller typed or a config value.
std::string Printable(const std::string& text, size_t max = 512);

// No core dumps (they would hold keys), not dumpable, no files readable by others (umask 077).
void HardenProcess();

// A command's config and one environment's key source, opened; its events are logged (no metrics in the CLI).
struct OpenedEnvironment {
  std::shared_ptr<core::EventSink> events;  // first: the source refers to it, so it is destroyed last
  config::Config config;
  std::shared_ptr<core::KeySource> source;
  std::shared_ptr<core::KeyAdmin> admin;  // the same key source's rotate/retire side
};
// Loads `config_path` and opens `environment` (NOT_FOUND listing the environments there are). Errors of the
// config itself are marked core::AsUsageError.
absl::StatusOr<OpenedEnvironment> OpenEnvironment(const std::string& config_path, const std::string& environment);

}  // namespace kmsplugin::cli
