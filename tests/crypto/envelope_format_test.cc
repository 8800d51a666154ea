#include "crypto/envelope_format.h"

#include <openssl/sha.h>

#include <string>

#include <catch2/catch.hpp>

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
using ::kmsplugin::testing::StatusIs;
constexpr auto kInvalid = absl::StatusCode::kInvalidArgument;

std::string Sha256Hex(std::string_view bytes) {
  uint8_t digest[SHA256_DIGEST_LENGTH];
  SHA256(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), digest);
  return HexEncode(std::string_view(reinterpret_cast<const char*>(digest), sizeof(digest)));
}

// ---- Golden vectors. These bytes are frozen: a change here breaks every ciphertext in every etcd. ----
// They were computed independently of this code (a Python model of FORMAT.md, with XChaCha20-Poly1305 built
// from HChaCha20 + the cryptography package's ChaCha20-Poly1305). Golden A is the worked example in FORMAT.md.

// Golden A: local key source, environment "prod", key reference "local:v3:1800000000", and a real wrap:
// XChaCha20-Poly1305 with key 00..1f, nonce 40..57, plaintext a0..bf, associated data as below.
const EnvelopeHeader kHeaderA{KeySourceKind::kLocal, "prod", "local:v3:1800000000"};
constexpr char kAadAHex[] =
    "6b6d73706c7567696e2f656e76656c6f70652f7631"  // "kmsplugin/envelope/v1"
    "00"                                          // separator
    "01" "01" "04" "70726f64"                     // version, kind local, 4, "prod"
    "13" "6c6f63616c3a76333a31383030303030303030";  // 19, "local:v3:1800000000"
constexpr char kWrappedAHex[] =
    "404142434445464748494a4b4c4d4e4f5051525354555657"                  // nonce (24)
    "7498a7d37445dfb1275d2d150331cb3d220b1f77a7ece52dd28847feb5b99d2f"  // ciphertext (32)
    "77f050e3c5ef49ca485e2e7f525f5c7b";                                 // tag (16)
constexpr char kEnvelopeAHex[] =
    "01" "01" "04" "70726f64" "13" "6c6f63616c3a76333a31383030303030303030"
    "0048"
    "404142434445464748494a4b4c4d4e4f5051525354555657"
    "7498a7d37445dfb1275d2d150331cb3d220b1f77a7ece52dd28847feb5b99d2f"
    "77f050e3c5ef49ca485e2e7f525f5c7b";

// Golden B: the smallest envelope (vault, "a", "k", one wrapped byte 0x00).
constexpr char kEnvelopeBHex[] = "01020161016b000100";
constexpr char kAadBHex[] = "6b6d73706c7567696e2f656e76656c6f70652f76310001020161016b";

// Golden C: the largest envelope, exactly 1024 bytes: pkcs11, a 63-byte name, a 255-byte key reference
// (bytes i % 256), and 700 wrapped bytes ((7*i) % 256). Frozen by its SHA-256.
constexpr char kEnvironmentC[] = "abcdefghijklmnopqrstuvwxyz0123456789-abcdefghijklmnopqrstuvwxyz";
constexpr char kEnvelopeCSha256[] = "6d73b7bcb902305c7d3551fc66b2a48bae4298c10b0b3cbe204bedee2261e1c8";

Envelope EnvelopeC() {
  Envelope envelope;
  envelope.header = {KeySourceKind::kPkcs11, kEnvironmentC, ""};
  for (int i = 0; i < 255; ++i) {
    envelope.header.key_ref.push_back(static_cast<char>(i % 256));
  }
  for (int i = 0; i < 700; ++i) {
    envelope.wrapped.push_back(static_cast<char>((7 * i) % 256));
  }
  return envelope;
}

Envelope ValidEnvelope() { return Envelope{kHeaderA, HexDecode(kWrappedAHex)}; }
std::string ValidBytes() { return HexDecode(kEnvelopeAHex); }

TEST_CASE("EncodeEnvelope: golden A (worked example in FORMAT.md) is byte-exact") {
  auto encoded = EncodeEnvelope(ValidEnvelope());
  REQUIRE_THAT(encoded, IsOk());
  CHECK(HexEncode(*encoded) == kEnvelopeAHex);
  CHECK(encoded->size() == 101);
}

