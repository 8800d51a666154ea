#include "kmsplugin/keysource/local/keyring.h"

#include <fcntl.h>
#include <sodium.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>

#include <nlohmann/json.hpp>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "kmsplugin/core/sv.h"
#include "crypto/hkdf.h"
#include "crypto/xchacha20_poly1305_aead.h"
#include "kmsplugin/config/file_checks.h"
#include "kmsplugin/config/input_limits.h"
#include "kmsplugin/keysource/common/secret_file.h"

namespace kmsplugin::keysource::local {
namespace {

using json = nlohmann::json;

constexpr char kFormat[] = "kmsplugin-keyring-v1";
constexpr char kSealLabel[] = "kmsplugin/local/seal/v1";
constexpr char kMacLabel[] = "kmsplugin/local/mac/v1";
constexpr char kCheckLabel[] = "kmsplugin/local/check/v1";
constexpr size_t kCheckSize = 16;
constexpr size_t kSaltSize = crypto_pwhash_SALTBYTES;

std::string Base64(std::string_view bytes) { return absl::Base64Escape(Sv(bytes)); }

absl::StatusOr<crypto::SecretBytes> DeriveFromRoot(const crypto::SecretBytes& root_key,
                                                   const std::string& keyring_id, std::string_view label,
                                                   size_t size) {
  return crypto::HkdfSha256(root_key.view(), keyring_id, label, size);
}

std::string SealAad(const std::string& keyring_id, uint64_t version, int64_t created, const std::string& key_id) {
  const absl::string_view nul("\0", 1);
  return absl::StrCat("kmsplugin/local/kek/v1", nul, keyring_id, nul, version, nul, created, nul, key_id);
}

std::string_view StateName(core::KeyState state) { return core::KeyStateName(state); }

absl::StatusOr<core::KeyState> ParseState(const std::string& name) {
  if (name == "current") {
    return core::KeyState::kCurrent;
  }
  if (name == "active") {
    return core::KeyState::kActive;
  }
  if (name == "retired") {
    return core::KeyState::kRetired;
  }
  if (name == "staged") {
    return core::KeyState::kStaged;
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown key state \"", name, "\""));
}

absl::Status Corrupt(const std::string& path, std::string_view what) {
  return absl::DataLossError(absl::StrCat("keyring ", path, " is corrupt or truncated (", Sv(what),
                                          "); fix: restore it from a backup"));
}

json RootParamsToJson(const RootKeyParams& params) {
  if (params.kind == RootKeyParams::Kind::kFile) {
    return json{{"kind", "file"}};
  }
  return json{{"kind", "passphrase"},
              {"kdf", "argon2id13"},
              {"salt", Base64(params.salt)},
              {"opsLimit", params.ops_limit},
              {"memLimit", params.mem_limit}};
}

absl::StatusOr<json> ParseJson(const std::string& bytes, const std::string& path) {
  // Before the parser: the MAC check serialises the document, and serialising recurses once per level.
  if (auto nesting = config::CheckJsonNesting(bytes, absl::StrCat("keyring ", path)); !nesting.ok()) {
    return Corrupt(path, std::string(nesting.message()));
  }
  json doc = json::parse(bytes, nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded() || !doc.is_object()) {
    return Corrupt(path, "not a JSON object");
  }
  if (!doc.contains("format") || !doc["format"].is_string() || doc["format"].get<std::string>() != kFormat) {
    return Corrupt(path, absl::StrCat("no \"format\": \"", kFormat, "\""));
  }
  return doc;
}

absl::StatusOr<std::string> DecodeBase64Field(const json& object, const char* field, const std::string& path) {
  std::string raw;
  if (!object.contains(field) || !object[field].is_string() ||
      !absl::Base64Unescape(object[field].get<std::string>(), &raw)) {
    return Corrupt(path, absl::StrCat("field \"", field, "\" is missing or not base64"));
  }
  return raw;
}

absl::StatusOr<RootKeyParams> ParseRootParams(const json& doc, const std::string& path) {
  RootKeyParams params;
  if (!doc.contains("rootKey") || !doc["rootKey"].is_object() || !doc["rootKey"].contains("kind")) {
    return Corrupt(path, "field \"rootKey\" is missing");
  }
  const json& root = doc["rootKey"];
  const std::string kind = root["kind"].is_string() ? root["kind"].get<std::string>() : "";
  if (kind == "file") {
    return params;
  }
  if (kind != "passphrase") {
    return Corrupt(path, "field \"rootKey.kind\" is neither file nor passphrase");
  }
  params.kind = RootKeyParams::Kind::kPassphrase;
  auto salt = DecodeBase64Field(root, "salt", path);
  if (!salt.ok()) {
    return salt.status();
  }
  if (salt->size() != kSaltSize || !root.contains("opsLimit") || !root["opsLimit"].is_number_unsigned() ||
      !root.contains("memLimit") || !root["memLimit"].is_number_unsigned()) {
    return Corrupt(path, "passphrase parameters are incomplete");
  }
  params.salt = *salt;
  params.ops_limit = root["opsLimit"].get<uint64_t>();
  params.mem_limit = root["memLimit"].get<uint64_t>();
  // Checked before any derivation: the parameters are read from the file before it can be authenticated (the MAC
  // key comes from the passphrase they stretch), so a forged opsLimit of 2^32-1 would otherwise burn CPU for ever.
  if (params.ops_limit < crypto_pwhash_OPSLIMIT_MIN || params.ops_limit > kMaxArgon2OpsLimit ||
      params.mem_limit < crypto_pwhash_MEMLIMIT_MIN || params.mem_limit > kMaxArgon2MemLimit) {
    return Corrupt(path, absl::StrCat("passphrase parameters out of range: opsLimit ", params.ops_limit,
                                      " (allowed ", crypto_pwhash_OPSLIMIT_MIN, "..", kMaxArgon2OpsLimit,
                                      "), memLimit ", params.mem_limit, " (allowed ", crypto_pwhash_MEMLIMIT_MIN,
                                      "..", kMaxArgon2MemLimit, ")"));
  }
  return params;
}

}  // namespace

