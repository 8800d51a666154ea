// The HTTP endpoint's bounds (issue 11, item 3): liveness that names a socket, connections over the limit closed
// at once, the whole-exchange deadline, and a shutdown that no held connection delays.

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <vector>

#include <catch2/catch.hpp>
#include <httplib.h>

#include "absl/time/clock.h"
#include "kmsplugin/observe/http_endpoint.h"

namespace kmsplugin::testing {
namespace {

bool Has(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

int TcpConnect(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  REQUIRE(fd >= 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<uint16_t>(port));
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0);
  return fd;
}

// True when the server closes `fd` (EOF or reset) within `timeout`.
bool ClosedWithin(int fd, absl::Duration timeout) {
  pollfd p{fd, POLLIN, 0};
  if (poll(&p, 1, static_cast<int>(absl::ToInt64Milliseconds(timeout))) <= 0) {
    return false;
  }
  char byte;
  return recv(fd, &byte, 1, MSG_DONTWAIT) <= 0;
}

std::vector<observe::Readiness> None() { return {}; }

TEST_CASE("HTTP: /healthz fails with 503 naming what the liveness list says is down, and recovers",
          "[observe][hardening]") {
  observe::Registry registry;
  std::atomic<bool> answering{true};
  auto endpoint = observe::HttpEndpoint::Start("127.0.0.1:0", registry, None, [&answering] {
    return std::vector<observe::Readiness>{
        {"dev", answering.load(), "socket /run/kmsplugin/dev.sock does not answer: connection refused"}};
  });
  REQUIRE(endpoint.ok());
  httplib::Client client("127.0.0.1", (*endpoint)->port());
  CHECK(client.Get("/healthz")->status == 200);
  answering = false;
  auto down = client.Get("/healthz");
  REQUIRE(down);
  CHECK(down->status == 503);
  CHECK(Has(down->body, "dev: socket /run/kmsplugin/dev.sock does not answer"));
  answering = true;
  CHECK(client.Get("/healthz")->status == 200);
}

TEST_CASE("HTTP: connections over the limit are closed at once, silent ones at the deadline, and shutdown waits "
          "for none",
          "[observe][hardening]") {
  observe::Registry registry;
  auto endpoint = observe::HttpEndpoint::Start("127.0.0.1:0", registry, None);
  REQUIRE(endpoint.ok());
  const int port = (*endpoint)->port();
  std::vector<int> held;
  for (int i = 0; i < observe::HttpEndpoint::kMaxConnections; ++i) {
    held.push_back(TcpConnect(port));  // silent: each is held until the request deadline
  }
  // The server has taken them all (some may already be closed if this machine is slow: then they freed room).
  const absl::Time deadline = absl::Now() + absl::Seconds(20);
  int extra = -1;
  bool refused_at_once = false;
  while (!refused_at_once && absl::Now() < deadline) {
    extra = TcpConnect(port);
    refused_at_once = ClosedWithin(extra, absl::Milliseconds(500)) && (*endpoint)->refused() > 0;
    close(extra);
  }
  CHECK(refused_at_once);
  // A silent connection is closed at the request deadline, not held for ever.
  CHECK(ClosedWithin(held.front(), observe::HttpEndpoint::kRequestDeadline + absl::Seconds(20)));
  // With connections held, the endpoint still stops at once.
  for (int i = 0; i < 4; ++i) {
    held.push_back(TcpConnect(port));
  }
  const absl::Time start = absl::Now();
  endpoint->reset();
  CHECK(absl::Now() - start < absl::Seconds(3));
  for (int fd : held) {
    close(fd);
  }
}

}  // namespace
}  // namespace kmsplugin::testing
