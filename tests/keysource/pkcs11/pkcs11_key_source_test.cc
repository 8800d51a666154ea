#include "kmsplugin/keysource/pkcs11/pkcs11_key_source.h"

#include <dlfcn.h>
#include <p11-kit/pkcs11.h>
#include <sys/stat.h>

#include <atomic>
#include <map>
#include <cstdio>
#include <set>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "tests/keysource/pkcs11/direct_token.h"
#include "tests/keysource/pkcs11/pkcs11_test_util.h"
#include "tests/support/fake_clock.h"

namespace kmsplugin::keysource::pkcs11 {
namespace {

using ::kmsplugin::testing::DirectToken;
using ::kmsplugin::testing::Interposer;
using ::kmsplugin::testing::IsOk;
using ::kmsplugin::testing::kAad;
using ::kmsplugin::testing::Soon;
using ::kmsplugin::testing::StatusIs;
using ::kmsplugin::testing::TokenFixture;

const std::string kDek(32, '\x5a');

std::unique_ptr<Pkcs11KeySource> OpenOrDie(const Pkcs11Options& options) {
  auto source = Pkcs11KeySource::Open(options, Soon());
  REQUIRE_THAT(source, IsOk());
  return *std::move(source);
}

core::KeyVersion RotateOrDie(Pkcs11KeySource& source) {
  auto version = source.Rotate(Soon());
  REQUIRE_THAT(version, IsOk());
  return *version;
}

// ---------------------------------------------------------------------------------------------------------------
// Round trips and versions

TEST_CASE("Pkcs11KeySource: wrap then unwrap returns the plaintext", "[pkcs11]") {
  TokenFixture token;
  auto source = OpenOrDie(token.Options());
  const core::KeyVersion v1 = RotateOrDie(*source);
  auto wrapped = source->Wrap(v1, kDek, kAad, Soon());
  REQUIRE_THAT(wrapped, IsOk());
  CHECK(wrapped->size() == kGcmIvSize + kDek.size() + kGcmTagSize);
  auto plain = source->Unwrap(v1.key_ref, *wrapped, kAad, Soon());
  REQUIRE_THAT(plain, IsOk());
  CHECK(plain->view() == kDek);
}

TEST_CASE("Pkcs11KeySource: two wraps of the same plaintext differ (fresh IV)", "[pkcs11]") {
  TokenFixture token;
  auto source = OpenOrDie(token.Options());
  const core::KeyVersion v1 = RotateOrDie(*source);
  auto a = source->Wrap(v1, kDek, kAad, Soon());
  auto b = source->Wrap(v1, kDek, kAad, Soon());
  REQUIRE_THAT(a, IsOk());
  REQUIRE_THAT(b, IsOk());
  CHECK(a->substr(0, kGcmIvSize) != b->substr(0, kGcmIvSize));
  CHECK(*a != *b);
}

TEST_CASE("Pkcs11KeySource: every version keeps decrypting after rotations", "[pkcs11]") {
  TokenFixture token;
  kmsplugin::testing::FakeClock clock;
  auto options = token.Options();
  options.clock = &clock;
  auto source = OpenOrDie(options);
  std::vector<std::pair<core::KeyVersion, std::string>> sealed;
  for (int i = 1; i <= 4; ++i) {
    clock.Advance(absl::Hours(1));
    const core::KeyVersion version = RotateOrDie(*source);
    CHECK(version.version == static_cast<uint64_t>(i));
    auto current = source->Current();
    REQUIRE_THAT(current, IsOk());
    CHECK(current->key_id == version.key_id);
    CHECK(current->state == core::KeyState::kCurrent);
    auto wrapped = source->Wrap(version, kDek + std::to_string(i), kAad, Soon());
    REQUIRE_THAT(wrapped, IsOk());
    sealed.emplace_back(version, *wrapped);
  }
  // A fresh source (as after a restart) sees the same versions and still opens every ciphertext.
  source.reset();
  auto reopened = OpenOrDie(options);
  auto versions = reopened->Versions();
  REQUIRE_THAT(versions, IsOk());
  REQUIRE(versions->size() == 4);
  CHECK(versions->front().state == core::KeyState::kActive);
  CHECK(versions->back().state == core::KeyState::kCurrent);
  for (size_t i = 0; i < sealed.size(); ++i) {
    auto plain = reopened->Unwrap(sealed[i].first.key_ref, sealed[i].second, kAad, Soon());
    REQUIRE_THAT(plain, IsOk());
    CHECK(plain->view() == kDek + std::to_string(i + 1));
  }
}

TEST_CASE("Pkcs11KeySource: key_id names token, label and creation time and never repeats", "[pkcs11]") {
  TokenFixture token;
  kmsplugin::testing::FakeClock clock;
  auto options = token.Options();
  options.clock = &clock;
  auto source = OpenOrDie(options);
  const core::KeyVersion first = RotateOrDie(*source);
  CHECK(absl::StartsWith(first.key_id, "pkcs11:" + token.serial + "/kmsplugin-test-v1@"));
  CHECK(first.key_id.size() <= 1024);
  CHECK(first.key_ref.size() <= 255);
  CHECK(!absl::StrContains(first.key_id, kmsplugin::testing::kPin));
  auto decoded = DecodeKeyRef(first.key_ref);
  REQUIRE_THAT(decoded, IsOk());
  CHECK(decoded->version == 1);
  CHECK(decoded->created == absl::FromUnixMicros(absl::ToUnixMicros(clock.Now())));
  {
    // Delete the key behind the plugin's back and create version 1 again later: a different key_id.
    DirectToken direct;
    REQUIRE(direct.f()->C_DestroyObject(direct.session(), direct.Find(first.key_ref)) == CKR_OK);
  }
  // The running source cannot tell a token without its keys from one that is away: UNAVAILABLE, view kept.
  CHECK_THAT(source->Refresh(Soon()), StatusIs(absl::StatusCode::kUnavailable));
  CHECK(source->Current()->key_id == first.key_id);
  source.reset();
  // A restart finds an empty token.
  source = OpenOrDie(options);
  CHECK_THAT(source->Current(), StatusIs(absl::StatusCode::kFailedPrecondition));
  clock.Advance(absl::Seconds(1));
  const core::KeyVersion again = RotateOrDie(*source);
  CHECK(again.version == 1);
  CHECK(again.key_id != first.key_id);
  CHECK(again.key_ref != first.key_ref);
  CHECK_THAT(source->Lookup(first.key_ref), StatusIs(absl::StatusCode::kNotFound));
}

TEST_CASE("Pkcs11KeySource: key objects are sensitive, non-extractable, private and GCM-only", "[pkcs11]") {
  TokenFixture token;
  auto source = OpenOrDie(token.Options());
  const core::KeyVersion v1 = RotateOrDie(*source);
  DirectToken direct;
  const CK_OBJECT_HANDLE key = direct.Find(v1.key_ref);
  CHECK(direct.Bool(key, CKA_TOKEN) == CK_TRUE);
  CHECK(direct.Bool(key, CKA_PRIVATE) == CK_TRUE);
  CHECK(direct.Bool(key, CKA_SENSITIVE) == CK_TRUE);
  CHECK(direct.Bool(key, CKA_EXTRACTABLE) == CK_FALSE);
  CHECK(direct.Bool(key, CKA_ENCRYPT) == CK_TRUE);
  CHECK(direct.Bool(key, CKA_DECRYPT) == CK_TRUE);
  CHECK(direct.Bool(key, CKA_WRAP) == CK_FALSE);
  CHECK(direct.Bool(key, CKA_UNWRAP) == CK_FALSE);
  CHECK(direct.Bool(key, CKA_DERIVE) == CK_FALSE);
  CHECK(direct.Bool(key, CKA_SIGN) == CK_FALSE);
  CK_MECHANISM_TYPE allowed[4] = {};
  CK_ATTRIBUTE mechanisms{CKA_ALLOWED_MECHANISMS, allowed, sizeof(allowed)};
  REQUIRE(direct.f()->C_GetAttributeValue(direct.session(), key, &mechanisms, 1) == CKR_OK);
  REQUIRE(mechanisms.ulValueLen == sizeof(CK_MECHANISM_TYPE));
  CHECK(allowed[0] == CKM_AES_GCM);
  uint8_t value[32];
  CK_ATTRIBUTE secret{CKA_VALUE, value, sizeof(value)};
  CHECK(direct.f()->C_GetAttributeValue(direct.session(), key, &secret, 1) == CKR_ATTRIBUTE_SENSITIVE);
  // CBC is not in CKA_ALLOWED_MECHANISMS.
  uint8_t iv[16] = {};
  CK_MECHANISM cbc{CKM_AES_CBC_PAD, iv, sizeof(iv)};
  CHECK(direct.f()->C_EncryptInit(direct.session(), &cbc, key) == CKR_MECHANISM_INVALID);
}

TEST_CASE("Pkcs11KeySource: an empty token has no current version and says how to fix it", "[pkcs11]") {
  TokenFixture token;
  auto source = OpenOrDie(token.Options());
  CHECK_THAT(source->Current(), StatusIs(absl::StatusCode::kFailedPrecondition, "kmsplugin init"));
  CHECK_THAT(source->Current(), StatusIs(absl::StatusCode::kFailedPrecondition, "kmsplugin-test-v<N>"));
  auto versions = source->Versions();
  REQUIRE_THAT(versions, IsOk());
  CHECK(versions->empty());
}

TEST_CASE("Pkcs11KeySource: objects with foreign labels or IDs are not versions", "[pkcs11]") {
  TokenFixture token;
  token.hsm.Run(std::string("pkcs11-tool --module ") + kmsplugin::testing::kSoftHsmModule +
                " --token-label kms --login --pin 1234 --keygen --key-type AES:32 --label kmsplugin-test-v7 "
                "--id 01 --sensitive --private --usage-decrypt");
  token.hsm.Run(std::string("pkcs11-tool --module ") + kmsplugin::testing::kSoftHsmModule +
                " --token-label kms --login --pin 1234 --keygen --key-type AES:32 --label other-v1 "
                "--id 0100000000000000010000000000000001 --sensitive --private --usage-decrypt");
  auto source = OpenOrDie(token.Options());
  CHECK_THAT(source->Current(), StatusIs(absl::StatusCode::kFailedPrecondition));
  CHECK(RotateOrDie(*source).version == 1);
}

// ---------------------------------------------------------------------------------------------------------------
// Refusals of bad input

TEST_CASE("Pkcs11KeySource: empty associated data is refused on wrap and unwrap", "[pkcs11]") {
  TokenFixture token;
  auto source = OpenOrDie(token.Options());
  const core::KeyVersion v1 = RotateOrDie(*source);
  CHECK_THAT(source->Wrap(v1, kDek, "", Soon()), StatusIs(absl::StatusCode::kInvalidArgument, "associated data"));
  auto wrapped = source->Wrap(v1, kDek, kAad, Soon());
  REQUIRE_THAT(wrapped, IsOk());
  CHECK_THAT(source->Unwrap(v1.key_ref, *wrapped, "", Soon()),
             StatusIs(absl::StatusCode::kInvalidArgument, "associated data"));
}

TEST_CASE("Pkcs11KeySource: tampered IV, ciphertext, tag or associated data is rejected", "[pkcs11]") {
  TokenFixture token;
  auto source = OpenOrDie(token.Options());
  const core::KeyVersion v1 = RotateOrDie(*source);
  auto wrapped = source->Wrap(v1, kDek, kAad, Soon());
  REQUIRE_THAT(wrapped, IsOk());
  for (size_t offset : {size_t{0}, size_t{11}, size_t{12}, size_t{43}, size_t{44}, wrapped->size() - 1}) {
    std::string bad = *wrapped;
    bad[offset] ^= 0x01;
    INFO("flipped byte " << offset);
    CHECK_THAT(source->Unwrap(v1.key_ref, bad, kAad, Soon()),
               StatusIs(absl::StatusCode::kInvalidArgument, "does not authenticate"));
  }
  CHECK_THAT(source->Unwrap(v1.key_ref, *wrapped, kAad + "x", Soon()),
             StatusIs(absl::StatusCode::kInvalidArgument, "does not authenticate"));
  CHECK_THAT(source->Unwrap(v1.key_ref, *wrapped + "x", kAad, Soon()), StatusIs(absl::StatusCode::kInvalidArgument));
  // The source still works after the failures (no session left in a half-finished operation).
  CHECK_THAT(source->Unwrap(v1.key_ref, *wrapped, kAad, Soon()), IsOk());
}

TEST_CASE("Pkcs11KeySource: wrapped bytes too short for IV and tag never reach the token", "[pkcs11]") {
  TokenFixture token;
  Interposer interposer;
  auto source = OpenOrDie(token.Options(Interposer::Path()));
  const core::KeyVersion v1 = RotateOrDie(*source);
  const long before = interposer.Count("decrypt_inits");
  for (size_t size : {size_t{0}, size_t{12}, size_t{20}, size_t{28}}) {
    INFO("size " << size);
    CHECK_THAT(source->Unwrap(v1.key_ref, std::string(size, 'a'), kAad, Soon()),
               StatusIs(absl::StatusCode::kInvalidArgument, "malformed"));
  }
  CHECK_THAT(source->Unwrap(v1.key_ref, std::string(12 + 600 + 16, 'a'), kAad, Soon()),
             StatusIs(absl::StatusCode::kInvalidArgument, "malformed"));
  CHECK(interposer.Count("decrypt_inits") == before);
}

TEST_CASE("Pkcs11KeySource: bytes sealed with a zero-length tag or a short IV are refused", "[pkcs11]") {
  TokenFixture token;
  Interposer interposer;
  auto source = OpenOrDie(token.Options(Interposer::Path()));
  const core::KeyVersion v1 = RotateOrDie(*source);
  DirectToken direct;
  const CK_OBJECT_HANDLE key = direct.Find(v1.key_ref);
  // SoftHSM accepts both of these; the key source must not.
  const std::string no_tag = direct.Seal(key, std::string(12, '\x01'), 0, kDek, kAad);
  REQUIRE(no_tag.size() == 12 + kDek.size());
  CHECK_THAT(source->Unwrap(v1.key_ref, no_tag, kAad, Soon()), StatusIs(absl::StatusCode::kInvalidArgument));
  const std::string short_iv = direct.Seal(key, std::string(8, '\x02'), 128, kDek, kAad);
  CHECK_THAT(source->Unwrap(v1.key_ref, short_iv, kAad, Soon()), StatusIs(absl::StatusCode::kInvalidArgument));
  const std::string short_tag = direct.Seal(key, std::string(12, '\x03'), 64, kDek, kAad);
  CHECK_THAT(source->Unwrap(v1.key_ref, short_tag, kAad, Soon()), StatusIs(absl::StatusCode::kInvalidArgument));
  // Every GCM call the key source made used a 12-byte IV and a 128-bit tag (the forged ones went around it).
  CHECK(interposer.Count("gcm_inits") > 0);
  CHECK(interposer.Count("bad_gcm_params") == 0);
}

TEST_CASE("Pkcs11KeySource: every GCM call carries a random 12-byte IV, a 128-bit tag and the AAD", "[pkcs11]") {
  TokenFixture token;
  Interposer interposer;
  auto source = OpenOrDie(token.Options(Interposer::Path()));
  const core::KeyVersion v1 = RotateOrDie(*source);
  for (int i = 0; i < 50; ++i) {
    auto wrapped = source->Wrap(v1, kDek, kAad, Soon());
    REQUIRE_THAT(wrapped, IsOk());
    REQUIRE_THAT(source->Unwrap(v1.key_ref, *wrapped, kAad, Soon()), IsOk());
  }
  CHECK(interposer.Count("gcm_inits") == 100);
  CHECK(interposer.Count("bad_gcm_params") == 0);
  CHECK(interposer.Count("last_aad_len") == static_cast<long>(kAad.size()));
  CHECK(interposer.Count("distinct_ivs") == 50);  // 50 wraps, 50 IVs; each unwrap reuses its wrap's IV
}

TEST_CASE("Pkcs11KeySource: oversize or empty plaintext is refused", "[pkcs11]") {
  TokenFixture token;
  auto source = OpenOrDie(token.Options());
  const core::KeyVersion v1 = RotateOrDie(*source);
  CHECK_THAT(source->Wrap(v1, "", kAad, Soon()), StatusIs(absl::StatusCode::kInvalidArgument, "plaintext"));
  CHECK_THAT(source->Wrap(v1, std::string(kMaxWrapPlaintextSize + 1, 'a'), kAad, Soon()),
             StatusIs(absl::StatusCode::kInvalidArgument, "plaintext"));
}

TEST_CASE("Pkcs11KeySource: an unknown key version is FAILED_PRECONDITION", "[pkcs11]") {
  TokenFixture token;
  auto source = OpenOrDie(token.Options());
  const core::KeyVersion v1 = RotateOrDie(*source);
  auto wrapped = source->Wrap(v1, kDek, kAad, Soon());
  REQUIRE_THAT(wrapped, IsOk());
  const std::string other = EncodeKeyRef(9, absl::FromUnixSeconds(1));
  CHECK_THAT(source->Unwrap(other, *wrapped, kAad, Soon()), StatusIs(absl::StatusCode::kFailedPrecondition));
  CHECK_THAT(source->Unwrap("junk", *wrapped, kAad, Soon()), StatusIs(absl::StatusCode::kInvalidArgument));
  core::KeyVersion fake = v1;
  fake.key_ref = other;
  CHECK_THAT(source->Wrap(fake, kDek, kAad, Soon()), StatusIs(absl::StatusCode::kFailedPrecondition));
}

TEST_CASE("Pkcs11KeySource: a deadline already past is refused without touching the token", "[pkcs11]") {
  TokenFixture token;
  Interposer interposer;
  auto source = OpenOrDie(token.Options(Interposer::Path()));
  const core::KeyVersion v1 = RotateOrDie(*source);
  const long before = interposer.Count("gcm_inits");
  const absl::Time past = absl::Now() - absl::Seconds(1);
  CHECK_THAT(source->Wrap(v1, kDek, kAad, past), StatusIs(absl::StatusCode::kDeadlineExceeded));
  CHECK_THAT(source->Unwrap(v1.key_ref, std::string(60, 'a'), kAad, past),
             StatusIs(absl::StatusCode::kDeadlineExceeded));
  CHECK_THAT(source->Rotate(past), StatusIs(absl::StatusCode::kDeadlineExceeded));
  CHECK(interposer.Count("gcm_inits") == before);
}

TEST_CASE("Pkcs11KeySource: two tokens, bytes wrapped by one are rejected by the other", "[pkcs11]") {
  TokenFixture token;
  token.hsm.InitToken("kms2", kmsplugin::testing::kPin);
  auto a = OpenOrDie(token.Options());
  auto b = OpenOrDie(token.Options(kmsplugin::testing::kSoftHsmModule, "kms2"));
  const core::KeyVersion va = RotateOrDie(*a);
  const core::KeyVersion vb = RotateOrDie(*b);
  CHECK(va.key_id != vb.key_id);
  auto wrapped = a->Wrap(va, kDek, kAad, Soon());
  REQUIRE_THAT(wrapped, IsOk());
  // b does not know a's key_ref at all...
  CHECK_THAT(b->Unwrap(va.key_ref, *wrapped, kAad, Soon()), StatusIs(absl::StatusCode::kFailedPrecondition));
  // ...and under its own version the bytes do not authenticate.
  CHECK_THAT(b->Unwrap(vb.key_ref, *wrapped, kAad, Soon()),
             StatusIs(absl::StatusCode::kInvalidArgument, "does not authenticate"));
  CHECK_THAT(a->Unwrap(va.key_ref, *wrapped, kAad, Soon()), IsOk());
}

TEST_CASE("Pkcs11KeySource: a token selected by serial works, an unknown label is refused naming it", "[pkcs11]") {
  TokenFixture token;
  auto options = token.Options();
  options.token_label.reset();
  options.token_serial = token.serial;
  auto by_serial = OpenOrDie(options);
  CHECK(by_serial->TokenSerial() == token.serial);
  CHECK(RotateOrDie(*by_serial).version == 1);
  by_serial.reset();
  auto missing = Pkcs11KeySource::Open(token.Options(kmsplugin::testing::kSoftHsmModule, "nope"), Soon());
  CHECK_THAT(missing, StatusIs(absl::StatusCode::kUnavailable, "token labelled \"nope\""));
  CHECK_THAT(missing, StatusIs(absl::StatusCode::kUnavailable, "\"kms\""));
}

TEST_CASE("Pkcs11KeySource: a module that is not there is refused naming the path", "[pkcs11]") {
  TokenFixture token;
  CHECK_THAT(Pkcs11KeySource::Open(token.Options("/nonexistent/libpkcs11.so"), Soon()),
             StatusIs(absl::StatusCode::kFailedPrecondition, "/nonexistent/libpkcs11.so"));
}

// ---------------------------------------------------------------------------------------------------------------
// PIN handling

TEST_CASE("Pkcs11KeySource: a PIN file readable by group or others is refused naming the file", "[pkcs11]") {
  TokenFixture token;
  for (int mode : {0644, 0640, 0604, 0660}) {
    INFO("mode " << std::oct << mode);
    chmod(token.pin_file.c_str(), mode);
    auto source = Pkcs11KeySource::Open(token.Options(), Soon());
    CHECK_THAT(source, StatusIs(absl::StatusCode::kFailedPrecondition, "chmod 600 " + token.pin_file));
  }
  chmod(token.pin_file.c_str(), 0400);
  CHECK_THAT(Pkcs11KeySource::Open(token.Options(), Soon()), IsOk());
}

TEST_CASE("Pkcs11KeySource: a wrong PIN is tried exactly once and the message says why", "[pkcs11]") {
  TokenFixture token;
  Interposer interposer;
  token.hsm.WriteFile("kms.pin", "9999\n");
  auto source = Pkcs11KeySource::Open(token.Options(Interposer::Path()), Soon());
  CHECK_THAT(source, StatusIs(absl::StatusCode::kPermissionDenied, "refused the PIN"));
  CHECK_THAT(source, StatusIs(absl::StatusCode::kPermissionDenied, "CKR_PIN_INCORRECT"));
  CHECK_THAT(source, StatusIs(absl::StatusCode::kPermissionDenied, token.pin_file));
  CHECK(!absl::StrContains(source.status().message(), "9999"));
  CHECK(interposer.Count("login") == 1);
}

TEST_CASE("Pkcs11KeySource: a locked PIN is reported as locked, with the fix", "[pkcs11]") {
  TokenFixture token;
  Interposer interposer;
  // SoftHSM 2.6.1 never locks a user PIN, so the interposer answers C_Login with CKR_PIN_LOCKED.
  interposer.SetLoginRv(CKR_PIN_LOCKED);
  auto source = Pkcs11KeySource::Open(token.Options(Interposer::Path()), Soon());
  CHECK_THAT(source, StatusIs(absl::StatusCode::kPermissionDenied, "PIN is locked"));
  CHECK_THAT(source, StatusIs(absl::StatusCode::kPermissionDenied, "security officer"));
  CHECK(interposer.Count("login") == 1);
}

TEST_CASE("Pkcs11KeySource: a PIN refused while serving is not retried until the PIN file changes", "[pkcs11]") {
  TokenFixture token;
  Interposer interposer;
  auto source = OpenOrDie(token.Options(Interposer::Path()));
  const core::KeyVersion v1 = RotateOrDie(*source);
  auto wrapped = source->Wrap(v1, kDek, kAad, Soon());
  REQUIRE_THAT(wrapped, IsOk());
  REQUIRE(interposer.Count("login") == 1);

  // The token logs us out and from now on refuses the PIN.
  interposer.SetLoginRv(CKR_PIN_INCORRECT);
  REQUIRE(interposer.Logout() == CKR_OK);
  std::atomic<int> denied{0};
  std::atomic<int> other{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 20; ++i) {
        auto result = source->Unwrap(v1.key_ref, *wrapped, kAad, Soon());
        (result.status().code() == absl::StatusCode::kPermissionDenied ? denied : other)++;
      }
    });
  }
  for (auto& thread : threads) {
    thread.join();
  }
  CHECK(denied == 160);
  CHECK(other == 0);
  CHECK(interposer.Count("login") == 2);  // exactly one new attempt for 160 calls
  CHECK_THAT(source->Refresh(Soon()), StatusIs(absl::StatusCode::kPermissionDenied, "has not changed"));
  CHECK_THAT(source->Rotate(Soon()), StatusIs(absl::StatusCode::kPermissionDenied));
  CHECK(interposer.Count("login") == 2);

  // The operator fixes the PIN and rewrites the file: Refresh logs in once more and service resumes.
  interposer.SetLoginRv(CKR_OK);
  std::remove(token.pin_file.c_str());
  token.hsm.WriteFile("kms.pin", std::string(kmsplugin::testing::kPin) + "\n");
  REQUIRE_THAT(source->Refresh(Soon()), IsOk());
  CHECK(interposer.Count("login") == 3);
  CHECK_THAT(source->Unwrap(v1.key_ref, *wrapped, kAad, Soon()), IsOk());
}