TEST_CASE("EnvelopeAssociatedData: golden A is byte-exact") {
  CHECK(HexEncode(EnvelopeAssociatedData(kHeaderA)) == kAadAHex);
}

TEST_CASE("EnvelopeAssociatedData: golden A's wrap reproduces with XChaCha20-Poly1305") {
  FakeRandom random;
  std::string key;
  for (int i = 0; i < 32; ++i) key.push_back(static_cast<char>(i));
  std::string nonce;
  for (int i = 0x40; i < 0x58; ++i) nonce.push_back(static_cast<char>(i));
  std::string dek;
  for (int i = 0xa0; i < 0xc0; ++i) dek.push_back(static_cast<char>(i));
  auto aead = XChaCha20Poly1305Aead::New(SecretBytes::CopyOf(std::string_view(key)), random);
  REQUIRE_THAT(aead, IsOk());
  auto sealed = (*aead)->Seal(nonce, dek, EnvelopeAssociatedData(kHeaderA));
  REQUIRE_THAT(sealed, IsOk());
  CHECK(HexEncode(nonce + *sealed) == kWrappedAHex);
  // And the header binding works: parse golden A, rebuild the AAD from what was parsed, unwrap.
  auto parsed = ParseEnvelope(ValidBytes());
  REQUIRE_THAT(parsed, IsOk());
  auto unwrapped = (*aead)->Decrypt(parsed->wrapped, EnvelopeAssociatedData(parsed->header));
  REQUIRE_THAT(unwrapped, IsOk());
  CHECK(unwrapped->view() == dek);
}

TEST_CASE("EncodeEnvelope: golden B (smallest) is byte-exact") {
  Envelope envelope{{KeySourceKind::kVault, "a", "k"}, std::string(1, '\0')};
  auto encoded = EncodeEnvelope(envelope);
  REQUIRE_THAT(encoded, IsOk());
  CHECK(HexEncode(*encoded) == kEnvelopeBHex);
  CHECK(HexEncode(EnvelopeAssociatedData(envelope.header)) == kAadBHex);
}

TEST_CASE("EncodeEnvelope: golden C (largest, 1024 bytes) is byte-exact") {
  auto encoded = EncodeEnvelope(EnvelopeC());
  REQUIRE_THAT(encoded, IsOk());
  CHECK(encoded->size() == kMaxEnvelopeSize);
  CHECK(Sha256Hex(*encoded) == kEnvelopeCSha256);
}

TEST_CASE("ParseEnvelope: golden vectors parse to their fields") {
  auto a = ParseEnvelope(ValidBytes());
  REQUIRE_THAT(a, IsOk());
  CHECK(a->header.kind == KeySourceKind::kLocal);
  CHECK(a->header.environment == "prod");
  CHECK(a->header.key_ref == "local:v3:1800000000");
  CHECK(a->wrapped == HexDecode(kWrappedAHex));
  auto b = ParseEnvelope(HexDecode(kEnvelopeBHex));
  REQUIRE_THAT(b, IsOk());
  CHECK(b->header.kind == KeySourceKind::kVault);
  CHECK(b->header.environment == "a");
  CHECK(b->header.key_ref == "k");
  CHECK(b->wrapped == std::string(1, '\0'));
}

TEST_CASE("ParseEnvelope: round trip of every kind and of boundary sizes") {
  const Envelope c = EnvelopeC();
  for (KeySourceKind kind : {KeySourceKind::kLocal, KeySourceKind::kVault, KeySourceKind::kPkcs11}) {
    for (const Envelope& original :
         {ValidEnvelope(), Envelope{{kind, "a", "k"}, "w"}, Envelope{{kind, "dev-1", std::string(255, '\xff')}, "x"},
          Envelope{{kind, kEnvironmentC, c.header.key_ref}, c.wrapped}}) {
      Envelope envelope = original;
      envelope.header.kind = kind;
      auto encoded = EncodeEnvelope(envelope);
      REQUIRE_THAT(encoded, IsOk());
      auto parsed = ParseEnvelope(*encoded);
      REQUIRE_THAT(parsed, IsOk());
      CHECK(parsed->header.kind == envelope.header.kind);
      CHECK(parsed->header.environment == envelope.header.environment);
      CHECK(parsed->header.key_ref == envelope.header.key_ref);
      CHECK(parsed->wrapped == envelope.wrapped);
    }
  }
}

