// Recovery, credential reload and events of the PKCS#11 key source against real SoftHSM2 tokens (issue 10):
// the token away for several poll intervals with no traffic, every key gone from a token that is still there,
// a PIN changed and rewritten while healthy, one event per transition, versions named by number and state.

#include <p11-kit/pkcs11.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/synchronization/mutex.h"
#include "kmsplugin/core/events.h"
#include "kmsplugin/keysource/pkcs11/pkcs11_key_source.h"
#include "tests/keysource/pkcs11/direct_token.h"
#include "tests/keysource/pkcs11/pkcs11_test_util.h"
#include "tests/support/fake_clock.h"
#include "tests/support/recording_event_sink.h"

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
// The daemon polls Refresh() every poll interval; these tests use one second.
constexpr auto kPoll = std::chrono::seconds(1);

using RecordingSink = kmsplugin::testing::RecordingEventSink;

struct Served {
  TokenFixture token;
  kmsplugin::testing::FakeClock clock;
  RecordingSink sink;
  Pkcs11Options options;
  std::unique_ptr<Pkcs11KeySource> source;
  std::vector<core::KeyVersion> v;  // v[1], v[2]
  std::vector<std::string> sealed;  // sealed[i] under v[i]

  explicit Served(const std::string& module = kmsplugin::testing::kSoftHsmModule, int versions = 2) {
    options = token.Options(module);
    options.clock = &clock;
    options.events = &sink;
    auto opened = Pkcs11KeySource::Open(options, Soon());
    REQUIRE_THAT(opened, IsOk());
    source = *std::move(opened);
    v.resize(versions + 1);
    sealed.resize(versions + 1);
    for (int i = 1; i <= versions; ++i) {
      clock.Advance(absl::Hours(1));
      auto version = source->Rotate(Soon());
      REQUIRE_THAT(version, IsOk());
      v[i] = *version;
      auto wrapped = source->Wrap(v[i], kDek, kAad, Soon());
      REQUIRE_THAT(wrapped, IsOk());
      sealed[i] = *wrapped;
    }
  }

  absl::StatusOr<crypto::SecretBytes> Open(int i) { return source->Unwrap(v[i].key_ref, sealed[i], kAad, Soon()); }
};

// ---------------------------------------------------------------------------------------------------------------
// The token away for longer than a poll interval, no traffic

TEST_CASE(
    "Pkcs11KeySource recovery: token directory away for 3 s with only the poll's Refresh, then back: "
    "UNAVAILABLE meanwhile, healthy again by itself within two polls, same key_id, old ciphertexts decrypt",
    "[pkcs11][recovery]") {
  Served world;
  const std::string key_id = world.v[2].key_id;
  world.sink.Clear();
  const std::string moved = world.token.hsm.dir() + "/tokens.away";
  REQUIRE(std::rename(world.token.hsm.token_dir().c_str(), moved.c_str()) == 0);
  // Only the daemon's poll touches the source while the token is away.
  for (int poll = 0; poll < 3; ++poll) {
    INFO("poll " << poll);
    CHECK_THAT(world.source->Refresh(Soon()), StatusIs(Code::kUnavailable));
    auto current = world.source->Current();
    REQUIRE_THAT(current, IsOk());  // the view in force is the one from before
    CHECK(current->key_id == key_id);
    std::this_thread::sleep_for(kPoll);
  }
  // Calls made while it is away are UNAVAILABLE, never FAILED_PRECONDITION.
  CHECK_THAT(world.Open(1), StatusIs(Code::kUnavailable));
  CHECK_THAT(world.source->Wrap(world.v[2], kDek, kAad, Soon()), StatusIs(Code::kUnavailable));
  auto versions = world.source->Versions();
  REQUIRE_THAT(versions, IsOk());
  CHECK(versions->size() == 2);

  REQUIRE(std::rename(moved.c_str(), world.token.hsm.token_dir().c_str()) == 0);
  int polls = 0;
  bool healthy = false;
  while (!healthy && polls < 2) {
    ++polls;
    healthy = world.source->Refresh(Soon()).ok();
    if (!healthy) {
      std::this_thread::sleep_for(kPoll);
    }
  }
  CHECK(healthy);
  auto current = world.source->Current();
  REQUIRE_THAT(current, IsOk());
  CHECK(current->key_id == key_id);
  for (int i = 1; i <= 2; ++i) {
    INFO("version " << i);
    auto plain = world.Open(i);
    REQUIRE_THAT(plain, IsOk());
    CHECK(plain->view() == kDek);
  }
  CHECK_THAT(world.source->Wrap(*current, kDek, kAad, Soon()), IsOk());
  // One event per transition: away once, back once; the versions never changed.
  INFO(world.sink.All());
  CHECK(world.sink.Count(core::event::kUnavailable) == 1);
  CHECK(world.sink.Count(core::event::kRecovered) == 1);
  CHECK(world.sink.Count(core::event::kKeyVersionsChanged) == 0);
}

