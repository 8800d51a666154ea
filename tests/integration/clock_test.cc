// The wall clock is not to be trusted (issue 11, item 12), through the real binary under libfaketime:
// - a `rotate` run under a clock set to 2100 must not stamp every later version with 2100 (they used to inherit
//   it: "creation times never go backwards"), `keys` names the future time and its repair, and `retire` of the old
//   versions keeps its normal schedule, counted from the first version made with the clock right;
// - a serving daemon whose wall clock steps a day ahead or a day back keeps probing once per poll interval and
//   stays healthy (abseil's timed waits wait for a CLOCK_REALTIME deadline: ahead, the futex slept a day; back, the
//   maintenance loop spun).
// FAKETIME_DONT_FAKE_MONOTONIC keeps CLOCK_MONOTONIC real, as a real clock step (date -s, NTP) does. Under the
// ASan build libfaketime is preloaded before ASan's runtime, which ASan accepts with verify_asan_link_order=0.

#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <sstream>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "tests/support/daemon.h"
#include "tests/support/subprocess.h"

namespace kmsplugin::testing {
namespace {

bool Has(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

struct ClockSetup : DaemonDriver {
  explicit ClockSetup(const std::string& poll) {
    config = dir.Write("config.yaml", "http:\n  listen: 127.0.0.1:0\n"
                                      "server:\n  pollInterval: " + poll + "\n"
                                      "environments:\n"
                                      "  - name: dev\n"
                                      "    socket: " + dir.File("run/dev.sock") + "\n"
                                      "    keySource:\n"
                                      "      local:\n"
                                      "        keyring: " + dir.File("state/dev.keyring") + "\n"
                                      "        rootKeyFile: " + dir.File("state/dev.rootkey") + "\n");
    socket = dir.File("run/dev.sock");
    REQUIRE(access(KMS_FAKETIME_LIB, R_OK) == 0);  // deploy/install-deps.sh installs faketime
  }

  // argv that runs kmsplugin `args` with libfaketime preloaded and `settings` (FAKETIME=..., ...) in its
  // environment.
  static std::vector<std::string> Faked(const std::vector<std::string>& settings, const std::vector<std::string>& args) {
    const char* asan = std::getenv("ASAN_OPTIONS");
    std::vector<std::string> argv = {"/usr/bin/env", std::string("LD_PRELOAD=") + KMS_FAKETIME_LIB,
                                     "FAKETIME_DONT_FAKE_MONOTONIC=1",
                                     absl::StrCat("ASAN_OPTIONS=", asan != nullptr ? asan : "",
                                                  asan != nullptr && *asan != '\0' ? ":" : "",
                                                  "verify_asan_link_order=0")};
    argv.insert(argv.end(), settings.begin(), settings.end());
    argv.push_back(Binary());
    argv.insert(argv.end(), args.begin(), args.end());
    return argv;
  }
  RunResult CliAt(const std::string& faketime, std::vector<std::string> args) const {
    args.insert(args.end(), {"--config", config, "--env", "dev"});
    return Run(Faked({"FAKETIME=" + faketime}, args), dir.path());
  }

  std::string socket;
};

nlohmann::json KeysJson(const ClockSetup& s) {
  const RunResult keys = s.Cli({"keys", "--config", s.config, "--env", "dev", "--json"});
  INFO(keys.out << keys.err);
  REQUIRE(keys.exit_code == 0);
  return nlohmann::json::parse(keys.out);
}

absl::Time Created(const nlohmann::json& version) {
  absl::Time t;
  std::string err;
  REQUIRE(absl::ParseTime(absl::RFC3339_full, version["created"].get<std::string>(), &t, &err));
  return t;
}

TEST_CASE("Clock: a rotate under a clock set to 2100 poisons no later version and blocks no retire", "[clock]") {
  ClockSetup s("1s");
  REQUIRE(s.Init().exit_code == 0);
  const RunResult future = s.CliAt("@2100-01-01 00:00:00", {"rotate"});
  INFO(future.out << future.err);
  REQUIRE(future.exit_code == 0);
  const RunResult now = s.Rotate("dev");
  INFO(now.out << now.err);
  REQUIRE(now.exit_code == 0);
  // The rotate with the clock right says what is wrong with version 2 and how to repair it.
  CHECK(Has(now.err, "version 2 was created at 2100-01-01T00:00:00+00:00, in the future"));

  // Version 3 carries the real time, not 2100.
  const nlohmann::json keys = KeysJson(s);
  REQUIRE(keys["versions"].size() == 3);
  CHECK(Created(keys["versions"][1]) == absl::FromCivil(absl::CivilSecond(2100, 1, 1, 0, 0, 0), absl::UTCTimeZone()));
  CHECK(keys["versions"][1]["createdInFuture"] == true);
  const absl::Time v3 = Created(keys["versions"][2]);
  CHECK(absl::AbsDuration(v3 - absl::Now()) < absl::Minutes(10));
  CHECK(keys["versions"][2]["createdInFuture"] == false);

  // `keys` names the future time and the repair.
  const RunResult table = s.Cli({"keys", "--config", s.config, "--env", "dev"});
  INFO(table.out);
  CHECK(Has(table.out, "warning: version 2 was created at 2100-01-01T00:00:00+00:00, in the future"));
  CHECK(Has(table.out, "fix: set the clock right"));
  CHECK(Has(table.out, "kmsplugin rotate --env dev"));

  // Retiring version 1 right now is too soon, and the time it names is 8 min + pollInterval after version 3,
  // not after 2100.
  const RunResult early = s.Cli({"retire", "--config", s.config, "--env", "dev", "--version", "1", "--force"});
  INFO(early.out << early.err);
  CHECK(early.exit_code != 0);
  CHECK(Has(early.err, "rewrite the Secrets after " +
                           absl::FormatTime(absl::RFC3339_sec, v3 + absl::Minutes(8) + absl::Seconds(1),
                                            absl::UTCTimeZone())));
  CHECK_FALSE(Has(early.err, "2100"));

  // Ten minutes on (a clock that runs 10 min ahead stands in for waiting), versions 1 and 2 retire on schedule.
  const RunResult retire1 = s.CliAt("+10m", {"retire", "--version", "1", "--force"});
  INFO(retire1.out << retire1.err);
  CHECK(retire1.exit_code == 0);
  CHECK(Has(retire1.out, "retired versions 1"));
  const RunResult retire2 = s.CliAt("+10m", {"retire", "--version", "2", "--force"});
  INFO(retire2.out << retire2.err);
  CHECK(retire2.exit_code == 0);
  CHECK(Has(retire2.out, "retired versions 2"));
}

// The count of successful refreshes (one per maintenance round) in /metrics.
long RefreshCount(int port) {
  const std::string metrics = DaemonDriver::HttpGet(port, "/metrics");
  for (absl::string_view line : absl::StrSplit(metrics, '\n')) {
    if (absl::StartsWith(line, "kmsplugin_backend_requests_total{") && Has(std::string(line), "operation=\"refresh\"") &&
        Has(std::string(line), "outcome=\"ok\"")) {
      double value = 0;
      if (absl::SimpleAtod(line.substr(line.rfind(' ') + 1), &value)) {
        return static_cast<long>(value);
      }
    }
  }
  return -1;
}

TEST_CASE("Clock: a serving daemon whose wall clock steps a day keeps probing every poll interval", "[clock]") {
  const std::string step = GENERATE(std::string("+1d"), std::string("-1d"));
  INFO("wall clock step " << step);
  ClockSetup s("1s");
  REQUIRE(s.Init().exit_code == 0);
  const std::string offset = s.dir.Write("faketime", "+0\n");
  Subprocess server(ClockSetup::Faked({"FAKETIME_TIMESTAMP_FILE=" + offset, "FAKETIME_NO_CACHE=1"},
                                      {"serve", "--config", s.config}),
                    s.dir.path());
  REQUIRE(DaemonDriver::WaitServing(server, s.socket));
  const int port = DaemonDriver::LoggedHttpPort(server);
  REQUIRE(port > 0);
  // Serving and probed at least once before the step.
  for (int i = 0; i < 300 && RefreshCount(port) < 1; ++i) {
    absl::SleepFor(absl::Milliseconds(50));
  }
  REQUIRE(RefreshCount(port) >= 1);
  CHECK(DaemonDriver::Status(s.socket).healthz() == "ok");

  std::ofstream(offset) << step << "\n";
  const long before = RefreshCount(port);
  const absl::Time start = absl::Now();  // this process's clock is not faked
  // 12 s: longer than the 8 s health age (3 x pollInterval + probe timeout), so a stalled loop shows.
  std::vector<std::string> unhealthy;
  while (absl::Now() - start < absl::Seconds(12)) {
    const std::string healthz = DaemonDriver::Status(s.socket).healthz();
    if (healthz != "ok") {
      unhealthy.push_back(healthz);
    }
    absl::SleepFor(absl::Milliseconds(250));
  }
  const long rounds = RefreshCount(port) - before;
  const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
  INFO(server.Stderr().substr(0, 4000));
  CHECK(unhealthy.empty());
  if (!unhealthy.empty()) {
    UNSCOPED_INFO("first unhealthy status: " << unhealthy.front());
  }
  INFO("maintenance rounds in " << seconds << " s: " << rounds);
  // One per second; a slow machine may run fewer (8 s of health age leaves room), never more than one a second.
  CHECK(rounds >= 3);
  CHECK(rounds <= static_cast<long>(seconds) + 3);
  server.Signal(SIGTERM);
  CHECK(server.Wait() == std::optional<int>(0));
}

}  // namespace
}  // namespace kmsplugin::testing
