// Logs through the real binary (issue 13, item 8): a scenario that makes the daemon and the CLI write many kinds of
// lines (start, calls that succeed and fail, an environment that cannot start, rotation and retire noticed, reloads
// applied and rejected, shutdown), every line checked against the field list in kmsplugin/observe/log_fields.cc;
// and the text format, with a caller-supplied uid and key_id that try to forge a line and drive the terminal.

#include <grpcpp/grpcpp.h>
#include <signal.h>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "kmsplugin/observe/log_fields.h"
#include "tests/support/daemon.h"
#include "tests/support/kms_client.h"
#include "tests/support/subprocess.h"

namespace kmsplugin::testing {
namespace {

bool Has(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

std::vector<std::string> Lines(const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    lines.push_back(line);
  }
  return lines;
}

// Polls `done` every 20 ms for at most `bound`; true once it holds.
template <typename F>
bool Eventually(F done, absl::Duration bound = absl::Seconds(15)) {
  const absl::Time until = absl::Now() + bound;
  while (!done()) {
    if (absl::Now() > until) {
      return false;
    }
    absl::SleepFor(absl::Milliseconds(20));
  }
  return true;
}

// One local environment that works ("dev") and one whose key material was never created ("broken": it serves
// unhealthy and says why).
struct World : DaemonDriver {
  World() {
    config = dir.Write("config.yaml", Config());
    const RunResult init = Cli({"init", "--config", config, "--env", "dev"});
    INFO(init.err);
    REQUIRE(init.exit_code == 0);
    cli_err += init.err;
  }
  std::string Config() const {
    std::string text = "http:\n  listen: 127.0.0.1:0\nserver:\n  pollInterval: 1s\nenvironments:\n";
    for (const char* name : {"dev", "broken"}) {
      text +=
          std::string("  - name: ") + name + "\n    socket: " + Socket(name) +
          "\n    keySource:\n      local:\n        keyring: " + dir.File(std::string("state/") + name + ".keyring") +
          "\n        rootKeyFile: " + dir.File(std::string("state/") + name + ".rootkey") + "\n";
    }
    return text;
  }
  std::string Socket(const std::string& name) const { return dir.File(name + ".sock"); }
  std::unique_ptr<Subprocess> Start(const std::vector<std::string>& flags) const {
    std::vector<std::string> argv = {Binary()};
    argv.insert(argv.end(), flags.begin(), flags.end());
    argv.insert(argv.end(), {"serve", "--config", config});
    return std::make_unique<Subprocess>(argv, dir.path());
  }
  // A CLI command that must succeed; its log lines are kept for the check.
  RunResult Command(const std::vector<std::string>& args) {
    RunResult result = Cli(args);
    INFO(absl::StrJoin(args, " ") << ": " << result.err);
    REQUIRE(result.exit_code == 0);
    cli_err += result.err;
    return result;
  }

