#pragma once

// EtcdFixture: a real, single-member etcd (Debian's etcd-server) on loopback ports chosen at run time, with a
// temporary data dir; optionally TLS on the client port (and client-certificate auth). The constructor returns
// once etcd answers a Range; the destructor kills it. Also: FreePort() and a TLS material maker (openssl CLI).

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>

#include "kmsplugin/audit/etcd_client.h"
#include "tests/support/subprocess.h"
#include "tests/support/temp_dir.h"

namespace kmsplugin::testing {

// A loopback TCP port that was free a moment ago (bind to port 0, read it, close).
inline int FreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  REQUIRE(fd >= 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  REQUIRE(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0);
  socklen_t len = sizeof(addr);
  REQUIRE(getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0);
  close(fd);
  return ntohs(addr.sin_port);
}

// A CA, a server certificate for 127.0.0.1/localhost and a client certificate, made with the openssl CLI.
struct TlsMaterial {
  std::string ca_cert, ca_key, server_cert, server_key, client_cert, client_key;
};

inline TlsMaterial MakeTlsMaterial(const TempDir& dir, const std::string& tag) {
  auto run = [&dir](const std::vector<std::string>& argv) {
    const RunResult result = Run(argv, dir.path(), std::chrono::seconds(30));
    INFO(result.err);
    REQUIRE(result.exit_code == 0);
  };
  TlsMaterial m;
  m.ca_cert = dir.File(tag + "-ca.pem");
  m.ca_key = dir.File(tag + "-ca.key");
  run({"/usr/bin/openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
       "-keyout", m.ca_key, "-out", m.ca_cert, "-days", "2", "-subj", "/CN=kmsplugin-test-ca-" + tag});
  auto issue = [&](const std::string& name, const std::string& cn, const std::string& ext, std::string& cert,
                   std::string& key) {
    key = dir.File(tag + "-" + name + ".key");
    cert = dir.File(tag + "-" + name + ".pem");
    const std::string csr = dir.File(tag + "-" + name + ".csr");
    const std::string extfile = dir.Write(tag + "-" + name + ".ext", ext);
    run({"/usr/bin/openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout",
         key, "-out", csr, "-subj", "/CN=" + cn});
    run({"/usr/bin/openssl", "x509", "-req", "-in", csr, "-CA", m.ca_cert, "-CAkey", m.ca_key, "-CAcreateserial",
         "-out", cert, "-days", "2", "-extfile", extfile});
  };
  issue("server", "localhost",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n", m.server_cert,
        m.server_key);
  issue("client", "kmsplugin-audit", "extendedKeyUsage=clientAuth\n", m.client_cert, m.client_key);
  return m;
}

struct EtcdFixtureOptions {
  std::optional<TlsMaterial> tls;  // TLS on the client port, with client-certificate auth
};

class EtcdFixture {
 public:
  explicit EtcdFixture(EtcdFixtureOptions options = {}) : options_(std::move(options)) {
    const int client_port = FreePort();
    int peer_port = FreePort();
    while (peer_port == client_port) {
      peer_port = FreePort();
    }
    const std::string scheme = options_.tls.has_value() ? "https://" : "http://";
    endpoint_ = "127.0.0.1:" + std::to_string(client_port);
    const std::string client_url = scheme + endpoint_;
    const std::string peer_url = "http://127.0.0.1:" + std::to_string(peer_port);
    std::vector<std::string> argv = {"/usr/bin/etcd",
                                     "--name=audit-test",
                                     "--data-dir=" + dir_.File("data"),
                                     "--listen-client-urls=" + client_url,
                                     "--advertise-client-urls=" + client_url,
                                     "--listen-peer-urls=" + peer_url,
                                     "--initial-advertise-peer-urls=" + peer_url,
                                     "--initial-cluster=audit-test=" + peer_url,
                                     "--initial-cluster-state=new",
                                     "--heartbeat-interval=10",
                                     "--election-timeout=100",
                                     "--logger=zap",
                                     "--log-level=error"};
    if (options_.tls.has_value()) {
      argv.push_back("--cert-file=" + options_.tls->server_cert);
      argv.push_back("--key-file=" + options_.tls->server_key);
      argv.push_back("--trusted-ca-file=" + options_.tls->ca_cert);
      argv.push_back("--client-cert-auth");
    }
    process_ = std::make_unique<Subprocess>(argv, dir_.path());
    WaitUntilServing();
  }

  const std::string& endpoint() const { return endpoint_; }
  // Client options that reach this etcd (with the right TLS files when TLS is on).
  audit::EtcdOptions ClientOptions() const {
    audit::EtcdOptions options;
    options.endpoints = {endpoint_};
    options.timeout = absl::Seconds(5);
    if (options_.tls.has_value()) {
      options.ca_file = options_.tls->ca_cert;
      options.cert_file = options_.tls->client_cert;
      options.key_file = options_.tls->client_key;
    }
    return options;
  }
  void Stop() { process_.reset(); }
  std::string Stderr() const { return process_ ? process_->Stderr() : ""; }

 private:
  void WaitUntilServing() {
    audit::EtcdOptions options = ClientOptions();
    options.timeout = absl::Seconds(1);
    auto client = audit::EtcdClient::New(options);
    REQUIRE(client.ok());
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    absl::Status last;
    while (std::chrono::steady_clock::now() < deadline) {
      if (!process_->Running()) {
        FAIL("etcd exited: " << process_->Stderr());
      }
      auto page = (*client)->Range("health", "", 1, 0);
      if (page.ok()) {
        return;
      }
      last = page.status();
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    FAIL("etcd did not answer within 20 s: " << last.ToString() << "\n" << process_->Stderr());
  }

  EtcdFixtureOptions options_;
  TempDir dir_;
  std::string endpoint_;
  std::unique_ptr<Subprocess> process_;
};

}  // namespace kmsplugin::testing
