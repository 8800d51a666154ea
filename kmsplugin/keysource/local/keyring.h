#pragma once

// Keyring: the local key source's file of KEK versions, sealed under a root key.
//
// The file is JSON, so an operator can see which versions exist without any secret:
//   {
//     "format": "kmsplugin-keyring-v1",
//     "keyringId": "<16 hex digits>",            random at init; part of every key_id and key reference
//     "rootKey": {"kind": "file"}                 or {"kind": "passphrase", "kdf": "argon2id13",
//                                                     "salt": b64, "opsLimit": n, "memLimit": n}
//     "rootKeyCheck": b64(16 bytes),              HKDF(root, keyringId, "kmsplugin/local/check/v1"):
//                                                 tells a wrong root key apart from a corrupt file
//     "versions": [{"version": 1, "created": unix seconds, "keyId": "...", "state": "current|active|staged|retired",
//                   "sealed": b64(XChaCha20-Poly1305 nonce ‖ ct ‖ tag of the 32-byte KEK)}],
//     "mac": b64(HMAC-SHA256 over the canonical JSON of everything else)
//   }
// Sealing key and MAC key are HKDF-SHA256(root key, salt = keyringId) with their own labels. Each sealed KEK
// binds keyringId, version, creation time and key_id as associated data, and the MAC covers states and order,
// so an edited file is refused rather than half-trusted.
//
// Files are written atomically (temp file in the same directory, fsync, rename, fsync of the directory) with
// mode 0600, so a crash leaves the old or the new keyring, never a broken one.

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "crypto/random.h"
#include "crypto/secret_bytes.h"
#include "kmsplugin/core/key_source.h"
#include "kmsplugin/keysource/common/atomic_file.h"

namespace kmsplugin::keysource::local {

// Hard caps on the Argon2id parameters a passphrase keyring may name, checked before derivation. kmsplugin writes
// opsLimit 3 (MODERATE) and memLimit 64 MiB; the caps leave room for stronger settings while bounding a
// derivation to seconds and 256 MiB.
inline constexpr uint64_t kMaxArgon2OpsLimit = 10;
inline constexpr uint64_t kMaxArgon2MemLimit = uint64_t{256} << 20;

inline constexpr size_t kRootKeySize = 32;
inline constexpr size_t kKekSize = 32;
inline constexpr size_t kKeyringIdSize = 8;
inline constexpr size_t kMinPassphraseSize = 12;

// How the root key is obtained; the passphrase parameters are stored in the keyring.
struct RootKeyParams {
  enum class Kind { kFile, kPassphrase } kind = Kind::kFile;
  std::string salt;  // raw bytes, passphrase only
  uint64_t ops_limit = 0;
  uint64_t mem_limit = 0;
};

struct KeyringVersion {
  core::KeyVersion info;   // version, key_id, key_ref, created, state
  crypto::SecretBytes kek;
};

struct Keyring {
  std::string keyring_id;  // raw kKeyringIdSize bytes
  RootKeyParams root_params;
  std::vector<KeyringVersion> versions;  // ascending by version; exactly one is current

  const KeyringVersion* Current() const;
};

// Reads a root key file: exactly 32 raw bytes, mode 0600 or stricter.
absl::StatusOr<crypto::SecretBytes> ReadRootKeyFile(const std::string& path);
// Reads a passphrase file (trailing newline dropped), mode 0600 or stricter, at least kMinPassphraseSize bytes.
absl::StatusOr<crypto::SecretBytes> ReadPassphraseFile(const std::string& path);
// Argon2id13 (libsodium crypto_pwhash) of `passphrase` with the keyring's salt and limits.
absl::StatusOr<crypto::SecretBytes> DeriveRootKey(const crypto::SecretBytes& passphrase, const RootKeyParams& params);
// Fresh passphrase parameters: a random salt, OPSLIMIT_MODERATE, 64 MiB.
RootKeyParams NewPassphraseParams(crypto::Random& random);

// The key_id and key reference of a version (public, never reused: keyringId + version + creation time).
std::string MakeKeyId(const std::string& keyring_id, uint64_t version, absl::Time created);
std::string MakeKeyRef(const std::string& keyring_id, uint64_t version);

// Parses and opens a keyring's bytes with `root_key`; `path` only names the file in errors.
absl::StatusOr<Keyring> OpenKeyring(const std::string& bytes, const crypto::SecretBytes& root_key,
                                    const std::string& path);
// Reads the passphrase parameters a keyring file was made with, without opening it.
absl::StatusOr<RootKeyParams> ReadRootKeyParams(const std::string& bytes, const std::string& path);
// Serialises and seals `keyring` under `root_key`.
absl::StatusOr<std::string> SealKeyring(const Keyring& keyring, const crypto::SecretBytes& root_key,
                                        crypto::Random& random);

// A new keyring with version 1 current.
Keyring NewKeyring(const RootKeyParams& params, absl::Time now, crypto::Random& random);
// Appends version max+1 as current (the former current becomes active) or, with `state` kStaged, as staged (the
// current version stays). Returns the new version.
const KeyringVersion& AppendVersion(Keyring& keyring, absl::Time now, crypto::Random& random,
                                    core::KeyState state = core::KeyState::kCurrent);

// Files are read and written through keysource/common/atomic_file.h (ReadFile, WriteFileAtomically).

}  // namespace kmsplugin::keysource::local