// ---------------------------------------------------------------------------------------------------------------
// Recovery

TEST_CASE("Pkcs11KeySource: a logout is healed by one re-login and a fresh key lookup", "[pkcs11]") {
  TokenFixture token;
  Interposer interposer;
  auto source = OpenOrDie(token.Options(Interposer::Path()));
  const core::KeyVersion v1 = RotateOrDie(*source);
  REQUIRE_THAT(source->Wrap(v1, kDek, kAad, Soon()), IsOk());
  REQUIRE(interposer.Logout() == CKR_OK);
  auto wrapped = source->Wrap(v1, kDek, kAad, Soon());
  REQUIRE_THAT(wrapped, IsOk());
  CHECK_THAT(source->Unwrap(v1.key_ref, *wrapped, kAad, Soon()), IsOk());
  CHECK(interposer.Count("login") == 2);
}

TEST_CASE("Pkcs11KeySource: a lost session is replaced and the call retried once", "[pkcs11]") {
  TokenFixture token;
  Interposer interposer;
  auto source = OpenOrDie(token.Options(Interposer::Path()));
  const core::KeyVersion v1 = RotateOrDie(*source);
  interposer.Inject("C_EncryptInit", CKR_SESSION_HANDLE_INVALID, 1);
  CHECK_THAT(source->Wrap(v1, kDek, kAad, Soon()), IsOk());
  // Twice in a row is more than one retry: the call fails (UNAVAILABLE) rather than looping.
  interposer.Inject("C_EncryptInit", CKR_SESSION_HANDLE_INVALID, 2);
  CHECK_THAT(source->Wrap(v1, kDek, kAad, Soon()), StatusIs(absl::StatusCode::kUnavailable, "SESSION_HANDLE"));
  CHECK_THAT(source->Wrap(v1, kDek, kAad, Soon()), IsOk());
}

