// Metrics exposition, the HTTP endpoint (/metrics, /healthz, /readyz) and JSON log lines.

#include <cstdlib>
#include <fstream>
#include <sstream>

#include <httplib.h>
#include <nlohmann/json.hpp>
#include <spdlog/sinks/ostream_sink.h>
#include <catch2/catch.hpp>

#include "kmsplugin/observe/http_endpoint.h"
#include "kmsplugin/observe/instrumented_key_source.h"
#include "kmsplugin/observe/log.h"
#include "kmsplugin/observe/metrics.h"
#include "tests/support/temp_dir.h"

namespace kmsplugin::testing {
namespace {

using observe::Registry;

bool Has(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

void Fill(Registry& registry) {
  registry.GetCounter("kms_test_requests_total", "Requests.", {{"code", "OK"}, {"rpc", "Encrypt"}}).Increment(3);
  registry.GetCounter("kms_test_requests_total", "Requests.", {{"code", "INVALID_ARGUMENT"}, {"rpc", "Encrypt"}})
      .Increment();
  auto& histogram = registry.GetHistogram("kms_test_duration_seconds", "Latency.", {{"rpc", "Encrypt"}});
  histogram.Observe(0.0002);
  histogram.Observe(0.003);
  histogram.Observe(20.0);
  registry.AddGaugeCollector("kms_test_info", "Info with \"quotes\" and \\ backslash.", [] {
    return std::vector<observe::Sample>{{{{"key_id", "a\"b\\c\nd"}}, 1}};
  });
}

std::string FilledRender() {
  Registry registry;
  Fill(registry);
  return registry.Render();
}

TEST_CASE("Metrics: counters render with HELP, TYPE and one line per label set", "[observe]") {
  const std::string text = FilledRender();
  CHECK(Has(text, "# TYPE kms_test_requests_total counter\n"));
  CHECK(Has(text, "kms_test_requests_total{code=\"OK\",rpc=\"Encrypt\"} 3\n"));
  CHECK(Has(text, "kms_test_requests_total{code=\"INVALID_ARGUMENT\",rpc=\"Encrypt\"} 1\n"));
}

TEST_CASE("Metrics: histogram buckets are cumulative and end in +Inf, with sum and count", "[observe]") {
  const std::string text = FilledRender();
  CHECK(Has(text, "kms_test_duration_seconds_bucket{rpc=\"Encrypt\",le=\"0.0001\"} 0\n"));
  CHECK(Has(text, "kms_test_duration_seconds_bucket{rpc=\"Encrypt\",le=\"0.00025\"} 1\n"));
  CHECK(Has(text, "kms_test_duration_seconds_bucket{rpc=\"Encrypt\",le=\"0.005\"} 2\n"));
  CHECK(Has(text, "kms_test_duration_seconds_bucket{rpc=\"Encrypt\",le=\"10\"} 2\n"));
  CHECK(Has(text, "kms_test_duration_seconds_bucket{rpc=\"Encrypt\",le=\"+Inf\"} 3\n"));
  CHECK(Has(text, "kms_test_duration_seconds_count{rpc=\"Encrypt\"} 3\n"));
  CHECK(Has(text, "kms_test_duration_seconds_sum{rpc=\"Encrypt\"} 20.0032\n"));
}

TEST_CASE("Metrics: label values and help text are escaped", "[observe]") {
  const std::string text = FilledRender();
  CHECK(Has(text, "kms_test_info{key_id=\"a\\\"b\\\\c\\nd\"} 1\n"));
  CHECK(Has(text, "# HELP kms_test_info Info with \"quotes\" and \\\\ backslash.\n"));
}

TEST_CASE("Metrics: the exposition passes promtool check metrics", "[observe]") {
  TempDir dir;
  Registry registry;
  Fill(registry);
  registry.GetCounter("kmsplugin_grpc_requests_total", "KMS gRPC calls.", {{"environment", "dev"}, {"code", "OK"}})
      .Increment();
  const std::string file = dir.Write("metrics.txt", registry.Render());
  REQUIRE(std::system("command -v promtool >/dev/null") == 0);
  const std::string out = dir.File("promtool.out");
  const int rc = std::system(("promtool check metrics < " + file + " > " + out + " 2>&1").c_str());
  INFO(ReadWholeFile(out));
  CHECK(rc == 0);
}

TEST_CASE("Metrics: a gauge collector's series follow the state at each scrape", "[observe]") {
  Registry registry;
  std::string key_id = "v1";
  registry.AddGaugeCollector("kms_test_key_info", "Current key.", [&key_id] {
    return std::vector<observe::Sample>{{{{"key_id", key_id}}, 1}};
  });
  CHECK(Has(registry.Render(), "key_id=\"v1\""));
  key_id = "v2";
  const std::string after = registry.Render();
  CHECK(Has(after, "key_id=\"v2\""));
  CHECK(!Has(after, "key_id=\"v1\""));
}

TEST_CASE("HTTP: /metrics, /healthz and /readyz answer, /readyz 503 with the reason when unhealthy", "[observe]") {
  Registry registry;
  Fill(registry);
  std::atomic<bool> healthy{true};
  auto endpoint = observe::HttpEndpoint::Start("127.0.0.1:0", registry, [&healthy] {
    return std::vector<observe::Readiness>{{"dev", true, "ok"},
                                           {"prod", healthy.load(), healthy.load() ? "ok" : "vault unreachable"}};
  });
  REQUIRE(endpoint.ok());
  httplib::Client client("127.0.0.1", (*endpoint)->port());
  auto metrics = client.Get("/metrics");
  REQUIRE(metrics);
  CHECK(metrics->status == 200);
  CHECK(Has(metrics->body, "kms_test_requests_total"));
  CHECK(Has(metrics->get_header_value("Content-Type"), "version=0.0.4"));
  auto healthz = client.Get("/healthz");
  REQUIRE(healthz);
  CHECK(healthz->status == 200);
  auto ready = client.Get("/readyz");
  REQUIRE(ready);
  CHECK(ready->status == 200);
  healthy = false;
  auto not_ready = client.Get("/readyz");
  REQUIRE(not_ready);
  CHECK(not_ready->status == 503);
  CHECK(Has(not_ready->body, "prod: vault unreachable"));
  CHECK(Has(not_ready->body, "dev: ok"));
  auto missing = client.Get("/nothing-here");
  REQUIRE(missing);
  CHECK(missing->status == 404);
}

TEST_CASE("HTTP: a malformed or taken listen address is refused with a clear error", "[observe]") {
  Registry registry;
  auto ready = [] { return std::vector<observe::Readiness>{}; };
  for (const std::string& bad : {"9880", "localhost", "127.0.0.1:99999", ":80", "127.0.0.1:http"}) {
    auto endpoint = observe::HttpEndpoint::Start(bad, registry, ready);
    INFO(bad);
    CHECK(!endpoint.ok());
    CHECK(Has(std::string(endpoint.status().message()), "fix:"));
  }
  auto first = observe::HttpEndpoint::Start("127.0.0.1:0", registry, ready);
  REQUIRE(first.ok());
  auto second = observe::HttpEndpoint::Start("127.0.0.1:" + std::to_string((*first)->port()), registry, ready);
  CHECK(!second.ok());
}

TEST_CASE("Logs: every line is one JSON object with time, level, msg and the fields", "[observe]") {
  std::ostringstream out;
  auto sink = std::make_shared<spdlog::sinks::ostream_sink_mt>(out);
  auto logger = std::make_shared<spdlog::logger>("observe-test", sink);
  logger->set_formatter(observe::MakeJsonFormatter());
  auto previous = spdlog::default_logger();
  spdlog::set_default_logger(logger);
  observe::Log(spdlog::level::warn, "rpc failed",
               {{"environment", "dev"}, {"code", "INVALID_ARGUMENT"}, {"latency_ms", 0.25},
                {"error", "quote \" newline \n and bad utf8 \xff"}});
  spdlog::info("plain text with \"quotes\"");
  spdlog::set_default_logger(previous);
  std::istringstream lines(out.str());
  std::string line;
  std::vector<nlohmann::json> parsed;
  while (std::getline(lines, line)) {
    INFO(line);
    REQUIRE(nlohmann::json::accept(line));
    parsed.push_back(nlohmann::json::parse(line));
  }
  REQUIRE(parsed.size() == 2);
  CHECK(parsed[0]["level"] == "warn");
  CHECK(parsed[0]["msg"] == "rpc failed");
  CHECK(parsed[0]["environment"] == "dev");
  CHECK(parsed[0]["latency_ms"] == 0.25);
  CHECK(parsed[0]["time"].get<std::string>().back() == 'Z');
  CHECK(parsed[1]["msg"] == "plain text with \"quotes\"");
}

TEST_CASE("Logs: a string field longer than the cap is cut and says its length, with control characters escaped",
          "[observe][log]") {
  std::ostringstream out;
  auto sink = std::make_shared<spdlog::sinks::ostream_sink_mt>(out);
  auto logger = std::make_shared<spdlog::logger>("observe-test", sink);
  logger->set_formatter(observe::MakeJsonFormatter());
  auto previous = spdlog::default_logger();
  spdlog::set_default_logger(logger);
  const std::string huge(32000, 'u');
  observe::Log(spdlog::level::warn, std::string(5000, 'm'),
               {{"uid", huge}, {"nested", nlohmann::json::array({huge, "short"})}, {"ctl", "a\x01" "b\nc\x1b[31m"}});
  spdlog::warn("{}", huge);
  spdlog::set_default_logger(previous);
  std::istringstream lines(out.str());
  std::string line;
  std::vector<nlohmann::json> parsed;
  while (std::getline(lines, line)) {
    INFO(line.substr(0, 200));
    CHECK(line.size() < 4 * observe::kMaxLogFieldBytes + 400);
    CHECK(line.find('\x1b') == std::string::npos);  // the escape character is written as \u001b
    CHECK(line.find('\x01') == std::string::npos);
    parsed.push_back(nlohmann::json::parse(line));
  }
  REQUIRE(parsed.size() == 2);
  const std::string uid = parsed[0]["uid"];
  CHECK(uid.size() < observe::kMaxLogFieldBytes + 64);
  CHECK(Has(uid, "truncated, 32000 bytes"));
  CHECK(Has(parsed[0]["nested"][0].get<std::string>(), "truncated, 32000 bytes"));
  CHECK(parsed[0]["nested"][1] == "short");
  CHECK(Has(parsed[0]["msg"].get<std::string>(), "truncated, 5000 bytes"));
  CHECK(parsed[0]["ctl"] == "a\x01" "b\nc\x1b[31m");  // escaped on the wire, intact when read back
  CHECK(Has(parsed[1]["msg"].get<std::string>(), "truncated, 32000 bytes"));
}

TEST_CASE("Logs: LineLimiter writes at most N lines per key per second and reports what it held back",
          "[observe][log]") {
  observe::LineLimiter limiter(3);
  const absl::Time t0 = absl::FromUnixSeconds(1'800'000'000);
  int written = 0;
  for (int i = 0; i < 10; ++i) {
    written += limiter.Admit("Decrypt/INVALID_ARGUMENT", t0 + absl::Milliseconds(i)).write ? 1 : 0;
  }
  CHECK(written == 3);
  CHECK(limiter.Admit("Encrypt/UNAVAILABLE", t0).write);  // another key has its own budget
  const observe::LineLimiter::Decision next = limiter.Admit("Decrypt/INVALID_ARGUMENT", t0 + absl::Seconds(1));
  CHECK(next.write);
  CHECK(next.suppressed_before == 7);
  CHECK(limiter.Admit("Decrypt/INVALID_ARGUMENT", t0 + absl::Seconds(1)).suppressed_before == 0);
}

}  // namespace
}  // namespace kmsplugin::testing
