#include "kmsplugin/doctor/report.h"

#include <algorithm>
#include <array>

#include "absl/strings/str_cat.h"
#include "kmsplugin/core/sv.h"

namespace kmsplugin::doctor {
namespace {

std::string Pad(std::string_view text, size_t width) {
  std::string out(text);
  if (out.size() < width) {
    out.resize(width, ' ');
  }
  return out;
}

}  // namespace

std::string RenderTable(const std::vector<CheckResult>& results) {
  size_t id_width = std::string_view("CHECK").size();
  size_t found_width = std::string_view("FOUND").size();
  for (const CheckResult& r : results) {
    id_width = std::max(id_width, r.id.size());
    found_width = std::max(found_width, r.found.size());
  }
  constexpr size_t kVerdictWidth = 7;  // "VERDICT"
  std::string out = absl::StrCat(Pad("CHECK", id_width), "  ", Pad("VERDICT", kVerdictWidth), "  ",
                                 Pad("FOUND", found_width), "  FIX\n");
  std::array<int, 3> counts{};
  for (const CheckResult& r : results) {
    ++counts[static_cast<int>(r.verdict)];
    absl::StrAppend(&out, Pad(r.id, id_width), "  ", Pad(VerdictName(r.verdict), kVerdictWidth), "  ",
                    Pad(r.found, found_width), "  ", r.fix, "\n");
  }
  absl::StrAppend(&out, "verdict: ", Sv(VerdictName(Overall(results))), " (", counts[2], " FAIL, ", counts[1],
                  " WARN, ", counts[0], " PASS)\n");
  return out;
}

nlohmann::ordered_json ResultsJson(const std::vector<CheckResult>& results) {
  nlohmann::ordered_json checks = nlohmann::ordered_json::array();
  for (const CheckResult& r : results) {
    checks.push_back({{"id", r.id}, {"verdict", std::string(VerdictName(r.verdict))}, {"found", r.found},
                      {"fix", r.fix}});
  }
  return nlohmann::ordered_json{{"checks", checks}, {"verdict", std::string(VerdictName(Overall(results)))}};
}

int ExitCodeFor(const std::vector<CheckResult>& results) {
  return Overall(results) == Verdict::kFail ? 1 : 0;
}

}  // namespace kmsplugin::doctor
