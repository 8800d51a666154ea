// Behaviour both AEADs share (Aead contract), plus what is specific to each.

#include <atomic>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>

#include "crypto/aes_gcm_aead.h"
#include "crypto/xchacha20_poly1305_aead.h"
#include "tests/crypto/crypto_test_util.h"
#include "tests/support/fake_random.h"
#include "tests/support/status_matchers.h"

namespace kmsplugin::crypto {
namespace {

using ::kmsplugin::testing::FakeRandom;
using ::kmsplugin::testing::HexEncode;
using ::kmsplugin::testing::IsOk;
using ::kmsplugin::testing::StatusIs;
constexpr auto kInvalid = absl::StatusCode::kInvalidArgument;

const std::string kPlaintext = "a 32-byte data encryption key!!!";
const std::string kAad = "kmsplugin/envelope/v1 prod v3";

SecretBytes TestKey(char fill = '\x42') { return SecretBytes::CopyOf(std::string_view(std::string(32, fill))); }

template <typename T>
std::unique_ptr<T> MakeAead(Random& random, char fill = '\x42') {
  auto aead = T::New(TestKey(fill), random);
  REQUIRE(aead.ok());
  return *std::move(aead);
}

#define AEAD_TYPES AesGcmAead, XChaCha20Poly1305Aead

TEMPLATE_TEST_CASE("Aead: New rejects every key size but 32 bytes", "", AEAD_TYPES) {
  FakeRandom random;
  for (size_t size : {0u, 1u, 16u, 24u, 31u, 33u, 64u}) {
    CAPTURE(size);
    CHECK_THAT(TestType::New(SecretBytes(size), random), StatusIs(kInvalid, "key must be 32 bytes"));
  }
  CHECK_THAT(TestType::New(SecretBytes(32), random), IsOk());
}

TEMPLATE_TEST_CASE("Aead: the key-size error does not echo key bytes", "", AEAD_TYPES) {
  FakeRandom random;
  const std::string key(31, 'Q');
  auto result = TestType::New(SecretBytes::CopyOf(std::string_view(key)), random);
  REQUIRE_FALSE(result.ok());
  CHECK(result.status().message().find("QQQ") == absl::string_view::npos);
  CHECK(result.status().message().find("515151") == absl::string_view::npos);
}

TEMPLATE_TEST_CASE("Aead: Encrypt then Decrypt returns the plaintext", "", AEAD_TYPES) {
  FakeRandom random;
  auto aead = MakeAead<TestType>(random);
  for (const std::string& plaintext : {std::string(), std::string("x"), kPlaintext, std::string(70000, 'p')}) {
    CAPTURE(plaintext.size());
    auto ciphertext = aead->Encrypt(plaintext, kAad);
    REQUIRE_THAT(ciphertext, IsOk());
    CHECK(ciphertext->size() == TestType::kNonceSize + plaintext.size() + TestType::kTagSize);
    auto decrypted = aead->Decrypt(*ciphertext, kAad);
    REQUIRE_THAT(decrypted, IsOk());
    CHECK(decrypted->view() == plaintext);
  }
}

TEMPLATE_TEST_CASE("Aead: empty associated data round-trips and differs from non-empty", "", AEAD_TYPES) {
  FakeRandom random;
  auto aead = MakeAead<TestType>(random);
  auto ciphertext = aead->Encrypt(kPlaintext, "");
  REQUIRE_THAT(ciphertext, IsOk());
  CHECK_THAT(aead->Decrypt(*ciphertext, ""), IsOk());
  CHECK_THAT(aead->Decrypt(*ciphertext, std::string(1, '\0')), StatusIs(kInvalid, "authentication failed"));
}

TEMPLATE_TEST_CASE("Aead: Encrypt puts the injected nonce first, and Open with it matches Decrypt", "", AEAD_TYPES) {
  FakeRandom random("nonce-seed");
  FakeRandom replay("nonce-seed");
  auto aead = MakeAead<TestType>(random);
  std::string expected_nonce(TestType::kNonceSize, '\0');
  replay.Fill(absl::MakeSpan(reinterpret_cast<uint8_t*>(expected_nonce.data()), expected_nonce.size()));
  auto ciphertext = aead->Encrypt(kPlaintext, kAad);
  REQUIRE_THAT(ciphertext, IsOk());
  CHECK(ciphertext->substr(0, TestType::kNonceSize) == expected_nonce);
  auto sealed = aead->Seal(expected_nonce, kPlaintext, kAad);
  REQUIRE_THAT(sealed, IsOk());
  CHECK(ciphertext->substr(TestType::kNonceSize) == *sealed);
}

TEMPLATE_TEST_CASE("Aead: two encryptions of the same plaintext differ", "", AEAD_TYPES) {
  FakeRandom fake;
  for (Random* random : {static_cast<Random*>(&fake), &SystemRandom()}) {
    auto aead = MakeAead<TestType>(*random);
    auto a = aead->Encrypt(kPlaintext, kAad);
    auto b = aead->Encrypt(kPlaintext, kAad);
    REQUIRE_THAT(a, IsOk());
    REQUIRE_THAT(b, IsOk());
    CHECK(*a != *b);
    CHECK(a->substr(0, TestType::kNonceSize) != b->substr(0, TestType::kNonceSize));
  }
}

TEMPLATE_TEST_CASE("Aead: Decrypt rejects an empty ciphertext as too short", "", AEAD_TYPES) {
  FakeRandom random;
  auto aead = MakeAead<TestType>(random);
  const std::string need = std::to_string(TestType::kNonceSize + TestType::kTagSize);
  CHECK_THAT(aead->Decrypt("", kAad), StatusIs(kInvalid, "ciphertext too short: 0 bytes, need at least " + need));
}

TEMPLATE_TEST_CASE("Aead: Decrypt rejects every truncation of a valid ciphertext", "", AEAD_TYPES) {
  FakeRandom random;
  auto aead = MakeAead<TestType>(random);
  auto ciphertext = aead->Encrypt(kPlaintext, kAad);
  REQUIRE_THAT(ciphertext, IsOk());
  for (size_t length = 0; length < ciphertext->size(); ++length) {
    CAPTURE(length);
    auto result = aead->Decrypt(ciphertext->substr(0, length), kAad);
    if (length < TestType::kNonceSize + TestType::kTagSize) {
      CHECK_THAT(result, StatusIs(kInvalid, "ciphertext too short"));
    } else {
      CHECK_THAT(result, StatusIs(kInvalid, "authentication failed"));
    }
  }
}

TEMPLATE_TEST_CASE("Aead: Decrypt rejects a ciphertext with an appended byte", "", AEAD_TYPES) {
  FakeRandom random;
  auto aead = MakeAead<TestType>(random);
  auto ciphertext = aead->Encrypt(kPlaintext, kAad);
  REQUIRE_THAT(ciphertext, IsOk());
  CHECK_THAT(aead->Decrypt(*ciphertext + '\0', kAad), StatusIs(kInvalid, "authentication failed"));
}

TEMPLATE_TEST_CASE("Aead: flipping any bit of nonce, ciphertext or tag fails authentication", "", AEAD_TYPES) {
  FakeRandom random;
  auto aead = MakeAead<TestType>(random);
  auto ciphertext = aead->Encrypt(kPlaintext, kAad);
  REQUIRE_THAT(ciphertext, IsOk());
  size_t rejected = 0;
  for (size_t i = 0; i < ciphertext->size(); ++i) {
    for (int bit = 0; bit < 8; ++bit) {
      std::string tampered = *ciphertext;
      tampered[i] = static_cast<char>(tampered[i] ^ (1 << bit));
      auto result = aead->Decrypt(tampered, kAad);
      if (!result.ok() && result.status().code() == kInvalid &&
          result.status().message() == "authentication failed") {
        ++rejected;
      } else {
        FAIL_CHECK("accepted a ciphertext with byte " << i << " bit " << bit << " flipped");
      }
    }
  }
  CHECK(rejected == ciphertext->size() * 8);
}

TEMPLATE_TEST_CASE("Aead: wrong associated data fails authentication", "", AEAD_TYPES) {
  FakeRandom random;
  auto aead = MakeAead<TestType>(random);
  auto ciphertext = aead->Encrypt(kPlaintext, kAad);
  REQUIRE_THAT(ciphertext, IsOk());
  std::string flipped = kAad;
  flipped.back() ^= 0x01;
  for (const std::string& aad : {std::string(), kAad.substr(1), kAad + "x", flipped, kAad.substr(0, kAad.size() - 1)}) {
    CAPTURE(aad);
    CHECK_THAT(aead->Decrypt(*ciphertext, aad), StatusIs(kInvalid, "authentication failed"));
  }
}

TEMPLATE_TEST_CASE("Aead: a different key fails authentication", "", AEAD_TYPES) {
  FakeRandom random;
  auto writer = MakeAead<TestType>(random, '\x42');
  auto reader = MakeAead<TestType>(random, '\x43');
  auto ciphertext = writer->Encrypt(kPlaintext, kAad);
  REQUIRE_THAT(ciphertext, IsOk());
  CHECK_THAT(reader->Decrypt(*ciphertext, kAad), StatusIs(kInvalid, "authentication failed"));
}

TEMPLATE_TEST_CASE("Aead: a failed Decrypt carries no plaintext or key bytes in its error", "", AEAD_TYPES) {
  FakeRandom random;
  auto aead = MakeAead<TestType>(random, 'K');
  auto ciphertext = aead->Encrypt(kPlaintext, kAad);
  REQUIRE_THAT(ciphertext, IsOk());
  std::string tampered = *ciphertext;
  tampered.back() ^= 0x80;
  auto result = aead->Decrypt(tampered, kAad);
  REQUIRE_FALSE(result.ok());
  const std::string message(result.status().message());
  CHECK(message == "authentication failed");
  CHECK(message.find("KKKK") == std::string::npos);
  CHECK(message.find(HexEncode(std::string(4, 'K'))) == std::string::npos);
  CHECK(message.find(kPlaintext.substr(0, 8)) == std::string::npos);
}

TEMPLATE_TEST_CASE("Aead: Seal and Open reject a nonce of the wrong size", "", AEAD_TYPES) {
  FakeRandom random;
  auto aead = MakeAead<TestType>(random);
  const std::string good_nonce(TestType::kNonceSize, '\x01');
  auto sealed = aead->Seal(good_nonce, kPlaintext, kAad);
  REQUIRE_THAT(sealed, IsOk());
  for (size_t size : {size_t{0}, size_t{8}, TestType::kNonceSize - 1, TestType::kNonceSize + 1, size_t{32}}) {
    CAPTURE(size);
    const std::string nonce(size, '\x01');
    CHECK_THAT(aead->Seal(nonce, kPlaintext, kAad), StatusIs(kInvalid, "nonce must be"));
    CHECK_THAT(aead->Open(nonce, *sealed, kAad), StatusIs(kInvalid, "nonce must be"));
  }
}

TEMPLATE_TEST_CASE("Aead: Open rejects input shorter than the tag", "", AEAD_TYPES) {
  FakeRandom random;
  auto aead = MakeAead<TestType>(random);
  const std::string nonce(TestType::kNonceSize, '\x01');
  CHECK_THAT(aead->Open(nonce, "", kAad), StatusIs(kInvalid, "ciphertext too short: 0 bytes, need at least 16"));
  CHECK_THAT(aead->Open(nonce, std::string(15, 'x'), kAad),
             StatusIs(kInvalid, "ciphertext too short: 15 bytes, need at least 16"));
  CHECK_THAT(aead->Open(nonce, std::string(16, 'x'), kAad), StatusIs(kInvalid, "authentication failed"));
}

TEMPLATE_TEST_CASE("Aead: a ciphertext made with another nonce does not open under this one", "", AEAD_TYPES) {
  FakeRandom random;
  auto aead = MakeAead<TestType>(random);
  const std::string nonce_a(TestType::kNonceSize, '\x01');
  const std::string nonce_b(TestType::kNonceSize, '\x02');
  auto sealed = aead->Seal(nonce_a, kPlaintext, kAad);
  REQUIRE_THAT(sealed, IsOk());
  CHECK_THAT(aead->Open(nonce_b, *sealed, kAad), StatusIs(kInvalid, "authentication failed"));
  CHECK_THAT(aead->Open(nonce_a, *sealed, kAad), IsOk());
}

TEMPLATE_TEST_CASE("Aead: the key is copied, so the caller's key may be destroyed", "", AEAD_TYPES) {
  FakeRandom random;
  std::unique_ptr<TestType> aead;
  {
    SecretBytes key = TestKey();
    auto made = TestType::New(key, random);
    REQUIRE_THAT(made, IsOk());
    aead = *std::move(made);
  }
  auto other = MakeAead<TestType>(random);
  auto ciphertext = aead->Encrypt(kPlaintext, kAad);
  REQUIRE_THAT(ciphertext, IsOk());
  CHECK_THAT(other->Decrypt(*ciphertext, kAad), IsOk());
}

TEMPLATE_TEST_CASE("Aead: concurrent calls on one instance all succeed", "", AEAD_TYPES) {
  auto aead = MakeAead<TestType>(SystemRandom());
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      const std::string plaintext = kPlaintext + std::to_string(t);
      for (int i = 0; i < 200; ++i) {
        auto ciphertext = aead->Encrypt(plaintext, kAad);
        auto decrypted = ciphertext.ok() ? aead->Decrypt(*ciphertext, kAad) : ciphertext.status();
        if (!decrypted.ok() || decrypted->view() != plaintext) {
          ++failures;
        }
      }
    });
  }
  for (auto& thread : threads) {
    thread.join();
  }
  CHECK(failures.load() == 0);
}

TEST_CASE("AesGcmAead: ciphertext does not open under XChaCha20-Poly1305 with the same key") {
  FakeRandom random;
  auto gcm = MakeAead<AesGcmAead>(random);
  auto xchacha = MakeAead<XChaCha20Poly1305Aead>(random);
  auto ciphertext = gcm->Encrypt(std::string(40, 'z'), kAad);
  REQUIRE_THAT(ciphertext, IsOk());
  CHECK_THAT(xchacha->Decrypt(*ciphertext, kAad), StatusIs(kInvalid, "authentication failed"));
}

TEST_CASE("XChaCha20Poly1305Aead: ciphertext does not open under AES-256-GCM with the same key") {
  FakeRandom random;
  auto gcm = MakeAead<AesGcmAead>(random);
  auto xchacha = MakeAead<XChaCha20Poly1305Aead>(random);
  auto ciphertext = xchacha->Encrypt(kPlaintext, kAad);
  REQUIRE_THAT(ciphertext, IsOk());
  CHECK_THAT(gcm->Decrypt(*ciphertext, kAad), StatusIs(kInvalid, "authentication failed"));
}

}  // namespace
}  // namespace kmsplugin::crypto
