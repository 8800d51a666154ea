// Log lines (observe/log.h) and the field list (observe/log_fields.h): level names, empty fields, the text format's
// escaping, and README.md's field table against the code's.

#include "kmsplugin/observe/log.h"

#include <spdlog/sinks/ostream_sink.h>

#include <catch2/catch.hpp>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "kmsplugin/observe/log_fields.h"

namespace kmsplugin::testing {
namespace {

bool Has(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// Runs `body` with the default logger writing through `formatter` at trace; returns what it wrote, line by line.
template <typename F>
std::vector<std::string> Capture(std::unique_ptr<spdlog::formatter> formatter, F body) {
  std::ostringstream out;
  auto logger = std::make_shared<spdlog::logger>("log-test", std::make_shared<spdlog::sinks::ostream_sink_mt>(out));
  logger->set_formatter(std::move(formatter));
  logger->set_level(spdlog::level::trace);
  auto previous = spdlog::default_logger();
  spdlog::set_default_logger(logger);
  body();
  spdlog::set_default_logger(previous);
  std::vector<std::string> lines;
  std::istringstream in(out.str());
  std::string line;
  while (std::getline(in, line)) {
    lines.push_back(line);
  }
  return lines;
}

TEST_CASE("Logs: levels are named as --log-level names them, in both formats", "[observe][log]") {
  const auto json = Capture(observe::MakeJsonFormatter(), [] {
    observe::Log(spdlog::level::trace, "t");
    observe::Log(spdlog::level::debug, "d");
    observe::Log(spdlog::level::info, "i");
    observe::Log(spdlog::level::warn, "w");
    observe::Log(spdlog::level::err, "e");
    spdlog::critical("c");
  });
  std::vector<std::string> levels;
  for (const std::string& line : json) {
    levels.push_back(nlohmann::json::parse(line)["level"]);
  }
  CHECK(levels == std::vector<std::string>{"trace", "debug", "info", "warn", "error", "critical"});
  CHECK(levels == observe::LogLevelNames());
  const auto text = Capture(observe::MakeTextFormatter(), [] {
    observe::Log(spdlog::level::warn, "w");
    observe::Log(spdlog::level::err, "e");
    observe::Log(spdlog::level::info, "i");
  });
  REQUIRE(text.size() == 3);
  CHECK(text[0].substr(24) == " WARN  w");
  CHECK(text[1].substr(24) == " ERROR e");
  CHECK(text[2].substr(24) == " INFO  i");
}

TEST_CASE("Logs: a field with nothing in it is left out, never written empty", "[observe][log]") {
  const auto lines = Capture(observe::MakeJsonFormatter(), [] {
    observe::Log(spdlog::level::info, "rpc",
                 {{"error", ""},
                  {"uid", nullptr},
                  {"added", nlohmann::json::array()},
                  {"key_id", "k"},
                  {"suppressed", 0},
                  {"forced", false}});
  });
  REQUIRE(lines.size() == 1);
  const auto line = nlohmann::json::parse(lines[0]);
  CHECK(!line.contains("error"));
  CHECK(!line.contains("uid"));
  CHECK(!line.contains("added"));
  CHECK(line["key_id"] == "k");
  CHECK(line["suppressed"] == 0);  // zero and false say something: kept
  CHECK(line["forced"] == false);
  CHECK(observe::CheckLogLine(line).empty());
}

TEST_CASE("Logs: the text format writes bare values bare and quotes and escapes the rest", "[observe][log]") {
  const auto lines = Capture(observe::MakeTextFormatter(), [] {
    observe::Log(spdlog::level::info, "config reloaded",
                 {{"environment", "dev"},
                  {"latency_ms", 0.5},
                  {"forced", true},
                  {"versions", nlohmann::json::array({1, 2})},
                  {"added", nlohmann::json::array({"a", "b c"})},
                  {"summary", "added: b; \"q\" \\"}});
    observe::Log(spdlog::level::warn, "a=b \"msg\"\n", {{"uid", "x\ny\r\x1b[31m\x7f\xc2\x9b\xff\t"}});
    spdlog::info("plain\x1b[2J text");
  });
  REQUIRE(lines.size() == 3);
  const std::regex time(R"(^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$)");
  for (const std::string& line : lines) {
    CHECK(std::regex_match(line.substr(0, 24), time));
  }
  CHECK(lines[0].substr(24) ==
        R"( INFO  config reloaded added="[\"a\",\"b c\"]" environment=dev forced=true latency_ms=0.5 )"
        R"(summary="added: b; \"q\" \\" versions=[1,2])");
  // Invalid UTF-8 (\xff) was already replaced by U+FFFD when the line was built, as in JSON; it is printable.
  CHECK(lines[1].substr(24) == R"( WARN  "a=b \"msg\"\n" uid="x\ny\r\x1b[31m\x7f\u009b)"
                               "\xef\xbf\xbd"
                               R"(\t")");
  CHECK(lines[2].substr(24) == R"( INFO  "plain\x1b[2J text")");
}

TEST_CASE("Logs: a value longer than the cap is cut in the text format too", "[observe][log]") {
  const auto lines = Capture(observe::MakeTextFormatter(), [] {
    observe::Log(spdlog::level::warn, std::string(5000, 'm'), {{"uid", std::string(32000, '\n')}});
  });
  REQUIRE(lines.size() == 1);
  // Each newline becomes two characters; the cut is at kMaxLogFieldBytes bytes of the value.
  CHECK(lines[0].size() < 4 * observe::kMaxLogFieldBytes + 200);
  CHECK(Has(lines[0], "truncated, 32000 bytes"));
  CHECK(Has(lines[0], "truncated, 5000 bytes"));
}

TEST_CASE("Log fields: CheckLogLine names a wrong level, an empty field, an unknown key and a wrong type",
          "[observe][log]") {
  const nlohmann::json good = {{"time", "t"}, {"level", "warn"}, {"msg", "m"}, {"version", 2}, {"versions", {1, 2}}};
  CHECK(observe::CheckLogLine(good).empty());
  struct Case {
    nlohmann::json line;
    std::string names;
  };
  const std::vector<Case> cases = {
      {nlohmann::json::array(), "not a JSON object"},
      {{{"time", "t"}, {"msg", "m"}}, "no \"level\""},
      {{{"time", "t"}, {"level", "warning"}, {"msg", "m"}}, "not a --log-level name"},
      {{{"time", "t"}, {"level", "info"}, {"msg", "m"}, {"error", ""}}, "\"error\" is empty"},
      {{{"time", "t"}, {"level", "info"}, {"msg", "m"}, {"colour", "red"}}, "\"colour\" is not in the field list"},
      {{{"time", "t"}, {"level", "info"}, {"msg", "m"}, {"versions", "1"}}, "field list says list of integers"},
      {{{"time", "t"}, {"level", "info"}, {"msg", "m"}, {"version", "2"}}, "field list says integer"},
      {{{"time", "t"}, {"level", "info"}, {"msg", "m"}, {"latency_ms", "0.3"}}, "field list says number"},
      {{{"time", "t"}, {"level", "info"}, {"msg", "m"}, {"suppressed", 1.5}}, "field list says integer"},
      {{{"time", "t"}, {"level", "info"}, {"msg", "m"}, {"forced", 1}}, "field list says boolean"},
      {{{"time", "t"}, {"level", "info"}, {"msg", "m"}, {"key_ids", {1}}}, "field list says list of strings"},
  };
  for (const Case& c : cases) {
    const std::vector<std::string> problems = observe::CheckLogLine(c.line);
    INFO(c.line.dump());
    REQUIRE(problems.size() >= 1);
    bool named = false;
    for (const std::string& problem : problems) {
      named = named || Has(problem, c.names);
    }
    INFO(problems[0]);
    CHECK(named);
  }
}

// README.md "### Logs": rows "| `key` | type | meaning |" up to the next heading.
std::vector<std::pair<std::string, std::string>> ReadmeFields() {
  std::ifstream in(std::string(KMS_SOURCE_DIR) + "/README.md");
  REQUIRE(in.good());
  std::vector<std::pair<std::string, std::string>> fields;
  std::string line;
  bool inside = false;
  const std::regex row(R"(^\| `([^`]+)` \| ([a-z ]+) \| .+ \|$)");
  while (std::getline(in, line)) {
    if (line.rfind("#", 0) == 0) {
      inside = line == "### Logs";
      continue;
    }
    std::smatch match;
    if (inside && std::regex_match(line, match, row)) {
      fields.emplace_back(match[1], match[2]);
    }
  }
  return fields;
}

TEST_CASE("Log fields: README.md lists exactly the keys of the code's table, with the same types and in order",
          "[observe][log][docs]") {
  std::vector<std::pair<std::string, std::string>> code;
  std::set<std::string> keys;
  for (const observe::LogField& field : observe::LogFieldTable()) {
    code.emplace_back(field.key, std::string(observe::LogFieldTypeName(field.type)));
    CHECK(keys.insert(field.key).second);  // each key once: one type, one meaning
    CHECK(std::string(field.meaning).size() > 0);
  }
  const auto readme = ReadmeFields();
  REQUIRE(readme.size() > 10);
  CHECK(readme == code);
  for (size_t i = 0; i < std::max(readme.size(), code.size()); ++i) {
    if (i >= readme.size() || i >= code.size() || readme[i] != code[i]) {
      FAIL_CHECK("first difference at row "
                 << i << ": README " << (i < readme.size() ? readme[i].first + " " + readme[i].second : "-")
                 << ", code " << (i < code.size() ? code[i].first + " " + code[i].second : "-"));
      break;
    }
  }
}

}  // namespace
}  // namespace kmsplugin::testing
