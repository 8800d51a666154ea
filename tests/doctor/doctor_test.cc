// The doctor's checks on YAML texts, with a fake Status prober: each check's PASS, WARN and FAIL paths.

#include "kmsplugin/doctor/doctor.h"

#include <map>
#include <sstream>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "kmsplugin/doctor/report.h"
#include "tests/support/status_matchers.h"

namespace kmsplugin::doctor {
namespace {

class FakeProber : public StatusProber {
 public:
  absl::StatusOr<StatusReply> Status(const std::string& socket_path, absl::Duration timeout) override {
    calls.push_back(socket_path);
    timeouts.push_back(timeout);
    auto it = answers.find(socket_path);
    if (it == answers.end()) {
      return absl::UnavailableError(absl::StrCat("failed to connect to all addresses; last error: UNKNOWN: unix:",
                                                 socket_path, ": No such file or directory"));
    }
    return it->second;
  }

  void Healthy(const std::string& socket, const std::string& version = "v2") {
    answers.insert_or_assign(socket, StatusReply{version, "ok", "local:dev:v1:1700000000", absl::Milliseconds(2)});
  }

  std::map<std::string, absl::StatusOr<StatusReply>> answers;
  std::vector<std::string> calls;
  std::vector<absl::Duration> timeouts;
};

const std::string kHeader = "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\n";

// What `kmsplugin render --env dev` prints, with `extra` providers after the kms one.
std::string Rendered(const std::string& extra = "", const std::string& kms_extra = "") {
  return "# kube-apiserver --encryption-provider-config=<this file>\n" + kHeader +
         "resources:\n"
         "  - resources:\n"
         "      - secrets\n"
         "    providers:\n"
         "      - kms:\n"
         "          apiVersion: v2\n"
         "          name: kmsplugin-dev\n"
         "          endpoint: unix:///run/kmsplugin/dev.sock\n"
         "          timeout: 3s\n" +
         kms_extra + extra;
}

// One entry for secrets with `providers` (YAML flow items, one per line).
std::string SecretsWith(const std::vector<std::string>& providers, const std::string& resources = "[secrets]") {
  std::string text = kHeader + "resources:\n  - resources: " + resources + "\n    providers:\n";
  for (const std::string& p : providers) {
    text += "      - " + p + "\n";
  }
  return text;
}

std::vector<CheckResult> Check(const std::string& yaml, FakeProber& prober, DoctorOptions options = {}) {
  auto file = ParseEncryptionConfig(yaml, "/etc/kubernetes/enc/encryption-config.yaml");
  REQUIRE(file.ok());
  if (!options.file_mode.has_value()) {
    options.file_mode = 0100600;
  }
  return RunChecks(*file, options, prober);
}

std::vector<CheckResult> Check(const std::string& yaml) {
  FakeProber prober;
  prober.Healthy("/run/kmsplugin/dev.sock");
  prober.Healthy("/run/a.sock");
  prober.Healthy("/run/b.sock");
  return Check(yaml, prober);
}

const CheckResult& Find(const std::vector<CheckResult>& results, const std::string& id) {
  for (const CheckResult& r : results) {
    if (r.id == id) {
      return r;
    }
  }
  FAIL("no check " << id);
  static const CheckResult none;
  return none;
}

bool HasRow(const std::vector<CheckResult>& results, const std::string& id) {
  return std::any_of(results.begin(), results.end(), [&](const CheckResult& r) { return r.id == id; });
}

std::string Dump(const std::vector<CheckResult>& results) { return RenderTable(results); }

#define EXPECT_VERDICT(results, id, v)          \
  do {                                          \
    const auto& rows_ = (results);              \
    INFO(Dump(rows_));                          \
    CHECK(Find(rows_, id).verdict == (v));      \
  } while (false)

bool Has(const std::string& text, const std::string& part) { return absl::StrContains(text, part); }

// ------------------------------------------------------------------------------------------------------------

TEST_CASE("Doctor: what kmsplugin render prints, against a healthy plugin, passes every check", "[doctor]") {
  FakeProber prober;
  prober.Healthy("/run/kmsplugin/dev.sock");
  const auto results = Check(Rendered(), prober);
  INFO(Dump(results));
  for (const CheckResult& r : results) {
    CHECK(r.verdict == Verdict::kPass);
    CHECK(r.fix == "-");
  }
  CHECK(Overall(results) == Verdict::kPass);
  CHECK(ExitCodeFor(results) == 0);
  CHECK(Has(Find(results, "secrets.coverage").found, "resources[0] covers Secrets (\"secrets\")"));
  CHECK(Has(Find(results, "kms.endpoint[kmsplugin-dev]").found, "healthz ok, version v2, key_id local:dev:v1"));
  CHECK(prober.calls == std::vector<std::string>{"/run/kmsplugin/dev.sock"});
  CHECK(prober.timeouts == std::vector<absl::Duration>{absl::Seconds(3)});
  CHECK_FALSE(HasRow(results, "kmsplugin.endpoints"));
}

TEST_CASE("Doctor file.format: wrong apiVersion or kind fails", "[doctor]") {
  EXPECT_VERDICT(Check("apiVersion: v1\nkind: EncryptionConfig\nresources: []\n"), "file.format", Verdict::kFail);
  EXPECT_VERDICT(Check("kind: EncryptionConfiguration\n"), "file.format", Verdict::kFail);
  const auto results = Check("apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfig\n");
  CHECK(Has(Find(results, "file.format").fix, "kind: EncryptionConfiguration"));
}

TEST_CASE("Doctor file.schema: an unknown field fails and names its path", "[doctor]") {
  const auto results = Check(Rendered("", "          timout: 10s\n"));
  EXPECT_VERDICT(results, "file.schema", Verdict::kFail);
  CHECK(Has(Find(results, "file.schema").found, "resources[0].providers[0].kms.timout: unknown field"));
  CHECK(ExitCodeFor(results) == 1);
}

TEST_CASE("Doctor file.schema: lists at most three problems and counts the rest", "[doctor]") {
  const auto results = Check(Rendered() + "a: 1\nb: 2\nc: 3\nd: 4\ne: 5\n");
  const CheckResult& row = Find(results, "file.schema");
  CHECK(row.verdict == Verdict::kFail);
  CHECK(Has(row.found, "5 problem(s)"));
  CHECK(Has(row.found, "and 2 more"));
}

TEST_CASE("Doctor file.permissions: 0600 passes, group or others reading warns, writing fails", "[doctor]") {
  FakeProber prober;
  prober.Healthy("/run/kmsplugin/dev.sock");
  auto with_mode = [&](mode_t mode, const std::string& yaml) {
    DoctorOptions options;
    options.file_mode = 0100000 | mode;
    return Find(Check(yaml, prober, options), "file.permissions");
  };
  CHECK(with_mode(0600, Rendered()).verdict == Verdict::kPass);
  CHECK(with_mode(0400, Rendered()).verdict == Verdict::kPass);
  CHECK(with_mode(0640, Rendered()).verdict == Verdict::kWarn);
  CHECK(with_mode(0644, Rendered()).verdict == Verdict::kWarn);
  CHECK(with_mode(0620, Rendered()).verdict == Verdict::kFail);
  CHECK(with_mode(0602, Rendered()).verdict == Verdict::kFail);
  CHECK(with_mode(0666, Rendered()).verdict == Verdict::kFail);
  const CheckResult row = with_mode(0644, Rendered());
  CHECK(Has(row.found, "mode 0644"));
  CHECK(row.fix == "chmod 600 /etc/kubernetes/enc/encryption-config.yaml");
}

TEST_CASE("Doctor file.permissions: static keys readable by the group fail", "[doctor]") {
  FakeProber prober;
  DoctorOptions options;
  options.file_mode = 0100640;
  const auto results =
      Check(SecretsWith({"aescbc: {keys: [{name: k1, secret: c2VjcmV0IGlzIHNlY3VyZQ==}]}"}), prober, options);
  EXPECT_VERDICT(results, "file.permissions", Verdict::kFail);
  CHECK(Has(Find(results, "file.permissions").found, "static keys"));
}

TEST_CASE("Doctor file.permissions: no row when the mode is unknown", "[doctor]") {
  FakeProber prober;
  auto file = ParseEncryptionConfig(Rendered(), "f");
  REQUIRE(file.ok());
  CHECK_FALSE(HasRow(RunChecks(*file, DoctorOptions{}, prober), "file.permissions"));
}

TEST_CASE("Doctor secrets.coverage: no entry for Secrets fails (they are stored as plaintext)", "[doctor]") {
  for (const std::string resources : {"[configmaps]", "['*.apps']", "['*.events']", "[secrets.example.com]"}) {
    INFO(resources);
    const auto results = Check(SecretsWith({"kms: {apiVersion: v2, name: a, endpoint: unix:///run/a.sock}"}, resources));
    EXPECT_VERDICT(results, "secrets.coverage", Verdict::kFail);
    EXPECT_VERDICT(results, "secrets.write-provider", Verdict::kFail);
    CHECK(Has(Find(results, "secrets.coverage").found, "plaintext"));
  }
}

TEST_CASE("Doctor secrets.coverage: the core-group and all-groups wildcards cover Secrets", "[doctor]") {
  for (const std::string resources : {"['*.']", "['*.*']", "[configmaps, secrets]"}) {
    INFO(resources);
    const auto results = Check(SecretsWith({"kms: {apiVersion: v2, name: a, endpoint: unix:///run/a.sock}"}, resources));
    EXPECT_VERDICT(results, "secrets.coverage", Verdict::kPass);
    EXPECT_VERDICT(results, "secrets.write-provider", Verdict::kPass);
  }
}

TEST_CASE("Doctor secrets.coverage: an explicit entry before a wildcard is the one that applies", "[doctor]") {
  const auto results = Check(kHeader +
                             "resources:\n"
                             "  - resources: [secrets]\n"
                             "    providers: [{kms: {apiVersion: v2, name: a, endpoint: 'unix:///run/a.sock'}}]\n"
                             "  - resources: ['*.*']\n"
                             "    providers: [{identity: {}}]\n");
  EXPECT_VERDICT(results, "secrets.coverage", Verdict::kPass);
  const CheckResult& row = Find(results, "secrets.coverage");
  CHECK(Has(row.found, "resources[0] covers Secrets"));
  CHECK(Has(row.found, "resources[1] (\"*.*\") does not apply to Secrets"));
  EXPECT_VERDICT(results, "secrets.write-provider", Verdict::kPass);
}

TEST_CASE("Doctor secrets.coverage: a wildcard first masks a later secrets entry, which kube-apiserver refuses",
          "[doctor]") {
  const auto results = Check(kHeader +
                             "resources:\n"
                             "  - resources: ['*.']\n"
                             "    providers: [{identity: {}}]\n"
                             "  - resources: [secrets]\n"
                             "    providers: [{kms: {apiVersion: v2, name: a, endpoint: 'unix:///run/a.sock'}}]\n");
  EXPECT_VERDICT(results, "secrets.coverage", Verdict::kFail);
  CHECK(Has(Find(results, "secrets.coverage").found, "masked by the earlier \"*.\" in resources[0]"));
  EXPECT_VERDICT(results, "file.schema", Verdict::kFail);
}

TEST_CASE("Doctor secrets.coverage: secrets listed in two entries combine their providers, the first writes",
          "[doctor]") {
  const auto results = Check(kHeader +
                             "resources:\n"
                             "  - resources: [secrets]\n"
                             "    providers: [{kms: {apiVersion: v2, name: a, endpoint: 'unix:///run/a.sock'}}]\n"
                             "  - resources: [secrets]\n"
                             "    providers: [{identity: {}}]\n");
  EXPECT_VERDICT(results, "secrets.coverage", Verdict::kPass);
  CHECK(Has(Find(results, "secrets.coverage").found, "resources[1] also lists secrets"));
  EXPECT_VERDICT(results, "secrets.write-provider", Verdict::kPass);
}

TEST_CASE("Doctor secrets.write-provider: identity first fails: Secrets are written as plaintext", "[doctor]") {
  const auto results =
      Check(SecretsWith({"identity: {}", "kms: {apiVersion: v2, name: a, endpoint: unix:///run/a.sock}"}));
  EXPECT_VERDICT(results, "secrets.write-provider", Verdict::kFail);
  CHECK(Has(Find(results, "secrets.write-provider").found, "plaintext"));
  EXPECT_VERDICT(results, "identity.fallback", Verdict::kPass);  // identity before kms is not a fallback
  CHECK(ExitCodeFor(results) == 1);
  // Also through a wildcard.
  EXPECT_VERDICT(Check(SecretsWith({"identity: {}"}, "['*.*']")), "secrets.write-provider", Verdict::kFail);
}

TEST_CASE("Doctor secrets.write-provider: aescbc, aesgcm and secretbox warn (the key is in the file)", "[doctor]") {
  const std::string key16 = "{keys: [{name: k, secret: c2VjcmV0IGlzIHNlY3VyZQ==}]}";
  const std::string key32 = "{keys: [{name: k, secret: YWJjZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXoxMjM0NTY=}]}";
  for (const std::string& provider : {"aescbc: " + key16, "aesgcm: " + key16, "secretbox: " + key32}) {
    INFO(provider);
    const auto results = Check(SecretsWith({provider}));
    EXPECT_VERDICT(results, "secrets.write-provider", Verdict::kWarn);
    CHECK(Has(Find(results, "secrets.write-provider").found, "sits in this file"));
    CHECK(Overall(results) == Verdict::kWarn);
    CHECK(ExitCodeFor(results) == 0);
  }
}

TEST_CASE("Doctor secrets.write-provider: kms v1 (explicit or by default) warns: deprecated", "[doctor]") {
  for (const std::string provider : {"kms: {name: a, endpoint: unix:///run/a.sock}",
                                     "kms: {apiVersion: v1, name: a, endpoint: unix:///run/a.sock}"}) {
    INFO(provider);
    const auto results = Check(SecretsWith({provider}));
    EXPECT_VERDICT(results, "secrets.write-provider", Verdict::kWarn);
    CHECK(Has(Find(results, "secrets.write-provider").found, "deprecated since Kubernetes 1.28"));
  }
}

TEST_CASE("Doctor secrets.write-provider: kms with an unsupported apiVersion fails", "[doctor]") {
  EXPECT_VERDICT(Check(SecretsWith({"kms: {apiVersion: v3, name: a, endpoint: unix:///run/a.sock}"})),
                 "secrets.write-provider", Verdict::kFail);
}

TEST_CASE("Doctor identity.fallback: identity after kms warns that a migration is in progress", "[doctor]") {
  const auto results = Check(Rendered("      - identity: {}\n"));
  EXPECT_VERDICT(results, "identity.fallback", Verdict::kWarn);
  const CheckResult& row = Find(results, "identity.fallback");
  CHECK(Has(row.found, "migration in progress: reads unencrypted Secrets"));
  CHECK(row.fix == "remove identity once `kmsplugin audit` reports none unencrypted");
  CHECK(ExitCodeFor(results) == 0);
}

TEST_CASE("Doctor kms.v1-feature-gate: any kms v1 provider warns with the feature gate kube-apiserver 1.29+ needs",
          "[doctor]") {
  const auto v2_only = Check(Rendered());
  EXPECT_VERDICT(v2_only, "kms.v1-feature-gate", Verdict::kPass);
  // The shape `render --v1-fallback` writes: v2 first, then a v1 provider on the same socket.
  const auto fallback = Check(Rendered(
      "      - kms:\n          apiVersion: v1\n          name: kmsplugin-dev-v1\n"
      "          endpoint: unix:///run/kmsplugin/dev.sock\n"));
  EXPECT_VERDICT(fallback, "kms.v1-feature-gate", Verdict::kWarn);
  const CheckResult& row = Find(fallback, "kms.v1-feature-gate");
  CHECK(Has(row.found, "\"kmsplugin-dev-v1\""));
  CHECK(Has(row.found, "--feature-gates=KMSv1=true"));
  CHECK(Has(row.fix, "kmsplugin audit"));
  // A provider without apiVersion is v1 by kube-apiserver's default.
  EXPECT_VERDICT(Check(SecretsWith({"kms: {name: a, endpoint: unix:///run/a.sock}"})), "kms.v1-feature-gate",
                 Verdict::kWarn);
}

TEST_CASE("Doctor kms.names: ':' in a v2 name fails, in a v1 name it warns", "[doctor]") {
  const auto v2 = Check(SecretsWith({"kms: {apiVersion: v2, name: 'a:b', endpoint: unix:///run/a.sock}"}));
  EXPECT_VERDICT(v2, "kms.names", Verdict::kFail);
  CHECK(Has(Find(v2, "kms.names").found, "\"a:b\""));
  EXPECT_VERDICT(Check(SecretsWith({"kms: {name: 'a:b', endpoint: unix:///run/a.sock}"})), "kms.names",
                 Verdict::kWarn);
}

TEST_CASE("Doctor kms.names: a v2 name used twice across the file fails, twice among v1 only warns", "[doctor]") {
  const auto results = Check(kHeader +
                             "resources:\n"
                             "  - resources: [secrets]\n"
                             "    providers: [{kms: {apiVersion: v2, name: a, endpoint: 'unix:///run/a.sock'}}]\n"
                             "  - resources: [configmaps]\n"
                             "    providers: [{kms: {apiVersion: v2, name: a, endpoint: 'unix:///run/b.sock'}}]\n");
  EXPECT_VERDICT(results, "kms.names", Verdict::kFail);
  CHECK(Has(Find(results, "kms.names").found, "\"a\" is used 2 times"));
  EXPECT_VERDICT(Check(SecretsWith({"kms: {name: a, endpoint: unix:///run/a.sock}",
                                    "kms: {name: a, endpoint: unix:///run/b.sock}"})),
                 "kms.names", Verdict::kWarn);
  EXPECT_VERDICT(Check(SecretsWith({"kms: {name: a, endpoint: unix:///run/a.sock}",
                                    "kms: {apiVersion: v2, name: a, endpoint: unix:///run/b.sock}"})),
                 "kms.names", Verdict::kFail);
}

TEST_CASE("Doctor kms.names: a kms provider without a name fails", "[doctor]") {
  const auto results = Check(SecretsWith({"kms: {apiVersion: v2, endpoint: unix:///run/a.sock}"}));
  EXPECT_VERDICT(results, "kms.names", Verdict::kFail);
  CHECK(HasRow(results, "kms.endpoint[resources[0].providers[0]]"));
}

TEST_CASE("Doctor kms.endpoint: anything but unix:// with an absolute, non-abstract path fails unprobed",
          "[doctor]") {
  for (const std::string endpoint : {"unix://run/a.sock", "tcp://127.0.0.1:9000", "/run/a.sock", "unix:///@kms",
                                     "''", "unix://"}) {
    INFO(endpoint);
    FakeProber prober;
    const auto results = Check(SecretsWith({"kms: {apiVersion: v2, name: a, endpoint: " + endpoint + "}"}), prober);
    EXPECT_VERDICT(results, "kms.endpoint[a]", Verdict::kFail);
    CHECK(Has(Find(results, "kms.endpoint[a]").fix, "unix:///run/kmsplugin/dev.sock"));
    CHECK(prober.calls.empty());
  }
}

TEST_CASE("Doctor kms.endpoint: a socket nobody answers on fails, naming the socket and the gRPC error",
          "[doctor]") {
  FakeProber prober;
  const auto results = Check(Rendered(), prober);
  EXPECT_VERDICT(results, "kms.endpoint[kmsplugin-dev]", Verdict::kFail);
  const CheckResult& row = Find(results, "kms.endpoint[kmsplugin-dev]");
  CHECK(Has(row.found, "Status on /run/kmsplugin/dev.sock failed: UNAVAILABLE"));
  CHECK(Has(row.found, "No such file or directory"));
  CHECK(Has(row.fix, "kmsplugin status --socket /run/kmsplugin/dev.sock"));
  CHECK(ExitCodeFor(results) == 1);
}

TEST_CASE("Doctor kms.endpoint: a deadline exceeded fails", "[doctor]") {
  FakeProber prober;
  prober.answers.emplace("/run/kmsplugin/dev.sock", absl::DeadlineExceededError("Deadline Exceeded"));
  DoctorOptions options;
  options.probe_timeout = absl::Milliseconds(250);
  const auto results = Check(Rendered(), prober, options);
  EXPECT_VERDICT(results, "kms.endpoint[kmsplugin-dev]", Verdict::kFail);
  CHECK(Has(Find(results, "kms.endpoint[kmsplugin-dev]").found, "DEADLINE_EXCEEDED"));
  CHECK(prober.timeouts == std::vector<absl::Duration>{absl::Milliseconds(250)});
}

TEST_CASE("Doctor kms.endpoint: unhealthy, empty or oversized key_id, or a wrong version fail", "[doctor]") {
  struct Case {
    StatusReply reply;
    std::string expect;
  };
  const std::vector<Case> cases = {
      {{"v2", "backend unavailable: vault sealed", "k", absl::Milliseconds(1)}, "healthz \"backend unavailable"},
      {{"v2", "ok", "", absl::Milliseconds(1)}, "empty key_id"},
      {{"v2", "ok", std::string(1025, 'k'), absl::Milliseconds(1)}, "key_id of 1025 bytes"},
      {{"v1beta1", "ok", "k", absl::Milliseconds(1)}, "version \"v1beta1\""},
      {{"v2", "ok", "k", absl::Seconds(4)}, "answered in 4s, beyond the file's timeout 3s"},
  };
  for (const Case& c : cases) {
    INFO(c.expect);
    FakeProber prober;
    prober.answers.emplace("/run/kmsplugin/dev.sock", c.reply);
    const auto results = Check(Rendered(), prober);
    EXPECT_VERDICT(results, "kms.endpoint[kmsplugin-dev]", Verdict::kFail);
    CHECK(Has(Find(results, "kms.endpoint[kmsplugin-dev]").found, c.expect));
  }
}

TEST_CASE("Doctor kms.endpoint: version v2beta1 warns", "[doctor]") {
  FakeProber prober;
  prober.Healthy("/run/kmsplugin/dev.sock", "v2beta1");
  const auto results = Check(Rendered(), prober);
  EXPECT_VERDICT(results, "kms.endpoint[kmsplugin-dev]", Verdict::kWarn);
  CHECK(Has(Find(results, "kms.endpoint[kmsplugin-dev]").fix, "statusVersion: v2"));
}

TEST_CASE("Doctor kms.endpoint: a v1 provider on a v1beta1-only plugin warns, other errors fail", "[doctor]") {
  FakeProber prober;
  prober.answers.emplace("/run/a.sock", absl::UnimplementedError("unknown service v2.KeyManagementService"));
  EXPECT_VERDICT(Check(SecretsWith({"kms: {name: a, endpoint: unix:///run/a.sock}"}), prober), "kms.endpoint[a]",
                 Verdict::kWarn);
  EXPECT_VERDICT(Check(SecretsWith({"kms: {apiVersion: v2, name: a, endpoint: unix:///run/a.sock}"}), prober),
                 "kms.endpoint[a]", Verdict::kFail);
}

TEST_CASE("Doctor kms.endpoint: one row per provider, one Status call per socket", "[doctor]") {
  FakeProber prober;
  prober.Healthy("/run/a.sock");
  const auto results = Check(kHeader +
                             "resources:\n"
                             "  - resources: [secrets]\n"
                             "    providers: [{kms: {apiVersion: v2, name: a, endpoint: 'unix:///run/a.sock'}}]\n"
                             "  - resources: [configmaps]\n"
                             "    providers: [{kms: {apiVersion: v2, name: b, endpoint: 'unix:///run//a.sock'}},\n"
                             "                {kms: {apiVersion: v2, name: c, endpoint: 'unix:///run/a.sock'}}]\n",
                             prober);
  EXPECT_VERDICT(results, "kms.endpoint[a]", Verdict::kPass);
  EXPECT_VERDICT(results, "kms.endpoint[c]", Verdict::kPass);
  EXPECT_VERDICT(results, "kms.endpoint[b]", Verdict::kFail);  // "/run//a.sock" is another socket to the fake
  CHECK(prober.calls.size() == 2);
}

TEST_CASE("Doctor kms.timeouts: absent or 1s..10s pass, below 1s, unparsable or not positive fail, long warns",
          "[doctor]") {
  const std::map<std::string, Verdict> cases = {
      {"", Verdict::kPass},          {"timeout: 1s", Verdict::kPass}, {"timeout: 10s", Verdict::kPass},
      {"timeout: 1m", Verdict::kWarn}, {"timeout: 30s", Verdict::kWarn}, {"timeout: 500ms", Verdict::kFail},
      {"timeout: 0s", Verdict::kFail}, {"timeout: -3s", Verdict::kFail}, {"timeout: '3'", Verdict::kFail},
      {"timeout: soon", Verdict::kFail}, {"timeout: 1m30s", Verdict::kWarn},
  };
  for (const auto& [setting, verdict] : cases) {
    INFO(setting);
    const std::string kms = "kms: {apiVersion: v2, name: a, endpoint: unix:///run/a.sock" +
                            (setting.empty() ? std::string() : ", " + setting) + "}";
    const auto results = Check(SecretsWith({kms}));
    EXPECT_VERDICT(results, "kms.timeouts", verdict);
  }
  CHECK(Has(Find(Check(SecretsWith({"kms: {apiVersion: v2, name: a, endpoint: unix:///run/a.sock}"})),
                 "kms.timeouts")
                .found,
            "3s (default)"));
}

TEST_CASE("ParseGoDuration: Go duration syntax only", "[doctor]") {
  CHECK(ParseGoDuration("3s") == absl::Seconds(3));
  CHECK(ParseGoDuration("1m30s") == absl::Seconds(90));
  CHECK(ParseGoDuration("1.5s") == absl::Milliseconds(1500));
  CHECK(ParseGoDuration("0") == absl::ZeroDuration());
  CHECK_FALSE(ParseGoDuration("3").has_value());
  CHECK_FALSE(ParseGoDuration("").has_value());
  CHECK_FALSE(ParseGoDuration("inf").has_value());
  CHECK_FALSE(ParseGoDuration("3 s").has_value());
}

// ------------------------------------------------------------------------------------------------------------
// With kmsplugin's config.

config::Config PluginConfig() {
  config::Config config;
  config.file = "/etc/kmsplugin/config.yaml";
  config::EnvironmentConfig dev;
  dev.name = "dev";
  dev.socket = "/run/kmsplugin/dev.sock";
  config::EnvironmentConfig prod;
  prod.name = "prod";
  prod.socket = "/run/kmsplugin/prod.sock";
  config.environments = {dev, prod};
  return config;
}

TEST_CASE("Doctor kmsplugin.*: endpoints that are environments' sockets pass and name the environment", "[doctor]") {
  const config::Config config = PluginConfig();
  FakeProber prober;
  prober.Healthy("/run/kmsplugin/dev.sock");
  DoctorOptions options;
  options.plugin_config = &config;
  const auto results = Check(Rendered(), prober, options);
  EXPECT_VERDICT(results, "kmsplugin.endpoints", Verdict::kPass);
  CHECK(Has(Find(results, "kmsplugin.endpoints").found, "\"kmsplugin-dev\" -> environment dev"));
  EXPECT_VERDICT(results, "kmsplugin.secrets-environment", Verdict::kPass);
  CHECK(Has(Find(results, "kmsplugin.secrets-environment").found, "environment dev"));
  CHECK(Overall(results) == Verdict::kPass);
}

TEST_CASE("Doctor kmsplugin.*: an endpoint no environment serves warns, as Secrets' writer it fails", "[doctor]") {
  const config::Config config = PluginConfig();
  FakeProber prober;
  prober.Healthy("/run/other/kms.sock");
  prober.Healthy("/run/kmsplugin/prod.sock");
  DoctorOptions options;
  options.plugin_config = &config;
  const auto results = Check(SecretsWith({"kms: {apiVersion: v2, name: other, endpoint: unix:///run/other/kms.sock}",
                                          "kms: {apiVersion: v2, name: p, endpoint: unix:///run/kmsplugin/prod.sock}"}),
                             prober, options);
  EXPECT_VERDICT(results, "kmsplugin.endpoints", Verdict::kWarn);
  CHECK(Has(Find(results, "kmsplugin.endpoints").found, "\"other\" (unix:///run/other/kms.sock)"));
  CHECK(Has(Find(results, "kmsplugin.endpoints").fix, "dev (/run/kmsplugin/dev.sock), prod"));
  EXPECT_VERDICT(results, "kmsplugin.secrets-environment", Verdict::kFail);
  CHECK(Has(Find(results, "kmsplugin.secrets-environment").found, "no environment in /etc/kmsplugin/config.yaml"));
}

TEST_CASE("Doctor kmsplugin.secrets-environment: Secrets not written through kms fail", "[doctor]") {
  const config::Config config = PluginConfig();
  FakeProber prober;
  DoctorOptions options;
  options.plugin_config = &config;
  EXPECT_VERDICT(Check(SecretsWith({"identity: {}"}), prober, options), "kmsplugin.secrets-environment",
                 Verdict::kFail);
  EXPECT_VERDICT(Check(SecretsWith({"identity: {}"}, "[configmaps]"), prober, options),
                 "kmsplugin.secrets-environment", Verdict::kFail);
}

// ------------------------------------------------------------------------------------------------------------
// Report.

TEST_CASE("Doctor report: the table aligns columns and ends with the overall verdict", "[doctor]") {
  const std::vector<CheckResult> results = {
      {"file.format", Verdict::kPass, "fine", "-"},
      {"kms.endpoint[kmsplugin-dev]", Verdict::kFail, "Status on /run/x.sock failed: UNAVAILABLE", "start it"},
      {"identity.fallback", Verdict::kWarn, "migration in progress", "remove identity"},
  };
  const std::string table = RenderTable(results);
  std::istringstream lines(table);
  std::string line;
  std::vector<std::string> rows;
  while (std::getline(lines, line)) {
    rows.push_back(line);
  }
  REQUIRE(rows.size() == 5);
  const size_t verdict_column = rows[0].find("VERDICT");
  const size_t found_column = rows[0].find("FOUND");
  const size_t fix_column = rows[0].find("FIX");
  CHECK(rows[1].find("PASS") == verdict_column);
  CHECK(rows[2].find("FAIL") == verdict_column);
  CHECK(rows[3].find("WARN") == verdict_column);
  CHECK(rows[2].find("Status on") == found_column);
  CHECK(rows[2].find("start it") == fix_column);
  CHECK(rows[4] == "verdict: FAIL (1 FAIL, 1 WARN, 1 PASS)");
}

TEST_CASE("Doctor report: JSON has checks with id, verdict, found, fix and the overall verdict", "[doctor]") {
  const std::vector<CheckResult> results = {{"file.format", Verdict::kPass, "fine", "-"},
                                            {"identity.fallback", Verdict::kWarn, "m", "r"}};
  const nlohmann::json doc = nlohmann::json::parse(ResultsJson(results).dump());
  REQUIRE(doc["checks"].size() == 2);
  CHECK(doc["checks"][1] == nlohmann::json{{"id", "identity.fallback"}, {"verdict", "WARN"}, {"found", "m"},
                                           {"fix", "r"}});
  CHECK(doc["verdict"] == "WARN");
  CHECK(ExitCodeFor(results) == 0);
  CHECK(ResultsJson({})["verdict"] == "PASS");
}

}  // namespace
}  // namespace kmsplugin::doctor
