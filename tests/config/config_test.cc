// The YAML config loader: every refusal names the file, the field path and a fix.

#include "kmsplugin/config/config.h"

#include <stdlib.h>
#include <sys/stat.h>

#include <filesystem>
#include <fstream>
#include <string>

#include <catch2/catch.hpp>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "kmsplugin/config/field_context.h"
#include "kmsplugin/config/file_checks.h"
#include "kmsplugin/keysource/local/local_spec.h"
#include "tests/support/status_matchers.h"

namespace kmsplugin::config {
namespace {

using ::kmsplugin::testing::IsOk;
using ::kmsplugin::testing::StatusIs;
using Code = absl::StatusCode;

constexpr char kFile[] = "/etc/kmsplugin/config.yaml";

KeySourceParsers Parsers() { return {{"local", keysource::local::ParseSpec}}; }

absl::StatusOr<Config> Parse(const std::string& yaml) { return ParseConfig(yaml, kFile, Parsers()); }

std::string Env(const std::string& name, const std::string& socket, const std::string& keyring,
                const std::string& extra = "") {
  return absl::StrCat("  - name: ", name, "\n    socket: ", socket, "\n", extra,
                      "    keySource:\n      local:\n        keyring: ", keyring,
                      "\n        rootKeyFile: /etc/kmsplugin/", name, ".rootkey\n");
}

std::string Dev(const std::string& extra = "") {
  return Env("dev", "/run/kmsplugin/dev.sock", "/var/lib/kmsplugin/dev.keyring", extra);
}
std::string Prod(const std::string& extra = "") {
  return Env("prod", "/run/kmsplugin/prod.sock", "/var/lib/kmsplugin/prod.keyring", extra);
}

// An INVALID_ARGUMENT naming the file, the field path and a fix.
void CheckFieldError(const absl::StatusOr<Config>& result, const std::string& field,
                     const std::string& also = "") {
  CAPTURE(field, result.status());
  REQUIRE_FALSE(result.ok());
  CHECK(result.status().code() == Code::kInvalidArgument);
  CHECK(absl::StrContains(result.status().message(), absl::StrCat(kFile, ": ", field, ":")));
  CHECK(absl::StrContains(result.status().message(), "fix:"));
  if (!also.empty()) {
    CHECK(absl::StrContains(result.status().message(), also));
  }
}

// ---------------------------------------------------------------------------------------------- Good files

TEST_CASE("Config: a minimal file parses with defaults", "[config]") {
  auto config = Parse("environments:\n" + Dev());
  REQUIRE_THAT(config, IsOk());
  CHECK(config->file == kFile);
  REQUIRE(config->environments.size() == 1);
  const EnvironmentConfig& dev = config->environments[0];
  CHECK(dev.name == "dev");
  CHECK(dev.socket == "/run/kmsplugin/dev.sock");
  CHECK(dev.status_version == "v2");
  CHECK_FALSE(dev.socket_group.has_value());
  CHECK_FALSE(dev.allow_shared_backend_key);
  REQUIRE(dev.key_source != nullptr);
  CHECK(dev.key_source->Kind() == "local");
  CHECK(config->server.poll_interval == absl::Seconds(10));
  CHECK(config->server.shutdown_grace_period == absl::Seconds(10));
  CHECK(config->server.max_threads == 128);
}

TEST_CASE("Config: every setting is read", "[config]") {
  auto config = Parse(
      "server:\n  pollInterval: 1m30s\n  shutdownGracePeriod: 500ms\n  maxThreads: 64\n"
      "environments:\n" +
      Dev("    socketGroup: kube\n    statusVersion: v2beta1\n    allowSharedBackendKey: true\n") + Prod());
  REQUIRE_THAT(config, IsOk());
  CHECK(config->server.poll_interval == absl::Seconds(90));
  CHECK(config->server.shutdown_grace_period == absl::Milliseconds(500));
  CHECK(config->server.max_threads == 64);
  REQUIRE(config->environments.size() == 2);
  CHECK(config->environments[0].socket_group == "kube");
  CHECK(config->environments[0].status_version == "v2beta1");
  CHECK(config->environments[0].allow_shared_backend_key);
  CHECK(config->environments[1].name == "prod");
}

TEST_CASE("Config: Find returns the environment, and an unknown name lists the names", "[config]") {
  auto config = Parse("environments:\n" + Dev() + Prod());
  REQUIRE_THAT(config, IsOk());
  auto prod = config->Find("prod");
  REQUIRE_THAT(prod, IsOk());
  CHECK((*prod)->name == "prod");
  auto missing = config->Find("staging");
  CHECK_THAT(missing, StatusIs(Code::kNotFound, "\"staging\""));
  CHECK_THAT(missing, StatusIs(Code::kNotFound, "dev, prod"));
  CHECK_THAT(missing, StatusIs(Code::kNotFound, kFile));
  CHECK_THAT(config->Find(""), StatusIs(Code::kNotFound));
}

// ---------------------------------------------------------------------------------------------- File level

TEST_CASE("Config: text that is not YAML is refused with the position", "[config]") {
  auto config = Parse("environments: [\n  - name: dev\n  bad: : :\n");
  CheckFieldError(config, "(top level)", "line");
}

TEST_CASE("Config: a file that is not a mapping is refused", "[config]") {
  for (const std::string& yaml : {std::string("- a\n- b\n"), std::string("just text"), std::string(""),
                                  std::string("~")}) {
    CAPTURE(yaml);
    CheckFieldError(Parse(yaml), "(top level)", "mapping");
  }
}

TEST_CASE("Config: an unknown top-level key is refused naming it", "[config]") {
  CheckFieldError(Parse("environment:\n" + Dev()), "environment", "environments");
  CheckFieldError(Parse("enviroments:\n" + Dev()), "enviroments", "environments");
  CheckFieldError(Parse("environments:\n" + Dev() + "Server: {}\n"), "Server", "server");
}

TEST_CASE("Config: missing or empty environments is refused", "[config]") {
  CheckFieldError(Parse("server:\n  maxThreads: 8\n"), "environments");
  CheckFieldError(Parse("environments: []\n"), "environments");
  CheckFieldError(Parse("environments:\n"), "environments");
  CheckFieldError(Parse("environments: dev\n"), "environments");
  CheckFieldError(Parse("environments: {name: dev}\n"), "environments");
}

TEST_CASE("Config: an environment that is not a mapping is refused", "[config]") {
  CheckFieldError(Parse("environments:\n  - dev\n"), "environments[0]", "mapping");
}

TEST_CASE("Config: an unknown environment key is refused naming its path", "[config]") {
  CheckFieldError(Parse("environments:\n" + Dev() + Prod("    sockt: /x\n")), "environments[1].sockt", "socket");
}

TEST_CASE("Config: a key given twice is refused, not silently resolved to one of the values", "[config]") {
  // YAML 1.2 requires unique mapping keys; yaml-cpp accepts duplicates and node[key] returns the first. Without
  // a check, a second environments: block is silently ignored and "socket: /a / socket: /b" serves /a.
  CheckFieldError(Parse("environments:\n" + Dev() + "environments:\n" + Prod()), "environments", "more than once");
  CheckFieldError(Parse("environments:\n" + Dev("    socket: /run/kmsplugin/other.sock\n")),
                  "environments[0].socket", "more than once");
  CheckFieldError(Parse("server:\n  maxThreads: 8\n  maxThreads: 2000\nenvironments:\n" + Dev()),
                  "server.maxThreads", "more than once");
}

// ---------------------------------------------------------------------------------------------- Names

TEST_CASE("Config: a missing name is refused", "[config]") {
  CheckFieldError(Parse("environments:\n  - socket: /run/a.sock\n    keySource: {local: {keyring: /k, "
                        "rootKeyFile: /r}}\n"),
                  "environments[0].name");
  CheckFieldError(Parse("environments:\n" + Env("\"\"", "/run/a.sock", "/k")), "environments[0].name");
}

TEST_CASE("Config: bad environment names are refused", "[config]") {
  for (const std::string& name : {std::string("Dev"), std::string("PROD"), std::string("-dev"),
                                  std::string("dev-"), std::string("dev_1"), std::string("dev.1"),
                                  std::string("d\u00e9v"), std::string(64, 'a'), std::string("a b")}) {
    CAPTURE(name);
    CheckFieldError(Parse("environments:\n" + Dev() + Env("\"" + name + "\"", "/run/x.sock", "/k")),
                    "environments[1].name");
  }
}

TEST_CASE("Config: boundary environment names are accepted", "[config]") {
  for (const std::string& name : {std::string("a"), std::string(63, 'a'), std::string("0"),
                                  std::string("a-b-1")}) {
    CAPTURE(name);
    CHECK_THAT(Parse("environments:\n" + Env(name, "/run/x.sock", "/k")), IsOk());
  }
  CHECK(IsValidEnvironmentName("prod-eu-1"));
  CHECK_FALSE(IsValidEnvironmentName(""));
  CHECK_FALSE(IsValidEnvironmentName("a\n"));
  CHECK_FALSE(IsValidEnvironmentName(std::string("a\0b", 3)));
}

TEST_CASE("Config: a duplicate name is refused", "[config]") {
  CheckFieldError(Parse("environments:\n" + Dev() + Env("dev", "/run/other.sock", "/other.keyring")),
                  "environments[1].name", "\"dev\"");
}

// ---------------------------------------------------------------------------------------------- Sockets

TEST_CASE("Config: a duplicate socket is refused", "[config]") {
  CheckFieldError(Parse("environments:\n" + Dev() + Env("prod", "/run/kmsplugin/dev.sock", "/p.keyring")),
                  "environments[1].socket", "/run/kmsplugin/dev.sock");
}

TEST_CASE("Config: a relative or abstract socket is refused", "[config]") {
  for (const std::string& socket :
       {std::string("run/dev.sock"), std::string("./dev.sock"), std::string("\"@abstract\""),
        std::string("unix:///run/dev.sock"), std::string("\" /run/dev.sock\"")}) {
    CAPTURE(socket);
    CheckFieldError(Parse("environments:\n" + Env("dev", socket, "/k")), "environments[0].socket");
  }
}

TEST_CASE("Config: a missing socket is refused", "[config]") {
  CheckFieldError(Parse("environments:\n  - name: dev\n    keySource: {local: {keyring: /k, rootKeyFile: /r}}\n"),
                  "environments[0].socket");
  CheckFieldError(Parse("environments:\n" + Env("dev", "\"\"", "/k")), "environments[0].socket");
  CheckFieldError(Parse("environments:\n" + Env("dev", "[/a, /b]", "/k")), "environments[0].socket");
}

TEST_CASE("Config: a socket path over 107 bytes is refused, 107 is accepted", "[config]") {
  const std::string fits = "/" + std::string(106, 's');
  const std::string too_long = "/" + std::string(107, 's');
  REQUIRE(fits.size() == 107);
  CHECK_THAT(Parse("environments:\n" + Env("dev", fits, "/k")), IsOk());
  CheckFieldError(Parse("environments:\n" + Env("dev", too_long, "/k")), "environments[0].socket", "108");
}

// ---------------------------------------------------------------------------------------------- Settings

TEST_CASE("Config: a bad statusVersion is refused", "[config]") {
  for (const std::string& version : {std::string("v1"), std::string("V2"), std::string("v2beta2"),
                                     std::string("\"\""), std::string("[v2]")}) {
    CAPTURE(version);
    CheckFieldError(Parse("environments:\n" + Dev("    statusVersion: " + version + "\n")),
                    "environments[0].statusVersion");
  }
}

TEST_CASE("Config: a bad allowSharedBackendKey is refused", "[config]") {
  for (const std::string& value : {std::string("yes"), std::string("1"), std::string("True ")}) {
    CAPTURE(value);
    CheckFieldError(Parse("environments:\n" + Dev("    allowSharedBackendKey: \"" + value + "\"\n")),
                    "environments[0].allowSharedBackendKey");
  }
}

TEST_CASE("Config: a socketGroup that is not a string is refused", "[config]") {
  CheckFieldError(Parse("environments:\n" + Dev("    socketGroup: {a: b}\n")), "environments[0].socketGroup");
}

// ---------------------------------------------------------------------------------------------- Key sources

TEST_CASE("Config: an unknown key source kind is refused listing the known ones", "[config]") {
  auto config = Parse("environments:\n  - name: dev\n    socket: /run/dev.sock\n    keySource:\n"
                      "      vault: {address: https://v:8200}\n");
  CheckFieldError(config, "environments[0].keySource.vault", "local");
}

TEST_CASE("Config: two key sources in one environment are refused", "[config]") {
  auto config = Parse("environments:\n  - name: dev\n    socket: /run/dev.sock\n    keySource:\n"
                      "      local: {keyring: /k, rootKeyFile: /r}\n      vault: {address: https://v:8200}\n");
  CheckFieldError(config, "environments[0].keySource", "exactly one");
}

TEST_CASE("Config: a missing or empty keySource is refused", "[config]") {
  CheckFieldError(Parse("environments:\n  - name: dev\n    socket: /run/dev.sock\n"),
                  "environments[0].keySource", "local");
  CheckFieldError(Parse("environments:\n  - name: dev\n    socket: /run/dev.sock\n    keySource:\n"),
                  "environments[0].keySource");
  CheckFieldError(Parse("environments:\n  - name: dev\n    socket: /run/dev.sock\n    keySource: {}\n"),
                  "environments[0].keySource");
  CheckFieldError(Parse("environments:\n  - name: dev\n    socket: /run/dev.sock\n    keySource: local\n"),
                  "environments[0].keySource");
}

TEST_CASE("Config: a key source's own error carries the full field path", "[config]") {
  auto config = Parse("environments:\n" + Dev() +
                      "  - name: prod\n    socket: /run/prod.sock\n    keySource:\n      local: {rootKeyFile: /r}\n");
  CheckFieldError(config, "environments[1].keySource.local.keyring");
}

TEST_CASE("Config: two environments on the same backend key are refused", "[config]") {
  auto config = Parse("environments:\n" + Env("dev", "/run/dev.sock", "/var/lib/kmsplugin/shared.keyring") +
                      Env("test", "/run/test.sock", "/var/lib/kmsplugin/shared.keyring"));
  CheckFieldError(config, "environments[1].keySource", "\"dev\"");
  CHECK_THAT(config, StatusIs(Code::kInvalidArgument, "allowSharedBackendKey"));
}

TEST_CASE("Config: the same backend key under two spellings of its path is refused", "[config]") {
  auto config = Parse("environments:\n" + Env("dev", "/run/dev.sock", "/var/lib/kmsplugin/shared.keyring") +
                      Env("test", "/run/test.sock", "/var/lib/kmsplugin/./x/../shared.keyring"));
  CheckFieldError(config, "environments[1].keySource");
}

TEST_CASE("Config: allowSharedBackendKey: true permits a shared backend key", "[config]") {
  auto config = Parse("environments:\n" + Env("dev", "/run/dev.sock", "/shared.keyring") +
                      Env("test", "/run/test.sock", "/shared.keyring", "    allowSharedBackendKey: true\n"));
  REQUIRE_THAT(config, IsOk());
  CHECK(config->environments.size() == 2);
  // allowSharedBackendKey: false is the same as leaving it out.
  CheckFieldError(Parse("environments:\n" + Env("dev", "/run/dev.sock", "/shared.keyring") +
                        Env("test", "/run/test.sock", "/shared.keyring", "    allowSharedBackendKey: false\n")),
                  "environments[1].keySource");
}

// ---------------------------------------------------------------------------------------------- server:

TEST_CASE("Config: bad durations in server are refused", "[config]") {
  for (const auto& [field, value] : std::vector<std::pair<std::string, std::string>>{
           {"pollInterval", "10"},
           {"pollInterval", "0s"},
           {"pollInterval", "-5s"},
           {"pollInterval", "500ms"},
           {"pollInterval", "ten seconds"},
           {"pollInterval", "inf"},
           {"shutdownGracePeriod", "0s"},
           {"shutdownGracePeriod", "-1s"},
           {"shutdownGracePeriod", "soon"},
           {"shutdownGracePeriod", "[1s]"}}) {
    CAPTURE(field, value);
    CheckFieldError(Parse("server:\n  " + field + ": " + value + "\nenvironments:\n" + Dev()), "server." + field);
  }
}

TEST_CASE("Config: maxThreads outside 4..1024 is refused, the bounds are accepted", "[config]") {
  for (const std::string& value : {std::string("3"), std::string("0"), std::string("-1"), std::string("1025"),
                                   std::string("4.5"), std::string("many"), std::string("99999999999999999999")}) {
    CAPTURE(value);
    CheckFieldError(Parse("server:\n  maxThreads: " + value + "\nenvironments:\n" + Dev()), "server.maxThreads",
                    "4 to 1024");
  }
  for (const std::string& value : {std::string("4"), std::string("1024")}) {
    auto config = Parse("server:\n  maxThreads: " + value + "\nenvironments:\n" + Dev());
    REQUIRE_THAT(config, IsOk());
    CHECK(config->server.max_threads == std::stoi(value));
  }
}

TEST_CASE("Config: server.allowUnlockedMemory is false unless set to true, and only a boolean", "[config]") {
  auto by_default = Parse("environments:\n" + Dev());
  REQUIRE_THAT(by_default, IsOk());
  CHECK_FALSE(by_default->server.allow_unlocked_memory);
  auto allowed = Parse("server:\n  allowUnlockedMemory: true\nenvironments:\n" + Dev());
  REQUIRE_THAT(allowed, IsOk());
  CHECK(allowed->server.allow_unlocked_memory);
  CheckFieldError(Parse("server:\n  allowUnlockedMemory: sometimes\nenvironments:\n" + Dev()),
                  "server.allowUnlockedMemory");
}

TEST_CASE("Config: an unknown key in server is refused", "[config]") {
  CheckFieldError(Parse("server:\n  maxThread: 8\nenvironments:\n" + Dev()), "server.maxThread", "maxThreads");
}

TEST_CASE("Config: server that is not a mapping is refused", "[config]") {
  CheckFieldError(Parse("server: fast\nenvironments:\n" + Dev()), "server", "mapping");
}

// ---------------------------------------------------------------------------------------------- LoadConfig

class TempDir {
 public:
  TempDir() {
    char templ[] = "/tmp/kms-config-test-XXXXXX";
    const char* made = mkdtemp(templ);
    REQUIRE(made != nullptr);
    dir_ = made;
  }
  ~TempDir() {
    std::error_code error;
    std::filesystem::remove_all(dir_, error);
  }
  std::string Write(const std::string& name, const std::string& text, mode_t mode) const {
    const std::string path = dir_ + "/" + name;
    std::ofstream(path) << text;
    REQUIRE(chmod(path.c_str(), mode) == 0);
    return path;
  }
  const std::string& path() const { return dir_; }