TEST_CASE("KeySourceKindName: names the known kinds and shows the byte of unknown ones") {
  CHECK(KeySourceKindName(KeySourceKind::kLocal) == "local");
  CHECK(KeySourceKindName(KeySourceKind::kVault) == "vault");
  CHECK(KeySourceKindName(KeySourceKind::kPkcs11) == "pkcs11");
  CHECK(KeySourceKindName(static_cast<KeySourceKind>(0x09)) == "unknown(0x09)");
  CHECK(KeySourceKindName(static_cast<KeySourceKind>(0x00)) == "unknown(0x00)");
}

// ---- EnvelopeAssociatedData binds every header field. ----

TEST_CASE("EnvelopeAssociatedData: differs when any header field differs") {
  const std::string base = EnvelopeAssociatedData(kHeaderA);
  CHECK(EnvelopeAssociatedData({KeySourceKind::kVault, "prod", kHeaderA.key_ref}) != base);
  CHECK(EnvelopeAssociatedData({KeySourceKind::kLocal, "prod2", kHeaderA.key_ref}) != base);
  CHECK(EnvelopeAssociatedData({KeySourceKind::kLocal, "prod", "local:v4:1800000000"}) != base);
  // Length prefixes keep the boundary between environment and key reference unambiguous.
  CHECK(EnvelopeAssociatedData({KeySourceKind::kLocal, "ab", "c"}) !=
        EnvelopeAssociatedData({KeySourceKind::kLocal, "a", "bc"}));
}

TEST_CASE("EnvelopeAssociatedData: starts with the label and a zero byte") {
  const std::string aad = EnvelopeAssociatedData(kHeaderA);
  REQUIRE(aad.size() > kEnvelopeAadLabel.size());
  CHECK(aad.substr(0, kEnvelopeAadLabel.size()) == kEnvelopeAadLabel);
  CHECK(aad[kEnvelopeAadLabel.size()] == '\0');
  // The rest equals the envelope's header bytes before the wrapped length.
  CHECK(aad.substr(kEnvelopeAadLabel.size() + 1) == ValidBytes().substr(0, 4 + 4 + 19));
}

TEST_CASE("EnvelopeAssociatedData: a header edited in the envelope fails to unwrap") {
  FakeRandom random;
  auto aead = XChaCha20Poly1305Aead::New(random.NewSecret(32), random);
  REQUIRE_THAT(aead, IsOk());
  const EnvelopeHeader header{KeySourceKind::kLocal, "prod", "v1"};
  auto wrapped = (*aead)->Encrypt("dek", EnvelopeAssociatedData(header));
  REQUIRE_THAT(wrapped, IsOk());
  for (const EnvelopeHeader& edited : {EnvelopeHeader{KeySourceKind::kLocal, "test", "v1"},
                                       EnvelopeHeader{KeySourceKind::kLocal, "prod", "v2"},
                                       EnvelopeHeader{KeySourceKind::kVault, "prod", "v1"}}) {
    auto encoded = EncodeEnvelope({edited, *wrapped});
    REQUIRE_THAT(encoded, IsOk());
    auto parsed = ParseEnvelope(*encoded);
    REQUIRE_THAT(parsed, IsOk());
    CHECK_THAT((*aead)->Decrypt(parsed->wrapped, EnvelopeAssociatedData(parsed->header)),
               StatusIs(kInvalid, "authentication failed"));
  }
}

// ---- ValidateEnvelopeHeader / EncodeEnvelope negatives. ----

TEST_CASE("ValidateEnvelopeHeader: accepts a valid header") {
  CHECK_THAT(ValidateEnvelopeHeader(kHeaderA), IsOk());
}

