#include "kmsplugin/keysource/local/local_spec.h"

#include <sys/stat.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "kmsplugin/config/file_checks.h"
#include "kmsplugin/keysource/local/keyring.h"
#include "kmsplugin/keysource/local/local_key_source.h"

namespace kmsplugin::keysource::local {
namespace {

// Creates the parent directory of `path` (mode 0700) if it is missing.
absl::Status EnsureParentDirectory(const std::string& path) {
  const std::filesystem::path parent = std::filesystem::path(path).parent_path();
  if (parent.empty()) {
    return absl::OkStatus();
  }
  std::error_code error;
  if (std::filesystem::exists(parent, error)) {
    return absl::OkStatus();
  }
  std::filesystem::create_directories(parent, error);
  if (error) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot create directory ", parent.string(), ": ", error.message()));
  }
  chmod(parent.c_str(), 0700);
  return absl::OkStatus();
}

class LocalSpec final : public config::KeySourceSpec {
 public:
  explicit LocalSpec(LocalOptions options) : options_(std::move(options)) {}

  std::string_view Kind() const override { return "local"; }

  absl::StatusOr<config::OpenedKeySource> Open(const config::OpenContext& context) const override {
    auto source = LocalKeySource::Open(options_, context.environment, *context.clock, *context.random,
                                       *context.events);
    if (!source.ok()) {
      return source.status();
    }
    return config::MakeOpened(std::move(*source));
  }

  absl::StatusOr<std::string> Init(const config::OpenContext& context) const override {
    // Key material is only ever written where nobody else can replace it (RUNBOOK 1e); then the temporaries a
    // killed init left are removed (one may hold a root key that was never used).
    for (const auto& [path, what] : {std::pair<const std::string*, const char*>{&options_.keyring, "keyring"},
                                     {&options_.root_key_file, "root key file"}}) {
      if (path->empty()) {
        continue;
      }
      if (auto status = EnsureParentDirectory(*path); !status.ok()) {
        return status;
      }
      if (auto status = config::CheckDirectoryOf(*path, what); !status.ok()) {
        return status;
      }
      RemoveStaleTemporaries(*path);
    }
    struct stat info {};
    if (lstat(options_.keyring.c_str(), &info) == 0) {
      return absl::AlreadyExistsError(absl::StrCat("keyring ", options_.keyring,
                                                   " already exists; init never overwrites key material (use "
                                                   "kmsplugin rotate to add a version)"));
    }
    if (auto status = EnsureParentDirectory(options_.keyring); !status.ok()) {
      return status;
    }
    crypto::SecretBytes root_key;
    RootKeyParams params;
    std::string created_root;
    if (!options_.root_key_file.empty()) {
      if (lstat(options_.root_key_file.c_str(), &info) == 0) {
        auto existing = ReadRootKeyFile(options_.root_key_file);  // reuse, never replace
        if (!existing.ok()) {
          return existing.status();
        }
        root_key = std::move(*existing);
      } else {
        if (auto status = EnsureParentDirectory(options_.root_key_file); !status.ok()) {
          return status;
        }
        root_key = context.random->NewSecret(kRootKeySize);
        if (auto status = WriteFileAtomically(options_.root_key_file, std::string(root_key.view()), true);
            !status.ok()) {
          return status;
        }
        created_root = absl::StrCat("root key ", options_.root_key_file, " and ");
      }
    } else {
      auto passphrase = ReadPassphraseFile(options_.passphrase_file);
      if (!passphrase.ok()) {
        return passphrase.status();
      }
      params = NewPassphraseParams(*context.random);
      auto derived = DeriveRootKey(*passphrase, params);
      if (!derived.ok()) {
        return derived.status();
      }
      root_key = std::move(*derived);
    }
    const Keyring keyring = NewKeyring(params, context.clock->Now(), *context.random);
    auto sealed = SealKeyring(keyring, root_key, *context.random);
    if (!sealed.ok()) {
      return sealed.status();
    }
    if (auto status = WriteFileAtomically(options_.keyring, *sealed, /*exclusive=*/true); !status.ok()) {
      return status;
    }
    return absl::StrCat("created ", created_root, "keyring ", options_.keyring, " with key version 1 (",
                        keyring.Current()->info.key_id, ")");
  }

  std::string BackendKeyIdentity() const override {
    std::error_code error;
    const std::filesystem::path canonical = std::filesystem::weakly_canonical(options_.keyring, error);
    return absl::StrCat("local:", error ? options_.keyring : canonical.string());
  }

  // The keyring's directory is written (atomic replace, lock file) by rotate and retire.
  std::vector<config::HostPath> HostPaths() const override {
    std::vector<config::HostPath> paths{{options_.keyring, true}};
    for (const std::string& file : {options_.root_key_file, options_.passphrase_file}) {
      if (!file.empty()) {
        paths.push_back({file, false});
      }
    }
    return paths;
  }

 private:
  const LocalOptions options_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<config::KeySourceSpec>> ParseSpec(const YAML::Node& node,
                                                                 const config::FieldContext& context) {
  if (auto status = context.RejectUnknownKeys(node, {"keyring", "rootKeyFile", "passphraseFile"}); !status.ok()) {
    return status;
  }
  LocalOptions options;
  auto keyring = context.RequiredString(node, "keyring",
                                        "set the keyring file path, e.g. /var/lib/kmsplugin/dev.keyring");
  if (!keyring.ok()) {
    return keyring.status();
  }
  options.keyring = *keyring;
  auto root_key = context.OptionalString(node, "rootKeyFile");
  auto passphrase = context.OptionalString(node, "passphraseFile");
  if (!root_key.ok()) {
    return root_key.status();
  }
  if (!passphrase.ok()) {
    return passphrase.status();
  }
  if (root_key->has_value() == passphrase->has_value()) {
    return context.Error(root_key->has_value() ? "sets both rootKeyFile and passphraseFile"
                                               : "sets neither rootKeyFile nor passphraseFile",
                         "set exactly one: rootKeyFile (32 random bytes, created by kmsplugin init) or "
                         "passphraseFile (stretched with Argon2id)");
  }
  options.root_key_file = root_key->value_or("");
  options.passphrase_file = passphrase->value_or("");
  // Relative paths would depend on the directory each command happens to run in: `serve` and `rotate` could open
  // different keyrings.
  for (const auto& [field, path] : {std::pair<const char*, const std::string*>{"keyring", &options.keyring},
                                    {"rootKeyFile", &options.root_key_file},
                                    {"passphraseFile", &options.passphrase_file}}) {
    if (!path->empty() && (*path)[0] != '/') {
      return context.Child(field).Error(absl::StrCat("\"", *path, "\" is not an absolute path"),
                                        "write the full path, e.g. /var/lib/kmsplugin/dev.keyring");
    }
  }
  return std::unique_ptr<config::KeySourceSpec>(new LocalSpec(std::move(options)));
}

}  // namespace kmsplugin::keysource::local
