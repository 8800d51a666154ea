#pragma once

// HttpEndpoint: /metrics (Prometheus text), /healthz (the process is alive and every socket answers; 503 naming
// the socket otherwise) and /readyz (every environment's backend is healthy; 503 with the reasons otherwise), on
// a loopback address by default.
//
// Bounded so that slow or many clients never starve a probe (issue 11, item 3):
// - one request per connection, answered with "Connection: close" (kubelet probes and Prometheus both cope);
// - one deadline for the whole exchange (reading the request, writing the answer), not a timeout per read, so
//   a client sending one header byte a second is cut off like a silent one;
// - a byte budget per connection;
// - a few worker threads serve connections; a bounded number are held (served or waiting); one more is closed at
//   once, never queued (HttpLimits: the values);
// - shutdown closes every connection still held, so no client delays the exit.
//
// With a TlsServerContext the endpoint speaks only TLS (1.2 or newer) and serves only clients that present a
// certificate from the context's client CA (http.tls: an in-cluster Prometheus scraping a hostNetwork pod). The
// handshake runs on the worker inside the exchange's one deadline, so a client that stalls it holds a worker no
// longer than a silent plain-HTTP client; plain HTTP sent to it fails the handshake and is closed at once.

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "kmsplugin/observe/metrics.h"
#include "kmsplugin/observe/tls_context.h"

namespace kmsplugin::observe {

struct Readiness {
  std::string environment;
  bool ready = false;
  std::string reason;  // "ok" or why not
};

struct HttpLimits {
  int workers = 16;  // far more than the probes and scrapers of one node
  int max_connections = 64;
  absl::Duration request_deadline = absl::Seconds(5);
  size_t max_request_bytes = 16 * 1024;
};

class HttpEndpoint {
 public:

  // `listen` is HOST:PORT; port 0 picks a free port (see port()). `liveness` (optional) lists what /healthz
  // depends on besides the process being up (each served socket answering); `ready` false there fails it.
  static absl::StatusOr<std::unique_ptr<HttpEndpoint>> Start(const std::string& listen, const Registry& registry,
                                                             std::function<std::vector<Readiness>()> readiness,
                                                             std::function<std::vector<Readiness>()> liveness = {},
                                                             HttpLimits limits = {},
                                                             std::shared_ptr<const TlsServerContext> tls = nullptr);
  ~HttpEndpoint();
  HttpEndpoint(const HttpEndpoint&) = delete;
  HttpEndpoint& operator=(const HttpEndpoint&) = delete;

  int port() const { return port_; }
  // Connections closed at once because max_connections were held.
  uint64_t refused() const;
  // TLS connections closed because the handshake failed or did not finish within the deadline.
  uint64_t tls_handshake_failures() const;
  // A TLS endpoint: the context for connections accepted from now on (a SIGHUP reload of the files). Ignored on a
  // plain endpoint, and for null.
  void SetTls(std::shared_ptr<const TlsServerContext> tls);

  class Server;  // http_endpoint.cc

 private:
  HttpEndpoint() = default;
  std::unique_ptr<Server> server_;
  std::thread thread_;
  int port_ = 0;
  bool tls_ = false;
};

}  // namespace kmsplugin::observe
