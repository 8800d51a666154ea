// EnvelopeService against FakeKeySource: input validation, key_id pinning, the ciphertext's binding to the
// environment and key version, metadata checks, deadlines, and the Status/Probe health state.

#include "kmsplugin/core/envelope_service.h"

#include <memory>
#include <string>

#include <catch2/catch.hpp>

#include "absl/strings/match.h"
#include "crypto/envelope_format.h"
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

struct Fixture {
  explicit Fixture(std::string environment = "prod", std::shared_ptr<FakeKeySource> source = nullptr)
      : source(source ? std::move(source) : std::make_shared<FakeKeySource>()),
        service(Options(std::move(environment)), this->source, clock, random) {}
  static EnvelopeService::Options Options(std::string environment) {
    EnvelopeService::Options options;
    options.environment = std::move(environment);
    options.health_max_age = absl::Seconds(60);
    return options;
  }
  absl::Time Deadline() const { return clock.Now() + absl::Seconds(3); }

  FakeClock clock;
  FakeRandom random;
  std::shared_ptr<FakeKeySource> source;
  EnvelopeService service;
};

DecryptMetadata MetadataOf(const EncryptResult& result) { return DecryptMetadata{result.key_id, result.annotations}; }

EncryptResult MustEncrypt(Fixture& f, const std::string& plaintext = kSeed) {
  auto result = f.service.Encrypt(plaintext, f.Deadline());
  REQUIRE_THAT(result, IsOk());
  return *result;
}

// ---------------------------------------------------------------------------------------------- Encrypt

TEST_CASE("Encrypt: round trip returns the plaintext", "[core][envelope]") {
  Fixture f;
  f.source->AddVersion();
  const EncryptResult encrypted = MustEncrypt(f);
  const DecryptMetadata metadata = MetadataOf(encrypted);
  auto decrypted = f.service.Decrypt(encrypted.ciphertext, &metadata, f.Deadline());
  REQUIRE_THAT(decrypted, IsOk());
  CHECK(decrypted->view() == kSeed);
}

TEST_CASE("Encrypt: returns the current key_id and the format annotation", "[core][envelope]") {
  Fixture f;
  const KeyVersion v1 = f.source->AddVersion();
  const EncryptResult encrypted = MustEncrypt(f);
  CHECK(encrypted.key_id == v1.key_id);
  CHECK(encrypted.annotations == Annotations{{"format.kmsplugin.io", "1"}});
}

TEST_CASE("Encrypt: empty plaintext is INVALID_ARGUMENT and never reaches the key source", "[core][envelope]") {
  Fixture f;
  f.source->AddVersion();
  CHECK_THAT(f.service.Encrypt("", f.Deadline()), StatusIs(Code::kInvalidArgument, "empty"));
  CHECK(f.source->Calls(Call::kWrap) == 0);
}

TEST_CASE("Encrypt: plaintext over kMaxPlaintextSize is INVALID_ARGUMENT", "[core][envelope]") {
  Fixture f;
  f.source->AddVersion();
  CHECK_THAT(f.service.Encrypt(std::string(kMaxPlaintextSize + 1, 'x'), f.Deadline()),
             StatusIs(Code::kInvalidArgument, "129"));
  CHECK_THAT(f.service.Encrypt(std::string(100000, 'x'), f.Deadline()), StatusIs(Code::kInvalidArgument));
  CHECK(f.source->Calls(Call::kWrap) == 0);
}

TEST_CASE("Encrypt: plaintext of exactly kMaxPlaintextSize and of 1 byte are accepted", "[core][envelope]") {
  Fixture f;
  f.source->AddVersion();
  for (const std::string& plaintext : {std::string(kMaxPlaintextSize, 'x'), std::string("p")}) {
    const EncryptResult encrypted = MustEncrypt(f, plaintext);
    CHECK(encrypted.ciphertext.size() <= crypto::kMaxEnvelopeSize);
    const DecryptMetadata metadata = MetadataOf(encrypted);
    auto decrypted = f.service.Decrypt(encrypted.ciphertext, &metadata, f.Deadline());
    REQUIRE_THAT(decrypted, IsOk());
    CHECK(decrypted->view() == plaintext);
  }
}

