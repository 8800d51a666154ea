// ClassifyValue on hand-made values: every storage prefix, every malformation, and random bytes.

#include <random>
#include <string>

#include <catch2/catch.hpp>

#include "crypto/envelope_format.h"
#include "encrypted_object.pb.h"
#include "kmsplugin/audit/etcd_client.h"
#include "kmsplugin/audit/value_classifier.h"

namespace kmsplugin::audit {
namespace {

std::string OurEnvelope(const std::string& environment, const std::string& key_ref) {
  crypto::Envelope envelope;
  envelope.header.kind = crypto::KeySourceKind::kLocal;
  envelope.header.environment = environment;
  envelope.header.key_ref = key_ref;
  envelope.wrapped = std::string(60, 'w');
  auto encoded = crypto::EncodeEnvelope(envelope);
  REQUIRE(encoded.ok());
  return *encoded;
}

std::string V2Value(const std::string& provider, const std::string& key_id, const std::string& dek_source,
                    int type = 1, size_t data_size = 100) {
  kmsplugin::etcd::EncryptedObject object;
  object.set_encrypteddata(std::string(data_size, 'd'));
  object.set_keyid(key_id);
  object.set_encrypteddeksource(dek_source);
  (*object.mutable_annotations())["version.encryption.remote.io"] = "1";
  object.set_encrypteddeksourcetype(static_cast<kmsplugin::etcd::EncryptedDEKSourceType>(type));
  return "k8s:enc:kms:v2:" + provider + ":" + object.SerializeAsString();
}

std::string V1Value(const std::string& provider, const std::string& dek, size_t data_size = 60) {
  std::string length;
  length.push_back(static_cast<char>(dek.size() >> 8));
  length.push_back(static_cast<char>(dek.size() & 0xff));
  return "k8s:enc:kms:v1:" + provider + ":" + length + dek + std::string(data_size, 'x');
}

TEST_CASE("ClassifyValue: a KMS v2 value gives provider, key_id, DEK source type and our envelope", "[audit]") {
  const Classification c = ClassifyValue(V2Value("kmsplugin-dev", "local:kr:1:2026", OurEnvelope("dev", "v1")));
  CHECK(c.kind == StorageKind::kKmsV2);
  CHECK(c.provider == "kmsplugin-dev");
  CHECK(c.key_id == "local:kr:1:2026");
  CHECK(c.dek_source_type == kDekSourceHkdfSeed);
  REQUIRE(c.envelope.has_value());
  CHECK(c.envelope->environment == "dev");
  CHECK(c.envelope->key_ref == "v1");
  CHECK(c.problem.empty());
}

TEST_CASE("ClassifyValue: a KMS v2 value of another plugin has no envelope but keeps its key_id", "[audit]") {
  const Classification c = ClassifyValue(V2Value("aws", "arn:aws:kms:key/1", std::string(200, '\x07'), 0, 40));
  CHECK(c.kind == StorageKind::kKmsV2);
  CHECK(c.key_id == "arn:aws:kms:key/1");
  CHECK(c.dek_source_type == kDekSourceAesGcmKey);
  CHECK_FALSE(c.envelope.has_value());
}

TEST_CASE("ClassifyValue: a KMS v1 value of this plugin gives environment and key_ref", "[audit]") {
  const Classification c = ClassifyValue(V1Value("kms-v1", OurEnvelope("prod", "7")));
  CHECK(c.kind == StorageKind::kKmsV1);
  CHECK(c.provider == "kms-v1");
  REQUIRE(c.envelope.has_value());
  CHECK(c.envelope->environment == "prod");
  CHECK(c.envelope->key_ref == "7");
  CHECK(c.key_id.empty());
}

TEST_CASE("ClassifyValue: a KMS v1 value of another plugin is v1 without an envelope", "[audit]") {
  const Classification c = ClassifyValue(V1Value("other", std::string(100, '\x01')));
  CHECK(c.kind == StorageKind::kKmsV1);
  CHECK_FALSE(c.envelope.has_value());
}

TEST_CASE("ClassifyValue: aescbc, aesgcm and secretbox give their key name", "[audit]") {
  const std::string data(48, 'z');
  CHECK(ClassifyValue("k8s:enc:aescbc:v1:key1:" + data).kind == StorageKind::kAesCbc);
  CHECK(ClassifyValue("k8s:enc:aescbc:v1:key1:" + data).provider == "key1");
  CHECK(ClassifyValue("k8s:enc:aesgcm:v1:k2:" + data).kind == StorageKind::kAesGcm);
  CHECK(ClassifyValue("k8s:enc:secretbox:v1:k3:" + data).kind == StorageKind::kSecretbox);
  CHECK(ClassifyValue("k8s:enc:secretbox:v1:k3:").kind == StorageKind::kMalformed);
  CHECK(ClassifyValue("k8s:enc:aescbc:v1:").kind == StorageKind::kMalformed);
}

TEST_CASE("ClassifyValue: protobuf, JSON, empty and anything else are identity", "[audit]") {
  CHECK(ClassifyValue(std::string("k8s\0\n\x0c", 6)).kind == StorageKind::kIdentity);
  CHECK(ClassifyValue(R"({"kind":"Secret"})").kind == StorageKind::kIdentity);
  CHECK(ClassifyValue("").kind == StorageKind::kIdentity);
  CHECK(ClassifyValue("k8s:en").kind == StorageKind::kIdentity);
}

TEST_CASE("ClassifyValue: malformed KMS v2 values name the problem", "[audit]") {
  const std::string good = V2Value("p", "key", OurEnvelope("dev", "v1"));
  CHECK(ClassifyValue(good.substr(0, 30)).problem.find("does not parse") != std::string::npos);
  CHECK(ClassifyValue("k8s:enc:kms:v2:p:").problem.find("empty EncryptedObject") != std::string::npos);
  CHECK(ClassifyValue("k8s:enc:kms:v2:p").problem.find("no provider name") != std::string::npos);
  CHECK(ClassifyValue("k8s:enc:kms:v2::abc").problem.find("no provider name") != std::string::npos);
  CHECK(ClassifyValue(V2Value("p", "", "x")).problem.find("no keyID") != std::string::npos);
  CHECK(ClassifyValue(V2Value("p", std::string(1025, 'k'), "x")).problem.find("limit 1024") != std::string::npos);
  CHECK(ClassifyValue(V2Value("p", "k", "")).problem.find("encryptedDEKSource is 0 bytes") != std::string::npos);
  CHECK(ClassifyValue(V2Value("p", "k", std::string(1025, 's'))).problem.find("1025 bytes") != std::string::npos);
  CHECK(ClassifyValue(V2Value("p", "k", "s", 2)).problem.find("unknown encryptedDEKSourceType 2") !=
        std::string::npos);
  CHECK(ClassifyValue(V2Value("p", "k", "s", 1, 59)).problem.find("shorter than the 60") != std::string::npos);
  CHECK(ClassifyValue(V2Value("p", "k", "s", 0, 28)).kind == StorageKind::kKmsV2);
  CHECK(ClassifyValue(V2Value("p", "k", "s", 0, 27)).kind == StorageKind::kMalformed);
}

TEST_CASE("ClassifyValue: malformed KMS v1 values name the problem", "[audit]") {
  CHECK(ClassifyValue("k8s:enc:kms:v1:p:").problem.find("no 2-byte DEK length") != std::string::npos);
  CHECK(ClassifyValue("k8s:enc:kms:v1:p:\x01").problem.find("no 2-byte DEK length") != std::string::npos);
  CHECK(ClassifyValue(std::string("k8s:enc:kms:v1:p:\0\0", 19) + std::string(40, 'x')).problem.find("is 0") !=
        std::string::npos);
  CHECK(ClassifyValue(std::string("k8s:enc:kms:v1:p:\x01\x00", 19) + std::string(10, 'x')).problem.find("says 256 bytes but only 10") !=
        std::string::npos);
  CHECK(ClassifyValue(V1Value("p", "dek", 27)).problem.find("shorter than 28") != std::string::npos);
  CHECK(ClassifyValue(V1Value("p", "dek", 28)).kind == StorageKind::kKmsV1);
}

TEST_CASE("ClassifyValue: a keyID that is not UTF-8 is malformed, quietly", "[audit]") {
  const Classification c = ClassifyValue(V2Value("p", "key", "s").replace(std::string("k8s:enc:kms:v2:p:").size() + 104, 1, "\xff"));
  CHECK(c.kind == StorageKind::kMalformed);
  CHECK(c.problem.find("keyID is not valid UTF-8") != std::string::npos);
  CHECK(ClassifyValue(V2Value("p", "k\xc3\xa9y-\xe2\x82\xac-\xf0\x9f\x94\x91", "s")).kind == StorageKind::kKmsV2);
  CHECK(ClassifyValue(V2Value("p", "k\xc3", "s")).kind == StorageKind::kMalformed);
  CHECK(ClassifyValue(V2Value("p", "k\xed\xa0\x80", "s")).kind == StorageKind::kMalformed);  // a surrogate
  CHECK(ClassifyValue(V2Value("p", "k\xc0\xaf", "s")).kind == StorageKind::kMalformed);      // overlong
}

TEST_CASE("ClassifyValue: an unknown k8s:enc: scheme is malformed and shown without binary bytes", "[audit]") {
  const Classification c = ClassifyValue(std::string("k8s:enc:kms:v3:p:\x01\x02secret", 24));
  CHECK(c.kind == StorageKind::kMalformed);
  CHECK(c.problem.find("\"k8s:enc:kms:v3:\"") != std::string::npos);
  const Classification d = ClassifyValue(std::string("k8s:enc:\x01\xff", 10));
  CHECK(d.problem.find("k8s:enc:??") != std::string::npos);
}

TEST_CASE("ClassifyValue: random and mutated bytes never crash", "[audit]") {
  std::mt19937 rng(12345);
  const std::string seeds[] = {V2Value("p", "key", OurEnvelope("dev", "v1")),
                               V1Value("p", OurEnvelope("dev", "v1")), "k8s:enc:aescbc:v1:k:abc"};
  for (int i = 0; i < 20000; ++i) {
    std::string value = seeds[i % 3];
    const int edits = 1 + static_cast<int>(rng() % 8);
    for (int e = 0; e < edits && !value.empty(); ++e) {
      switch (rng() % 3) {
        case 0:
          value[rng() % value.size()] = static_cast<char>(rng());
          break;
        case 1:
          value.resize(rng() % value.size());
          break;
        default:
          value.insert(value.begin() + static_cast<long>(rng() % value.size()), static_cast<char>(rng()));
      }
    }
    const Classification c = ClassifyValue(value);
    CHECK((c.kind != StorageKind::kMalformed || !c.problem.empty()));
  }
}

TEST_CASE("PrefixRangeEnd: the first key after every key with the prefix", "[audit]") {
  CHECK(PrefixRangeEnd("/registry/secrets/") == "/registry/secrets0");
  CHECK(PrefixRangeEnd("a\xff") == "b");
  CHECK(PrefixRangeEnd("\xff\xff") == std::string(1, '\0'));
}

}  // namespace
}  // namespace kmsplugin::audit
