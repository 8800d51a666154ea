#pragma once

// ScanPrefix: visits every key under a prefix, one page (Range with `limit`) at a time, so memory stays bounded
// by one page however many objects etcd holds. Pages continue from the last key + "\0" and are all read at the
// revision of the first page, so the scan is one consistent snapshot even while the apiserver writes.

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "kmsplugin/audit/etcd_client.h"

namespace kmsplugin::audit {

struct ScanOptions {
  std::string prefix;
  int64_t page_size = 500;
  int64_t revision = 0;  // 0: the newest; otherwise read at this revision (as an earlier prefix was)
};

struct ScanResult {
  int64_t revision = 0;  // the revision every page was read at
  uint64_t keys = 0;
  uint64_t pages = 0;
};

using Visitor = std::function<void(std::string_view key, std::string_view value)>;

// OUT_OF_RANGE (naming the revision and the fix) when etcd compacted the snapshot revision mid-scan.
absl::StatusOr<ScanResult> ScanPrefix(EtcdClient& client, const ScanOptions& options, const Visitor& visit);

}  // namespace kmsplugin::audit
