// The serving core under pressure, through real gRPC over a Unix socket: a stalled key source, a flood of
// Encrypts beyond the socket's workers and queue, calls that expire in the queue, and a flood of failing calls
// with oversized caller fields (log amplification).

#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "kmsplugin/observe/log.h"
#include "kmsplugin/observe/metrics.h"
#include "tests/server/gated_key_source.h"
#include "tests/server/server_fixture.h"
#include "tests/support/log_capture.h"

namespace kmsplugin::testing {
namespace {

// One environment "dev" whose local key source sits behind a gate.
struct GatedServer {
  explicit GatedServer(server::RunnerOptions options) {
    options.registry = &registry;
    gate = std::make_shared<GatedKeySource>(OpenLocal(MakeKeyring(dir, "dev"), "dev"));
    service = MakeService(gate, "dev");
    socket = dir.File("dev.sock");
    std::vector<server::ServedEnvironment> envs;
    envs.push_back(server::ServedEnvironment{socket, std::nullopt, service});
    runner = std::make_unique<server::ServerRunner>(options, std::move(envs));
    const absl::Status started = runner->Start();  // probes through the open gate
    INFO(started.ToString());
    REQUIRE(started.ok());
  }
  ~GatedServer() {
    gate->Open();
    runner->Shutdown();
  }
  uint64_t Count(const std::string& rpc, const std::string& code) {
    return registry
        .GetCounter("kmsplugin_grpc_requests_total", "KMS gRPC calls by environment, API, RPC and status code.",
                    {{"environment", "dev"}, {"api", "v2"}, {"rpc", rpc}, {"code", code}})
        .Value();
  }

