// The pkcs11 key source end to end: the real `kmsplugin` binary (init, serve, rotate, keys) on SoftHSM2 tokens made
// by SoftHsmHarness, called over real gRPC on Unix sockets with both KMS APIs. The harness points SOFTHSM2_CONF at
// a private token directory; the daemon and the CLI inherit it.

#include <signal.h>
#include <sys/stat.h>

#include <atomic>
#include <mutex>
#include <regex>
#include <set>
#include <thread>

#include <nlohmann/json.hpp>
#include <catch2/catch.hpp>

#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "crypto/envelope_format.h"
#include "tests/integration/serve_scenarios.h"
#include "tests/support/daemon.h"
#include "tests/support/kms_client.h"
#include "tests/support/rotation_load.h"
#include "tests/support/softhsm_harness.h"
#include "tests/support/subprocess.h"
#include "tests/support/temp_dir.h"

namespace kmsplugin::testing {
namespace {

const std::string kBinary = DaemonDriver::Binary();
constexpr char kPin[] = "1234";

bool Has(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// "pkcs11:<serial>/<keyLabel>-v<N>@<created>" -> N (0 when the key_id has another shape).
unsigned long VersionOf(const std::string& key_id) {
  static const std::regex shape(R"(-v([0-9]+)@)");
  std::smatch m;
  return std::regex_search(key_id, m, shape) ? std::stoul(m[1].str()) : 0;
}

// One or two SoftHSM tokens and a config whose environments use them; the daemon and CLI are the real binary.
struct P11Env {
  P11Env(std::string n, std::string t, std::string k, bool s = false)
      : name(std::move(n)), token(std::move(t)), key_label(std::move(k)), shared(s) {}
  std::string name, token, key_label;
  bool shared;  // allowSharedBackendKey: true
};

struct Hsm : DaemonDriver {
  using Env = P11Env;

  explicit Hsm(std::vector<std::string> tokens = {"kms"}) {
    for (const std::string& label : tokens) {
      serials[label] = hsm.InitToken(label, kPin);
    }
    pin_file = dir.Write("user.pin", std::string(kPin) + "\n");
  }
  std::string Socket(const std::string& env) const { return dir.File(env + ".sock"); }

  // Writes config.yaml for `envs` (default: one environment "test" on token "kms").
  void Configure(std::vector<Env> envs = {{"test", "kms", "kmsplugin-test"}},
                 const std::string& server = "  pollInterval: 1h\n", const std::string& pin = "") {
    std::string yaml = "http:\n  listen: 127.0.0.1:0\nserver:\n" + server + "environments:\n";
    for (const Env& e : envs) {
      yaml += "  - name: " + e.name + "\n    socket: " + Socket(e.name) + "\n" +
              (e.shared ? "    allowSharedBackendKey: true\n" : "") +
              "    keySource:\n      pkcs11:\n        module: " + kSoftHsmModule + "\n        tokenLabel: " + e.token +
              "\n        pinFile: " + (pin.empty() ? pin_file : pin) + "\n        keyLabel: " + e.key_label + "\n";
    }
    config = dir.Write("config.yaml", yaml);
  }
  // Secret key objects on token `label`, as pkcs11-tool lists them.
  std::string TokenObjects(const std::string& label = "kms") {
    return hsm.Run(std::string("pkcs11-tool --module ") + kSoftHsmModule + " --token-label " + label +
                   " --login --pin " + kPin + " --list-objects --type secrkey");
  }

  RunResult Rotate(const std::string& env = "test") const { return DaemonDriver::Rotate(env); }

  SoftHsmHarness hsm;
  std::map<std::string, std::string> serials;
  std::string pin_file;
};

TEST_CASE("PKCS#11 serve: init creates version 1 in the token, a second init leaves it, both APIs round-trip",
          "[pkcs11][serve]") {
  Hsm h;
  h.Configure();
  const RunResult first = h.Init();
  INFO(first.out << first.err);
  REQUIRE(first.exit_code == 0);
  std::string objects = h.TokenObjects();
  CHECK(Has(objects, "kmsplugin-test-v1"));
  const RunResult second = h.Init();
  CHECK(second.exit_code == 0);
  CHECK(Has(second.out, "left untouched"));
  objects = h.TokenObjects();
  CHECK(!Has(objects, "kmsplugin-test-v2"));

  auto server = h.Serve();
  REQUIRE(h.WaitServing(*server, h.Socket("test")));
  const v2::StatusResponse status = h.Status(h.Socket("test"));
  CHECK(VersionOf(status.key_id()) == 1);
  CHECK(Has(status.key_id(), h.serials["kms"]));
  ScenarioRoundTripBothApis(h.Socket("test"));
  server->Signal(SIGTERM);
  CHECK(server->Wait(std::chrono::seconds(15)) == std::optional<int>(0));
  CHECK(!Has(server->Stderr(), kPin + std::string("\n")));
}

TEST_CASE("PKCS#11 serve: before init the daemon serves unhealthy and says to run init, then recovers on SIGHUP",
          "[pkcs11][serve][bad-input]") {
  Hsm h;
  h.Configure();
  auto server = h.Serve();
  const std::string socket = h.Socket("test");
  REQUIRE(h.WaitServing(*server, socket));
  const v2::StatusResponse status = h.Status(socket);
  CHECK(status.healthz() != "ok");
  CHECK(Has(status.healthz(), "kmsplugin init"));
  CHECK(Has(status.healthz(), "kmsplugin-test-v"));
  KmsClient client(socket);
  v2::EncryptResponse encrypted;
  const grpc::Status refused = client.Encrypt(std::string(32, 'z'), encrypted);
  INFO(refused.error_code() << " " << refused.error_message());
  CHECK(refused.error_code() == grpc::StatusCode::FAILED_PRECONDITION);
  CHECK(Has(refused.error_message(), "kmsplugin init"));
  CHECK(encrypted.ciphertext().empty());
  // init while serving, then SIGHUP: healthy without a restart.
  REQUIRE(h.Init().exit_code == 0);
  server->Signal(SIGHUP);
  std::string healthz;
  for (int i = 0; i < 100 && healthz != "ok"; ++i) {
    absl::SleepFor(absl::Milliseconds(20));
    healthz = h.Status(socket).healthz();
  }
  CHECK(healthz == "ok");
  REQUIRE(client.Encrypt(std::string(32, 'z'), encrypted).ok());
  CHECK(VersionOf(encrypted.key_id()) == 1);
}

TEST_CASE("PKCS#11 serve: rotate then SIGHUP changes the Status key_id at once, old ciphertexts keep decrypting",
          "[pkcs11][serve][rotation]") {
  Hsm h;
  h.Configure();
  REQUIRE(h.Init().exit_code == 0);
  auto server = h.Serve();
  REQUIRE(h.WaitServing(*server, h.Socket("test")));
  ScenarioRotateThenHup(h, *server, "test", h.Socket("test"), VersionOf);
}

TEST_CASE("PKCS#11 keys: an unknown environment is refused, listing the ones there are", "[pkcs11][bad-input]") {
  Hsm h;
  h.Configure();
  REQUIRE(h.Init().exit_code == 0);
  const RunResult result = h.Cli({"keys", "--config", h.config, "--env", "prod"});
  CHECK(result.exit_code != 0);
  CHECK(Has(result.err, "no environment named \"prod\""));
  CHECK(Has(result.err, "test"));
}

TEST_CASE("PKCS#11 serve: rotation under load keeps Status and Encrypt in agreement, with zero failed decrypts",
          "[pkcs11][serve][rotation]") {
  Hsm h;
  h.Configure();
  REQUIRE(h.Init().exit_code == 0);
  auto server = h.Serve();
  const std::string socket = h.Socket("test");
  REQUIRE(h.WaitServing(*server, socket));
  ScenarioRotationUnderLoad(h, *server, "test", socket, VersionOf, /*writers=*/4, absl::Milliseconds(200),
                            /*min_rounds=*/10);
}

TEST_CASE("PKCS#11 serve: 32 concurrent client streams finish with zero failed calls", "[pkcs11][serve][load]") {
  Hsm h;
  h.Configure();
  REQUIRE(h.Init().exit_code == 0);
  auto server = h.Serve();
  const std::string socket = h.Socket("test");
  REQUIRE(h.WaitServing(*server, socket));
  ScenarioConcurrentStreams(socket, /*streams=*/32, /*rounds=*/25);
  CHECK(!Has(server->Stderr(), "CKR_OPERATION_ACTIVE"));
  CHECK(!Has(server->Stderr(), "\"level\":\"error\""));
}

TEST_CASE("PKCS#11 serve: the token directory moved away makes calls UNAVAILABLE and Status unhealthy, and the "
          "daemon recovers by itself when it is back",
          "[pkcs11][serve][fault]") {
  Hsm h;
  h.Configure({{"test", "kms", "kmsplugin-test"}}, "  pollInterval: 1s\n");
  REQUIRE(h.Init().exit_code == 0);
  auto server = h.Serve();
  const std::string socket = h.Socket("test");
  REQUIRE(h.WaitServing(*server, socket));
  KmsClient client(socket);
  v2::EncryptResponse before;
  REQUIRE(client.Encrypt(std::string(32, 'm'), before).ok());
  const std::string moved = h.hsm.dir() + "/tokens.away";
  REQUIRE(std::rename(h.hsm.token_dir().c_str(), moved.c_str()) == 0);
  v2::EncryptResponse encrypted;
  const grpc::Status down = client.Encrypt(std::string(32, 'm'), encrypted);
  INFO(down.error_code() << " " << down.error_message());
  CHECK(down.error_code() == grpc::StatusCode::UNAVAILABLE);
  CHECK(Has(down.error_message(), "kms"));
  std::string healthz = "ok";
  for (int i = 0; i < 60 && healthz == "ok"; ++i) {
    absl::SleepFor(absl::Milliseconds(100));
    healthz = h.Status(socket).healthz();
  }
  CHECK(healthz != "ok");
  CHECK(h.Status(socket).key_id() == before.key_id());  // the known versions stay in force
  REQUIRE(std::rename(moved.c_str(), h.hsm.token_dir().c_str()) == 0);
  for (int i = 0; i < 60 && healthz != "ok"; ++i) {
    absl::SleepFor(absl::Milliseconds(100));
    healthz = h.Status(socket).healthz();
  }
  CHECK(healthz == "ok");
  v2::DecryptResponse decrypted;
  REQUIRE(client.DecryptResponseOf(before, decrypted).ok());
  CHECK(decrypted.plaintext() == std::string(32, 'm'));
  REQUIRE(client.Encrypt(std::string(32, 'm'), encrypted).ok());
  CHECK(server->Running());
}

TEST_CASE("PKCS#11 serve: a ciphertext of one token's environment sent to the other's socket is "
          "FAILED_PRECONDITION naming both environments",
          "[pkcs11][serve][bad-input]") {
  Hsm h({"kms-a", "kms-b"});
  h.Configure({{"alpha", "kms-a", "kmsplugin-alpha"}, {"beta", "kms-b", "kmsplugin-beta"}});
  const RunResult init = h.Init();
  INFO(init.out << init.err);
  REQUIRE(init.exit_code == 0);
  CHECK(Has(h.TokenObjects("kms-a"), "kmsplugin-alpha-v1"));
  CHECK(Has(h.TokenObjects("kms-b"), "kmsplugin-beta-v1"));
  auto server = h.Serve();
  REQUIRE(h.WaitServing(*server, h.Socket("alpha")));
  REQUIRE(h.WaitServing(*server, h.Socket("beta")));
  KmsClient alpha(h.Socket("alpha")), beta(h.Socket("beta"));
  CHECK(Has(h.Status(h.Socket("alpha")).key_id(), h.serials["kms-a"]));
  CHECK(Has(h.Status(h.Socket("beta")).key_id(), h.serials["kms-b"]));
  v2::EncryptResponse of_alpha;
  REQUIRE(alpha.Encrypt(std::string(32, 'a'), of_alpha).ok());
  v2::DecryptResponse decrypted;
  const grpc::Status crossed = beta.DecryptResponseOf(of_alpha, decrypted);
  CHECK(crossed.error_code() == grpc::StatusCode::FAILED_PRECONDITION);
  CHECK(Has(crossed.error_message(), "alpha"));
  CHECK(Has(crossed.error_message(), "beta"));
  v1beta1::EncryptResponse v1_of_beta;
  REQUIRE(beta.V1Encrypt(std::string(32, 'b'), v1_of_beta).ok());
  v1beta1::DecryptResponse v1_decrypted;
  CHECK(alpha.V1Decrypt(v1_of_beta.cipher(), v1_decrypted).error_code() == grpc::StatusCode::FAILED_PRECONDITION);
  // Each still decrypts its own.
  REQUIRE(alpha.DecryptResponseOf(of_alpha, decrypted).ok());
  CHECK(decrypted.plaintext() == std::string(32, 'a'));
  // Rotating one environment leaves the other's key untouched.
  REQUIRE(h.Rotate("alpha").exit_code == 0);
  const std::string beta_before = h.Status(h.Socket("beta")).key_id();
  CHECK(VersionOf(h.KeyIdAfterHup(*server, h.Socket("alpha"), h.Status(h.Socket("alpha")).key_id())) == 2);
  CHECK(h.Status(h.Socket("beta")).key_id() == beta_before);
}

TEST_CASE("PKCS#11 serve: two environments on the same token and keyLabel with allowSharedBackendKey still refuse "
          "each other's ciphertexts",
          "[pkcs11][serve][bad-input]") {
  Hsm h;
  h.Configure({{"one", "kms", "kmsplugin-shared"}, {"two", "kms", "kmsplugin-shared", /*shared=*/true}});
  const RunResult init = h.Init();
  INFO(init.out << init.err);
  REQUIRE(init.exit_code == 0);
  auto server = h.Serve();
  REQUIRE(h.WaitServing(*server, h.Socket("one")));
  REQUIRE(h.WaitServing(*server, h.Socket("two")));
  KmsClient one(h.Socket("one")), two(h.Socket("two"));
  // The very same HSM key object serves both...
  CHECK(h.Status(h.Socket("one")).key_id() == h.Status(h.Socket("two")).key_id());
  v2::EncryptResponse of_one, of_two;
  REQUIRE(one.Encrypt(std::string(32, '1'), of_one).ok());
  REQUIRE(two.Encrypt(std::string(32, '2'), of_two).ok());
  // ...yet the environment bound into each ciphertext keeps them apart, both ways.
  v2::DecryptResponse decrypted;
  grpc::Status crossed = two.DecryptResponseOf(of_one, decrypted);
  CHECK(crossed.error_code() == grpc::StatusCode::FAILED_PRECONDITION);
  CHECK(Has(crossed.error_message(), "\"one\""));
  CHECK(Has(crossed.error_message(), "\"two\""));
  crossed = one.DecryptResponseOf(of_two, decrypted);
  CHECK(crossed.error_code() == grpc::StatusCode::FAILED_PRECONDITION);
  // A ciphertext rewritten to claim the other environment fails authentication (the header is associated data).
  auto envelope = crypto::ParseEnvelope(of_one.ciphertext());
  REQUIRE(envelope.ok());
  REQUIRE(envelope->header.environment == "one");
  envelope->header.environment = "two";
  auto forged = crypto::EncodeEnvelope(*envelope);
  REQUIRE(forged.ok());
  std::map<std::string, std::string> annotations(of_one.annotations().begin(), of_one.annotations().end());
  const grpc::Status status = two.Decrypt(*forged, of_one.key_id(), annotations, decrypted);
  CHECK(status.error_code() == grpc::StatusCode::INVALID_ARGUMENT);
  CHECK(decrypted.plaintext().empty());
}

TEST_CASE("PKCS#11 config: two environments on the same token and keyLabel without allowSharedBackendKey are "
          "refused, naming the field",
          "[pkcs11][bad-input]") {
  Hsm h;
  h.Configure({{"one", "kms", "kmsplugin-shared"}, {"two", "kms", "kmsplugin-shared"}});
  for (const std::string command : {"init", "serve"}) {
    const RunResult result = h.Cli({command, "--config", h.config});
    INFO(command << ": " << result.err);
    CHECK(result.exit_code != 0);
    CHECK(Has(result.err, h.config));
    CHECK(Has(result.err, "allowSharedBackendKey"));
    CHECK(Has(result.err, "environments[1].keySource"));
    CHECK(Has(result.err, "\"one\""));
  }
  CHECK(!Has(h.TokenObjects(), "kmsplugin-shared"));  // nothing was created
}

TEST_CASE("PKCS#11 serve: a wrong PIN is reported as a PIN problem, the PIN is never printed, and fixing the "
          "file heals the environment without a restart",
          "[pkcs11][serve][bad-input][isolation]") {
  Hsm h;
  h.Configure();
  REQUIRE(h.Init().exit_code == 0);
  const std::string wrong = "wrong-pin-7c3e91";
  const std::string wrong_file = h.dir.Write("wrong.pin", wrong + "\n");
  h.Configure({{"test", "kms", "kmsplugin-test"}}, "  pollInterval: 1s\n", wrong_file);
  // The environment serves unhealthy (one C_Login at start, never retried while the file is unchanged: the
  // daemon unit tests count the attempts), with the reason in Status.
  auto server = h.Serve();
  REQUIRE(h.WaitServing(*server, h.Socket("test")));
  const std::string healthz = h.Status(h.Socket("test")).healthz();
  INFO(healthz);
  CHECK(Has(healthz, "CKR_PIN_INCORRECT"));
  CHECK(Has(healthz, wrong_file));
  CHECK(Has(healthz, "will not try this PIN again"));
  CHECK(Has(healthz, "fix:"));
  KmsClient client(h.Socket("test"));
  v2::EncryptResponse refused;
  const grpc::Status refusal = client.Encrypt(std::string(32, 'p'), refused);
  CHECK(refusal.error_code() == grpc::StatusCode::PERMISSION_DENIED);
  absl::SleepFor(absl::Seconds(3));  // three polls
  CHECK(server->Running());
  // The CLI says the same, without the PIN.
  const RunResult keys = h.Cli({"rotate", "--config", h.config, "--env", "test"});
  CHECK(keys.exit_code != 0);
  CHECK(Has(keys.err, "PIN"));
  CHECK(!Has(keys.out + keys.err, wrong));
  // The operator writes the right PIN: healthy by itself, no restart.
  h.dir.Write("wrong.pin", std::string(kPin) + "\n");
  std::string now;
  for (int i = 0; i < 50 && now != "ok"; ++i) {
    absl::SleepFor(absl::Milliseconds(200));
    now = h.Status(h.Socket("test")).healthz();
  }
  CHECK(now == "ok");
  v2::EncryptResponse encrypted;
  CHECK(client.Encrypt(std::string(32, 'p'), encrypted).ok());
  server->Signal(SIGTERM);
  CHECK(server->Wait() == std::optional<int>(0));
  const std::string output = server->Stdout() + server->Stderr();
  CHECK(!Has(output, wrong));
  CHECK(Has(output, "\"event\":\"started\""));
  // The token is not locked by retries: the right PIN still works.
  CHECK(Has(h.TokenObjects(), "kmsplugin-test-v1"));
  CHECK(!Has(h.TokenObjects(), "kmsplugin-test-v2"));
}

TEST_CASE("PKCS#11 serve: a PIN file readable by others is refused, naming the file and the fix",
          "[pkcs11][serve][bad-input]") {
  Hsm h;
  h.Configure();
  REQUIRE(h.Init().exit_code == 0);
  chmod(h.pin_file.c_str(), 0644);
  const std::string why = h.ServeUnhealthy(h.Socket("test"));
  INFO(why);
  CHECK(Has(why, h.pin_file));
  CHECK(Has(why, "chmod 600"));
  CHECK(!Has(why, std::string(kPin) + "\n"));
}

TEST_CASE("PKCS#11 serve: a token label that no slot has is refused at start, naming the label",
          "[pkcs11][serve][bad-input]") {
  Hsm h;
  h.Configure({{"test", "no-such-token", "kmsplugin-test"}});
  CHECK(Has(h.ServeUnhealthy(h.Socket("test")), "no-such-token"));
  const RunResult init = h.Init();
  CHECK(init.exit_code != 0);
  CHECK(Has(init.err, "no-such-token"));
}

}  // namespace
}  // namespace kmsplugin::testing
