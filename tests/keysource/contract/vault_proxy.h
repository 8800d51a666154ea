#pragma once

// VaultProxy: a plain-HTTP proxy on loopback between a Vault key source and the Vault-API test server, for the
// two faults the test server itself cannot play:
// - a listener that goes away (connection refused) and comes back on the same address: Stop(), then Start();
// - a lagging replica: Freeze() remembers the last key read (GET /v1/<mount>/keys/<key>) the server answered, and
//   while ServeFrozen(true) every key read gets that older answer instead of the server's.
// Everything else is forwarded as is (method, path, body, the X-Vault-* headers; status, body, Retry-After and
// Location back). One upstream request per request, no retries. Thread-safe.

#include <chrono>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>

#include <httplib.h>

namespace kmsplugin::testing {

class VaultProxy {
 public:
  VaultProxy(int upstream_port, std::string key_read_path)
      : upstream_port_(upstream_port), key_read_path_(std::move(key_read_path)) {
    Start();
  }
  ~VaultProxy() { Stop(); }
  VaultProxy(const VaultProxy&) = delete;
  VaultProxy& operator=(const VaultProxy&) = delete;

  std::string Address() const { return "http://127.0.0.1:" + std::to_string(port_); }

  // Listens again on the port of the first Start (any free port the first time).
  void Start() {
    std::lock_guard<std::mutex> lock(run_mu_);
    if (server_ != nullptr) {
      return;
    }
    auto server = std::make_unique<httplib::Server>();
    auto handler = [this](const httplib::Request& request, httplib::Response& response) {
      Forward(request, response);
    };
    server->Get(".*", handler);
    server->Post(".*", handler);
    server->Put(".*", handler);
    server->Delete(".*", handler);
    server->set_keep_alive_timeout(30);
    if (port_ == 0) {
      port_ = server->bind_to_any_port("127.0.0.1");
      if (port_ <= 0) {
        throw std::runtime_error("VaultProxy: cannot bind");
      }
    } else {
      bool bound = false;
      for (int i = 0; i < 100 && !bound; ++i) {
        bound = server->bind_to_port("127.0.0.1", port_);
        if (!bound) {
          std::this_thread::sleep_for(std::chrono::milliseconds(20));
        }
      }
      if (!bound) {
        throw std::runtime_error("VaultProxy: cannot bind again to port " + std::to_string(port_));
      }
    }
    httplib::Server* raw = server.get();
    thread_ = std::thread([raw] { raw->listen_after_bind(); });
    while (!raw->is_running()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    server_ = std::move(server);
  }

  // Closes the listener and every connection: the address refuses connections until Start().
  void Stop() {
    std::lock_guard<std::mutex> lock(run_mu_);
    if (server_ == nullptr) {
      return;
    }
    server_->stop();
    thread_.join();
    server_.reset();
  }

  void Freeze() {
    std::lock_guard<std::mutex> lock(mu_);
    frozen_ = last_key_read_;
    if (frozen_.empty()) {
      throw std::runtime_error("VaultProxy: no key read seen yet to freeze");
    }
  }
  void ServeFrozen(bool on) {
    std::lock_guard<std::mutex> lock(mu_);
    serve_frozen_ = on;
  }

 private:
  void Forward(const httplib::Request& request, httplib::Response& response) {
    if (request.method == "GET" && request.path == key_read_path_) {
      std::lock_guard<std::mutex> lock(mu_);
      if (serve_frozen_) {
        response.status = 200;
        response.set_content(frozen_, "application/json");
        return;
      }
    }
    httplib::Client client("127.0.0.1", upstream_port_);
    client.set_connection_timeout(5);
    client.set_read_timeout(150);
    client.set_write_timeout(10);
    httplib::Headers headers;
    for (const char* name : {"X-Vault-Token", "X-Vault-Namespace", "X-Vault-Request", "Authorization"}) {
      if (request.has_header(name)) {
        headers.emplace(name, request.get_header_value(name));
      }
    }
    const std::string type =
        request.has_header("Content-Type") ? request.get_header_value("Content-Type") : "application/json";
    httplib::Result result = [&] {
      if (request.method == "GET") {
        return client.Get(request.path, headers);
      }
      if (request.method == "POST") {
        return client.Post(request.path, headers, request.body, type);
      }
      if (request.method == "PUT") {
        return client.Put(request.path, headers, request.body, type);
      }
      return client.Delete(request.path, headers, request.body, type);
    }();
    if (!result) {
      response.status = 502;
      response.set_content("{\"errors\":[\"proxy: upstream unreachable\"]}", "application/json");
      return;
    }
    response.status = result->status;
    for (const char* name : {"Retry-After", "Location"}) {
      if (result->has_header(name)) {
        response.set_header(name, result->get_header_value(name));
      }
    }
    response.set_content(result->body, "application/json");
    if (request.method == "GET" && request.path == key_read_path_ && result->status == 200) {
      std::lock_guard<std::mutex> lock(mu_);
      last_key_read_ = result->body;
    }
  }

  const int upstream_port_;
  const std::string key_read_path_;
  int port_ = 0;

  std::mutex run_mu_;
  std::unique_ptr<httplib::Server> server_;
  std::thread thread_;

  std::mutex mu_;
  std::string last_key_read_;
  std::string frozen_;
  bool serve_frozen_ = false;
};

}  // namespace kmsplugin::testing
