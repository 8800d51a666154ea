// The sealed keyring file: what a damaged, edited, truncated or foreign file does, and the key file checks.

#include "kmsplugin/keysource/local/keyring.h"

#include <openssl/hmac.h>

#include <set>
#include <string>

#include <nlohmann/json.hpp>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "crypto/hkdf.h"
#include "tests/keysource/local/local_test_util.h"

namespace kmsplugin::keysource::local {
namespace {

using ::kmsplugin::keysource::local::testing::LocalWorld;
using ::kmsplugin::keysource::local::testing::MustInit;
using ::kmsplugin::keysource::local::testing::ReadAll;
using ::kmsplugin::keysource::local::testing::TempDir;
using ::kmsplugin::keysource::local::testing::WriteFile;
using ::kmsplugin::testing::FakeClock;
using ::kmsplugin::testing::IsOk;
using ::kmsplugin::testing::StatusIs;
using Code = absl::StatusCode;
using json = nlohmann::json;

struct Sealed {
  TempDir dir;
  LocalWorld world{dir};
  FakeClock clock;
  std::string bytes;
  crypto::SecretBytes root;

  Sealed() {
    MustInit(world.Options(), clock);
    bytes = ReadAll(world.keyring);
    auto key = ReadRootKeyFile(world.root_key);
    REQUIRE_THAT(key, IsOk());
    root = std::move(*key);
  }

  absl::StatusOr<Keyring> Open(const std::string& text) const { return OpenKeyring(text, root, world.keyring); }