TEST_CASE("Pkcs11KeySource: a session left with an active operation is discarded, not reused", "[pkcs11]") {
  TokenFixture token;
  Interposer interposer;
  auto source = OpenOrDie(token.Options(Interposer::Path()));
  const core::KeyVersion v1 = RotateOrDie(*source);
  interposer.Inject("C_EncryptInit", CKR_OPERATION_ACTIVE, 1);
  CHECK_THAT(source->Wrap(v1, kDek, kAad, Soon()), IsOk());
  for (int i = 0; i < 10; ++i) {
    CHECK_THAT(source->Wrap(v1, kDek, kAad, Soon()), IsOk());
  }
  CHECK(interposer.Count("operation_active") == 0);  // the injected one never reached SoftHSM
}

TEST_CASE("Pkcs11KeySource: a missing or empty PIN file is refused naming the file", "[pkcs11]") {
  TokenFixture token;
  auto options = token.Options();
  options.pin_file = token.hsm.dir() + "/missing.pin";
  CHECK_THAT(Pkcs11KeySource::Open(options, Soon()), StatusIs(absl::StatusCode::kNotFound, options.pin_file));
  options.pin_file = token.hsm.WriteFile("empty.pin", "\n");
  CHECK_THAT(Pkcs11KeySource::Open(options, Soon()),
             StatusIs(absl::StatusCode::kFailedPrecondition, options.pin_file + " is empty"));
}

