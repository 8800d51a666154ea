#pragma once

// How `kmsplugin doctor` shows its results: an aligned table for people, JSON for machines, and the exit code.
//
//   CHECK                   VERDICT  FOUND                                FIX
//   file.format             PASS     apiserver.config.k8s.io/v1 ...      -
//   ...
//   verdict: FAIL (1 FAIL, 2 WARN, 8 PASS)
//
//   {"checks":[{"id":"file.format","verdict":"PASS","found":"...","fix":"-"}, ...],"verdict":"FAIL"}

#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "kmsplugin/doctor/doctor.h"

namespace kmsplugin::doctor {

std::string RenderTable(const std::vector<CheckResult>& results);
nlohmann::ordered_json ResultsJson(const std::vector<CheckResult>& results);

// 0 when nothing FAILs, 1 otherwise (2, for usage and unreadable files, is the CLI's).
int ExitCodeFor(const std::vector<CheckResult>& results);

}  // namespace kmsplugin::doctor
