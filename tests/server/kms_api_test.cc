// The KMS v2 and v1beta1 APIs over a real Unix socket: round trips and every bad input the issue lists.

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <string>

#include <catch2/catch.hpp>

#include "tests/server/server_fixture.h"

namespace kmsplugin::testing {
namespace {

const std::map<std::string, std::string> kAnnotations = {{"format.kmsplugin.io", "1"}};

std::string Seed(char fill = 's') { return std::string(32, fill); }

v2::EncryptResponse MustEncrypt(KmsClient& client, const std::string& plaintext) {
  v2::EncryptResponse response;
  const grpc::Status status = client.Encrypt(plaintext, response);
  INFO(status.error_message());
  REQUIRE(status.ok());
  return response;
}

grpc::Status DecryptWith(KmsClient& client, const std::string& ciphertext, const std::string& key_id,
                         const std::map<std::string, std::string>& annotations = kAnnotations) {
  v2::DecryptResponse response;
  return client.Decrypt(ciphertext, key_id, annotations, response);
}

bool Contains(const grpc::Status& status, const std::string& text) {
  return status.error_message().find(text) != std::string::npos;
}

TEST_CASE("KMS v2: Encrypt then Decrypt returns the seed, and Status agrees on key_id", "[server]") {
  ServerFixture f;
  v2::StatusResponse status;
  REQUIRE(f.client->Status(status).ok());
  CHECK(status.version() == "v2");
  CHECK(status.healthz() == "ok");
  const v2::EncryptResponse encrypted = MustEncrypt(*f.client, Seed());
  CHECK(encrypted.key_id() == status.key_id());
  CHECK(!encrypted.ciphertext().empty());
  CHECK(encrypted.ciphertext().size() <= 1024);
  CHECK(encrypted.ciphertext().find(Seed()) == std::string::npos);
  CHECK(encrypted.annotations().size() == 1);
  v2::DecryptResponse decrypted;
  REQUIRE(f.client->DecryptResponseOf(encrypted, decrypted).ok());
  CHECK(decrypted.plaintext() == Seed());
}

TEST_CASE("KMS v2: two encryptions of one seed give different ciphertexts", "[server]") {
  ServerFixture f;
  CHECK(MustEncrypt(*f.client, Seed()).ciphertext() != MustEncrypt(*f.client, Seed()).ciphertext());
}

TEST_CASE("KMS v2: Status reports v2beta1 when configured for Kubernetes 1.27 and 1.28", "[server]") {
  TempDir dir;
  auto source = OpenLocal(MakeKeyring(dir, "old"), "old");
  std::vector<server::ServedEnvironment> envs{{dir.File("old.sock"), std::nullopt, MakeService(source, "old", "v2beta1")}};
  server::ServerRunner runner({}, std::move(envs));
  REQUIRE(runner.Start().ok());
  KmsClient client(dir.File("old.sock"));
  v2::StatusResponse status;
  REQUIRE(client.Status(status).ok());
  CHECK(status.version() == "v2beta1");
  CHECK(status.healthz() == "ok");
}

TEST_CASE("KMS v2: empty plaintext is INVALID_ARGUMENT", "[server][bad-input]") {
  ServerFixture f;
  v2::EncryptResponse response;
  const grpc::Status status = f.client->Encrypt("", response);
  CHECK(status.error_code() == grpc::StatusCode::INVALID_ARGUMENT);
  CHECK(Contains(status, "plaintext is empty"));
}

TEST_CASE("KMS v2: plaintext over the limit is INVALID_ARGUMENT naming the size", "[server][bad-input]") {
  ServerFixture f;
  v2::EncryptResponse response;
  const grpc::Status status = f.client->Encrypt(std::string(129, 'x'), response);
  CHECK(status.error_code() == grpc::StatusCode::INVALID_ARGUMENT);
  CHECK(Contains(status, "129 bytes"));
}

TEST_CASE("KMS v2: empty ciphertext is INVALID_ARGUMENT", "[server][bad-input]") {
  ServerFixture f;
  const grpc::Status status = DecryptWith(*f.client, "", "any");
  CHECK(status.error_code() == grpc::StatusCode::INVALID_ARGUMENT);
  CHECK(Contains(status, "ciphertext is empty"));
}

TEST_CASE("KMS v2: every truncation of a ciphertext is INVALID_ARGUMENT", "[server][bad-input]") {
  ServerFixture f;
  const v2::EncryptResponse encrypted = MustEncrypt(*f.client, Seed());
  for (size_t length = 1; length < encrypted.ciphertext().size(); ++length) {
    const grpc::Status status = DecryptWith(*f.client, encrypted.ciphertext().substr(0, length), encrypted.key_id());
    INFO("length " << length << ": " << status.error_message());
    CHECK(status.error_code() == grpc::StatusCode::INVALID_ARGUMENT);
  }
}

TEST_CASE("KMS v2: a 1 MiB ciphertext is refused with RESOURCE_EXHAUSTED before any handler runs",
          "[server][bad-input]") {
  ServerFixture f;
  const grpc::Status status = DecryptWith(*f.client, std::string(1 << 20, 'c'), "any");
  CHECK(status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED);
  v2::StatusResponse after;
  CHECK(f.client->Status(after).ok());  // still serving
}

TEST_CASE("KMS v2: a ciphertext over 1024 bytes is INVALID_ARGUMENT", "[server][bad-input]") {
  ServerFixture f;
  const v2::EncryptResponse encrypted = MustEncrypt(*f.client, Seed());
  const grpc::Status status = DecryptWith(*f.client, encrypted.ciphertext() + std::string(2000, 'p'),
                                          encrypted.key_id());
  CHECK(status.error_code() == grpc::StatusCode::INVALID_ARGUMENT);
}

TEST_CASE("KMS v2: every single-bit flip of a ciphertext is refused, never decrypted", "[server][bad-input]") {
  ServerFixture f;
  const v2::EncryptResponse encrypted = MustEncrypt(*f.client, Seed());
  const std::string& good = encrypted.ciphertext();
  for (size_t i = 0; i < good.size(); ++i) {
    for (int bit = 0; bit < 8; bit += 3) {
      std::string flipped = good;
      flipped[i] = static_cast<char>(flipped[i] ^ (1 << bit));
      const grpc::Status status = DecryptWith(*f.client, flipped, encrypted.key_id());
      INFO("byte " << i << " bit " << bit << ": " << status.error_message());
      CHECK(!status.ok());
      CHECK((status.error_code() == grpc::StatusCode::INVALID_ARGUMENT ||
             status.error_code() == grpc::StatusCode::FAILED_PRECONDITION));
    }
  }
}

TEST_CASE("KMS v2: a ciphertext of an unknown format version names the version", "[server][bad-input]") {
  ServerFixture f;
  const v2::EncryptResponse encrypted = MustEncrypt(*f.client, Seed());
  std::string future = encrypted.ciphertext();
  future[0] = 0x07;
  const grpc::Status status = DecryptWith(*f.client, future, encrypted.key_id());
  CHECK(status.error_code() == grpc::StatusCode::INVALID_ARGUMENT);
  CHECK(Contains(status, "0x07"));
}

TEST_CASE("KMS v2: garbage in place of a ciphertext is INVALID_ARGUMENT", "[server][bad-input]") {
  ServerFixture f;
  const grpc::Status status = DecryptWith(*f.client, "this is not a kmsplugin ciphertext", "k");
  CHECK(status.error_code() == grpc::StatusCode::INVALID_ARGUMENT);
}

TEST_CASE("KMS v2: a key_id that is not the ciphertext's is INVALID_ARGUMENT naming both", "[server][bad-input]") {
  ServerFixture f;
  const v2::EncryptResponse encrypted = MustEncrypt(*f.client, Seed());
  const grpc::Status status = DecryptWith(*f.client, encrypted.ciphertext(), "someone-elses-key");
  CHECK(status.error_code() == grpc::StatusCode::INVALID_ARGUMENT);
  CHECK(Contains(status, "someone-elses-key"));
  CHECK(Contains(status, encrypted.key_id()));
}

TEST_CASE("KMS v2: an empty key_id is INVALID_ARGUMENT", "[server][bad-input]") {
  ServerFixture f;
  const v2::EncryptResponse encrypted = MustEncrypt(*f.client, Seed());
  const grpc::Status status = DecryptWith(*f.client, encrypted.ciphertext(), "");
  CHECK(status.error_code() == grpc::StatusCode::INVALID_ARGUMENT);
  CHECK(Contains(status, "key_id is empty"));
}

TEST_CASE("KMS v2: missing annotations are INVALID_ARGUMENT naming the annotation", "[server][bad-input]") {
  ServerFixture f;
  const v2::EncryptResponse encrypted = MustEncrypt(*f.client, Seed());
  const grpc::Status status = DecryptWith(*f.client, encrypted.ciphertext(), encrypted.key_id(), {});
  CHECK(status.error_code() == grpc::StatusCode::INVALID_ARGUMENT);
  CHECK(Contains(status, "format.kmsplugin.io is missing"));
}

TEST_CASE("KMS v2: an extra annotation is INVALID_ARGUMENT naming it", "[server][bad-input]") {
  ServerFixture f;
  const v2::EncryptResponse encrypted = MustEncrypt(*f.client, Seed());
  auto annotations = kAnnotations;
  annotations["extra.example.com"] = "x";
  const grpc::Status status = DecryptWith(*f.client, encrypted.ciphertext(), encrypted.key_id(), annotations);
  CHECK(status.error_code() == grpc::StatusCode::INVALID_ARGUMENT);
  CHECK(Contains(status, "extra.example.com"));
}

TEST_CASE("KMS v2: a changed annotation value is INVALID_ARGUMENT", "[server][bad-input]") {
  ServerFixture f;
  const v2::EncryptResponse encrypted = MustEncrypt(*f.client, Seed());
  const grpc::Status status =
      DecryptWith(*f.client, encrypted.ciphertext(), encrypted.key_id(), {{"format.kmsplugin.io", "2"}});
  CHECK(status.error_code() == grpc::StatusCode::INVALID_ARGUMENT);
}

TEST_CASE("KMS v1beta1: Version answers v1beta1 with a runtime name and semver", "[server][v1beta1]") {
  ServerFixture f;
  v1beta1::VersionResponse response;
  REQUIRE(f.client->V1Version(response).ok());
  CHECK(response.version() == "v1beta1");
  CHECK(response.runtime_name() == "kmsplugin");
  CHECK(std::count(response.runtime_version().begin(), response.runtime_version().end(), '.') == 2);
}

TEST_CASE("KMS v1beta1: the 4-byte \"ping\" health probe round-trips", "[server][v1beta1]") {
  ServerFixture f;
  v1beta1::EncryptResponse encrypted;
  REQUIRE(f.client->V1Encrypt("ping", encrypted).ok());
  v1beta1::DecryptResponse decrypted;
  REQUIRE(f.client->V1Decrypt(encrypted.cipher(), decrypted).ok());
  CHECK(decrypted.plain() == "ping");
}

TEST_CASE("KMS v1beta1: a 32-byte DEK round-trips, and v2 reads what v1beta1 wrote", "[server][v1beta1]") {
  ServerFixture f;
  v1beta1::EncryptResponse encrypted;
  REQUIRE(f.client->V1Encrypt(Seed('d'), encrypted).ok());
  v1beta1::DecryptResponse decrypted;
  REQUIRE(f.client->V1Decrypt(encrypted.cipher(), decrypted).ok());
  CHECK(decrypted.plain() == Seed('d'));
  v2::StatusResponse status;
  REQUIRE(f.client->Status(status).ok());
  v2::DecryptResponse via_v2;
  REQUIRE(f.client->Decrypt(encrypted.cipher(), status.key_id(), kAnnotations, via_v2).ok());
  CHECK(via_v2.plaintext() == Seed('d'));
}

TEST_CASE("KMS v1beta1: an unknown API version is INVALID_ARGUMENT", "[server][v1beta1][bad-input]") {
  ServerFixture f;
  v1beta1::EncryptResponse encrypted;
  const grpc::Status status = f.client->V1Encrypt("ping", encrypted, "v9");
  CHECK(status.error_code() == grpc::StatusCode::INVALID_ARGUMENT);
  CHECK(Contains(status, "v9"));
  v1beta1::VersionResponse version;
  CHECK(f.client->V1Version(version, "v2").error_code() == grpc::StatusCode::INVALID_ARGUMENT);
}

TEST_CASE("KMS v1beta1: empty and corrupt ciphertexts are INVALID_ARGUMENT", "[server][v1beta1][bad-input]") {
  ServerFixture f;
  v1beta1::DecryptResponse decrypted;
  CHECK(f.client->V1Decrypt("", decrypted).error_code() == grpc::StatusCode::INVALID_ARGUMENT);
  v1beta1::EncryptResponse encrypted;
  REQUIRE(f.client->V1Encrypt(Seed(), encrypted).ok());
  std::string corrupt = encrypted.cipher();
  corrupt.back() = static_cast<char>(corrupt.back() ^ 1);
  CHECK(f.client->V1Decrypt(corrupt, decrypted).error_code() == grpc::StatusCode::INVALID_ARGUMENT);
  v1beta1::EncryptResponse empty;
  CHECK(f.client->V1Encrypt("", empty).error_code() == grpc::StatusCode::INVALID_ARGUMENT);
}

TEST_CASE("Server: any :authority is accepted, including the socket path older apiservers send", "[server]") {
  ServerFixture f;
  for (const std::string& authority : {f.socket, std::string("localhost"), std::string("%2Fvar%2Frun%2Fkms.sock"),
                                       std::string("unix:") + f.socket}) {
    KmsClient client(f.socket, authority);
    v2::StatusResponse status;
    const grpc::Status result = client.Status(status);
    INFO("authority " << authority << ": " << result.error_message());
    CHECK(result.ok());
    v1beta1::EncryptResponse encrypted;
    CHECK(client.V1Encrypt("ping", encrypted).ok());
  }
}

TEST_CASE("Server: garbage bytes on the socket do not stop it serving", "[server][bad-input]") {
  ServerFixture f;
  for (const std::string& garbage :
       {std::string("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), std::string(4096, '\xff'),
        std::string("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") + std::string(64, '\x00'), std::string("\x16\x03\x01", 3)}) {
    const int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    std::strncpy(address.sun_path, f.socket.c_str(), sizeof(address.sun_path) - 1);
    REQUIRE(connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0);
    (void)!write(fd, garbage.data(), garbage.size());
    char buffer[256];
    timeval timeout{0, 200000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
    (void)!read(fd, buffer, sizeof(buffer));
    close(fd);
  }
  v2::StatusResponse status;
  CHECK(f.client->Status(status).ok());
  CHECK(status.healthz() == "ok");
}

TEST_CASE("Server: clients that give up mid-call do not disturb it", "[server][bad-input]") {
  ServerFixture f;
  // Deadlines so short the call is abandoned while in flight, and a cancelled call.
  for (int i = 0; i < 50; ++i) {
    v2::EncryptResponse response;
    f.client->Encrypt(Seed(), response, std::chrono::milliseconds(0));
  }
  {
    grpc::ClientContext context;
    v2::EncryptRequest request;
    request.set_plaintext(Seed());
    v2::EncryptResponse response;
    context.TryCancel();
    CHECK(f.client->v2().Encrypt(&context, request, &response).error_code() == grpc::StatusCode::CANCELLED);
  }
  const v2::EncryptResponse encrypted = MustEncrypt(*f.client, Seed());
  v2::DecryptResponse decrypted;
  CHECK(f.client->DecryptResponseOf(encrypted, decrypted).ok());
}

TEST_CASE("Server: a ciphertext of another environment is FAILED_PRECONDITION naming both", "[server][env]") {
  TempDir dir;
  const auto shared = MakeKeyring(dir, "shared");  // the same keyring, by mistake, for both
  auto prod = MakeService(OpenLocal(shared, "prod"), "prod");
  auto dev = MakeService(OpenLocal(shared, "dev"), "dev");
  std::vector<server::ServedEnvironment> envs{{dir.File("prod.sock"), std::nullopt, prod},
                                             {dir.File("dev.sock"), std::nullopt, dev}};
  server::ServerRunner runner({}, std::move(envs));
  REQUIRE(runner.Start().ok());
  KmsClient prod_client(dir.File("prod.sock"));
  KmsClient dev_client(dir.File("dev.sock"));
  const v2::EncryptResponse encrypted = MustEncrypt(prod_client, Seed());
  const grpc::Status status = DecryptWith(dev_client, encrypted.ciphertext(), encrypted.key_id());
  CHECK(status.error_code() == grpc::StatusCode::FAILED_PRECONDITION);
  CHECK(Contains(status, "\"prod\""));
  CHECK(Contains(status, "\"dev\""));
  v1beta1::EncryptResponse v1;
  REQUIRE(prod_client.V1Encrypt(Seed(), v1).ok());
  v1beta1::DecryptResponse v1_out;
  CHECK(dev_client.V1Decrypt(v1.cipher(), v1_out).error_code() == grpc::StatusCode::FAILED_PRECONDITION);
  // Rewriting the header to claim the other environment does not help: the header is authenticated.
  std::string forged = encrypted.ciphertext();
  const size_t at = forged.find("prod");
  REQUIRE(at != std::string::npos);
  std::string relabelled = forged.substr(0, at - 1) + std::string(1, '\x03') + "dev" + forged.substr(at + 4);
  CHECK(DecryptWith(dev_client, relabelled, encrypted.key_id()).error_code() == grpc::StatusCode::INVALID_ARGUMENT);
}

}  // namespace
}  // namespace kmsplugin::testing