TEST_CASE("Encrypt: ciphertext header names the environment and the pinned key_ref", "[core][envelope]") {
  Fixture f("staging");
  const KeyVersion v1 = f.source->AddVersion();
  const EncryptResult encrypted = MustEncrypt(f);
  auto envelope = crypto::ParseEnvelope(encrypted.ciphertext);
  REQUIRE_THAT(envelope, IsOk());
  CHECK(envelope->header.environment == "staging");
  CHECK(envelope->header.key_ref == v1.key_ref);
  CHECK(envelope->header.kind == crypto::KeySourceKind::kLocal);
  // The wrapped part authenticates only with the header's associated data.
  CHECK_THAT(f.source->Unwrap(v1.key_ref, envelope->wrapped, crypto::EnvelopeAssociatedData(envelope->header),
                              f.Deadline()),
             IsOk());
  CHECK_THAT(f.source->Unwrap(v1.key_ref, envelope->wrapped, "", f.Deadline()), StatusIs(Code::kInvalidArgument));
}

TEST_CASE("Encrypt: pins Current() once per call", "[core][envelope]") {
  Fixture f;
  f.source->AddVersion();
  MustEncrypt(f);
  CHECK(f.source->Calls(Call::kCurrent) == 1);
  CHECK(f.source->Calls(Call::kWrap) == 1);
}

TEST_CASE("Encrypt: after a rotation uses the new key_id, and Status agrees", "[core][envelope]") {
  Fixture f;
  const KeyVersion v1 = f.source->AddVersion();
  const EncryptResult before = MustEncrypt(f);
  CHECK(f.service.Status().key_id == v1.key_id);
  const KeyVersion v2 = f.source->AddVersion();
  const EncryptResult after = MustEncrypt(f);
  CHECK(before.key_id == v1.key_id);
  CHECK(after.key_id == v2.key_id);
  CHECK(after.key_id != before.key_id);
  CHECK(f.service.Status().key_id == v2.key_id);
  // The old ciphertext still decrypts with its own key_id.
  const DecryptMetadata metadata = MetadataOf(before);
  CHECK_THAT(f.service.Decrypt(before.ciphertext, &metadata, f.Deadline()), IsOk());
}

TEST_CASE("Encrypt: two encryptions of the same plaintext differ", "[core][envelope]") {
  Fixture f;
  f.source->AddVersion();
  CHECK(MustEncrypt(f).ciphertext != MustEncrypt(f).ciphertext);
}

TEST_CASE("Encrypt: no current version fails and does not wrap", "[core][envelope]") {
  Fixture f;
  CHECK_THAT(f.service.Encrypt(kSeed, f.Deadline()), StatusIs(Code::kFailedPrecondition));
  CHECK(f.source->Calls(Call::kWrap) == 0);
}

TEST_CASE("Encrypt: a Current() failure is passed through", "[core][envelope]") {
  Fixture f;
  f.source->AddVersion();
  f.source->FailNext(Call::kCurrent, absl::UnavailableError("backend down"));
  CHECK_THAT(f.service.Encrypt(kSeed, f.Deadline()), StatusIs(Code::kUnavailable, "backend down"));
}

TEST_CASE("Encrypt: a Wrap failure is passed through with its code", "[core][envelope]") {
  Fixture f;
  f.source->AddVersion();
  f.source->FailNext(Call::kWrap, absl::PermissionDeniedError("token refused"));
  CHECK_THAT(f.service.Encrypt(kSeed, f.Deadline()), StatusIs(Code::kPermissionDenied, "token refused"));
  f.source->FailNext(Call::kWrap, absl::UnavailableError("vault down"));
  CHECK_THAT(f.service.Encrypt(kSeed, f.Deadline()), StatusIs(Code::kUnavailable, "vault down"));
  CHECK_THAT(f.service.Encrypt(kSeed, f.Deadline()), IsOk());
}