const KeyringVersion* Keyring::Current() const {
  for (const KeyringVersion& v : versions) {
    if (v.info.state == core::KeyState::kCurrent) {
      return &v;
    }
  }
  return nullptr;
}

absl::StatusOr<crypto::SecretBytes> ReadRootKeyFile(const std::string& path) {
  SecretFileOptions options;
  options.max_bytes = 4096;
  options.trim_newlines = false;  // 32 raw random bytes: a trailing 0x0a is key material
  options.allow_empty = true;     // refused below with the size rule
  auto file = ReadSecretFile(path, "root key file", options);
  if (!file.ok()) {
    return file.status();
  }
  crypto::SecretBytes key = std::move(file->bytes);
  const size_t size = key.size();
  if (size != kRootKeySize) {
    return absl::FailedPreconditionError(absl::StrCat("root key file ", path, " holds ", size,
                                                      " bytes; it must hold exactly ", kRootKeySize,
                                                      " random bytes; fix: restore the right file from a backup"));
  }
  return key;
}

absl::StatusOr<crypto::SecretBytes> ReadPassphraseFile(const std::string& path) {
  SecretFileOptions options;
  options.max_bytes = 4096;
  options.allow_empty = true;  // refused below with the length rule
  auto file = ReadSecretFile(path, "passphrase file", options);
  if (!file.ok()) {
    return file.status();
  }
  crypto::SecretBytes passphrase = std::move(file->bytes);
  const size_t size = passphrase.size();
  if (size < kMinPassphraseSize) {
    return absl::FailedPreconditionError(absl::StrCat("passphrase in ", path, " is shorter than ",
                                                      kMinPassphraseSize,
                                                      " characters; fix: use a longer passphrase"));
  }
  return passphrase;
}

RootKeyParams NewPassphraseParams(crypto::Random& random) {
  RootKeyParams params;
  params.kind = RootKeyParams::Kind::kPassphrase;
  params.salt.resize(kSaltSize);
  random.Fill(absl::MakeSpan(reinterpret_cast<uint8_t*>(params.salt.data()), params.salt.size()));
  params.ops_limit = crypto_pwhash_OPSLIMIT_MODERATE;
  params.mem_limit = uint64_t{64} << 20;
  return params;
}

absl::StatusOr<crypto::SecretBytes> DeriveRootKey(const crypto::SecretBytes& passphrase,
                                                  const RootKeyParams& params) {
  crypto::EnsureSodiumInitialised();
  crypto::SecretBytes key(kRootKeySize);
  if (crypto_pwhash(key.data(), key.size(), reinterpret_cast<const char*>(passphrase.data()), passphrase.size(),
                    reinterpret_cast<const unsigned char*>(params.salt.data()), params.ops_limit,
                    static_cast<size_t>(params.mem_limit), crypto_pwhash_ALG_ARGON2ID13) != 0) {
    return absl::ResourceExhaustedError(absl::StrCat("Argon2id needs ", params.mem_limit >> 20,
                                                     " MiB of memory and could not get it"));
  }
  return key;
}

std::string MakeKeyId(const std::string& keyring_id, uint64_t version, absl::Time created) {
  return absl::StrCat("local:", absl::BytesToHexString(keyring_id), ":v", version, ":",
                      absl::ToUnixSeconds(created));
}

std::string MakeKeyRef(const std::string& keyring_id, uint64_t version) {
  std::string ref = keyring_id;
  for (int shift = 24; shift >= 0; shift -= 8) {
    ref.push_back(static_cast<char>((version >> shift) & 0xff));
  }
  return ref;
}

