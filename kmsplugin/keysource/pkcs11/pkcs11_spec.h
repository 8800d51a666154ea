#pragma once

// The `keySource.pkcs11` section of an environment:
//
//   keySource:
//     pkcs11:
//       module: /usr/lib/softhsm/libsofthsm2.so   # PKCS#11 library, absolute path (required)
//       tokenLabel: kms                           # exactly one of tokenLabel / tokenSerial
//       # tokenSerial: 2f1a0c...
//       pinFile: /etc/kmsplugin/test.pin          # user PIN, mode 0600 or stricter (required)
//       keyLabel: kmsplugin-test                  # label prefix of the key objects (default kmsplugin-<env>)
//       sessionPoolSize: 9                        # optional, default worker threads + 1
//
// Every error names the file, the field and the fix (FieldContext::Error).

#include <yaml-cpp/yaml.h>

#include <memory>

#include "absl/status/statusor.h"
#include "kmsplugin/config/field_context.h"
#include "kmsplugin/config/key_source_spec.h"

namespace kmsplugin::keysource::pkcs11 {

absl::StatusOr<std::unique_ptr<config::KeySourceSpec>> ParseSpec(const YAML::Node& node,
                                                                 const config::FieldContext& context);

}  // namespace kmsplugin::keysource::pkcs11