TEST_CASE("Encrypt: past deadline is DEADLINE_EXCEEDED without calling Wrap", "[core][envelope]") {
  Fixture f;
  f.source->AddVersion();
  const absl::Time deadline = f.clock.Now() + absl::Seconds(1);
  f.clock.Advance(absl::Seconds(2));
  CHECK_THAT(f.service.Encrypt(kSeed, deadline), StatusIs(Code::kDeadlineExceeded));
  CHECK_THAT(f.service.Encrypt(kSeed, f.clock.Now()), StatusIs(Code::kDeadlineExceeded));
  CHECK(f.source->Calls(Call::kWrap) == 0);
}

TEST_CASE("Encrypt: passes the request deadline to the key source", "[core][envelope]") {
  Fixture f;
  f.source->AddVersion();
  const absl::Time deadline = f.clock.Now() + absl::Milliseconds(1234);
  REQUIRE_THAT(f.service.Encrypt(kSeed, deadline), IsOk());
  CHECK(f.source->LastDeadline() == deadline);
}

TEST_CASE("Encrypt: a key_ref too long for the envelope is INTERNAL, not a bad ciphertext", "[core][envelope]") {
  // A key source whose key_ref breaks the format is a bug in the key source.
  class LongRefSource : public FakeKeySource {
   public:
    absl::StatusOr<KeyVersion> Current() const override {
      auto v = FakeKeySource::Current();
      if (v.ok()) {
        v->key_ref = std::string(crypto::kMaxKeyRefSize + 1, 'r');
      }
      return v;
    }
  };
  auto source = std::make_shared<LongRefSource>();
  source->AddVersion();
  Fixture f("prod", source);
  CHECK_THAT(f.service.Encrypt(kSeed, f.Deadline()), StatusIs(Code::kInternal));
}

// ---------------------------------------------------------------------------------------------- Decrypt

TEST_CASE("Decrypt: empty ciphertext is INVALID_ARGUMENT", "[core][envelope]") {
  Fixture f;
  const KeyVersion v1 = f.source->AddVersion();
  const DecryptMetadata metadata{v1.key_id, {{"format.kmsplugin.io", "1"}}};
  CHECK_THAT(f.service.Decrypt("", &metadata, f.Deadline()), StatusIs(Code::kInvalidArgument, "empty"));
  CHECK_THAT(f.service.Decrypt("", nullptr, f.Deadline()), StatusIs(Code::kInvalidArgument));
}

TEST_CASE("Decrypt: garbage is INVALID_ARGUMENT", "[core][envelope]") {
  Fixture f;
  const KeyVersion v1 = f.source->AddVersion();
  const DecryptMetadata metadata{v1.key_id, {{"format.kmsplugin.io", "1"}}};
  for (const std::string& garbage :
       {std::string("x"), std::string("garbage ciphertext"), std::string(2000, '\x01'), std::string(1, '\0'),
        std::string("\x01\x01", 2), std::string("\x02\x01\x04prod", 7), std::string(512, '\xff')}) {
    CAPTURE(garbage.size());
    CHECK_THAT(f.service.Decrypt(garbage, &metadata, f.Deadline()), StatusIs(Code::kInvalidArgument));
  }
  CHECK(f.source->Calls(Call::kUnwrap) == 0);
}

TEST_CASE("Decrypt: every truncation of a ciphertext is INVALID_ARGUMENT", "[core][envelope]") {
  Fixture f;
  f.source->AddVersion();
  const EncryptResult encrypted = MustEncrypt(f);
  const DecryptMetadata metadata = MetadataOf(encrypted);
  for (size_t size = 1; size < encrypted.ciphertext.size(); ++size) {
    CAPTURE(size);
    CHECK_THAT(f.service.Decrypt(encrypted.ciphertext.substr(0, size), &metadata, f.Deadline()),
               StatusIs(Code::kInvalidArgument));
  }
}

TEST_CASE("Decrypt: trailing bytes are INVALID_ARGUMENT", "[core][envelope]") {
  Fixture f;
  f.source->AddVersion();
  const EncryptResult encrypted = MustEncrypt(f);
  const DecryptMetadata metadata = MetadataOf(encrypted);
  CHECK_THAT(f.service.Decrypt(encrypted.ciphertext + "x", &metadata, f.Deadline()),
             StatusIs(Code::kInvalidArgument));
}

