// EventLogSink: a key source's event becomes one log line whose fields keep the field list's types.

#include "kmsplugin/daemon/event_log_sink.h"

#include <spdlog/sinks/ostream_sink.h>

#include <catch2/catch.hpp>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>

#include "kmsplugin/observe/log.h"
#include "kmsplugin/observe/log_fields.h"

namespace kmsplugin::testing {
namespace {

TEST_CASE("EventLogSink: a field the list types as a number is logged as a number, the rest as strings",
          "[daemon][log]") {
  std::ostringstream out;
  auto logger = std::make_shared<spdlog::logger>("sink-test", std::make_shared<spdlog::sinks::ostream_sink_mt>(out));
  logger->set_formatter(observe::MakeJsonFormatter());
  auto previous = spdlog::default_logger();
  spdlog::set_default_logger(logger);
  daemon::EventLogSink sink("prod", "vault", nullptr);
  sink.Emit(core::SourceEvent{core::event::kTokenRenewed,
                              "renewed the token for 1h",
                              {{"ttl_seconds", "3600"}, {"file", "/etc/kmsplugin/token"}, {"reason", ""}},
                              false});
  sink.Emit(core::SourceEvent{core::event::kUnavailable, "down", {{"ttl_seconds", "soon"}}, true});
  spdlog::set_default_logger(previous);
  std::istringstream lines(out.str());
  std::string line;
  std::vector<nlohmann::json> parsed;
  while (std::getline(lines, line)) {
    parsed.push_back(nlohmann::json::parse(line));
  }
  REQUIRE(parsed.size() == 2);
  CHECK(parsed[0]["ttl_seconds"] == 3600);
  CHECK(parsed[0]["file"] == "/etc/kmsplugin/token");
  CHECK(parsed[0]["event"] == "token_renewed");
  CHECK(parsed[0]["key_source"] == "vault");
  CHECK(!parsed[0].contains("reason"));  // empty: left out
  CHECK(parsed[0]["level"] == "info");
  CHECK(observe::CheckLogLine(parsed[0]).empty());
  CHECK(parsed[1]["level"] == "warn");
  // A value that is not a number stays what it was, and the field check says so.
  CHECK(parsed[1]["ttl_seconds"] == "soon");
  CHECK(!observe::CheckLogLine(parsed[1]).empty());
}

}  // namespace
}  // namespace kmsplugin::testing