 private:
  std::string dir_;
};

TEST_CASE("Config: LoadConfig reads a file and names it in errors", "[config]") {
  TempDir dir;
  const std::string good = dir.Write("good.yaml", "environments:\n" + Dev(), 0644);
  auto config = LoadConfig(good, Parsers());
  REQUIRE_THAT(config, IsOk());
  CHECK(config->file == good);
  CHECK(config->environments.size() == 1);
  const std::string bad = dir.Write("bad.yaml", "environments: []\n", 0600);
  CHECK_THAT(LoadConfig(bad, Parsers()), StatusIs(Code::kInvalidArgument, bad + ": environments:"));
}

TEST_CASE("Config: LoadConfig refuses a config file writable by group or others", "[config]") {
  TempDir dir;
  for (mode_t mode : {0664, 0646, 0666, 0620}) {
    CAPTURE(mode);
    const std::string path = dir.Write("config.yaml", "environments:\n" + Dev(), mode);
    auto config = LoadConfig(path, Parsers());
    CHECK_THAT(config, StatusIs(Code::kFailedPrecondition, path));
    CHECK_THAT(config, StatusIs(Code::kFailedPrecondition, "fix:"));
  }
}

TEST_CASE("Config: LoadConfig refuses a missing file or a directory", "[config]") {
  TempDir dir;
  CHECK_THAT(LoadConfig(dir.path() + "/absent.yaml", Parsers()), StatusIs(Code::kNotFound, "absent.yaml"));
  CHECK_THAT(LoadConfig(dir.path(), Parsers()), StatusIs(Code::kFailedPrecondition, "not a regular file"));
}

// ---------------------------------------------------------------------------------------------- FieldContext

TEST_CASE("FieldContext: paths and error format", "[config]") {
  const FieldContext top("f.yaml", "");
  CHECK(top.Child("environments").Index(1).Child("socket").path() == "environments[1].socket");
  const absl::Status error = top.Child("a").Error("is wrong", "do this");
  CHECK(error.code() == Code::kInvalidArgument);
  CHECK(error.message() == "f.yaml: a: is wrong; fix: do this");
  CHECK(top.Error("x", "y").message() == "f.yaml: (top level): x; fix: y");
}

TEST_CASE("FieldContext: OptionalStringList refuses non-lists and empty items", "[config]") {
  const FieldContext context("f.yaml", "root");
  CHECK_THAT(context.OptionalStringList(YAML::Load("items: a"), "items"),
             StatusIs(Code::kInvalidArgument, "root.items"));
  CHECK_THAT(context.OptionalStringList(YAML::Load("items: [a, '']"), "items"),
             StatusIs(Code::kInvalidArgument, "root.items[1]"));
  CHECK_THAT(context.OptionalStringList(YAML::Load("items: [a, [b]]"), "items"),
             StatusIs(Code::kInvalidArgument, "root.items[1]"));
  auto good = context.OptionalStringList(YAML::Load("items: [a, b]"), "items");
  REQUIRE_THAT(good, IsOk());
  CHECK(**good == std::vector<std::string>{"a", "b"});
  auto absent = context.OptionalStringList(YAML::Load("other: 1"), "items");
  REQUIRE_THAT(absent, IsOk());
  CHECK_FALSE(absent->has_value());
}

TEST_CASE("FileChecks: secret files readable by group or others are refused with chmod 600", "[config]") {
  TempDir dir;
  const std::string path = dir.Write("secret", "x", 0640);
  CHECK_THAT(CheckSecretFile(path, "token file"), StatusIs(Code::kFailedPrecondition, "chmod 600 " + path));
  CHECK_THAT(CheckSecretFile(path, "token file"), StatusIs(Code::kFailedPrecondition, "token file"));
  REQUIRE(chmod(path.c_str(), 0600) == 0);
  CHECK_THAT(CheckSecretFile(path, "token file"), IsOk());
  CHECK_THAT(CheckSecretFile(dir.path() + "/none", "token file"), StatusIs(Code::kNotFound));
}

}  // namespace
}  // namespace kmsplugin::config

