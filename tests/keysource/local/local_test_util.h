#pragma once

// Helpers for the local key source tests: a temp directory per test, file writers with a mode, and a LocalSpec
// parsed from YAML so init and open go through the same path as the CLI.

#include <stdlib.h>
#include <sys/stat.h>

#include <filesystem>
#include <fstream>
#include <memory>
#include <string>

#include <catch2/catch.hpp>

#include <yaml-cpp/yaml.h>

#include "crypto/random.h"
#include "kmsplugin/config/field_context.h"
#include "kmsplugin/config/key_source_spec.h"
#include "kmsplugin/keysource/local/local_key_source.h"
#include "kmsplugin/keysource/local/local_spec.h"
#include "tests/support/fake_clock.h"
#include "tests/support/status_matchers.h"

namespace kmsplugin::keysource::local::testing {

// mkdtemp under /tmp; removed with everything in it when the object dies.
class TempDir {
 public:
  TempDir() {
    char templ[] = "/tmp/kms-local-test-XXXXXX";
    const char* made = mkdtemp(templ);
    REQUIRE(made != nullptr);
    dir_ = made;
  }
  ~TempDir() {
    std::error_code error;
    std::filesystem::remove_all(dir_, error);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::string& path() const { return dir_; }
  std::string File(const std::string& name) const { return dir_ + "/" + name; }

 private:
  std::string dir_;
};

inline void WriteFile(const std::string& path, const std::string& bytes, mode_t mode = 0600) {
  {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    REQUIRE(out.good());
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    REQUIRE(out.good());
  }
  REQUIRE(chmod(path.c_str(), mode) == 0);
}

inline std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  REQUIRE(in.good());
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

inline mode_t ModeOf(const std::string& path) {
  struct stat info {};
  REQUIRE(stat(path.c_str(), &info) == 0);
  return info.st_mode & 07777;
}

// One environment's local key material in a temp dir, opened like the CLI does.
struct LocalWorld {
  explicit LocalWorld(const TempDir& dir, std::string name = "dev")
      : keyring(dir.File(name + ".keyring")), root_key(dir.File(name + ".rootkey")) {}

  LocalOptions Options() const {
    LocalOptions options;
    options.keyring = keyring;
    options.root_key_file = root_key;
    return options;
  }

  std::string keyring;
  std::string root_key;
};

inline absl::StatusOr<std::unique_ptr<config::KeySourceSpec>> ParseLocalSpec(const std::string& yaml) {
  const YAML::Node node = YAML::Load(yaml);
  return ParseSpec(node, config::FieldContext("test.yaml", "environments[0].keySource.local"));
}

inline std::unique_ptr<config::KeySourceSpec> MustParseLocalSpec(const LocalOptions& options) {
  std::string yaml = "keyring: " + options.keyring + "\n";
  if (!options.root_key_file.empty()) {
    yaml += "rootKeyFile: " + options.root_key_file + "\n";
  }
  if (!options.passphrase_file.empty()) {
    yaml += "passphraseFile: " + options.passphrase_file + "\n";
  }
  auto spec = ParseLocalSpec(yaml);
  REQUIRE_THAT(spec, kmsplugin::testing::IsOk());
  return std::move(*spec);
}

inline config::OpenContext Context(core::Clock& clock, std::string environment = "dev") {
  config::OpenContext context;
  context.environment = std::move(environment);
  context.clock = &clock;
  context.random = &crypto::SystemRandom();
  return context;
}

// `kmsplugin init` for `options`; REQUIREs success.
inline void MustInit(const LocalOptions& options, core::Clock& clock) {
  auto summary = MustParseLocalSpec(options)->Init(Context(clock));
  REQUIRE_THAT(summary, kmsplugin::testing::IsOk());
}

inline std::shared_ptr<LocalKeySource> MustOpen(const LocalOptions& options, core::Clock& clock,
                                                const std::string& environment = "dev") {
  auto source = LocalKeySource::Open(options, environment, clock, crypto::SystemRandom());
  REQUIRE_THAT(source, kmsplugin::testing::IsOk());
  return *source;
}

}  // namespace kmsplugin::keysource::local::testing