TEST_CASE("ValidateEnvelopeHeader: rejects an unknown key source kind") {
  for (int kind : {0x00, 0x04, 0x09, 0xff}) {
    CAPTURE(kind);
    EnvelopeHeader header = kHeaderA;
    header.kind = static_cast<KeySourceKind>(kind);
    CHECK_THAT(ValidateEnvelopeHeader(header), StatusIs(kInvalid, "unknown key source kind 0x"));
  }
}

TEST_CASE("ValidateEnvelopeHeader: rejects an empty environment name") {
  CHECK_THAT(ValidateEnvelopeHeader({KeySourceKind::kLocal, "", "v1"}),
             StatusIs(kInvalid, "environment name is empty"));
}

TEST_CASE("ValidateEnvelopeHeader: rejects an environment name over 63 bytes") {
  CHECK_THAT(ValidateEnvelopeHeader({KeySourceKind::kLocal, std::string(64, 'a'), "v1"}),
             StatusIs(kInvalid, "environment name is 64 bytes; at most 63"));
  CHECK_THAT(ValidateEnvelopeHeader({KeySourceKind::kLocal, std::string(63, 'a'), "v1"}), IsOk());
}

TEST_CASE("ValidateEnvelopeHeader: rejects environment names outside [a-z0-9-]") {
  for (const std::string& name : {std::string("Prod"), std::string("prod_1"), std::string("pro d"),
                                  std::string("prod."), std::string("pr\0d", 4), std::string("\xc3\xa9t\xc3\xa9"),
                                  std::string("prod/x")}) {
    CAPTURE(name);
    CHECK_THAT(ValidateEnvelopeHeader({KeySourceKind::kLocal, name, "v1"}),
               StatusIs(kInvalid, "environment name has byte 0x"));
  }
  CHECK_THAT(ValidateEnvelopeHeader({KeySourceKind::kLocal, "Prod", "v1"}),
             StatusIs(kInvalid, "environment name has byte 0x50 at position 0"));
  CHECK_THAT(ValidateEnvelopeHeader({KeySourceKind::kLocal, "0-a-9-z", "v1"}), IsOk());
}

TEST_CASE("ValidateEnvelopeHeader: rejects an empty key reference") {
  CHECK_THAT(ValidateEnvelopeHeader({KeySourceKind::kLocal, "prod", ""}),
             StatusIs(kInvalid, "key reference is empty"));
}

TEST_CASE("ValidateEnvelopeHeader: rejects a key reference over 255 bytes") {
  CHECK_THAT(ValidateEnvelopeHeader({KeySourceKind::kLocal, "prod", std::string(256, 'k')}),
             StatusIs(kInvalid, "key reference is 256 bytes; at most 255"));
}

TEST_CASE("EncodeEnvelope: rejects an invalid header") {
  CHECK_THAT(EncodeEnvelope({{KeySourceKind::kLocal, "", "v1"}, "w"}), StatusIs(kInvalid, "environment name"));
  CHECK_THAT(EncodeEnvelope({{KeySourceKind::kLocal, "prod", ""}, "w"}), StatusIs(kInvalid, "key reference"));
  CHECK_THAT(EncodeEnvelope({{static_cast<KeySourceKind>(7), "prod", "v1"}, "w"}),
             StatusIs(kInvalid, "unknown key source kind 0x07"));
}

TEST_CASE("EncodeEnvelope: rejects an empty wrapped key") {
  CHECK_THAT(EncodeEnvelope({kHeaderA, ""}), StatusIs(kInvalid, "wrapped key is empty"));
}

TEST_CASE("EncodeEnvelope: rejects a result over 1024 bytes") {
  Envelope envelope = EnvelopeC();
  envelope.wrapped.push_back('x');
  CHECK_THAT(EncodeEnvelope(envelope), StatusIs(kInvalid, "ciphertext would be 1025 bytes; at most 1024"));
  envelope.wrapped = std::string(70000, 'x');  // over the uint16 range too
  CHECK_THAT(EncodeEnvelope(envelope), StatusIs(kInvalid, "at most 1024"));
}

// ---- ParseEnvelope negatives: one per error path. ----

TEST_CASE("ParseEnvelope: rejects empty input") {
  CHECK_THAT(ParseEnvelope(""), StatusIs(kInvalid, "ciphertext is empty"));
}