  // Re-computes the MAC of an edited document, as someone holding the root key could, so the checks behind the
  // MAC (unsealing, version order, current count) are reached.
  std::string Remac(json doc) const {
    doc.erase("mac");
    const std::string canonical = doc.dump();
    const std::string keyring_id = absl::HexStringToBytes(doc["keyringId"].get<std::string>());
    auto mac_key = crypto::HkdfSha256(root.view(), keyring_id, "kmsplugin/local/mac/v1", 32);
    REQUIRE_THAT(mac_key, IsOk());
    unsigned char mac[EVP_MAX_MD_SIZE];
    unsigned int mac_size = 0;
    HMAC(EVP_sha256(), mac_key->data(), static_cast<int>(mac_key->size()),
         reinterpret_cast<const unsigned char*>(canonical.data()), canonical.size(), mac, &mac_size);
    doc["mac"] = absl::Base64Escape(absl::string_view(reinterpret_cast<const char*>(mac), mac_size));
    return doc.dump(2) + "\n";
  }
};

// Flips one base64 character into another valid one.
char OtherBase64Char(char c) { return c == 'A' ? 'B' : 'A'; }

TEST_CASE("Keyring: a freshly sealed keyring opens with its root key", "[local][keyring]") {
  Sealed s;
  auto keyring = s.Open(s.bytes);
  REQUIRE_THAT(keyring, IsOk());
  REQUIRE(keyring->versions.size() == 1);
  REQUIRE(keyring->Current() != nullptr);
  CHECK(keyring->Current()->info.version == 1);
  CHECK(keyring->Current()->kek.size() == kKekSize);
  CHECK(keyring->keyring_id.size() == kKeyringIdSize);
}

TEST_CASE("Keyring: the file holds no key material in the clear", "[local][keyring]") {
  Sealed s;
  auto keyring = s.Open(s.bytes);
  REQUIRE_THAT(keyring, IsOk());
  const std::string kek(keyring->Current()->kek.view());
  CHECK_FALSE(absl::StrContains(s.bytes, kek));
  CHECK_FALSE(absl::StrContains(s.bytes, absl::Base64Escape(kek)));
  CHECK_FALSE(absl::StrContains(s.bytes, absl::BytesToHexString(kek)));
  CHECK_FALSE(absl::StrContains(s.bytes, std::string(s.root.view())));
  CHECK_FALSE(absl::StrContains(s.bytes, absl::Base64Escape(std::string(s.root.view()))));
}

TEST_CASE("Keyring: every truncation of a real keyring file is refused as DataLoss", "[local][keyring]") {
  Sealed s;
  REQUIRE(s.bytes.back() == '\n');
  // Dropping only the final newline leaves the same JSON document; any shorter prefix is broken.
  for (size_t size = 0; size + 1 < s.bytes.size(); ++size) {
    CAPTURE(size);
    auto keyring = s.Open(s.bytes.substr(0, size));
    REQUIRE_FALSE(keyring.ok());
    CHECK_THAT(keyring, StatusIs(Code::kDataLoss, "truncated"));
  }
}

TEST_CASE("Keyring: a truncated keyring file is refused by LocalKeySource::Open", "[local][keyring]") {
  Sealed s;
  for (size_t size : {size_t{0}, size_t{1}, s.bytes.size() / 2, s.bytes.size() - 2}) {
    CAPTURE(size);
    WriteFile(s.world.keyring, s.bytes.substr(0, size));
    CHECK_THAT(LocalKeySource::Open(s.world.Options(), "dev", s.clock, crypto::SystemRandom()),
               StatusIs(Code::kDataLoss, s.world.keyring));
  }
}

TEST_CASE("Keyring: corrupt JSON is DataLoss naming the file", "[local][keyring]") {
  Sealed s;
  for (const std::string& text : {std::string("not json"), std::string("[]"), std::string("{}"),
                                  std::string("\"kmsplugin-keyring-v1\""), std::string("{\"format\": 1}"),
                                  std::string("{\"format\": \"kmsplugin-keyring-v2\"}"), std::string("\0\0", 2)}) {
    CAPTURE(text);
    CHECK_THAT(s.Open(text), StatusIs(Code::kDataLoss, s.world.keyring));
  }
}

TEST_CASE("Keyring: a malformed keyringId is DataLoss", "[local][keyring]") {
  Sealed s;
  for (const json& id : {json("00"), json("zzzzzzzzzzzzzzzz"), json(12), json(nullptr)}) {
    json doc = json::parse(s.bytes);
    doc["keyringId"] = id;
    CHECK_THAT(s.Open(doc.dump()), StatusIs(Code::kDataLoss, "keyringId"));
  }
}

TEST_CASE("Keyring: a flipped byte in a sealed key is refused", "[local][keyring]") {
  Sealed s;
  json doc = json::parse(s.bytes);
  std::string sealed = doc["versions"][0]["sealed"].get<std::string>();
  sealed[10] = OtherBase64Char(sealed[10]);
  doc["versions"][0]["sealed"] = sealed;
  // Without the root key the edit is caught by the MAC ...
  CHECK_THAT(s.Open(doc.dump(2)), StatusIs(Code::kDataLoss, "integrity"));
  // ... and even with a valid MAC the sealed key does not unseal.
  CHECK_THAT(s.Open(s.Remac(doc)), StatusIs(Code::kDataLoss, "does not unseal"));
}

TEST_CASE("Keyring: a sealed key moved to another version does not unseal", "[local][keyring]") {
  Sealed s;
  auto keyring = s.Open(s.bytes);
  REQUIRE_THAT(keyring, IsOk());
  AppendVersion(*keyring, s.clock.Now(), crypto::SystemRandom());
  auto two = SealKeyring(*keyring, s.root, crypto::SystemRandom());
  REQUIRE_THAT(two, IsOk());
  json doc = json::parse(*two);
  std::swap(doc["versions"][0]["sealed"], doc["versions"][1]["sealed"]);
  CHECK_THAT(s.Open(s.Remac(doc)), StatusIs(Code::kDataLoss, "does not unseal"));
}

TEST_CASE("Keyring: an edited key_id is refused", "[local][keyring]") {
  Sealed s;
  json doc = json::parse(s.bytes);
  doc["versions"][0]["keyId"] = "local:0000000000000000:v1:1";
  CHECK_THAT(s.Open(doc.dump()), StatusIs(Code::kDataLoss, "integrity"));
  CHECK_THAT(s.Open(s.Remac(doc)), StatusIs(Code::kDataLoss, "does not unseal"));
}

TEST_CASE("Keyring: an edited state fails the MAC (DataLoss)", "[local][keyring]") {
  Sealed s;
  auto keyring = s.Open(s.bytes);
  REQUIRE_THAT(keyring, IsOk());
  AppendVersion(*keyring, s.clock.Now(), crypto::SystemRandom());
  auto two = SealKeyring(*keyring, s.root, crypto::SystemRandom());
  REQUIRE_THAT(two, IsOk());
  for (const auto& [index, state] : std::vector<std::pair<int, std::string>>{
           {0, "retired"}, {0, "current"}, {1, "active"}, {1, "retired"}}) {
    CAPTURE(index, state);
    json doc = json::parse(*two);
    doc["versions"][index]["state"] = state;
    CHECK_THAT(s.Open(doc.dump(2)), StatusIs(Code::kDataLoss, "integrity check"));
  }
  json doc = json::parse(*two);
  doc["versions"].erase(0);
  CHECK_THAT(s.Open(doc.dump(2)), StatusIs(Code::kDataLoss, "integrity check"));
  doc = json::parse(*two);
  doc["versions"][1]["created"] = 1;
  CHECK_THAT(s.Open(doc.dump(2)), StatusIs(Code::kDataLoss, "integrity check"));
}

TEST_CASE("Keyring: an extra field fails the MAC", "[local][keyring]") {
  Sealed s;
  json doc = json::parse(s.bytes);
  doc["comment"] = "added by hand";
  CHECK_THAT(s.Open(doc.dump(2)), StatusIs(Code::kDataLoss));
}

TEST_CASE("Keyring: a missing or malformed MAC is DataLoss", "[local][keyring]") {
  Sealed s;
  json doc = json::parse(s.bytes);
  doc.erase("mac");
  CHECK_THAT(s.Open(doc.dump()), StatusIs(Code::kDataLoss, "mac"));
  doc["mac"] = "!!!";
  CHECK_THAT(s.Open(doc.dump()), StatusIs(Code::kDataLoss, "mac"));
  doc["mac"] = absl::Base64Escape("short");
  CHECK_THAT(s.Open(doc.dump()), StatusIs(Code::kDataLoss));
}

TEST_CASE("Keyring: two current versions are refused even with a valid MAC", "[local][keyring]") {
  Sealed s;
  auto keyring = s.Open(s.bytes);
  REQUIRE_THAT(keyring, IsOk());
  AppendVersion(*keyring, s.clock.Now(), crypto::SystemRandom());
  keyring->versions[0].info.state = core::KeyState::kCurrent;
  auto sealed = SealKeyring(*keyring, s.root, crypto::SystemRandom());
  REQUIRE_THAT(sealed, IsOk());
  CHECK_THAT(s.Open(*sealed), StatusIs(Code::kDataLoss, "2 versions are marked current"));
  keyring->versions[0].info.state = core::KeyState::kActive;
  keyring->versions[1].info.state = core::KeyState::kActive;
  sealed = SealKeyring(*keyring, s.root, crypto::SystemRandom());
  REQUIRE_THAT(sealed, IsOk());
  CHECK_THAT(s.Open(*sealed), StatusIs(Code::kDataLoss, "0 versions are marked current"));
}

TEST_CASE("Keyring: versions out of order or repeated are refused", "[local][keyring]") {
  Sealed s;
  auto keyring = s.Open(s.bytes);
  REQUIRE_THAT(keyring, IsOk());
  AppendVersion(*keyring, s.clock.Now(), crypto::SystemRandom());
  auto two = SealKeyring(*keyring, s.root, crypto::SystemRandom());
  REQUIRE_THAT(two, IsOk());
  json doc = json::parse(*two);
  std::swap(doc["versions"][0], doc["versions"][1]);
  CHECK_THAT(s.Open(s.Remac(doc)), StatusIs(Code::kDataLoss, "ascending"));
  doc = json::parse(*two);
  doc["versions"][1] = doc["versions"][0];
  doc["versions"][1]["state"] = "current";
  doc["versions"][0]["state"] = "active";
  CHECK_THAT(s.Open(s.Remac(doc)), StatusIs(Code::kDataLoss));
}

TEST_CASE("Keyring: an empty version list is refused", "[local][keyring]") {
  Sealed s;
  json doc = json::parse(s.bytes);
  doc["versions"] = json::array();
  CHECK_THAT(s.Open(s.Remac(doc)), StatusIs(Code::kDataLoss, "no key versions"));
}

TEST_CASE("Keyring: a wrong root key is PERMISSION_DENIED, not DataLoss", "[local][keyring]") {
  Sealed s;
  const crypto::SecretBytes other = crypto::SystemRandom().NewSecret(kRootKeySize);
  CHECK_THAT(OpenKeyring(s.bytes, other, s.world.keyring),
             StatusIs(Code::kPermissionDenied, "wrong passphrase or root key"));
  WriteFile(s.world.root_key, std::string(other.view()));
  CHECK_THAT(LocalKeySource::Open(s.world.Options(), "dev", s.clock, crypto::SystemRandom()),
             StatusIs(Code::kPermissionDenied, "wrong passphrase or root key"));
}

TEST_CASE("Keyring: a tampered rootKeyCheck is refused", "[local][keyring]") {
  Sealed s;
  json doc = json::parse(s.bytes);
  std::string check = doc["rootKeyCheck"].get<std::string>();
  check[0] = OtherBase64Char(check[0]);
  doc["rootKeyCheck"] = check;
  CHECK_FALSE(s.Open(doc.dump()).ok());
  doc.erase("rootKeyCheck");
  CHECK_THAT(s.Open(doc.dump()), StatusIs(Code::kDataLoss, "rootKeyCheck"));
}

TEST_CASE("Keyring: a root key file of the wrong size is refused", "[local][keyring]") {
  TempDir dir;
  const std::string path = dir.File("root");
  for (size_t size : {size_t{0}, size_t{16}, size_t{31}, size_t{33}, size_t{64}}) {
    CAPTURE(size);
    WriteFile(path, std::string(size, 'k'));
    CHECK_THAT(ReadRootKeyFile(path), StatusIs(Code::kFailedPrecondition, "exactly 32"));
  }
  WriteFile(path, std::string(32, 'k'));
  CHECK_THAT(ReadRootKeyFile(path), IsOk());
}

TEST_CASE("Keyring: a root key file readable by group or others is refused naming the file and chmod 600",
          "[local][keyring]") {
  TempDir dir;
  const std::string path = dir.File("root");
  for (mode_t mode : {0644, 0640, 0604, 0660, 0700 | 0004}) {
    CAPTURE(mode);
    WriteFile(path, std::string(32, 'k'), mode);
    auto key = ReadRootKeyFile(path);
    CHECK_THAT(key, StatusIs(Code::kFailedPrecondition, path));
    CHECK_THAT(key, StatusIs(Code::kFailedPrecondition, "chmod 600"));
  }
  WriteFile(path, std::string(32, 'k'), 0400);
  CHECK_THAT(ReadRootKeyFile(path), IsOk());
}

TEST_CASE("Keyring: a missing root key file is NOT_FOUND naming it", "[local][keyring]") {
  TempDir dir;
  CHECK_THAT(ReadRootKeyFile(dir.File("absent")), StatusIs(Code::kNotFound, dir.File("absent")));
}

TEST_CASE("Keyring: a root key path that is a directory is refused", "[local][keyring]") {
  TempDir dir;
  CHECK_THAT(ReadRootKeyFile(dir.path()), StatusIs(Code::kFailedPrecondition, "not a regular file"));
}

TEST_CASE("Keyring: a short passphrase is refused", "[local][keyring]") {
  TempDir dir;
  const std::string path = dir.File("pass");
  for (const std::string& text : {std::string(""), std::string("short"), std::string(11, 'p'),
                                  std::string(11, 'p') + "\n", std::string(11, 'p') + "\r\n\n"}) {
    CAPTURE(text);
    WriteFile(path, text);
    CHECK_THAT(ReadPassphraseFile(path), StatusIs(Code::kFailedPrecondition, "shorter than 12"));
  }
}

TEST_CASE("Keyring: a passphrase file's trailing newline is ignored", "[local][keyring]") {
  TempDir dir;
  const std::string path = dir.File("pass");
  WriteFile(path, "correct horse battery staple\n");
  auto with_newline = ReadPassphraseFile(path);
  REQUIRE_THAT(with_newline, IsOk());
  CHECK(with_newline->view() == "correct horse battery staple");
  WriteFile(path, "correct horse battery staple\r\n");
  auto with_crlf = ReadPassphraseFile(path);
  REQUIRE_THAT(with_crlf, IsOk());
  CHECK(with_crlf->Equals(*with_newline));
}

TEST_CASE("Keyring: a passphrase file readable by others is refused", "[local][keyring]") {
  TempDir dir;
  const std::string path = dir.File("pass");
  WriteFile(path, "correct horse battery staple", 0644);
  CHECK_THAT(ReadPassphraseFile(path), StatusIs(Code::kFailedPrecondition, "chmod 600"));
}

TEST_CASE("Keyring: passphrase parameters out of range are refused before deriving", "[local][keyring]") {
  RootKeyParams params = NewPassphraseParams(crypto::SystemRandom());
  Keyring keyring = NewKeyring(params, absl::FromUnixSeconds(1'800'000'000), crypto::SystemRandom());
  const crypto::SecretBytes root = crypto::SystemRandom().NewSecret(kRootKeySize);
  auto sealed = SealKeyring(keyring, root, crypto::SystemRandom());
  REQUIRE_THAT(sealed, IsOk());
  auto read = ReadRootKeyParams(*sealed, "k");
  REQUIRE_THAT(read, IsOk());
  CHECK(read->kind == RootKeyParams::Kind::kPassphrase);
  CHECK(read->salt == params.salt);
  for (const auto& [field, value] : std::vector<std::pair<std::string, json>>{
           {"opsLimit", json(0)}, {"memLimit", json(1)}, {"memLimit", json(uint64_t{1} << 40)},
           {"opsLimit", json(-1)}, {"salt", json("c2hvcnQ=")}, {"kdf", json(nullptr)}}) {
    CAPTURE(field);
    json doc = json::parse(*sealed);
    if (field == "kdf") {
      doc["rootKey"]["kind"] = "scrypt";
    } else {
      doc["rootKey"][field] = value;
    }
    CHECK_THAT(ReadRootKeyParams(doc.dump(), "k"), StatusIs(Code::kDataLoss));
  }
}

TEST_CASE("Keyring: key_ids are unique across versions, times and keyrings", "[local][keyring]") {
  const std::string a(kKeyringIdSize, 'a');
  const std::string b(kKeyringIdSize, 'b');
  const absl::Time t = absl::FromUnixSeconds(1'800'000'000);
  std::set<std::string> ids = {MakeKeyId(a, 1, t), MakeKeyId(a, 2, t), MakeKeyId(a, 1, t + absl::Seconds(1)),
                               MakeKeyId(b, 1, t)};
  CHECK(ids.size() == 4);
  CHECK(MakeKeyId(a, 1, t) == MakeKeyId(a, 1, t));
  CHECK(MakeKeyRef(a, 1) != MakeKeyRef(a, 2));
  CHECK(MakeKeyRef(a, 1) != MakeKeyRef(b, 1));
  CHECK(MakeKeyRef(a, 1).size() <= 255);
  CHECK(MakeKeyId(a, 0xffffffff, absl::FromUnixSeconds(4'000'000'000)).size() <= 1024);
}

TEST_CASE("Keyring: AppendVersion stamps the clock's own time, never an older version's", "[local][keyring]") {
  // Version 1 made by a clock that was ahead (2100); version 2 by the clock set right. Inheriting 2100 would stamp
  // every later version with it and stall retires for decades.
  const absl::Time t = absl::FromUnixSeconds(1'800'000'000);
  const absl::Time ahead = absl::FromUnixSeconds(4'102'444'800);
  Keyring keyring = NewKeyring(RootKeyParams{}, ahead, crypto::SystemRandom());
  const KeyringVersion& v2 = AppendVersion(keyring, t, crypto::SystemRandom());
  CHECK(v2.info.version == 2);
  CHECK(v2.info.created == t);
  CHECK(keyring.versions[0].info.state == core::KeyState::kActive);
  CHECK(keyring.Current() == &keyring.versions[1]);
  CHECK(keyring.versions[0].info.key_id != keyring.versions[1].info.key_id);
  CHECK_FALSE(keyring.versions[0].kek.Equals(keyring.versions[1].kek));
}

TEST_CASE("Keyring: WriteFileAtomically with exclusive never replaces a file", "[local][keyring]") {
  TempDir dir;
  const std::string path = dir.File("f");
  REQUIRE_THAT(WriteFileAtomically(path, "first", true), IsOk());
  CHECK(testing::ModeOf(path) == 0600);
  CHECK_THAT(WriteFileAtomically(path, "second", true), StatusIs(Code::kAlreadyExists));
  CHECK(ReadAll(path) == "first");
  REQUIRE_THAT(WriteFileAtomically(path, "third", false), IsOk());
  CHECK(ReadAll(path) == "third");
  // No temp files are left behind.
  int entries = 0;
  for ([[maybe_unused]] const auto& entry : std::filesystem::directory_iterator(dir.path())) {
    ++entries;
  }
  CHECK(entries == 1);
}

TEST_CASE("Keyring: WriteFileAtomically into a missing directory fails cleanly", "[local][keyring]") {
  TempDir dir;
  CHECK_FALSE(WriteFileAtomically(dir.File("no/such/dir/f"), "x", false).ok());
}

}  // namespace
}  // namespace kmsplugin::keysource::local
