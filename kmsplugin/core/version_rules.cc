#include "kmsplugin/core/version_rules.h"

#include <algorithm>
#include <map>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "crypto/digest.h"
#include "kmsplugin/core/sv.h"

namespace kmsplugin::core {
namespace {

std::map<uint64_t, const KeyVersion*> ByNumber(const std::vector<KeyVersion>& versions) {
  std::map<uint64_t, const KeyVersion*> out;
  for (const KeyVersion& v : versions) {
    out[v.version] = &v;
  }
  return out;
}

std::string Numbers(const std::vector<uint64_t>& numbers) { return absl::StrJoin(numbers, ", "); }

absl::StatusOr<const KeyVersion*> FindVersion(const std::vector<KeyVersion>& versions, uint64_t version) {
  for (const KeyVersion& v : versions) {
    if (v.version == version) {
      return &v;
    }
  }
  std::vector<uint64_t> known;
  for (const KeyVersion& v : versions) {
    known.push_back(v.version);
  }
  return absl::NotFoundError(absl::StrCat("there is no key version ", version, " (versions: ", Numbers(known), ")"));
}

}  // namespace

absl::StatusOr<std::vector<KeyVersion>> VersionsToRetire(const std::vector<KeyVersion>& versions, uint64_t version) {
  auto target = FindVersion(versions, version);
  if (!target.ok()) {
    return target.status();
  }
  for (const KeyVersion& v : versions) {
    if (v.state == KeyState::kCurrent && v.version <= version) {
      const std::string what = v.version == version
                                   ? "is the current version"
                                   : absl::StrCat("is newer than the current version ", v.version);
      return absl::FailedPreconditionError(absl::StrCat(
          "key version ", version, " ", what,
          ": new Secrets are encrypted under it; fix: rotate, rewrite every Secret, then retire"));
    }
  }
  std::vector<KeyVersion> changed;
  for (const KeyVersion& v : versions) {
    if (v.version <= version && v.state != KeyState::kRetired) {
      changed.push_back(v);
    }
  }
  return changed;
}

absl::StatusOr<std::vector<KeyVersion>> VersionsToReinstate(const std::vector<KeyVersion>& versions,
                                                            uint64_t version) {
  auto target = FindVersion(versions, version);
  if (!target.ok()) {
    return target.status();
  }
  if ((*target)->state != KeyState::kRetired) {
    return absl::FailedPreconditionError(
        absl::StrCat("key version ", version, " is not retired (it is ", Sv(KeyStateName((*target)->state)), ")"));
  }
  std::vector<KeyVersion> changed;
  for (const KeyVersion& v : versions) {
    if (v.version >= version && v.state == KeyState::kRetired) {
      changed.push_back(v);
    }
  }
  return changed;
}

absl::StatusOr<std::vector<KeyVersion>> VersionsToDestroy(const std::vector<KeyVersion>& versions, uint64_t version) {
  auto target = FindVersion(versions, version);
  if (!target.ok()) {
    return target.status();
  }
  std::vector<KeyVersion> changed;
  for (const KeyVersion& v : versions) {
    if (v.version > version) {
      continue;
    }
    if (v.state != KeyState::kRetired) {
      return absl::FailedPreconditionError(absl::StrCat(
          "key ", DescribeVersion(v),
          " is not retired: destroying it would make every Secret under it unreadable for good; fix: retire it "
          "first (`kmsplugin retire`), check that nothing fails, then destroy"));
    }
    changed.push_back(v);
  }
  return changed;
}

absl::StatusOr<std::vector<KeyVersion>> VersionsToPromote(const std::vector<KeyVersion>& versions) {
  const std::optional<KeyVersion> current = CurrentOf(versions);
  const KeyVersion* newest_staged = nullptr;
  for (const KeyVersion& v : versions) {
    if (v.state == KeyState::kStaged && (newest_staged == nullptr || v.version > newest_staged->version)) {
      newest_staged = &v;
    }
  }
  if (newest_staged == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(
        "no key version is staged", current ? absl::StrCat(" (version ", current->version, " is current)") : "",
        "; fix: stage one first (kmsplugin rotate --stage), copy it to every node, then promote"));
  }
  if (!current.has_value()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "there is no current key version to promote staged version ", newest_staged->version,
        " over; fix: reinstate the newest version first"));
  }
  std::vector<KeyVersion> changed;
  for (const KeyVersion& v : versions) {
    if (v.version == newest_staged->version) {
      changed.push_back(v);
      changed.back().state = KeyState::kCurrent;
    } else if (v.state == KeyState::kCurrent || v.state == KeyState::kStaged) {
      changed.push_back(v);
      changed.back().state = KeyState::kActive;
    }
  }
  return changed;
}

