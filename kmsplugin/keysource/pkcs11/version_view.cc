#include "kmsplugin/keysource/pkcs11/version_view.h"

#include <algorithm>
#include <tuple>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/time.h"
#include "kmsplugin/core/sv.h"

namespace kmsplugin::keysource::pkcs11 {

void FinishEntries(std::vector<ViewEntry>& entries, std::string_view token_serial) {
  std::sort(entries.begin(), entries.end(), [](const ViewEntry& a, const ViewEntry& b) {
    return std::tie(a.version.version, a.version.created) < std::tie(b.version.version, b.version.created);
  });
  // The newest version that may encrypt (not marked staged); staged versions below it are active (a promote that
  // stopped before it set CKA_ENCRYPT on every older staged version).
  size_t newest_encrypting = entries.size();
  for (size_t i = 0; i < entries.size(); ++i) {
    if (entries[i].version.state != core::KeyState::kStaged) {
      newest_encrypting = i;
    }
  }
  for (size_t i = 0; i < entries.size(); ++i) {
    core::KeyVersion& v = entries[i].version;
    v.key_id = absl::StrCat("pkcs11:", Sv(token_serial), "/", entries[i].label, "@",
                            absl::FormatTime("%Y-%m-%dT%H:%M:%E6SZ", v.created, absl::UTCTimeZone()));
    if (v.state == core::KeyState::kRetired) {
      continue;
    }
    if (v.state == core::KeyState::kStaged && (newest_encrypting == entries.size() || i > newest_encrypting)) {
      continue;
    }
    v.state = i == newest_encrypting ? core::KeyState::kCurrent : core::KeyState::kActive;
  }
}

absl::StatusOr<core::VersionChange> AdvanceView(std::vector<ViewEntry>* view, std::vector<ViewEntry> fresh,
                                                std::string_view what) {
  const std::vector<core::KeyVersion> fresh_versions = VersionsOf(fresh);
  std::vector<core::KeyVersion> old = VersionsOf(*view);
  std::vector<uint64_t> destroyed;
  for (core::KeyVersion& v : old) {
    const bool listed = std::any_of(fresh.begin(), fresh.end(),
                                    [&](const ViewEntry& e) { return e.version.version == v.version; });
    if (!listed && v.state == core::KeyState::kActive) {
      v.state = core::KeyState::kRetired;
      destroyed.push_back(v.version);
    }
  }
  auto advanced = core::CheckAdvance(old, fresh_versions, what);
  if (!advanced.ok()) {
    return advanced.status();
  }
  std::vector<ViewEntry> next;
  for (const core::KeyVersion& v : advanced->versions) {
    if (const ViewEntry* now = FindEntry(fresh, v.key_ref); now != nullptr) {
      next.push_back(*now);
      continue;
    }
    const ViewEntry* was = FindEntry(*view, v.key_ref);
    ViewEntry kept = was != nullptr ? *was : ViewEntry{};
    kept.version = v;
    kept.version.state = core::KeyState::kRetired;
    kept.present = false;
    next.push_back(std::move(kept));
  }
  *view = std::move(next);
  core::VersionChange change = std::move(advanced->change);
  change.retired.insert(change.retired.end(), destroyed.begin(), destroyed.end());
  std::sort(change.retired.begin(), change.retired.end());
  return change;
}

std::vector<core::KeyVersion> VersionsOf(const std::vector<ViewEntry>& view) {
  std::vector<core::KeyVersion> out;
  for (const ViewEntry& entry : view) {
    out.push_back(entry.version);
  }
  return out;
}

const ViewEntry* FindEntry(const std::vector<ViewEntry>& view, std::string_view key_ref) {
  for (const ViewEntry& entry : view) {
    if (entry.version.key_ref == key_ref) {
      return &entry;
    }
  }
  return nullptr;
}

std::string NumberList(const std::vector<core::KeyVersion>& versions) {
  std::vector<std::string> numbers;
  for (const core::KeyVersion& v : versions) {
    numbers.push_back(absl::StrCat(v.version));
  }
  return numbers.empty() ? "none" : absl::StrJoin(numbers, ", ");
}

std::string NotModifiableMessage(const ViewEntry& entry, std::string_view module_path, std::string_view token_name,
                                 std::string_view token_said) {
  const std::string id = absl::BytesToHexString(entry.version.key_ref);
  return absl::StrCat(
      "pkcs11 key version ", entry.version.version, " (", entry.label,
      ") cannot be retired: it was created with CKA_MODIFIABLE=false (by a kmsplugin from before retirement "
      "existed), and the token refuses every change to such an object, C_CopyObject included",
      Sv(token_said),
      "; nothing was changed. Retiring is a floor, so while this version is on the token no version at or above it "
      "can be retired; fix: once the audit finds no Secret under it, delete it for good with the token's tools (e.g. "
      "pkcs11-tool --module ",
      Sv(module_path), " --login --delete-object --type secrkey --id ", id, " on the ", Sv(token_name),
      "); versions created by `kmsplugin rotate` from now on are modifiable and can be retired (and reinstated)");
}

absl::Status PartialFailure(const absl::Status& status, std::string_view verb,
                            const std::vector<core::KeyVersion>& done) {
  return absl::Status(status.code(),
                      absl::StrCat(status.message(), "; ", Sv(verb), " before the failure: ", NumberList(done),
                                   "; fix: run the same command again once the cause is fixed"));
}

}  // namespace kmsplugin::keysource::pkcs11