TEST_CASE(
    "Pkcs11KeySource recovery: a token that still answers but lists none of the keys is UNAVAILABLE, the view "
    "stays, and the keys coming back heal it",
    "[pkcs11][recovery]") {
  Served world;
  const std::string key_id = world.v[2].key_id;
  // Every key of the view vanishes while the token is still there (logged in): a broken or substituted token,
  // not a rotation. A lookup of one of them, while all are missing, is UNAVAILABLE too.
  const std::string copy = world.token.hsm.dir() + "/tokens.copy";
  world.token.hsm.Run("cp -a '" + world.token.hsm.token_dir() + "' '" + copy + "'");
  {
    DirectToken direct;
    for (int i = 1; i <= 2; ++i) {
      REQUIRE(direct.f()->C_DestroyObject(direct.session(), direct.Find(world.v[i].key_ref)) == CKR_OK);
    }
  }
  CHECK_THAT(world.source->Refresh(Soon()), StatusIs(Code::kUnavailable));
  auto current = world.source->Current();
  REQUIRE_THAT(current, IsOk());
  CHECK(current->key_id == key_id);
  CHECK_THAT(world.Open(1), StatusIs(Code::kUnavailable));
  CHECK_THAT(world.source->Refresh(Soon()), StatusIs(Code::kUnavailable));
  // The token's files restored (a backup put back): the source heals by itself.
  world.token.hsm.Run("rm -rf '" + world.token.hsm.token_dir() + "' && mv '" + copy + "' '" +
                      world.token.hsm.token_dir() + "'");
  bool healthy = false;
  for (int poll = 0; poll < 2 && !healthy; ++poll) {
    healthy = world.source->Refresh(Soon()).ok();
    if (!healthy) {
      std::this_thread::sleep_for(kPoll);
    }
  }
  CHECK(healthy);
  CHECK_THAT(world.Open(1), IsOk());
  CHECK(world.source->Current()->key_id == key_id);
}

// ---------------------------------------------------------------------------------------------------------------
// The PIN file re-read on Refresh while healthy

TEST_CASE(
    "Pkcs11KeySource recovery: a PIN changed on the token and rewritten in the file is picked up by Refresh "
    "while healthy: the next login uses it, exactly once",
    "[pkcs11][recovery]") {
  Served world(Interposer::Path());
  Interposer interposer;  // counts from here on
  {
    DirectToken direct;
    const std::string old_pin = kmsplugin::testing::kPin;
    const std::string new_pin = "4321";
    REQUIRE(direct.f()->C_SetPIN(direct.session(), (CK_UTF8CHAR_PTR)old_pin.data(), old_pin.size(),
                                 (CK_UTF8CHAR_PTR)new_pin.data(), new_pin.size()) == CKR_OK);
  }
  std::remove(world.token.pin_file.c_str());
  world.token.hsm.WriteFile("kms.pin", "4321\n");
  world.sink.Clear();
  REQUIRE_THAT(world.source->Refresh(Soon()), IsOk());
  CHECK(world.sink.Count(core::event::kCredentialReloaded) == 1);
  CHECK(absl::StrContains(world.sink.Last(core::event::kCredentialReloaded), world.token.pin_file));
  // The same file again is not reloaded again.
  REQUIRE_THAT(world.source->Refresh(Soon()), IsOk());
  CHECK(world.sink.Count(core::event::kCredentialReloaded) == 1);
  CHECK(interposer.Count("login") == 0);  // the reload alone does not log in
  // The login is lost (as after a token reset): the re-login uses the new PIN.
  REQUIRE(interposer.Logout() == CKR_OK);
  CHECK_THAT(world.Open(1), IsOk());
  CHECK_THAT(world.source->Wrap(world.v[2], kDek, kAad, Soon()), IsOk());
  CHECK(interposer.Count("login") == 1);
  CHECK(interposer.Count("login_ok") == 1);
  CHECK(world.sink.Count(core::event::kRelogin) == 1);
}

