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

TEST_CASE("Pkcs11 spec: an RFC 7512 uri names module, token, key label and PIN file as the keys do", "[pkcs11]") {
  auto keys = Parse("{module: /m.so, tokenLabel: kms, pinFile: /etc/kmsplugin/kms.pin, keyLabel: kek-prod}");
  auto uri = Parse("{uri: 'pkcs11:token=kms;object=kek-prod;type=secret-key?module-path=/m.so&"
                   "pin-source=file:/etc/kmsplugin/kms.pin'}");
  REQUIRE_THAT(keys, IsOk());
  REQUIRE_THAT(uri, IsOk());
  CHECK((*uri)->BackendKeyIdentity() == (*keys)->BackendKeyIdentity());
  std::vector<std::string> key_paths, uri_paths;
  for (const auto& p : (*keys)->HostPaths()) key_paths.push_back(p.path);
  for (const auto& p : (*uri)->HostPaths()) uri_paths.push_back(p.path);
  CHECK(uri_paths == key_paths);
  // Percent-encoding and a serial, with the module and PIN file as their own keys.
  auto serial = Parse("{uri: 'pkcs11:serial=1a2b;object=kek%2Dprod', module: /m.so, pinFile: /p}");
  REQUIRE_THAT(serial, IsOk());
  CHECK((*serial)->BackendKeyIdentity() == "pkcs11:serial=1a2b/kek-prod");
  // A pin-source that is a bare absolute path is a file too.
  CHECK_THAT(Parse("{uri: 'pkcs11:token=kms?module-path=/m.so&pin-source=/p'}"), IsOk());
}

TEST_CASE("Pkcs11 spec: a uri that would put the PIN in the config, pick a slot or one object is refused", "[pkcs11]") {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"pkcs11:token=kms?module-path=/m.so&pin-value=1234", "pin-value"},
      {"pkcs11:token=kms;id=%01?module-path=/m.so&pin-source=file:/p", "by id"},
      {"pkcs11:token=kms;type=private?module-path=/m.so&pin-source=file:/p", "secret-key"},
      {"pkcs11:slot-id=0?module-path=/m.so&pin-source=file:/p", "slot numbers are not stable"},
      {"pkcs11:token=kms;manufacturer=SoftHSM?module-path=/m.so&pin-source=file:/p", "manufacturer or model"},
      {"pkcs11:token=kms;library-manufacturer=x?module-path=/m.so&pin-source=file:/p", "library"},
      {"pkcs11:token=kms?module-name=softhsm2&pin-source=file:/p", "module-path"},
      {"pkcs11:token=kms?module-path=/m.so&pin-source=https://pins.example/kms", "file:/absolute/path"},
      {"pkcs11:token=kms;colour=blue?module-path=/m.so&pin-source=file:/p", "does not recognise"},
      {"https://not-a-pkcs11-uri", "not a PKCS#11 URI"},
      {"pkcs11:token=kms?pin-source=file:/p", "module"},  // no module anywhere
  };
  for (const auto& [uri, names] : cases) {
    INFO(uri);
    auto spec = Parse("{uri: '" + uri + "'}");
    CHECK_THAT(spec, StatusIs(absl::StatusCode::kInvalidArgument, names));
    if (!spec.ok()) {
      CHECK(absl::StrContains(spec.status().message(), "keySource.pkcs11"));
      CHECK(!absl::StrContains(spec.status().message(), "1234"));  // a PIN is never echoed
    }
  }
  // The uri and a key that says the same thing.
  CHECK_THAT(Parse("{uri: 'pkcs11:token=kms?module-path=/m.so', module: /m.so, pinFile: /p}"),
             StatusIs(absl::StatusCode::kInvalidArgument, "uri and module"));
  CHECK_THAT(Parse("{uri: 'pkcs11:token=kms', tokenSerial: 1a2b, module: /m.so, pinFile: /p}"),
             StatusIs(absl::StatusCode::kInvalidArgument, "uri and token"));
}

TEST_CASE("Pkcs11 spec: a uri opens a real SoftHSM2 token", "[pkcs11]") {
  TokenFixture token;
  auto spec = Parse("{uri: 'pkcs11:token=kms;object=kek-uri?module-path=/usr/lib/softhsm/libsofthsm2.so&"
                    "pin-source=file:" + token.pin_file + "'}");
  REQUIRE_THAT(spec, IsOk());
  config::OpenContext context;
  context.environment = "prod";
  REQUIRE_THAT((*spec)->Init(context), IsOk());
  auto source = (*spec)->Open(context);
  REQUIRE_THAT(source, IsOk());
  auto current = source->source->Current();
  REQUIRE_THAT(current, IsOk());
  CHECK(absl::StrContains(current->key_id, "/kek-uri-v1@"));
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
