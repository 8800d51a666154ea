// The key-source contract (ARCHITECTURE.md "Rules that always hold", STYLE.md "Every backend passes the same
// contract"): every case is written once and runs against the local keyring, Vault (the Vault-API test server) and
// PKCS#11 (SoftHSM2), faults included. The backends are in backends.h. A case that fails here on one source names a
// defect of that source; it stays a normal case, never hidden.

#include <sys/stat.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "crypto/envelope_format.h"
#include "kmsplugin/core/envelope_service.h"
#include "kmsplugin/core/version_rules.h"
#include "tests/keysource/contract/backends.h"
#include "tests/support/status_matchers.h"

namespace kmsplugin::contract {
namespace {

using ::kmsplugin::testing::IsOk;
using ::kmsplugin::testing::StatusIs;
using Code = absl::StatusCode;

const std::string kDek = "0123456789abcdef0123456789ABCDEF";  // 32 bytes, as kube-apiserver sends
const std::string kAad = "kmsplugin/envelope/v1 contract key-ref";

// Every status message a case saw, to prove no secret is ever in one.
class Messages {
 public:
  template <typename T>
  std::decay_t<T> operator()(T&& result) {
    const absl::Status& status = testing::GetStatus(result);
    if (!status.ok()) {
      seen_.emplace_back(status.message());
    }
    return std::forward<T>(result);
  }
  template <typename B>
  void ExpectNoSecretsOf(const B& backend) const {
    for (const std::string& secret : backend.Secrets()) {
      REQUIRE(secret.size() >= 4);
      for (const std::string& message : seen_) {
        INFO("message: " << message);
        CHECK_FALSE(absl::StrContains(message, secret));
      }
    }
  }
  size_t size() const { return seen_.size(); }

