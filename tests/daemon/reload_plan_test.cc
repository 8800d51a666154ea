// PlanReload and LoadServeConfig: what a SIGHUP reload would change, and which changes it refuses.

#include "kmsplugin/daemon/reload_plan.h"

#include <sys/stat.h>

#include <string>

#include <catch2/catch.hpp>

#include "absl/strings/match.h"
#include "kmsplugin/keysource/local/local_spec.h"
#include "tests/support/status_matchers.h"
#include "tests/support/temp_dir.h"

namespace kmsplugin::daemon {
namespace {

using ::kmsplugin::testing::IsOk;
using ::kmsplugin::testing::StatusIs;
using ::kmsplugin::testing::TempDir;
using Names = std::vector<std::string>;

const config::KeySourceParsers kParsers = {{"local", keysource::local::ParseSpec}};

std::string Env(const std::string& name, const std::string& extra = "",
                const std::string& key_source = "") {
  const std::string source = key_source.empty() ? "{local: {keyring: /k/" + name + ".keyring, rootKeyFile: /k/" +
                                                      name + ".rootkey}}"
                                                : key_source;
  return "  - name: " + name + "\n    socket: /run/kp/" + name + ".sock\n" + extra + "    keySource: " + source + "\n";
}

LoadedConfig Parse(const std::string& yaml) {
  auto loaded = ParseServeConfig(yaml, "/etc/kmsplugin/config.yaml", kParsers);
  INFO(loaded.status().ToString());
  REQUIRE(loaded.ok());
  return *loaded;
}

ReloadPlan Plan(const std::string& before, const std::string& after) {
  auto plan = PlanReload(Parse(before), Parse(after));
  INFO(plan.status().ToString());
  REQUIRE(plan.ok());
  return *plan;
}

const std::string kTwo = "environments:\n" + Env("a") + Env("b");

TEST_CASE("PlanReload: the same file changes nothing", "[cli][reload]") {
  const ReloadPlan plan = Plan(kTwo, kTwo);
  CHECK(plan.unchanged == Names{"a", "b"});
  CHECK_FALSE(plan.ChangesAnything());
  CHECK(plan.Summary() == "no environment changed");
}

TEST_CASE("PlanReload: environments only in the new file are added, only in the old one removed", "[cli][reload]") {
  const ReloadPlan plan = Plan(kTwo, "environments:\n" + Env("c") + Env("a") + Env("d"));
  CHECK(plan.added == Names{"c", "d"});
  CHECK(plan.removed == Names{"b"});
  CHECK(plan.unchanged == Names{"a"});
  CHECK(plan.relistened.empty());
  CHECK(plan.rekeyed.empty());
  CHECK(plan.Summary() == "added: c, d; removed: b");
}

TEST_CASE("PlanReload: a renamed environment is a removal and an addition, even on the same socket",
          "[cli][reload]") {
  const std::string renamed = "environments:\n  - name: c\n    socket: /run/kp/a.sock\n"
                              "    keySource: {local: {keyring: /k/a.keyring, rootKeyFile: /k/a.rootkey}}\n" +
                              Env("b");
  const ReloadPlan plan = Plan(kTwo, renamed);
  CHECK(plan.added == Names{"c"});
  CHECK(plan.removed == Names{"a"});
  CHECK(plan.unchanged == Names{"b"});
}

TEST_CASE("PlanReload: a changed socket, socketGroup or statusVersion restarts only that listener",
          "[cli][reload]") {
  const std::string moved = "environments:\n  - name: a\n    socket: /run/kp/a2.sock\n"
                            "    keySource: {local: {keyring: /k/a.keyring, rootKeyFile: /k/a.rootkey}}\n" +
                            Env("b");
  for (const std::string& after : {moved, "environments:\n" + Env("a", "    socketGroup: kube\n") + Env("b"),
                                   "environments:\n" + Env("a", "    statusVersion: v2beta1\n") + Env("b")}) {
    INFO(after);
    const ReloadPlan plan = Plan(kTwo, after);
    CHECK(plan.relistened == Names{"a"});
    CHECK(plan.rekeyed.empty());
    CHECK(plan.unchanged == Names{"b"});
    CHECK(plan.Summary() == "changed: a (socket)");
  }
  // Writing the default explicitly is no change.
  CHECK_FALSE(Plan(kTwo, "environments:\n" + Env("a", "    statusVersion: v2\n") + Env("b")).ChangesAnything());
}

TEST_CASE("PlanReload: any change to a keySource section as written re-keys the environment", "[cli][reload]") {
  for (const std::string& source :
       {std::string("{local: {keyring: /k/./a.keyring, rootKeyFile: /k/a.rootkey}}"),
        std::string("{local: {rootKeyFile: /k/a.rootkey, keyring: /k/a.keyring}}"),
        std::string("{local: {keyring: /k/a.keyring, passphraseFile: /k/a.pass}}"),
        std::string("{local: {keyring: /k/other.keyring, rootKeyFile: /k/a.rootkey}}")}) {
    INFO(source);
    const ReloadPlan plan = Plan(kTwo, "environments:\n" + Env("a", "", source) + Env("b"));
    CHECK(plan.rekeyed == Names{"a"});
    CHECK(plan.relistened.empty());
    CHECK(plan.unchanged == Names{"b"});
    CHECK(plan.Summary() == "changed: a (keySource)");
  }
}

TEST_CASE("PlanReload: allowSharedBackendKey only affects validation, not what is served", "[cli][reload]") {
  CHECK_FALSE(Plan(kTwo, "environments:\n" + Env("a", "    allowSharedBackendKey: true\n") + Env("b"))
                  .ChangesAnything());
}

TEST_CASE("PlanReload: socket and keySource changed together are listed once, with both", "[cli][reload]") {
  const std::string after = "environments:\n  - name: a\n    socket: /run/kp/a2.sock\n"
                            "    keySource: {local: {keyring: /k/a2.keyring, rootKeyFile: /k/a.rootkey}}\n" +
                            Env("b");
  const ReloadPlan plan = Plan(kTwo, after);
  CHECK(plan.relistened == Names{"a"});
  CHECK(plan.rekeyed == Names{"a"});
  CHECK(plan.Changed() == Names{"a"});
  CHECK(plan.Summary() == "changed: a (keySource, socket)");
}

TEST_CASE("PlanReload: server.* and http.* changes are refused, naming the field and the way out",
          "[cli][reload][bad-input]") {
  const std::string base = "server:\n  pollInterval: 10s\nhttp:\n  listen: 127.0.0.1:9880\n" + kTwo;
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"server:\n  pollInterval: 5s\nhttp:\n  listen: 127.0.0.1:9880\n" + kTwo, "server.pollInterval"},
      {"server:\n  shutdownGracePeriod: 3s\nhttp:\n  listen: 127.0.0.1:9880\n" + kTwo, "server.shutdownGracePeriod"},
      {"server:\n  maxThreads: 64\nhttp:\n  listen: 127.0.0.1:9880\n" + kTwo, "server.maxThreads"},
      {"server:\n  pollInterval: 10s\nhttp:\n  listen: 127.0.0.1:9881\n" + kTwo, "http.listen"},
      {"server:\n  pollInterval: 10s\nhttp:\n  listen: 127.0.0.1:9880\n  enabled: false\n" + kTwo, "http.enabled"},
  };
  for (const auto& [after, field] : cases) {
    INFO(field);
    auto plan = PlanReload(Parse(base), Parse(after));
    REQUIRE_THAT(plan.status(), StatusIs(absl::StatusCode::kFailedPrecondition));
    const std::string message(plan.status().message());
    CHECK(absl::StrContains(message, "/etc/kmsplugin/config.yaml: " + field + ": changed from "));
    CHECK(absl::StrContains(message, "takes effect only at restart"));
    CHECK(absl::StrContains(message, "restart kmsplugin to apply it, or revert the change"));
  }
  // A restart-only change is refused even when environments change too: nothing of the file applies.
  auto mixed = PlanReload(Parse(base), Parse("server:\n  maxThreads: 64\nhttp:\n  listen: 127.0.0.1:9880\n"
                                             "environments:\n" + Env("a")));
  CHECK_THAT(mixed.status(), StatusIs(absl::StatusCode::kFailedPrecondition));
  // Spelling out the defaults is no change.
  CHECK(PlanReload(Parse(kTwo), Parse("server:\n  maxThreads: 128\n  pollInterval: 10s\nhttp:\n  enabled: true\n" +
                                      kTwo))
            .ok());
}

TEST_CASE("LoadServeConfig: refuses what config::LoadConfig refuses, with the same message", "[cli][reload][bad-input]") {
  TempDir dir;
  const std::string good = dir.Write("good.yaml", kTwo);
  auto loaded = LoadServeConfig(good, kParsers);
  REQUIRE_THAT(loaded.status(), IsOk());
  CHECK(loaded->config.environments.size() == 2);
  CHECK(loaded->key_source_text.size() == 2);

  const std::vector<std::string> bad = {
      dir.Write("syntax.yaml", kTwo + "  - [\n"),
      dir.Write("duplicate-socket.yaml", kTwo + Env("b").replace(Env("b").find("name: b"), 7, "name: c")),
      dir.Write("writable.yaml", kTwo, 0664),
      dir.path(),  // a directory
      dir.File("missing.yaml"),
  };
  for (const std::string& path : bad) {
    INFO(path);
    const absl::Status expected = config::LoadConfig(path, kParsers).status();
    REQUIRE_FALSE(expected.ok());
    const absl::Status status = LoadServeConfig(path, kParsers).status();
    CHECK(status == expected);
  }
}

}  // namespace
}  // namespace kmsplugin::daemon
