#pragma once

// HttpTransport: one HTTP(S) exchange over libcurl, with keep-alive reuse.
//
// A bounded pool of curl easy handles (one per concurrent caller, at most `max_handles`) keeps connections
// alive between calls: N sequential calls to one address use one TCP connection. TLS 1.2 or newer, with an
// optional CA bundle, client certificate and a server-name override (CURLOPT_CONNECT_TO: the URL names the
// expected server name, the connection goes to the real address). Redirects are never followed here.
//
// Secrets: request headers (the token) and bodies are wiped from our buffers and from curl's header list after
// each exchange. Thread-safe.

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "kmsplugin/keysource/vault/vault_options.h"

namespace kmsplugin::keysource::vault {

struct HttpRequest {
  std::string method = "GET";
  std::string url;         // full URL
  std::string connect_to;  // CURLOPT_CONNECT_TO entry "name:port:host:port", or empty
  std::vector<std::string> headers;  // "Name: value"; may hold the token, wiped after use
  std::string body;                  // may hold secrets; the caller wipes it
};

struct HttpResponse {
  // OK when an HTTP response arrived. Otherwise UNAVAILABLE or DEADLINE_EXCEEDED naming the URL and the cause.
  absl::Status transport;
  bool retryable = true;  // false for failures a retry cannot fix (TLS verification, bad URL)
  long status = 0;
  std::string body;
  std::string location;                     // Location header
  std::optional<absl::Duration> retry_after;  // Retry-After header (seconds form)
};

class HttpTransport {
 public:
  static absl::StatusOr<std::unique_ptr<HttpTransport>> New(TlsOptions tls, size_t max_handles);
  virtual ~HttpTransport();
  HttpTransport(const HttpTransport&) = delete;
  HttpTransport& operator=(const HttpTransport&) = delete;

  // One exchange, bounded by `timeout` (CURLOPT_TIMEOUT_MS) and by `deadline` (the earlier wins).
  // Virtual for one reason: the Vault response fuzz target (tests/fuzz) answers from its input instead of a network.
  virtual HttpResponse Send(HttpRequest& request, absl::Duration timeout, absl::Time deadline);

 protected:
  // For a transport that overrides Send and never uses curl.
  HttpTransport() : HttpTransport(TlsOptions{}, 0) {}

 private:
  HttpTransport(TlsOptions tls, size_t max_handles) : tls_(std::move(tls)), max_handles_(max_handles) {}
  void* Acquire(absl::Time deadline);
  void Release(void* handle);

  const TlsOptions tls_;
  const size_t max_handles_;
  absl::Mutex mu_;
  std::vector<void*> free_ ABSL_GUARDED_BY(mu_);
  size_t created_ ABSL_GUARDED_BY(mu_) = 0;
};

// Overwrites and clears a std::string that held a secret.
void WipeString(std::string& s);

}  // namespace kmsplugin::keysource::vault
