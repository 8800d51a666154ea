// StartingKeySource: an environment whose key source cannot start serves unhealthy, retries on its own thread,
// and a refused credential is retried only after one of the source's files changed.

#include "kmsplugin/daemon/starting_key_source.h"

#include <atomic>
#include <fstream>

#include <catch2/catch.hpp>

#include "absl/time/clock.h"
#include "tests/support/fake_key_source.h"
#include "tests/support/recording_event_sink.h"
#include "tests/support/status_matchers.h"
#include "tests/support/temp_dir.h"

namespace kmsplugin::daemon {
namespace {

using ::kmsplugin::testing::FakeKeySource;
using ::kmsplugin::testing::IsOk;
using ::kmsplugin::testing::RecordingEventSink;
using ::kmsplugin::testing::StatusIs;
using Code = absl::StatusCode;

// An opener that fails with `error` until `succeed` is set; counts its calls.
struct Opener {
  std::atomic<int> calls{0};
  std::atomic<bool> succeed{false};
  absl::Status error = absl::UnavailableError("Vault at https://v:8200 is not reachable");
  std::shared_ptr<FakeKeySource> inner = std::make_shared<FakeKeySource>("inner");

  StartingKeySource::Opener Fn() {
    return [this]() -> absl::StatusOr<std::shared_ptr<core::KeySource>> {
      ++calls;
      if (succeed.load()) {
        return std::shared_ptr<core::KeySource>(inner);
      }
      return error;
    };
  }
};

bool WaitFor(const std::function<bool()>& done, absl::Duration limit) {
  const absl::Time end = absl::Now() + limit;
  while (absl::Now() < end) {
    if (done()) {
      return true;
    }
    absl::SleepFor(absl::Milliseconds(20));
  }
  return done();
}

TEST_CASE("StartingKeySource: a source that opens at once is returned as it is", "[daemon][isolation]") {
  Opener opener;
  opener.succeed = true;
  opener.inner->AddVersion();
  RecordingEventSink events;
  auto source = StartingKeySource::OpenOrKeepTrying("prod", crypto::KeySourceKind::kVault, opener.Fn(),
                                                    absl::Seconds(1), {}, events);
  CHECK(source.get() == opener.inner.get());
  CHECK(opener.calls == 1);
  CHECK(events.Events().empty());
}

TEST_CASE("StartingKeySource: serves UNAVAILABLE naming the reason, then starts by itself", "[daemon][isolation]") {
  Opener opener;
  opener.inner->AddVersion();
  RecordingEventSink events;
  auto source = StartingKeySource::OpenOrKeepTrying("prod", crypto::KeySourceKind::kVault, opener.Fn(),
                                                    absl::Seconds(1), {}, events);
  REQUIRE(source.get() != opener.inner.get());
  CHECK(source->Kind() == crypto::KeySourceKind::kVault);
  CHECK_THAT(source->Current(), StatusIs(Code::kUnavailable, "environment \"prod\" has not started"));
  CHECK_THAT(source->Current(), StatusIs(Code::kUnavailable, "is not reachable"));
  CHECK_THAT(source->Versions(), StatusIs(Code::kUnavailable));
  CHECK_THAT(source->Lookup("x"), StatusIs(Code::kUnavailable));
  CHECK_THAT(source->Unwrap("r", "w", "aad", absl::InfiniteFuture()), StatusIs(Code::kUnavailable));
  CHECK_THAT(source->Wrap(core::KeyVersion{}, "p", "aad", absl::InfiniteFuture()), StatusIs(Code::kUnavailable));
  CHECK(source->BackendGauges().empty());
  CHECK(events.Count(core::event::kUnavailable) == 1);
  // Refresh never blocks on the open (the poll loop probes the other environments).
  const absl::Time before = absl::Now();
  CHECK_THAT(source->Refresh(absl::Now() + absl::Seconds(5)), StatusIs(Code::kUnavailable));
  CHECK(absl::Now() - before < absl::Milliseconds(200));
  // Retried on its own every retry interval.
  REQUIRE(WaitFor([&] { return opener.calls.load() >= 2; }, absl::Seconds(3)));
  opener.succeed = true;
  REQUIRE(WaitFor([&] { return source->Current().ok(); }, absl::Seconds(3)));
  auto* starting = dynamic_cast<StartingKeySource*>(source.get());
  REQUIRE(starting != nullptr);
  CHECK(starting->Started().get() == opener.inner.get());
  CHECK(events.Count(core::event::kStarted) == 1);
  // From now on every call reaches the real source.
  auto version = source->Current();
  REQUIRE_THAT(version, IsOk());
  auto wrapped = source->Wrap(*version, "seed", "aad", absl::InfiniteFuture());
  REQUIRE_THAT(wrapped, IsOk());
  auto plain = source->Unwrap(version->key_ref, *wrapped, "aad", absl::InfiniteFuture());
  REQUIRE_THAT(plain, IsOk());
  CHECK(plain->view() == "seed");
  REQUIRE_THAT(source->Refresh(absl::Now() + absl::Seconds(1)), IsOk());
  const int calls = opener.calls.load();
  absl::SleepFor(absl::Milliseconds(1500));
  CHECK(opener.calls.load() == calls);  // the retry thread has ended
}

TEST_CASE("StartingKeySource: Refresh (SIGHUP) retries at once, at most once a second", "[daemon][isolation]") {
  Opener opener;
  RecordingEventSink events;
  auto source = StartingKeySource::OpenOrKeepTrying("dev", crypto::KeySourceKind::kLocal, opener.Fn(),
                                                    absl::Hours(1), {}, events);
  REQUIRE(opener.calls == 1);
  for (int i = 0; i < 20; ++i) {  // a SIGHUP storm
    (void)source->Refresh(absl::Now());
    absl::SleepFor(absl::Milliseconds(25));
  }
  REQUIRE(WaitFor([&] { return opener.calls.load() >= 2; }, absl::Seconds(3)));
  CHECK(opener.calls.load() <= 3);
}

TEST_CASE("StartingKeySource: a refused credential is not retried until one of its files changes",
          "[daemon][isolation]") {
  testing::TempDir dir;
  const std::string pin = dir.Write("token.pin", "1111\n");
  Opener opener;
  opener.error = absl::PermissionDeniedError("PKCS#11 login failed: CKR_PIN_INCORRECT");
  RecordingEventSink events;
  auto source = StartingKeySource::OpenOrKeepTrying("hsm", crypto::KeySourceKind::kPkcs11, opener.Fn(),
                                                    absl::Seconds(1), {pin}, events);
  CHECK_THAT(source->Current(), StatusIs(Code::kPermissionDenied, "CKR_PIN_INCORRECT"));
  // Polls and SIGHUPs while the PIN file is unchanged: no second login attempt (it could lock the token).
  for (int i = 0; i < 5; ++i) {
    (void)source->Refresh(absl::Now());
    absl::SleepFor(absl::Milliseconds(500));
  }
  CHECK(opener.calls.load() == 1);
  // The operator writes the right PIN: one attempt, and it starts.
  opener.succeed = true;
  opener.inner->AddVersion();
  absl::SleepFor(absl::Milliseconds(20));  // a new mtime even on coarse clocks
  dir.Write("token.pin", "2222\n");
  (void)source->Refresh(absl::Now());
  REQUIRE(WaitFor([&] { return source->Current().ok(); }, absl::Seconds(4)));
  CHECK(opener.calls.load() == 2);
}

TEST_CASE("StartingKeySource: destroyed while still trying, it stops its thread", "[daemon][isolation]") {
  Opener opener;
  RecordingEventSink events;
  {
    auto source = StartingKeySource::OpenOrKeepTrying("dev", crypto::KeySourceKind::kLocal, opener.Fn(),
                                                      absl::Seconds(1), {}, events);
    absl::SleepFor(absl::Milliseconds(50));
  }
  const int calls = opener.calls.load();
  absl::SleepFor(absl::Milliseconds(1200));
  CHECK(opener.calls.load() == calls);
}

}  // namespace
}  // namespace kmsplugin::daemon