TEST_CASE("Pkcs11KeySource: an unknown token serial is refused naming it", "[pkcs11]") {
  TokenFixture token;
  auto options = token.Options();
  options.token_label.reset();
  options.token_serial = "0000000000000000";
  CHECK_THAT(Pkcs11KeySource::Open(options, Soon()),
             StatusIs(absl::StatusCode::kUnavailable, "token with serial \"0000000000000000\""));
}

TEST_CASE("Pkcs11KeySource: a removed device leads to a full re-initialisation", "[pkcs11]") {
  TokenFixture token;
  Interposer interposer;
  auto source = OpenOrDie(token.Options(Interposer::Path()));
  const core::KeyVersion v1 = RotateOrDie(*source);
  const long inits = interposer.Count("initialize");
  const long logins = interposer.Count("login");
  interposer.Inject("C_Encrypt", CKR_DEVICE_REMOVED, 1);
  auto wrapped = source->Wrap(v1, kDek, kAad, Soon());
  REQUIRE_THAT(wrapped, IsOk());
  CHECK(interposer.Count("initialize") == inits + 1);
  CHECK(interposer.Count("login") == logins + 1);
  CHECK_THAT(source->Unwrap(v1.key_ref, *wrapped, kAad, Soon()), IsOk());
}

TEST_CASE("Pkcs11KeySource: a decrypt failure is an authentication failure, never retried", "[pkcs11]") {
  TokenFixture token;
  Interposer interposer;
  auto source = OpenOrDie(token.Options(Interposer::Path()));
  const core::KeyVersion v1 = RotateOrDie(*source);
  auto wrapped = source->Wrap(v1, kDek, kAad, Soon());
  REQUIRE_THAT(wrapped, IsOk());
  std::string bad = *wrapped;
  bad.back() ^= 1;
  const long before = interposer.Count("decrypt_inits");
  CHECK_THAT(source->Unwrap(v1.key_ref, bad, kAad, Soon()), StatusIs(absl::StatusCode::kInvalidArgument));
  CHECK(interposer.Count("decrypt_inits") == before + 1);
}