TEST_CASE("Decrypt: a flipped bit anywhere is refused, in the wrapped part it is INVALID_ARGUMENT",
          "[core][envelope]") {
  Fixture f;
  f.source->AddVersion();
  const EncryptResult encrypted = MustEncrypt(f);
  const DecryptMetadata metadata = MetadataOf(encrypted);
  auto envelope = crypto::ParseEnvelope(encrypted.ciphertext);
  REQUIRE_THAT(envelope, IsOk());
  const size_t wrapped_start = encrypted.ciphertext.size() - envelope->wrapped.size();
  for (size_t i = 0; i < encrypted.ciphertext.size(); ++i) {
    for (int bit = 0; bit < 8; ++bit) {
      std::string flipped = encrypted.ciphertext;
      flipped[i] = static_cast<char>(flipped[i] ^ (1 << bit));
      auto result = f.service.Decrypt(flipped, &metadata, f.Deadline());
      CAPTURE(i, bit, result.status());
      REQUIRE_FALSE(result.ok());
      if (i >= wrapped_start) {
        CHECK_THAT(result, StatusIs(Code::kInvalidArgument));
      } else {
        // A header edit may name another environment or an unknown version.
        CHECK((result.status().code() == Code::kInvalidArgument ||
               result.status().code() == Code::kFailedPrecondition));
      }
    }
  }
}

TEST_CASE("Decrypt: ciphertext of another environment is FAILED_PRECONDITION naming both", "[core][envelope]") {
  auto source = std::make_shared<FakeKeySource>();
  source->AddVersion();
  Fixture prod("prod", source);
  Fixture staging("staging", source);  // the same backend key, by mistake
  const EncryptResult encrypted = MustEncrypt(prod);
  const DecryptMetadata metadata = MetadataOf(encrypted);
  auto result = staging.service.Decrypt(encrypted.ciphertext, &metadata, staging.Deadline());
  CHECK_THAT(result, StatusIs(Code::kFailedPrecondition, "\"prod\""));
  CHECK_THAT(result, StatusIs(Code::kFailedPrecondition, "\"staging\""));
  CHECK(source->Calls(Call::kUnwrap) == 0);
}

TEST_CASE("Decrypt: a header rewritten to another environment does not authenticate", "[core][envelope]") {
  auto source = std::make_shared<FakeKeySource>();
  source->AddVersion();
  Fixture prod("prod", source);
  Fixture staging("staging", source);
  const EncryptResult encrypted = MustEncrypt(prod);
  auto envelope = crypto::ParseEnvelope(encrypted.ciphertext);
  REQUIRE_THAT(envelope, IsOk());
  envelope->header.environment = "staging";
  auto forged = crypto::EncodeEnvelope(*envelope);
  REQUIRE_THAT(forged, IsOk());
  const DecryptMetadata metadata = MetadataOf(encrypted);
  CHECK_THAT(staging.service.Decrypt(*forged, &metadata, staging.Deadline()), StatusIs(Code::kInvalidArgument));
}

TEST_CASE("Decrypt: a header rewritten to another key version does not authenticate", "[core][envelope]") {
  Fixture f;
  f.source->AddVersion();
  const KeyVersion v2 = f.source->AddVersion();
  f.source->SetState(1, KeyState::kCurrent);
  const EncryptResult encrypted = MustEncrypt(f);  // under v1
  auto envelope = crypto::ParseEnvelope(encrypted.ciphertext);
  REQUIRE_THAT(envelope, IsOk());
  envelope->header.key_ref = v2.key_ref;
  auto forged = crypto::EncodeEnvelope(*envelope);
  REQUIRE_THAT(forged, IsOk());
  const DecryptMetadata metadata{v2.key_id, encrypted.annotations};
  CHECK_THAT(f.service.Decrypt(*forged, &metadata, f.Deadline()), StatusIs(Code::kInvalidArgument));
}