absl::StatusOr<RootKeyParams> ReadRootKeyParams(const std::string& bytes, const std::string& path) {
  auto doc = ParseJson(bytes, path);
  if (!doc.ok()) {
    return doc.status();
  }
  return ParseRootParams(*doc, path);
}

absl::StatusOr<Keyring> OpenKeyring(const std::string& bytes, const crypto::SecretBytes& root_key,
                                    const std::string& path) {
  auto parsed = ParseJson(bytes, path);
  if (!parsed.ok()) {
    return parsed.status();
  }
  json doc = std::move(*parsed);
  Keyring keyring;
  auto id = [&]() -> absl::StatusOr<std::string> {
    const std::string hex = doc.contains("keyringId") && doc["keyringId"].is_string()
                                ? doc["keyringId"].get<std::string>()
                                : std::string();
    const bool well_formed = hex.size() == 2 * kKeyringIdSize &&
                             std::all_of(hex.begin(), hex.end(), [](char c) { return absl::ascii_isxdigit(c); });
    if (!well_formed) {
      return Corrupt(path, "field \"keyringId\" is missing or malformed");
    }
    return absl::HexStringToBytes(hex);
  }();
  if (!id.ok()) {
    return id.status();
  }
  keyring.keyring_id = *id;
  auto params = ParseRootParams(doc, path);
  if (!params.ok()) {
    return params.status();
  }
  keyring.root_params = *params;

  // A wrong root key is told apart from a damaged file before anything else is trusted.
  auto stored_check = DecodeBase64Field(doc, "rootKeyCheck", path);
  if (!stored_check.ok()) {
    return stored_check.status();
  }
  auto check = DeriveFromRoot(root_key, keyring.keyring_id, kCheckLabel, kCheckSize);
  if (!check.ok()) {
    return check.status();
  }
  if (stored_check->size() != kCheckSize || sodium_memcmp(stored_check->data(), check->data(), kCheckSize) != 0) {
    return absl::PermissionDeniedError(absl::StrCat(
        "keyring ", path, " was not sealed with this root key: wrong passphrase or root key file; fix: use the "
        "passphrase or root key file the keyring was created with"));
  }
  auto stored_mac = DecodeBase64Field(doc, "mac", path);
  if (!stored_mac.ok()) {
    return stored_mac.status();
  }
  doc.erase("mac");
  const std::string canonical = doc.dump();
  auto mac_key = DeriveFromRoot(root_key, keyring.keyring_id, kMacLabel, crypto_auth_hmacsha256_KEYBYTES);
  if (!mac_key.ok()) {
    return mac_key.status();
  }
  if (stored_mac->size() != crypto_auth_hmacsha256_BYTES ||
      crypto_auth_hmacsha256_verify(reinterpret_cast<const unsigned char*>(stored_mac->data()),
                                    reinterpret_cast<const unsigned char*>(canonical.data()), canonical.size(),
                                    mac_key->data()) != 0) {
    return absl::DataLossError(absl::StrCat("keyring ", path,
                                            " failed its integrity check: it was modified or damaged; fix: "
                                            "restore it from a backup"));
  }

  auto seal_key = DeriveFromRoot(root_key, keyring.keyring_id, kSealLabel, crypto::XChaCha20Poly1305Aead::kKeySize);
  if (!seal_key.ok()) {
    return seal_key.status();
  }
  auto aead = crypto::XChaCha20Poly1305Aead::New(*seal_key, crypto::SystemRandom());
  if (!aead.ok()) {
    return aead.status();
  }
  if (!doc.contains("versions") || !doc["versions"].is_array() || doc["versions"].empty()) {
    return Corrupt(path, "no key versions");
  }
  int current = 0;
  uint64_t previous = 0;
  for (const json& entry : doc["versions"]) {
    if (!entry.is_object() || !entry.contains("version") || !entry["version"].is_number_unsigned() ||
        !entry.contains("created") || !entry["created"].is_number_integer() || !entry.contains("keyId") ||
        !entry["keyId"].is_string() || !entry.contains("state") || !entry["state"].is_string()) {
      return Corrupt(path, "a key version entry is incomplete");
    }
    KeyringVersion v;
    v.info.version = entry["version"].get<uint64_t>();
    const int64_t created = entry["created"].get<int64_t>();
    v.info.created = absl::FromUnixSeconds(created);
    v.info.key_id = entry["keyId"].get<std::string>();
    v.info.key_ref = MakeKeyRef(keyring.keyring_id, v.info.version);
    auto state = ParseState(entry["state"].get<std::string>());
    if (!state.ok()) {
      return Corrupt(path, std::string(state.status().message()));
    }
    v.info.state = *state;
    if (v.info.version <= previous || v.info.version > 0xffffffffu) {
      return Corrupt(path, "key versions are not in ascending order");
    }
    previous = v.info.version;
    current += v.info.state == core::KeyState::kCurrent ? 1 : 0;
    auto sealed = DecodeBase64Field(entry, "sealed", path);
    if (!sealed.ok()) {
      return sealed.status();
    }
    auto kek = (*aead)->Decrypt(*sealed, SealAad(keyring.keyring_id, v.info.version, created, v.info.key_id));
    if (!kek.ok() || kek->size() != kKekSize) {
      return absl::DataLossError(absl::StrCat("keyring ", path, ": key version ", v.info.version,
                                              " does not unseal; fix: restore the keyring from a backup"));
    }
    v.kek = std::move(*kek);
    keyring.versions.push_back(std::move(v));
  }
  if (current != 1) {
    return Corrupt(path, absl::StrCat(current, " versions are marked current; exactly one must be"));
  }
  return keyring;
}

