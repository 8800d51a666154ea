#pragma once

// The `keySource.local` section:
//   local:
//     keyring: /var/lib/kmsplugin/dev.keyring      # required
//     rootKeyFile: /etc/kmsplugin/dev.rootkey      # exactly one of rootKeyFile and passphraseFile
//     passphraseFile: /etc/kmsplugin/dev.passphrase

#include <memory>

#include "kmsplugin/config/key_source_spec.h"

namespace kmsplugin::keysource::local {

absl::StatusOr<std::unique_ptr<config::KeySourceSpec>> ParseSpec(const YAML::Node& node,
                                                                 const config::FieldContext& context);

}  // namespace kmsplugin::keysource::local
