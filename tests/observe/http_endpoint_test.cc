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

TEST_CASE("HTTP: connections over the limit are closed at once, and shutdown waits for none held",
          "[observe][hardening]") {
  observe::Registry registry;
  observe::HttpLimits limits;
  limits.workers = 2;
  limits.max_connections = 4;
  limits.request_deadline = absl::Minutes(5);  // the held connections stay held for the whole test
  auto endpoint = observe::HttpEndpoint::Start("127.0.0.1:0", registry, None, {}, limits);
  REQUIRE(endpoint.ok());
  const int port = (*endpoint)->port();
  std::vector<int> held;
  for (int i = 0; i < limits.max_connections; ++i) {
    held.push_back(TcpConnect(port));  // silent
  }
  // Once the server has taken the four, a fifth is closed at once (never queued).
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  bool refused_at_once = false;
  while (!refused_at_once && absl::Now() < deadline) {
    const int extra = TcpConnect(port);
    refused_at_once = ClosedWithin(extra, absl::Seconds(1)) && (*endpoint)->refused() > 0;
    close(extra);
  }
  CHECK(refused_at_once);
  for (const int fd : held) {
    CHECK_FALSE(ClosedWithin(fd, absl::Milliseconds(1)));
  }
  const absl::Time start = absl::Now();
  endpoint->reset();
  CHECK(absl::Now() - start < absl::Seconds(3));
  for (const int fd : held) {
    CHECK(ClosedWithin(fd, absl::Seconds(1)));  // shut down by the endpoint, not left hanging
    close(fd);
  }
}

TEST_CASE("HTTP: a client that trickles its request is cut off at the request deadline", "[observe][hardening]") {
  observe::Registry registry;
  observe::HttpLimits limits;
  limits.request_deadline = absl::Seconds(1);
  auto endpoint = observe::HttpEndpoint::Start("127.0.0.1:0", registry, None, {}, limits);
  REQUIRE(endpoint.ok());
  const int fd = TcpConnect((*endpoint)->port());
  const std::string request = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
  const absl::Time start = absl::Now();
  bool cut_off = false;
  for (size_t i = 0; i < request.size() && !cut_off; ++i) {
    cut_off = send(fd, &request[i], 1, MSG_NOSIGNAL) != 1 || ClosedWithin(fd, absl::Milliseconds(300));
  }
  CHECK(cut_off);  // 37 bytes at 300 ms would take 11 s; the deadline is 1 s
  CHECK(absl::Now() - start < absl::Seconds(10));
  close(fd);
}

}  // namespace
}  // namespace kmsplugin::testing
