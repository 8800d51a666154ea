#pragma once

// The PKCS#11 source's view of its versions, and how refusals name them. Pure functions, no token calls, no
// locks (the source holds its own).
//
// A view entry is a core::KeyVersion plus what the token says about its object. Every replacement of the view
// goes through AdvanceView, that is core::CheckAdvance (version_rules.h): no decrypting version dropped, no
// identity change, current never moves back, vanished retired versions stay listed as retired.

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kmsplugin/core/key_source.h"
#include "kmsplugin/core/version_rules.h"

namespace kmsplugin::keysource::pkcs11 {

struct ViewEntry {
  core::KeyVersion version;
  std::string label;
  bool modifiable = false;  // CKA_MODIFIABLE: false for versions made before retirement existed
  bool present = true;      // false: no longer on the token (destroyed elsewhere), kept as retired
};

// Sorts `entries` (by version, then creation) and gives each its key_id ("pkcs11:<serial>/<label>@<created>")
// and state. On entry a state says what the token marks: kRetired (CKA_DECRYPT false), kStaged (CKA_ENCRYPT false,
// CKA_DECRYPT true), anything else (both true). The newest version not marked staged is current unless it is
// retired (then none is: only other tools can retire the newest); marked-staged versions newer than it stay staged,
// older ones are active (a promote interrupted halfway); every other version not retired is active.
void FinishEntries(std::vector<ViewEntry>& entries, std::string_view token_serial);

// Replaces `*view` by `fresh` (finished with FinishEntries) through core::CheckAdvance; `what` names the token.
// Versions of the view missing from `fresh` were destroyed (the caller made sure other keys are visible): they
// no longer decrypt, so they count as retired (reported in change.retired) and stay listed as such, unless one
// is the current version (refused: the key_id would move back). A refusal leaves `*view` as it was.
absl::StatusOr<core::VersionChange> AdvanceView(std::vector<ViewEntry>* view, std::vector<ViewEntry> fresh,
                                                std::string_view what);

std::vector<core::KeyVersion> VersionsOf(const std::vector<ViewEntry>& view);
const ViewEntry* FindEntry(const std::vector<ViewEntry>& view, std::string_view key_ref);

// "1, 2" (or "none").
std::string NumberList(const std::vector<core::KeyVersion>& versions);

// Why a version created with CKA_MODIFIABLE false cannot be retired, with the pkcs11-tool command that removes
// it (the CKA_ID in hex is needed there).
std::string NotModifiableMessage(const ViewEntry& entry, std::string_view module_path, std::string_view token_name,
                                 std::string_view token_said);

// `status` plus which versions a Retire/Reinstate/DestroyRetired changed before it failed, and the fix.
absl::Status PartialFailure(const absl::Status& status, std::string_view verb,
                            const std::vector<core::KeyVersion>& done);

}  // namespace kmsplugin::keysource::pkcs11