TEST_CASE("Pkcs11KeySource recovery: a PIN file made readable by others while healthy is refused by Refresh",
          "[pkcs11][recovery]") {
  Served world;
  world.token.hsm.WriteFile("kms.pin", "1234\n", 0644);
  CHECK_THAT(world.source->Refresh(Soon()), StatusIs(Code::kFailedPrecondition, world.token.pin_file));
  CHECK(world.sink.Count(core::event::kCredentialReloaded) == 0);
  CHECK_THAT(world.Open(1), IsOk());  // still serving with the PIN it has
}

// ---------------------------------------------------------------------------------------------------------------
// Events

TEST_CASE("Pkcs11KeySource events: rotate, retire and reinstate each say once what changed", "[pkcs11][events]") {
  Served world;
  world.sink.Clear();
  world.clock.Advance(absl::Hours(1));
  REQUIRE_THAT(world.source->Rotate(Soon()), IsOk());
  CHECK(world.sink.Count(core::event::kKeyVersionsChanged) == 1);
  CHECK(world.sink.Last(core::event::kKeyVersionsChanged) == "current 2 -> 3; added 3");
  REQUIRE_THAT(world.source->Retire(1, Soon()), IsOk());
  CHECK(world.sink.Count(core::event::kKeyVersionsChanged) == 2);
  CHECK(world.sink.Last(core::event::kKeyVersionsChanged) == "retired 1");
  REQUIRE_THAT(world.source->Reinstate(1, Soon()), IsOk());
  CHECK(world.sink.Count(core::event::kKeyVersionsChanged) == 3);
  CHECK(world.sink.Last(core::event::kKeyVersionsChanged) == "reinstated 1");
  // A Refresh that finds nothing new says nothing.
  REQUIRE_THAT(world.source->Refresh(Soon()), IsOk());
  REQUIRE_THAT(world.source->Refresh(Soon()), IsOk());
  CHECK(world.sink.Count(core::event::kKeyVersionsChanged) == 3);
  CHECK(world.sink.Count(core::event::kVersionViewRefused) == 0);
}

TEST_CASE("Pkcs11KeySource events: a rotation by another process is one key_versions_changed on Refresh",
          "[pkcs11][events]") {
  Served world;
  auto other_options = world.options;
  other_options.events = nullptr;
  auto other = Pkcs11KeySource::Open(other_options, Soon());
  REQUIRE_THAT(other, IsOk());
  world.clock.Advance(absl::Hours(1));
  REQUIRE_THAT((*other)->Rotate(Soon()), IsOk());
  world.sink.Clear();
  REQUIRE_THAT(world.source->Refresh(Soon()), IsOk());
  REQUIRE_THAT(world.source->Refresh(Soon()), IsOk());
  CHECK(world.sink.Count(core::event::kKeyVersionsChanged) == 1);
  CHECK(world.sink.Last(core::event::kKeyVersionsChanged) == "current 2 -> 3; added 3");
  CHECK(world.source->Current()->version == 3);
}

