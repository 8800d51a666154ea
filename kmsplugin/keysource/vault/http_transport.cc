#include "kmsplugin/keysource/vault/http_transport.h"

#include <curl/curl.h>

#include <algorithm>
#include <cctype>
#include <mutex>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "crypto/secret_bytes.h"

namespace kmsplugin::keysource::vault {
namespace {

constexpr size_t kMaxResponseBytes = 1 << 20;

void GlobalInit() {
  static std::once_flag once;
  std::call_once(once, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
}

struct Collected {
  std::string* body;
  HttpResponse* response;
  bool too_big = false;
};

size_t OnBody(char* data, size_t size, size_t nmemb, void* user) {
  auto* c = static_cast<Collected*>(user);
  size_t n = size * nmemb;
  if (c->body->size() + n > kMaxResponseBytes) {
    c->too_big = true;
    return 0;
  }
  c->body->append(data, n);
  return n;
}

size_t OnHeader(char* data, size_t size, size_t nmemb, void* user) {
  auto* c = static_cast<Collected*>(user);
  size_t n = size * nmemb;
  absl::string_view line(data, n);
  size_t colon = line.find(':');
  if (colon == absl::string_view::npos) {
    if (absl::StartsWith(line, "HTTP/")) {  // a new response (after 100-continue): forget old headers
      c->response->location.clear();
      c->response->retry_after.reset();
    }
    return n;
  }
  std::string name = absl::AsciiStrToLower(line.substr(0, colon));
  absl::string_view value = absl::StripAsciiWhitespace(line.substr(colon + 1));
  if (name == "location") {
    c->response->location = std::string(value);
  } else if (name == "retry-after") {
    int64_t seconds = 0;
    if (absl::SimpleAtoi(value, &seconds) && seconds >= 0) {
      c->response->retry_after = absl::Seconds(seconds);
    }
  }
  return n;
}

void WipeList(curl_slist* list) {
  for (curl_slist* p = list; p != nullptr; p = p->next) {
    crypto::Wipe(p->data, strlen(p->data));
  }
  curl_slist_free_all(list);
}

}  // namespace

void WipeString(std::string& s) {
  if (!s.empty()) {
    crypto::Wipe(s.data(), s.size());
  }
  s.clear();
}

absl::StatusOr<std::unique_ptr<HttpTransport>> HttpTransport::New(TlsOptions tls, size_t max_handles) {
  GlobalInit();
  curl_version_info_data* info = curl_version_info(CURLVERSION_NOW);
  if (info == nullptr || (info->features & CURL_VERSION_SSL) == 0) {
    return absl::FailedPreconditionError("libcurl was built without TLS support; fix: install libcurl4-openssl");
  }
  return std::unique_ptr<HttpTransport>(new HttpTransport(std::move(tls), std::max<size_t>(1, max_handles)));
}

HttpTransport::~HttpTransport() {
  absl::MutexLock lock(&mu_);
  for (void* h : free_) {
    curl_easy_cleanup(static_cast<CURL*>(h));
  }
}

void* HttpTransport::Acquire(absl::Time deadline) {
  absl::MutexLock lock(&mu_);
  auto available = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return !free_.empty() || created_ < max_handles_; };
  if (!mu_.AwaitWithDeadline(absl::Condition(&available), deadline)) {
    return nullptr;
  }
  if (!free_.empty()) {
    void* h = free_.back();
    free_.pop_back();
    return h;
  }
  CURL* h = curl_easy_init();
  if (h != nullptr) {
    ++created_;
  }
  return h;
}

void HttpTransport::Release(void* handle) {
  absl::MutexLock lock(&mu_);
  free_.push_back(handle);
}

HttpResponse HttpTransport::Send(HttpRequest& request, absl::Duration timeout, absl::Time deadline) {
  HttpResponse response;
  absl::Time end = std::min(absl::Now() + timeout, deadline);
  CURL* curl = static_cast<CURL*>(Acquire(end));
  if (curl == nullptr) {
    response.transport = absl::Now() >= deadline
                             ? absl::DeadlineExceededError("deadline passed while waiting for an HTTP connection slot")
                             : absl::UnavailableError("no HTTP connection slot became free in time");
    return response;
  }
  curl_easy_reset(curl);  // keeps the connection cache

  int64_t ms = std::max<int64_t>(1, absl::ToInt64Milliseconds(end - absl::Now()));
  std::string body_out;
  Collected collected{&body_out, &response};
  curl_slist* headers = nullptr;
  for (std::string& h : request.headers) {
    headers = curl_slist_append(headers, h.c_str());
    WipeString(h);
  }
  request.headers.clear();
  headers = curl_slist_append(headers, "Content-Type: application/json");
  headers = curl_slist_append(headers, "Expect:");
  curl_slist* connect_to = nullptr;
  if (!request.connect_to.empty()) {
    connect_to = curl_slist_append(nullptr, request.connect_to.c_str());
  }
  char error_buffer[CURL_ERROR_SIZE] = {0};

  curl_easy_setopt(curl, CURLOPT_URL, request.url.c_str());
  curl_easy_setopt(curl, CURLOPT_PROTOCOLS_STR, "http,https");
  curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(curl, CURLOPT_FOLLOWLOCATION, 0L);
  curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS, static_cast<long>(ms));
  curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT_MS, static_cast<long>(ms));
  curl_easy_setopt(curl, CURLOPT_TCP_KEEPALIVE, 1L);
  curl_easy_setopt(curl, CURLOPT_ERRORBUFFER, error_buffer);
  curl_easy_setopt(curl, CURLOPT_HTTPHEADER, headers);
  curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, OnBody);
  curl_easy_setopt(curl, CURLOPT_WRITEDATA, &collected);
  curl_easy_setopt(curl, CURLOPT_HEADERFUNCTION, OnHeader);
  curl_easy_setopt(curl, CURLOPT_HEADERDATA, &collected);
  curl_easy_setopt(curl, CURLOPT_SSLVERSION, static_cast<long>(CURL_SSLVERSION_TLSv1_2));
  curl_easy_setopt(curl, CURLOPT_SSL_VERIFYPEER, 1L);
  curl_easy_setopt(curl, CURLOPT_SSL_VERIFYHOST, 2L);
  if (!tls_.ca_file.empty()) {
    curl_easy_setopt(curl, CURLOPT_CAINFO, tls_.ca_file.c_str());
  }
  if (!tls_.cert_file.empty()) {
    curl_easy_setopt(curl, CURLOPT_SSLCERT, tls_.cert_file.c_str());
    curl_easy_setopt(curl, CURLOPT_SSLKEY, tls_.key_file.c_str());
  }
  if (connect_to != nullptr) {
    curl_easy_setopt(curl, CURLOPT_CONNECT_TO, connect_to);
  }
  if (request.method == "GET") {
    curl_easy_setopt(curl, CURLOPT_HTTPGET, 1L);
  } else {
    curl_easy_setopt(curl, CURLOPT_CUSTOMREQUEST, request.method.c_str());
    curl_easy_setopt(curl, CURLOPT_POSTFIELDS, request.body.c_str());
    curl_easy_setopt(curl, CURLOPT_POSTFIELDSIZE, static_cast<long>(request.body.size()));
  }

  CURLcode rc = curl_easy_perform(curl);
  curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &response.status);
  // Drop the header list from the handle before wiping it.
  curl_easy_setopt(curl, CURLOPT_HTTPHEADER, nullptr);
  curl_easy_setopt(curl, CURLOPT_CONNECT_TO, nullptr);
  curl_easy_setopt(curl, CURLOPT_ERRORBUFFER, nullptr);
  WipeList(headers);
  curl_slist_free_all(connect_to);

  if (rc == CURLE_OK) {
    response.transport = absl::OkStatus();
    response.body = std::move(body_out);
  } else {
    WipeString(body_out);
    std::string detail = error_buffer[0] != '\0' ? error_buffer : curl_easy_strerror(rc);
    std::string what = absl::StrCat(request.method, " ", request.url, ": ", detail);
    switch (rc) {
      case CURLE_OPERATION_TIMEDOUT:
        response.transport = absl::Now() >= deadline ? absl::DeadlineExceededError(what)
                                                     : absl::UnavailableError(absl::StrCat("timed out: ", what));
        break;
      case CURLE_PEER_FAILED_VERIFICATION:
      case CURLE_SSL_CACERT_BADFILE:
      case CURLE_SSL_CERTPROBLEM:
      case CURLE_SSL_ISSUER_ERROR:
        response.retryable = false;
        response.transport = absl::UnavailableError(absl::StrCat(
            "TLS verification failed: ", what,
            "; fix: set tls.caFile to the CA bundle that signed Vault's certificate (and tls.serverName if the "
            "certificate names another host), or check tls.certFile/tls.keyFile"));
        break;
      case CURLE_UNSUPPORTED_PROTOCOL:
      case CURLE_URL_MALFORMAT:
        response.retryable = false;
        response.transport = absl::UnavailableError(absl::StrCat("bad Vault URL: ", what));
        break;
      case CURLE_WRITE_ERROR:
        response.transport = absl::UnavailableError(
            collected.too_big ? absl::StrCat("response larger than 1 MiB: ", request.method, " ", request.url)
                              : what);
        break;
      default:
        response.transport = absl::UnavailableError(what);
    }
  }
  Release(curl);
  return response;
}

}  // namespace kmsplugin::keysource::vault
