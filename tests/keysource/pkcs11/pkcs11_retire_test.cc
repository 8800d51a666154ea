// Retire, Reinstate and DestroyRetired of the PKCS#11 key source against real SoftHSM2 tokens: CKA_DECRYPT (and
// CKA_ENCRYPT) cleared as the retired marker, read back by every process; C_DestroyObject only as a second,
// explicit step.

#include <p11-kit/pkcs11.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "kmsplugin/keysource/pkcs11/pkcs11_key_source.h"
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
using Code = absl::StatusCode;

const std::string kDek(32, '\x5a');

std::unique_ptr<Pkcs11KeySource> OpenOrDie(const Pkcs11Options& options) {
  auto source = Pkcs11KeySource::Open(options, Soon());
  REQUIRE_THAT(source, IsOk());
  return *std::move(source);
}

std::vector<uint64_t> Numbers(const std::vector<core::KeyVersion>& versions) {
  std::vector<uint64_t> out;
  for (const core::KeyVersion& v : versions) {
    out.push_back(v.version);
  }
  return out;
}

std::vector<core::KeyState> States(const Pkcs11KeySource& source) {
  auto versions = source.Versions();
  REQUIRE_THAT(versions, IsOk());
  std::vector<core::KeyState> out;
  for (const core::KeyVersion& v : *versions) {
    out.push_back(v.state);
  }
  return out;
}

constexpr auto kCurrent = core::KeyState::kCurrent;
constexpr auto kActive = core::KeyState::kActive;
constexpr auto kRetired = core::KeyState::kRetired;

// A token with versions 1, 2, 3 (3 current) and one ciphertext under each.
struct ThreeVersions {
  TokenFixture token;
  kmsplugin::testing::FakeClock clock;
  Pkcs11Options options;
  std::unique_ptr<Pkcs11KeySource> source;
  std::vector<core::KeyVersion> v;  // v[1], v[2], v[3]; v[0] unused
  std::vector<std::string> sealed;  // sealed[i] under v[i]

  explicit ThreeVersions(const std::string& module = kmsplugin::testing::kSoftHsmModule) {
    options = token.Options(module);
    options.clock = &clock;
    source = OpenOrDie(options);
    v.resize(4);
    sealed.resize(4);
    for (int i = 1; i <= 3; ++i) {
      clock.Advance(absl::Hours(1));
      auto version = source->Rotate(Soon());
      REQUIRE_THAT(version, IsOk());
      REQUIRE(version->version == static_cast<uint64_t>(i));
      v[i] = *version;
      auto wrapped = source->Wrap(v[i], Plain(i), kAad, Soon());
      REQUIRE_THAT(wrapped, IsOk());
      sealed[i] = *wrapped;
    }
  }

  static std::string Plain(int i) { return kDek + std::to_string(i); }

  // Unwrap of the ciphertext under version i by `by` (default: the fixture's source).
  absl::StatusOr<crypto::SecretBytes> Open(int i, Pkcs11KeySource* by = nullptr) {
    return (by != nullptr ? by : source.get())->Unwrap(v[i].key_ref, sealed[i], kAad, Soon());
  }