absl::StatusOr<std::string> SealKeyring(const Keyring& keyring, const crypto::SecretBytes& root_key,
                                        crypto::Random& random) {
  auto seal_key = DeriveFromRoot(root_key, keyring.keyring_id, kSealLabel, crypto::XChaCha20Poly1305Aead::kKeySize);
  auto mac_key = DeriveFromRoot(root_key, keyring.keyring_id, kMacLabel, crypto_auth_hmacsha256_KEYBYTES);
  auto check = DeriveFromRoot(root_key, keyring.keyring_id, kCheckLabel, kCheckSize);
  if (!seal_key.ok() || !mac_key.ok() || !check.ok()) {
    return absl::InternalError("cannot derive the keyring's sealing keys");
  }
  auto aead = crypto::XChaCha20Poly1305Aead::New(*seal_key, random);
  if (!aead.ok()) {
    return aead.status();
  }
  json versions = json::array();
  for (const KeyringVersion& v : keyring.versions) {
    const int64_t created = absl::ToUnixSeconds(v.info.created);
    auto sealed = (*aead)->Encrypt(v.kek.view(), SealAad(keyring.keyring_id, v.info.version, created, v.info.key_id));
    if (!sealed.ok()) {
      return sealed.status();
    }
    versions.push_back(json{{"version", v.info.version},
                            {"created", created},
                            {"keyId", v.info.key_id},
                            {"state", StateName(v.info.state)},
                            {"sealed", Base64(*sealed)}});
  }
  json doc{{"format", kFormat},
           {"keyringId", absl::BytesToHexString(keyring.keyring_id)},
           {"rootKey", RootParamsToJson(keyring.root_params)},
           {"rootKeyCheck", Base64(check->view())},
           {"versions", std::move(versions)}};
  const std::string canonical = doc.dump();
  unsigned char mac[crypto_auth_hmacsha256_BYTES];
  crypto_auth_hmacsha256(mac, reinterpret_cast<const unsigned char*>(canonical.data()), canonical.size(),
                         mac_key->data());
  doc["mac"] = Base64(std::string_view(reinterpret_cast<const char*>(mac), sizeof(mac)));
  return doc.dump(2) + "\n";
}

Keyring NewKeyring(const RootKeyParams& params, absl::Time now, crypto::Random& random) {
  Keyring keyring;
  keyring.keyring_id.resize(kKeyringIdSize);
  random.Fill(absl::MakeSpan(reinterpret_cast<uint8_t*>(keyring.keyring_id.data()), kKeyringIdSize));
  keyring.root_params = params;
  AppendVersion(keyring, now, random);
  return keyring;
}

const KeyringVersion& AppendVersion(Keyring& keyring, absl::Time now, crypto::Random& random, core::KeyState state) {
  uint64_t next = 1;
  absl::Time created = absl::FromUnixSeconds(absl::ToUnixSeconds(now));
  for (KeyringVersion& v : keyring.versions) {
    if (state == core::KeyState::kCurrent && v.info.state == core::KeyState::kCurrent) {
      v.info.state = core::KeyState::kActive;
    }
    next = std::max(next, v.info.version + 1);
  }
  // The clock's own time, even when an older version's is later: the version number keeps (version, created)
  // unique, and inheriting a time set by a clock that was ahead (2100) would stamp every later version with it
  // and stall retires for decades (admin/version_times.h).
  KeyringVersion v;
  v.info.version = next;
  v.info.created = created;
  v.info.key_id = MakeKeyId(keyring.keyring_id, next, created);
  v.info.key_ref = MakeKeyRef(keyring.keyring_id, next);
  v.info.state = state;
  v.kek = random.NewSecret(kKekSize);
  keyring.versions.push_back(std::move(v));
  return keyring.versions.back();
}

}  // namespace kmsplugin::keysource::local
