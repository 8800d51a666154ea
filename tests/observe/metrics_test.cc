// The prometheus-cpp registry as the plugin uses it: series resolved once on the hot path, and the process
// metrics read from /proc at scrape time.

#include "kmsplugin/observe/metrics.h"

#include <fcntl.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "kmsplugin/observe/process_metrics.h"
#include "tests/support/temp_dir.h"

namespace kmsplugin::testing {
namespace {

using observe::Registry;

// The value of the sample line that starts with `series` (name and labels as rendered), or -1 when absent.
double SampleValue(const std::string& text, const std::string& series) {
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (absl::ConsumePrefix(&line, series) && absl::ConsumePrefix(&line, " ")) {
      double value = 0;
      return absl::SimpleAtod(line, &value) ? value : -1;
    }
  }
  return -1;
}

std::string ProcessRender() {
  Registry registry;
  registry.AddCollectable(std::make_shared<observe::ProcessCollector>());
  return registry.Render();
}

}  // namespace

TEST_CASE("Metrics: CodeCounters resolve each code's series once, into the family's own series", "[observe]") {
  Registry registry;
  const observe::CodeCounters codes(registry.CounterFamily("kms_test_calls_total", "Calls."),
                                    {{"rpc", "Encrypt"}, {"environment", "dev"}}, "code", "OK");
  observe::Counter& ok = codes.Get(absl::StatusCode::kOk);
  CHECK(&codes.Get(absl::StatusCode::kOk) == &ok);  // kept, not looked up again
  CHECK(&registry.GetCounter("kms_test_calls_total", "Calls.",
                             {{"environment", "dev"}, {"rpc", "Encrypt"}, {"code", "OK"}}) == &ok);
  ok.Increment();
  ok.Increment();
  codes.Get(absl::StatusCode::kUnavailable).Increment();
  const std::string text = registry.Render();
  CHECK(SampleValue(text, "kms_test_calls_total{code=\"OK\",environment=\"dev\",rpc=\"Encrypt\"}") == 2);
  CHECK(SampleValue(text, "kms_test_calls_total{code=\"UNAVAILABLE\",environment=\"dev\",rpc=\"Encrypt\"}") == 1);
  // A code never seen has no series.
  CHECK(SampleValue(text, "kms_test_calls_total{code=\"INTERNAL\",environment=\"dev\",rpc=\"Encrypt\"}") == -1);
}

TEST_CASE("Metrics: series updated from many threads lose no increment", "[observe]") {
  Registry registry;
  const observe::CodeCounters codes(registry.CounterFamily("kms_test_calls_total", "Calls."), {}, "code", "OK");
  observe::Histogram& latency = registry.GetHistogram("kms_test_seconds", "Latency.", {});
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 5000; ++i) {
        codes.Get(i % 2 == 0 ? absl::StatusCode::kOk : absl::StatusCode::kInternal).Increment();
        latency.Observe(0.001);
      }
    });
  }
  for (std::thread& thread : threads) {
    thread.join();
  }
  const std::string text = registry.Render();
  CHECK(SampleValue(text, "kms_test_calls_total{code=\"OK\"}") == 10000);
  CHECK(SampleValue(text, "kms_test_calls_total{code=\"INTERNAL\"}") == 10000);
  CHECK(SampleValue(text, "kms_test_seconds_count") == 20000);
}

TEST_CASE("Metrics: process metrics have the client libraries' names and this process's values", "[observe]") {
  const std::string before = ProcessRender();
  for (const char* name : {"process_cpu_seconds_total", "process_resident_memory_bytes", "process_virtual_memory_bytes",
                           "process_open_fds", "process_max_fds", "process_start_time_seconds", "process_threads"}) {
    INFO(name);
    CHECK(SampleValue(before, name) >= 0);
  }
  CHECK(before.find("# TYPE process_cpu_seconds_total counter\n") != std::string::npos);
  CHECK(before.find("# TYPE process_resident_memory_bytes gauge\n") != std::string::npos);

  rlimit limit{};
  REQUIRE(getrlimit(RLIMIT_NOFILE, &limit) == 0);
  CHECK(SampleValue(before, "process_max_fds") == static_cast<double>(limit.rlim_cur));
  const double now = absl::ToUnixMillis(absl::Now()) / 1000.0;
  CHECK(SampleValue(before, "process_start_time_seconds") <= now + 1);
  CHECK(SampleValue(before, "process_start_time_seconds") > now - 3600);
  CHECK(SampleValue(before, "process_resident_memory_bytes") > 1024 * 1024);
  CHECK(SampleValue(before, "process_virtual_memory_bytes") >= SampleValue(before, "process_resident_memory_bytes"));

  // Ten more descriptors, two more threads, and CPU time spent: each shows in the next scrape.
  std::vector<int> fds;
  for (int i = 0; i < 10; ++i) {
    fds.push_back(open("/dev/null", O_RDONLY | O_CLOEXEC));
    REQUIRE(fds.back() >= 0);
  }
  std::atomic<bool> stop{false};
  std::vector<std::thread> threads;
  for (int i = 0; i < 2; ++i) {
    threads.emplace_back([&stop] {
      while (!stop.load()) {
        absl::SleepFor(absl::Milliseconds(1));
      }
    });
  }
  // 0.3 s of this thread's CPU time (the machine may be shared, so wall time says little), within 30 s.
  const auto thread_cpu = [] {
    timespec ts{};
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) / 1e9;
  };
  volatile uint64_t spin = 0;
  const double cpu_start = thread_cpu();
  const absl::Time give_up = absl::Now() + absl::Seconds(30);
  while (thread_cpu() < cpu_start + 0.3 && absl::Now() < give_up) {
    spin = spin + 1;
  }
  const std::string after = ProcessRender();
  stop = true;
  for (std::thread& thread : threads) {
    thread.join();
  }
  for (int fd : fds) {
    close(fd);
  }
  const auto task_count =
      std::distance(std::filesystem::directory_iterator("/proc/self/task"), std::filesystem::directory_iterator());
  CHECK(SampleValue(after, "process_open_fds") >= SampleValue(before, "process_open_fds") + 10);
  CHECK(SampleValue(after, "process_threads") == SampleValue(before, "process_threads") + 2);
  CHECK(SampleValue(ProcessRender(), "process_threads") == static_cast<double>(task_count));
  CHECK(SampleValue(after, "process_cpu_seconds_total") >= SampleValue(before, "process_cpu_seconds_total") + 0.25);
}

TEST_CASE("Metrics: the process metrics pass promtool check metrics", "[observe]") {
  TempDir dir;
  const std::string file = dir.Write("metrics.txt", ProcessRender());
  REQUIRE(std::system("command -v promtool >/dev/null") == 0);
  const std::string out = dir.File("promtool.out");
  const int rc = std::system(("promtool check metrics < " + file + " > " + out + " 2>&1").c_str());
  INFO(ReadWholeFile(out));
  CHECK(rc == 0);
}

TEST_CASE("Metrics: a process collector pointed at a missing /proc directory leaves its metrics out", "[observe]") {
  Registry registry;
  registry.AddCollectable(std::make_shared<observe::ProcessCollector>("/nonexistent/proc/self"));
  const std::string text = registry.Render();
  CHECK(text.find("process_open_fds") == std::string::npos);
  CHECK(text.find("process_resident_memory_bytes") == std::string::npos);
}

}  // namespace kmsplugin::testing