 private:
  std::vector<std::string> seen_;
};

core::KeyVersion CurrentOf(const Instance& instance) {
  auto current = instance->Current();
  REQUIRE_THAT(current, IsOk());
  return *current;
}

std::string WrapOrDie(const Instance& instance, const core::KeyVersion& version, const std::string& plain = kDek) {
  auto wrapped = instance->Wrap(version, plain, kAad, Soon());
  REQUIRE_THAT(wrapped, IsOk());
  return *wrapped;
}

// The daemon's probe: one wrap and unwrap under the current version.
absl::Status RoundTrip(const Instance& instance, absl::Duration budget = absl::Seconds(5)) {
  auto current = instance->Current();
  if (!current.ok()) {
    return current.status();
  }
  auto wrapped = instance->Wrap(*current, kDek, kAad, absl::Now() + budget);
  if (!wrapped.ok()) {
    return wrapped.status();
  }
  auto plain = instance->Unwrap(current->key_ref, *wrapped, kAad, absl::Now() + budget);
  if (!plain.ok()) {
    return plain.status();
  }
  if (plain->view() != kDek) {
    return absl::InternalError("round trip returned other bytes");
  }
  return absl::OkStatus();
}

absl::Status Opens(const Instance& instance, const core::KeyVersion& version, const std::string& wrapped) {
  auto plain = instance->Unwrap(version.key_ref, wrapped, kAad, Soon());
  if (plain.ok() && plain->view() != kDek) {
    return absl::InternalError("unwrap returned other bytes");
  }
  return plain.status();
}

template <typename B>
core::KeyVersion RotateOrDie(B& backend, const Instance& instance) {
  backend.clock.Advance(absl::Seconds(1));
  auto version = instance.admin->Rotate(Soon());
  REQUIRE_THAT(version, IsOk());
  return *version;
}

void Sleep(absl::Duration d) { std::this_thread::sleep_for(absl::ToChronoMilliseconds(d)); }

bool OneOf(const absl::Status& status, std::initializer_list<Code> codes) {
  for (Code code : codes) {
    if (status.code() == code) {
      return true;
    }
  }
  return false;
}

std::vector<std::string> KeyIds(const std::vector<core::KeyVersion>& versions) {
  std::vector<std::string> out;
  for (const auto& v : versions) {
    out.push_back(v.key_id);
  }
  return out;
}

std::vector<core::KeyVersion> VersionsOf(const Instance& instance) {
  auto versions = instance->Versions();
  REQUIRE_THAT(versions, IsOk());
  return *versions;
}

core::EnvelopeService ServiceFor(const Instance& instance, const std::string& environment) {
  core::EnvelopeService::Options options;
  options.environment = environment;
  return core::EnvelopeService(options, instance.source, core::SystemClock(), crypto::SystemRandom());
}

core::DecryptMetadata MetadataOf(const core::EncryptResult& encrypted) {
  return core::DecryptMetadata{encrypted.key_id, encrypted.annotations};
}

#define CONTRACT_CASE(name) TEMPLATE_TEST_CASE("Contract: " name, "[contract]", LocalBackend, VaultBackend, Pkcs11Backend)

// ---------------------------------------------------------------------------------------------------------------
// Round trips and malformed input

CONTRACT_CASE("wrap then unwrap returns the plaintext under the current version") {
  TestType backend;
  Instance a = backend.Open();
  const core::KeyVersion v1 = CurrentOf(a);
  CHECK(v1.state == core::KeyState::kCurrent);
  const std::string wrapped = WrapOrDie(a, v1);
  CHECK(wrapped.size() <= crypto::kMaxEnvelopeSize);
  CHECK_FALSE(absl::StrContains(wrapped, kDek));
  CHECK_THAT(Opens(a, v1, wrapped), IsOk());
}

CONTRACT_CASE("two wraps of the same plaintext differ") {
  TestType backend;
  Instance a = backend.Open();
  const core::KeyVersion v1 = CurrentOf(a);
  const std::string one = WrapOrDie(a, v1);
  const std::string two = WrapOrDie(a, v1);
  CHECK(one != two);
  CHECK_THAT(Opens(a, v1, one), IsOk());
  CHECK_THAT(Opens(a, v1, two), IsOk());
}

CONTRACT_CASE("a change of any single byte of the wrapped bytes is refused with INVALID_ARGUMENT") {
  TestType backend;
  Messages seen;
  Instance a = backend.Open();
  const core::KeyVersion v1 = CurrentOf(a);
  const std::string wrapped = WrapOrDie(a, v1);
  int accepted = 0;
  for (size_t i = 0; i < wrapped.size(); ++i) {
    std::string bad = wrapped;
    bad[i] = static_cast<char>(bad[i] ^ 0x01);
    auto result = seen(a->Unwrap(v1.key_ref, bad, kAad, Soon()));
    if (!StatusIs(Code::kInvalidArgument).match(result)) {
      ++accepted;
      UNSCOPED_INFO("byte " << i << " of " << wrapped.size() << ": " << result.status());
    }
  }
  CHECK(accepted == 0);
  CHECK_THAT(Opens(a, v1, wrapped), IsOk());
  seen.ExpectNoSecretsOf(backend);
}

CONTRACT_CASE("truncated or extended wrapped bytes are refused with INVALID_ARGUMENT") {
  TestType backend;
  Messages seen;
  Instance a = backend.Open();
  const core::KeyVersion v1 = CurrentOf(a);
  const std::string wrapped = WrapOrDie(a, v1);
  int accepted = 0;
  for (size_t n = 0; n < wrapped.size(); ++n) {
    auto result = seen(a->Unwrap(v1.key_ref, wrapped.substr(0, n), kAad, Soon()));
    if (!StatusIs(Code::kInvalidArgument).match(result)) {
      ++accepted;
      UNSCOPED_INFO("first " << n << " bytes: " << result.status());
    }
  }
  for (const std::string& tail : {std::string("A"), std::string(16, 'A'), std::string(1, '\0')}) {
    auto result = seen(a->Unwrap(v1.key_ref, wrapped + tail, kAad, Soon()));
    if (!StatusIs(Code::kInvalidArgument).match(result)) {
      ++accepted;
      UNSCOPED_INFO(tail.size() << " bytes appended: " << result.status());
    }
  }
  CHECK(accepted == 0);
  seen.ExpectNoSecretsOf(backend);
}

CONTRACT_CASE("bytes wrapped under one associated data are refused under another") {
  TestType backend;
  Instance a = backend.Open();
  const core::KeyVersion v1 = CurrentOf(a);
  const std::string wrapped = WrapOrDie(a, v1);
  CHECK_THAT(a->Unwrap(v1.key_ref, wrapped, kAad + "x", Soon()), StatusIs(Code::kInvalidArgument));
  CHECK_THAT(a->Unwrap(v1.key_ref, wrapped, kAad.substr(1), Soon()), StatusIs(Code::kInvalidArgument));
  CHECK_THAT(a->Unwrap(v1.key_ref, wrapped, "kmsplugin/envelope/v1 other key-ref", Soon()),
             StatusIs(Code::kInvalidArgument));
}

CONTRACT_CASE("a ciphertext of another environment on the same backend key is FAILED_PRECONDITION naming both") {
  TestType backend;
  Instance blue_source = backend.Open("blue");
  Instance green_source = backend.Open("green");
  core::EnvelopeService blue = ServiceFor(blue_source, "blue");
  core::EnvelopeService green = ServiceFor(green_source, "green");
  auto encrypted = blue.Encrypt(kDek, Soon());
  REQUIRE_THAT(encrypted, IsOk());
  const core::DecryptMetadata metadata = MetadataOf(*encrypted);
  CHECK_THAT(green.Decrypt(encrypted->ciphertext, &metadata, Soon()),
             StatusIs(Code::kFailedPrecondition, "\"blue\""));
  CHECK_THAT(green.Decrypt(encrypted->ciphertext, &metadata, Soon()),
             StatusIs(Code::kFailedPrecondition, "\"green\""));
  CHECK_THAT(green.Decrypt(encrypted->ciphertext, nullptr, Soon()), StatusIs(Code::kFailedPrecondition));
  auto back = blue.Decrypt(encrypted->ciphertext, &metadata, Soon());
  REQUIRE_THAT(back, IsOk());
  CHECK(back->view() == kDek);
}

CONTRACT_CASE("a ciphertext relabelled with another environment's name does not authenticate there") {
  TestType backend;
  Instance blue_source = backend.Open("blue");
  Instance green_source = backend.Open("green");
  core::EnvelopeService blue = ServiceFor(blue_source, "blue");
  core::EnvelopeService green = ServiceFor(green_source, "green");
  auto encrypted = blue.Encrypt(kDek, Soon());
  REQUIRE_THAT(encrypted, IsOk());
  auto envelope = crypto::ParseEnvelope(encrypted->ciphertext);
  REQUIRE_THAT(envelope, IsOk());
  envelope->header.environment = "green";
  auto forged = crypto::EncodeEnvelope(*envelope);
  REQUIRE_THAT(forged, IsOk());
  const core::DecryptMetadata metadata = MetadataOf(*encrypted);
  CHECK_THAT(green.Decrypt(*forged, &metadata, Soon()), StatusIs(Code::kInvalidArgument));
  CHECK_THAT(green.Decrypt(*forged, nullptr, Soon()), StatusIs(Code::kInvalidArgument));
}

CONTRACT_CASE("two sources of different environments on one backend: the source binds the environment or the AAD") {
  TestType backend;
  Instance blue = backend.Open("blue");
  Instance green = backend.Open("green");
  const core::KeyVersion v1 = CurrentOf(blue);
  CHECK(CurrentOf(green).key_ref == v1.key_ref);
  const std::string wrapped = WrapOrDie(blue, v1);
  if constexpr (TestType::kBindsEnvironment) {
    // Each environment wraps under its own derived key: even the same AAD does not open it.
    CHECK_THAT(Opens(green, v1, wrapped), StatusIs(Code::kInvalidArgument));
  } else {
    // The backend key is shared; only the AAD (which names the environment) keeps them apart.
    CHECK_THAT(Opens(green, v1, wrapped), IsOk());
    CHECK_THAT(green->Unwrap(v1.key_ref, wrapped, "kmsplugin/envelope/v1 green key-ref", Soon()),
               StatusIs(Code::kInvalidArgument));
  }
  CHECK_THAT(Opens(blue, v1, wrapped), IsOk());
}

CONTRACT_CASE("an empty plaintext is refused with INVALID_ARGUMENT") {
  TestType backend;
  Instance a = backend.Open();
  const core::KeyVersion v1 = CurrentOf(a);
  CHECK_THAT(a->Wrap(v1, "", kAad, Soon()), StatusIs(Code::kInvalidArgument));
}

CONTRACT_CASE("a plaintext too large for the envelope is refused with INVALID_ARGUMENT") {
  TestType backend;
  Instance a = backend.Open();
  const core::KeyVersion v1 = CurrentOf(a);
  CHECK_THAT(a->Wrap(v1, std::string(2 * crypto::kMaxEnvelopeSize, 'p'), kAad, Soon()),
             StatusIs(Code::kInvalidArgument));
  // The largest plaintext the core sends fits.
  CHECK_THAT(a->Wrap(v1, std::string(core::kMaxPlaintextSize, 'p'), kAad, Soon()), IsOk());
}

CONTRACT_CASE("empty associated data is refused with INVALID_ARGUMENT") {
  TestType backend;
  Instance a = backend.Open();
  const core::KeyVersion v1 = CurrentOf(a);
  CHECK_THAT(a->Wrap(v1, kDek, "", Soon()), StatusIs(Code::kInvalidArgument));
  const std::string wrapped = WrapOrDie(a, v1);
  CHECK_THAT(a->Unwrap(v1.key_ref, wrapped, "", Soon()), StatusIs(Code::kInvalidArgument));
}

CONTRACT_CASE("empty or oversized wrapped bytes are refused with INVALID_ARGUMENT") {
  TestType backend;
  Instance a = backend.Open();
  const core::KeyVersion v1 = CurrentOf(a);
  CHECK_THAT(a->Unwrap(v1.key_ref, "", kAad, Soon()), StatusIs(Code::kInvalidArgument));
  CHECK_THAT(a->Unwrap(v1.key_ref, std::string(4 * crypto::kMaxEnvelopeSize, 'w'), kAad, Soon()),
             StatusIs(Code::kInvalidArgument));
  CHECK_THAT(a->Unwrap(v1.key_ref, std::string(64, '\0'), kAad, Soon()), StatusIs(Code::kInvalidArgument));
}

CONTRACT_CASE("a garbage key_ref is refused, never served and never a crash") {
  TestType backend;
  Messages seen;
  Instance a = backend.Open();
  const core::KeyVersion v1 = CurrentOf(a);
  const std::string wrapped = WrapOrDie(a, v1);
  const std::vector<std::string> garbage = {"", "x", std::string(300, '\xff'), std::string(17, '\0'),
                                            "v1@", "v@1", "v99999999999999999999999@1", v1.key_ref + "x",
                                            v1.key_ref.substr(0, v1.key_ref.size() - 1)};
  for (const std::string& ref : garbage) {
    INFO("key_ref of " << ref.size() << " bytes");
    auto unwrapped = seen(a->Unwrap(ref, wrapped, kAad, Soon()));
    CHECK_FALSE(unwrapped.ok());
    CHECK(OneOf(unwrapped.status(), {Code::kInvalidArgument, Code::kFailedPrecondition}));
    auto found = seen(a->Lookup(ref));
    CHECK(OneOf(found.status(), {Code::kNotFound, Code::kInvalidArgument}));
    core::KeyVersion fake = v1;
    fake.key_ref = ref;
    auto rewrapped = seen(a->Wrap(fake, kDek, kAad, Soon()));
    CHECK(OneOf(rewrapped.status(), {Code::kInvalidArgument, Code::kFailedPrecondition}));
  }
  seen.ExpectNoSecretsOf(backend);
}

CONTRACT_CASE("Lookup of a well-formed but unknown key_ref is NOT_FOUND, Unwrap under it FAILED_PRECONDITION") {
  TestType backend;
  Instance a = backend.Open();
  const core::KeyVersion v1 = CurrentOf(a);
  const std::string unknown = backend.UnknownKeyRef(v1);
  CHECK_THAT(a->Lookup(unknown), StatusIs(Code::kNotFound));
  CHECK_THAT(a->Unwrap(unknown, WrapOrDie(a, v1), kAad, Soon()), StatusIs(Code::kFailedPrecondition));
  core::KeyVersion fake = v1;
  fake.key_ref = unknown;
  fake.version += 50;
  CHECK_THAT(a->Wrap(fake, kDek, kAad, Soon()), StatusIs(Code::kFailedPrecondition));
  auto known = a->Lookup(v1.key_ref);
  REQUIRE_THAT(known, IsOk());
  CHECK(known->key_id == v1.key_id);
}

// ---------------------------------------------------------------------------------------------------------------
// Versions, rotation and key_id

CONTRACT_CASE("Versions() lists every version oldest first, exactly one current, the one Current() names") {
  TestType backend;
  Instance a = backend.Open();
  RotateOrDie(backend, a);
  const core::KeyVersion v3 = RotateOrDie(backend, a);
  const std::vector<core::KeyVersion> versions = VersionsOf(a);
  REQUIRE(versions.size() == 3);
  int current = 0;
  std::set<std::string> ids, refs;
  for (size_t i = 0; i < versions.size(); ++i) {
    CHECK(versions[i].version == i + 1);
    CHECK(versions[i].key_id.size() <= 1024);
    CHECK(versions[i].key_ref.size() <= crypto::kMaxKeyRefSize);
    ids.insert(versions[i].key_id);
    refs.insert(versions[i].key_ref);
    if (versions[i].state == core::KeyState::kCurrent) {
      ++current;
      CHECK(versions[i].key_id == CurrentOf(a).key_id);
    }
    auto looked = a->Lookup(versions[i].key_ref);
    REQUIRE_THAT(looked, IsOk());
    CHECK(looked->key_id == versions[i].key_id);
    CHECK(looked->state == versions[i].state);
  }
  CHECK(current == 1);
  CHECK(ids.size() == 3);
  CHECK(refs.size() == 3);
  CHECK(CurrentOf(a).key_id == v3.key_id);
  CHECK(versions.back().key_id == v3.key_id);
}

CONTRACT_CASE("a refresh that finds nothing new changes nothing") {
  TestType backend;
  Instance a = backend.Open();
  RotateOrDie(backend, a);
  const auto before = KeyIds(VersionsOf(a));
  const std::string current = CurrentOf(a).key_id;
  for (int i = 0; i < 3; ++i) {
    CHECK_THAT(a->Refresh(Soon()), IsOk());
    CHECK(CurrentOf(a).key_id == current);
    CHECK(KeyIds(VersionsOf(a)) == before);
  }
}

CONTRACT_CASE("a rotation by another process is noticed by Refresh, Status and Encrypt agreeing") {
  TestType backend;
  Instance a = backend.Open();
  Instance b = backend.Open();
  core::EnvelopeService service = ServiceFor(a, "contract");
  const core::KeyVersion v1 = CurrentOf(a);
  auto old = service.Encrypt(kDek, Soon());
  REQUIRE_THAT(old, IsOk());
  CHECK(old->key_id == v1.key_id);
  const std::string wrapped_v1 = WrapOrDie(a, v1);

  const core::KeyVersion v2 = RotateOrDie(backend, b);
  CHECK(v2.version == v1.version + 1);
  CHECK(v2.key_id != v1.key_id);
  REQUIRE_THAT(a->Refresh(Soon()), IsOk());
  CHECK(CurrentOf(a).key_id == v2.key_id);
  CHECK(CurrentOf(a).key_ref == v2.key_ref);
  CHECK(service.Status().key_id == v2.key_id);
  auto fresh = service.Encrypt(kDek, Soon());
  REQUIRE_THAT(fresh, IsOk());
  CHECK(fresh->key_id == v2.key_id);
  CHECK(service.Status().key_id == fresh->key_id);
  // What A wraps now, B opens, and every older ciphertext still decrypts on both.
  const std::string wrapped_v2 = WrapOrDie(a, CurrentOf(a));
  CHECK_THAT(Opens(b, v2, wrapped_v2), IsOk());
  CHECK_THAT(Opens(a, v1, wrapped_v1), IsOk());
  CHECK_THAT(Opens(b, v1, wrapped_v1), IsOk());
  const core::DecryptMetadata old_metadata = MetadataOf(*old);
  CHECK_THAT(service.Decrypt(old->ciphertext, &old_metadata, Soon()), IsOk());
  const core::DecryptMetadata fresh_metadata = MetadataOf(*fresh);
  CHECK_THAT(service.Decrypt(fresh->ciphertext, &fresh_metadata, Soon()), IsOk());
}

CONTRACT_CASE("every version keeps decrypting across several rotations") {
  TestType backend;
  Instance a = backend.Open();
  std::vector<std::pair<core::KeyVersion, std::string>> made;
  made.emplace_back(CurrentOf(a), WrapOrDie(a, CurrentOf(a)));
  for (int i = 0; i < 4; ++i) {
    const core::KeyVersion v = RotateOrDie(backend, a);
    CHECK(CurrentOf(a).key_id == v.key_id);
    made.emplace_back(v, WrapOrDie(a, v));
  }
  Instance fresh = backend.Open();
  for (const auto& [version, wrapped] : made) {
    INFO("version " << version.version);
    CHECK_THAT(Opens(a, version, wrapped), IsOk());
    CHECK_THAT(Opens(fresh, version, wrapped), IsOk());
  }
}

CONTRACT_CASE("key_id never moves back when a refresh sees fewer or older versions, and the old view is kept") {
  TestType backend;
  Messages seen;
  Instance a = backend.Open();
  Instance b = backend.Open();
  REQUIRE_THAT(a->Refresh(Soon()), IsOk());
  backend.Freeze();  // the backend as it is now: version 1 only
  const core::KeyVersion v1 = CurrentOf(a);
  const core::KeyVersion v2 = RotateOrDie(backend, b);
  REQUIRE_THAT(a->Refresh(Soon()), IsOk());
  REQUIRE(CurrentOf(a).key_id == v2.key_id);
  const std::string wrapped_v2 = WrapOrDie(a, v2);
  const auto view = KeyIds(VersionsOf(a));

  backend.ServeFrozen(true);
  backend.clock.Advance(absl::Seconds(1));
  const absl::Status refreshed = seen(a->Refresh(Soon()));
  UNSCOPED_INFO("refresh of the older view: " << refreshed);
  CHECK_FALSE(refreshed.code() == Code::kInternal);
  CHECK(CurrentOf(a).key_id == v2.key_id);
  CHECK(KeyIds(VersionsOf(a)) == view);
  CHECK_THAT(Opens(a, v2, wrapped_v2), IsOk());
  CHECK_THAT(a->Lookup(v2.key_ref), IsOk());
  // A source that opens while the backend shows the older view does not matter here; the one that saw v2 keeps it.
  backend.ServeFrozen(false);
  CHECK_THAT(a->Refresh(Soon()), IsOk());
  CHECK(CurrentOf(a).key_id == v2.key_id);
  CHECK_THAT(Opens(a, v2, wrapped_v2), IsOk());
  CHECK(v1.key_id != v2.key_id);
  seen.ExpectNoSecretsOf(backend);
}

// ---------------------------------------------------------------------------------------------------------------
// Retire and reinstate

CONTRACT_CASE("retire is a floor: that version and older are refused naming them by number, others see it") {
  TestType backend;
  Messages seen;
  Instance a = backend.Open();
  Instance b = backend.Open();
  const core::KeyVersion v1 = CurrentOf(a);
  const std::string w1 = WrapOrDie(a, v1);
  const core::KeyVersion v2 = RotateOrDie(backend, a);
  const std::string w2 = WrapOrDie(a, v2);
  const core::KeyVersion v3 = RotateOrDie(backend, a);
  const std::string w3 = WrapOrDie(a, v3);
  REQUIRE_THAT(b->Refresh(Soon()), IsOk());

  auto retired = a.admin->Retire(2, Soon());
  REQUIRE_THAT(retired, IsOk());
  REQUIRE(retired->size() == 2);
  CHECK((*retired)[0].version == 1);
  CHECK((*retired)[1].version == 2);
  CHECK_THAT(seen(a->Unwrap(v1.key_ref, w1, kAad, Soon())), StatusIs(Code::kFailedPrecondition, "key version 1"));
  CHECK_THAT(seen(a->Unwrap(v2.key_ref, w2, kAad, Soon())), StatusIs(Code::kFailedPrecondition, "key version 2"));
  CHECK_THAT(Opens(a, v3, w3), IsOk());
  CHECK(CurrentOf(a).key_id == v3.key_id);

  REQUIRE_THAT(b->Refresh(Soon()), IsOk());
  CHECK_THAT(seen(b->Unwrap(v1.key_ref, w1, kAad, Soon())), StatusIs(Code::kFailedPrecondition, "key version 1"));
  CHECK_THAT(seen(b->Unwrap(v2.key_ref, w2, kAad, Soon())), StatusIs(Code::kFailedPrecondition, "key version 2"));
  CHECK_THAT(Opens(b, v3, w3), IsOk());
  for (const Instance* instance : {&a, &b}) {
    const auto versions = VersionsOf(*instance);
    REQUIRE(versions.size() == 3);
    CHECK(versions[0].state == core::KeyState::kRetired);
    CHECK(versions[1].state == core::KeyState::kRetired);
    CHECK(versions[2].state == core::KeyState::kCurrent);
  }
  // The refusal names the version by number, never by its raw reference.
  CHECK_FALSE(absl::StrContains(seen(b->Unwrap(v1.key_ref, w1, kAad, Soon())).status().message(),
                                 absl::BytesToHexString(v1.key_ref)));
  seen.ExpectNoSecretsOf(backend);
}

CONTRACT_CASE("reinstate brings retired versions back, in this process and in another after its Refresh") {
  TestType backend;
  Instance a = backend.Open();
  Instance b = backend.Open();
  const core::KeyVersion v1 = CurrentOf(a);
  const std::string w1 = WrapOrDie(a, v1);
  const core::KeyVersion v2 = RotateOrDie(backend, a);
  const std::string w2 = WrapOrDie(a, v2);
  const core::KeyVersion v3 = RotateOrDie(backend, a);
  REQUIRE_THAT(a.admin->Retire(2, Soon()), IsOk());
  REQUIRE_THAT(b->Refresh(Soon()), IsOk());
  REQUIRE_THAT(Opens(b, v1, w1), StatusIs(Code::kFailedPrecondition));

  auto back = a.admin->Reinstate(1, Soon());
  REQUIRE_THAT(back, IsOk());
  CHECK(back->size() == 2);
  CHECK_THAT(Opens(a, v1, w1), IsOk());
  CHECK_THAT(Opens(a, v2, w2), IsOk());
  REQUIRE_THAT(b->Refresh(Soon()), IsOk());
  CHECK_THAT(Opens(b, v1, w1), IsOk());
  CHECK_THAT(Opens(b, v2, w2), IsOk());
  for (const auto& v : VersionsOf(b)) {
    CHECK(v.state == (v.version == v3.version ? core::KeyState::kCurrent : core::KeyState::kActive));
  }
  CHECK(CurrentOf(b).key_id == v3.key_id);
}

// `kmsplugin retire` and `kmsplugin retire --reinstate` are two processes: the second opens the source after the
// retire and may never have seen the retired version listed (Vault archives versions below min_decryption_version
// and no longer lists them). It must still bring it back, under its own key_id.
CONTRACT_CASE("a source opened after the retire reinstates the retired version, with its key_id") {
  TestType backend;
  Instance a = backend.Open();
  const core::KeyVersion v1 = CurrentOf(a);
  const std::string w1 = WrapOrDie(a, v1);
  const core::KeyVersion v2 = RotateOrDie(backend, a);
  REQUIRE_THAT(a.admin->Retire(1, Soon()), IsOk());
  Instance later = backend.Open();
  CHECK_THAT(Opens(later, v1, w1), StatusIs(Code::kFailedPrecondition, "key version 1"));
  auto back = later.admin->Reinstate(1, Soon());
  REQUIRE_THAT(back, IsOk());
  REQUIRE(back->size() == 1);
  CHECK((*back)[0].key_id == v1.key_id);
  CHECK((*back)[0].state == core::KeyState::kActive);
  CHECK_THAT(Opens(later, v1, w1), IsOk());
  REQUIRE_THAT(a->Refresh(Soon()), IsOk());
  CHECK_THAT(Opens(a, v1, w1), IsOk());
  Instance fresh = backend.Open();
  CHECK_THAT(Opens(fresh, v1, w1), IsOk());
  CHECK(KeyIds(VersionsOf(fresh)) == std::vector<std::string>{v1.key_id, v2.key_id});
  CHECK(CurrentOf(fresh).key_id == v2.key_id);
}

CONTRACT_CASE("reinstating only the newer part of a retired floor keeps the older part retired") {
  TestType backend;
  Instance a = backend.Open();
  const core::KeyVersion v1 = CurrentOf(a);
  const std::string w1 = WrapOrDie(a, v1);
  const core::KeyVersion v2 = RotateOrDie(backend, a);
  const std::string w2 = WrapOrDie(a, v2);
  RotateOrDie(backend, a);
  REQUIRE_THAT(a.admin->Retire(2, Soon()), IsOk());
  auto back = a.admin->Reinstate(2, Soon());
  REQUIRE_THAT(back, IsOk());
  REQUIRE(back->size() == 1);
  CHECK((*back)[0].version == 2);
  CHECK_THAT(Opens(a, v2, w2), IsOk());
  CHECK_THAT(Opens(a, v1, w1), StatusIs(Code::kFailedPrecondition, "key version 1"));
  Instance fresh = backend.Open();
  CHECK_THAT(Opens(fresh, v2, w2), IsOk());
  CHECK_THAT(Opens(fresh, v1, w1), StatusIs(Code::kFailedPrecondition, "key version 1"));
}

CONTRACT_CASE("the current version cannot be retired, and the refusal changes nothing") {
  TestType backend;
  Instance a = backend.Open();
  RotateOrDie(backend, a);
  const core::KeyVersion v2 = CurrentOf(a);
  const std::string w2 = WrapOrDie(a, v2);
  const auto before = VersionsOf(a);
  CHECK_THAT(a.admin->Retire(v2.version, Soon()), StatusIs(Code::kFailedPrecondition));
  CHECK_FALSE(a.admin->Retire(v2.version + 1, Soon()).ok());
  CHECK_THAT(Opens(a, v2, w2), IsOk());
  CHECK(CurrentOf(a).key_id == v2.key_id);
  CHECK(KeyIds(VersionsOf(a)) == KeyIds(before));
  for (const auto& v : VersionsOf(a)) {
    CHECK(v.state != core::KeyState::kRetired);
  }
}

CONTRACT_CASE("retire or reinstate of a version the backend does not have is NOT_FOUND, and reinstate of an active one is refused") {
  TestType backend;
  Instance a = backend.Open();
  RotateOrDie(backend, a);
  RotateOrDie(backend, a);
  CHECK_THAT(a.admin->Reinstate(1, Soon()), StatusIs(Code::kFailedPrecondition));
  CHECK_THAT(a.admin->Reinstate(77, Soon()), StatusIs(Code::kNotFound));
  CHECK_FALSE(a.admin->Retire(0, Soon()).ok());
  for (const auto& v : VersionsOf(a)) {
    CHECK(v.state != core::KeyState::kRetired);
  }
}

CONTRACT_CASE("a retired version refuses Wrap too") {
  TestType backend;
  Instance a = backend.Open();
  const core::KeyVersion v1 = CurrentOf(a);
  RotateOrDie(backend, a);
  REQUIRE_THAT(a.admin->Retire(1, Soon()), IsOk());
  auto retired = a->Lookup(v1.key_ref);
  REQUIRE_THAT(retired, IsOk());
  CHECK(retired->state == core::KeyState::kRetired);
  CHECK_THAT(a->Wrap(*retired, kDek, kAad, Soon()), StatusIs(Code::kFailedPrecondition));
  CHECK_THAT(a->Wrap(v1, kDek, kAad, Soon()), StatusIs(Code::kFailedPrecondition));
}

CONTRACT_CASE("destroy never removes a version that is not retired") {
  TestType backend;
  Instance a = backend.Open();
  const core::KeyVersion v1 = CurrentOf(a);
  const std::string w1 = WrapOrDie(a, v1);
  RotateOrDie(backend, a);
  auto destroyed = a.admin->DestroyRetired(1, Soon());
  CHECK(OneOf(destroyed.status(), {Code::kFailedPrecondition, Code::kUnimplemented}));
  CHECK_THAT(Opens(a, v1, w1), IsOk());
  CHECK(VersionsOf(a).size() == 2);
}

// ---------------------------------------------------------------------------------------------------------------
// Deadlines

CONTRACT_CASE("a call whose deadline has passed answers at once and never reaches the backend's slow path") {
  TestType backend;
  Instance a = backend.Open();
  const core::KeyVersion v1 = CurrentOf(a);
  const std::string w1 = WrapOrDie(a, v1);
  const size_t versions = VersionsOf(a).size();
  const absl::Time past = absl::Now() - absl::Seconds(1);
  const std::vector<std::pair<std::string, std::function<absl::Status()>>> calls = {
      {"Wrap", [&] { return a->Wrap(v1, kDek, kAad, past).status(); }},
      {"Unwrap", [&] { return a->Unwrap(v1.key_ref, w1, kAad, past).status(); }},
      {"Refresh", [&] { return a->Refresh(past); }},
      {"Rotate", [&] { return a.admin->Rotate(past).status(); }},
  };
  for (const auto& [name, call] : calls) {
    INFO(name);
    const absl::Time start = absl::Now();
    const absl::Status status = call();
    CHECK(absl::Now() - start < absl::Milliseconds(500));
    if constexpr (TestType::kBlocksOnBackend) {
      CHECK(status.code() == Code::kDeadlineExceeded);
    } else {
      CHECK(OneOf(status, {Code::kOk, Code::kDeadlineExceeded}));
    }
  }
  if constexpr (TestType::kBlocksOnBackend) {
    CHECK(VersionsOf(a).size() == versions);
  }
}

CONTRACT_CASE("a backend that hangs: every call ends by its deadline with DEADLINE_EXCEEDED or UNAVAILABLE") {
  TestType backend;
  Instance a = backend.Open();
  const core::KeyVersion v1 = CurrentOf(a);
  const std::string w1 = WrapOrDie(a, v1);
  backend.Hang();
  const absl::Duration budget = absl::Seconds(1);
  const std::vector<std::pair<std::string, std::function<absl::Status(absl::Time)>>> calls = {
      {"Wrap", [&](absl::Time d) { return a->Wrap(v1, kDek, kAad, d).status(); }},
      {"Unwrap", [&](absl::Time d) { return a->Unwrap(v1.key_ref, w1, kAad, d).status(); }},
      {"Refresh", [&](absl::Time d) { return a->Refresh(d); }},
      {"Rotate", [&](absl::Time d) { return a.admin->Rotate(d).status(); }},
  };
  for (const auto& [name, call] : calls) {
    INFO(name);
    const absl::Time start = absl::Now();
    const absl::Status status = call(start + budget);
    const absl::Duration took = absl::Now() - start;
    UNSCOPED_INFO(name << " took " << absl::FormatDuration(took) << ": " << status);
    CHECK(took < budget + absl::Milliseconds(750));
    if constexpr (TestType::kCanHang) {
      CHECK(OneOf(status, {Code::kDeadlineExceeded, Code::kUnavailable}));
    } else {
      CHECK_THAT(status, IsOk());  // nothing to hang on: the call is served within its deadline
    }
  }
  CHECK(CurrentOf(a).key_ref == (TestType::kCanHang ? v1.key_ref : CurrentOf(a).key_ref));
  backend.Unhang();
  CHECK_THAT(RoundTrip(a), IsOk());
  CHECK_THAT(Opens(a, v1, w1), IsOk());
}

// ---------------------------------------------------------------------------------------------------------------
// The backend lost and back

CONTRACT_CASE("backend lost for several poll intervals with no traffic, then back: heals by itself within two polls") {
  TestType backend;
  Messages seen;
  Instance a = backend.Open();
  const core::KeyVersion v1 = CurrentOf(a);
  const std::string w1 = WrapOrDie(a, v1);
  const core::KeyVersion v2 = RotateOrDie(backend, a);
  const std::string w2 = WrapOrDie(a, v2);
  const auto view = KeyIds(VersionsOf(a));

  backend.GoAway();
  for (int poll = 0; poll < 4; ++poll) {  // the daemon polls every second; nothing else calls
    Sleep(absl::Seconds(1));
    const absl::Status refreshed = seen(a->Refresh(absl::Now() + absl::Seconds(1)));
    INFO("poll " << poll << " while away: " << refreshed);
    CHECK(refreshed.code() != Code::kFailedPrecondition);
    if constexpr (!TestType::kServesWhileAway) {
      CHECK(OneOf(refreshed, {Code::kUnavailable, Code::kDeadlineExceeded}));
    } else {
      CHECK_FALSE(refreshed.ok());  // says the keyring is gone, while serving what it loaded
    }
    auto current = seen(a->Current());
    REQUIRE_THAT(current, IsOk());
    CHECK(current->key_id == v2.key_id);
    CHECK(KeyIds(VersionsOf(a)) == view);
  }
  backend.ComeBack();
  bool healed = false;
  for (int poll = 0; poll < 2 && !healed; ++poll) {
    Sleep(absl::Seconds(1));
    seen(a->Refresh(absl::Now() + absl::Seconds(1)));
    healed = seen(RoundTrip(a, absl::Seconds(1))).ok();
  }
  CHECK(healed);
  CHECK(CurrentOf(a).key_id == v2.key_id);
  CHECK_THAT(Opens(a, v1, w1), IsOk());
  CHECK_THAT(Opens(a, v2, w2), IsOk());
  CHECK(KeyIds(VersionsOf(a)) == view);
  seen.ExpectNoSecretsOf(backend);
}

CONTRACT_CASE("while the backend is away calls fail UNAVAILABLE, never FAILED_PRECONDITION, and heal after") {
  TestType backend;
  Messages seen;
  Instance a = backend.Open();
  const core::KeyVersion v1 = CurrentOf(a);
  const std::string w1 = WrapOrDie(a, v1);
  core::EnvelopeService service = ServiceFor(a, "contract");
  auto encrypted = service.Encrypt(kDek, Soon());
  REQUIRE_THAT(encrypted, IsOk());
  const core::DecryptMetadata metadata = MetadataOf(*encrypted);

  backend.GoAway();
  Sleep(absl::Milliseconds(1200));
  seen(a->Refresh(absl::Now() + absl::Seconds(1)));
  const absl::Time deadline = absl::Now() + absl::Seconds(2);
  auto wrapped = seen(a->Wrap(v1, kDek, kAad, deadline));
  auto unwrapped = seen(a->Unwrap(v1.key_ref, w1, kAad, deadline));
  auto decrypted = seen(service.Decrypt(encrypted->ciphertext, &metadata, deadline));
  auto fresh = seen(service.Encrypt(kDek, deadline));
  if constexpr (TestType::kServesWhileAway) {
    CHECK_THAT(wrapped, IsOk());
    CHECK_THAT(unwrapped, IsOk());
    CHECK_THAT(decrypted, IsOk());
    CHECK_THAT(fresh, IsOk());
  } else {
    CHECK_THAT(wrapped, StatusIs(Code::kUnavailable));
    CHECK_THAT(unwrapped, StatusIs(Code::kUnavailable));
    CHECK_THAT(decrypted, StatusIs(Code::kUnavailable));
    CHECK_THAT(fresh, StatusIs(Code::kUnavailable));
  }
  CHECK(service.Status().key_id == v1.key_id);

  backend.ComeBack();
  bool healed = false;
  for (int poll = 0; poll < 2 && !healed; ++poll) {
    Sleep(absl::Seconds(1));
    seen(a->Refresh(absl::Now() + absl::Seconds(1)));
    healed = seen(RoundTrip(a, absl::Seconds(1))).ok();
  }
  CHECK(healed);
  CHECK_THAT(Opens(a, v1, w1), IsOk());
  CHECK_THAT(service.Decrypt(encrypted->ciphertext, &metadata, Soon()), IsOk());
  CHECK(service.Status().key_id == v1.key_id);
  seen.ExpectNoSecretsOf(backend);
}

CONTRACT_CASE("a source that has served nothing when its backend goes away serves once it is back, without a restart") {
  TestType backend;
  Instance a = backend.Open();
  const core::KeyVersion v1 = CurrentOf(a);
  const std::string w1 = WrapOrDie(a, v1);
  Instance b = backend.Open();
  backend.GoAway();
  for (int poll = 0; poll < 2; ++poll) {
    Sleep(absl::Seconds(1));
    const absl::Status refreshed = b->Refresh(absl::Now() + absl::Seconds(1));
    CHECK(refreshed.code() != Code::kFailedPrecondition);
  }
  backend.ComeBack();
  bool healed = false;
  for (int poll = 0; poll < 2 && !healed; ++poll) {
    Sleep(absl::Seconds(1));
    (void)b->Refresh(absl::Now() + absl::Seconds(1));
    healed = RoundTrip(b, absl::Seconds(1)).ok();
  }
  CHECK(healed);
  CHECK_THAT(Opens(b, v1, w1), IsOk());
  CHECK(CurrentOf(b).key_id == v1.key_id);
}

// ---------------------------------------------------------------------------------------------------------------
// Credentials and time

CONTRACT_CASE("a credential file replaced while serving is picked up by Refresh (SIGHUP)") {
  TestType backend;
  Messages seen;
  Instance a = backend.Open();
  const core::KeyVersion v1 = CurrentOf(a);
  const std::string w1 = WrapOrDie(a, v1);
  backend.ReplaceCredential(a);
  CHECK_THAT(seen(a->Refresh(Soon())), IsOk());
  CHECK_THAT(seen(RoundTrip(a)), IsOk());
  CHECK_THAT(seen(Opens(a, v1, w1)), IsOk());
  CHECK(CurrentOf(a).key_id == v1.key_id);
  // A process started after the change opens with the new credential.
  Instance b = backend.Open();
  CHECK_THAT(seen(Opens(b, v1, w1)), IsOk());
  seen.ExpectNoSecretsOf(backend);
}

CONTRACT_CASE("a credential file made readable by others is refused by Refresh naming the file, and the view is kept") {
  TestType backend;
  Messages seen;
  Instance a = backend.Open();
  const core::KeyVersion v1 = CurrentOf(a);
  const std::string w1 = WrapOrDie(a, v1);
  const auto view = KeyIds(VersionsOf(a));
  const std::string file = backend.CredentialFile();
  REQUIRE(chmod(file.c_str(), 0644) == 0);
  backend.clock.Advance(absl::Seconds(1));
  const absl::Status refreshed = seen(a->Refresh(Soon()));
  CHECK_FALSE(refreshed.ok());
  CHECK(OneOf(refreshed, {Code::kPermissionDenied, Code::kFailedPrecondition}));
  CHECK(absl::StrContains(refreshed.message(), file));
  CHECK(CurrentOf(a).key_id == v1.key_id);
  CHECK(KeyIds(VersionsOf(a)) == view);
  REQUIRE(chmod(file.c_str(), 0600) == 0);
  CHECK_THAT(seen(a->Refresh(Soon())), IsOk());
  CHECK_THAT(seen(Opens(a, v1, w1)), IsOk());
  seen.ExpectNoSecretsOf(backend);
}

CONTRACT_CASE("a long jump of the clock (a suspended host) needs no restart: Refresh and calls keep working") {
  TestType backend;
  Instance a = backend.Open();
  const core::KeyVersion v1 = CurrentOf(a);
  const std::string w1 = WrapOrDie(a, v1);
  backend.clock.Advance(absl::Hours(24 * 30));
  CHECK_THAT(a->Refresh(Soon()), IsOk());
  CHECK_THAT(RoundTrip(a), IsOk());
  CHECK_THAT(Opens(a, v1, w1), IsOk());
  CHECK(CurrentOf(a).key_id == v1.key_id);
  const core::KeyVersion v2 = RotateOrDie(backend, a);
  CHECK(v2.key_id != v1.key_id);
  CHECK_THAT(RoundTrip(a), IsOk());
}

CONTRACT_CASE("served as the daemon serves it for several seconds, with polls, no call fails") {
  TestType backend;
  Instance a = backend.OpenServing();
  const core::KeyVersion v1 = CurrentOf(a);
  const std::string w1 = WrapOrDie(a, v1);
  int failures = 0;
  for (int i = 0; i < 10; ++i) {
    Sleep(absl::Milliseconds(500));
    if (i % 2 == 1) {
      const absl::Status refreshed = a->Refresh(Soon());
      if (!refreshed.ok()) {
        ++failures;
        UNSCOPED_INFO("refresh " << i << ": " << refreshed);
      }
    }
    const absl::Status probe = RoundTrip(a);
    if (!probe.ok()) {
      ++failures;
      UNSCOPED_INFO("probe " << i << ": " << probe);
    }
  }
  CHECK(failures == 0);
  CHECK_THAT(Opens(a, v1, w1), IsOk());
}

CONTRACT_CASE("no status message names a secret: root key, PIN or token") {
  TestType backend;
  Messages seen;
  Instance a = backend.Open();
  const core::KeyVersion v1 = CurrentOf(a);
  const std::string w1 = WrapOrDie(a, v1);
  seen(a->Unwrap(v1.key_ref, w1, kAad + "x", Soon()));
  seen(a->Unwrap("garbage", w1, kAad, Soon()));
  seen(a->Unwrap(backend.UnknownKeyRef(v1), w1, kAad, Soon()));
  seen(a->Wrap(v1, "", kAad, Soon()));
  seen(a->Lookup("garbage"));
  seen(a.admin->Retire(v1.version, Soon()));
  seen(a.admin->Reinstate(99, Soon()));
  seen(a.admin->DestroyRetired(v1.version, Soon()));
  const std::string file = backend.CredentialFile();
  REQUIRE(chmod(file.c_str(), 0644) == 0);
  backend.clock.Advance(absl::Seconds(1));
  seen(a->Refresh(Soon()));
  seen(RoundTrip(a));
  REQUIRE(chmod(file.c_str(), 0600) == 0);
  backend.GoAway();
  Sleep(absl::Milliseconds(200));
  seen(a->Refresh(absl::Now() + absl::Seconds(1)));
  seen(RoundTrip(a, absl::Seconds(1)));
  backend.ComeBack();
  CHECK(seen.size() >= 6);
  seen.ExpectNoSecretsOf(backend);
}

// ---------------------------------------------------------------------------------------------------------------
// Concurrency

CONTRACT_CASE("wraps and unwraps on 6 threads while another process rotates and this one refreshes: no failure") {
  TestType backend;
  Instance a = backend.Open();
  Instance b = backend.Open();
  std::atomic<bool> stop{false};
  std::atomic<int> calls{0}, failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 6; ++t) {
    threads.emplace_back([&] {
      while (!stop.load()) {
        if (!RoundTrip(a).ok()) {
          failures.fetch_add(1);
        }
        calls.fetch_add(1);
      }
    });
  }
  std::vector<core::KeyVersion> rotated;
  for (int i = 0; i < 2; ++i) {
    Sleep(absl::Milliseconds(300));
    rotated.push_back(RotateOrDie(backend, b));
    for (int j = 0; j < 3; ++j) {
      CHECK_THAT(a->Refresh(Soon()), IsOk());
      Sleep(absl::Milliseconds(100));
    }
  }
  stop.store(true);
  for (auto& thread : threads) {
    thread.join();
  }
  CHECK(failures.load() == 0);
  CHECK(calls.load() > 10);
  CHECK(CurrentOf(a).key_id == rotated.back().key_id);
}

// ---------------------------------------------------------------------------------------------------------------
// Vault only: what only a Vault backend has (AppRole, a sealed server, token leases)

TEST_CASE("Contract vault: an AppRole secret_id file replaced while serving is picked up by Refresh", "[contract]") {
  VaultBackend backend;
  backend.server().Control({{"approle", {{"role_id", "role-contract"}, {"secret_id", "CONTRACT-secret-id-93f0"}}}});
  keysource::vault::VaultOptions options = backend.options();
  options.auth = keysource::vault::AuthOptions();
  options.auth.kind = keysource::vault::AuthKind::kAppRole;
  options.auth.mount = "approle";
  options.auth.role_id_file = backend.dir() + "/role_id";
  options.auth.secret_id_file = backend.dir() + "/secret_id";
  testing::WriteFile(options.auth.role_id_file, "role-contract\n");
  testing::WriteFile(options.auth.secret_id_file, "CONTRACT-secret-id-93f0\n");
  Instance a = backend.OpenWith(options, false);
  REQUIRE_THAT(RoundTrip(a), IsOk());
  // The secret_id is rotated: the old one no longer logs in, every token it gave is revoked.
  backend.server().Control({{"approle", {{"role_id", "role-contract"}, {"secret_id", "CONTRACT-secret-id-second"}}}});
  backend.server().Control({{"revoke_tokens", true}});
  testing::WriteFile(options.auth.secret_id_file, "CONTRACT-secret-id-second\n");
  Messages seen;
  CHECK_THAT(seen(a->Refresh(Soon())), IsOk());
  CHECK_THAT(seen(RoundTrip(a)), IsOk());
  seen.ExpectNoSecretsOf(backend);
}

TEST_CASE("Contract vault: a sealed server for several polls, then unsealed: UNAVAILABLE meanwhile, heals by itself",
          "[contract]") {
  VaultBackend backend;
  Instance a = backend.Open();
  const core::KeyVersion v1 = CurrentOf(a);
  const std::string w1 = WrapOrDie(a, v1);
  backend.server().Control({{"sealed", true}});
  for (int poll = 0; poll < 3; ++poll) {
    Sleep(absl::Seconds(1));
    CHECK_THAT(a->Refresh(absl::Now() + absl::Seconds(1)), StatusIs(Code::kUnavailable));
    CHECK(CurrentOf(a).key_id == v1.key_id);
  }
  CHECK_THAT(a->Unwrap(v1.key_ref, w1, kAad, absl::Now() + absl::Seconds(1)), StatusIs(Code::kUnavailable));
  backend.server().Control({{"sealed", false}});
  Sleep(absl::Seconds(1));
  CHECK_THAT(a->Refresh(Soon()), IsOk());
  CHECK_THAT(RoundTrip(a), IsOk());
  CHECK_THAT(Opens(a, v1, w1), IsOk());
}

TEST_CASE("Contract vault: a token whose lease is shorter than the plugin thinks is renewed from the TTL Vault reports",
          "[contract]") {
  VaultBackend backend;
  const std::string token = "hvs.CONTRACT-lease-skew-0c4d";
  backend.server().Control({{"add_token", {{"id", token}, {"ttl", 600}, {"renewable", true}, {"max_ttl", 0}}}});
  keysource::vault::VaultOptions options = backend.options();
  testing::WriteFile(options.auth.token_file, token + "\n");
  options.poll_interval = absl::Seconds(1);
  Instance a = backend.OpenWith(options, /*background=*/true);
  REQUIRE_THAT(RoundTrip(a), IsOk());
  // Vault now says 3 s are left (another holder's clock, a suspended host): only asking Vault can know.
  backend.server().Control({{"add_token", {{"id", token}, {"ttl", 3}, {"renewable", true}, {"max_ttl", 0}}}});
  int failures = 0;
  for (int i = 0; i < 6; ++i) {
    Sleep(absl::Seconds(1));
    const absl::Status refreshed = a->Refresh(Soon());  // the daemon's poll and SIGHUP
    const absl::Status probe = RoundTrip(a);
    if (!refreshed.ok() || !probe.ok()) {
      ++failures;
      UNSCOPED_INFO("second " << i << ": refresh " << refreshed << ", probe " << probe);
    }
  }
  CHECK(failures == 0);
}

TEST_CASE("Contract vault: a short-lived token is renewed by the lease Vault reports, no call failing", "[contract]") {
  VaultBackend backend;
  const std::string token = "hvs.CONTRACT-short-lived-91aa";
  backend.server().Control({{"add_token", {{"id", token}, {"ttl", 3}, {"renewable", true}, {"max_ttl", 0}}}});
  keysource::vault::VaultOptions options = backend.options();
  testing::WriteFile(options.auth.token_file, token + "\n");
  options.poll_interval = absl::Seconds(1);
  Instance a = backend.OpenWith(options, /*background=*/true);
  int failures = 0;
  for (int i = 0; i < 10; ++i) {  // 5 s: past the 3 s lease
    Sleep(absl::Milliseconds(500));
    if (!RoundTrip(a).ok()) {
      ++failures;
    }
  }
  CHECK(failures == 0);
  CHECK(backend.server().Requests(0, "/v1/auth/token/renew-self") >= 2);
  const auto gauges = a->BackendGauges();
  REQUIRE_FALSE(gauges.empty());
  CHECK(gauges[0].value > 0);
  CHECK(gauges[0].value <= 3);
}

// ---------------------------------------------------------------------------------------------------------------
// Staged versions and the heal on an unknown newer version (version_rules.h, version_heal.h). Instance `a` is the
// node that stages and promotes; `b` is another process on the same backend that has not refreshed, as a second
// control-plane node whose copy of the keys has arrived but whose poll has not run.

CONTRACT_CASE("stage adds a version that decrypts, is listed staged and never encrypts, and promote makes it current") {
  TestType backend;
  Messages seen;
  Instance a = backend.Open();
  const core::KeyVersion v1 = CurrentOf(a);
  backend.clock.Advance(absl::Seconds(1));
  auto staged = seen(a.admin->Stage(Soon()));
  if constexpr (!TestType::kStages) {
    CHECK_THAT(staged, StatusIs(Code::kFailedPrecondition, "plain `kmsplugin rotate`"));
    CHECK_THAT(seen(a.admin->Promote(Soon())), StatusIs(Code::kFailedPrecondition, "cannot stage"));
    CHECK(CurrentOf(a).key_id == v1.key_id);
    CHECK(VersionsOf(a).size() == 1);
    return;
  } else {
    REQUIRE_THAT(staged, IsOk());
    CHECK(staged->state == core::KeyState::kStaged);
    CHECK(staged->version == v1.version + 1);
    CHECK(CurrentOf(a).key_id == v1.key_id);  // Status keeps reporting the current version
    auto listed = core::FindVersionNumber(VersionsOf(a), staged->version);
    REQUIRE(listed.has_value());
    CHECK(listed->state == core::KeyState::kStaged);
    CHECK_THAT(seen(a->Wrap(*staged, kDek, kAad, Soon())), StatusIs(Code::kFailedPrecondition, "staged"));

    // Another process (a node whose copy of the keys arrived) lists it staged too.
    Instance b = backend.Open();
    CHECK(CurrentOf(b).key_id == v1.key_id);
    auto in_b = b->Lookup(staged->key_ref);
    REQUIRE_THAT(in_b, IsOk());
    CHECK(in_b->state == core::KeyState::kStaged);
    CHECK(core::KeySetFingerprint(VersionsOf(a)) == core::KeySetFingerprint(VersionsOf(b)));

    auto promoted = seen(a.admin->Promote(Soon()));
    REQUIRE_THAT(promoted, IsOk());
    CHECK(promoted->version == staged->version);
    CHECK(promoted->key_id == staged->key_id);
    CHECK(CurrentOf(a).key_id == staged->key_id);
    CHECK(core::FindVersionNumber(VersionsOf(a), v1.version)->state == core::KeyState::kActive);
    CHECK(core::KeySetFingerprint(VersionsOf(a)) != core::KeySetFingerprint(VersionsOf(b)));

    // `a` encrypts under the promoted version; `b`, which still sees it staged, decrypts it: no window.
    const std::string under_new = WrapOrDie(a, *promoted);
    CHECK(CurrentOf(b).key_id == v1.key_id);
    CHECK_THAT(Opens(b, *staged, under_new), IsOk());
    // And `a` decrypts what `b` still writes under the previous version.
    CHECK_THAT(Opens(a, v1, WrapOrDie(b, v1)), IsOk());

    // b's next refresh moves its current version forward (staged -> current passes CheckAdvance).
    REQUIRE_THAT(b->Refresh(Soon()), IsOk());
    CHECK(CurrentOf(b).key_id == staged->key_id);
    CHECK(core::KeySetFingerprint(VersionsOf(a)) == core::KeySetFingerprint(VersionsOf(b)));
  }
  seen.ExpectNoSecretsOf(backend);
}

CONTRACT_CASE("staging: rotate is refused while a version is staged, promote with nothing staged is refused") {
  TestType backend;
  if constexpr (TestType::kStages) {
    Messages seen;
    Instance a = backend.Open();
    const core::KeyVersion v1 = CurrentOf(a);
    CHECK_THAT(seen(a.admin->Promote(Soon())),
               StatusIs(Code::kFailedPrecondition, "no key version is staged"));
    backend.clock.Advance(absl::Seconds(1));
    auto s2 = a.admin->Stage(Soon());
    REQUIRE_THAT(s2, IsOk());
    backend.clock.Advance(absl::Seconds(1));
    CHECK_THAT(seen(a.admin->Rotate(Soon())), StatusIs(Code::kFailedPrecondition, "is staged"));
    CHECK(VersionsOf(a).size() == 2);
    // A second stage is allowed; promote picks the newest, the older staged one becomes active.
    auto s3 = a.admin->Stage(Soon());
    REQUIRE_THAT(s3, IsOk());
    CHECK(s3->version == s2->version + 1);
    auto promoted = a.admin->Promote(Soon());
    REQUIRE_THAT(promoted, IsOk());
    CHECK(promoted->version == s3->version);
    const auto versions = VersionsOf(a);
    CHECK(core::FindVersionNumber(versions, v1.version)->state == core::KeyState::kActive);
    CHECK(core::FindVersionNumber(versions, s2->version)->state == core::KeyState::kActive);
    CHECK(core::FindVersionNumber(versions, s3->version)->state == core::KeyState::kCurrent);
    // A reopened source (a fresh process) reads the same states back from the backend.
    Instance c = backend.Open();
    CHECK(core::KeySetFingerprint(VersionsOf(c)) == core::KeySetFingerprint(versions));
    // Retire rules are unaffected: the promoted version is current and cannot be retired.
    CHECK_THAT(a.admin->Retire(s3->version, Soon()), StatusIs(Code::kFailedPrecondition));
    seen.ExpectNoSecretsOf(backend);
  }
}

CONTRACT_CASE("heal: a ciphertext under a version newer than any known makes the source re-read once per second") {
  TestType backend;
  Instance b = backend.Open();  // the node that has not polled
  Instance a = backend.Open();  // the node that rotates
  const core::KeyVersion v2 = RotateOrDie(backend, a);
  const std::string w2 = WrapOrDie(a, v2);
  CHECK_THAT(b->Lookup(v2.key_ref), StatusIs(Code::kNotFound));
  // No Refresh on b. Local and PKCS#11: Unwrap itself re-reads the keyring or token. Vault: the shared key decrypts
  // it anyway, and HealUnknown (what the core calls on an unknown key_ref) reads the key metadata.
  CHECK_THAT(Opens(b, v2, w2), IsOk());
  CHECK(b->HealUnknown(v2.key_ref, Soon()) == !TestType::kStages);
  CHECK_THAT(b->Lookup(v2.key_ref), IsOk());

  // Within the same second, a second unknown newer version is not re-read for (rate limit)...
  backend.clock.Advance(absl::Milliseconds(500));
  auto rotated = a.admin->Rotate(Soon());
  REQUIRE_THAT(rotated, IsOk());
  const core::KeyVersion v3 = *rotated;
  const std::string w3 = WrapOrDie(a, v3);
  CHECK_THAT(b->Lookup(v3.key_ref), StatusIs(Code::kNotFound));
  CHECK_FALSE(b->HealUnknown(v3.key_ref, Soon()));
  if constexpr (TestType::kStages) {
    CHECK_THAT(b->Unwrap(v3.key_ref, w3, kAad, Soon()), StatusIs(Code::kFailedPrecondition));
  }
  CHECK_THAT(b->Lookup(v3.key_ref), StatusIs(Code::kNotFound));
  // ...and found once a second has passed.
  backend.clock.Advance(absl::Seconds(1));
  CHECK(b->HealUnknown(v3.key_ref, Soon()));
  CHECK_THAT(b->Lookup(v3.key_ref), IsOk());
  CHECK_THAT(Opens(b, v3, w3), IsOk());
  // A version b knows (not newer than every known one) never triggers a re-read.
  backend.clock.Advance(absl::Seconds(5));
  CHECK_FALSE(b->HealUnknown(v2.key_ref, Soon()));
  // A version far ahead that does not exist: one re-read (which finds nothing), then refused without another.
  CHECK(b->HealUnknown(backend.UnknownKeyRef(v3), Soon()));
  CHECK_THAT(b->Lookup(backend.UnknownKeyRef(v3)), StatusIs(Code::kNotFound));
  CHECK_FALSE(b->HealUnknown(backend.UnknownKeyRef(v3), Soon()));
}

CONTRACT_CASE("heal: the core's Decrypt finds a newer version through HealUnknown, without a Refresh") {
  TestType backend;
  Instance b = backend.Open();
  Instance a = backend.Open();
  RotateOrDie(backend, a);
  core::EnvelopeService on_a = ServiceFor(a, "contract");
  core::EnvelopeService on_b = ServiceFor(b, "contract");
  auto encrypted = on_a.Encrypt(kDek, Soon());
  REQUIRE_THAT(encrypted, IsOk());
  const core::DecryptMetadata metadata = MetadataOf(*encrypted);
  auto decrypted = on_b.Decrypt(encrypted->ciphertext, &metadata, Soon());
  REQUIRE_THAT(decrypted, IsOk());
  CHECK(decrypted->view() == kDek);
}

}  // namespace
}  // namespace kmsplugin::contract