absl::Status CheckStage(const std::vector<KeyVersion>& versions) {
  if (!CurrentOf(versions).has_value()) {
    return absl::FailedPreconditionError(
        "there is no current key version to stage a new one after; fix: run `kmsplugin init` (an empty backend) or "
        "reinstate the newest version");
  }
  return absl::OkStatus();
}

absl::Status CheckRotate(const std::vector<KeyVersion>& versions) {
  std::vector<uint64_t> staged;
  for (const KeyVersion& v : versions) {
    if (v.state == KeyState::kStaged) {
      staged.push_back(v.version);
    }
  }
  if (staged.empty()) {
    return absl::OkStatus();
  }
  return absl::FailedPreconditionError(absl::StrCat(
      "key version", staged.size() > 1 ? "s " : " ", Numbers(staged),
      staged.size() > 1 ? " are" : " is",
      " staged: a plain rotate would make a newer version current before the nodes have it; fix: finish the staged "
      "rotation (copy the keys to every node, then kmsplugin rotate --promote)"));
}

uint64_t NextVersionNumber(const std::vector<KeyVersion>& versions) {
  uint64_t highest = 0;
  for (const KeyVersion& v : versions) {
    highest = std::max(highest, v.version);
  }
  return highest + 1;
}

std::string KeySetFingerprint(const std::vector<KeyVersion>& versions) {
  std::vector<const KeyVersion*> sorted;
  for (const KeyVersion& v : versions) {
    sorted.push_back(&v);
  }
  std::sort(sorted.begin(), sorted.end(),
            [](const KeyVersion* a, const KeyVersion* b) { return a->version < b->version; });
  // Length-prefixed fields, so that no two different sets serialise alike.
  std::string text = "kmsplugin/key-set/v1";
  auto field = [&text](std::string_view value) { absl::StrAppend(&text, "\n", value.size(), ":", Sv(value)); };
  for (const KeyVersion* v : sorted) {
    field(absl::StrCat(v->version));
    field(v->key_id);
    field(v->key_ref);
    field(KeyStateName(v->state));
  }
  return absl::StrCat("ks1-", absl::BytesToHexString(crypto::Sha256(text).substr(0, 8)));
}

std::string VersionChange::Summary() const {
  std::vector<std::string> parts;
  if (current_before != current_after) {
    parts.push_back(absl::StrCat("current ", current_before ? absl::StrCat(*current_before) : "none", " -> ",
                                 current_after ? absl::StrCat(*current_after) : "none"));
  }
  if (!added.empty()) {
    parts.push_back(absl::StrCat("added ", Numbers(added)));
  }
  if (!retired.empty()) {
    parts.push_back(absl::StrCat("retired ", Numbers(retired)));
  }
  if (!reinstated.empty()) {
    parts.push_back(absl::StrCat("reinstated ", Numbers(reinstated)));
  }
  return absl::StrJoin(parts, "; ");
}

std::string DescribeVersion(const KeyVersion& version) {
  return absl::StrCat("version ", version.version, " (", Sv(KeyStateName(version.state)), ")");
}

absl::Status RetiredVersionError(const KeyVersion& version, std::string_view detail) {
  return absl::FailedPreconditionError(absl::StrCat(
      "key version ", version.version, " is retired", detail.empty() ? "" : " (", Sv(detail),
      detail.empty() ? "" : ")",
      " and no longer decrypts; fix: if Secrets still need it, reinstate it (kmsplugin retire --reinstate --version ",
      version.version, ")"));
}

std::optional<KeyVersion> FindVersionNumber(const std::vector<KeyVersion>& versions, uint64_t number) {
  for (const KeyVersion& v : versions) {
    if (v.version == number) {
      return v;
    }
  }
  return std::nullopt;
}

std::optional<KeyVersion> CurrentOf(const std::vector<KeyVersion>& versions) {
  for (const KeyVersion& v : versions) {
    if (v.state == KeyState::kCurrent) {
      return v;
    }
  }
  return std::nullopt;
}

