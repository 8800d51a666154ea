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
  // Flow collections: every [ and { counts as an opening, inside a quoted scalar or not; only a closing outside
  // quotes counts down, and a quote opens a quoted scalar only where a scalar can start (after indentation, ":",
  // "-", "?", ",", "[" or "{"), so an apostrophe inside a plain scalar (don't) does not flip the state. Block
  // nesting: the indentation plus each "- " or "? " that opens another level on the same line ("- - - a").
  // yaml-cpp bounds its own recursion as well; this refuses early, with a message naming the input.
  int flow = 0;
  char quote = 0;
  bool comment = false;
  bool line_start = true;
  size_t level = 0;     // block levels on this line so far: indentation / 2, then inline "- " / "? "
  size_t indent = 0;
  char significant = '\n';  // the last character that was not a space, '\n' at the start of a line
  char previous = '\n';
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (c == '\n') {
      comment = false;
      line_start = true;
      indent = 0;
      level = 0;
      significant = '\n';
      previous = c;
      continue;
    }
    if (line_start && c == ' ') {
      ++indent;
      previous = c;
      continue;
    }
    if (line_start) {
      line_start = false;
      level = indent / 2;
    }
    if (comment) {
      continue;
    }
    if (quote == 0 && (c == '-' || c == '?') && (significant == '\n' || significant == '-' || significant == '?') &&
        i + 1 < text.size() && (text[i + 1] == ' ' || text[i + 1] == '\n')) {
      ++level;  // a block sequence entry or complex key that nests one more level
    }
    if (level > static_cast<size_t>(max_depth)) {
      return TooDeep(what, static_cast<int>(level), max_depth, i);
    }
    if (c == '[' || c == '{') {
      if (++flow > max_depth) {
        return TooDeep(what, flow, max_depth, i);
      }
    } else if (quote != 0) {
      if (quote == '"' && c == '\\') {
        ++i;
      } else if (quote == '\'' && c == '\'' && i + 1 < text.size() && text[i + 1] == '\'') {
        ++i;  // '' is a quote inside a single-quoted scalar
      } else if (c == quote) {
        quote = 0;
      }
    } else if ((c == '"' || c == '\'') &&
               (significant == '\n' || significant == ':' || significant == '-' || significant == '?' ||
                significant == ',' || significant == '[' || significant == '{') &&
               (previous == ' ' || previous == '\n' || previous == '[' || previous == '{' || previous == ',')) {
      quote = c;
    } else if (c == '#' && (previous == ' ' || previous == '\t' || previous == '\n')) {
      comment = true;
    } else if ((c == ']' || c == '}') && flow > 0) {
      --flow;
    }
    if (c != ' ' && c != '\t') {
      significant = c;
    }
    previous = c;
  }
  return absl::OkStatus();
}

}  // namespace kmsplugin::config