  void CheckOpens(int i, Pkcs11KeySource* by = nullptr) {
    INFO("version " << i);
    auto plain = Open(i, by);
    REQUIRE_THAT(plain, IsOk());
    CHECK(plain->view() == Plain(i));
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Retire

TEST_CASE("Pkcs11KeySource retire: Retire(2) retires exactly 1 and 2, which refuse to decrypt, 3 still works",
          "[pkcs11][retire]") {
  ThreeVersions world;
  auto retired = world.source->Retire(2, Soon());
  REQUIRE_THAT(retired, IsOk());
  CHECK(Numbers(*retired) == std::vector<uint64_t>{1, 2});
  for (const core::KeyVersion& v : *retired) {
    CHECK(v.state == kRetired);
  }
  CHECK(States(*world.source) == std::vector<core::KeyState>{kRetired, kRetired, kCurrent});
  CHECK_THAT(world.Open(1), StatusIs(Code::kFailedPrecondition, "key version 1 is retired"));
  CHECK_THAT(world.Open(1), StatusIs(Code::kFailedPrecondition, "retired"));
  CHECK_THAT(world.Open(2), StatusIs(Code::kFailedPrecondition, "key version 2 is retired"));
  CHECK_THAT(world.Open(2), StatusIs(Code::kFailedPrecondition, "--reinstate"));
  world.CheckOpens(3);
  // A caller holding an old KeyVersion of 2 cannot wrap under it either; the current version wraps.
  CHECK_THAT(world.source->Wrap(world.v[2], kDek, kAad, Soon()), StatusIs(Code::kFailedPrecondition, "retired"));
  CHECK_THAT(world.source->Wrap(world.v[3], kDek, kAad, Soon()), IsOk());
  // The marker is on the token objects themselves.
  DirectToken direct;
  for (int i = 1; i <= 3; ++i) {
    INFO("version " << i);
    const CK_OBJECT_HANDLE key = direct.Find(world.v[i].key_ref);
    CHECK(direct.Bool(key, CKA_DECRYPT) == (i == 3 ? CK_TRUE : CK_FALSE));
    CHECK(direct.Bool(key, CKA_ENCRYPT) == (i == 3 ? CK_TRUE : CK_FALSE));
    CHECK(direct.Bool(key, CKA_SENSITIVE) == CK_TRUE);
    CHECK(direct.Bool(key, CKA_EXTRACTABLE) == CK_FALSE);
  }
  // Retiring again changes nothing and says so with an empty list.
  auto again = world.source->Retire(2, Soon());
  REQUIRE_THAT(again, IsOk());
  CHECK(again->empty());
  auto older = world.source->Retire(1, Soon());
  REQUIRE_THAT(older, IsOk());
  CHECK(older->empty());
}

TEST_CASE(
    "Pkcs11KeySource retire: the current version, unknown versions and bad destroys are refused, changing "
    "nothing",
    "[pkcs11][retire]") {
  ThreeVersions world(Interposer::Path());
  Interposer interposer;  // counts from here on
  CHECK_THAT(world.source->Retire(3, Soon()), StatusIs(Code::kFailedPrecondition, "current version"));
  CHECK_THAT(world.source->Retire(9, Soon()), StatusIs(Code::kNotFound, "no key version 9"));
  CHECK_THAT(world.source->Retire(0, Soon()), StatusIs(Code::kNotFound));
  CHECK_THAT(world.source->Reinstate(2, Soon()), StatusIs(Code::kFailedPrecondition, "not retired"));
  CHECK_THAT(world.source->Reinstate(9, Soon()), StatusIs(Code::kNotFound, "no key version 9"));
  CHECK_THAT(world.source->DestroyRetired(9, Soon()), StatusIs(Code::kNotFound, "no key version 9"));
  // Nothing is retired yet: the first version in the way is named.
  CHECK_THAT(world.source->DestroyRetired(3, Soon()), StatusIs(Code::kFailedPrecondition, "key version 1 ("));
  CHECK_THAT(world.source->DestroyRetired(3, Soon()), StatusIs(Code::kFailedPrecondition, "not retired"));
  CHECK(interposer.Count("set_attribute") == 0);
  CHECK(interposer.Count("destroy") == 0);
  CHECK(States(*world.source) == std::vector<core::KeyState>{kActive, kActive, kCurrent});
  for (int i = 1; i <= 3; ++i) {
    world.CheckOpens(i);
  }
}

TEST_CASE(
    "Pkcs11KeySource retire: a second source on the same token is refused at once and sees the states after "
    "Refresh",
    "[pkcs11][retire]") {
  ThreeVersions world;
  auto other = OpenOrDie(world.options);  // opened before the retirement: its view is stale
  REQUIRE_THAT(world.source->Retire(2, Soon()), IsOk());
  CHECK(States(*other) == std::vector<core::KeyState>{kActive, kActive, kCurrent});
  // The token itself refuses (CKA_DECRYPT is false), and that is FAILED_PRECONDITION naming the version.
  CHECK_THAT(world.Open(1, other.get()), StatusIs(Code::kFailedPrecondition, "key version 1 is retired"));
  CHECK_THAT(world.Open(2, other.get()), StatusIs(Code::kFailedPrecondition, "CKA_DECRYPT is false on the token"));
  CHECK_THAT(world.Open(2, other.get()), StatusIs(Code::kFailedPrecondition, "CKR_KEY_FUNCTION_NOT_PERMITTED"));
  // Nor can a stale view encrypt under a retired version (CKA_ENCRYPT is cleared as well).
  CHECK_THAT(other->Wrap(world.v[2], kDek, kAad, Soon()), StatusIs(Code::kFailedPrecondition, "retired"));
  world.CheckOpens(3, other.get());
  REQUIRE_THAT(other->Refresh(Soon()), IsOk());
  CHECK(States(*other) == std::vector<core::KeyState>{kRetired, kRetired, kCurrent});
  CHECK_THAT(world.Open(1, other.get()), StatusIs(Code::kFailedPrecondition, "is retired (CKA_DECRYPT is false on the token) and no longer decrypts"));
  // A source opened afterwards (a restarted daemon, the CLI) sees the same at Open.
  auto fresh = OpenOrDie(world.options);
  CHECK(States(*fresh) == std::vector<core::KeyState>{kRetired, kRetired, kCurrent});
  // Reinstating through the second source shows in the first after its Refresh.
  REQUIRE_THAT(other->Reinstate(1, Soon()), IsOk());
  REQUIRE_THAT(world.source->Refresh(Soon()), IsOk());
  CHECK(States(*world.source) == std::vector<core::KeyState>{kActive, kActive, kCurrent});
  world.CheckOpens(1);
}

// The child half of the cross-process test below: run as a separate process of this same test binary.
TEST_CASE("Pkcs11KeySource retire child: retire in another process", "[.][pkcs11-child]") {
  const char* pin_file = std::getenv("KMS_CHILD_PIN_FILE");
  const char* op = std::getenv("KMS_CHILD_RETIRE");
  REQUIRE(pin_file != nullptr);
  REQUIRE(op != nullptr);
  uint64_t version = 0;
  REQUIRE(absl::SimpleAtoi(op, &version));
  Pkcs11Options options;
  options.module_path = kmsplugin::testing::kSoftHsmModule;
  options.token_label = "kms";
  options.pin_file = pin_file;
  options.key_label = "kmsplugin-test";
  auto source = OpenOrDie(options);
  auto retired = source->Retire(version, Soon());
  REQUIRE_THAT(retired, IsOk());
  REQUIRE(retired->size() == version);
}

TEST_CASE("Pkcs11KeySource retire: a retirement made by another process is refused here and seen after Refresh",
          "[pkcs11][retire]") {
  ThreeVersions world;
  char self[4096] = {};
  REQUIRE(readlink("/proc/self/exe", self, sizeof(self) - 1) > 0);
  world.token.hsm.Run("KMS_CHILD_PIN_FILE='" + world.token.pin_file + "' KMS_CHILD_RETIRE=2 '" + self +
                      "' 'Pkcs11KeySource retire child: retire in another process'");
  // Our view is stale; the token refuses anyway.
  CHECK_THAT(world.Open(1), StatusIs(Code::kFailedPrecondition, "key version 1 is retired"));
  CHECK_THAT(world.Open(2), StatusIs(Code::kFailedPrecondition, "CKA_DECRYPT is false on the token"));
  world.CheckOpens(3);
  REQUIRE_THAT(world.source->Refresh(Soon()), IsOk());
  CHECK(States(*world.source) == std::vector<core::KeyState>{kRetired, kRetired, kCurrent});
  // And the other way round: our Reinstate is what pkcs11-tool (a third process) reads back.
  REQUIRE_THAT(world.source->Reinstate(2, Soon()), IsOk());
  const std::string listing =
      world.token.hsm.Run(std::string("pkcs11-tool --module ") + kmsplugin::testing::kSoftHsmModule +
                          " --token-label kms --login --pin 1234 --list-objects");
  INFO(listing);
  const size_t v1 = listing.find("label:      kmsplugin-test-v1");
  const size_t v2 = listing.find("label:      kmsplugin-test-v2");
  REQUIRE(v1 != std::string::npos);
  REQUIRE(v2 != std::string::npos);
  CHECK(listing.substr(v1, listing.find("Access:", v1) - v1).find("decrypt") == std::string::npos);
  CHECK(listing.substr(v2, listing.find("Access:", v2) - v2).find("encrypt, decrypt") != std::string::npos);
}

// ---------------------------------------------------------------------------------------------------------------
// Reinstate

TEST_CASE("Pkcs11KeySource retire: Reinstate(2) brings 2 back but not 1, and old ciphertexts under 2 decrypt again",
          "[pkcs11][retire]") {
  ThreeVersions world;
  REQUIRE_THAT(world.source->Retire(2, Soon()), IsOk());
  auto reinstated = world.source->Reinstate(2, Soon());
  REQUIRE_THAT(reinstated, IsOk());
  CHECK(Numbers(*reinstated) == std::vector<uint64_t>{2});
  CHECK(reinstated->front().state == kActive);
  CHECK(States(*world.source) == std::vector<core::KeyState>{kRetired, kActive, kCurrent});
  world.CheckOpens(2);
  world.CheckOpens(3);
  CHECK_THAT(world.Open(1), StatusIs(Code::kFailedPrecondition, "key version 1 is retired"));
  DirectToken direct;
  CHECK(direct.Bool(direct.Find(world.v[2].key_ref), CKA_DECRYPT) == CK_TRUE);
  CHECK(direct.Bool(direct.Find(world.v[2].key_ref), CKA_ENCRYPT) == CK_TRUE);
  // Reinstate(1) with 1 and 2 retired brings both back, oldest first in the answer.
  REQUIRE_THAT(world.source->Retire(2, Soon()), IsOk());
  auto both = world.source->Reinstate(1, Soon());
  REQUIRE_THAT(both, IsOk());
  CHECK(Numbers(*both) == std::vector<uint64_t>{1, 2});
  CHECK(States(*world.source) == std::vector<core::KeyState>{kActive, kActive, kCurrent});
  world.CheckOpens(1);
  world.CheckOpens(2);
}

// ---------------------------------------------------------------------------------------------------------------
// DestroyRetired

TEST_CASE(
    "Pkcs11KeySource retire: DestroyRetired is refused while a version is active, then removes exactly the "
    "retired ones from the token",
    "[pkcs11][retire]") {
  ThreeVersions world;
  CHECK_THAT(world.source->DestroyRetired(2, Soon()), StatusIs(Code::kFailedPrecondition, "key version 1 ("));
  REQUIRE_THAT(world.source->Retire(1, Soon()), IsOk());
  CHECK_THAT(world.source->DestroyRetired(2, Soon()), StatusIs(Code::kFailedPrecondition, "key version 2 ("));
  CHECK_THAT(world.source->DestroyRetired(2, Soon()), StatusIs(Code::kFailedPrecondition, "version 2 (active) is not retired"));
  {
    DirectToken direct;
    CHECK(direct.Count(world.v[1].key_ref) == 1);
    CHECK(direct.Count(world.v[2].key_ref) == 1);
  }
  auto destroyed = world.source->DestroyRetired(1, Soon());
  REQUIRE_THAT(destroyed, IsOk());
  CHECK(Numbers(*destroyed) == std::vector<uint64_t>{1});
  auto versions = world.source->Versions();
  REQUIRE_THAT(versions, IsOk());
  CHECK(Numbers(*versions) == std::vector<uint64_t>{2, 3});
  CHECK(States(*world.source) == std::vector<core::KeyState>{kActive, kCurrent});
  {
    // Gone from the token, by a raw C_FindObjects on its CKA_ID and in pkcs11-tool's listing (another process).
    DirectToken direct;
    CHECK(direct.Count(world.v[1].key_ref) == 0);
    CHECK(direct.Count(world.v[2].key_ref) == 1);
    CHECK(direct.Count(world.v[3].key_ref) == 1);
  }
  const std::string listing =
      world.token.hsm.Run(std::string("pkcs11-tool --module ") + kmsplugin::testing::kSoftHsmModule +
                          " --token-label kms --login --pin 1234 --list-objects --type secrkey");
  CHECK(!absl::StrContains(listing, "kmsplugin-test-v1"));
  CHECK(absl::StrContains(listing, "kmsplugin-test-v2"));
  CHECK(absl::StrContains(listing, "kmsplugin-test-v3"));
  // A ciphertext under 1 is now under an unknown version; 1 cannot come back.
  CHECK_THAT(world.Open(1), StatusIs(Code::kFailedPrecondition, "key version 1 named by the ciphertext is not"));
  CHECK_THAT(world.source->Reinstate(1, Soon()), StatusIs(Code::kNotFound, "no key version 1"));
  CHECK_THAT(world.source->Retire(1, Soon()), StatusIs(Code::kNotFound, "no key version 1"));
  CHECK_THAT(world.source->DestroyRetired(1, Soon()), StatusIs(Code::kNotFound, "no key version 1"));
  world.CheckOpens(2);
  world.CheckOpens(3);
  // The rest of the life cycle carries on: retire and destroy 2, rotate on.
  REQUIRE_THAT(world.source->Retire(2, Soon()), IsOk());
  auto second = world.source->DestroyRetired(2, Soon());
  REQUIRE_THAT(second, IsOk());
  CHECK(Numbers(*second) == std::vector<uint64_t>{2});
  world.clock.Advance(absl::Hours(1));
  auto v4 = world.source->Rotate(Soon());
  REQUIRE_THAT(v4, IsOk());
  CHECK(v4->version == 4);
  world.CheckOpens(3);
}

TEST_CASE(
    "Pkcs11KeySource retire: a source that has not refreshed gets FAILED_PRECONDITION for a destroyed "
    "version and keeps serving the others without a re-initialisation",
    "[pkcs11][retire]") {
  ThreeVersions world(Interposer::Path());
  Interposer interposer;
  auto other = OpenOrDie(world.options);
  world.CheckOpens(1, other.get());  // caches the handle of version 1 in `other`
  REQUIRE_THAT(world.source->Retire(1, Soon()), IsOk());
  REQUIRE_THAT(world.source->DestroyRetired(1, Soon()), IsOk());
  const long inits = interposer.Count("initialize");
  CHECK_THAT(world.Open(1, other.get()), StatusIs(Code::kFailedPrecondition, "key version 1 ("));
  CHECK_THAT(world.Open(1, other.get()), StatusIs(Code::kFailedPrecondition, "no longer on the"));
  world.CheckOpens(2, other.get());
  world.CheckOpens(3, other.get());
  CHECK_THAT(other->Wrap(world.v[3], kDek, kAad, Soon()), IsOk());
  CHECK(interposer.Count("initialize") == inits);
  // After its Refresh the destroyed version stays listed, as retired (it vanished: retired stays retired), and
  // its ciphertexts are refused naming it.
  REQUIRE_THAT(other->Refresh(Soon()), IsOk());
  CHECK(States(*other) == std::vector<core::KeyState>{kRetired, kActive, kCurrent});
  CHECK_THAT(world.Open(1, other.get()), StatusIs(Code::kFailedPrecondition, "key version 1 is retired (destroyed"));
  CHECK(interposer.Count("initialize") == inits);
}

// ---------------------------------------------------------------------------------------------------------------
// Key objects, legacy objects, token refusals

TEST_CASE("Pkcs11KeySource retire: key objects are modifiable but stay sensitive, non-extractable and GCM-only",
          "[pkcs11][retire]") {
  ThreeVersions world;
  DirectToken direct;
  const CK_OBJECT_HANDLE key = direct.Find(world.v[3].key_ref);
  CHECK(direct.Bool(key, CKA_MODIFIABLE) == CK_TRUE);
  // SoftHSM 2.6.1 refuses every change that would weaken the key (CKR_ATTRIBUTE_READ_ONLY).
  CHECK(direct.SetBool(key, CKA_SENSITIVE, CK_FALSE) == CKR_ATTRIBUTE_READ_ONLY);
  CHECK(direct.SetBool(key, CKA_EXTRACTABLE, CK_TRUE) == CKR_ATTRIBUTE_READ_ONLY);
  CHECK(direct.SetBool(key, CKA_MODIFIABLE, CK_FALSE) == CKR_ATTRIBUTE_READ_ONLY);
  CK_MECHANISM_TYPE wider[] = {CKM_AES_GCM, CKM_AES_CBC_PAD};
  CK_ATTRIBUTE mechanisms{CKA_ALLOWED_MECHANISMS, wider, sizeof(wider)};
  CHECK(direct.f()->C_SetAttributeValue(direct.session(), key, &mechanisms, 1) == CKR_ATTRIBUTE_READ_ONLY);
  CHECK(direct.Bool(key, CKA_SENSITIVE) == CK_TRUE);
  CHECK(direct.Bool(key, CKA_EXTRACTABLE) == CK_FALSE);
  world.CheckOpens(3);
}

TEST_CASE(
    "Pkcs11KeySource retire: a version created non-modifiable cannot be retired, the refusal names it and "
    "the fix, and changes nothing",
    "[pkcs11][retire]") {
  TokenFixture token;
  kmsplugin::testing::FakeClock clock;
  auto options = token.Options();
  options.clock = &clock;
  const std::string legacy_id = EncodeKeyRef(1, absl::FromUnixSeconds(1'700'000'000));
  {
    // Version 1 as kmsplugin made it before retirement existed: CKA_MODIFIABLE false.
    auto source = OpenOrDie(options);
    DirectToken direct;
    CK_OBJECT_CLASS klass = CKO_SECRET_KEY;
    CK_KEY_TYPE key_type = CKK_AES;
    CK_ULONG value_len = 32;
    CK_BBOOL yes = CK_TRUE;
    CK_BBOOL no = CK_FALSE;
    CK_MECHANISM_TYPE allowed[] = {CKM_AES_GCM};
    const std::string label = "kmsplugin-test-v1";
    CK_ATTRIBUTE attributes[] = {
        {CKA_CLASS, &klass, sizeof(klass)},
        {CKA_KEY_TYPE, &key_type, sizeof(key_type)},
        {CKA_VALUE_LEN, &value_len, sizeof(value_len)},
        {CKA_TOKEN, &yes, 1},
        {CKA_PRIVATE, &yes, 1},
        {CKA_SENSITIVE, &yes, 1},
        {CKA_EXTRACTABLE, &no, 1},
        {CKA_ENCRYPT, &yes, 1},
        {CKA_DECRYPT, &yes, 1},
        {CKA_MODIFIABLE, &no, 1},
        {CKA_LABEL, const_cast<char*>(label.data()), label.size()},
        {CKA_ID, const_cast<char*>(legacy_id.data()), legacy_id.size()},
        {CKA_ALLOWED_MECHANISMS, allowed, sizeof(allowed)},
    };
    CK_MECHANISM mechanism{CKM_AES_KEY_GEN, nullptr, 0};
    CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;
    REQUIRE(direct.f()->C_GenerateKey(direct.session(), &mechanism, attributes,
                                      sizeof(attributes) / sizeof(attributes[0]), &key) == CKR_OK);
    // The token refuses any change to it, C_CopyObject included (SoftHSM 2.6.1).
    CHECK(direct.SetBool(key, CKA_DECRYPT, CK_FALSE) == CKR_ACTION_PROHIBITED);
    CK_ATTRIBUTE copy_template{CKA_DECRYPT, &no, 1};
    CK_OBJECT_HANDLE copy = CK_INVALID_HANDLE;
    CHECK(direct.f()->C_CopyObject(direct.session(), key, &copy_template, 1, &copy) == CKR_ATTRIBUTE_READ_ONLY);
  }
  Interposer interposer;
  auto interposed = options;
  interposed.module_path = Interposer::Path();
  auto source = OpenOrDie(interposed);
  clock.Advance(absl::Hours(1));
  auto v2 = source->Rotate(Soon());
  REQUIRE_THAT(v2, IsOk());
  clock.Advance(absl::Hours(1));
  REQUIRE_THAT(source->Rotate(Soon()), IsOk());
  REQUIRE(States(*source) == std::vector<core::KeyState>{kActive, kActive, kCurrent});
  auto refused = source->Retire(2, Soon());
  CHECK_THAT(refused, StatusIs(Code::kFailedPrecondition, "key version 1 (kmsplugin-test-v1"));
  CHECK_THAT(refused, StatusIs(Code::kFailedPrecondition, "CKA_MODIFIABLE=false"));
  CHECK_THAT(refused, StatusIs(Code::kFailedPrecondition, "nothing was changed"));
  CHECK_THAT(refused, StatusIs(Code::kFailedPrecondition,
                               "--delete-object --type secrkey --id " + absl::BytesToHexString(legacy_id)));
  CHECK(interposer.Count("set_attribute") == 0);  // refused before the first object was touched
  CHECK(States(*source) == std::vector<core::KeyState>{kActive, kActive, kCurrent});
  // Retiring is a floor, so nothing at or above the legacy version can be retired; destroying needs a retired
  // version.
  CHECK_THAT(source->Retire(1, Soon()), StatusIs(Code::kFailedPrecondition, "CKA_MODIFIABLE=false"));
  CHECK_THAT(source->DestroyRetired(1, Soon()), StatusIs(Code::kFailedPrecondition, "not retired"));
  // The fix the message gives: delete the legacy object with pkcs11-tool; then the versions above it retire.
  token.hsm.Run(std::string("pkcs11-tool --module ") + kmsplugin::testing::kSoftHsmModule +
                " --token-label kms --login --pin 1234 --delete-object --type secrkey --id " +
                absl::BytesToHexString(legacy_id));
  auto retired = source->Retire(2, Soon());
  REQUIRE_THAT(retired, IsOk());
  CHECK(Numbers(*retired) == std::vector<uint64_t>{2});
  // The deleted legacy version stays listed, as retired (it vanished while other keys are there: destroyed).
  CHECK(States(*source) == std::vector<core::KeyState>{kRetired, kRetired, kCurrent});
}

TEST_CASE("Pkcs11KeySource retire: a token refusing or failing the change is reported, and a rerun completes it",
          "[pkcs11][retire]") {
  ThreeVersions world(Interposer::Path());
  Interposer interposer;
  // A token with its own policy refuses although CKA_MODIFIABLE reads true.
  interposer.Inject("C_SetAttributeValue", CKR_ACTION_PROHIBITED, 1);
  CHECK_THAT(world.source->Retire(2, Soon()), StatusIs(Code::kFailedPrecondition, "CKR_ACTION_PROHIBITED"));
  CHECK_THAT(world.source->Retire(2, Soon()), IsOk());  // the injection is used up: the rerun works
  REQUIRE_THAT(world.source->Reinstate(1, Soon()), IsOk());
  // A failing token (not a refusal) is UNAVAILABLE and says what was done before it.
  interposer.Inject("C_SetAttributeValue", CKR_FUNCTION_FAILED, 1);
  auto failed = world.source->Retire(2, Soon());
  CHECK_THAT(failed, StatusIs(Code::kUnavailable, "CKR_FUNCTION_FAILED"));
  CHECK_THAT(failed, StatusIs(Code::kUnavailable, "retired before the failure: none"));
  CHECK(States(*world.source) == std::vector<core::KeyState>{kActive, kActive, kCurrent});
  auto rerun = world.source->Retire(2, Soon());
  REQUIRE_THAT(rerun, IsOk());
  CHECK(Numbers(*rerun) == std::vector<uint64_t>{1, 2});
  // A token refusing the destroy is reported too; the version stays retired and listed.
  interposer.Inject("C_DestroyObject", CKR_ACTION_PROHIBITED, 1);
  CHECK_THAT(world.source->DestroyRetired(1, Soon()), StatusIs(Code::kFailedPrecondition,
                                                               "destroyed before the "
                                                               "failure: none"));
  CHECK(States(*world.source) == std::vector<core::KeyState>{kRetired, kRetired, kCurrent});
  auto destroyed = world.source->DestroyRetired(2, Soon());
  REQUIRE_THAT(destroyed, IsOk());
  CHECK(Numbers(*destroyed) == std::vector<uint64_t>{1, 2});
}

TEST_CASE("Pkcs11KeySource retire: a newest version retired by other tools leaves no current version until rotate",
          "[pkcs11][retire]") {
  ThreeVersions world;
  {
    DirectToken direct;
    REQUIRE(direct.SetBool(direct.Find(world.v[3].key_ref), CKA_DECRYPT, CK_FALSE) == CKR_OK);
  }
  // A running source refuses the view (a view with a current version keeps one: the key_id never moves back)
  // and keeps its own; the token refuses new encryptions under 3 anyway.
  CHECK_THAT(world.source->Refresh(Soon()), StatusIs(Code::kFailedPrecondition, "no current version any more"));
  CHECK(States(*world.source) == std::vector<core::KeyState>{kActive, kActive, kCurrent});
  CHECK_THAT(world.source->Wrap(world.v[3], kDek, kAad, Soon()), StatusIs(Code::kFailedPrecondition, "retired"));
  CHECK_THAT(world.source->Current(), StatusIs(Code::kFailedPrecondition, "newest pkcs11 key version 3"));
  // A source opened now (a restart, the CLI) has no version to encrypt under.
  {
    auto fresh = OpenOrDie(world.options);
    CHECK(States(*fresh) == std::vector<core::KeyState>{kActive, kActive, kRetired});
    CHECK_THAT(fresh->Current(), StatusIs(Code::kFailedPrecondition, "newest pkcs11 key version 3"));
  }
  // Rotating (decided on the token's state) repairs it, in the running source too.
  world.clock.Advance(absl::Hours(1));
  auto v4 = world.source->Rotate(Soon());
  REQUIRE_THAT(v4, IsOk());
  auto current = world.source->Current();
  REQUIRE_THAT(current, IsOk());
  CHECK(current->version == 4);
  auto reinstated = world.source->Reinstate(3, Soon());
  REQUIRE_THAT(reinstated, IsOk());
  CHECK(Numbers(*reinstated) == std::vector<uint64_t>{3});
  world.CheckOpens(3);
}

// ---------------------------------------------------------------------------------------------------------------
// Deadlines and concurrency

TEST_CASE("Pkcs11KeySource retire: a passed deadline stops retire, reinstate and destroy before the token is touched",
          "[pkcs11][retire]") {
  ThreeVersions world(Interposer::Path());
  Interposer interposer;
  REQUIRE_THAT(world.source->Retire(1, Soon()), IsOk());
  const long sets = interposer.Count("set_attribute");
  const absl::Time past = absl::Now() - absl::Seconds(1);
  CHECK_THAT(world.source->Retire(2, past), StatusIs(Code::kDeadlineExceeded));
  CHECK_THAT(world.source->Reinstate(1, past), StatusIs(Code::kDeadlineExceeded));
  CHECK_THAT(world.source->DestroyRetired(1, past), StatusIs(Code::kDeadlineExceeded));
  CHECK(interposer.Count("set_attribute") == sets);
  CHECK(interposer.Count("destroy") == 0);
  CHECK(States(*world.source) == std::vector<core::KeyState>{kRetired, kActive, kCurrent});
}

TEST_CASE(
    "Pkcs11KeySource retire: retire and reinstate while 8 threads wrap and unwrap: no error on the versions "
    "not retired",
    "[pkcs11][retire]") {
  ThreeVersions world(Interposer::Path());
  Interposer interposer;
  std::atomic<bool> stop{false};
  std::atomic<int> failures{0};
  std::atomic<int> calls{0};
  std::atomic<int> v1_opened{0};
  std::atomic<int> v1_refused{0};
  std::atomic<int> v1_other{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      while (!stop) {
        // Versions 2 and 3 are never retired: every call must succeed.
        for (int i : {2, 3}) {
          auto plain = world.Open(i);
          if (!plain.ok() || plain->view() != ThreeVersions::Plain(i)) {
            ++failures;
          }
        }
        auto current = world.source->Current();
        if (!current.ok()) {
          ++failures;
          continue;
        }
        auto wrapped = world.source->Wrap(*current, kDek, kAad, Soon());
        if (!wrapped.ok() || !world.source->Unwrap(current->key_ref, *wrapped, kAad, Soon()).ok()) {
          ++failures;
        }
        // Version 1 flips between retired and active: it opens or is refused, nothing else.
        if (t % 2 == 0) {
          auto plain = world.Open(1);
          if (plain.ok()) {
            ++v1_opened;
          } else if (plain.status().code() == Code::kFailedPrecondition) {
            ++v1_refused;
          } else {
            ++v1_other;
            UNSCOPED_INFO("version 1: " << plain.status());
          }
        }
        ++calls;
      }
    });
  }
  for (int round = 0; round < 20; ++round) {
    auto retired = world.source->Retire(1, Soon());
    CHECK_THAT(retired, IsOk());
    if (retired.ok()) {
      CHECK(Numbers(*retired) == std::vector<uint64_t>{1});
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    auto reinstated = world.source->Reinstate(1, Soon());
    CHECK_THAT(reinstated, IsOk());
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  stop = true;
  for (auto& thread : threads) {
    thread.join();
  }
  CHECK(failures == 0);
  CHECK(v1_other == 0);
  CHECK(calls > 0);
  CHECK(v1_opened + v1_refused > 0);
  CHECK(interposer.Count("operation_active") == 0);
  CHECK(States(*world.source) == std::vector<core::KeyState>{kActive, kActive, kCurrent});
}

}  // namespace
}  // namespace kmsplugin::keysource::pkcs11
