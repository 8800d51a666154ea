// `kmsplugin audit --decrypt`, `audit --snapshot` and `retire --verify` against a real etcd (Debian etcd-server)
// filled by ApiserverWriter through real in-process kmsplugin servers.

#include <signal.h>
#include <stdlib.h>

#include <chrono>
#include <filesystem>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "encrypted_object.pb.h"
#include "kmsplugin/audit/audit_command.h"
#include "kmsplugin/audit/snapshot_etcd.h"
#include "kmsplugin/keysource/local/local_spec.h"
#include "tests/audit/apiserver_writer.h"
#include "tests/audit/etcd_fixture.h"
#include "tests/server/server_fixture.h"
#include "tests/support/status_matchers.h"
#include "tests/support/subprocess.h"
#include "tests/support/temp_dir.h"

namespace kmsplugin::testing {
namespace {

using nlohmann::json;

config::KeySourceParsers Parsers() { return {{"local", keysource::local::ParseSpec}}; }

std::string SecretKey(const std::string& ns, const std::string& name) {
  return absl::StrCat("/registry/secrets/", ns, "/", name);
}

// Entries of `dir` (names), "." and ".." left out.
std::vector<std::string> Entries(const std::string& dir) {
  std::vector<std::string> names;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
    names.push_back(entry.path().filename().string());
  }
  return names;
}

// Sets TMPDIR for the scope (the snapshot's private directory goes there; children inherit it).
class ScopedTmpdir {
 public:
  explicit ScopedTmpdir(const std::string& dir) {
    const char* old = getenv("TMPDIR");
    if (old != nullptr) {
      old_ = old;
    }
    setenv("TMPDIR", dir.c_str(), 1);
  }
  ~ScopedTmpdir() {
    if (old_.has_value()) {
      setenv("TMPDIR", old_->c_str(), 1);
    } else {
      unsetenv("TMPDIR");
    }
  }

 private:
  std::optional<std::string> old_;
};

// Environment "dev" (a kmsplugin server), an etcd, a writer and a config naming dev's keyring.
struct World {
  World() : writer(etcd.endpoint(), *plugin.client) {
    config = plugin.dir.Write(
        "config.yaml", absl::StrCat("environments:\n  - name: dev\n    socket: ", plugin.socket,
                                    "\n    keySource:\n      local:\n        keyring: ", plugin.dir.File("dev.keyring"),
                                    "\n        rootKeyFile: ", plugin.dir.File("dev.rootkey"), "\n"));
    REQUIRE_THAT(writer.NewSeed(), IsOk());
  }

