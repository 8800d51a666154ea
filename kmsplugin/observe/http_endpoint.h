#pragma once

// HttpEndpoint: /metrics (Prometheus text), /healthz (the process is alive) and /readyz (every environment's
// backend is healthy; 503 with the reasons otherwise), on a loopback address by default. Two threads at most.

#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "kmsplugin/observe/metrics.h"

namespace httplib {
class Server;
}

namespace kmsplugin::observe {

struct Readiness {
  std::string environment;
  bool ready = false;
  std::string reason;  // "ok" or why not
};

class HttpEndpoint {
 public:
  // `listen` is HOST:PORT; port 0 picks a free port (see port()).
  static absl::StatusOr<std::unique_ptr<HttpEndpoint>> Start(const std::string& listen, const Registry& registry,
                                                             std::function<std::vector<Readiness>()> readiness);
  ~HttpEndpoint();
  HttpEndpoint(const HttpEndpoint&) = delete;
  HttpEndpoint& operator=(const HttpEndpoint&) = delete;

  int port() const { return port_; }

 private:
  HttpEndpoint() = default;
  std::unique_ptr<httplib::Server> server_;
  std::thread thread_;
  int port_ = 0;
};

}  // namespace kmsplugin::observe
