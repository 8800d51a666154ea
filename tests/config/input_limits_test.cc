// Input limits: nesting scans that run before any recursive parser sees outside input.

#include "kmsplugin/config/input_limits.h"

#include <fstream>
#include <string>

#include <catch2/catch.hpp>

#include "tests/support/status_matchers.h"

namespace kmsplugin::config {
namespace {

using ::kmsplugin::testing::IsOk;
using ::kmsplugin::testing::StatusIs;
using Code = absl::StatusCode;

std::string Repeat(const std::string& part, int n) {
  std::string out;
  for (int i = 0; i < n; ++i) {
    out += part;
  }
  return out;
}

TEST_CASE("CheckJsonNesting: deep arrays and objects are refused, strings do not count", "[config][limits]") {
  CHECK_THAT(CheckJsonNesting("{\"a\":[1,{\"b\":[]}]}", "keyring k"), IsOk());
  CHECK_THAT(CheckJsonNesting(Repeat("[", 64) + Repeat("]", 64), "keyring k"), IsOk());
  CHECK_THAT(CheckJsonNesting(Repeat("[", 65) + Repeat("]", 65), "keyring k"),
             StatusIs(Code::kInvalidArgument, "keyring k nests deeper than 64 levels"));
  CHECK_THAT(CheckJsonNesting("{\"x\":" + Repeat("[", 100000), "keyring k"), StatusIs(Code::kInvalidArgument));
  // Brackets inside strings, with escaped quotes, are text.
  CHECK_THAT(CheckJsonNesting("{\"s\":\"" + Repeat("[", 500) + "\\\"" + Repeat("{", 500) + "\"}", "k"), IsOk());
  // A closing bracket inside a string cannot cancel real openings.
  CHECK_THAT(CheckJsonNesting(Repeat("[\"]]]]]]]]]]\",", 70), "k"), StatusIs(Code::kInvalidArgument));
}

TEST_CASE("CheckYamlNesting: flow, indentation and inline block nesting are bounded", "[config][limits]") {
  CHECK_THAT(CheckYamlNesting("a:\n  b: [1, {c: d}]\n  e:\n    - f\n    - g: h\n", "config c"), IsOk());
  CHECK_THAT(CheckYamlNesting("x: " + Repeat("[", 65), "config c"),
             StatusIs(Code::kInvalidArgument, "config c nests deeper than 64 levels"));
  CHECK_THAT(CheckYamlNesting("x:\n" + std::string(200, ' ') + "y: 1\n", "config c"),
             StatusIs(Code::kInvalidArgument, "nests deeper"));
  // Block sequences opened on one line: "- - - - a".
  CHECK_THAT(CheckYamlNesting("x:\n" + Repeat("- ", 400) + "a\n", "config c"),
             StatusIs(Code::kInvalidArgument, "nests deeper"));
  CHECK_THAT(CheckYamlNesting("x:\n- - a\n- b\n", "config c"), IsOk());
  // Comments and quoted scalars: brackets there are text.
  CHECK_THAT(CheckYamlNesting("# " + Repeat("[", 500) + "\nx: '" + Repeat("{", 10) + "'\n", "config c"), IsOk());
}

TEST_CASE("CheckYamlNesting: quotes cannot be used to cancel real openings", "[config][limits]") {
  // An apostrophe inside a plain scalar does not open a quoted scalar...
  CHECK_THAT(CheckYamlNesting("x: " + Repeat("[a'b, ", 70), "c"), StatusIs(Code::kInvalidArgument));
  // ...so a later real quoted scalar's ']' is inside quotes and does not count down.
  CHECK_THAT(CheckYamlNesting(Repeat("[", 50) + "a'b, '" + Repeat("]", 50) + "', " + Repeat("[", 20), "c"),
             StatusIs(Code::kInvalidArgument));
  // '' inside a single-quoted scalar is an escaped quote, not its end.
  CHECK_THAT(CheckYamlNesting(Repeat("['a''] ] ] ]', ", 70), "c"), StatusIs(Code::kInvalidArgument));
  CHECK_THAT(CheckYamlNesting(Repeat("[\"a\\\"]]]]\", ", 70), "c"), StatusIs(Code::kInvalidArgument));
  CHECK_THAT(CheckYamlNesting("msg: it's fine\nother: [a, b]\n", "c"), IsOk());
}

TEST_CASE("CheckYamlNesting: the shipped config example passes", "[config][limits]") {
  std::ifstream in(std::string(KMS_SOURCE_DIR) + "/deploy/config.example.yaml");
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  REQUIRE(!text.empty());
  CHECK_THAT(CheckYamlNesting(text, "deploy/config.example.yaml"), IsOk());
}

}  // namespace
}  // namespace kmsplugin::config