  audit::AuditFlags Flags() const {
    audit::AuditFlags flags;
    flags.config_path = config;
    flags.endpoints = etcd.endpoint();
    flags.timeout_seconds = 5;
    flags.decrypt = true;
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

AuditRun RunAudit(audit::AuditFlags flags, bool as_json = true) {
  flags.json = as_json;
  std::ostringstream out, err;
  AuditRun run;
  run.exit_code = audit::RunAudit(flags, Parsers(), out, err);
  run.out = out.str();
  run.err = err.str();
  if (as_json && run.exit_code != 2 && run.exit_code != 3) {
    INFO(run.out << run.err);
    REQUIRE_NOTHROW(run.report = json::parse(run.out));
  }
  return run;
}

// Fills etcd as a cluster's life does: three apiserver starts (three seeds), a KEK rotation with a fourth seed,
// KMS v1 leftovers, an aescbc object. Returns the number of KMS objects.
int FillLikeAClusterLife(World& w) {
  int kms = 0;
  for (int seed = 0; seed < 3; ++seed) {
    if (seed > 0) {
      REQUIRE_THAT(w.writer.NewSeed(), IsOk());
    }
    for (int i = 0; i < 10; ++i) {
      const std::string name = absl::StrCat("seed", seed, "-", i);
      REQUIRE_THAT(w.writer.PutV2(SecretKey("ns", name), SecretPayload(name)), IsOk());
      ++kms;
    }
  }
  for (int i = 0; i < 3; ++i) {
    const std::string name = absl::StrCat("v1-", i);
    REQUIRE_THAT(w.writer.PutV1(SecretKey("legacy", name), SecretPayload(name)), IsOk());
    ++kms;
  }
  REQUIRE_THAT(w.plugin.source->Rotate(absl::Now() + absl::Seconds(5)), IsOk());
  w.plugin.runner->RequestRefresh();
  REQUIRE_THAT(w.plugin.source->Refresh(absl::Now() + absl::Seconds(5)), IsOk());
  REQUIRE_THAT(w.writer.NewSeed(), IsOk());
  for (int i = 0; i < 5; ++i) {
    const std::string name = absl::StrCat("rotated-", i);
    REQUIRE_THAT(w.writer.PutV2(SecretKey("ns", name), SecretPayload(name)), IsOk());
    ++kms;
  }
  REQUIRE_THAT(w.writer.Put(SecretKey("static", "cbc"), "k8s:enc:aescbc:v1:key1:0123456789abcdef0123456789abcdef"),
               IsOk());
  return kms;
}

TEST_CASE("Audit --decrypt: everything kube-apiserver wrote decrypts, exit 0", "[audit][decrypt]") {
  World w;
  const int kms = FillLikeAClusterLife(w);
  const AuditRun run = RunAudit(w.Flags());
  INFO(run.out << run.err);
  CHECK(run.exit_code == 0);
  CHECK(run.report["decryptChecked"] == true);
  const json& p = run.report["prefixes"][0];
  CHECK(p["decrypt"]["decrypts"] == kms);
  CHECK(p["decrypt"]["fails"] == 0);
  CHECK(p["decrypt"]["notCheckable"] == 1);
  CHECK(p["decrypt"]["failures"].empty());
  uint64_t group_decrypts = 0;
  for (const json& g : p["groups"]) {
    group_decrypts += g["decrypts"].get<uint64_t>();
  }
  CHECK(group_decrypts == static_cast<uint64_t>(kms));

  const AuditRun table = RunAudit(w.Flags(), false);
  CHECK(table.exit_code == 0);
  CHECK(table.out.find(absl::StrCat("DECRYPT: ", kms, " of ", kms, " KMS object(s) decrypt; 1 not checkable")) !=
        std::string::npos);
  CHECK(table.out.find("every KMS object decrypts") != std::string::npos);

  // Without --config there are no keys to decrypt with: a usage error.
  audit::AuditFlags no_config = w.Flags();
  no_config.config_path.clear();
  const AuditRun usage = RunAudit(no_config);
  CHECK(usage.exit_code == 2);
  CHECK(usage.err.find("--decrypt needs --config") != std::string::npos);
}

// A tampered object, one under a retired version, and one from another environment; each named with its reason.
struct BrokenWorld : World {
  BrokenWorld() {
    // Under version 1, then rotate and retire version 1 (as `retire --force` would leave it).
    REQUIRE_THAT(writer.PutV2(SecretKey("ns", "old"), SecretPayload("old")), IsOk());
    REQUIRE_THAT(plugin.source->Rotate(absl::Now() + absl::Seconds(5)), IsOk());
    plugin.runner->RequestRefresh();
    REQUIRE_THAT(plugin.source->Refresh(absl::Now() + absl::Seconds(5)), IsOk());
    REQUIRE_THAT(writer.NewSeed(), IsOk());
    for (int i = 0; i < 5; ++i) {
      const std::string name = absl::StrCat("good-", i);
      REQUIRE_THAT(writer.PutV2(SecretKey("ns", name), SecretPayload(name)), IsOk());
    }
    REQUIRE_THAT(plugin.source->Retire(1, absl::Now() + absl::Seconds(5)), IsOk());
    // Tampered: one ciphertext bit flipped in a stored object.
    REQUIRE_THAT(writer.PutV2(SecretKey("ns", "tampered"), SecretPayload("tampered")), IsOk());
    auto stored = writer.Get(SecretKey("ns", "tampered"));
    REQUIRE_THAT(stored, IsOk());
    const std::string prefix = "k8s:enc:kms:v2:kmsplugin-dev:";
    kmsplugin::etcd::EncryptedObject object;
    REQUIRE(object.ParseFromString(stored->substr(prefix.size())));
    std::string data = object.encrypteddata();
    data[data.size() - 20] ^= 0x01;
    object.set_encrypteddata(data);
    REQUIRE_THAT(writer.Put(SecretKey("ns", "tampered"), prefix + object.SerializeAsString()), IsOk());
    // Another environment ("staging", its own plugin and keyring) wrote into the same etcd.
    ApiserverWriter staging_writer(etcd.endpoint(), *staging.client, "kmsplugin-staging");
    REQUIRE_THAT(staging_writer.NewSeed(), IsOk());
    REQUIRE_THAT(staging_writer.PutV2(SecretKey("ns", "staging"), SecretPayload("staging")), IsOk());
  }
  ServerFixture staging{{}, "staging"};
};

void CheckBrokenReport(const json& report) {
  const json& p = report["prefixes"][0];
  CHECK(p["decrypt"]["decrypts"] == 5);
  CHECK(p["decrypt"]["fails"] == 3);
  std::map<std::string, std::string> reasons;
  for (const json& f : p["decrypt"]["failures"]) {
    reasons[f["name"].get<std::string>()] = f["reason"].get<std::string>();
  }
  REQUIRE(reasons.size() == 3);
  INFO(report.dump(2));
  CHECK(reasons["ns/tampered"].find("does not authenticate under its DEK") != std::string::npos);
  CHECK(reasons["ns/old"].find("key version 1 is retired") != std::string::npos);
  CHECK(reasons["ns/staging"].find("environment \"staging\", which the config does not have") != std::string::npos);
  // The classification agrees where it can see it: retired and unknown key_ids; the tampered one only decryption
  // finds.
  CHECK(p["retiredKeyNames"] == json({"ns/old"}));
  CHECK(p["unknownKeyIdNames"] == json({"ns/staging"}));
  CHECK(p["problems"] == 3);
}

TEST_CASE("Audit --decrypt: a tampered object, a retired version and another environment, each with its reason",
          "[audit][decrypt]") {
  BrokenWorld w;
  const AuditRun run = RunAudit(w.Flags());
  INFO(run.out << run.err);
  CHECK(run.exit_code == 1);
  CheckBrokenReport(run.report);
  const AuditRun table = RunAudit(w.Flags(), false);
  CHECK(table.exit_code == 1);
  CHECK(table.out.find("DOES NOT DECRYPT (3):") != std::string::npos);
  CHECK(table.out.find("    ns/tampered: the data does not authenticate") != std::string::npos);
  // Without --decrypt the tampered object passes: only decrypting finds it.
  audit::AuditFlags plain = w.Flags();
  plain.decrypt = false;
  const AuditRun classified = RunAudit(plain);
  CHECK(classified.report["prefixes"][0]["problems"] == 2);
  CHECK(classified.report["prefixes"][0].count("decrypt") == 0);
}

// `etcdctl snapshot save` of the fixture's etcd.
std::string SaveSnapshot(World& w, const TempDir& dir) {
  const std::string file = dir.File("backup.db");
  const RunResult saved =
      Run({"/usr/bin/etcdctl", "--endpoints", w.etcd.endpoint(), "snapshot", "save", file}, dir.path());
  INFO(saved.out << saved.err);
  REQUIRE(saved.exit_code == 0);
  return file;
}

TEST_CASE("Audit --snapshot: a backup audits as the live etcd did, and nothing is left behind", "[audit][decrypt]") {
  BrokenWorld w;
  TempDir dir;
  const std::string backup = SaveSnapshot(w, dir);
  const AuditRun live = RunAudit(w.Flags());
  TempDir tmp;
  ScopedTmpdir scoped(tmp.path());

  audit::AuditFlags flags = w.Flags();
  flags.endpoints = "127.0.0.1:1";  // the live etcd is not used
  flags.snapshot = backup;
  const AuditRun restored = RunAudit(flags);
  INFO(restored.out << restored.err);
  CHECK(restored.exit_code == 1);
  CheckBrokenReport(restored.report);
  CHECK(restored.report["endpoint"] == "snapshot " + backup);
  CHECK(restored.report["prefixes"] == live.report["prefixes"]);
  CHECK(Entries(tmp.path()).empty());

  // Classification only, and a table.
  flags.decrypt = false;
  const AuditRun classified = RunAudit(flags, false);
  CHECK(classified.exit_code == 1);
  CHECK(classified.out.find("etcd snapshot " + backup) != std::string::npos);
  CHECK(Entries(tmp.path()).empty());

  // Not a snapshot, and a missing file: usage errors naming the problem, nothing left behind.
  flags.snapshot = dir.Write("garbage.db", std::string(4096, 'x'));
  const AuditRun garbage = RunAudit(flags);
  CHECK(garbage.exit_code == 2);
  CHECK(garbage.err.find("snapshot restore") != std::string::npos);
  flags.snapshot = dir.File("missing.db");
  const AuditRun missing = RunAudit(flags);
  CHECK(missing.exit_code == 2);
  CHECK(missing.err.find("cannot be read") != std::string::npos);
  CHECK(Entries(tmp.path()).empty());
}

TEST_CASE("Audit --snapshot: SIGTERM and SIGINT stop the private etcd and remove its directory", "[audit][decrypt]") {
  World w;
  // Enough objects, read one per page, that the audit is still running when the signal comes.
  for (int i = 0; i < 1500; ++i) {
    REQUIRE_THAT(w.writer.PutV2(SecretKey("ns", absl::StrCat("s", i)), "x"), IsOk());
  }
  TempDir dir;
  const std::string backup = SaveSnapshot(w, dir);
  for (int signal : {SIGTERM, SIGINT}) {
    TempDir tmp;
    ScopedTmpdir scoped(tmp.path());
    Subprocess audit({std::string(KMS_BINARY_DIR) + "/tests/audit/audit_cli", "--config", w.config, "--snapshot",
                      backup, "--decrypt", "--page-size", "1"},
                     dir.path());
    // Wait until the private etcd serves (its log exists and the audit has not finished).
    std::string private_dir;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (std::chrono::steady_clock::now() < deadline && private_dir.empty()) {
      for (const std::string& name : Entries(tmp.path())) {
        if (std::filesystem::exists(tmp.File(name + "/data/member"))) {
          private_dir = tmp.File(name);
        }
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    REQUIRE_FALSE(private_dir.empty());
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    {
      INFO("the audit ended before the signal: " << audit.Stdout() << audit.Stderr());
      REQUIRE(audit.Running());
    }
    audit.Signal(signal);
    const std::optional<int> code = audit.Wait(std::chrono::seconds(30));
    INFO(audit.Stdout() << audit.Stderr());
    REQUIRE(code.has_value());
    CHECK(*code == 128 + signal);
    CHECK_FALSE(std::filesystem::exists(private_dir));
    CHECK(Entries(tmp.path()).empty());
    // No etcd serving that data dir survives.
    const RunResult etcds = Run({"/usr/bin/pgrep", "-f", "--", "--data-dir=" + private_dir}, dir.path());
    CHECK(etcds.out.empty());
  }
}

TEST_CASE("Retire --verify: refused while an object would not decrypt, allowed once all do",
          "[audit][decrypt][retire]") {
  World w;
  const std::string cli = std::string(KMS_BINARY_DIR) + "/kmsplugin/cli/kmsplugin";
  const auto retire = [&](std::vector<std::string> extra) {
    std::vector<std::string> argv = {
        cli,         "retire", "--config",       w.config,      "--env",           "dev",
        "--version", "1",      "--allow-recent", "--endpoints", w.etcd.endpoint(), "--verify"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    RunResult result = Run(argv, w.plugin.dir.path());
    w.plugin.runner->RequestRefresh();
    REQUIRE_THAT(w.plugin.source->Refresh(absl::Now() + absl::Seconds(5)), IsOk());
    return result;
  };
  REQUIRE_THAT(w.plugin.source->Rotate(absl::Now() + absl::Seconds(5)), IsOk());
  w.plugin.runner->RequestRefresh();
  REQUIRE_THAT(w.plugin.source->Refresh(absl::Now() + absl::Seconds(5)), IsOk());
  REQUIRE_THAT(w.writer.NewSeed(), IsOk());
  for (int i = 0; i < 4; ++i) {
    REQUIRE_THAT(w.writer.PutV2(SecretKey("ns", absl::StrCat("s", i)), SecretPayload(absl::StrCat("s", i))), IsOk());
  }
  auto current_value = w.writer.Get(SecretKey("ns", "s0"));
  REQUIRE_THAT(current_value, IsOk());

  RunResult ok = retire({});
  INFO(ok.out << ok.err);
  CHECK(ok.exit_code == 0);
  CHECK(ok.out.find("object(s) decrypt without versions 1, 0 do not") != std::string::npos);
  CHECK(ok.out.find("retired versions 1") != std::string::npos);

  // Reinstate, tamper with one object: --verify refuses and names it; without --verify the count alone passes.
  RunResult reinstated =
      Run({cli, "retire", "--config", w.config, "--env", "dev", "--version", "1", "--reinstate"}, w.plugin.dir.path());
  REQUIRE(reinstated.exit_code == 0);
  kmsplugin::etcd::EncryptedObject object;
  const std::string prefix = "k8s:enc:kms:v2:kmsplugin-dev:";
  REQUIRE(object.ParseFromString(current_value->substr(prefix.size())));
  std::string data = object.encrypteddata();
  data[40] ^= 0x01;
  object.set_encrypteddata(data);
  REQUIRE_THAT(w.writer.Put(SecretKey("ns", "s0"), prefix + object.SerializeAsString()), IsOk());
  RunResult refused = retire({});
  INFO(refused.out << refused.err);
  CHECK(refused.exit_code == 1);
  CHECK(refused.err.find("--verify decrypted every object in etcd and 1 would not decrypt") != std::string::npos);
  CHECK(refused.err.find("/registry/secrets/ns/s0: the data does not authenticate") != std::string::npos);
  auto versions = w.plugin.source->Versions();
  REQUIRE_THAT(versions, IsOk());
  CHECK((*versions)[0].state == core::KeyState::kActive);
  // --verify and --force do not go together.
  RunResult both = retire({"--force"});
  CHECK(both.exit_code == 2);
}

}  // namespace
}  // namespace kmsplugin::testing
