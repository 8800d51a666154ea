#include "crypto/hkdf.h"

#include <string>

#include <catch2/catch.hpp>

#include "tests/crypto/crypto_test_util.h"
#include "tests/support/status_matchers.h"

namespace kmsplugin::crypto {
namespace {

using ::kmsplugin::testing::HexDecode;
using ::kmsplugin::testing::HexEncode;
using ::kmsplugin::testing::IsOk;
using ::kmsplugin::testing::StatusIs;
constexpr auto kInvalid = absl::StatusCode::kInvalidArgument;

// RFC 5869 appendix A.1 (test case 1).
const std::string kIkm = HexDecode("0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b");
const std::string kSalt = HexDecode("000102030405060708090a0b0c");
const std::string kInfo = HexDecode("f0f1f2f3f4f5f6f7f8f9");
const std::string kPrk = HexDecode("077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5");
const std::string kOkm =
    "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865";

TEST_CASE("HkdfSha256: reproduces RFC 5869 test case 1") {
  auto okm = HkdfSha256(kIkm, kSalt, kInfo, 42);
  REQUIRE_THAT(okm, IsOk());
  CHECK(HexEncode(okm->view()) == kOkm);
}

TEST_CASE("HkdfSha256Expand: reproduces RFC 5869 test case 1 from its PRK") {
  auto okm = HkdfSha256Expand(kPrk, kInfo, 42);
  REQUIRE_THAT(okm, IsOk());
  CHECK(HexEncode(okm->view()) == kOkm);
}

TEST_CASE("HkdfSha256: RFC 5869 test case 3 (empty salt and info)") {
  auto okm = HkdfSha256(kIkm, "", "", 42);
  REQUIRE_THAT(okm, IsOk());
  CHECK(HexEncode(okm->view()) ==
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8");
}

TEST_CASE("HkdfSha256: rejects output length 0") {
  CHECK_THAT(HkdfSha256(kIkm, kSalt, kInfo, 0), StatusIs(kInvalid, "output length must be 1..8160 bytes, got 0"));
}

TEST_CASE("HkdfSha256: rejects output length over 255*32") {
  CHECK_THAT(HkdfSha256(kIkm, kSalt, kInfo, 8161), StatusIs(kInvalid, "got 8161"));
  CHECK_THAT(HkdfSha256(kIkm, kSalt, kInfo, size_t{1} << 40), StatusIs(kInvalid, "output length"));
}

TEST_CASE("HkdfSha256Expand: rejects output length 0 and over 255*32") {
  CHECK_THAT(HkdfSha256Expand(kPrk, kInfo, 0), StatusIs(kInvalid, "output length"));
  CHECK_THAT(HkdfSha256Expand(kPrk, kInfo, 8161), StatusIs(kInvalid, "output length"));
}

TEST_CASE("HkdfSha256Expand: rejects an empty pseudorandom key") {
  CHECK_THAT(HkdfSha256Expand("", kInfo, 32), StatusIs(kInvalid, "pseudorandom key is empty"));
}

TEST_CASE("HkdfSha256: the maximum length 255*32 is allowed in both modes") {
  auto full = HkdfSha256(kIkm, kSalt, kInfo, 8160);
  REQUIRE_THAT(full, IsOk());
  CHECK(full->size() == 8160);
  auto expanded = HkdfSha256Expand(kPrk, kInfo, 8160);
  REQUIRE_THAT(expanded, IsOk());
  CHECK(full->Equals(*expanded));
}

TEST_CASE("HkdfSha256: a shorter output is a prefix of a longer one") {
  auto short_okm = HkdfSha256(kIkm, kSalt, kInfo, 20);
  auto long_okm = HkdfSha256(kIkm, kSalt, kInfo, 100);
  REQUIRE_THAT(short_okm, IsOk());
  REQUIRE_THAT(long_okm, IsOk());
  CHECK(long_okm->view().substr(0, 20) == short_okm->view());
}

TEST_CASE("HkdfSha256: different info, salt or ikm give different keys") {
  auto base = HkdfSha256(kIkm, kSalt, kInfo, 32);
  REQUIRE_THAT(base, IsOk());
  auto other_info = HkdfSha256(kIkm, kSalt, kInfo + "x", 32);
  auto other_salt = HkdfSha256(kIkm, kSalt + "x", kInfo, 32);
  auto other_ikm = HkdfSha256(kIkm + "x", kSalt, kInfo, 32);
  REQUIRE_THAT(other_info, IsOk());
  REQUIRE_THAT(other_salt, IsOk());
  REQUIRE_THAT(other_ikm, IsOk());
  CHECK_FALSE(base->Equals(*other_info));
  CHECK_FALSE(base->Equals(*other_salt));
  CHECK_FALSE(base->Equals(*other_ikm));
}

TEST_CASE("HkdfSha256: an empty salt equals a salt of 32 zero bytes (RFC 5869 2.2)") {
  auto empty_salt = HkdfSha256(kIkm, "", kInfo, 32);
  auto zero_salt = HkdfSha256(kIkm, std::string(32, '\0'), kInfo, 32);
  REQUIRE_THAT(empty_salt, IsOk());
  REQUIRE_THAT(zero_salt, IsOk());
  CHECK(empty_salt->Equals(*zero_salt));
}

TEST_CASE("HkdfSha256: an empty ikm is accepted and differs from a one-byte ikm") {
  auto empty = HkdfSha256("", kSalt, kInfo, 32);
  auto one = HkdfSha256(std::string(1, '\0'), kSalt, kInfo, 32);
  REQUIRE_THAT(empty, IsOk());
  REQUIRE_THAT(one, IsOk());
  CHECK_FALSE(empty->Equals(*one));
}

}  // namespace
}  // namespace kmsplugin::crypto
