// The audit against a real etcd (Debian etcd-server) filled by ApiserverWriter through a real kmsplugin server.

#include <algorithm>
#include <cstdio>
#include <chrono>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>
#include <grpcpp/security/credentials.h>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "encrypted_object.pb.h"
#include "kmsplugin/audit/audit_command.h"
#include "kmsplugin/audit/auditor.h"
#include "kmsplugin/audit/key_catalog.h"
#include "kmsplugin/audit/scanner.h"
#include "kmsplugin/keysource/local/local_spec.h"
#include "tests/audit/apiserver_writer.h"
#include "tests/audit/etcd_fixture.h"
#include "tests/server/server_fixture.h"
#include "tests/support/status_matchers.h"
#include "tests/support/subprocess.h"

namespace kmsplugin::testing {
namespace {

using nlohmann::json;

config::KeySourceParsers Parsers() { return {{"local", keysource::local::ParseSpec}}; }

// A kmsplugin server (environment "dev"), an etcd, a writer, and a config naming the server's keyring.
struct World {
  explicit World(EtcdFixtureOptions etcd_options = {},
                 std::shared_ptr<grpc::ChannelCredentials> credentials = nullptr)
      : etcd(std::move(etcd_options)),
        writer(etcd.endpoint(), *plugin.client, "kmsplugin-dev", "kmsplugin-dev-v1", std::move(credentials)) {
    config = plugin.dir.Write("config.yaml", absl::StrCat("environments:\n"
                                                          "  - name: dev\n"
                                                          "    socket: ",
                                                          plugin.socket,
                                                          "\n"
                                                          "    keySource:\n"
                                                          "      local:\n"
                                                          "        keyring: ",
                                                          plugin.dir.File("dev.keyring"),
                                                          "\n"
                                                          "        rootKeyFile: ",
                                                          plugin.dir.File("dev.rootkey"), "\n"));
    REQUIRE_THAT(writer.NewSeed(), IsOk());
  }

  audit::AuditFlags Flags() const {
    audit::AuditFlags flags;
    flags.config_path = config;
    flags.endpoints = etcd.endpoint();
    flags.timeout_seconds = 5;
    return flags;
  }

