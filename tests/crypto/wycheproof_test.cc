// Project Wycheproof vectors (tests/crypto/testdata/wycheproof, Apache 2.0; see README.md there).
//
// Policy per vector:
//   valid      reproduce ct and tag exactly with Seal, and Open back to msg.
//   invalid    rejected: by Open (INVALID_ARGUMENT), or, for parameters we do not support, by New()/Seal/Open.
//   acceptable none of our three files has any; if one appears, its count is asserted to be zero below, so the
//              test fails and someone must decide (and document) what to do with it.
// Unsupported parameters (AES-128/192 keys, IVs other than 12 bytes, tags other than 16 bytes) are rejected
// with INVALID_ARGUMENT whatever the vector's result is. Every vector lands in exactly one counter, and the
// counters are asserted against what the files contain, so nothing is silently skipped.

#include <map>
#include <string>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>
#include <openssl/hmac.h>

#include "crypto/aes_gcm_aead.h"
#include "crypto/hkdf.h"
#include "crypto/xchacha20_poly1305_aead.h"
#include "tests/crypto/crypto_test_util.h"
#include "tests/support/fake_random.h"
#include "tests/support/status_matchers.h"

namespace kmsplugin::crypto {
namespace {

using ::kmsplugin::testing::FakeRandom;
using ::kmsplugin::testing::HexDecode;
using ::kmsplugin::testing::HexEncode;
using ::kmsplugin::testing::IsOk;
using ::kmsplugin::testing::LoadWycheproof;
using ::kmsplugin::testing::StatusIs;
constexpr auto kInvalid = absl::StatusCode::kInvalidArgument;

struct AeadCounts {
  int reproduced = 0;           // valid: Seal gave ct‖tag, Open gave msg
  int rejected_by_open = 0;     // invalid, supported parameters: Open refused
  int rejected_key_size = 0;    // unsupported key size: New() refused
  int rejected_nonce_size = 0;  // unsupported IV size: Seal and Open refused
  int rejected_tag_size = 0;    // unsupported tag size: Open refused
  int acceptable = 0;
  int total() const {
    return reproduced + rejected_by_open + rejected_key_size + rejected_nonce_size + rejected_tag_size + acceptable;
  }
};

template <typename T>
AeadCounts RunAeadVectors(const std::string& file) {
  const nlohmann::json doc = LoadWycheproof(file);
  FakeRandom random;
  AeadCounts counts;
  int seen = 0;
  for (const auto& group : doc.at("testGroups")) {
    for (const auto& test : group.at("tests")) {
      ++seen;
      const int id = test.at("tcId").get<int>();
      const std::string result = test.at("result").get<std::string>();
      const std::string key = HexDecode(test.at("key").get<std::string>());
      const std::string iv = HexDecode(test.at("iv").get<std::string>());
      const std::string aad = HexDecode(test.at("aad").get<std::string>());
      const std::string msg = HexDecode(test.at("msg").get<std::string>());
      const std::string ct = HexDecode(test.at("ct").get<std::string>());
      const std::string tag = HexDecode(test.at("tag").get<std::string>());
      CAPTURE(file, id, result, test.at("comment").get<std::string>());

      auto aead = T::New(SecretBytes::CopyOf(std::string_view(key)), random);
      if (key.size() != T::kKeySize) {
        CHECK_THAT(aead, StatusIs(kInvalid, "key must be 32 bytes"));
        ++counts.rejected_key_size;
        continue;
      }
      REQUIRE_THAT(aead, IsOk());
      if (iv.size() != T::kNonceSize) {
        CHECK_THAT((*aead)->Seal(iv, msg, aad), StatusIs(kInvalid, "nonce must be"));
        CHECK_THAT((*aead)->Open(iv, ct + tag, aad), StatusIs(kInvalid, "nonce must be"));
        ++counts.rejected_nonce_size;
        continue;
      }
      if (tag.size() != T::kTagSize) {
        // Open always reads a 16-byte tag, so a truncated tag can never verify.
        CHECK_THAT((*aead)->Open(iv, ct + tag, aad), StatusIs(kInvalid));
        ++counts.rejected_tag_size;
        continue;
      }
      auto opened = (*aead)->Open(iv, ct + tag, aad);
      if (result == "valid") {
        auto sealed = (*aead)->Seal(iv, msg, aad);
        REQUIRE_THAT(sealed, IsOk());
        CHECK(HexEncode(*sealed) == HexEncode(ct + tag));
        REQUIRE_THAT(opened, IsOk());
        CHECK(HexEncode(opened->view()) == HexEncode(msg));
        ++counts.reproduced;
      } else if (result == "invalid") {
        CHECK_THAT(opened, StatusIs(kInvalid, "authentication failed"));
        ++counts.rejected_by_open;
      } else {
        ++counts.acceptable;
      }
    }
  }
  CHECK(seen == doc.at("numberOfTests").get<int>());
  CHECK(counts.total() == seen);
  return counts;
}

TEST_CASE("AesGcmAead: Wycheproof aes_gcm_test.json, every vector accounted for") {
  const AeadCounts counts = RunAeadVectors<AesGcmAead>("aes_gcm_test.json");
  // 316 vectors: AES-256 with 96-bit IV: 39 valid + 27 invalid. The rest use AES-128/192 keys (211) or another IV
  // size with a 256-bit key (39), which we do not support and reject.
  CHECK(counts.reproduced == 39);
  CHECK(counts.rejected_by_open == 27);
  CHECK(counts.rejected_key_size == 211);
  CHECK(counts.rejected_nonce_size == 39);
  CHECK(counts.rejected_tag_size == 0);
  CHECK(counts.acceptable == 0);
  CHECK(counts.total() == 316);
}

TEST_CASE("XChaCha20Poly1305Aead: Wycheproof xchacha20_poly1305_test.json, every vector accounted for") {
  const AeadCounts counts = RunAeadVectors<XChaCha20Poly1305Aead>("xchacha20_poly1305_test.json");
  CHECK(counts.reproduced == 246);
  CHECK(counts.rejected_by_open == 60);
  CHECK(counts.rejected_key_size == 0);
  CHECK(counts.rejected_nonce_size == 9);
  CHECK(counts.rejected_tag_size == 0);
  CHECK(counts.acceptable == 0);
  CHECK(counts.total() == 315);
}

TEST_CASE("HkdfSha256: Wycheproof hkdf_sha256_test.json, every vector accounted for") {
  const nlohmann::json doc = LoadWycheproof("hkdf_sha256_test.json");
  int reproduced = 0;
  int expand_reproduced = 0;
  int rejected = 0;
  int acceptable = 0;
  int seen = 0;
  for (const auto& group : doc.at("testGroups")) {
    for (const auto& test : group.at("tests")) {
      ++seen;
      const std::string result = test.at("result").get<std::string>();
      const std::string ikm = HexDecode(test.at("ikm").get<std::string>());
      const std::string salt = HexDecode(test.at("salt").get<std::string>());
      const std::string info = HexDecode(test.at("info").get<std::string>());
      const size_t size = test.at("size").get<size_t>();
      CAPTURE(test.at("tcId").get<int>(), result, size);
      auto okm = HkdfSha256(ikm, salt, info, size);
      // The same vector through the expand-only path: PRK = HMAC-SHA256(salt, ikm), computed independently.
      uint8_t prk[32];
      unsigned int prk_len = 0;
      const std::string hmac_key = salt.empty() ? std::string(32, '\0') : salt;
      REQUIRE(HMAC(EVP_sha256(), hmac_key.data(), static_cast<int>(hmac_key.size()),
                   reinterpret_cast<const uint8_t*>(ikm.data()), ikm.size(), prk, &prk_len) != nullptr);
      auto expanded = HkdfSha256Expand(std::string_view(reinterpret_cast<const char*>(prk), prk_len), info, size);
      if (result == "valid") {
        REQUIRE_THAT(okm, IsOk());
        CHECK(HexEncode(okm->view()) == test.at("okm").get<std::string>());
        ++reproduced;
        REQUIRE_THAT(expanded, IsOk());
        CHECK(HexEncode(expanded->view()) == test.at("okm").get<std::string>());
        ++expand_reproduced;
      } else if (result == "invalid") {
        CHECK_THAT(okm, StatusIs(kInvalid, "output length"));
        CHECK_THAT(expanded, StatusIs(kInvalid, "output length"));
        ++rejected;
      } else {
        ++acceptable;
      }
    }
  }
  CHECK(seen == doc.at("numberOfTests").get<int>());
  CHECK(reproduced == 83);
  CHECK(expand_reproduced == 83);
  CHECK(rejected == 3);
  CHECK(acceptable == 0);
  CHECK(reproduced + rejected + acceptable == 86);
}

}  // namespace
}  // namespace kmsplugin::crypto
