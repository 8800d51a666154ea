// ObjectDecryptor and its byte-oriented parts: fixed vectors, values the apiserver writer encodes through a real
// in-process kmsplugin, the seed cache, and the reasons for what does not decrypt.

#include "kmsplugin/audit/object_decryptor.h"

#include <catch2/catch.hpp>
#include <string>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "encrypted_object.pb.h"
#include "tests/audit/apiserver_writer.h"
#include "tests/server/server_fixture.h"
#include "tests/support/status_matchers.h"

namespace kmsplugin::testing {
namespace {

using audit::DecryptVerdict;

constexpr char kV2Prefix[] = "k8s:enc:kms:v2:kmsplugin-dev:";

std::string Hex(const char* hex) { return absl::HexStringToBytes(hex); }

// Computed independently with Python's `cryptography` (HKDFExpand(SHA256, 32, info).derive(seed), then
// AESGCM(dek).encrypt(nonce, plaintext, etcd_key)), following kube-apiserver's aes_extended_nonce.go
// (sha256KDFExpandOnly: hkdf.Expand, no extract, no salt; info 32 bytes; derived key 32 bytes) and aes.go
// (12-byte nonce first, then ciphertext and 16-byte tag; the etcd key as additional data):
//   seed  = 00 01 .. 1f          info  = 40 41 .. 5f          nonce = a0 a1 .. ab
//   key   = "/registry/secrets/default/vector"
constexpr char kVectorKey[] = "/registry/secrets/default/vector";
constexpr char kVectorPlaintextHex[] = "6b3873000a0c0a027631120653656372657412766563746f72";
constexpr char kVectorSeedModeDataHex[] =
    "404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f"
    "a0a1a2a3a4a5a6a7a8a9aaab"
    "8f8bcad4032f25320f25c0f1fb5c367dc96770c25eefe5d0dbf757c4814e1f0222f0b841233648d8e7";
// AES_GCM_KEY (and KMS v1 data): DEK = 10 11 .. 2f, the same nonce, key and plaintext.
constexpr char kVectorDekModeDataHex[] =
    "a0a1a2a3a4a5a6a7a8a9aaabc2f74cf674231611aa3c19d1d960e0c90953f10a05b371ef04271fc65d7aac09f8f8d9bf92c5f69947";

crypto::SecretBytes Counting(uint8_t first, size_t n) {
  crypto::SecretBytes out(n);
  for (size_t i = 0; i < n; ++i) {
    out.data()[i] = static_cast<uint8_t>(first + i);
  }
  return out;
}

TEST_CASE("OpenEncryptedData: kube-apiserver's seed mode (HKDF-SHA256 expand-only, AES-256-GCM) fixed vector",
          "[audit][decrypt]") {
  const crypto::SecretBytes seed = Counting(0x00, 32);
  const std::string data = Hex(kVectorSeedModeDataHex);
  auto plaintext = audit::OpenEncryptedData(seed, audit::kDekSourceHkdfSeed, kVectorKey, data);
  REQUIRE_THAT(plaintext, IsOk());
  CHECK(std::string(plaintext->view()) == Hex(kVectorPlaintextHex));

  // The etcd key is bound: the same bytes under another key do not open.
  CHECK_THAT(audit::OpenEncryptedData(seed, audit::kDekSourceHkdfSeed, "/registry/secrets/default/other", data),
             StatusIs(absl::StatusCode::kInvalidArgument));
  // Every part counts: the info (it derives the DEK), the nonce, the ciphertext, the tag.
  for (size_t at : {size_t{0}, size_t{31}, size_t{32}, size_t{43}, size_t{44}, data.size() - 1}) {
    std::string flipped = data;
    flipped[at] ^= 0x01;
    INFO("byte " << at);
    CHECK_THAT(audit::OpenEncryptedData(seed, audit::kDekSourceHkdfSeed, kVectorKey, flipped),
               StatusIs(absl::StatusCode::kInvalidArgument));
  }
  // Another seed; a seed kube-apiserver would refuse (under 32 bytes); data shorter than the info.
  CHECK_THAT(audit::OpenEncryptedData(Counting(0x01, 32), audit::kDekSourceHkdfSeed, kVectorKey, data),
             StatusIs(absl::StatusCode::kInvalidArgument));
  CHECK_THAT(audit::OpenEncryptedData(Counting(0x00, 31), audit::kDekSourceHkdfSeed, kVectorKey, data),
             StatusIs(absl::StatusCode::kInvalidArgument));
  CHECK_THAT(audit::OpenEncryptedData(seed, audit::kDekSourceHkdfSeed, kVectorKey, data.substr(0, 40)),
             StatusIs(absl::StatusCode::kInvalidArgument));
  // The seed is not a DEK: reading the same data as AES_GCM_KEY fails.
  CHECK_THAT(audit::OpenEncryptedData(seed, audit::kDekSourceAesGcmKey, kVectorKey, data),
             StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST_CASE("OpenEncryptedData: AES_GCM_KEY and KMS v1 data (nonce, ciphertext, tag) fixed vector, and DEK sizes",
          "[audit][decrypt]") {
  const crypto::SecretBytes dek = Counting(0x10, 32);
  const std::string data = Hex(kVectorDekModeDataHex);
  auto plaintext = audit::OpenEncryptedData(dek, audit::kDekSourceAesGcmKey, kVectorKey, data);
  REQUIRE_THAT(plaintext, IsOk());
  CHECK(std::string(plaintext->view()) == Hex(kVectorPlaintextHex));
  CHECK_THAT(audit::OpenEncryptedData(dek, audit::kDekSourceAesGcmKey, kVectorKey, data.substr(0, 27)),
             StatusIs(absl::StatusCode::kInvalidArgument));
  // 16- and 24-byte DEKs are valid AES keys kube-apiserver does not make: not checkable, not "broken".
  CHECK_THAT(audit::OpenEncryptedData(Counting(0x10, 16), audit::kDekSourceAesGcmKey, kVectorKey, data),
             StatusIs(absl::StatusCode::kFailedPrecondition));
  CHECK_THAT(audit::OpenEncryptedData(Counting(0x10, 31), audit::kDekSourceAesGcmKey, kVectorKey, data),
             StatusIs(absl::StatusCode::kInvalidArgument));
  CHECK_THAT(audit::OpenEncryptedData(dek, 7, kVectorKey, data), StatusIs(absl::StatusCode::kFailedPrecondition));
}

// A plugin, a writer that encodes values as kube-apiserver does (its etcd is never contacted), a decryptor over
// the plugin's key source.
struct Bench {
  explicit Bench(audit::ObjectDecryptor::Options options = {})
      : writer("127.0.0.1:1", *plugin.client), decryptor({{"dev", plugin.source}}, options, core::SystemClock()) {
    REQUIRE_THAT(writer.NewSeed(), IsOk());
  }
  ServerFixture plugin;
  ApiserverWriter writer;
  audit::ObjectDecryptor decryptor;
};

std::string Key(int i) { return absl::StrCat("/registry/secrets/ns/s", i); }

TEST_CASE("ObjectDecryptor: what kube-apiserver writes decrypts, with one unwrap per distinct seed",
          "[audit][decrypt]") {
  Bench b;
  for (int i = 0; i < 40; ++i) {
    auto value = b.writer.EncodeV2(Key(i), SecretPayload(absl::StrCat("s", i)));
    REQUIRE_THAT(value, IsOk());
    const audit::DecryptResult result = b.decryptor.Check(Key(i), *value);
    INFO(result.reason);
    REQUIRE(result.verdict == DecryptVerdict::kDecrypts);
  }
  CHECK(b.decryptor.unwraps() == 1);
  REQUIRE_THAT(b.writer.NewSeed(), IsOk());  // an apiserver restart
  for (int i = 0; i < 5; ++i) {
    auto value = b.writer.EncodeV2(Key(i), "x");
    REQUIRE_THAT(value, IsOk());
    CHECK(b.decryptor.Check(Key(i), *value).verdict == DecryptVerdict::kDecrypts);
  }
  CHECK(b.decryptor.unwraps() == 2);
  // KMS v1: a fresh DEK per object.
  for (int i = 0; i < 3; ++i) {
    auto value = b.writer.EncodeV1(Key(i), "v1");
    REQUIRE_THAT(value, IsOk());
    const audit::DecryptResult result = b.decryptor.Check(Key(i), *value);
    INFO(result.reason);
    CHECK(result.verdict == DecryptVerdict::kDecrypts);
  }
  CHECK(b.decryptor.unwraps() == 5);

  // Not KMS: identity and the apiserver's static-key providers.
  CHECK(b.decryptor.Check(Key(0), std::string("k8s\0plain", 9)).verdict == DecryptVerdict::kNotEncrypted);
  const audit::DecryptResult aescbc = b.decryptor.Check(Key(0), "k8s:enc:aescbc:v1:key1:0123456789abcdef0123");
  CHECK(aescbc.verdict == DecryptVerdict::kNotCheckable);
  CHECK(aescbc.reason.find("EncryptionConfiguration") != std::string::npos);
}

TEST_CASE("ObjectDecryptor: each kind of failure is named with its reason", "[audit][decrypt]") {
  Bench b;
  auto value = b.writer.EncodeV2(Key(1), SecretPayload("s1"));
  REQUIRE_THAT(value, IsOk());
  kmsplugin::etcd::EncryptedObject object;
  REQUIRE(object.ParseFromString(value->substr(sizeof(kV2Prefix) - 1)));
  const auto encode = [](const kmsplugin::etcd::EncryptedObject& o) { return kV2Prefix + o.SerializeAsString(); };

  // Stored under another etcd key (the key is the associated data).
  audit::DecryptResult moved = b.decryptor.Check(Key(2), *value);
  CHECK(moved.verdict == DecryptVerdict::kFails);
  CHECK(moved.reason.find("does not authenticate") != std::string::npos);

  // Tampered ciphertext.
  kmsplugin::etcd::EncryptedObject tampered = object;
  std::string data = tampered.encrypteddata();
  data[50] ^= 0x80;
  tampered.set_encrypteddata(data);
  audit::DecryptResult bad = b.decryptor.Check(Key(1), encode(tampered));
  CHECK(bad.verdict == DecryptVerdict::kFails);
  CHECK(bad.reason.find("tampered") != std::string::npos);

  // A key_id that is not the one the seed was returned with: the plugin refuses, as it would for the apiserver.
  kmsplugin::etcd::EncryptedObject wrong_key_id = object;
  wrong_key_id.set_keyid("someone-else:v9");
  audit::DecryptResult refused = b.decryptor.Check(Key(1), encode(wrong_key_id));
  CHECK(refused.verdict == DecryptVerdict::kFails);
  CHECK(refused.reason.find("is not the key_id of the key version") != std::string::npos);

  // Another KMS plugin's DEK source.
  kmsplugin::etcd::EncryptedObject foreign = object;
  foreign.set_encrypteddeksource(std::string(60, 'z'));
  audit::DecryptResult other_plugin = b.decryptor.Check(Key(1), encode(foreign));
  CHECK(other_plugin.verdict == DecryptVerdict::kFails);
  CHECK(other_plugin.reason.find("another KMS plugin") != std::string::npos);

  // Malformed.
  audit::DecryptResult malformed = b.decryptor.Check(Key(1), value->substr(0, 40));
  CHECK(malformed.verdict == DecryptVerdict::kFails);
  CHECK(malformed.reason.find("malformed") != std::string::npos);

  // The version a retire is about to retire (retire --verify).
  auto current = b.plugin.source->Current();
  REQUIRE_THAT(current, IsOk());
  audit::ObjectDecryptor::Options retiring;
  retiring.assume_retired[{"dev", current->key_ref}] = current->version;
  audit::ObjectDecryptor verify({{"dev", b.plugin.source}}, retiring, core::SystemClock());
  audit::DecryptResult would_fail = verify.Check(Key(1), *value);
  CHECK(would_fail.verdict == DecryptVerdict::kFails);
  CHECK(would_fail.reason.find("which this retire would retire") != std::string::npos);

  // The intact object still decrypts after all that (failures are cached per DEK source, not per seed).
  CHECK(b.decryptor.Check(Key(1), *value).verdict == DecryptVerdict::kDecrypts);
  // No secret in any reason: neither the key_id-bearing text nor bytes of the value's ciphertext.
  for (const audit::DecryptResult* r : {&moved, &bad, &refused, &other_plugin, &malformed, &would_fail}) {
    CHECK(r->reason.find(object.encrypteddata().substr(44, 16)) == std::string::npos);
  }
}

TEST_CASE("ObjectDecryptor: the seed cache is bounded and a failed unwrap is not repeated", "[audit][decrypt]") {
  audit::ObjectDecryptor::Options options;
  options.cache_entries = 2;
  Bench b(options);
  std::vector<std::string> values;
  for (int seed = 0; seed < 3; ++seed) {
    if (seed > 0) {
      REQUIRE_THAT(b.writer.NewSeed(), IsOk());
    }
    auto value = b.writer.EncodeV2(Key(seed), "x");
    REQUIRE_THAT(value, IsOk());
    values.push_back(*value);
  }
  for (int round = 0; round < 2; ++round) {
    for (int seed = 0; seed < 3; ++seed) {
      CHECK(b.decryptor.Check(Key(seed), values[seed]).verdict == DecryptVerdict::kDecrypts);
    }
  }
  CHECK(b.decryptor.unwraps() == 6);  // three seeds through two slots: every look-up misses
  CHECK(b.decryptor.Check(Key(2), values[2]).verdict == DecryptVerdict::kDecrypts);
  CHECK(b.decryptor.unwraps() == 6);  // the last one is still there

  kmsplugin::etcd::EncryptedObject object;
  REQUIRE(object.ParseFromString(values[2].substr(sizeof(kV2Prefix) - 1)));
  object.set_keyid("wrong");
  const std::string bad = kV2Prefix + object.SerializeAsString();
  CHECK(b.decryptor.Check(Key(2), bad).verdict == DecryptVerdict::kFails);
  CHECK(b.decryptor.Check(Key(2), bad).verdict == DecryptVerdict::kFails);
  CHECK(b.decryptor.unwraps() == 7);
}

TEST_CASE("ParseKmsValue: every truncation and single-byte change of real values is handled", "[audit][decrypt]") {
  Bench b;
  auto v2 = b.writer.EncodeV2(Key(1), SecretPayload("s1"));
  auto v1 = b.writer.EncodeV1(Key(1), SecretPayload("s1"));
  REQUIRE_THAT(v2, IsOk());
  REQUIRE_THAT(v1, IsOk());
  for (const std::string& value : {*v2, *v1}) {
    auto parsed = audit::ParseKmsValue(value);
    REQUIRE_THAT(parsed, IsOk());
    CHECK(parsed->provider.find("kmsplugin-dev") == 0);
    for (size_t n = 0; n < value.size(); ++n) {
      auto truncated = audit::ParseKmsValue(value.substr(0, n));
      if (truncated.ok()) {
        CHECK(truncated->encrypted_data.size() + truncated->encrypted_dek_source.size() <= n);
      }
      std::string changed = value;
      changed[n] = static_cast<char>(changed[n] ^ 0x5a);
      (void)audit::ParseKmsValue(changed);
      (void)b.decryptor.Check(Key(1), changed);
    }
  }
  CHECK_THAT(audit::ParseKmsValue("k8s:enc:aesgcm:v1:k:abc"), StatusIs(absl::StatusCode::kFailedPrecondition));
  CHECK_THAT(audit::ParseKmsValue("k8s:enc:kms:v2:p:"), StatusIs(absl::StatusCode::kInvalidArgument));
}

}  // namespace
}  // namespace kmsplugin::testing
