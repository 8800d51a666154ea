// The EncryptionConfiguration reader: what it refuses outright (exit 2 in the CLI) and what it records as a
// problem kube-apiserver would refuse, each with its path.

#include "kmsplugin/doctor/encryption_config.h"

#include <catch2/catch.hpp>

#include "absl/strings/match.h"
#include "absl/strings/str_join.h"
#include "tests/support/status_matchers.h"

namespace kmsplugin::doctor {
namespace {

using testing::IsOk;
using testing::StatusIs;

EncryptionConfigFile Parse(const std::string& yaml) {
  auto parsed = ParseEncryptionConfig(yaml, "/etc/kubernetes/enc.yaml");
  REQUIRE_THAT(parsed, IsOk());
  return *parsed;
}

bool HasProblem(const EncryptionConfigFile& file, const std::string& part) {
  for (const std::string& p : file.problems) {
    if (absl::StrContains(p, part)) {
      return true;
    }
  }
  return false;
}

const std::string kHeader = "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\n";

TEST_CASE("EncryptionConfig: empty, non-YAML and non-mapping texts are errors naming the file", "[doctor]") {
  CHECK_THAT(ParseEncryptionConfig("", "/x/enc.yaml"), StatusIs(absl::StatusCode::kInvalidArgument, "/x/enc.yaml: is empty"));
  CHECK_THAT(ParseEncryptionConfig("  \n# only a comment\n", "/x/enc.yaml"),
             StatusIs(absl::StatusCode::kInvalidArgument, "/x/enc.yaml"));
  CHECK_THAT(ParseEncryptionConfig("resources: [\n", "/x/enc.yaml"),
             StatusIs(absl::StatusCode::kInvalidArgument, "not valid YAML (line"));
  CHECK_THAT(ParseEncryptionConfig("- a\n- b\n", "/x/enc.yaml"),
             StatusIs(absl::StatusCode::kInvalidArgument, "top level is a list, not a mapping"));
  CHECK_THAT(ParseEncryptionConfig("just text\n", "/x/enc.yaml"),
             StatusIs(absl::StatusCode::kInvalidArgument, "not a mapping"));
}

TEST_CASE("EncryptionConfig: reads entries, providers and kms settings as written", "[doctor]") {
  const EncryptionConfigFile file = Parse(kHeader +
                                          "resources:\n"
                                          "  - resources: [secrets, configmaps]\n"
                                          "    providers:\n"
                                          "      - kms: {apiVersion: v2, name: a, endpoint: unix:///run/a.sock, timeout: 5s}\n"
                                          "      - kms: {name: old, endpoint: unix:///run/old.sock, cachesize: 100}\n"
                                          "      - identity: {}\n");
  CHECK(file.problems.empty());
  CHECK(file.api_version == "apiserver.config.k8s.io/v1");
  CHECK(file.kind == "EncryptionConfiguration");
  REQUIRE(file.entries.size() == 1);
  CHECK(file.entries[0].resources == std::vector<std::string>{"secrets", "configmaps"});
  REQUIRE(file.entries[0].providers.size() == 3);
  const Provider& v2 = file.entries[0].providers[0];
  CHECK(v2.type == ProviderType::kKms);
  CHECK(v2.path == "resources[0].providers[0]");
  CHECK(v2.kms.IsV2());
  CHECK(v2.kms.timeout == std::optional<std::string>("5s"));
  const Provider& v1 = file.entries[0].providers[1];
  CHECK(v1.kms.EffectiveApiVersion() == "v1");
  CHECK(!v1.kms.timeout.has_value());
  CHECK(file.entries[0].providers[2].type == ProviderType::kIdentity);
  CHECK(file.KmsProviders().size() == 2);
  CHECK_FALSE(file.HoldsStaticKeys());
}

TEST_CASE("EncryptionConfig: unknown and repeated fields are problems with their path", "[doctor]") {
  const EncryptionConfigFile file = Parse(kHeader +
                                          "metadata: {name: x}\n"
                                          "resources:\n"
                                          "  - resources: [secrets]\n"
                                          "    providers:\n"
                                          "      - kms:\n"
                                          "          apiVersion: v2\n"
                                          "          name: a\n"
                                          "          name: b\n"
                                          "          endpoint: unix:///run/a.sock\n"
                                          "          timout: 10s\n");
  CHECK(HasProblem(file, "metadata: unknown field"));
  CHECK(HasProblem(file, "resources[0].providers[0].kms.timout: unknown field"));
  CHECK(HasProblem(file, "resources[0].providers[0].kms.name: appears more than once"));
  CHECK(file.problems.size() == 3);
}

TEST_CASE("EncryptionConfig: a provider element with no provider, two providers, or an empty value", "[doctor]") {
  const EncryptionConfigFile file = Parse(kHeader +
                                          "resources:\n"
                                          "  - resources: [secrets]\n"
                                          "    providers:\n"
                                          "      - {}\n"
                                          "      - identity: {}\n"
                                          "        aescbc: {keys: [{name: k, secret: c2VjcmV0IGlzIHNlY3VyZQ==}]}\n"
                                          "      - identity:\n"
                                          "      - kms:\n");
  CHECK(HasProblem(file, "providers[0]: names no provider"));
  CHECK(HasProblem(file, "providers[1]: names more than one provider (identity, aescbc)"));
  CHECK(HasProblem(file, "providers[2].identity: is empty; write identity: {}"));
  CHECK(HasProblem(file, "providers[3].kms: is empty"));
}

TEST_CASE("EncryptionConfig: missing resources and providers are problems", "[doctor]") {
  CHECK(HasProblem(Parse(kHeader), "resources: at least one entry is required"));
  CHECK(HasProblem(Parse(kHeader + "resources: secrets\n"), "resources: must be a list"));
  const EncryptionConfigFile file = Parse(kHeader + "resources:\n  - resources: []\n  - providers: [{identity: {}}]\n");
  CHECK(HasProblem(file, "resources[0].resources: at least one resource is required"));
  CHECK(HasProblem(file, "resources[0].providers: at least one provider is required"));
  CHECK(HasProblem(file, "resources[1].resources: at least one resource is required"));
}

TEST_CASE("EncryptionConfig: kms apiVersion and cachesize rules", "[doctor]") {
  const EncryptionConfigFile file = Parse(kHeader +
                                          "resources:\n"
                                          "  - resources: [secrets]\n"
                                          "    providers:\n"
                                          "      - kms: {apiVersion: v2, name: a, endpoint: unix:///a, cachesize: 10}\n"
                                          "      - kms: {apiVersion: v1, name: b, endpoint: unix:///b, cachesize: 0}\n"
                                          "      - kms: {apiVersion: v3, name: c, endpoint: unix:///c}\n"
                                          "      - kms: {name: d, endpoint: unix:///d, cachesize: lots}\n"
                                          "      - kms: {name: e, endpoint: unix:///e, cachesize: -1}\n");
  CHECK(HasProblem(file, "providers[0].kms.cachesize: is not supported in v2"));
  CHECK(HasProblem(file, "providers[1].kms.cachesize: must be positive, or negative"));
  CHECK(HasProblem(file, "providers[2].kms.apiVersion: \"v3\" is not supported"));
  CHECK(HasProblem(file, "providers[3].kms.cachesize: \"lots\" is not a whole number"));
  CHECK(file.problems.size() == 4);
}

TEST_CASE("EncryptionConfig: static keys of the wrong length are problems, and no secret is ever quoted", "[doctor]") {
  const std::string short_secret = "c2hvcnQ=";                                      // "short"
  const std::string aes16 = "c2VjcmV0IGlzIHNlY3VyZQ==";                             // 16 bytes
  const EncryptionConfigFile file = Parse(kHeader +
                                          "resources:\n"
                                          "  - resources: [secrets]\n"
                                          "    providers:\n"
                                          "      - aescbc: {keys: [{name: k1, secret: " + short_secret + "}]}\n"
                                          "      - secretbox: {keys: [{name: k2, secret: " + aes16 + "}]}\n"
                                          "      - aesgcm: {keys: [{name: k3, secret: '%%%notbase64'}]}\n"
                                          "      - aesgcm: {keys: []}\n"
                                          "      - aescbc: {keys: [{secret: " + aes16 + "}]}\n");
  CHECK(HasProblem(file, "providers[0].aescbc.keys[0].secret: decodes to 5 bytes; AES needs 16, 24 or 32"));
  CHECK(HasProblem(file, "providers[1].secretbox.keys[0].secret: decodes to 16 bytes; secretbox needs 32"));
  CHECK(HasProblem(file, "providers[2].aesgcm.keys[0].secret: is not base64 (value not shown)"));
  CHECK(HasProblem(file, "providers[3].aesgcm.keys: at least one key is required"));
  CHECK(HasProblem(file, "providers[4].aescbc.keys[0].name: is required"));
  const std::string all = absl::StrJoin(file.problems, "\n");
  CHECK_FALSE(absl::StrContains(all, short_secret));
  CHECK_FALSE(absl::StrContains(all, aes16));
  CHECK_FALSE(absl::StrContains(all, "notbase64"));
  CHECK(file.HoldsStaticKeys());
}

TEST_CASE("EncryptionConfig: overlapping and masked resources are problems, as kube-apiserver refuses them", "[doctor]") {
  const EncryptionConfigFile file = Parse(kHeader +
                                          "resources:\n"
                                          "  - resources: ['*.*']\n"
                                          "    providers: [{identity: {}}]\n"
                                          "  - resources: [secrets]\n"
                                          "    providers: [{identity: {}}]\n"
                                          "  - resources: [configmaps, '*.', Pods, '*', 'secrets.*', configmaps]\n"
                                          "    providers: [{identity: {}}]\n");
  CHECK(HasProblem(file, "resources[1].resources[0]: \"secrets\" is masked by the earlier rule \"*.*\""));
  CHECK(HasProblem(file, "resources[2].resources[2]: \"Pods\" has capital letters"));
  CHECK(HasProblem(file, "resources[2].resources[3]: \"*\" is not allowed"));
  CHECK(HasProblem(file, "resources[2].resources[4]: \"secrets.*\" names one resource across all groups"));
  CHECK(HasProblem(file, "resources[2].resources: names the same resource more than once"));
  CHECK(HasProblem(file, "resources[2].resources: mixes a wildcard"));
}

TEST_CASE("EncryptionConfig: a later wildcard after specific resources is accepted", "[doctor]") {
  const EncryptionConfigFile file = Parse(kHeader +
                                          "resources:\n"
                                          "  - resources: [secrets]\n"
                                          "    providers: [{identity: {}}]\n"
                                          "  - resources: ['*.apps']\n"
                                          "    providers: [{identity: {}}]\n"
                                          "  - resources: ['*.*']\n"
                                          "    providers: [{identity: {}}]\n");
  CHECK(file.problems.empty());
}

TEST_CASE("EncryptionConfig: several YAML documents are a problem, the first is read", "[doctor]") {
  const EncryptionConfigFile file = Parse(kHeader + "resources:\n  - resources: [secrets]\n    providers: [{identity: {}}]\n"
                                                    "---\n" + kHeader);
  CHECK(HasProblem(file, "holds 2 YAML documents"));
  CHECK(file.entries.size() == 1);
}

TEST_CASE("ParseGroupResource: splits at the first dot as Kubernetes does", "[doctor]") {
  CHECK(ParseGroupResource("secrets") == GroupResource{"", "secrets"});
  CHECK(ParseGroupResource("*.") == GroupResource{"", "*"});
  CHECK(ParseGroupResource("*.*") == GroupResource{"*", "*"});
  CHECK(ParseGroupResource("*.apps") == GroupResource{"apps", "*"});
  CHECK(ParseGroupResource("pandas.awesome.bears.example") == GroupResource{"awesome.bears.example", "pandas"});
}

}  // namespace
}  // namespace kmsplugin::doctor