TEST_CASE("Decrypt: ciphertext of another key source kind is FAILED_PRECONDITION", "[core][envelope]") {
  auto vault = std::make_shared<FakeKeySource>("fake", crypto::KeySourceKind::kVault);
  vault->AddVersion();
  Fixture made_by_vault("prod", vault);
  const EncryptResult encrypted = MustEncrypt(made_by_vault);
  Fixture local("prod");
  local.source->AddVersion();
  const DecryptMetadata metadata = MetadataOf(encrypted);
  CHECK_THAT(local.service.Decrypt(encrypted.ciphertext, &metadata, local.Deadline()),
             StatusIs(Code::kFailedPrecondition, "vault"));
  CHECK_THAT(local.service.Decrypt(encrypted.ciphertext, nullptr, local.Deadline()),
             StatusIs(Code::kFailedPrecondition, "local"));
}

TEST_CASE("Decrypt: missing format annotation is INVALID_ARGUMENT naming it", "[core][envelope]") {
  Fixture f;
  f.source->AddVersion();
  const EncryptResult encrypted = MustEncrypt(f);
  const DecryptMetadata metadata{encrypted.key_id, {}};
  CHECK_THAT(f.service.Decrypt(encrypted.ciphertext, &metadata, f.Deadline()),
             StatusIs(Code::kInvalidArgument, "format.kmsplugin.io"));
  CHECK(f.source->Calls(Call::kUnwrap) == 0);
}

TEST_CASE("Decrypt: wrong format annotation value is INVALID_ARGUMENT naming it", "[core][envelope]") {
  Fixture f;
  f.source->AddVersion();
  const EncryptResult encrypted = MustEncrypt(f);
  for (const std::string& value : {std::string("2"), std::string(), std::string("1 "), std::string("1\0", 2)}) {
    const DecryptMetadata metadata{encrypted.key_id, {{"format.kmsplugin.io", value}}};
    CHECK_THAT(f.service.Decrypt(encrypted.ciphertext, &metadata, f.Deadline()),
               StatusIs(Code::kInvalidArgument, "format.kmsplugin.io"));
  }
}

TEST_CASE("Decrypt: an extra annotation is INVALID_ARGUMENT naming it", "[core][envelope]") {
  Fixture f;
  f.source->AddVersion();
  const EncryptResult encrypted = MustEncrypt(f);
  DecryptMetadata metadata = MetadataOf(encrypted);
  metadata.annotations.emplace("extra.example.com", "x");
  CHECK_THAT(f.service.Decrypt(encrypted.ciphertext, &metadata, f.Deadline()),
             StatusIs(Code::kInvalidArgument, "extra.example.com"));
  DecryptMetadata first = MetadataOf(encrypted);
  first.annotations.emplace("a.example.com", "x");  // sorts before format.kmsplugin.io
  CHECK_THAT(f.service.Decrypt(encrypted.ciphertext, &first, f.Deadline()),
             StatusIs(Code::kInvalidArgument, "a.example.com"));
}

TEST_CASE("Decrypt: empty key_id is INVALID_ARGUMENT", "[core][envelope]") {
  Fixture f;
  f.source->AddVersion();
  const EncryptResult encrypted = MustEncrypt(f);
  const DecryptMetadata metadata{"", encrypted.annotations};
  CHECK_THAT(f.service.Decrypt(encrypted.ciphertext, &metadata, f.Deadline()),
             StatusIs(Code::kInvalidArgument, "key_id"));
}

TEST_CASE("Decrypt: key_id of another version is INVALID_ARGUMENT", "[core][envelope]") {
  Fixture f;
  f.source->AddVersion();
  const EncryptResult encrypted = MustEncrypt(f);
  const KeyVersion v2 = f.source->AddVersion();
  const DecryptMetadata other{v2.key_id, encrypted.annotations};
  CHECK_THAT(f.service.Decrypt(encrypted.ciphertext, &other, f.Deadline()),
             StatusIs(Code::kInvalidArgument, "key_id"));
  const DecryptMetadata made_up{"not-a-key-id", encrypted.annotations};
  CHECK_THAT(f.service.Decrypt(encrypted.ciphertext, &made_up, f.Deadline()),
             StatusIs(Code::kInvalidArgument, "not-a-key-id"));
  CHECK(f.source->Calls(Call::kUnwrap) == 0);
}

