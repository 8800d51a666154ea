#pragma once

// SnapshotEtcd: `kmsplugin audit --snapshot FILE` serves an etcd snapshot (from `etcdctl snapshot save`) for the
// audit to read, and leaves nothing behind:
//
//   1. a private directory (mkdtemp under $TMPDIR or /tmp, mode 0700);
//   2. `etcdctl snapshot restore FILE --data-dir DIR/data` (Debian bookworm's etcd-client is etcd 3.4, whose
//      etcdctl restores; etcdutl only exists from 3.5). The snapshot's integrity hash is checked, so a file
//      copied out of a data directory (no hash) is refused rather than trusted;
//   3. a single-member etcd (etcd-server) on 127.0.0.1, client and peer ports chosen at run time (etcd cannot bind
//      port 0 and report it, so free ports are picked and the start is retried on a collision), in its own
//      process group, killed by the kernel if this process dies (PR_SET_PDEATHSIG);
//   4. the destructor stops etcd (SIGTERM, then SIGKILL after a bounded wait) and removes the directory. SIGINT,
//      SIGTERM and SIGHUP during the audit do the same and then end the process with the signal's exit status
//      (128 + signal number).
//
// Every wait is bounded: restore 120 s, start `start_timeout`.

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace kmsplugin::audit {

struct SnapshotEtcdOptions {
  std::string snapshot;                      // the snapshot file
  std::string etcd = "/usr/bin/etcd";        // etcd-server
  std::string etcdctl = "/usr/bin/etcdctl";  // etcd-client
  absl::Duration start_timeout = absl::Seconds(30);
};

class SnapshotEtcd {
 public:
  // INVALID_ARGUMENT when the snapshot cannot be read or restored (the message says why, with etcdctl's words);
  // FAILED_PRECONDITION when the etcd tools are missing (naming the Debian packages); UNAVAILABLE when etcd does
  // not start in time.
  static absl::StatusOr<std::unique_ptr<SnapshotEtcd>> Start(const SnapshotEtcdOptions& options);
  ~SnapshotEtcd();
  SnapshotEtcd(const SnapshotEtcd&) = delete;
  SnapshotEtcd& operator=(const SnapshotEtcd&) = delete;

  // host:port of the private etcd's client URL (plain HTTP on loopback).
  const std::string& endpoint() const;
  // The private directory (for tests: it must be gone after destruction).
  const std::string& directory() const;

  struct State;

 private:
  explicit SnapshotEtcd(std::shared_ptr<State> state);
  std::shared_ptr<State> state_;
};

}  // namespace kmsplugin::audit
