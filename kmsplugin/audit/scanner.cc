#include "kmsplugin/audit/scanner.h"

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "kmsplugin/core/sv.h"

namespace kmsplugin::audit {

absl::StatusOr<ScanResult> ScanPrefix(EtcdClient& client, const ScanOptions& options, const Visitor& visit) {
  if (options.prefix.empty()) {
    return absl::InvalidArgumentError("empty prefix: it would scan all of etcd");
  }
  if (options.page_size <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("page size must be > 0, got ", options.page_size));
  }
  const std::string range_end = PrefixRangeEnd(options.prefix);
  ScanResult result;
  result.revision = options.revision;
  std::string next = options.prefix;
  while (true) {
    auto page = client.Range(next, range_end, options.page_size, result.revision);
    if (!page.ok()) {
      if (page.status().code() == absl::StatusCode::kOutOfRange ||
          absl::StrContains(page.status().message(), "compacted")) {
        return absl::OutOfRangeError(absl::StrCat("scanning ", options.prefix, " at revision ", result.revision,
                                                  ": ", page.status().message(),
                                                  "; fix: rerun the audit (etcd compacted during the scan)"));
      }
      return absl::Status(page.status().code(),
                          absl::StrCat("scanning ", options.prefix, ": ", page.status().message()));
    }
    if (result.revision == 0) {
      result.revision = page->revision;
    }
    ++result.pages;
    for (const EtcdKeyValue& kv : page->kvs) {
      visit(kv.key, kv.value);
      ++result.keys;
    }
    if (!page->more) {
      break;
    }
    if (page->kvs.empty()) {
      return absl::InternalError(absl::StrCat("etcd said more keys follow ", next, " but returned none"));
    }
    next = page->kvs.back().key;
    next.push_back('\0');
  }
  return result;
}

}  // namespace kmsplugin::audit