TEST_CASE("Pkcs11KeySource: the token directory moved away gives UNAVAILABLE, then recovery", "[pkcs11]") {
  TokenFixture token;
  auto source = OpenOrDie(token.Options());
  const core::KeyVersion v1 = RotateOrDie(*source);
  auto wrapped = source->Wrap(v1, kDek, kAad, Soon());
  REQUIRE_THAT(wrapped, IsOk());
  const std::string moved = token.hsm.dir() + "/tokens.away";
  REQUIRE(std::rename(token.hsm.token_dir().c_str(), moved.c_str()) == 0);
  int unavailable = 0;
  int unexpected = 0;
  for (int i = 0; i < 10; ++i) {
    auto result = source->Wrap(v1, kDek, kAad, Soon());
    if (result.status().code() == absl::StatusCode::kUnavailable) {
      ++unavailable;
    } else {
      ++unexpected;
      UNSCOPED_INFO("while moved: " << result.status());
    }
    if (i == 9) {
      CHECK_THAT(result, StatusIs(absl::StatusCode::kUnavailable, "token labelled \"kms\" is unavailable"));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  CHECK(unavailable == 10);
  CHECK(unexpected == 0);
  // Refresh fails too, and the previous view of the versions stays in force.
  CHECK_THAT(source->Refresh(Soon()), StatusIs(absl::StatusCode::kUnavailable));
  auto current = source->Current();
  REQUIRE_THAT(current, IsOk());
  CHECK(current->key_id == v1.key_id);
  REQUIRE(std::rename(moved.c_str(), token.hsm.token_dir().c_str()) == 0);
  bool recovered = false;
  for (int i = 0; i < 300 && !recovered; ++i) {
    recovered = source->Unwrap(v1.key_ref, *wrapped, kAad, Soon()).ok();
    if (!recovered) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }
  CHECK(recovered);
  CHECK_THAT(source->Wrap(v1, kDek, kAad, Soon()), IsOk());
}

// ---------------------------------------------------------------------------------------------------------------
// Concurrency

TEST_CASE("Pkcs11KeySource: 32 concurrent threads never fail and never hit CKR_OPERATION_ACTIVE", "[pkcs11]") {
  TokenFixture token;
  Interposer interposer;
  auto options = token.Options(Interposer::Path());
  options.session_pool_size = 9;
  auto source = OpenOrDie(options);
  const core::KeyVersion v1 = RotateOrDie(*source);
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 32; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 40; ++i) {
        const std::string plaintext = kDek + std::to_string(t * 1000 + i);
        auto wrapped = source->Wrap(v1, plaintext, kAad, Soon());
        if (!wrapped.ok()) {
          ++failures;
          continue;
        }
        auto plain = source->Unwrap(v1.key_ref, *wrapped, kAad, Soon());
        if (!plain.ok() || plain->view() != plaintext) {
          ++failures;
        }
      }
    });
  }
  for (auto& thread : threads) {
    thread.join();
  }
  CHECK(failures == 0);
  CHECK(interposer.Count("operation_active") == 0);
  CHECK(interposer.Count("gcm_inits") == 32 * 40 * 2);
  const SessionPoolStats stats = source->PoolStats();
  CHECK(stats.size == 9);
  CHECK(stats.open >= 1);
  CHECK(stats.open <= 9);  // 32 callers share 9 sessions: the pool is bounded
  CHECK(stats.idle == stats.open);
  // The same numbers reach /metrics.
  std::map<std::string, double> gauges;
  for (const core::BackendGauge& gauge : source->BackendGauges()) {
    gauges[gauge.name] = gauge.value;
  }
  CHECK(gauges["kmsplugin_pkcs11_session_pool_size"] == 9);
  CHECK(gauges["kmsplugin_pkcs11_sessions_open"] == stats.open);
  CHECK(gauges["kmsplugin_pkcs11_sessions_in_use"] == 0);
}