namespace kmsplugin::config {
namespace {

TEST_CASE("Config: a control character in any value is refused (a NUL would cut the socket path short)",
          "[config][hardening]") {
  CheckFieldError(Parse("environments:\n" + Env("dev", "\"/run/kmsplugin/dev\\0.sock\"",
                                                "/var/lib/kmsplugin/dev.keyring")),
                  "environments[0].socket", "control character (byte 0x00 at offset 18)");
  CheckFieldError(Parse("environments:\n" + Env("dev", "/run/kmsplugin/dev.sock", "\"/var/lib/k\\tring\"")),
                  "environments[0].keySource.local.keyring", "byte 0x09");
}

TEST_CASE("Config: a value longer than 4096 bytes is refused without echoing it", "[config][hardening]") {
  const std::string huge(10 * 1024 * 1024, 'n');
  auto result = Parse("environments:\n" + Env(huge, "/run/kmsplugin/dev.sock", "/var/lib/kmsplugin/dev.keyring"));
  CheckFieldError(result, "environments[0].name", "is 10485760 bytes long; a config value holds at most 4096");
  CHECK(result.status().message().size() < 1000);
}

TEST_CASE("Config: relative key paths are refused", "[config][hardening]") {
  CheckFieldError(Parse("environments:\n" + Env("dev", "/run/kmsplugin/dev.sock", "state/dev.keyring")),
                  "environments[0].keySource.local.keyring", "\"state/dev.keyring\" is not an absolute path");
}

}  // namespace
}  // namespace kmsplugin::config
