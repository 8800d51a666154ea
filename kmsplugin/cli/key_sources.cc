#include "kmsplugin/cli/key_sources.h"

#include "kmsplugin/keysource/local/local_spec.h"

namespace kmsplugin::cli {

config::KeySourceParsers BuiltInKeySources() {
  return {
      {"local", keysource::local::ParseSpec},
  };
}

}  // namespace kmsplugin::cli