TEST_CASE("Pkcs11KeySource: rotation while 8 threads wrap and unwrap has zero failures", "[pkcs11]") {
  TokenFixture token;
  auto source = OpenOrDie(token.Options());
  RotateOrDie(*source);
  std::atomic<bool> stop{false};
  std::atomic<int> failures{0};
  std::atomic<int> calls{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&] {
      while (!stop) {
        auto current = source->Current();
        if (!current.ok()) {
          ++failures;
          continue;
        }
        auto wrapped = source->Wrap(*current, kDek, kAad, Soon());
        if (!wrapped.ok()) {
          ++failures;
          continue;
        }
        auto plain = source->Unwrap(current->key_ref, *wrapped, kAad, Soon());
        if (!plain.ok() || plain->view() != kDek) {
          ++failures;
        }
        ++calls;
      }
    });
  }
  for (int i = 0; i < 5; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    CHECK_THAT(source->Rotate(Soon()), IsOk());
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  stop = true;
  for (auto& thread : threads) {
    thread.join();
  }
  CHECK(failures == 0);
  CHECK(calls > 0);
  auto current = source->Current();
  REQUIRE_THAT(current, IsOk());
  CHECK(current->version == 6);
}

}  // namespace
}  // namespace kmsplugin::keysource::pkcs11
