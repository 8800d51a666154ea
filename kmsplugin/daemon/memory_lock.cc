#include "kmsplugin/daemon/memory_lock.h"

#include <sys/resource.h>

#include <spdlog/spdlog.h>

#include "absl/strings/str_cat.h"
#include "crypto/secret_bytes.h"
#include "kmsplugin/observe/log.h"

namespace kmsplugin::daemon {
namespace {

std::string Limit(rlim_t value) {
  return value == RLIM_INFINITY ? std::string("unlimited") : absl::StrCat(value / 1024, " KiB");
}

// Why the check failed, or OK.
absl::Status TryLock() {
  if (!crypto::SecretArenaLocked()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("the ", crypto::kSecretArenaBytes / 1024, " KiB arena of small secrets is not locked"));
  }
  if (absl::Status probe = crypto::ProbeLockedMemory(kLockedHeadroomBytes); !probe.ok()) {
    return absl::Status(probe.code(), absl::StrCat("locking ", kLockedHeadroomBytes / 1024,
                                                   " KiB more for larger secrets failed: ", probe.message()));
  }
  if (crypto::SecretLockFailures() > 0) {
    return absl::ResourceExhaustedError(
        absl::StrCat(crypto::SecretLockFailures(), " secret block(s) could not be locked"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status CheckLockedMemory(bool allow_unlocked, observe::Registry& registry) {
  const absl::Status locked = TryLock();
  const bool start_ok = locked.ok();
  registry.AddGaugeCollector(
      "kmsplugin_memory_locked",
      "1 when every secret is in locked memory (never swapped); 0 when some could not be locked "
      "(RLIMIT_MEMLOCK; served only with server.allowUnlockedMemory).",
      [start_ok] {
        const bool now_ok = start_ok && crypto::SecretLockFailures() == 0;
        return std::vector<observe::Sample>{{{}, now_ok ? 1.0 : 0.0}};
      });
  if (locked.ok()) {
    return absl::OkStatus();
  }
  rlimit limit{};
  getrlimit(RLIMIT_MEMLOCK, &limit);
  const size_t needed_kib = (crypto::kSecretArenaBytes + kLockedHeadroomBytes) / 1024 + 64;  // + page rounding
  const std::string why = absl::StrCat(
      "cannot lock the memory that holds secrets (", locked.message(), "; RLIMIT_MEMLOCK is ", Limit(limit.rlim_cur),
      ", the plugin needs about ", needed_kib, " KiB), so keys could be written to swap");
  if (allow_unlocked) {
    observe::Log(spdlog::level::warn, "serving with secrets in unlocked memory",
                 {{"event", "memory_unlocked"}, {"reason", why}, {"setting", "server.allowUnlockedMemory: true"}});
    return absl::OkStatus();
  }
  return absl::FailedPreconditionError(absl::StrCat(
      why, "; fix: raise the limit to at least ", needed_kib,
      " KiB: systemd: LimitMEMLOCK=64M in the unit (deploy/systemd/kmsplugin.service has it); shell: ulimit -l ",
      needed_kib, " (or prlimit --memlock); Kubernetes: the container runtime sets the limit for the pod "
      "(containerd.service LimitMEMLOCK=), and a container running as root can instead add IPC_LOCK to "
      "securityContext.capabilities; or, where swap is off or encrypted, set server.allowUnlockedMemory: true"));
}

}  // namespace kmsplugin::daemon
