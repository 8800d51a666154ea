#include "kmsplugin/keysource/pkcs11/pkcs11_spec.h"

#include <sys/stat.h>
#include <yaml-cpp/yaml.h>

#include "absl/strings/match.h"
#include "tests/keysource/pkcs11/pkcs11_test_util.h"

namespace kmsplugin::keysource::pkcs11 {
namespace {

using ::kmsplugin::testing::IsOk;
using ::kmsplugin::testing::StatusIs;
using ::kmsplugin::testing::TokenFixture;

const config::FieldContext kContext("/etc/kmsplugin/config.yaml", "environments[0].keySource.pkcs11");

absl::StatusOr<std::unique_ptr<config::KeySourceSpec>> Parse(const std::string& yaml) {
  return ParseSpec(YAML::Load(yaml), kContext);
}

constexpr char kValid[] = "{module: /usr/lib/softhsm/libsofthsm2.so, tokenLabel: kms, pinFile: /etc/kmsplugin/kms.pin}";

TEST_CASE("Pkcs11 spec: a minimal section parses", "[pkcs11]") {
  auto spec = Parse(kValid);
  REQUIRE_THAT(spec, IsOk());
  CHECK((*spec)->Kind() == "pkcs11");
  CHECK(absl::StartsWith((*spec)->BackendKeyIdentity(), "pkcs11:label=kms/"));
}

TEST_CASE("Pkcs11 spec: identity names the token and the key label", "[pkcs11]") {
  auto spec = Parse("{module: /m.so, tokenSerial: 1a2b, pinFile: /p, keyLabel: kek-prod, sessionPoolSize: 4}");
  REQUIRE_THAT(spec, IsOk());
  CHECK((*spec)->BackendKeyIdentity() == "pkcs11:serial=1a2b/kek-prod");
}

TEST_CASE("Pkcs11 spec: default key labels of two environments on one token are different identities", "[pkcs11]") {
  auto first = ParseSpec(YAML::Load(kValid), kContext);
  auto second = ParseSpec(YAML::Load(kValid),
                          config::FieldContext("/etc/kmsplugin/config.yaml", "environments[1].keySource.pkcs11"));
  REQUIRE_THAT(first, IsOk());
  REQUIRE_THAT(second, IsOk());
  CHECK((*first)->BackendKeyIdentity() != (*second)->BackendKeyIdentity());
  // The same explicit keyLabel on the same token is the same backend key.
  const std::string explicit_label = "{module: /m.so, tokenLabel: kms, pinFile: /p, keyLabel: shared}";
  auto a = ParseSpec(YAML::Load(explicit_label), kContext);
  auto b = ParseSpec(YAML::Load(explicit_label),
                     config::FieldContext("/etc/kmsplugin/config.yaml", "environments[1].keySource.pkcs11"));
  REQUIRE_THAT(a, IsOk());
  REQUIRE_THAT(b, IsOk());
  CHECK((*a)->BackendKeyIdentity() == (*b)->BackendKeyIdentity());
}

TEST_CASE("Pkcs11 spec: a missing module names the field", "[pkcs11]") {
  CHECK_THAT(Parse("{tokenLabel: kms, pinFile: /p}"),
             StatusIs(absl::StatusCode::kInvalidArgument, "environments[0].keySource.pkcs11.module: is missing"));
}

TEST_CASE("Pkcs11 spec: a relative module path is refused", "[pkcs11]") {
  CHECK_THAT(Parse("{module: libsofthsm2.so, tokenLabel: kms, pinFile: /p}"),
             StatusIs(absl::StatusCode::kInvalidArgument, "pkcs11.module: \"libsofthsm2.so\" is not an absolute"));
}

TEST_CASE("Pkcs11 spec: both tokenLabel and tokenSerial are refused naming both", "[pkcs11]") {
  auto spec = Parse("{module: /m.so, tokenLabel: kms, tokenSerial: 1a2b, pinFile: /p}");
  CHECK_THAT(spec, StatusIs(absl::StatusCode::kInvalidArgument, "tokenLabel and tokenSerial are both set"));
  CHECK_THAT(spec, StatusIs(absl::StatusCode::kInvalidArgument, "/etc/kmsplugin/config.yaml"));
}

TEST_CASE("Pkcs11 spec: neither tokenLabel nor tokenSerial is refused", "[pkcs11]") {
  CHECK_THAT(Parse("{module: /m.so, pinFile: /p}"),
             StatusIs(absl::StatusCode::kInvalidArgument, "neither tokenLabel nor tokenSerial"));
}

TEST_CASE("Pkcs11 spec: an unknown key is refused naming it", "[pkcs11]") {
  CHECK_THAT(Parse("{module: /m.so, tokenLabel: kms, pinFile: /p, slot: 0}"),
             StatusIs(absl::StatusCode::kInvalidArgument, "slot"));
}

TEST_CASE("Pkcs11 spec: a missing or relative pinFile names the field", "[pkcs11]") {
  CHECK_THAT(Parse("{module: /m.so, tokenLabel: kms}"),
             StatusIs(absl::StatusCode::kInvalidArgument, "pkcs11.pinFile: is missing"));
  CHECK_THAT(Parse("{module: /m.so, tokenLabel: kms, pinFile: kms.pin}"),
             StatusIs(absl::StatusCode::kInvalidArgument, "pkcs11.pinFile"));
}

TEST_CASE("Pkcs11 spec: bad keyLabel, token label and pool size name their fields", "[pkcs11]") {
  CHECK_THAT(Parse("{module: /m.so, tokenLabel: kms, pinFile: /p, keyLabel: 'a b'}"),
             StatusIs(absl::StatusCode::kInvalidArgument, "pkcs11.keyLabel"));
  CHECK_THAT(Parse("{module: /m.so, tokenLabel: '0123456789012345678901234567890123', pinFile: /p}"),
             StatusIs(absl::StatusCode::kInvalidArgument, "pkcs11.tokenLabel"));
  CHECK_THAT(Parse("{module: /m.so, tokenLabel: kms, pinFile: /p, sessionPoolSize: 0}"),
             StatusIs(absl::StatusCode::kInvalidArgument, "sessionPoolSize"));
  CHECK_THAT(Parse("{module: /m.so, tokenLabel: kms, pinFile: /p, sessionPoolSize: many}"),
             StatusIs(absl::StatusCode::kInvalidArgument, "sessionPoolSize"));
}

TEST_CASE("Pkcs11 spec: a section that is not a mapping is refused", "[pkcs11]") {
  CHECK_THAT(Parse("[a, b]"), StatusIs(absl::StatusCode::kInvalidArgument, "keySource.pkcs11"));
  CHECK_THAT(Parse("just-a-string"), StatusIs(absl::StatusCode::kInvalidArgument, "keySource.pkcs11"));
}

TEST_CASE("Pkcs11 spec: init creates the first version once, then refuses naming it", "[pkcs11]") {
  TokenFixture token;
  auto spec = Parse("{module: /usr/lib/softhsm/libsofthsm2.so, tokenLabel: kms, pinFile: " + token.pin_file + "}");
  REQUIRE_THAT(spec, IsOk());
  config::OpenContext context;
  context.environment = "staging";
  auto created = (*spec)->Init(context);
  REQUIRE_THAT(created, IsOk());
  CHECK(absl::StrContains(*created, "kmsplugin-staging-v1"));
  CHECK_THAT((*spec)->Init(context), StatusIs(absl::StatusCode::kAlreadyExists, "kmsplugin-staging-v1"));
  auto source = (*spec)->Open(context);
  REQUIRE_THAT(source, IsOk());
  auto current = source->source->Current();
  REQUIRE_THAT(current, IsOk());
  CHECK(absl::StrContains(current->key_id, "/kmsplugin-staging-v1@"));
  CHECK(source->source->Kind() == crypto::KeySourceKind::kPkcs11);
  // Another environment on the same token has its own (empty) label space.
  context.environment = "other";
  auto other = (*spec)->Open(context);
  REQUIRE_THAT(other, IsOk());
  CHECK_THAT(other->source->Current(), StatusIs(absl::StatusCode::kFailedPrecondition, "kmsplugin-other-v<N>"));
}

TEST_CASE("Pkcs11 spec: open refuses a PIN file others can read", "[pkcs11]") {
  TokenFixture token;
  chmod(token.pin_file.c_str(), 0644);
  auto spec = Parse("{module: /usr/lib/softhsm/libsofthsm2.so, tokenLabel: kms, pinFile: " + token.pin_file + "}");
  REQUIRE_THAT(spec, IsOk());
  config::OpenContext context;
  context.environment = "staging";
  CHECK_THAT((*spec)->Open(context), StatusIs(absl::StatusCode::kFailedPrecondition, "chmod 600 " + token.pin_file));
  CHECK_THAT((*spec)->Init(context), StatusIs(absl::StatusCode::kFailedPrecondition, "chmod 600 " + token.pin_file));
}

}  // namespace
}  // namespace kmsplugin::keysource::pkcs11
