#pragma once

// Catch2 matchers for absl::Status and absl::StatusOr<T>, written once for the whole suite:
//   CHECK_THAT(result, IsOk());
//   CHECK_THAT(result, StatusIs(absl::StatusCode::kInvalidArgument));
//   CHECK_THAT(result, StatusIs(absl::StatusCode::kInvalidArgument, "too short"));
// Failures print the actual status.

#include <string>
#include <utility>

#include <catch2/catch.hpp>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace kmsplugin::testing {

inline const absl::Status& GetStatus(const absl::Status& status) { return status; }
template <typename T>
const absl::Status& GetStatus(const absl::StatusOr<T>& status_or) {
  return status_or.status();
}

// Catch2 v2 calls match() by name, so one untyped matcher serves Status and every StatusOr<T>.
class IsOk : public Catch::Matchers::Impl::MatcherUntypedBase {
 public:
  template <typename T>
  bool match(const T& value) const {
    return GetStatus(value).ok();
  }
  std::string describe() const override { return "is OK"; }
};

class StatusIs : public Catch::Matchers::Impl::MatcherUntypedBase {
 public:
  explicit StatusIs(absl::StatusCode code, std::string substring = "")
      : code_(code), substring_(std::move(substring)) {}
  template <typename T>
  bool match(const T& value) const {
    const absl::Status& status = GetStatus(value);
    return status.code() == code_ && absl::StrContains(status.message(), substring_);
  }
  std::string describe() const override {
    return absl::StrCat("has code ", absl::StatusCodeToString(code_),
                        substring_.empty() ? "" : absl::StrCat(" and a message containing \"", substring_, "\""));
  }

 private:
  absl::StatusCode code_;
  std::string substring_;
};

}  // namespace kmsplugin::testing

namespace Catch {
template <>
struct StringMaker<absl::Status> {
  static std::string convert(const absl::Status& status) { return status.ToString(); }
};
template <typename T>
struct StringMaker<absl::StatusOr<T>> {
  static std::string convert(const absl::StatusOr<T>& value) {
    return value.ok() ? std::string("OK (with a value)") : value.status().ToString();
  }
};
}  // namespace Catch