  std::string cli_err;
};

// A v2 call with the uid and key_id a caller chooses.
grpc::Status DecryptAs(const std::string& socket, const std::string& uid, const std::string& key_id,
                       const std::string& ciphertext) {
  auto channel = grpc::CreateChannel("unix:" + socket, grpc::InsecureChannelCredentials());
  auto stub = v2::KeyManagementService::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  v2::DecryptRequest request;
  request.set_uid(uid);
  request.set_key_id(key_id);
  request.set_ciphertext(ciphertext);
  v2::DecryptResponse response;
  return stub->Decrypt(&context, request, &response);
}

std::vector<nlohmann::json> JsonLines(const std::string& text) {
  std::vector<nlohmann::json> parsed;
  for (const std::string& line : Lines(text)) {
    if (nlohmann::json::accept(line)) {
      parsed.push_back(nlohmann::json::parse(line));
    }
  }
  return parsed;
}

std::vector<nlohmann::json> WithMsg(const std::vector<nlohmann::json>& lines, const std::string& msg) {
  std::vector<nlohmann::json> found;
  for (const nlohmann::json& line : lines) {
    if (line.value("msg", "") == msg) {
      found.push_back(line);
    }
  }
  return found;
}

bool Logged(const Subprocess& server, const std::string& msg) {
  return !WithMsg(JsonLines(server.Stderr()), msg).empty();
}

TEST_CASE(
    "Logs: every JSON line of a daemon scenario has the flag's level names, no empty field, and only listed "
    "keys with their listed types",
    "[integration][log]") {
  World w;
  auto server = w.Start({"--log-level", "debug"});
  REQUIRE(w.WaitServing(*server, w.Socket("dev")));
  REQUIRE(w.WaitServing(*server, w.Socket("broken")));
  REQUIRE(DaemonDriver::LoggedHttpPort(*server) > 0);

  // Calls that succeed and fail, on both APIs, and on the environment that could not start.
  KmsClient dev(w.Socket("dev"));
  v2::EncryptResponse encrypted;
  REQUIRE(dev.Encrypt(std::string(32, 'p'), encrypted).ok());
  v2::DecryptResponse decrypted;
  REQUIRE(dev.DecryptResponseOf(encrypted, decrypted).ok());
  CHECK(!DecryptAs(w.Socket("dev"), "bad-ciphertext", encrypted.key_id(), "not a ciphertext").ok());
  v1beta1::VersionResponse version;
  CHECK(dev.V1Version(version).ok());
  KmsClient broken(w.Socket("broken"));
  v2::EncryptResponse refused;
  CHECK(!broken.Encrypt(std::string(32, 'p'), refused).ok());

  // A rotation by the CLI, noticed on SIGHUP.
  const std::string before = DaemonDriver::Status(w.Socket("dev")).key_id();
  w.Command({"rotate", "--config", w.config, "--env", "dev"});
  CHECK(DaemonDriver::KeyIdAfterHup(*server, w.Socket("dev"), before) != before);
  REQUIRE(Eventually([&] { return Logged(*server, "key rotation noticed"); }));
  // A retire by the CLI, noticed by the daemon.
  w.Command({"retire", "--config", w.config, "--env", "dev", "--version", "1", "--force", "--allow-recent"});
  server->Signal(SIGHUP);
  REQUIRE(Eventually([&] { return Logged(*server, "retired key versions changed"); }));
  w.Command({"keys", "--config", w.config, "--env", "dev", "--json"});
  // A rejected reload, then an applied one.
  w.dir.Write("config.yaml", "environments: [unclosed\n");
  server->Signal(SIGHUP);
  REQUIRE(Eventually([&] { return Logged(*server, "config reload rejected"); }));
  w.dir.Write("config.yaml", w.Config());
  server->Signal(SIGHUP);
  REQUIRE(Eventually([&] { return Logged(*server, "config reloaded"); }));

  server->Signal(SIGTERM);
  REQUIRE(server->Wait() == std::optional<int>(0));

  const std::string all = server->Stderr() + w.cli_err;
  std::vector<nlohmann::json> parsed;
  std::set<std::string> levels;
  for (const std::string& line : Lines(all)) {
    INFO(line);
    REQUIRE(nlohmann::json::accept(line));  // nothing but log lines on stderr
    parsed.push_back(nlohmann::json::parse(line));
    const std::vector<std::string> problems = observe::CheckLogLine(parsed.back());
    INFO(absl::StrJoin(problems, "; "));
    CHECK(problems.empty());
    levels.insert(parsed.back().value("level", ""));
  }
  // The scenario really made the kinds of lines it is meant to check.
  CHECK(levels == std::set<std::string>{"debug", "info", "warn", "error"});
  for (const char* msg :
       {"serving", "http listening", "ready", "rpc", "rpc failed", "key rotation noticed",
        "retired key versions changed", "config reload rejected", "config reloaded", "key rotated",
        "key versions retired", "health probe failed", "SIGTERM: draining in-flight calls", "stopped"}) {
    INFO(msg);
    CHECK(!WithMsg(parsed, msg).empty());
  }
  // The environment that could not start said so through its key source's event line.
  bool unavailable = false;
  for (const nlohmann::json& line : parsed) {
    unavailable =
        unavailable || (line.value("event", "") == "unavailable" && line.value("environment", "") == "broken" &&
                        line.value("key_source", "") == "local" && line.contains("error"));
  }
  CHECK(unavailable);
  // Numbers are numbers, and a success carries no error; a Status call has no uid.
  const auto rotated = WithMsg(parsed, "key rotated");
  REQUIRE(!rotated.empty());
  CHECK(rotated[0]["version"] == 2);
  const auto retired = WithMsg(parsed, "key versions retired");
  REQUIRE(!retired.empty());
  CHECK(retired[0]["versions"] == nlohmann::json::array({1}));
  CHECK(WithMsg(parsed, "retired key versions changed")[0]["retired"] == nlohmann::json::array({1}));
  for (const nlohmann::json& line : WithMsg(parsed, "rpc")) {
    INFO(line.dump());
    CHECK(line["code"] == "OK");
    CHECK(!line.contains("error"));
    CHECK(line["latency_ms"].is_number());
    if (line["rpc"] == "v2.Status") {
      CHECK(!line.contains("uid"));
    }
  }
  const auto failed = WithMsg(parsed, "rpc failed");
  REQUIRE(!failed.empty());
  CHECK(failed[0]["level"] == "warn");
  CHECK(failed[0].contains("error"));
}

// The documented text shape: TIME LEVEL MESSAGE( KEY=VALUE)*, a message or value quoted when it is not bare.
struct TextLine {
  std::string time, level, msg;
  std::vector<std::pair<std::string, std::string>> fields;  // values unescaped
};

// Reads a quoted string at `text[i]` (the opening quote), unescaping; false if it is malformed.
bool ReadQuoted(const std::string& text, size_t& i, std::string& out) {
  if (text[i] != '"') {
    return false;
  }
  for (++i; i < text.size(); ++i) {
    const char c = text[i];
    if (c == '"') {
      ++i;
      return true;
    }
    if (c != '\\') {
      out += c;
      continue;
    }
    if (++i >= text.size()) {
      return false;
    }
    switch (text[i]) {
      case '\\':
      case '"':
        out += text[i];
        break;
      case 'n':
        out += '\n';
        break;
      case 'r':
        out += '\r';
        break;
      case 't':
        out += '\t';
        break;
      case 'x':
        out += static_cast<char>(std::stoi(text.substr(i + 1, 2), nullptr, 16));
        i += 2;
        break;
      case 'u': {
        const int code = std::stoi(text.substr(i + 1, 4), nullptr, 16);  // C1 controls only: two UTF-8 bytes
        out += static_cast<char>(0xC0 | (code >> 6));
        out += static_cast<char>(0x80 | (code & 0x3F));
        i += 4;
        break;
      }
      default:
        return false;
    }
  }
  return false;
}

std::optional<TextLine> ParseText(const std::string& line) {
  static const std::regex head(R"(^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (TRACE|DEBUG|INFO |WARN |ERROR) (.*)$)");
  static const std::regex key(R"([a-z_]+)");
  static const std::regex bare(R"([A-Za-z0-9._:/@+,\[\]-]+)");
  std::smatch match;
  if (!std::regex_match(line, match, head)) {
    return std::nullopt;
  }
  TextLine parsed{match[1], match[2], "", {}};
  const std::string rest = match[3];
  size_t i = 0;
  if (!rest.empty() && rest[0] == '"') {
    if (!ReadQuoted(rest, i, parsed.msg)) {
      return std::nullopt;
    }
  } else {
    // A bare message holds no '=': the fields start at the last space before the first '='.
    const size_t equals = rest.find('=');
    i = equals == std::string::npos ? rest.size() : rest.rfind(' ', equals);
    if (i == std::string::npos) {
      return std::nullopt;
    }
    parsed.msg = rest.substr(0, i);
  }
  while (i < rest.size()) {
    if (rest[i] != ' ') {
      return std::nullopt;
    }
    const size_t equals = rest.find('=', i + 1);
    if (equals == std::string::npos) {
      return std::nullopt;
    }
    const std::string name = rest.substr(i + 1, equals - i - 1);
    if (!std::regex_match(name, key)) {
      return std::nullopt;
    }
    i = equals + 1;
    std::string value;
    if (i < rest.size() && rest[i] == '"') {
      if (!ReadQuoted(rest, i, value)) {
        return std::nullopt;
      }
    } else {
      const size_t end = std::min(rest.find(' ', i), rest.size());
      value = rest.substr(i, end - i);
      if (!std::regex_match(value, bare)) {
        return std::nullopt;
      }
      i = end;
    }
    parsed.fields.emplace_back(name, value);
  }
  return parsed;
}

TEST_CASE(
    "Logs: --log-format text writes TIME LEVEL MESSAGE KEY=VALUE lines that a caller's uid and key_id cannot "
    "break or use to drive the terminal",
    "[integration][log][bad-input]") {
  World w;
  auto server = w.Start({"--log-format", "text", "--log-level", "debug"});
  REQUIRE(w.WaitServing(*server, w.Socket("dev")));
  // A uid that tries to end the line and forge one, and a key_id with ANSI escapes, BEL, DEL and a C1 CSI.
  const std::string forged = "2026-12-07T20:00:00.000Z ERROR forged line key_id=x";
  const std::string uid = "evil\n" + forged + "\r\n\x1b[2J\x1b]0;title\x07";
  const std::string key_id =
      "k\x1b[31mred\x7f\xc2\x9b"
      "6n\"quoted\" \\ end";
  CHECK(!DecryptAs(w.Socket("dev"), uid, key_id, "not a ciphertext").ok());
  KmsClient dev(w.Socket("dev"));
  v2::EncryptResponse encrypted;
  REQUIRE(dev.Encrypt(std::string(32, 'p'), encrypted).ok());
  server->Signal(SIGTERM);
  REQUIRE(server->Wait() == std::optional<int>(0));

  const std::string err = server->Stderr();
  // No raw control character but the line ends, and no C1 control (U+0080..U+009F) anywhere.
  for (size_t i = 0; i < err.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(err[i]);
    INFO("byte " << i << ": " << static_cast<int>(c));
    CHECK((c >= 0x20 || c == '\n'));
    CHECK(c != 0x7f);
    if (c == 0xC2 && i + 1 < err.size()) {
      const unsigned char next = static_cast<unsigned char>(err[i + 1]);
      CHECK((next < 0x80 || next > 0x9F));
    }
  }
  bool found = false;
  std::set<std::string> levels;
  for (const std::string& line : Lines(err)) {
    INFO(line);
    CHECK(line.rfind(forged, 0) != 0);  // the forged line never starts a line
    const std::optional<TextLine> parsed = ParseText(line);
    REQUIRE(parsed.has_value());
    levels.insert(parsed->level);
    for (const auto& [key, value] : parsed->fields) {
      INFO(key);
      CHECK(observe::FindLogField(key) != nullptr);
      CHECK(!value.empty());
    }
    if (parsed->msg == "rpc failed") {
      std::map<std::string, std::string> fields(parsed->fields.begin(), parsed->fields.end());
      // Escaped, not lost: the values read back are exactly what the caller sent.
      CHECK(fields["uid"] == uid);
      CHECK(fields["key_id"] == key_id);
      CHECK(fields["code"] == "INVALID_ARGUMENT");
      CHECK(fields["environment"] == "dev");
      found = true;
    }
  }
  CHECK(found);
  CHECK(levels.count("DEBUG") == 1);  // the successful Encrypt
  CHECK(levels.count("WARN ") == 1);  // the failed Decrypt
  CHECK(levels.count("INFO ") == 1);
}

TEST_CASE(
    "Logs: --log-format takes json or text, before or after the subcommand, and anything else exits 2 naming "
    "the flag",
    "[integration][log][bad-input]") {
  World w;
  for (const std::vector<std::string>& args :
       {std::vector<std::string>{"--log-format", "text", "keys", "--config", w.config, "--env", "dev"},
        std::vector<std::string>{"keys", "--config", w.config, "--env", "dev", "--log-format", "json"}}) {
    INFO(absl::StrJoin(args, " "));
    CHECK(w.Cli(args).exit_code == 0);
  }
  for (const std::vector<std::string>& args : {std::vector<std::string>{"--log-format", "yaml", "version"},
                                               std::vector<std::string>{"version", "--log-format", "JSON"},
                                               std::vector<std::string>{"--log-format", "text\x1b[31m", "version"}}) {
    const RunResult result = w.Cli(args);
    INFO(absl::StrJoin(args, " ") << " -> " << result.exit_code << ": " << result.err);
    CHECK(result.exit_code == 2);
    CHECK(Has(result.err, "--log-format"));
    CHECK(result.err.rfind("kmsplugin", 0) == 0);
    CHECK(std::count(result.err.begin(), result.err.end(), '\n') == 1);
    CHECK(result.err.find('\x1b') == std::string::npos);
  }
}

}  // namespace
}  // namespace kmsplugin::testing