  observe::Registry registry;
  TempDir dir;
  std::shared_ptr<GatedKeySource> gate;
  std::shared_ptr<core::EnvelopeService> service;
  std::string socket;
  std::unique_ptr<server::ServerRunner> runner;
};

server::RunnerOptions Tuned(int workers, int queued) {
  server::RunnerOptions options;
  options.tuning.max_threads = 8;  // what bounded the synchronous server
  options.tuning.workers = workers;
  options.tuning.max_queued_calls = queued;
  return options;
}

bool AwaitCount(const std::atomic<int>& value, int n, absl::Duration timeout) {
  const absl::Time end = absl::Now() + timeout;
  while (value.load() < n) {
    if (absl::Now() > end) {
      return false;
    }
    absl::SleepFor(absl::Milliseconds(10));
  }
  return true;
}

}  // namespace

TEST_CASE("Serving: Encrypts beyond workers and queue are refused at once and counted, and Status keeps answering",
          "[server][serving]") {
  GatedServer s(Tuned(/*workers=*/2, /*queued=*/2));
  s.gate->Close();
  const int callers = 12;
  std::atomic<int> ok{0};
  std::atomic<int> refused{0};
  std::atomic<int> other{0};
  std::vector<std::string> refusal_messages(callers);
  std::vector<std::thread> threads;
  for (int i = 0; i < callers; ++i) {
    threads.emplace_back([&, i] {
      KmsClient client(s.socket);
      v2::EncryptResponse response;
      // A deadline far beyond the test's waits: a refusal seen while the gate is closed came at once.
      const grpc::Status status = client.Encrypt(std::string(32, 's'), response, std::chrono::seconds(120));
      if (status.ok()) {
        ++ok;
      } else if (status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED) {
        refusal_messages[i] = status.error_message();
        ++refused;
      } else {
        ++other;
      }
    });
  }
  // Two calls run (blocked at the gate), two wait in the queue, eight are refused, all while the gate is shut.
  // Wait (well within the key source's 30 s cap on a call) until the flood has settled: at least workers + refused
  // = 10 calls are blocked or refused. (The synchronous server blocked 7 and refused 5.)
  const absl::Time settle = absl::Now() + absl::Seconds(20);
  while (absl::Now() < settle && !s.gate->AwaitBlocked(callers - 2 - refused.load(), absl::Milliseconds(20))) {
  }
  // Status (and so kube-apiserver's health check) answers at once while Encrypt is saturated.
  int status_ok = 0;
  std::string status_error;
  for (int i = 0; i < 16; ++i) {
    KmsClient client(s.socket);
    v2::StatusResponse response;
    const grpc::Status status = client.Status(response, std::chrono::seconds(5));
    status_ok += status.ok() ? 1 : 0;
    if (!status.ok()) {
      status_error = status.error_message();
    }
  }
  INFO("Status error: " << status_error);
  CHECK(status_ok == 16);
  CHECK(AwaitCount(refused, callers - 4, absl::Seconds(20)));
  CHECK(s.gate->AwaitBlocked(2, absl::Seconds(1)));
  // Every refusal is in the metric.
  CHECK(s.Count("Encrypt", "RESOURCE_EXHAUSTED") == static_cast<uint64_t>(refused.load()));
  s.gate->Open();
  for (std::thread& thread : threads) {
    thread.join();
  }
  INFO("ok " << ok << " refused " << refused << " other " << other);
  CHECK(ok == 4);
  CHECK(refused == callers - 4);
  CHECK(other == 0);
  for (const std::string& message : refusal_messages) {
    if (!message.empty()) {
      CHECK_THAT(message, Catch::Contains("queue is full") && Catch::Contains("server.maxQueuedCalls"));
    }
  }
  CHECK(s.Count("Encrypt", "RESOURCE_EXHAUSTED") == static_cast<uint64_t>(callers - 4));
  CHECK(s.Count("Encrypt", "OK") == 4);
}

// The value of the sample line that starts with `series`, or -1 when absent.
double Scraped(const observe::Registry& registry, const std::string& series) {
  std::istringstream text(registry.Render());
  for (std::string line; std::getline(text, line);) {
    if (line.rfind(series + " ", 0) == 0) {
      return std::stod(line.substr(series.size() + 1));
    }
  }
  return -1;
}

// Waits (up to `timeout`) until every series in `want` scrapes as its value; true when they all do.
bool AwaitScraped(const observe::Registry& registry, const std::vector<std::pair<std::string, double>>& want,
                  absl::Duration timeout) {
  const absl::Time end = absl::Now() + timeout;
  while (true) {
    bool all = true;
    for (const auto& [series, value] : want) {
      all = all && Scraped(registry, series) == value;
    }
    if (all) {
      return true;
    }
    if (absl::Now() > end) {
      for (const auto& [series, value] : want) {
        UNSCOPED_INFO(series << " = " << Scraped(registry, series) << ", want " << value);
      }
      return false;
    }
    absl::SleepFor(absl::Milliseconds(10));
  }
}

TEST_CASE("Serving: the in-flight and call-pool gauges show calls running, queued and done", "[server][serving]") {
  GatedServer s(Tuned(/*workers=*/2, /*queued=*/3));
  const std::string encrypt_in_flight =
      "kmsplugin_grpc_requests_in_flight{environment=\"dev\",api=\"v2\",rpc=\"Encrypt\"}";
  const std::string queued = "kmsplugin_call_pool_queued_calls{environment=\"dev\"}";
  const std::string busy = "kmsplugin_call_pool_busy_workers{environment=\"dev\"}";
  CHECK(Scraped(s.registry, encrypt_in_flight) == 0);
  CHECK(Scraped(s.registry, "kmsplugin_grpc_requests_in_flight{environment=\"dev\",api=\"v1beta1\",rpc=\"Decrypt\"}") == 0);
  CHECK(Scraped(s.registry, "kmsplugin_call_pool_workers{environment=\"dev\"}") == 2);
  s.gate->Close();
  std::atomic<int> ok{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < 5; ++i) {
    threads.emplace_back([&] {
      KmsClient client(s.socket);
      v2::EncryptResponse response;
      ok += client.Encrypt(std::string(32, 's'), response, std::chrono::seconds(60)).ok() ? 1 : 0;
    });
  }
  // Two run (held at the gate), three wait for a worker: all five are in flight.
  CHECK(s.gate->AwaitBlocked(2, absl::Seconds(20)));
  CHECK(AwaitScraped(s.registry, {{encrypt_in_flight, 5}, {queued, 3}, {busy, 2}}, absl::Seconds(20)));
  s.gate->Open();
  for (std::thread& thread : threads) {
    thread.join();
  }
  CHECK(ok == 5);
  CHECK(AwaitScraped(s.registry, {{encrypt_in_flight, 0}, {queued, 0}, {busy, 0}}, absl::Seconds(20)));
}

TEST_CASE("Serving: a call whose deadline passes in the queue never reaches the key source", "[server][serving]") {
  GatedServer s(Tuned(/*workers=*/1, /*queued=*/4));
  const int calls_before = s.gate->Calls();
  s.gate->Close();
  std::atomic<bool> first_ok{false};
  std::thread first([&] {
    KmsClient client(s.socket);
    v2::EncryptResponse response;
    first_ok = client.Encrypt(std::string(32, 'a'), response, std::chrono::seconds(120)).ok();
  });
  REQUIRE(s.gate->AwaitBlocked(1, absl::Seconds(30)));  // the only worker is taken
  {
    KmsClient client(s.socket);
    v2::EncryptResponse response;
    const grpc::Status status = client.Encrypt(std::string(32, 'b'), response, std::chrono::milliseconds(500));
    CHECK(status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED);
  }
  s.gate->Open();
  first.join();
  CHECK(first_ok);
  // The worker takes the expired call after the first one and answers it without the key source.
  const absl::Time end = absl::Now() + absl::Seconds(30);
  while (s.Count("Encrypt", "DEADLINE_EXCEEDED") == 0 && absl::Now() < end) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  CHECK(s.Count("Encrypt", "DEADLINE_EXCEEDED") == 1);
  CHECK(s.gate->Calls() - calls_before == 1);
}

TEST_CASE("Serving: one environment's stalled backend does not take another environment's workers",
          "[server][serving]") {
  TempDir dir;
  auto stalled = std::make_shared<GatedKeySource>(OpenLocal(MakeKeyring(dir, "slow"), "slow"));
  auto healthy = OpenLocal(MakeKeyring(dir, "fast"), "fast");
  std::vector<server::ServedEnvironment> envs;
  envs.push_back(server::ServedEnvironment{dir.File("slow.sock"), std::nullopt, MakeService(stalled, "slow")});
  envs.push_back(server::ServedEnvironment{dir.File("fast.sock"), std::nullopt, MakeService(healthy, "fast")});
  server::ServerRunner runner(Tuned(/*workers=*/2, /*queued=*/2), std::move(envs));
  REQUIRE(runner.Start().ok());
  stalled->Close();
  std::vector<std::thread> flood;
  for (int i = 0; i < 8; ++i) {
    flood.emplace_back([&] {
      KmsClient client(dir.File("slow.sock"));
      v2::EncryptResponse response;
      client.Encrypt(std::string(32, 's'), response, std::chrono::seconds(120)).ok();
    });
  }
  REQUIRE(stalled->AwaitBlocked(2, absl::Seconds(30)));  // "slow" has every worker stuck
  KmsClient client(dir.File("fast.sock"));
  for (int i = 0; i < 20; ++i) {
    v2::EncryptResponse encrypted;
    REQUIRE(client.Encrypt(std::string(32, 'f'), encrypted, std::chrono::seconds(5)).ok());
    v2::DecryptResponse decrypted;
    REQUIRE(client.DecryptResponseOf(encrypted, decrypted).ok());
  }
  stalled->Open();
  for (std::thread& thread : flood) {
    thread.join();
  }
  runner.Shutdown();
}

TEST_CASE("Serving: a burst of failing calls with oversized uid and key_id keeps the log bounded",
          "[server][serving][log]") {
  auto captured = std::make_shared<LogCapture>();  // server threads write it while this thread reads it
  auto logger = std::make_shared<spdlog::logger>("capture", captured);
  logger->set_formatter(observe::MakeJsonFormatter());
  logger->set_level(spdlog::level::info);
  auto previous = spdlog::default_logger();
  spdlog::set_default_logger(logger);
  struct Restore {
    std::shared_ptr<spdlog::logger> logger;
    ~Restore() { spdlog::set_default_logger(logger); }
  } restore{previous};

  server::RunnerOptions options;
  observe::Registry registry;
  options.registry = &registry;
  ServerFixture f(options);
  const std::string huge(32000, 'k');
  auto channel = grpc::CreateChannel("unix:" + f.socket, grpc::InsecureChannelCredentials());
  auto stub = v2::KeyManagementService::NewStub(channel);
  auto failing_decrypt = [&] {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    v2::DecryptRequest request;
    request.set_uid(huge);
    request.set_key_id(huge);
    request.set_ciphertext("not a ciphertext");
    v2::DecryptResponse response;
    return stub->Decrypt(&context, request, &response);
  };
  const size_t log_before = captured->Text().size();
  const int burst = 300;
  int failed = 0;
  for (int i = 0; i < burst; ++i) {
    failed += failing_decrypt().ok() ? 0 : 1;
  }
  REQUIRE(failed == burst);
  // One more failure after the window: its line says how many like lines were held back.
  int extra = 0;
  const absl::Time end = absl::Now() + absl::Seconds(30);
  while (captured->Text().find("\"suppressed\"") == std::string::npos && absl::Now() < end) {
    absl::SleepFor(absl::Milliseconds(200));
    extra += failing_decrypt().ok() ? 0 : 1;
  }
  const std::string log = captured->Text().substr(log_before);
  std::istringstream lines(log);
  std::string line;
  int written = 0;
  uint64_t suppressed_reported = 0;
  size_t longest = 0;
  while (std::getline(lines, line)) {
    const nlohmann::json object = nlohmann::json::parse(line);
    if (object.value("msg", "") != "rpc failed") {
      continue;
    }
    ++written;
    longest = std::max(longest, line.size());
    suppressed_reported += object.value("suppressed", uint64_t{0});
  }
  const uint64_t suppressed_metric =
      registry
          .GetCounter("kmsplugin_log_lines_suppressed_total",
                      "Failure log lines not written because their kind exceeded its rate limit.",
                      {{"environment", "dev"}, {"api", "v2"}, {"rpc", "Decrypt"}, {"code", "INVALID_ARGUMENT"}})
          .Value();
  INFO("lines " << written << " bytes " << log.size() << " longest " << longest << " suppressed " << suppressed_metric
                << " reported " << suppressed_reported);
  CHECK(longest < 4096);                           // 32,000-byte fields are cut (the uncapped line was 64 KB)
  CHECK(written < burst / 2);                      // rate-limited, not one line per call
  CHECK(log.size() < size_t{written + 1} * 4096);  // bytes bounded by lines x capped line size
  CHECK(suppressed_metric + written == static_cast<uint64_t>(burst + extra));
  CHECK(suppressed_reported > 0);
  CHECK(suppressed_reported <= suppressed_metric);
}

}  // namespace kmsplugin::testing