TEST_CASE("ParseEnvelope: rejects input over 1024 bytes before reading it") {
  CHECK_THAT(ParseEnvelope(std::string(2000, '\x01')), StatusIs(kInvalid, "ciphertext is 2000 bytes; at most 1024"));
  CHECK_THAT(ParseEnvelope(std::string(1025, '\x01')), StatusIs(kInvalid, "ciphertext is 1025 bytes; at most 1024"));
}

TEST_CASE("ParseEnvelope: rejects an unsupported format version, naming the byte") {
  std::string bytes = ValidBytes();
  bytes[0] = '\x07';
  CHECK_THAT(ParseEnvelope(bytes),
             StatusIs(kInvalid, "unsupported ciphertext format version 0x07 (this build reads 0x01)"));
  for (int version : {0x00, 0x02, 0x80, 0xff}) {
    bytes[0] = static_cast<char>(version);
    CHECK_THAT(ParseEnvelope(bytes), StatusIs(kInvalid, "unsupported ciphertext format version"));
  }
  // A KMS v1 "k8s:enc:" prefix or JSON are not our format either.
  CHECK_THAT(ParseEnvelope("k8s:enc:kms:v1:x:"), StatusIs(kInvalid, "version 0x6b"));
}

TEST_CASE("ParseEnvelope: rejects an unknown key source kind") {
  std::string bytes = ValidBytes();
  bytes[1] = '\x09';
  CHECK_THAT(ParseEnvelope(bytes), StatusIs(kInvalid, "unknown key source kind 0x09"));
  bytes[1] = '\x00';
  CHECK_THAT(ParseEnvelope(bytes), StatusIs(kInvalid, "unknown key source kind 0x00"));
}

TEST_CASE("ParseEnvelope: rejects a zero environment length") {
  CHECK_THAT(ParseEnvelope(HexDecode("010100016b000100")), StatusIs(kInvalid, "environment name is empty"));
}

TEST_CASE("ParseEnvelope: rejects an environment length over 63") {
  std::string bytes = ValidBytes();
  bytes[2] = '\x40';
  CHECK_THAT(ParseEnvelope(bytes), StatusIs(kInvalid, "environment name length is 64; at most 63"));
  bytes[2] = '\xff';
  CHECK_THAT(ParseEnvelope(bytes), StatusIs(kInvalid, "environment name length is 255"));
}

TEST_CASE("ParseEnvelope: rejects a bad character in the environment name") {
  std::string bytes = ValidBytes();
  bytes[4] = 'R';  // "pRod"
  CHECK_THAT(ParseEnvelope(bytes), StatusIs(kInvalid, "environment name has byte 0x52 at position 1"));
}

TEST_CASE("ParseEnvelope: rejects a zero key reference length") {
  CHECK_THAT(ParseEnvelope(HexDecode("0101016100000100")), StatusIs(kInvalid, "key reference is empty"));
}

TEST_CASE("ParseEnvelope: rejects a key reference longer than the input") {
  // key reference length 40, but only 12 bytes in total.
  CHECK_THAT(ParseEnvelope(HexDecode("01010161" "28" "6b6b6b6b6b6b6b")),
             StatusIs(kInvalid, "ciphertext truncated in key reference: need 45 bytes, have 12"));
}

TEST_CASE("ParseEnvelope: rejects a zero wrapped length") {
  CHECK_THAT(ParseEnvelope(HexDecode("01010161016b0000")), StatusIs(kInvalid, "wrapped key is empty"));
}

TEST_CASE("ParseEnvelope: rejects a wrapped length beyond the input") {
  CHECK_THAT(ParseEnvelope(HexDecode("01010161016b0003aabb")),
             StatusIs(kInvalid, "ciphertext truncated in wrapped key: need 11 bytes, have 10"));
  CHECK_THAT(ParseEnvelope(HexDecode("01010161016bffffaabb")),
             StatusIs(kInvalid, "ciphertext truncated in wrapped key: need 65543 bytes, have 10"));
}

TEST_CASE("ParseEnvelope: rejects trailing bytes after the wrapped key") {
  CHECK_THAT(ParseEnvelope(ValidBytes() + "abc"), StatusIs(kInvalid, "3 trailing bytes after wrapped key"));
  CHECK_THAT(ParseEnvelope(ValidBytes() + std::string(1, '\0')),
             StatusIs(kInvalid, "1 trailing bytes after wrapped key"));
}

