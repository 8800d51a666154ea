// Hostile files through the real binary (issue 11): what a local user who controls a file, or a damaged file,
// can and cannot make kmsplugin do. Each case reproduces an attack that worked before the fix.

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "absl/time/clock.h"
#include "crypto/random.h"
#include "kmsplugin/keysource/local/keyring.h"
#include "tests/support/daemon.h"
#include "tests/support/kms_client.h"

namespace kmsplugin::testing {
namespace {

constexpr uid_t kNobody = 65534;

bool Has(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

bool Exists(const std::string& path) {
  struct stat info {};
  return lstat(path.c_str(), &info) == 0;
}

// A local environment "dev" in a private directory, initialised.
struct Local : DaemonDriver {
  explicit Local(const std::string& extra_key_source = "") {
    keyring = dir.File("state/dev.keyring");
    root_key = dir.File("state/dev.rootkey");
    config = dir.Write("config.yaml", "http:\n  enabled: false\nserver:\n  pollInterval: 1s\nenvironments:\n"
                                      "  - name: dev\n    socket: " + dir.File("dev.sock") +
                                      "\n    keySource:\n      local:\n        keyring: " + keyring + "\n" +
                                      (extra_key_source.empty() ? "        rootKeyFile: " + root_key + "\n"
                                                                : extra_key_source));
    const RunResult init = Init();
    INFO(init.out << init.err);
    REQUIRE(init.exit_code == 0);
  }
  std::string keyring, root_key;
};

// Writes `text` to `path` through a rename, as an attacker replacing the file would.
void Replace(const std::string& path, const std::string& text) {
  const std::string temp = path + ".new";
  {
    std::ofstream out(temp, std::ios::binary | std::ios::trunc);
    out << text;
  }
  REQUIRE(chmod(temp.c_str(), 0600) == 0);
  REQUIRE(rename(temp.c_str(), path.c_str()) == 0);
}

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

TEST_CASE("Hostile files: root never loads a PKCS#11 module, nor follows a config, that another user controls",
          "[integration][hardening]") {
  if (geteuid() != 0) {
    WARN("SKIPPED: needs root (CI runs as root)");
    return;
  }
  DaemonDriver d;
  // The attacker's library, in a directory the attacker owns.
  const std::string evil_dir = d.dir.File("evil");
  std::filesystem::create_directories(evil_dir);
  const std::string module = evil_dir + "/libevil.so";
  std::filesystem::copy_file(KMS_EVIL_MODULE, module);
  const std::string marker = d.dir.File("constructor-ran");
  setenv("KMS_EVIL_MARKER", marker.c_str(), 1);
  const std::string pin = d.dir.Write("user.pin", "1234\n");
  auto write_config = [&](const std::string& module_path) {
    std::filesystem::remove(d.dir.File("config.yaml"));  // a fresh file: root's again
    d.config = d.dir.Write("config.yaml", "http:\n  enabled: false\nenvironments:\n  - name: hsm\n    socket: " + d.dir.File("hsm.sock") +
                                          "\n    keySource:\n      pkcs11:\n        module: " + module_path +
                                          "\n        tokenLabel: kms\n        pinFile: " + pin + "\n");
  };

  // 1. The service user owns the config (the old RUNBOOK's model) and points module: at its own library.
  write_config(module);
  REQUIRE(chown(d.config.c_str(), kNobody, kNobody) == 0);
  RunResult keys = d.Cli({"keys", "--config", d.config, "--env", "hsm"});
  CHECK(keys.exit_code != 0);
  CHECK(Has(keys.err, "config file " + d.config + " is owned by nobody (uid 65534)"));
  CHECK(!Exists(marker));

  // 2. A root-owned config naming a module the attacker owns, or one in a directory the attacker can write.
  write_config(module);
  REQUIRE(chown(module.c_str(), kNobody, kNobody) == 0);
  keys = d.Cli({"keys", "--config", d.config, "--env", "hsm"});
  CHECK(keys.exit_code != 0);
  CHECK(Has(keys.err, "PKCS#11 module " + module + " is owned by nobody"));
  CHECK(!Exists(marker));
  REQUIRE(chown(module.c_str(), 0, 0) == 0);
  REQUIRE(chown(evil_dir.c_str(), kNobody, kNobody) == 0);
  keys = d.Cli({"keys", "--config", d.config, "--env", "hsm"});
  CHECK(Has(keys.err, "the directory " + evil_dir + " on the way to PKCS#11 module"));
  CHECK(!Exists(marker));
  REQUIRE(chown(evil_dir.c_str(), 0, 0) == 0);
  REQUIRE(chmod(module.c_str(), 0666) == 0);
  keys = d.Cli({"keys", "--config", d.config, "--env", "hsm"});
  CHECK(Has(keys.err, "can be written by group or others (mode 0666)"));
  CHECK(!Exists(marker));

  // The same through serve: the environment serves unhealthy, the module never runs.
  auto server = d.Serve();
  CHECK(DaemonDriver::WaitServing(*server, d.dir.File("hsm.sock")));
  CHECK(Has(DaemonDriver::Status(d.dir.File("hsm.sock")).healthz(), "can be written by group or others"));
  server->Signal(SIGTERM);
  CHECK(server->Wait() == std::optional<int>(0));
  CHECK(!Exists(marker));

  // Control: the same library, root's and not writable by others, is loaded (and refused as no PKCS#11 module),
  // which proves the checks above are what kept it out.
  REQUIRE(chmod(module.c_str(), 0755) == 0);
  keys = d.Cli({"keys", "--config", d.config, "--env", "hsm"});
  CHECK(keys.exit_code != 0);
  CHECK(Exists(marker));
  unsetenv("KMS_EVIL_MARKER");
}

TEST_CASE("Hostile files: a keyring nested 100,000 deep is refused by keys and by a serving daemon's poll",
          "[integration][hardening]") {
  Local l;
  auto server = l.Serve();
  REQUIRE(DaemonDriver::WaitServing(*server, l.dir.File("dev.sock")));
  const std::string key_id = DaemonDriver::Status(l.dir.File("dev.sock")).key_id();
  // The real keyring with one more member nested 100,000 deep: rootKeyCheck is in clear and still matches, so
  // no key is needed, and before the fix the MAC check's serialiser overflowed the stack (keys exited 139).
  std::string deep = ReadAll(l.keyring);
  while (!deep.empty() && deep.back() != '}') {
    deep.pop_back();
  }
  REQUIRE(!deep.empty());
  deep.pop_back();
  deep += ",\"x\":" + std::string(100000, '[') + std::string(100000, ']') + "}";
  Replace(l.keyring, deep);
  const RunResult keys = l.Cli({"keys", "--config", l.config, "--env", "dev"});
  CHECK(keys.exit_code == 1);  // a refusal, not a crash (a signal would be 128+)
  CHECK(Has(keys.err, "nests deeper than 64 levels"));
  CHECK(Has(keys.err, "restore it from a backup"));
  server->Signal(SIGHUP);  // and the poll every second
  absl::SleepFor(absl::Seconds(2));
  CHECK(server->Running());
  CHECK(DaemonDriver::Status(l.dir.File("dev.sock")).key_id() == key_id);
  CHECK(Has(server->Stderr(), "nests deeper than 64 levels"));
  server->Signal(SIGTERM);
  CHECK(server->Wait() == std::optional<int>(0));
}

TEST_CASE("Hostile files: forged Argon2 parameters are refused before any derivation", "[integration][hardening]") {
  TempDir scratch;
  const std::string passphrase = scratch.Write("pass", "correct horse battery staple\n");
  Local l("        passphraseFile: " + passphrase + "\n");
  nlohmann::json doc = nlohmann::json::parse(ReadAll(l.keyring));
  for (const auto& [field, value] : {std::pair<const char*, uint64_t>{"opsLimit", 4294967295ULL},
                                     std::pair<const char*, uint64_t>{"memLimit", uint64_t{64} << 30}}) {
    nlohmann::json forged = doc;
    forged["rootKey"][field] = value;
    Replace(l.keyring, forged.dump(2));
    const absl::Time start = absl::Now();
    const RunResult keys = l.Cli({"keys", "--config", l.config, "--env", "dev"});
    CHECK(absl::Now() - start < absl::Seconds(5));  // before: burned CPU for ever
    CHECK(keys.exit_code == 1);
    CHECK(Has(keys.err, "passphrase parameters out of range"));
    CHECK(Has(keys.err, field));
  }
  // A daemon with such a keyring starts at once, serves the environment unhealthy, and stops on SIGTERM.
  const absl::Time start = absl::Now();
  auto server = l.Serve();
  REQUIRE(DaemonDriver::WaitServing(*server, l.dir.File("dev.sock")));
  CHECK(Has(DaemonDriver::Status(l.dir.File("dev.sock")).healthz(), "passphrase parameters out of range"));
  server->Signal(SIGTERM);
  CHECK(server->Wait(std::chrono::seconds(10)) == std::optional<int>(0));
  CHECK(absl::Now() - start < absl::Seconds(10));
}

TEST_CASE("Hostile files: rotate never writes a keyring larger than the reader accepts", "[integration][hardening]") {
  Local l;
  // Grow the keyring to just under the 1 MiB read limit directly (thousands of `rotate` runs would take minutes).
  auto root_key = keysource::local::ReadRootKeyFile(l.root_key);
  REQUIRE(root_key.ok());
  const std::string original = ReadAll(l.keyring);
  const absl::Time start = absl::Now() - absl::Hours(24 * 365);
  // The sealed keyring with `extra` more versions (a Keyring holds key material and is not copyable: re-open).
  auto sealed_with = [&](size_t extra) {
    auto keyring = keysource::local::OpenKeyring(original, *root_key, l.keyring);
    REQUIRE(keyring.ok());
    for (size_t i = 0; i < extra; ++i) {
      keysource::local::AppendVersion(*keyring, start + absl::Seconds(static_cast<int64_t>(i)),
                                      crypto::SystemRandom());
    }
    auto sealed = keysource::local::SealKeyring(*keyring, *root_key, crypto::SystemRandom());
    REQUIRE(sealed.ok());
    return *sealed;
  };
  const size_t at_100 = sealed_with(100).size();
  const size_t per_version = (sealed_with(200).size() - at_100) / 100;
  size_t extra = 100 + (keysource::kMaxKeyFileBytes - 3 * per_version - at_100) / per_version;
  std::string sealed = sealed_with(extra);
  while (sealed.size() + 2 * per_version > keysource::kMaxKeyFileBytes) {
    extra -= 1;
    sealed = sealed_with(extra);
  }
  const size_t versions = extra + 1;
  Replace(l.keyring, sealed);
  INFO(versions << " versions, " << sealed.size() << " bytes");
  REQUIRE(l.Cli({"keys", "--config", l.config, "--env", "dev"}).exit_code == 0);
  RunResult rotate;
  for (int i = 0; i < 20; ++i) {
    rotate = l.Rotate("dev");
    if (rotate.exit_code != 0) {
      break;
    }
  }
  CHECK(rotate.exit_code != 0);
  CHECK(Has(rotate.err, "past the 1048576 bytes that are read back; nothing was written"));
  // Everything still reads: keys, and a daemon.
  const RunResult keys = l.Cli({"keys", "--config", l.config, "--env", "dev", "--json"});
  REQUIRE(keys.exit_code == 0);
  auto server = l.Serve();
  CHECK(DaemonDriver::WaitServing(*server, l.dir.File("dev.sock")));
  CHECK(DaemonDriver::Status(l.dir.File("dev.sock")).healthz() == "ok");
}

TEST_CASE("Hostile files: temporaries a killed writer left are wiped by the next writer, links are not touched",
          "[integration][hardening]") {
  Local l;
  // What a SIGKILLed init or rotate leaves: <file>.tmp-XXXXXX, one holding a root key that was never used.
  const std::string stale_key = l.root_key + ".tmp-AbC123";
  const std::string stale_ring = l.keyring + ".tmp-XyZ789";
  const std::string young = l.keyring + ".tmp-Young1";
  Replace(stale_key, std::string(32, 'K'));
  Replace(stale_ring, "partial keyring");
  Replace(young, "a writer may still be at it");
  // A temporary-looking hard link to the real keyring: zeroing it would zero the keyring itself.
  const std::string linked = l.keyring + ".tmp-L1nked";
  REQUIRE(link(l.keyring.c_str(), linked.c_str()) == 0);
  const struct timespec hour_ago[2] = {{absl::ToUnixSeconds(absl::Now()) - 3600, 0},
                                       {absl::ToUnixSeconds(absl::Now()) - 3600, 0}};
  for (const std::string& f : {stale_key, stale_ring, linked}) {
    REQUIRE(utimensat(AT_FDCWD, f.c_str(), hour_ago, 0) == 0);
  }
  const int held = open(stale_key.c_str(), O_RDONLY);  // to see what the removal left in the file
  REQUIRE(held >= 0);
  const std::string keyring_before = ReadAll(l.keyring);
  REQUIRE(l.Init().exit_code == 0);       // init: "already initialised", and it cleans up first
  REQUIRE(l.Rotate("dev").exit_code == 0);  // rotate cleans up under its lock
  CHECK(!Exists(stale_key));
  CHECK(!Exists(stale_ring));
  CHECK(Exists(young));
  CHECK(Exists(linked));
  char bytes[32];
  REQUIRE(pread(held, bytes, sizeof(bytes), 0) == 32);
  close(held);
  CHECK(std::string(bytes, sizeof(bytes)) == std::string(32, '\0'));  // zeroed before it was unlinked
  CHECK(ReadAll(linked) == keyring_before);                           // the link to the old keyring, intact
  std::filesystem::remove(linked);
  CHECK(l.Cli({"keys", "--config", l.config, "--env", "dev"}).exit_code == 0);
}

}  // namespace
}  // namespace kmsplugin::testing
