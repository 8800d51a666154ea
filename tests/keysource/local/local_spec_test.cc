// The keySource.local YAML section, `kmsplugin init` for a local environment, and passphrase mode.

#include "kmsplugin/keysource/local/local_spec.h"

#include <string>

#include "absl/strings/match.h"
#include "tests/keysource/local/local_test_util.h"

namespace kmsplugin::keysource::local {
namespace {

using ::kmsplugin::keysource::local::testing::Context;
using ::kmsplugin::keysource::local::testing::LocalWorld;
using ::kmsplugin::keysource::local::testing::ModeOf;
using ::kmsplugin::keysource::local::testing::MustInit;
using ::kmsplugin::keysource::local::testing::MustOpen;
using ::kmsplugin::keysource::local::testing::MustParseLocalSpec;
using ::kmsplugin::keysource::local::testing::ParseLocalSpec;
using ::kmsplugin::keysource::local::testing::ReadAll;
using ::kmsplugin::keysource::local::testing::TempDir;
using ::kmsplugin::keysource::local::testing::WriteFile;
using ::kmsplugin::testing::FakeClock;
using ::kmsplugin::testing::IsOk;
using ::kmsplugin::testing::StatusIs;
using Code = absl::StatusCode;

constexpr char kField[] = "environments[0].keySource.local";

// ---------------------------------------------------------------------------------------------- ParseSpec

TEST_CASE("LocalSpec: parses keyring with rootKeyFile", "[local][spec]") {
  auto spec = ParseLocalSpec("keyring: /var/lib/k/dev.keyring\nrootKeyFile: /etc/k/dev.rootkey\n");
  REQUIRE_THAT(spec, IsOk());
  CHECK((*spec)->Kind() == "local");
  CHECK((*spec)->BackendKeyIdentity() == "local:/var/lib/k/dev.keyring");
}

TEST_CASE("LocalSpec: parses keyring with passphraseFile", "[local][spec]") {
  CHECK_THAT(ParseLocalSpec("keyring: /k\npassphraseFile: /p\n"), IsOk());
}

TEST_CASE("LocalSpec: missing keyring is refused naming the field and a fix", "[local][spec]") {
  for (const std::string& yaml : {std::string("rootKeyFile: /r\n"), std::string("keyring: \"\"\nrootKeyFile: /r\n"),
                                  std::string("keyring: ~\nrootKeyFile: /r\n")}) {
    CAPTURE(yaml);
    auto spec = ParseLocalSpec(yaml);
    CHECK_THAT(spec, StatusIs(Code::kInvalidArgument, std::string(kField) + ".keyring"));
    CHECK_THAT(spec, StatusIs(Code::kInvalidArgument, "fix:"));
    CHECK_THAT(spec, StatusIs(Code::kInvalidArgument, "test.yaml"));
  }
}

TEST_CASE("LocalSpec: both rootKeyFile and passphraseFile are refused", "[local][spec]") {
  auto spec = ParseLocalSpec("keyring: /k\nrootKeyFile: /r\npassphraseFile: /p\n");
  CHECK_THAT(spec, StatusIs(Code::kInvalidArgument, "both"));
  CHECK_THAT(spec, StatusIs(Code::kInvalidArgument, kField));
}

TEST_CASE("LocalSpec: neither rootKeyFile nor passphraseFile is refused", "[local][spec]") {
  CHECK_THAT(ParseLocalSpec("keyring: /k\n"), StatusIs(Code::kInvalidArgument, "neither"));
}

TEST_CASE("LocalSpec: an unknown key is refused naming it", "[local][spec]") {
  auto spec = ParseLocalSpec("keyring: /k\nrootKeyFile: /r\nrootkeyfile: /x\n");
  CHECK_THAT(spec, StatusIs(Code::kInvalidArgument, std::string(kField) + ".rootkeyfile"));
  CHECK_THAT(spec, StatusIs(Code::kInvalidArgument, "rootKeyFile"));  // lists the choices
}

TEST_CASE("LocalSpec: a non-mapping section is refused", "[local][spec]") {
  CHECK_THAT(ParseLocalSpec("just a string"), StatusIs(Code::kInvalidArgument, "mapping"));
  CHECK_THAT(ParseLocalSpec("[a, b]"), StatusIs(Code::kInvalidArgument, "mapping"));
}

TEST_CASE("LocalSpec: a keyring path that is a list is refused", "[local][spec]") {
  CHECK_THAT(ParseLocalSpec("keyring: [a, b]\nrootKeyFile: /r\n"),
             StatusIs(Code::kInvalidArgument, std::string(kField) + ".keyring"));
}

TEST_CASE("LocalSpec: BackendKeyIdentity is the same for two spellings of one keyring path", "[local][spec]") {
  TempDir dir;
  auto a = ParseLocalSpec("keyring: " + dir.path() + "/k\nrootKeyFile: /r\n");
  auto b = ParseLocalSpec("keyring: " + dir.path() + "/./sub/../k\nrootKeyFile: /r2\n");
  REQUIRE_THAT(a, IsOk());
  REQUIRE_THAT(b, IsOk());
  CHECK((*a)->BackendKeyIdentity() == (*b)->BackendKeyIdentity());
}

// ---------------------------------------------------------------------------------------------- Init

TEST_CASE("LocalSpec: init creates the root key and keyring with mode 0600", "[local][spec]") {
  TempDir dir;
  LocalWorld world(dir);
  FakeClock clock;
  auto summary = MustParseLocalSpec(world.Options())->Init(Context(clock));
  REQUIRE_THAT(summary, IsOk());
  CHECK(absl::StrContains(*summary, world.keyring));
  CHECK(absl::StrContains(*summary, world.root_key));
  CHECK(ModeOf(world.keyring) == 0600);
  CHECK(ModeOf(world.root_key) == 0600);
  CHECK(ReadAll(world.root_key).size() == kRootKeySize);
  auto source = MustOpen(world.Options(), clock);
  auto current = source->Current();
  REQUIRE_THAT(current, IsOk());
  CHECK(current->version == 1);
  CHECK(absl::StrContains(*summary, current->key_id));
}

TEST_CASE("LocalSpec: init creates missing parent directories with mode 0700", "[local][spec]") {
  TempDir dir;
  LocalOptions options;
  options.keyring = dir.File("var/lib/kms/dev.keyring");
  options.root_key_file = dir.File("etc/kms/dev.rootkey");
  FakeClock clock;
  MustInit(options, clock);
  CHECK(ModeOf(dir.File("var/lib/kms")) == 0700);
  CHECK(ModeOf(dir.File("etc/kms")) == 0700);
  MustOpen(options, clock);
}

TEST_CASE("LocalSpec: init refuses to overwrite a keyring (ALREADY_EXISTS, bytes unchanged)", "[local][spec]") {
  TempDir dir;
  LocalWorld world(dir);
  FakeClock clock;
  MustInit(world.Options(), clock);
  const std::string keyring_before = ReadAll(world.keyring);
  const std::string root_before = ReadAll(world.root_key);
  auto again = MustParseLocalSpec(world.Options())->Init(Context(clock));
  CHECK_THAT(again, StatusIs(Code::kAlreadyExists, world.keyring));
  CHECK(ReadAll(world.keyring) == keyring_before);
  CHECK(ReadAll(world.root_key) == root_before);
}

TEST_CASE("LocalSpec: init refuses even when the existing keyring is garbage", "[local][spec]") {
  TempDir dir;
  LocalWorld world(dir);
  FakeClock clock;
  WriteFile(world.keyring, "not a keyring");
  CHECK_THAT(MustParseLocalSpec(world.Options())->Init(Context(clock)), StatusIs(Code::kAlreadyExists));
  CHECK(ReadAll(world.keyring) == "not a keyring");
  CHECK_FALSE(std::filesystem::exists(world.root_key));
}

TEST_CASE("LocalSpec: init refuses a dangling symlink at the keyring path", "[local][spec]") {
  TempDir dir;
  LocalWorld world(dir);
  FakeClock clock;
  REQUIRE(symlink(dir.File("elsewhere").c_str(), world.keyring.c_str()) == 0);
  CHECK_THAT(MustParseLocalSpec(world.Options())->Init(Context(clock)), StatusIs(Code::kAlreadyExists));
  CHECK_FALSE(std::filesystem::exists(dir.File("elsewhere")));
}

TEST_CASE("LocalSpec: init with an existing root key file reuses it", "[local][spec]") {
  TempDir dir;
  LocalWorld world(dir);
  FakeClock clock;
  const std::string root(kRootKeySize, '\x42');
  WriteFile(world.root_key, root);
  auto summary = MustParseLocalSpec(world.Options())->Init(Context(clock));
  REQUIRE_THAT(summary, IsOk());
  CHECK(ReadAll(world.root_key) == root);
  CHECK_FALSE(absl::StrContains(*summary, "root key"));
  MustOpen(world.Options(), clock);
}

TEST_CASE("LocalSpec: init refuses an existing root key file that others can read", "[local][spec]") {
  TempDir dir;
  LocalWorld world(dir);
  FakeClock clock;
  WriteFile(world.root_key, std::string(kRootKeySize, 'k'), 0644);
  CHECK_THAT(MustParseLocalSpec(world.Options())->Init(Context(clock)), StatusIs(Code::kFailedPrecondition, "chmod 600"));
  CHECK_FALSE(std::filesystem::exists(world.keyring));
}

TEST_CASE("LocalSpec: init refuses an existing root key file of the wrong size", "[local][spec]") {
  TempDir dir;
  LocalWorld world(dir);
  FakeClock clock;
  WriteFile(world.root_key, std::string(16, 'k'));
  CHECK_THAT(MustParseLocalSpec(world.Options())->Init(Context(clock)), StatusIs(Code::kFailedPrecondition, "32"));
  CHECK_FALSE(std::filesystem::exists(world.keyring));
}

TEST_CASE("LocalSpec: two inits on one root key give different keyring ids and key_ids", "[local][spec]") {
  TempDir dir;
  LocalWorld a(dir, "a");
  LocalOptions b = a.Options();
  b.keyring = dir.File("b.keyring");
  FakeClock clock;
  MustInit(a.Options(), clock);
  MustInit(b, clock);
  auto first = MustOpen(a.Options(), clock)->Current();
  auto second = MustOpen(b, clock)->Current();
  REQUIRE_THAT(first, IsOk());
  REQUIRE_THAT(second, IsOk());
  CHECK(first->key_id != second->key_id);
  CHECK(first->key_ref != second->key_ref);
}

TEST_CASE("LocalSpec: Open through the spec serves the environment from the context", "[local][spec]") {
  TempDir dir;
  LocalWorld world(dir);
  FakeClock clock;
  auto spec = MustParseLocalSpec(world.Options());
  CHECK_THAT(spec->Open(Context(clock)), StatusIs(Code::kNotFound, "kmsplugin init"));
  MustInit(world.Options(), clock);
  auto dev = spec->Open(Context(clock, "dev"));
  auto prod = spec->Open(Context(clock, "prod"));
  REQUIRE_THAT(dev, IsOk());
  REQUIRE_THAT(prod, IsOk());
  auto version = dev->source->Current();
  REQUIRE_THAT(version, IsOk());
  auto wrapped = dev->source->Wrap(*version, "secret", "aad", absl::InfiniteFuture());
  REQUIRE_THAT(wrapped, IsOk());
  CHECK_THAT(prod->source->Unwrap(version->key_ref, *wrapped, "aad", absl::InfiniteFuture()),
             StatusIs(Code::kInvalidArgument));
}

// ---------------------------------------------------------------------------------------------- Passphrase
// Argon2id with the default parameters costs about 0.3 s per derivation: these few tests cover the mode.

TEST_CASE("LocalSpec: passphrase init and open, the file's trailing newline is ignored", "[local][spec][slow]") {
  TempDir dir;
  FakeClock clock;
  LocalOptions options;
  options.keyring = dir.File("dev.keyring");
  options.passphrase_file = dir.File("dev.pass");
  WriteFile(options.passphrase_file, "correct horse battery staple\n");
  MustInit(options, clock);
  CHECK(ModeOf(options.keyring) == 0600);
  auto params = ReadRootKeyParams(ReadAll(options.keyring), options.keyring);
  REQUIRE_THAT(params, IsOk());
  CHECK(params->kind == RootKeyParams::Kind::kPassphrase);
  // The same passphrase without the newline opens it.
  WriteFile(options.passphrase_file, "correct horse battery staple");
  auto source = MustOpen(options, clock);
  auto current = source->Current();
  REQUIRE_THAT(current, IsOk());
  CHECK(current->version == 1);
}

TEST_CASE("LocalSpec: a wrong passphrase is PERMISSION_DENIED", "[local][spec][slow]") {
  TempDir dir;
  FakeClock clock;
  LocalOptions options;
  options.keyring = dir.File("dev.keyring");
  options.passphrase_file = dir.File("dev.pass");
  WriteFile(options.passphrase_file, "correct horse battery staple");
  MustInit(options, clock);
  WriteFile(options.passphrase_file, "correct horse battery stapler");
  CHECK_THAT(LocalKeySource::Open(options, "dev", clock, crypto::SystemRandom()),
             StatusIs(Code::kPermissionDenied, "wrong passphrase or root key"));
  // A root key file cannot stand in for the passphrase either.
  LocalOptions with_file;
  with_file.keyring = options.keyring;
  with_file.root_key_file = dir.File("root");
  WriteFile(with_file.root_key_file, std::string(kRootKeySize, 'k'));
  CHECK_THAT(LocalKeySource::Open(with_file, "dev", clock, crypto::SystemRandom()),
             StatusIs(Code::kPermissionDenied));
}

TEST_CASE("LocalSpec: init refuses a short passphrase and creates nothing", "[local][spec]") {
  TempDir dir;
  FakeClock clock;
  LocalOptions options;
  options.keyring = dir.File("dev.keyring");
  options.passphrase_file = dir.File("dev.pass");
  WriteFile(options.passphrase_file, "too short\n");
  CHECK_THAT(MustParseLocalSpec(options)->Init(Context(clock)), StatusIs(Code::kFailedPrecondition, "shorter"));
  CHECK_FALSE(std::filesystem::exists(options.keyring));
}

TEST_CASE("LocalSpec: init refuses a missing or world-readable passphrase file", "[local][spec]") {
  TempDir dir;
  FakeClock clock;
  LocalOptions options;
  options.keyring = dir.File("dev.keyring");
  options.passphrase_file = dir.File("dev.pass");
  CHECK_THAT(MustParseLocalSpec(options)->Init(Context(clock)), StatusIs(Code::kNotFound, options.passphrase_file));
  WriteFile(options.passphrase_file, "correct horse battery staple", 0644);
  CHECK_THAT(MustParseLocalSpec(options)->Init(Context(clock)), StatusIs(Code::kFailedPrecondition, "chmod 600"));
  CHECK_FALSE(std::filesystem::exists(options.keyring));
}

}  // namespace
}  // namespace kmsplugin::keysource::local
