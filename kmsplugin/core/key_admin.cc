#include "kmsplugin/core/key_admin.h"

#include "absl/strings/str_cat.h"

namespace kmsplugin::core {

absl::StatusOr<std::vector<KeyVersion>> KeyAdmin::DestroyRetired(uint64_t /*version*/, absl::Time /*deadline*/) {
  return absl::UnimplementedError(absl::StrCat(
      "this key source has no destroy step: a retired version stays recoverable with `kmsplugin retire --reinstate`"));
}

absl::StatusOr<KeyVersion> KeyAdmin::Stage(absl::Time /*deadline*/) {
  return absl::UnimplementedError("this key source cannot stage a key version; use `kmsplugin rotate`");
}

absl::StatusOr<KeyVersion> KeyAdmin::Promote(absl::Time /*deadline*/) {
  return absl::UnimplementedError("this key source has no staged key versions to promote");
}

}  // namespace kmsplugin::core