TEST_CASE("Decrypt: unknown key version is FAILED_PRECONDITION", "[core][envelope]") {
  Fixture f;
  f.source->AddVersion();
  const EncryptResult encrypted = MustEncrypt(f);
  Fixture other("prod", std::make_shared<FakeKeySource>("other"));
  other.source->AddVersion();
  const DecryptMetadata metadata = MetadataOf(encrypted);
  CHECK_THAT(other.service.Decrypt(encrypted.ciphertext, &metadata, other.Deadline()),
             StatusIs(Code::kFailedPrecondition, "does not have"));
  CHECK_THAT(other.service.Decrypt(encrypted.ciphertext, nullptr, other.Deadline()),
             StatusIs(Code::kFailedPrecondition));
}

TEST_CASE("Decrypt: a Lookup failure is FAILED_PRECONDITION, not OK", "[core][envelope]") {
  Fixture f;
  f.source->AddVersion();
  const EncryptResult encrypted = MustEncrypt(f);
  f.source->FailNext(Call::kLookup, absl::NotFoundError("gone"));
  const DecryptMetadata metadata = MetadataOf(encrypted);
  CHECK_THAT(f.service.Decrypt(encrypted.ciphertext, &metadata, f.Deadline()),
             StatusIs(Code::kFailedPrecondition, "gone"));
}

TEST_CASE("Decrypt: retired version is FAILED_PRECONDITION, also for v1beta1", "[core][envelope]") {
  Fixture f;
  f.source->AddVersion();
  const EncryptResult encrypted = MustEncrypt(f);
  f.source->AddVersion();
  f.source->SetState(1, KeyState::kRetired);
  const DecryptMetadata metadata = MetadataOf(encrypted);
  CHECK_THAT(f.service.Decrypt(encrypted.ciphertext, &metadata, f.Deadline()),
             StatusIs(Code::kFailedPrecondition, "retired"));
  CHECK_THAT(f.service.Decrypt(encrypted.ciphertext, nullptr, f.Deadline()),
             StatusIs(Code::kFailedPrecondition, "retired"));
  CHECK(f.source->Calls(Call::kUnwrap) == 0);
}

TEST_CASE("Decrypt: an active (older) version still decrypts", "[core][envelope]") {
  Fixture f;
  f.source->AddVersion();
  const EncryptResult encrypted = MustEncrypt(f);
  f.source->AddVersion();
  f.source->AddVersion();
  const DecryptMetadata metadata = MetadataOf(encrypted);
  auto decrypted = f.service.Decrypt(encrypted.ciphertext, &metadata, f.Deadline());
  REQUIRE_THAT(decrypted, IsOk());
  CHECK(decrypted->view() == kSeed);
}

TEST_CASE("Decrypt: v1beta1 (no metadata) skips key_id and annotation checks", "[core][envelope]") {
  Fixture f;
  f.source->AddVersion();
  const EncryptResult encrypted = MustEncrypt(f, "ping");
  auto decrypted = f.service.Decrypt(encrypted.ciphertext, nullptr, f.Deadline());
  REQUIRE_THAT(decrypted, IsOk());
  CHECK(decrypted->view() == "ping");
}

TEST_CASE("Decrypt: v1beta1 still refuses tampered bytes", "[core][envelope]") {
  Fixture f;
  f.source->AddVersion();
  std::string ciphertext = MustEncrypt(f).ciphertext;
  ciphertext.back() = static_cast<char>(ciphertext.back() ^ 0x01);
  CHECK_THAT(f.service.Decrypt(ciphertext, nullptr, f.Deadline()), StatusIs(Code::kInvalidArgument));
}

TEST_CASE("Decrypt: past deadline is DEADLINE_EXCEEDED without calling Unwrap", "[core][envelope]") {
  Fixture f;
  f.source->AddVersion();
  const EncryptResult encrypted = MustEncrypt(f);
  const DecryptMetadata metadata = MetadataOf(encrypted);
  const absl::Time deadline = f.clock.Now() + absl::Seconds(1);
  f.clock.Advance(absl::Seconds(5));
  CHECK_THAT(f.service.Decrypt(encrypted.ciphertext, &metadata, deadline), StatusIs(Code::kDeadlineExceeded));
  CHECK(f.source->Calls(Call::kUnwrap) == 0);
}

