#include "kmsplugin/config/input_limits.h"

#include "absl/strings/str_cat.h"
#include "kmsplugin/core/sv.h"

namespace kmsplugin::config {
namespace {

absl::Status TooDeep(std::string_view what, int depth, int max_depth, size_t offset) {
  return absl::InvalidArgumentError(absl::StrCat(Sv(what), " nests deeper than ", max_depth, " levels (", depth,
                                                 " at byte ", offset, "); it is not a valid file of its kind"));
}

}  // namespace

absl::Status CheckJsonNesting(std::string_view text, std::string_view what, int max_depth) {
  int depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\') {
        ++i;  // the escaped character, whatever it is
      } else if (c == '"') {
        in_string = false;
      }
      continue;
    }
    if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > max_depth) {
        return TooDeep(what, depth, max_depth, i);
      }
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
  return absl::OkStatus();
}

absl::Status CheckYamlNesting(std::string_view text, std::string_view what, int max_depth) {
  // Every [ and { counts as an opening, inside a quoted scalar or not; only a closing outside quotes counts down.
  // Telling YAML's quoted scalars from plain ones exactly takes a YAML parser; this way a wrong guess can only
  // over-count (refusing an absurd file), never let a deep nesting through.
  int flow = 0;
  char quote = 0;
  bool comment = false;
  bool line_start = true;
  size_t indent = 0;
  char previous = '\n';
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (c == '\n') {
      comment = false;
      line_start = true;
      indent = 0;
      previous = c;
      continue;
    }
    if (line_start) {
      if (c == ' ') {
        if (++indent / 2 > static_cast<size_t>(max_depth)) {
          return TooDeep(what, static_cast<int>(indent / 2), max_depth, i);
        }
        previous = c;
        continue;
      }
      line_start = false;
    }
    if (comment) {
      continue;
    }
    if (c == '[' || c == '{') {
      if (++flow > max_depth) {
        return TooDeep(what, flow, max_depth, i);
      }
    } else if (quote != 0) {
      if (quote == '"' && c == '\\') {
        ++i;
      } else if (c == quote) {
        quote = 0;
      }
    } else if (c == '"' || c == '\'') {
      quote = c;
    } else if (c == '#' && (previous == ' ' || previous == '\t' || previous == '\n')) {
      comment = true;
    } else if ((c == ']' || c == '}') && flow > 0) {
      --flow;
    }
    previous = c;
  }
  return absl::OkStatus();
}

}  // namespace kmsplugin::config
