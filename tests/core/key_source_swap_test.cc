// EnvelopeService::CheckReplacement and ReplaceKeySource: what a config reload that changes an environment's
// keySource relies on. A candidate must prove it loses nothing; the swap must never split one call across two
// key sources.

#include <atomic>
#include <memory>
#include <string>
#include <thread>

#include <catch2/catch.hpp>

#include "absl/strings/match.h"
#include "absl/synchronization/notification.h"
#include "kmsplugin/core/envelope_service.h"
#include "tests/support/fake_clock.h"
#include "tests/support/fake_key_source.h"
#include "tests/support/fake_random.h"
#include "tests/support/status_matchers.h"

namespace kmsplugin::core {
namespace {

using ::kmsplugin::testing::FakeClock;
using ::kmsplugin::testing::FakeKeySource;
using ::kmsplugin::testing::FakeRandom;
using ::kmsplugin::testing::IsOk;
using ::kmsplugin::testing::StatusIs;
using Call = FakeKeySource::Call;
using Code = absl::StatusCode;

const std::string kSeed(32, 's');
const absl::Time kFirst = absl::FromUnixSeconds(1'800'000'000);
const absl::Time kSecond = absl::FromUnixSeconds(1'800'000'100);

// A FakeKeySource that, once armed, waits inside Current() or Wrap() until released: a call in flight during a
// swap. Blocking in Current() catches a call that would pin a version on one source and wrap on another.
class BlockingKeySource : public FakeKeySource {
 public:
  enum class Where { kNowhere, kCurrent, kWrap };
  using FakeKeySource::FakeKeySource;
  absl::StatusOr<KeyVersion> Current() const override {
    Block(Where::kCurrent);
    return FakeKeySource::Current();
  }
  absl::StatusOr<std::string> Wrap(const KeyVersion& version, std::string_view plaintext,
                                   std::string_view associated_data, absl::Time deadline) override {
    Block(Where::kWrap);
    return FakeKeySource::Wrap(version, plaintext, associated_data, deadline);
  }
  mutable std::atomic<Where> armed{Where::kNowhere};
  mutable absl::Notification inside;
  mutable absl::Notification release;

 private:
  void Block(Where where) const {
    Where expected = where;
    if (armed.compare_exchange_strong(expected, Where::kNowhere)) {
      inside.Notify();
      release.WaitForNotification();
    }
  }
};

// Two versions, created at kFirst and kSecond; v2 current. Same name → same key_refs, key_ids and wrap keys.
template <typename T = FakeKeySource>
std::shared_ptr<T> TwoVersions(const std::string& name = "k", absl::Time first = kFirst) {
  auto source = std::make_shared<T>(name);
  source->AddVersion(first);
  source->AddVersion(kSecond);
  return source;
}

struct Fixture {
  explicit Fixture(std::shared_ptr<KeySource> source) : service(Options(), std::move(source), clock, random) {}
  static EnvelopeService::Options Options() {
    EnvelopeService::Options options;
    options.environment = "prod";
    return options;
  }
  absl::Time Deadline() const { return clock.Now() + absl::Seconds(3); }
  FakeClock clock;
  FakeRandom random;
  EnvelopeService service;
};

TEST_CASE("CheckReplacement: an equivalent source passes, and after the swap old ciphertexts decrypt and new "
          "calls use it", "[core][reload]") {
  auto old_source = TwoVersions();
  auto new_source = TwoVersions();
  Fixture f(old_source);
  auto before = f.service.Encrypt(kSeed, f.Deadline());
  REQUIRE_THAT(before, IsOk());
  auto health = f.service.CheckReplacement(*new_source, f.Deadline());
  REQUIRE_THAT(health, IsOk());
  CHECK(health->ok);
  CHECK(f.service.key_source() == old_source);  // checking changes nothing
  const int old_wraps = old_source->Calls(Call::kWrap);
  f.service.ReplaceKeySource(new_source, *health);
  CHECK(f.service.key_source() == new_source);
  const DecryptMetadata metadata{before->key_id, before->annotations};
  auto decrypted = f.service.Decrypt(before->ciphertext, &metadata, f.Deadline());
  REQUIRE_THAT(decrypted, IsOk());
  CHECK(decrypted->view() == kSeed);
  REQUIRE_THAT(f.service.Encrypt(kSeed, f.Deadline()), IsOk());
  CHECK(old_source->Calls(Call::kWrap) == old_wraps);
  CHECK(old_source->Calls(Call::kUnwrap) == 0);
  CHECK(f.service.Status().healthz == "ok");
  CHECK(f.service.Status().key_id == new_source->Current()->key_id);
}

TEST_CASE("CheckReplacement: a source that lacks a version the running one serves is refused, naming it",
          "[core][reload][bad-input]") {
  auto old_source = TwoVersions();
  auto new_source = std::make_shared<FakeKeySource>("k");
  new_source->AddVersion(kFirst);  // an older copy: version 2 is missing
  Fixture f(old_source);
  auto checked = f.service.CheckReplacement(*new_source, f.Deadline());
  REQUIRE_THAT(checked, StatusIs(Code::kFailedPrecondition));
  const std::string message(checked.status().message());
  CHECK(absl::StrContains(message, "does not know key version 2"));
  CHECK(absl::StrContains(message, old_source->Current()->key_id));
  CHECK(absl::StrContains(message, "would stop decrypting"));
  CHECK(f.service.key_source() == old_source);
}

TEST_CASE("CheckReplacement: another backend key (other key_refs) is refused", "[core][reload][bad-input]") {
  Fixture f(TwoVersions("k"));
  auto checked = f.service.CheckReplacement(*TwoVersions("other"), f.Deadline());
  CHECK_THAT(checked, StatusIs(Code::kFailedPrecondition, "does not know key version 1"));
}

TEST_CASE("CheckReplacement: the same key_ref with another key_id is refused", "[core][reload][bad-input]") {
  Fixture f(TwoVersions("k", kFirst));
  auto checked = f.service.CheckReplacement(*TwoVersions("k", kFirst + absl::Seconds(1)), f.Deadline());
  REQUIRE_THAT(checked, StatusIs(Code::kFailedPrecondition, "does not know key version 1"));
  CHECK(absl::StrContains(checked.status().message(), "under that key reference it has key_id"));
}

TEST_CASE("CheckReplacement: a retired version need not be known", "[core][reload]") {
  auto old_source = TwoVersions("k", kFirst);
  old_source->SetState(1, KeyState::kRetired);
  Fixture f(old_source);
  // Version 1 differs (another key_id), but nothing decrypts under it any more.
  CHECK_THAT(f.service.CheckReplacement(*TwoVersions("k", kFirst + absl::Seconds(1)), f.Deadline()), IsOk());
}

TEST_CASE("CheckReplacement: a source whose current version is older is refused (key_ids never move back)",
          "[core][reload][bad-input]") {
  Fixture f(TwoVersions());
  auto behind = TwoVersions();
  behind->SetState(1, KeyState::kCurrent);
  auto checked = f.service.CheckReplacement(*behind, f.Deadline());
  REQUIRE_THAT(checked, StatusIs(Code::kFailedPrecondition, "would move the current key version back from 2"));
}

TEST_CASE("CheckReplacement: a newer current version is accepted (a rotation seen through the new source)",
          "[core][reload]") {
  auto ahead = TwoVersions();
  ahead->AddVersion(kSecond + absl::Seconds(1));
  Fixture f(TwoVersions());
  CHECK_THAT(f.service.CheckReplacement(*ahead, f.Deadline()), IsOk());
}

TEST_CASE("CheckReplacement: a failing probe of the candidate is refused with the reason", "[core][reload][bad-input]") {
  Fixture f(TwoVersions());
  auto broken = TwoVersions();
  broken->FailAlways(Call::kWrap, absl::UnavailableError("backend down"));
  auto checked = f.service.CheckReplacement(*broken, f.Deadline());
  REQUIRE_THAT(checked, StatusIs(Code::kUnavailable, "probe"));
  CHECK(absl::StrContains(checked.status().message(), "backend down"));
  auto wrong_bytes = TwoVersions();
  wrong_bytes->SetUnwrapOverride(std::string(32, 'x'));
  CHECK_THAT(f.service.CheckReplacement(*wrong_bytes, f.Deadline()), StatusIs(Code::kUnavailable, "different bytes"));
  // The health the running service reports is not touched by a candidate's failure.
  CHECK(f.service.CurrentHealth().message == "not probed yet");
}

TEST_CASE("CheckReplacement: another key source kind is refused", "[core][reload][bad-input]") {
  Fixture f(TwoVersions());
  auto vault = std::make_shared<FakeKeySource>("k", crypto::KeySourceKind::kVault);
  vault->AddVersion(kFirst);
  vault->AddVersion(kSecond);
  CHECK_THAT(f.service.CheckReplacement(*vault, f.Deadline()), StatusIs(Code::kFailedPrecondition, "new environment"));
}

TEST_CASE("ReplaceKeySource: a call in flight finishes on the source it started with", "[core][reload]") {
  auto old_source = TwoVersions<BlockingKeySource>();
  auto new_source = TwoVersions();
  Fixture f(old_source);
  old_source->armed = BlockingKeySource::Where::kCurrent;
  absl::StatusOr<EncryptResult> in_flight;
  std::thread caller([&] { in_flight = f.service.Encrypt(kSeed, f.Deadline()); });
  old_source->inside.WaitForNotification();
  f.service.ReplaceKeySource(new_source, Health{true, "ok", f.clock.Now()});
  old_source->release.Notify();
  caller.join();
  REQUIRE_THAT(in_flight, IsOk());
  CHECK(old_source->Calls(Call::kWrap) == 1);
  CHECK(new_source->Calls(Call::kWrap) == 0);
  // The ciphertext made on the old source decrypts on the new one, and the next call uses the new one.
  const DecryptMetadata metadata{in_flight->key_id, in_flight->annotations};
  REQUIRE_THAT(f.service.Decrypt(in_flight->ciphertext, &metadata, f.Deadline()), IsOk());
  CHECK(new_source->Calls(Call::kUnwrap) == 1);
  REQUIRE_THAT(f.service.Encrypt(kSeed, f.Deadline()), IsOk());
  CHECK(new_source->Calls(Call::kWrap) == 1);
}

TEST_CASE("ReplaceKeySource: a probe of the old source that ends after the swap does not overwrite the new health",
          "[core][reload]") {
  auto old_source = TwoVersions<BlockingKeySource>();
  Fixture f(old_source);
  old_source->FailAlways(Call::kUnwrap, absl::UnavailableError("old backend gone"));
  old_source->armed = BlockingKeySource::Where::kWrap;
  std::thread prober([&] { f.service.Probe(f.Deadline()); });
  old_source->inside.WaitForNotification();
  f.service.ReplaceKeySource(TwoVersions(), Health{true, "ok", f.clock.Now()});
  old_source->release.Notify();
  prober.join();
  CHECK(f.service.CurrentHealth().ok);
  CHECK(f.service.Status().healthz == "ok");
}

}  // namespace
}  // namespace kmsplugin::core