TEST_CASE("ParseEnvelope: a wrapped length one short leaves one trailing byte") {
  std::string bytes = ValidBytes();
  bytes[4 + 4 + 19 + 1] = '\x47';  // 0x0048 -> 0x0047
  CHECK_THAT(ParseEnvelope(bytes), StatusIs(kInvalid, "1 trailing bytes after wrapped key"));
}

TEST_CASE("ParseEnvelope: every truncation of a valid envelope is rejected and names the field") {
  const std::string bytes = ValidBytes();
  // Field boundaries of golden A: version [0,1), kind [1,2), env len [2,3), env [3,7), ref len [7,8),
  // ref [8,27), wrapped len [27,29), wrapped [29,101).
  auto field_at = [](size_t length) -> std::string {
    if (length < 2) return "key source kind";
    if (length < 3) return "environment length";
    if (length < 7) return "environment name";
    if (length < 8) return "key reference length";
    if (length < 27) return "key reference";
    if (length < 29) return "wrapped key length";
    return "wrapped key";
  };
  for (size_t length = 0; length < bytes.size(); ++length) {
    CAPTURE(length);
    auto parsed = ParseEnvelope(bytes.substr(0, length));
    if (length == 0) {
      CHECK_THAT(parsed, StatusIs(kInvalid, "ciphertext is empty"));
    } else {
      CHECK_THAT(parsed, StatusIs(kInvalid, "ciphertext truncated in " + field_at(length) + ": need "));
    }
  }
  CHECK_THAT(ParseEnvelope(bytes), IsOk());
}

TEST_CASE("ParseEnvelope: every truncation of the largest envelope is rejected") {
  auto encoded = EncodeEnvelope(EnvelopeC());
  REQUIRE_THAT(encoded, IsOk());
  size_t rejected = 0;
  for (size_t length = 0; length < encoded->size(); ++length) {
    auto parsed = ParseEnvelope(std::string_view(*encoded).substr(0, length));
    if (!parsed.ok() && parsed.status().code() == kInvalid) {
      ++rejected;
    } else {
      FAIL_CHECK("prefix of length " << length << " was not rejected");
    }
  }
  CHECK(rejected == encoded->size());
}

TEST_CASE("ParseEnvelope: 20000 deterministic random mutations never crash and parse or fail cleanly") {
  FakeRandom random("envelope-mutations");
  const std::string seeds[] = {ValidBytes(), HexDecode(kEnvelopeBHex), *EncodeEnvelope(EnvelopeC())};
  size_t parsed_count = 0;
  size_t rejected_count = 0;
  for (int i = 0; i < 20000; ++i) {
    uint8_t choice[4];
    random.Fill(absl::MakeSpan(choice));
    std::string bytes = seeds[choice[0] % 3];
    const int flips = 1 + choice[1] % 4;
    for (int f = 0; f < flips; ++f) {
      uint8_t r[3];
      random.Fill(absl::MakeSpan(r));
      const size_t at = ((size_t{r[0]} << 8) | r[1]) % bytes.size();
      bytes[at] = static_cast<char>(r[2]);
    }
    if (choice[2] % 8 == 0) {  // sometimes also cut or extend
      bytes.resize(choice[3] % (bytes.size() + 3), '\x01');
    }
    auto result = ParseEnvelope(bytes);
    if (result.ok()) {
      ++parsed_count;
      // Whatever parses must re-encode to exactly the same bytes: the format has one encoding per value.
      auto again = EncodeEnvelope(*result);
      REQUIRE_THAT(again, IsOk());
      REQUIRE(*again == bytes);
    } else {
      REQUIRE_THAT(result, StatusIs(kInvalid));
      ++rejected_count;
    }
  }
  CHECK(parsed_count + rejected_count == 20000);
  // Both outcomes occur, so the loop exercises the parser's accept path and its error paths.
  CHECK(parsed_count > 0);
  CHECK(rejected_count > 0);
}

}  // namespace
}  // namespace kmsplugin::crypto
