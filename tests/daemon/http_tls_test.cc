// The TLS metrics listener (http.tls), with real TLS: certificates made by the openssl command for each test, an
// OpenSSL client, and the daemon's loader with its file checks.

#include <arpa/inet.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <httplib.h>
#include <catch2/catch.hpp>

#include "absl/time/clock.h"
#include "kmsplugin/daemon/http_tls.h"
#include "kmsplugin/observe/http_endpoint.h"
#include "kmsplugin/observe/metrics.h"
#include "tests/support/status_matchers.h"
#include "tests/support/temp_dir.h"

namespace kmsplugin::testing {
namespace {

void Run(const std::string& command) {
  INFO(command);
  REQUIRE(std::system((command + " >/dev/null 2>&1").c_str()) == 0);
}

// A CA and a certificate it issued (`ext`: the extensions), as NAME.crt / NAME.key in `dir`.
void MakeCa(const TempDir& dir, const std::string& name) {
  Run("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=" + name +
      " -keyout " + dir.File(name + ".key") + " -out " + dir.File(name + ".crt"));
}
void Issue(const TempDir& dir, const std::string& ca, const std::string& name, const std::string& ext) {
  const std::string ext_file = dir.Write(name + ".ext", ext + "\n");
  Run("openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=" + name + " -keyout " +
      dir.File(name + ".key") + " -out " + dir.File(name + ".csr"));
  Run("openssl x509 -req -days 1 -in " + dir.File(name + ".csr") + " -CA " + dir.File(ca + ".crt") + " -CAkey " +
      dir.File(ca + ".key") + " -CAcreateserial -extfile " + ext_file + " -out " + dir.File(name + ".crt"));
  Run("chmod 600 " + dir.File(name + ".key"));
}

struct Pki {
  Pki() {
    MakeCa(dir, "ca");
    MakeCa(dir, "other-ca");
    Issue(dir, "ca", "server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth");
    Issue(dir, "ca", "prometheus", "extendedKeyUsage=clientAuth");
    Issue(dir, "other-ca", "intruder", "extendedKeyUsage=clientAuth");
  }
  config::HttpTlsConfig Config(const std::string& client_ca = "ca") const {
    return {"127.0.0.1:0", dir.File("server.crt"), dir.File("server.key"), dir.File(client_ca + ".crt")};
  }
  TempDir dir;
};

int Connect(int port) {
  const int sock = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<uint16_t>(port));
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  timeval timeout{5, 0};
  setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
  setsockopt(sock, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof(timeout));
  if (connect(sock, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0) {
    close(sock);
    return -1;
  }
  return sock;
}

// GET `path` over TLS, verifying the server against ca.crt, presenting `client` (NAME.crt/.key) unless empty.
// The HTTP response, or nullopt when there was none (handshake refused, connection closed).
std::optional<std::string> TlsGet(const Pki& pki, int port, const std::string& client, const std::string& path) {
  std::unique_ptr<SSL_CTX, void (*)(SSL_CTX*)> ctx(SSL_CTX_new(TLS_client_method()), SSL_CTX_free);
  REQUIRE(SSL_CTX_load_verify_locations(ctx.get(), pki.dir.File("ca.crt").c_str(), nullptr) == 1);
  SSL_CTX_set_verify(ctx.get(), SSL_VERIFY_PEER, nullptr);
  if (!client.empty()) {
    REQUIRE(SSL_CTX_use_certificate_file(ctx.get(), pki.dir.File(client + ".crt").c_str(), SSL_FILETYPE_PEM) == 1);
    REQUIRE(SSL_CTX_use_PrivateKey_file(ctx.get(), pki.dir.File(client + ".key").c_str(), SSL_FILETYPE_PEM) == 1);
  }
  const int sock = Connect(port);
  REQUIRE(sock >= 0);
  std::unique_ptr<SSL, void (*)(SSL*)> ssl(SSL_new(ctx.get()), SSL_free);
  SSL_set_fd(ssl.get(), sock);
  std::optional<std::string> response;
  // TLS 1.3: the client's handshake may complete before the server has checked its certificate; a refusal
  // then shows as an alert or a close on the first read.
  const std::string request = "GET " + path + " HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
  if (SSL_connect(ssl.get()) == 1 && SSL_write(ssl.get(), request.data(), static_cast<int>(request.size())) > 0) {
    std::string body;
    char buffer[4096];
    int n = 0;
    while ((n = SSL_read(ssl.get(), buffer, sizeof(buffer))) > 0) {
      body.append(buffer, static_cast<size_t>(n));
    }
    if (!body.empty()) {
      response = body;
    }
  }
  ERR_clear_error();
  close(sock);
  return response;
}

bool Has(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

struct TlsEndpoint {
  explicit TlsEndpoint(const Pki& pki, observe::HttpLimits limits = {}) {
    registry.GetCounter("kmsplugin_grpc_requests_total", "KMS gRPC calls.", {{"environment", "dev"}}).Increment();
    auto context = daemon::LoadHttpTls("/etc/kmsplugin/config.yaml", pki.Config());
    INFO(context.status().ToString());
    REQUIRE(context.ok());
    auto started = observe::HttpEndpoint::Start(
        "127.0.0.1:0", registry, [] { return std::vector<observe::Readiness>{{"dev", true, "ok"}}; }, {}, limits,
        *context);
    REQUIRE(started.ok());
    endpoint = std::move(*started);
  }
  observe::Registry registry;
  std::unique_ptr<observe::HttpEndpoint> endpoint;
};

}  // namespace

TEST_CASE("HTTP TLS: a client certificate from the client CA gets /metrics", "[daemon][tls]") {
  Pki pki;
  TlsEndpoint tls(pki);
  const auto response = TlsGet(pki, tls.endpoint->port(), "prometheus", "/metrics");
  REQUIRE(response.has_value());
  CHECK(Has(*response, "HTTP/1.1 200"));
  CHECK(Has(*response, "kmsplugin_grpc_requests_total{environment=\"dev\"} 1"));
  const auto ready = TlsGet(pki, tls.endpoint->port(), "prometheus", "/readyz");
  REQUIRE(ready.has_value());
  CHECK(Has(*ready, "HTTP/1.1 200"));
  CHECK(tls.endpoint->tls_handshake_failures() == 0);
}

TEST_CASE("HTTP TLS: no client certificate, or one from another CA, gets no answer", "[daemon][tls]") {
  Pki pki;
  TlsEndpoint tls(pki);
  CHECK_FALSE(TlsGet(pki, tls.endpoint->port(), "", "/metrics").has_value());
  CHECK_FALSE(TlsGet(pki, tls.endpoint->port(), "intruder", "/metrics").has_value());
  CHECK(tls.endpoint->tls_handshake_failures() == 2);
  // The listener still serves the right client afterwards.
  CHECK(TlsGet(pki, tls.endpoint->port(), "prometheus", "/healthz").has_value());
}

TEST_CASE("HTTP TLS: plain HTTP to the TLS port is closed at once, not held to the deadline", "[daemon][tls]") {
  Pki pki;
  observe::HttpLimits limits;
  limits.request_deadline = absl::Seconds(10);
  TlsEndpoint tls(pki, limits);
  httplib::Client client("127.0.0.1", tls.endpoint->port());
  client.set_read_timeout(15, 0);
  const absl::Time start = absl::Now();
  auto response = client.Get("/metrics");
  CHECK_FALSE(response);
  CHECK(absl::Now() - start < absl::Seconds(3));
  CHECK(tls.endpoint->tls_handshake_failures() == 1);
}

TEST_CASE("HTTP TLS: clients that stall the handshake are cut at the deadline and do not block /healthz",
          "[daemon][tls][hardening]") {
  Pki pki;
  observe::HttpLimits limits;
  limits.workers = 2;
  limits.max_connections = 8;
  limits.request_deadline = absl::Seconds(1);
  TlsEndpoint tls(pki, limits);
  // Two connections that say nothing (the handshake never starts) and two that send half a ClientHello: both
  // workers are busy with stalled handshakes.
  std::vector<int> stalled;
  for (int i = 0; i < 4; ++i) {
    const int sock = Connect(tls.endpoint->port());
    REQUIRE(sock >= 0);
    if (i >= 2) {
      const char partial[] = {0x16, 0x03, 0x01, 0x02, 0x00, 0x01};  // a record header and one byte of it
      REQUIRE(send(sock, partial, sizeof(partial), MSG_NOSIGNAL) == static_cast<ssize_t>(sizeof(partial)));
    }
    stalled.push_back(sock);
  }
  const absl::Time start = absl::Now();
  const auto health = TlsGet(pki, tls.endpoint->port(), "prometheus", "/healthz");
  const absl::Duration waited = absl::Now() - start;
  REQUIRE(health.has_value());
  CHECK(Has(*health, "HTTP/1.1 200"));
  // Served once the stalled ones hit their 1 s deadline (two rounds of two workers at most).
  CHECK(waited < absl::Seconds(4));
  // Each stalled connection was closed by the server (EOF or reset), none left open.
  for (int sock : stalled) {
    pollfd fd{sock, POLLIN, 0};
    REQUIRE(poll(&fd, 1, 5000) == 1);
    char byte = 0;
    CHECK(recv(sock, &byte, 1, 0) <= 0);
    close(sock);
  }
  CHECK(tls.endpoint->tls_handshake_failures() == 4);
}

TEST_CASE("HTTP TLS: a reload with another client CA changes who is served", "[daemon][tls]") {
  Pki pki;
  TlsEndpoint tls(pki);
  REQUIRE(TlsGet(pki, tls.endpoint->port(), "prometheus", "/metrics").has_value());
  auto other = daemon::LoadHttpTls("/etc/kmsplugin/config.yaml", pki.Config("other-ca"));
  REQUIRE(other.ok());
  tls.endpoint->SetTls(*other);
  CHECK_FALSE(TlsGet(pki, tls.endpoint->port(), "prometheus", "/metrics").has_value());
  CHECK(TlsGet(pki, tls.endpoint->port(), "intruder", "/metrics").has_value());
}

TEST_CASE("HTTP TLS: a key file others can read is refused, naming the field, the file and the fix", "[daemon][tls]") {
  Pki pki;
  Run("chmod 644 " + pki.dir.File("server.key"));
  auto context = daemon::LoadHttpTls("/etc/kmsplugin/config.yaml", pki.Config());
  REQUIRE_FALSE(context.ok());
  CHECK(context.status().code() == absl::StatusCode::kFailedPrecondition);
  const std::string message(context.status().message());
  CHECK(Has(message, "/etc/kmsplugin/config.yaml: http.tls.keyFile"));
  CHECK(Has(message, pki.dir.File("server.key")));
  CHECK(Has(message, "chmod 600"));
}

TEST_CASE("HTTP TLS: a key that is not the certificate's is refused", "[daemon][tls]") {
  Pki pki;
  config::HttpTlsConfig config = pki.Config();
  config.key_file = pki.dir.File("prometheus.key");
  auto context = daemon::LoadHttpTls("/etc/kmsplugin/config.yaml", config);
  REQUIRE_FALSE(context.ok());
  CHECK(Has(std::string(context.status().message()), "key values mismatch"));  // OpenSSL's reason
  // A missing client CA file names its field.
  config = pki.Config();
  config.client_ca_file = pki.dir.File("missing.crt");
  auto missing = daemon::LoadHttpTls("/etc/kmsplugin/config.yaml", config);
  REQUIRE_FALSE(missing.ok());
  CHECK(Has(std::string(missing.status().message()), "http.tls.clientCAFile"));
}

}  // namespace kmsplugin::testing