TEST_CASE("Decrypt: an Unwrap failure is passed through with its code", "[core][envelope]") {
  Fixture f;
  f.source->AddVersion();
  const EncryptResult encrypted = MustEncrypt(f);
  const DecryptMetadata metadata = MetadataOf(encrypted);
  f.source->FailNext(Call::kUnwrap, absl::UnavailableError("hsm unplugged"));
  CHECK_THAT(f.service.Decrypt(encrypted.ciphertext, &metadata, f.Deadline()),
             StatusIs(Code::kUnavailable, "hsm unplugged"));
  CHECK_THAT(f.service.Decrypt(encrypted.ciphertext, &metadata, f.Deadline()), IsOk());
}

// ---------------------------------------------------------------------------------------------- Status

TEST_CASE("Status: key_id is a non-empty placeholder naming the environment when there is no version",
          "[core][status]") {
  Fixture f("edge-1");
  const StatusResult status = f.service.Status();
  CHECK_FALSE(status.key_id.empty());
  CHECK(absl::StrContains(status.key_id, "edge-1"));
  CHECK(status.healthz != "ok");
}

TEST_CASE("Status: key_id placeholder also when Current() fails", "[core][status]") {
  Fixture f;
  f.source->AddVersion();
  f.source->FailAlways(Call::kCurrent, absl::UnavailableError("backend down"));
  const StatusResult status = f.service.Status();
  CHECK_FALSE(status.key_id.empty());
  CHECK(absl::StrContains(status.healthz, "backend down"));
}

TEST_CASE("Status: not ok before the first probe", "[core][status]") {
  Fixture f;
  const KeyVersion v1 = f.source->AddVersion();
  const StatusResult status = f.service.Status();
  CHECK(status.key_id == v1.key_id);
  CHECK(status.healthz != "ok");
  CHECK_FALSE(status.healthz.empty());
}

TEST_CASE("Status: ok after a successful probe, until health_max_age passes", "[core][status]") {
  Fixture f;
  f.source->AddVersion();
  REQUIRE(f.service.Probe(f.Deadline()).ok);
  CHECK(f.service.Status().healthz == "ok");
  f.clock.Advance(absl::Seconds(60));
  CHECK(f.service.Status().healthz == "ok");
  f.clock.Advance(absl::Seconds(1));
  CHECK(f.service.Status().healthz != "ok");
  CHECK(absl::StrContains(f.service.Status().healthz, "older"));
  REQUIRE(f.service.Probe(f.Deadline()).ok);
  CHECK(f.service.Status().healthz == "ok");
}

TEST_CASE("Status: never calls the backend beyond Current()", "[core][status]") {
  Fixture f;
  f.source->AddVersion();
  f.service.Status();
  CHECK(f.source->Calls(Call::kWrap) == 0);
  CHECK(f.source->Calls(Call::kUnwrap) == 0);
  CHECK(f.source->Calls(Call::kRefresh) == 0);
}

TEST_CASE("Status: reports the configured status version", "[core][status]") {
  FakeClock clock;
  FakeRandom random;
  auto source = std::make_shared<FakeKeySource>();
  source->AddVersion();
  EnvelopeService::Options options;
  options.environment = "prod";
  CHECK(EnvelopeService(options, source, clock, random).Status().version == "v2");
  options.status_version = "v2beta1";
  CHECK(EnvelopeService(options, source, clock, random).Status().version == "v2beta1");
}

TEST_CASE("Status: key_id equals the key_id Encrypt returns at the same instant", "[core][status]") {
  Fixture f;
  for (int i = 0; i < 5; ++i) {
    f.source->AddVersion();
    CHECK(f.service.Status().key_id == MustEncrypt(f).key_id);
  }
}

// ---------------------------------------------------------------------------------------------- Probe

