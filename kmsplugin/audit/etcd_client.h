#pragma once

// EtcdClient: a read-only etcd v3 client for the audit. It speaks gRPC to etcd's KV service and calls only
// Range; it has no method that writes, so nothing built on it can change etcd.
//
// - Endpoints are "host:port" or "http(s)://host:port", as etcdctl's --endpoints. With several, a call that
//   cannot reach one (UNAVAILABLE, DEADLINE_EXCEEDED) is retried on the next, and the one that answered is
//   tried first next time.
// - TLS as etcdctl's --cacert/--cert/--key: TLS is on when any of them is given or an endpoint says https://.
//   The server certificate is verified against the CA file (or the system roots when none is given).
// - Every call has its own deadline (`timeout`).
// - Errors name the endpoint(s) and the problem: UNAVAILABLE when no endpoint answers (with a TLS hint when the
//   handshake failed), INVALID_ARGUMENT for bad options, NOT_FOUND/PERMISSION_DENIED for unreadable files,
//   and etcd's own code and message otherwise (e.g. OUT_OF_RANGE after a compaction).
// Not thread-safe: one caller at a time.

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace kmsplugin::audit {

struct EtcdOptions {
  std::vector<std::string> endpoints;
  std::string ca_file;    // PEM CA bundle that signs etcd's server certificate
  std::string cert_file;  // PEM client certificate (etcd --client-cert-auth)
  std::string key_file;   // its PEM private key
  absl::Duration timeout = absl::Seconds(10);  // per call
};

struct EtcdKeyValue {
  std::string key;
  std::string value;
  int64_t mod_revision = 0;
};

struct RangePage {
  std::vector<EtcdKeyValue> kvs;
  bool more = false;       // more keys in the range than were returned
  int64_t revision = 0;    // the store revision the page was read at (header.revision)
  int64_t count = 0;       // keys in the whole range
};

class EtcdClient {
 public:
  // Validates the options and reads the TLS files; does not connect yet.
  static absl::StatusOr<std::unique_ptr<EtcdClient>> New(const EtcdOptions& options);
  ~EtcdClient();
  EtcdClient(const EtcdClient&) = delete;
  EtcdClient& operator=(const EtcdClient&) = delete;

  // Keys in [key, range_end) in key order, at most `limit` (> 0), read at `revision` (0: the newest, a
  // linearizable read; > 0: a serializable read of that revision, which needs no quorum round trip).
  absl::StatusOr<RangePage> Range(const std::string& key, const std::string& range_end, int64_t limit,
                                  int64_t revision);

  // The endpoint that answered last (or the first one configured).
  const std::string& endpoint() const;
  bool tls() const;

 private:
  struct Impl;
  explicit EtcdClient(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// The smallest key greater than every key that starts with `prefix` (etcd's range_end for a prefix);
// "\0" (every key from `prefix` on) when no such key exists.
std::string PrefixRangeEnd(const std::string& prefix);

}  // namespace kmsplugin::audit
