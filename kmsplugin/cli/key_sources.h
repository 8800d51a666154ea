#pragma once

// The key sources this build knows, by their YAML name. Adding a key source is one line in key_sources.cc.

#include "kmsplugin/config/config.h"

namespace kmsplugin::cli {

config::KeySourceParsers BuiltInKeySources();

}  // namespace kmsplugin::cli
