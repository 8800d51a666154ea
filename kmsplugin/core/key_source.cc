#include "kmsplugin/core/key_source.h"

#include "absl/strings/str_cat.h"
#include "kmsplugin/core/sv.h"

namespace kmsplugin::core {

std::string_view KeyStateName(KeyState state) {
  switch (state) {
    case KeyState::kCurrent:
      return "current";
    case KeyState::kActive:
      return "active";
    case KeyState::kRetired:
      return "retired";
  }
  return "unknown";
}

namespace {

absl::StatusOr<const KeyVersion*> FindVersion(const std::vector<KeyVersion>& versions, uint64_t version) {
  for (const KeyVersion& v : versions) {
    if (v.version == version) {
      return &v;
    }
  }
  std::string known;
  for (const KeyVersion& v : versions) {
    absl::StrAppend(&known, known.empty() ? "" : ", ", v.version);
  }
  return absl::NotFoundError(absl::StrCat("there is no key version ", version, " (versions: ", known, ")"));
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
    return absl::FailedPreconditionError(absl::StrCat("key version ", version, " is not retired (it is ",
                                                      Sv(KeyStateName((*target)->state)), ")"));
  }
  std::vector<KeyVersion> changed;
  for (const KeyVersion& v : versions) {
    if (v.version >= version && v.state == KeyState::kRetired) {
      changed.push_back(v);
    }
  }
  return changed;
}

absl::StatusOr<std::vector<KeyVersion>> KeySource::DestroyRetired(uint64_t /*version*/, absl::Time /*deadline*/) {
  return absl::UnimplementedError(absl::StrCat(
      "the ", crypto::KeySourceKindName(Kind()),
      " key source has no destroy step: a retired version stays recoverable with `kmsplugin retire --reinstate`"));
}

}  // namespace kmsplugin::core
