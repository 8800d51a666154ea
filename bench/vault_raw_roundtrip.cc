// kms_vault_raw: the baseline for the Vault benchmark. N worker threads, each with its own libcurl easy handle
// (so its own keep-alive TLS connection, as the plugin's handle pool has), POST the same Transit request the
// plugin's vault key source sends (32-byte plaintext, associated data, explicit key_version) to the same server,
// closed loop, and time each round trip. No gRPC, no envelope: what is left between this and `kmsplugin serve`
// is the plugin's own added latency.
//
// Output: one JSON line in kms_loadgen's shape:
//   {"op","concurrency","duration_s","ops","errors","ops_per_sec","p50_us","p99_us","p999_us","max_us",
//    "calls_total","client_cpu_us_per_call"}
// Exit status: 0 on success, 1 when no call in the window succeeded, 2 on bad flags or setup failure.

#include <sys/resource.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <curl/curl.h>
#include <nlohmann/json.hpp>

namespace {

using Clock = std::chrono::steady_clock;

struct Options {
  std::string address;  // https://127.0.0.1:PORT
  std::string ca_file;
  std::string token_file;
  std::string key = "kms";
  std::string op = "encrypt";
  int key_version = 1;
  int concurrency = 1;
  double duration_s = 5.0;
  double warmup_s = 1.0;
};

size_t Collect(char* data, size_t size, size_t n, void* user) {
  static_cast<std::string*>(user)->append(data, size * n);
  return size * n;
}

std::string Base64(const std::string& in) {
  static const char* const kAlphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  size_t i = 0;
  for (; i + 2 < in.size(); i += 3) {
    const uint32_t v = (uint8_t(in[i]) << 16) | (uint8_t(in[i + 1]) << 8) | uint8_t(in[i + 2]);
    out += {kAlphabet[v >> 18], kAlphabet[(v >> 12) & 63], kAlphabet[(v >> 6) & 63], kAlphabet[v & 63]};
  }
  if (i + 1 == in.size()) {
    const uint32_t v = uint8_t(in[i]) << 16;
    out += {kAlphabet[v >> 18], kAlphabet[(v >> 12) & 63], '=', '='};
  } else if (i + 2 == in.size()) {
    const uint32_t v = (uint8_t(in[i]) << 16) | (uint8_t(in[i + 1]) << 8);
    out += {kAlphabet[v >> 18], kAlphabet[(v >> 12) & 63], kAlphabet[(v >> 6) & 63], '='};
  }
  return out;
}

// One keep-alive connection's worth of state.
class Worker {
 public:
  Worker(const Options& o, const std::string& token) : curl_(curl_easy_init()) {
    headers_ = curl_slist_append(headers_, ("X-Vault-Token: " + token).c_str());
    headers_ = curl_slist_append(headers_, "X-Vault-Request: true");
    headers_ = curl_slist_append(headers_, "Content-Type: application/json");
    curl_easy_setopt(curl_, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(curl_, CURLOPT_CAINFO, o.ca_file.c_str());
    curl_easy_setopt(curl_, CURLOPT_SSLVERSION, CURL_SSLVERSION_TLSv1_2);
    curl_easy_setopt(curl_, CURLOPT_HTTPHEADER, headers_);
    curl_easy_setopt(curl_, CURLOPT_TIMEOUT_MS, 3000L);
    curl_easy_setopt(curl_, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(curl_, CURLOPT_WRITEFUNCTION, Collect);
    curl_easy_setopt(curl_, CURLOPT_WRITEDATA, &reply_);
  }
  ~Worker() {
    curl_slist_free_all(headers_);
    curl_easy_cleanup(curl_);
  }
  // POSTs `body` to `url`; true on HTTP 200. The reply is kept for the caller.
  bool Post(const std::string& url, const std::string& body) {
    reply_.clear();
    curl_easy_setopt(curl_, CURLOPT_URL, url.c_str());
    curl_easy_setopt(curl_, CURLOPT_POSTFIELDS, body.c_str());
    curl_easy_setopt(curl_, CURLOPT_POSTFIELDSIZE, static_cast<long>(body.size()));
    if (curl_easy_perform(curl_) != CURLE_OK) {
      return false;
    }
    long status = 0;
    curl_easy_getinfo(curl_, CURLINFO_RESPONSE_CODE, &status);
    return status == 200;
  }
  const std::string& reply() const { return reply_; }

 private:
  CURL* curl_;
  curl_slist* headers_ = nullptr;
  std::string reply_;
};

struct Result {
  std::vector<uint32_t> latencies_ns;
  uint64_t errors = 0;
  uint64_t calls_total = 0;
};

}  // namespace

int main(int argc, char** argv) {
  Options o;
  CLI::App app{"Raw libcurl round trips to a Vault Transit server (keep-alive), in kms_loadgen's output shape"};
  app.add_option("--address", o.address, "Vault address, https://HOST:PORT")->required();
  app.add_option("--ca-file", o.ca_file, "CA bundle for the server certificate")->required();
  app.add_option("--token-file", o.token_file, "file holding the Vault token")->required();
  app.add_option("--key", o.key, "Transit key name");
  app.add_option("--key-version", o.key_version, "key_version sent with each encrypt");
  app.add_option("--op", o.op, "encrypt or decrypt")->check(CLI::IsMember({"encrypt", "decrypt"}));
  app.add_option("--concurrency", o.concurrency, "worker threads, one connection each")->check(CLI::Range(1, 1024));
  app.add_option("--duration", o.duration_s, "measured seconds");
  app.add_option("--warmup", o.warmup_s, "unmeasured seconds before");
  CLI11_PARSE(app, argc, argv);

  std::ifstream token_in(o.token_file);
  std::string token;
  std::getline(token_in, token);
  if (token.empty()) {
    std::fprintf(stderr, "kms_vault_raw: no token in %s\n", o.token_file.c_str());
    return 2;
  }
  curl_global_init(CURL_GLOBAL_DEFAULT);

  // The plugin's request: 32 bytes wrapped under an explicit version with associated data of the same size as
  // the plugin's envelope header binding.
  const std::string plaintext(32, 'k');
  const std::string aad = "kmsplugin/envelope/v1 bench key-v1 .........................";
  const std::string encrypt_url = o.address + "/v1/transit/encrypt/" + o.key;
  const std::string decrypt_url = o.address + "/v1/transit/decrypt/" + o.key;
  const std::string encrypt_body = nlohmann::json{{"plaintext", Base64(plaintext)},
                                                  {"associated_data", Base64(aad)},
                                                  {"key_version", o.key_version}}
                                       .dump();
  std::string decrypt_body;
  if (o.op == "decrypt") {
    Worker setup(o, token);
    if (!setup.Post(encrypt_url, encrypt_body)) {
      std::fprintf(stderr, "kms_vault_raw: setup encrypt failed: %s\n", setup.reply().c_str());
      return 2;
    }
    const auto reply = nlohmann::json::parse(setup.reply());
    decrypt_body = nlohmann::json{{"ciphertext", reply["data"]["ciphertext"]}, {"associated_data", Base64(aad)}}.dump();
  }
  const std::string& url = o.op == "encrypt" ? encrypt_url : decrypt_url;
  const std::string& body = o.op == "encrypt" ? encrypt_body : decrypt_body;

  const Clock::time_point start = Clock::now();
  const Clock::time_point window_start = start + std::chrono::duration_cast<Clock::duration>(
                                                     std::chrono::duration<double>(o.warmup_s));
  const Clock::time_point window_end = window_start + std::chrono::duration_cast<Clock::duration>(
                                                          std::chrono::duration<double>(o.duration_s));
  std::vector<Result> results(o.concurrency);
  std::vector<std::thread> threads;
  for (int t = 0; t < o.concurrency; ++t) {
    threads.emplace_back([&, t] {
      Worker worker(o, token);
      Result& r = results[t];
      r.latencies_ns.reserve(1 << 14);
      for (;;) {
        const Clock::time_point begin = Clock::now();
        if (begin >= window_end) {
          break;
        }
        const bool ok = worker.Post(url, body);
        const Clock::time_point end = Clock::now();
        ++r.calls_total;
        if (begin >= window_start && end <= window_end) {
          if (ok) {
            r.latencies_ns.push_back(static_cast<uint32_t>(
                std::min<int64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(end - begin).count(),
                                  UINT32_MAX)));
          } else {
            ++r.errors;
          }
        }
      }
    });
  }
  for (std::thread& thread : threads) {
    thread.join();
  }
  std::vector<uint32_t> all;
  uint64_t errors = 0, calls = 0;
  for (const Result& r : results) {
    all.insert(all.end(), r.latencies_ns.begin(), r.latencies_ns.end());
    errors += r.errors;
    calls += r.calls_total;
  }
  std::sort(all.begin(), all.end());
  auto pct = [&](double p) -> double {
    if (all.empty()) return 0.0;
    size_t rank = static_cast<size_t>(std::ceil(p * all.size()));
    rank = std::clamp<size_t>(rank, 1, all.size());
    return all[rank - 1] / 1000.0;
  };
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  const double cpu_us = usage.ru_utime.tv_sec * 1e6 + usage.ru_utime.tv_usec + usage.ru_stime.tv_sec * 1e6 +
                        usage.ru_stime.tv_usec;
  nlohmann::json out = {{"op", "raw" + o.op},
                        {"concurrency", o.concurrency},
                        {"duration_s", o.duration_s},
                        {"ops", all.size()},
                        {"errors", errors},
                        {"ops_per_sec", all.size() / o.duration_s},
                        {"p50_us", pct(0.50)},
                        {"p99_us", pct(0.99)},
                        {"p999_us", pct(0.999)},
                        {"max_us", all.empty() ? 0.0 : all.back() / 1000.0},
                        {"calls_total", calls},
                        {"errors_by_code", nlohmann::json::object()},
                        {"client_cpu_us_per_call", calls ? cpu_us / calls : 0.0}};
  std::printf("%s\n", out.dump().c_str());
  curl_global_cleanup();
  return all.empty() ? 1 : 0;
}