  ServerFixture plugin;
  EtcdFixture etcd;
  ApiserverWriter writer;
  std::string config;
};

struct AuditRun {
  int exit_code = -1;
  std::string out;
  std::string err;
  json report;
};

AuditRun RunJson(audit::AuditFlags flags) {
  flags.json = true;
  std::ostringstream out, err;
  AuditRun run;
  run.exit_code = audit::RunAudit(flags, Parsers(), out, err);
  run.out = out.str();
  run.err = err.str();
  if (run.exit_code != 2) {
    INFO(run.out << run.err);
    REQUIRE_NOTHROW(run.report = json::parse(run.out));
  }
  return run;
}

AuditRun RunTable(audit::AuditFlags flags) {
  flags.json = false;
  std::ostringstream out, err;
  AuditRun run;
  run.exit_code = audit::RunAudit(flags, Parsers(), out, err);
  run.out = out.str();
  run.err = err.str();
  return run;
}

// The group of `prefix_report` with this storage kind and key_id (null json if none).
json Group(const json& prefix_report, const std::string& storage, const std::string& key_id) {
  for (const json& g : prefix_report["groups"]) {
    if (g["storage"] == storage && g["keyId"] == key_id) {
      return g;
    }
  }
  return json();
}

uint64_t Objects(const json& prefix_report, const std::string& storage, const std::string& key_id) {
  const json g = Group(prefix_report, storage, key_id);
  return g.is_null() ? 0 : g["objects"].get<uint64_t>();
}

std::string SecretKey(const std::string& ns, const std::string& name) {
  return absl::StrCat("/registry/secrets/", ns, "/", name);
}

void RequireAllDecrypt(ApiserverWriter& writer, const std::string& prefix) {
  auto keys = writer.Keys(prefix);
  REQUIRE_THAT(keys, IsOk());
  for (const std::string& key : *keys) {
    auto plaintext = writer.Read(key);
    INFO(key << ": " << plaintext.status().ToString());
    REQUIRE(plaintext.ok());
    const std::string name = key.substr(key.rfind('/') + 1);
    CHECK(plaintext->find(name) != std::string::npos);
  }
}

// Waits until the plugin's Status reports a key_id other than `old`.
std::string WaitForNewKeyId(ServerFixture& plugin, const std::string& old) {
  for (int i = 0; i < 100; ++i) {
    v2::StatusResponse status;
    if (plugin.client->Status(status).ok() && status.key_id() != old) {
      return status.key_id();
    }
    plugin.runner->RequestRefresh();
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  FAIL("the plugin never reported a new key_id");
  return "";
}

TEST_CASE("Audit: exact counts by provider and key_id, and the names of unencrypted objects", "[audit]") {
  World w;
  for (int i = 0; i < 20; ++i) {
    const std::string name = absl::StrCat("v2-", i);
    REQUIRE_THAT(w.writer.PutV2(SecretKey("team-a", name), SecretPayload(name)), IsOk());
  }
  for (int i = 0; i < 5; ++i) {
    const std::string name = absl::StrCat("v1-", i);
    REQUIRE_THAT(w.writer.PutV1(SecretKey("team-b", name), SecretPayload(name)), IsOk());
  }
  REQUIRE_THAT(w.writer.PutIdentityProtobuf(SecretKey("default", "plain-1"), "plain-1"), IsOk());
  REQUIRE_THAT(w.writer.PutIdentityProtobuf(SecretKey("default", "plain-2"), "plain-2"), IsOk());
  REQUIRE_THAT(w.writer.PutJson(SecretKey("kube-system", "json-1"),
                                R"({"kind":"Secret","apiVersion":"v1","metadata":{"name":"json-1"}})"),
               IsOk());
  REQUIRE_THAT(w.writer.Put(SecretKey("legacy", "cbc-1"), "k8s:enc:aescbc:v1:key1:" + std::string(48, 'x')),
               IsOk());
  RequireAllDecrypt(w.writer, "/registry/secrets/team-");

  const AuditRun run = RunJson(w.Flags());
  INFO(run.out << run.err);
  CHECK(run.exit_code == 1);  // unencrypted objects
  REQUIRE(run.report["prefixes"].size() == 1);
  const json& p = run.report["prefixes"][0];
  CHECK(p["prefix"] == "/registry/secrets/");
  CHECK(p["objects"] == 29);
  CHECK(p["unencrypted"] == 3);
  CHECK(p["unknownKeyId"] == 0);
  CHECK(p["retiredKey"] == 0);
  CHECK(p["malformed"] == 0);
  const json v2 = Group(p, "kms-v2", w.writer.key_id());
  REQUIRE_FALSE(v2.is_null());
  CHECK(v2["provider"] == "kmsplugin-dev");
  CHECK(v2["objects"] == 20);
  CHECK(v2["state"] == "current");
  CHECK(v2["environment"] == "dev");
  CHECK(v2["version"] == 1);
  CHECK(v2["dekSourceTypes"]["HKDF_SHA256_XNONCE_AES_GCM_SEED"] == 20);
  // v1 values carry no key_id: it is found through the plugin ciphertext's environment and key reference.
  const json v1 = Group(p, "kms-v1", w.writer.key_id());
  REQUIRE_FALSE(v1.is_null());
  CHECK(v1["provider"] == "kmsplugin-dev-v1");
  CHECK(v1["objects"] == 5);
  CHECK(v1["state"] == "current");
  CHECK(Objects(p, "aescbc", "") == 1);
  CHECK(Group(p, "aescbc", "")["provider"] == "key1");
  CHECK(Objects(p, "identity", "") == 3);
  CHECK(p["unencryptedNames"] == json({"default/plain-1", "default/plain-2", "kube-system/json-1"}));
  CHECK(run.report["keysChecked"] == true);
  CHECK(run.report["ok"] == false);

  // The table names the same things for people.
  const AuditRun table = RunTable(w.Flags());
  CHECK(table.exit_code == 1);
  CHECK(table.out.find(w.writer.key_id()) != std::string::npos);
  CHECK(table.out.find("NOT ENCRYPTED (3): default/plain-1, default/plain-2, kube-system/json-1") !=
        std::string::npos);
}

TEST_CASE("Audit: every object encrypted under a known key exits 0", "[audit]") {
  World w;
  for (int i = 0; i < 10; ++i) {
    REQUIRE_THAT(w.writer.PutV2(SecretKey("ns", absl::StrCat("s", i)), SecretPayload(absl::StrCat("s", i))),
                 IsOk());
  }
  REQUIRE_THAT(w.writer.PutV1(SecretKey("ns", "old"), SecretPayload("old")), IsOk());
  const AuditRun run = RunJson(w.Flags());
  INFO(run.out << run.err);
  CHECK(run.exit_code == 0);
  CHECK(run.report["ok"] == true);
  CHECK(run.report["prefixes"][0]["objects"] == 11);
  const AuditRun table = RunTable(w.Flags());
  CHECK(table.exit_code == 0);
  CHECK(table.out.find("OK: every object is encrypted") != std::string::npos);
  RequireAllDecrypt(w.writer, "/registry/secrets/");
}

TEST_CASE("Audit: page size 7 over 100 objects gives the same counts as page size 1000", "[audit]") {
  World w;
  for (int i = 0; i < 90; ++i) {
    REQUIRE_THAT(w.writer.PutV2(SecretKey(absl::StrCat("ns", i % 9), absl::StrCat("s", i)),
                                SecretPayload(absl::StrCat("s", i))),
                 IsOk());
  }
  for (int i = 0; i < 10; ++i) {
    REQUIRE_THAT(w.writer.PutIdentityProtobuf(SecretKey("plain", absl::StrCat("p", i)), "x"), IsOk());
  }
  audit::AuditFlags small = w.Flags();
  small.page_size = 7;
  audit::AuditFlags large = w.Flags();
  large.page_size = 1000;
  const AuditRun a = RunJson(small);
  const AuditRun b = RunJson(large);
  CHECK(a.report["prefixes"][0]["objects"] == 100);
  CHECK(a.report["prefixes"] == b.report["prefixes"]);
  CHECK(Objects(a.report["prefixes"][0], "kms-v2", w.writer.key_id()) == 90);
  CHECK(a.report["prefixes"][0]["unencryptedNames"].size() == 10);

  // 100 keys in pages of 7: 15 Range calls, each key once, all at one revision.
  auto client = audit::EtcdClient::New(w.etcd.ClientOptions());
  REQUIRE_THAT(client, IsOk());
  std::set<std::string> seen;
  uint64_t visits = 0;
  auto scanned = audit::ScanPrefix(**client, audit::ScanOptions{"/registry/secrets/", 7, 0},
                                   [&](std::string_view key, std::string_view) {
                                     seen.insert(std::string(key));
                                     ++visits;
                                   });
  REQUIRE_THAT(scanned, IsOk());
  CHECK(scanned->pages == 15);
  CHECK(scanned->keys == 100);
  CHECK(visits == 100);
  CHECK(seen.size() == 100);
}

TEST_CASE("Audit: several prefixes are reported separately", "[audit]") {
  World w;
  for (int i = 0; i < 4; ++i) {
    REQUIRE_THAT(w.writer.PutV2(SecretKey("ns", absl::StrCat("s", i)), SecretPayload(absl::StrCat("s", i))),
                 IsOk());
  }
  for (int i = 0; i < 3; ++i) {
    const std::string key = absl::StrCat("/registry/configmaps/ns/c", i);
    REQUIRE_THAT(w.writer.PutV2(key, SecretPayload(absl::StrCat("c", i))), IsOk());
  }
  REQUIRE_THAT(w.writer.PutJson("/registry/configmaps/ns/plain", "{}"), IsOk());
  // Not under either prefix, though it starts with the same letters.
  REQUIRE_THAT(w.writer.PutJson("/registry/secretsfoo/ns/x", "{}"), IsOk());
  audit::AuditFlags flags = w.Flags();
  flags.prefixes = {"/registry/secrets", "/registry/configmaps/"};
  const AuditRun run = RunJson(flags);
  INFO(run.out << run.err);
  REQUIRE(run.report["prefixes"].size() == 2);
  const json& secrets = run.report["prefixes"][0];
  const json& configmaps = run.report["prefixes"][1];
  CHECK(secrets["prefix"] == "/registry/secrets/");
  CHECK(secrets["objects"] == 4);
  CHECK(secrets["unencrypted"] == 0);
  CHECK(Objects(secrets, "kms-v2", w.writer.key_id()) == 4);
  CHECK(configmaps["prefix"] == "/registry/configmaps/");
  CHECK(configmaps["objects"] == 4);
  CHECK(Objects(configmaps, "kms-v2", w.writer.key_id()) == 3);
  CHECK(configmaps["unencryptedNames"] == json({"ns/plain"}));
  CHECK(run.exit_code == 1);
}

TEST_CASE("Audit: objects under a key_id no environment knows are reported and exit 1", "[audit]") {
  World w;
  REQUIRE_THAT(w.writer.PutV2(SecretKey("ns", "known"), SecretPayload("known")), IsOk());
  // What another KMS plugin (or a deleted environment) left behind: a valid value under a foreign key_id.
  auto value = w.writer.EncodeV2(SecretKey("ns", "foreign"), SecretPayload("foreign"));
  REQUIRE_THAT(value, IsOk());
  const std::string prefix = "k8s:enc:kms:v2:kmsplugin-dev:";
  kmsplugin::etcd::EncryptedObject object;
  REQUIRE(object.ParseFromString(value->substr(prefix.size())));
  object.set_keyid("vault:https://old-vault:8200/transit/keys/k8s:v3");
  REQUIRE_THAT(w.writer.Put(SecretKey("ns", "foreign"), prefix + object.SerializeAsString()), IsOk());

  const AuditRun run = RunJson(w.Flags());
  INFO(run.out << run.err);
  CHECK(run.exit_code == 1);
  const json& p = run.report["prefixes"][0];
  CHECK(p["unknownKeyId"] == 1);
  CHECK(p["unknownKeyIdNames"] == json({"ns/foreign"}));
  const json foreign = Group(p, "kms-v2", "vault:https://old-vault:8200/transit/keys/k8s:v3");
  REQUIRE_FALSE(foreign.is_null());
  CHECK(foreign["state"] == "unknown");
  CHECK(foreign["objects"] == 1);
  CHECK(Group(p, "kms-v2", w.writer.key_id())["state"] == "current");
  const AuditRun table = RunTable(w.Flags());
  CHECK(table.out.find("UNDER AN UNKNOWN KEY_ID (1): ns/foreign") != std::string::npos);

  // Without --config key_ids are listed but not judged.
  audit::AuditFlags unchecked = w.Flags();
  unchecked.config_path.clear();
  const AuditRun loose = RunJson(unchecked);
  CHECK(loose.exit_code == 0);
  CHECK(loose.report["keysChecked"] == false);
  CHECK(Group(loose.report["prefixes"][0], "kms-v2", w.writer.key_id())["state"] == "not-checked");
}

TEST_CASE("Audit: objects under a retired key version are reported", "[audit]") {
  World w;
  for (int i = 0; i < 3; ++i) {
    REQUIRE_THAT(w.writer.PutV2(SecretKey("ns", absl::StrCat("s", i)), SecretPayload(absl::StrCat("s", i))),
                 IsOk());
  }
  REQUIRE_THAT(w.writer.PutV1(SecretKey("ns", "v1"), SecretPayload("v1")), IsOk());
  auto versions = w.plugin.source->Versions();
  REQUIRE_THAT(versions, IsOk());
  REQUIRE(versions->size() == 1);
  (*versions)[0].state = core::KeyState::kRetired;  // as `kmsplugin retire` would leave it
  audit::KeyCatalog catalog;
  catalog.Add("dev", *versions);
  auto client = audit::EtcdClient::New(w.etcd.ClientOptions());
  REQUIRE_THAT(client, IsOk());
  auto report = audit::RunAuditScan(**client, &catalog, audit::AuditOptions{});
  REQUIRE_THAT(report, IsOk());
  CHECK(audit::ExitCodeFor(*report) == 1);
  const audit::PrefixReport& p = report->prefixes[0];
  CHECK(p.retired_key == 4);
  CHECK(p.retired_key_names == std::vector<std::string>{"ns/s0", "ns/s1", "ns/s2", "ns/v1"});
  CHECK(audit::RenderTable(*report).find("UNDER A RETIRED KEY (4)") != std::string::npos);
}

TEST_CASE("Audit: after a rotation and a rewrite the counts move to the new key_id", "[audit]") {
  World w;
  const std::string old_key_id = w.writer.key_id();
  constexpr int kObjects = 30;
  for (int i = 0; i < kObjects; ++i) {
    REQUIRE_THAT(w.writer.PutV2(SecretKey("ns", absl::StrCat("s", i)), SecretPayload(absl::StrCat("s", i))),
                 IsOk());
  }
  RequireAllDecrypt(w.writer, "/registry/secrets/");
  auto config = config::LoadConfig(w.config, Parsers());
  REQUIRE_THAT(config, IsOk());
  auto usage = audit::KeyUsageFromEtcd(w.Flags(), *config, "dev");
  REQUIRE_THAT(usage, IsOk());
  REQUIRE(usage->keys.size() == 1);
  CHECK(usage->keys[0].objects == kObjects);

  // Rotate; the plugin serves the new key; the apiserver makes a new seed under it.
  REQUIRE_THAT(w.plugin.source->Rotate(absl::Now() + absl::Seconds(5)), IsOk());
  const std::string new_key_id = WaitForNewKeyId(w.plugin, old_key_id);
  REQUIRE_THAT(w.writer.NewSeed(), IsOk());
  REQUIRE(w.writer.key_id() == new_key_id);

  // Before the rewrite everything is still under the old key, which is now "active".
  AuditRun run = RunJson(w.Flags());
  CHECK(run.exit_code == 0);
  CHECK(Objects(run.report["prefixes"][0], "kms-v2", old_key_id) == kObjects);
  CHECK(Group(run.report["prefixes"][0], "kms-v2", old_key_id)["state"] == "active");
  RequireAllDecrypt(w.writer, "/registry/secrets/");

  // Rewrite half, as `kubectl replace` would: decrypt, re-encrypt under the new seed.
  auto keys = w.writer.Keys("/registry/secrets/");
  REQUIRE_THAT(keys, IsOk());
  for (size_t i = 0; i < keys->size() / 2; ++i) {
    auto plaintext = w.writer.Read((*keys)[i]);
    REQUIRE_THAT(plaintext, IsOk());
    REQUIRE_THAT(w.writer.PutV2((*keys)[i], *plaintext), IsOk());
  }
  run = RunJson(w.Flags());
  CHECK(Objects(run.report["prefixes"][0], "kms-v2", old_key_id) == kObjects / 2);
  CHECK(Objects(run.report["prefixes"][0], "kms-v2", new_key_id) == kObjects / 2);
  RequireAllDecrypt(w.writer, "/registry/secrets/");

  // And the rest.
  for (size_t i = keys->size() / 2; i < keys->size(); ++i) {
    auto plaintext = w.writer.Read((*keys)[i]);
    REQUIRE_THAT(plaintext, IsOk());
    REQUIRE_THAT(w.writer.PutV2((*keys)[i], *plaintext), IsOk());
  }
  run = RunJson(w.Flags());
  INFO(run.out);
  CHECK(run.exit_code == 0);
  CHECK(Objects(run.report["prefixes"][0], "kms-v2", old_key_id) == 0);
  CHECK(Objects(run.report["prefixes"][0], "kms-v2", new_key_id) == kObjects);
  CHECK(Group(run.report["prefixes"][0], "kms-v2", new_key_id)["state"] == "current");
  CHECK(Group(run.report["prefixes"][0], "kms-v2", new_key_id)["version"] == 2);
  RequireAllDecrypt(w.writer, "/registry/secrets/");

  usage = audit::KeyUsageFromEtcd(w.Flags(), *config, "dev");
  REQUIRE_THAT(usage, IsOk());
  REQUIRE(usage->keys.size() == 2);
  CHECK(usage->keys[0].key.key_id == old_key_id);
  CHECK(usage->keys[0].objects == 0);
  CHECK(usage->keys[1].key.key_id == new_key_id);
  CHECK(usage->keys[1].objects == kObjects);
  CHECK(audit::KeyUsageJson(*usage)["versions"][1]["objects"] == kObjects);
  CHECK(audit::RenderKeyUsage(*usage).find(new_key_id) != std::string::npos);
}

// `kmsplugin retire` as an operator runs it: the real binary against the same config, keyring and etcd.
RunResult RetireCli(World& w, std::vector<std::string> args) {
  std::vector<std::string> argv = {std::string(KMS_BINARY_DIR) + "/kmsplugin/cli/kmsplugin", "retire", "--config",
                                   w.config, "--env", "dev"};
  argv.insert(argv.end(), args.begin(), args.end());
  RunResult result = Run(argv, w.plugin.dir.path());
  // The in-process plugin notices the keyring change as a daemon would after SIGHUP.
  w.plugin.runner->RequestRefresh();
  REQUIRE_THAT(w.plugin.source->Refresh(absl::Now() + absl::Seconds(5)), IsOk());
  return result;
}

TEST_CASE("Retire: refused while etcd holds objects under the version, allowed after the rewrite", "[audit][retire]") {
  World w;
  const std::string old_key_id = w.writer.key_id();
  constexpr int kV2 = 12, kV1 = 3;
  for (int i = 0; i < kV2; ++i) {
    REQUIRE_THAT(w.writer.PutV2(SecretKey("ns", absl::StrCat("s", i)), SecretPayload(absl::StrCat("s", i))),
                 IsOk());
  }
  for (int i = 0; i < kV1; ++i) {
    REQUIRE_THAT(w.writer.PutV1(SecretKey("legacy", absl::StrCat("v", i)), SecretPayload(absl::StrCat("v", i))),
                 IsOk());
  }
  REQUIRE_THAT(w.writer.PutIdentityProtobuf(SecretKey("ns", "plain"), SecretPayload("plain")), IsOk());
  auto kept_old_value = w.writer.Get(SecretKey("ns", "s0"));  // an old ciphertext, to try after the retire
  REQUIRE_THAT(kept_old_value, IsOk());

  REQUIRE_THAT(w.plugin.source->Rotate(absl::Now() + absl::Seconds(5)), IsOk());
  const std::string new_key_id = WaitForNewKeyId(w.plugin, old_key_id);
  REQUIRE_THAT(w.writer.NewSeed(), IsOk());
  // Right after the rotation kube-apiserver may still write under version 1: refused however etcd looks.
  RunResult too_soon = RetireCli(w, {"--etcd", w.etcd.endpoint(), "--version", "1", "--force"});
  CHECK(too_soon.exit_code == 1);
  CHECK(too_soon.err.find("version 2 replaced version 1 only") != std::string::npos);
  CHECK(too_soon.err.find("--allow-recent") != std::string::npos);
  // The rest of the scenario plays the hours after that (--allow-recent).
  const std::vector<std::string> etcd_flags = {"--etcd", w.etcd.endpoint(), "--version", "1", "--allow-recent"};

  // Objects remain under version 1 (KMS v2 and v1 alike): refused, with the count, names and the fix.
  RunResult refused = RetireCli(w, etcd_flags);
  INFO(refused.out << refused.err);
  CHECK(refused.exit_code == 1);
  CHECK(refused.err.find(absl::StrCat(kV2 + kV1, " object(s) in etcd still use them")) != std::string::npos);
  CHECK(refused.err.find("/registry/secrets/ns/s0") != std::string::npos);
  CHECK(refused.err.find("/registry/secrets/legacy/v2") != std::string::npos);
  CHECK(refused.err.find("kubectl replace") != std::string::npos);
  RequireAllDecrypt(w.writer, "/registry/secrets/ns/s");
  RequireAllDecrypt(w.writer, "/registry/secrets/legacy/");

  // The current version is never retired; without --etcd nothing is retired unchecked.
  RunResult current = RetireCli(w, {"--etcd", w.etcd.endpoint(), "--version", "2"});
  CHECK(current.exit_code == 1);
  CHECK(current.err.find("is the current version") != std::string::npos);
  RunResult unchecked = RetireCli(w, {"--version", "1", "--allow-recent"});
  CHECK(unchecked.exit_code == 1);
  CHECK(unchecked.err.find("fix: pass --endpoints") != std::string::npos);
  auto versions = w.plugin.source->Versions();
  REQUIRE_THAT(versions, IsOk());
  CHECK((*versions)[0].state == core::KeyState::kActive);

  // Rewrite every encrypted object through the plugin, as `kubectl replace` makes the apiserver do.
  for (const std::string& prefix : {std::string("/registry/secrets/ns/s"), std::string("/registry/secrets/legacy/")}) {
    auto keys = w.writer.Keys(prefix);
    REQUIRE_THAT(keys, IsOk());
    for (const std::string& key : *keys) {
      auto plaintext = w.writer.Read(key);
      REQUIRE_THAT(plaintext, IsOk());
      REQUIRE_THAT(w.writer.PutV2(key, *plaintext), IsOk());
    }
  }
  RunResult retired = RetireCli(w, etcd_flags);
  INFO(retired.out << retired.err);
  REQUIRE(retired.exit_code == 0);
  CHECK(retired.out.find("etcd: no object uses versions 1") != std::string::npos);
  CHECK(retired.out.find("retired versions 1") != std::string::npos);
  CHECK(retired.err.find("\"event\":\"retire\"") != std::string::npos);  // the audit event, JSON on stderr
  versions = w.plugin.source->Versions();
  REQUIRE_THAT(versions, IsOk());
  CHECK((*versions)[0].state == core::KeyState::kRetired);
  CHECK((*versions)[1].state == core::KeyState::kCurrent);
  RequireAllDecrypt(w.writer, "/registry/secrets/ns/s");
  RequireAllDecrypt(w.writer, "/registry/secrets/legacy/");
  const AuditRun audit_run = RunJson(w.Flags());
  CHECK(audit_run.report["prefixes"][0]["retiredKey"] == 0);
  CHECK(audit_run.report["prefixes"][0]["unencryptedNames"] == json({"ns/plain"}));  // identity: not ours to retire
  // The old ciphertext no longer decrypts through the plugin; retiring again is a no-op.
  CHECK_FALSE(w.writer.Decrypt(SecretKey("ns", "s0"), *kept_old_value).ok());
  RunResult again = RetireCli(w, etcd_flags);
  CHECK(again.exit_code == 0);
  CHECK(again.out.find("nothing to retire") != std::string::npos);

  // A forgotten backup restored into etcd under version 1: refused; --force retires anyway and names it.
  REQUIRE_THAT(w.writer.Put(SecretKey("ns", "restored"), *kept_old_value), IsOk());
  RunResult reinstated = RetireCli(w, {"--version", "1", "--reinstate"});
  INFO(reinstated.out << reinstated.err);
  REQUIRE(reinstated.exit_code == 0);
  CHECK(reinstated.out.find("reinstated versions 1") != std::string::npos);
  auto restored = w.writer.Decrypt(SecretKey("ns", "s0"), *kept_old_value);
  REQUIRE_THAT(restored, IsOk());
  CHECK(restored->find("s0") != std::string::npos);
  RunResult refused_again = RetireCli(w, etcd_flags);
  CHECK(refused_again.exit_code == 1);
  CHECK(refused_again.err.find("/registry/secrets/ns/restored") != std::string::npos);
  std::vector<std::string> forced_flags = etcd_flags;
  forced_flags.push_back("--force");
  RunResult forced = RetireCli(w, forced_flags);
  INFO(forced.out << forced.err);
  CHECK(forced.exit_code == 0);
  CHECK(forced.out.find("--force: 1 object(s) in etcd would no longer decrypt") != std::string::npos);
  CHECK(forced.out.find("/registry/secrets/ns/restored") != std::string::npos);
  const AuditRun after_force = RunJson(w.Flags());
  CHECK(after_force.exit_code == 1);
  CHECK(after_force.report["prefixes"][0]["retiredKeyNames"] == json({"ns/restored"}));
  // --destroy is PKCS#11's step; the local keyring keeps retired versions and says how to undo instead.
  RunResult destroy = RetireCli(w, {"--version", "1", "--destroy", "--force"});
  CHECK(destroy.exit_code == 1);
  CHECK(destroy.err.find("no destroy step") != std::string::npos);
}

TEST_CASE("Audit: etcd down is a clear error with exit 2, a dead endpoint fails over to a live one", "[audit]") {
  World w;
  REQUIRE_THAT(w.writer.PutV2(SecretKey("ns", "s"), SecretPayload("s")), IsOk());
  const std::string dead = absl::StrCat("127.0.0.1:", FreePort());

  audit::AuditFlags failover = w.Flags();
  failover.endpoints = dead + "," + w.etcd.endpoint();
  const AuditRun ok = RunJson(failover);
  INFO(ok.err);
  CHECK(ok.exit_code == 0);
  CHECK(ok.report["endpoint"] == w.etcd.endpoint());

  w.etcd.Stop();
  audit::AuditFlags flags = w.Flags();
  flags.timeout_seconds = 2;
  const auto start = std::chrono::steady_clock::now();
  const AuditRun down = RunTable(flags);
  CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(10));
  CHECK(down.exit_code == 3);
  CHECK(down.out.empty());
  CHECK(down.err.find("cannot reach etcd") != std::string::npos);
  CHECK(down.err.find(w.etcd.endpoint()) != std::string::npos);
}

TEST_CASE("Audit: TLS with --cacert/--cert/--key works and a wrong CA is refused", "[audit]") {
  TempDir certs;
  const TlsMaterial good = MakeTlsMaterial(certs, "good");
  const TlsMaterial other = MakeTlsMaterial(certs, "other");
  grpc::SslCredentialsOptions ssl;
  ssl.pem_root_certs = ReadWholeFile(good.ca_cert);
  ssl.pem_cert_chain = ReadWholeFile(good.client_cert);
  ssl.pem_private_key = ReadWholeFile(good.client_key);
  World w(EtcdFixtureOptions{good}, grpc::SslCredentials(ssl));
  for (int i = 0; i < 3; ++i) {
    REQUIRE_THAT(w.writer.PutV2(SecretKey("ns", absl::StrCat("s", i)), SecretPayload(absl::StrCat("s", i))),
                 IsOk());
  }
  audit::AuditFlags flags = w.Flags();
  flags.cacert = good.ca_cert;
  flags.cert = good.client_cert;
  flags.key = good.client_key;
  const AuditRun run = RunJson(flags);
  INFO(run.out << run.err);
  CHECK(run.exit_code == 0);
  CHECK(run.report["prefixes"][0]["objects"] == 3);

  flags.endpoints = "https://" + w.etcd.endpoint();
  CHECK(RunJson(flags).exit_code == 0);

  // A CA that did not sign etcd's certificate.
  audit::AuditFlags wrong_ca = flags;
  wrong_ca.cacert = other.ca_cert;
  wrong_ca.timeout_seconds = 3;
  const AuditRun refused = RunTable(wrong_ca);
  CHECK(refused.exit_code == 3);
  INFO(refused.err);
  CHECK(refused.err.find("TLS handshake failed") != std::string::npos);

  // No TLS at all against a TLS etcd.
  audit::AuditFlags plain = w.Flags();
  plain.timeout_seconds = 3;
  const AuditRun plaintext = RunTable(plain);
  CHECK(plaintext.exit_code == 3);
  CHECK(plaintext.err.find("cannot reach etcd") != std::string::npos);

  // Half a client certificate, and a file that is not PEM, are usage errors naming the flag.
  audit::AuditFlags half = flags;
  half.key.clear();
  CHECK(RunTable(half).err.find("--cert and --key go together") != std::string::npos);
  audit::AuditFlags not_pem = flags;
  not_pem.cacert = w.config;
  const AuditRun bad_pem = RunTable(not_pem);
  CHECK(bad_pem.exit_code == 2);
  CHECK(bad_pem.err.find("--cacert") != std::string::npos);
}

TEST_CASE("Audit: the audit never writes to etcd (revision unchanged)", "[audit]") {
  World w;
  for (int i = 0; i < 12; ++i) {
    REQUIRE_THAT(w.writer.PutV2(SecretKey("ns", absl::StrCat("s", i)), SecretPayload(absl::StrCat("s", i))),
                 IsOk());
  }
  REQUIRE_THAT(w.writer.PutJson(SecretKey("ns", "plain"), "{}"), IsOk());
  auto before = w.writer.Revision();
  REQUIRE_THAT(before, IsOk());
  audit::AuditFlags flags = w.Flags();
  flags.page_size = 5;
  const AuditRun a = RunJson(flags);
  const AuditRun b = RunTable(flags);
  auto config = config::LoadConfig(w.config, Parsers());
  REQUIRE_THAT(config, IsOk());
  REQUIRE_THAT(audit::KeyUsageFromEtcd(flags, *config, "dev"), IsOk());
  auto after = w.writer.Revision();
  REQUIRE_THAT(after, IsOk());
  CHECK(*after == *before);
  CHECK(a.report["revision"] == *before);
}

TEST_CASE("Audit: malformed values are reported as such and never crash", "[audit]") {
  World w;
  auto good = w.writer.EncodeV2(SecretKey("ns", "truncated"), SecretPayload("truncated"));
  REQUIRE_THAT(good, IsOk());
  REQUIRE_THAT(w.writer.Put(SecretKey("ns", "truncated"), good->substr(0, 40)), IsOk());
  REQUIRE_THAT(w.writer.Put(SecretKey("ns", "v1-bad-length"),
                            std::string("k8s:enc:kms:v1:kmsplugin-dev-v1:\xff\xf0", 34) + std::string(30, 'c')),
               IsOk());
  REQUIRE_THAT(w.writer.Put(SecretKey("ns", "v2-empty"), "k8s:enc:kms:v2:kmsplugin-dev:"), IsOk());
  REQUIRE_THAT(w.writer.Put(SecretKey("ns", "no-provider"), "k8s:enc:kms:v2:"), IsOk());
  REQUIRE_THAT(w.writer.Put(SecretKey("ns", "unknown-scheme"), "k8s:enc:rot13:v9:key:abc"), IsOk());
  REQUIRE_THAT(w.writer.PutV2(SecretKey("ns", "fine"), SecretPayload("fine")), IsOk());
  const AuditRun run = RunJson(w.Flags());
  INFO(run.out << run.err);
  CHECK(run.exit_code == 1);
  const json& p = run.report["prefixes"][0];
  CHECK(p["objects"] == 6);
  CHECK(p["malformed"] == 5);
  std::map<std::string, std::string> problems;
  for (const json& m : p["malformedObjects"]) {
    problems[m["name"]] = m["problem"];
  }
  CHECK_THAT(problems["ns/truncated"], Catch::Contains("kms-v2") && Catch::Contains("EncryptedObject"));
  CHECK_THAT(problems["ns/v1-bad-length"], Catch::Contains("length prefix says 65520 bytes"));
  CHECK_THAT(problems["ns/v2-empty"], Catch::Contains("empty EncryptedObject"));
  CHECK_THAT(problems["ns/no-provider"], Catch::Contains("no provider name"));
  CHECK_THAT(problems["ns/unknown-scheme"], Catch::Contains("unrecognised encryption prefix"));
  CHECK(Objects(p, "kms-v2", w.writer.key_id()) == 1);
  const AuditRun table = RunTable(w.Flags());
  CHECK(table.out.find("MALFORMED (5):") != std::string::npos);
}

TEST_CASE("Audit: bad flags and a bad config are usage errors (exit 2) naming the problem", "[audit]") {
  World w;
  audit::AuditFlags flags = w.Flags();
  flags.page_size = 0;
  AuditRun run = RunTable(flags);
  CHECK(run.exit_code == 2);
  CHECK(run.err.find("--page-size") != std::string::npos);

  flags = w.Flags();
  flags.prefixes = {"registry/secrets/"};
  run = RunTable(flags);
  CHECK(run.exit_code == 2);
  CHECK(run.err.find("must start with '/'") != std::string::npos);

  flags = w.Flags();
  flags.endpoints = "localhost";
  run = RunTable(flags);
  CHECK(run.exit_code == 2);
  CHECK(run.err.find("expected host:port") != std::string::npos);

  flags = w.Flags();
  flags.config_path = w.plugin.dir.File("missing.yaml");
  run = RunTable(flags);
  CHECK(run.exit_code == 2);
  CHECK(run.err.find("missing.yaml") != std::string::npos);

  flags = w.Flags();
  flags.timeout_seconds = -1;
  CHECK(RunTable(flags).exit_code == 2);

  // A key source that cannot be opened: the audit would call its objects "unknown", so it stops instead.
  flags = w.Flags();
  const std::string keyring = w.plugin.dir.File("dev.keyring");
  REQUIRE(std::rename(keyring.c_str(), (keyring + ".moved").c_str()) == 0);
  run = RunTable(flags);
  CHECK(run.exit_code == 2);
  CHECK(run.out.empty());
  CHECK(run.err.find("environment \"dev\"") != std::string::npos);
  CHECK(run.err.find("dev.keyring") != std::string::npos);
}

TEST_CASE("audit_cli: the flags parse as `kmsplugin audit` takes them, and exit codes reach the shell", "[audit]") {
  World w;
  REQUIRE_THAT(w.writer.PutV2(SecretKey("ns", "s"), SecretPayload("s")), IsOk());
  REQUIRE_THAT(w.writer.PutV2("/registry/configmaps/ns/c", SecretPayload("c")), IsOk());
  const std::string cli = std::string(KMS_BINARY_DIR) + "/tests/audit/audit_cli";
  RunResult ok = Run({cli, "--config", w.config, "--endpoints", w.etcd.endpoint(), "--prefix", "/registry/secrets/",
                      "--prefix", "/registry/configmaps", "--page-size", "1", "--timeout", "5", "--json"},
                     w.plugin.dir.path());
  INFO(ok.out << ok.err);
  CHECK(ok.exit_code == 0);
  const json report = json::parse(ok.out);
  REQUIRE(report["prefixes"].size() == 2);
  CHECK(report["prefixes"][1]["prefix"] == "/registry/configmaps/");
  CHECK(report["prefixes"][1]["objects"] == 1);

  REQUIRE_THAT(w.writer.PutJson(SecretKey("ns", "plain"), "{}"), IsOk());
  const RunResult problems = Run({cli, "--config", w.config, "--endpoints", w.etcd.endpoint()}, w.plugin.dir.path());
  CHECK(problems.exit_code == 1);
  CHECK(problems.out.find("NOT ENCRYPTED (1): ns/plain") != std::string::npos);

  const RunResult usage = Run({cli, "--page-size", "many"}, w.plugin.dir.path());
  CHECK(usage.exit_code == 2);
}

}  // namespace
}  // namespace kmsplugin::testing
