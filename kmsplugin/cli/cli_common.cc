#include "kmsplugin/cli/cli_common.h"

#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include <iostream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

#include "kmsplugin/core/exit_codes.h"
#include "kmsplugin/daemon/event_log_sink.h"
#include "kmsplugin/keysource/registry.h"

namespace kmsplugin::cli {

int Fail(const absl::Status& status) {
  // A message may quote a config value or a flag as typed: no escape sequence reaches the terminal.
  std::cerr << "kmsplugin: " << Printable(std::string(status.message()), 8192) << "\n";
  return core::ExitCodeFor(status, core::IsUsageError(status) ? core::kExitUsage : core::kExitFailed);
}

int FailConfig(const absl::Status& status) { return Fail(core::AsUsageError(status)); }

std::string Printable(const std::string& text, size_t max) {
  std::string out;
  for (const char c : text.substr(0, max)) {
    const auto byte = static_cast<unsigned char>(c);
    if (byte < 0x20 || byte == 0x7f) {
      absl::StrAppendFormat(&out, "\\x%02x", byte);
    } else {
      out.push_back(c);
    }
  }
  if (text.size() > max) {
    absl::StrAppend(&out, "...[", text.size(), " bytes]");
  }
  return out;
}

void HardenProcess() {
  prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
  const rlimit no_core{0, 0};
  setrlimit(RLIMIT_CORE, &no_core);
  umask(077);
}

absl::StatusOr<OpenedEnvironment> OpenEnvironment(const std::string& config_path, const std::string& environment) {
  auto config = config::LoadConfig(config_path, keysource::KeySourceParsers());
  if (!config.ok()) {
    return core::AsUsageError(config.status());
  }
  auto env = config->Find(environment);
  if (!env.ok()) {
    return core::AsUsageError(env.status());
  }
  auto events = std::make_shared<daemon::EventLogSink>((*env)->name, std::string((*env)->key_source->Kind()),
                                                       /*registry=*/nullptr);
  auto source = (*env)->key_source->Open(
      keysource::SystemOpenContext((*env)->name, config->server.max_threads, events.get()));
  if (!source.ok()) {
    return source.status();
  }
  return OpenedEnvironment{std::move(events), std::move(*config), std::move(source->source),
                           std::move(source->admin)};
}

}  // namespace kmsplugin::cli