TEST_CASE(
    "Pkcs11KeySource events: a token view that breaks a version rule is refused once, the old view stays in "
    "force",
    "[pkcs11][events]") {
  Served world;
  // Another tool adds a second object as version 1 with another creation time: which key is version 1 now?
  const std::string forged = EncodeKeyRef(1, absl::FromUnixSeconds(1'600'000'000));
  world.token.hsm.Run(std::string("pkcs11-tool --module ") + kmsplugin::testing::kSoftHsmModule +
                      " --token-label kms --login --pin 1234 --keygen --key-type AES:32 --label kmsplugin-test-v1 "
                      "--id " +
                      absl::BytesToHexString(forged) + " --sensitive --private --usage-decrypt");
  world.sink.Clear();
  CHECK_THAT(world.source->Refresh(Soon()), StatusIs(Code::kFailedPrecondition, "version"));
  CHECK_THAT(world.source->Refresh(Soon()), StatusIs(Code::kFailedPrecondition));
  CHECK(world.sink.Count(core::event::kVersionViewRefused) == 1);
  CHECK(world.sink.Count(core::event::kUnavailable) == 0);
  CHECK(world.source->Current()->key_id == world.v[2].key_id);
  CHECK_THAT(world.Open(1), IsOk());
  CHECK_THAT(world.Open(2), IsOk());
}

TEST_CASE("Pkcs11KeySource events: a removed device is one unavailable and one recovered, not one per call",
          "[pkcs11][events]") {
  Served world;
  const std::string moved = world.token.hsm.dir() + "/tokens.away";
  world.sink.Clear();
  REQUIRE(std::rename(world.token.hsm.token_dir().c_str(), moved.c_str()) == 0);
  for (int i = 0; i < 10; ++i) {
    CHECK_THAT(world.Open(1), StatusIs(Code::kUnavailable));
    std::this_thread::sleep_for(std::chrono::milliseconds(30));
  }
  CHECK(world.sink.Count(core::event::kUnavailable) == 1);
  CHECK(world.sink.Count(core::event::kRecovered) == 0);
  REQUIRE(std::rename(moved.c_str(), world.token.hsm.token_dir().c_str()) == 0);
  bool back = false;
  for (int i = 0; i < 100 && !back; ++i) {
    back = world.Open(1).ok();
    if (!back) {
      std::this_thread::sleep_for(std::chrono::milliseconds(30));
    }
  }
  REQUIRE(back);
  for (int i = 0; i < 5; ++i) {
    CHECK_THAT(world.Open(2), IsOk());
  }
  INFO(world.sink.All());
  CHECK(world.sink.Count(core::event::kUnavailable) == 1);
  CHECK(world.sink.Count(core::event::kRecovered) == 1);
  CHECK(!absl::StrContains(world.sink.All(), kmsplugin::testing::kPin));
}

TEST_CASE("Pkcs11KeySource events: a logout healed by a re-login is one relogin event", "[pkcs11][events]") {
  Served world(Interposer::Path());
  Interposer interposer;
  world.sink.Clear();
  REQUIRE(interposer.Logout() == CKR_OK);
  CHECK_THAT(world.Open(1), IsOk());
  CHECK_THAT(world.Open(2), IsOk());
  CHECK(world.sink.Count(core::event::kRelogin) == 1);
  CHECK(world.sink.Count(core::event::kUnavailable) == 0);
}

// ---------------------------------------------------------------------------------------------------------------
// Messages name versions by number and state

TEST_CASE("Pkcs11KeySource messages: retired and unknown versions are named by number and state, not key reference",
          "[pkcs11][messages]") {
  Served world;
  REQUIRE_THAT(world.source->Retire(1, Soon()), IsOk());
  auto retired = world.Open(1);
  CHECK_THAT(retired, StatusIs(Code::kFailedPrecondition, "key version 1 is retired (CKA_DECRYPT is false"));
  CHECK_THAT(retired, StatusIs(Code::kFailedPrecondition, "--reinstate --version 1"));
  CHECK(!absl::StrContains(retired.status().message(), absl::BytesToHexString(world.v[1].key_ref)));
  auto wrap = world.source->Wrap(world.v[1], kDek, kAad, Soon());
  CHECK_THAT(wrap, StatusIs(Code::kFailedPrecondition, "key version 1 is retired"));
  const std::string unknown = EncodeKeyRef(9, absl::FromUnixSeconds(1));
  auto missing = world.source->Unwrap(unknown, world.sealed[2], kAad, Soon());
  CHECK_THAT(missing, StatusIs(Code::kFailedPrecondition, "key version 9"));
  CHECK(!absl::StrContains(missing.status().message(), absl::BytesToHexString(unknown)));
  auto lookup = world.source->Lookup(unknown);
  CHECK_THAT(lookup, StatusIs(Code::kNotFound, "key version 9"));
  CHECK_THAT(world.source->Current(), IsOk());
}

}  // namespace
}  // namespace kmsplugin::keysource::pkcs11