TEST_CASE("Probe: does a real wrap and unwrap round trip", "[core][probe]") {
  Fixture f;
  f.source->AddVersion();
  const Health health = f.service.Probe(f.Deadline());
  CHECK(health.ok);
  CHECK(health.message == "ok");
  CHECK(health.checked == f.clock.Now());
  CHECK(f.source->Calls(Call::kWrap) == 1);
  CHECK(f.source->Calls(Call::kUnwrap) == 1);
}

TEST_CASE("Status: health age counts on the monotonic clock, not the wall clock", "[core][status]") {
  Fixture f;
  f.source->AddVersion();
  REQUIRE(f.service.Probe(f.Deadline()).ok);
  // The wall clock steps a day ahead, then a day back: a fresh probe stays fresh.
  f.clock.StepWall(absl::Hours(24));
  CHECK(f.service.Status().healthz == "ok");
  f.clock.StepWall(-absl::Hours(48));
  CHECK(f.service.Status().healthz == "ok");
  // Real time passing past the limit ages it, whatever the wall clock says.
  f.clock.Advance(absl::Seconds(61));
  CHECK(f.service.Status().healthz == "last successful health probe is older than 1m");
}

TEST_CASE("Probe: a wrap failure is recorded and reported by Status", "[core][probe]") {
  Fixture f;
  f.source->AddVersion();
  REQUIRE(f.service.Probe(f.Deadline()).ok);
  f.source->FailNext(Call::kWrap, absl::UnavailableError("vault sealed"));
  const Health health = f.service.Probe(f.Deadline());
  CHECK_FALSE(health.ok);
  CHECK(absl::StrContains(health.message, "vault sealed"));
  CHECK_FALSE(f.service.CurrentHealth().ok);
  CHECK(absl::StrContains(f.service.Status().healthz, "vault sealed"));
}

TEST_CASE("Probe: an unwrap failure is recorded", "[core][probe]") {
  Fixture f;
  f.source->AddVersion();
  f.source->FailNext(Call::kUnwrap, absl::PermissionDeniedError("pin locked"));
  const Health health = f.service.Probe(f.Deadline());
  CHECK_FALSE(health.ok);
  CHECK(absl::StrContains(health.message, "pin locked"));
  CHECK(f.service.Status().healthz != "ok");
}

TEST_CASE("Probe: unwrap returning other bytes is unhealthy", "[core][probe]") {
  Fixture f;
  f.source->AddVersion();
  f.source->SetUnwrapOverride(std::string(32, 'z'));
  const Health health = f.service.Probe(f.Deadline());
  CHECK_FALSE(health.ok);
  CHECK(f.service.Status().healthz != "ok");
}

TEST_CASE("Probe: no current version is unhealthy", "[core][probe]") {
  Fixture f;
  const Health health = f.service.Probe(f.Deadline());
  CHECK_FALSE(health.ok);
  CHECK(absl::StrContains(health.message, "no current key version"));
}

TEST_CASE("Probe: past deadline is unhealthy", "[core][probe]") {
  Fixture f;
  f.source->AddVersion();
  const Health health = f.service.Probe(f.clock.Now() - absl::Seconds(1));
  CHECK_FALSE(health.ok);
  CHECK(f.service.Status().healthz != "ok");
}

TEST_CASE("Probe: recovers after the failure clears", "[core][probe]") {
  Fixture f;
  f.source->AddVersion();
  f.source->FailAlways(Call::kWrap, absl::UnavailableError("down"));
  CHECK_FALSE(f.service.Probe(f.Deadline()).ok);
  CHECK_FALSE(f.service.Probe(f.Deadline()).ok);
  f.source->ClearFailures();
  CHECK(f.service.Probe(f.Deadline()).ok);
  CHECK(f.service.Status().healthz == "ok");
}

TEST_CASE("Probe: a failure after a success is not hidden by the earlier success", "[core][probe]") {
  Fixture f;
  f.source->AddVersion();
  REQUIRE(f.service.Probe(f.Deadline()).ok);
  f.clock.Advance(absl::Seconds(1));
  f.source->FailNext(Call::kUnwrap, absl::UnavailableError("flaky"));
  CHECK_FALSE(f.service.Probe(f.Deadline()).ok);
  CHECK(f.service.Status().healthz != "ok");
}

}  // namespace
}  // namespace kmsplugin::core