absl::StatusOr<Advanced> CheckAdvance(const std::vector<KeyVersion>& old, const std::vector<KeyVersion>& fresh,
                                      std::string_view what) {
  const auto before = ByNumber(old);
  const auto after = ByNumber(fresh);
  if (after.size() != fresh.size()) {
    return absl::FailedPreconditionError(
        absl::StrCat(Sv(what), " lists the same version number twice; refusing the new view (still serving the "
                               "versions loaded before)"));
  }
  if (std::count_if(fresh.begin(), fresh.end(), [](const KeyVersion& v) { return v.state == KeyState::kCurrent; }) >
      1) {
    return absl::FailedPreconditionError(
        absl::StrCat(Sv(what), " reports more than one current version; refusing the new view"));
  }
  Advanced out;
  VersionChange& change = out.change;
  std::vector<uint64_t> dropped;
  for (const auto& [number, was] : before) {
    auto it = after.find(number);
    if (it == after.end()) {
      if (was->state == KeyState::kRetired) {
        change.kept_retired.push_back(number);  // rule 4: it stays listed, as retired
      } else {
        dropped.push_back(number);
      }
      continue;
    }
    const KeyVersion& now = *it->second;
    if (now.key_ref != was->key_ref || now.key_id != was->key_id) {  // rule 2
      return absl::FailedPreconditionError(absl::StrCat(
          Sv(what), " now has a different key as version ", number, " (key_id ", now.key_id, ", was ", was->key_id,
          "): the key was deleted and re-created; refusing the new view so that ciphertexts under the loaded "
          "version keep their meaning; fix: restore the original key, or restart once nothing uses the old one"));
    }
    if (was->state == KeyState::kRetired && now.state != KeyState::kRetired) {
      change.reinstated.push_back(number);
    } else if (was->state != KeyState::kRetired && now.state == KeyState::kRetired) {
      change.retired.push_back(number);
    }
  }
  if (!dropped.empty()) {  // rule 1
    return absl::FailedPreconditionError(absl::StrCat(
        Sv(what), " no longer lists version", dropped.size() > 1 ? "s " : " ", Numbers(dropped),
        " (not retired: it still decrypts Secrets); the backend is failing or was restored from an older copy; "
        "refusing the new view, still serving the versions loaded before; fix: restore the backend's newer "
        "state (or wait for it to come back)"));
  }
  const std::optional<KeyVersion> current_before = CurrentOf(old);
  const std::optional<KeyVersion> current_after = CurrentOf(fresh);
  if (current_before.has_value()) {  // rule 3
    if (!current_after.has_value()) {
      return absl::FailedPreconditionError(absl::StrCat(
          Sv(what), " has no current version any more (", DescribeVersion(*current_before),
          " was current); refusing the new view, still encrypting under version ", current_before->version,
          "; fix: reinstate the newest version or rotate"));
    }
    if (current_after->version < current_before->version) {
      return absl::FailedPreconditionError(absl::StrCat(
          Sv(what), " moves the current version back from ", current_before->version, " to ",
          current_after->version, " (a lagging replica or an older copy); refusing the new view, the key_id "
          "never moves back"));
    }
  }
  for (const KeyVersion& v : fresh) {  // rule 5
    if (v.state == KeyState::kStaged && (!current_after.has_value() || v.version < current_after->version)) {
      return absl::FailedPreconditionError(absl::StrCat(
          Sv(what), " lists version ", v.version, " as staged although ",
          current_after ? absl::StrCat("version ", current_after->version, " is current")
                        : std::string("no version is current"),
          " (a staged version is newer than the current one); refusing the new view"));
    }
  }
  for (const auto& [number, now] : after) {
    if (before.find(number) == before.end()) {
      change.added.push_back(number);
    }
  }
  if (current_before) {
    change.current_before = current_before->version;
  }
  if (current_after) {
    change.current_after = current_after->version;
  }
  out.versions = fresh;
  for (uint64_t number : change.kept_retired) {
    out.versions.push_back(*before.at(number));
  }
  std::sort(out.versions.begin(), out.versions.end(),
            [](const KeyVersion& a, const KeyVersion& b) { return a.version < b.version; });
  return out;
}

}  // namespace kmsplugin::core
