#include "kmsplugin/config/input_limits.h"
#include "kmsplugin/doctor/encryption_config.h"

#include <algorithm>
#include <initializer_list>
#include <set>

#include <yaml-cpp/yaml.h>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kmsplugin/core/sv.h"

// What kube-apiserver accepts, from kubernetes/kubernetes staging/src/k8s.io/apiserver:
//   pkg/apis/apiserver/validation/validation_encryption.go (resource names, overlaps, one provider per element,
//     keys of 16/24/32 bytes for AES and 32 for secretbox, kms apiVersion v1|v2, cachesize rules);
//   pkg/apis/apiserver/v1/defaults.go (kms apiVersion defaults to v1, timeout to 3s, v1 cachesize to 1000);
//   pkg/server/options/encryptionconfig/config.go (strict decoding: unknown or repeated fields make the file
//     invalid, since kubernetes/kubernetes#124912; "resource X is masked by earlier rule Y").

namespace kmsplugin::doctor {
namespace {

std::string Join(const std::string& path, std::string_view key) {
  return path.empty() ? std::string(key) : absl::StrCat(path, ".", Sv(key));
}

std::string Index(const std::string& path, size_t i) { return absl::StrCat(path, "[", i, "]"); }

std::string ShapeName(const YAML::Node& node) {
  switch (node.Type()) {
    case YAML::NodeType::Null:
      return "empty";
    case YAML::NodeType::Scalar:
      return "a single value";
    case YAML::NodeType::Sequence:
      return "a list";
    case YAML::NodeType::Map:
      return "a mapping";
    default:
      return "undefined";
  }
}

class Reader {
 public:
  explicit Reader(std::vector<std::string>& problems) : problems_(problems) {}

  void Problem(const std::string& path, std::string_view text) {
    problems_.push_back(absl::StrCat(path.empty() ? "(top level)" : path, ": ", Sv(text)));
  }

  // Records keys of `node` that are not in `allowed` or appear twice. False (and a problem) if not a mapping.
  bool Keys(const YAML::Node& node, const std::string& path, std::initializer_list<std::string_view> allowed) {
    if (!node.IsMap()) {
      Problem(path, absl::StrCat("must be a mapping, not ", ShapeName(node)));
      return false;
    }
    std::set<std::string> seen;
    for (const auto& entry : node) {
      const std::string key = entry.first.IsScalar() ? entry.first.Scalar() : std::string("(complex key)");
      if (!seen.insert(key).second) {
        Problem(Join(path, key), "appears more than once (kube-apiserver's strict decoding refuses the file)");
        continue;
      }
      if (std::find(allowed.begin(), allowed.end(), key) == allowed.end()) {
        std::vector<std::string> names(allowed.begin(), allowed.end());
        Problem(Join(path, key),
                absl::StrCat("unknown field (known here: ",
                             names.empty() ? std::string("none") : absl::StrJoin(names, ", "),
                             "); kube-apiserver's strict decoding refuses the file"));
      }
    }
    return true;
  }

  // node[key] as text; nullopt when absent or null; a problem when it is not a single value.
  std::optional<std::string> Scalar(const YAML::Node& node, std::string_view key, const std::string& path) {
    const YAML::Node value = node[std::string(key)];
    if (!value.IsDefined() || value.IsNull()) {
      return std::nullopt;
    }
    if (!value.IsScalar()) {
      Problem(Join(path, key), absl::StrCat("must be a single value, not ", ShapeName(value)));
      return std::nullopt;
    }
    return value.Scalar();
  }

 private:
  std::vector<std::string>& problems_;
};


ProviderType TypeOf(std::string_view key) {
  if (key == "identity") return ProviderType::kIdentity;
  if (key == "aescbc") return ProviderType::kAesCbc;
  if (key == "aesgcm") return ProviderType::kAesGcm;
  if (key == "secretbox") return ProviderType::kSecretbox;
  if (key == "kms") return ProviderType::kKms;
  return ProviderType::kNone;
}

void ReadKeys(Reader& reader, const YAML::Node& value, const std::string& path, ProviderType type,
              Provider& provider) {
  if (!reader.Keys(value, path, {"keys"})) {
    return;
  }
  const YAML::Node keys = value["keys"];
  const std::string keys_path = Join(path, "keys");
  if (!keys.IsDefined() || keys.IsNull() || (keys.IsSequence() && keys.size() == 0)) {
    reader.Problem(keys_path, "at least one key is required");
    return;
  }
  if (!keys.IsSequence()) {
    reader.Problem(keys_path, absl::StrCat("must be a list, not ", ShapeName(keys)));
    return;
  }
  for (size_t i = 0; i < keys.size(); ++i) {
    const std::string key_path = Index(keys_path, i);
    ++provider.key_count;
    if (!reader.Keys(keys[i], key_path, {"name", "secret"})) {
      continue;
    }
    if (reader.Scalar(keys[i], "name", key_path).value_or("").empty()) {
      reader.Problem(Join(key_path, "name"), "is required");
    }
    // The secret is read only to check its length; it is never copied into a finding.
    const std::optional<std::string> secret = reader.Scalar(keys[i], "secret", key_path);
    if (!secret.has_value() || secret->empty()) {
      reader.Problem(Join(key_path, "secret"), "is required");
      continue;
    }
    std::string decoded;
    if (!absl::Base64Unescape(*secret, &decoded)) {
      reader.Problem(Join(key_path, "secret"), "is not base64 (value not shown)");
      continue;
    }
    const size_t n = decoded.size();
    std::fill(decoded.begin(), decoded.end(), '\0');
    const bool ok = type == ProviderType::kSecretbox ? n == 32 : (n == 16 || n == 24 || n == 32);
    if (!ok) {
      reader.Problem(Join(key_path, "secret"),
                     absl::StrCat("decodes to ", n, " bytes; ",
                                  type == ProviderType::kSecretbox ? "secretbox needs 32"
                                                                   : "AES needs 16, 24 or 32"));
    }
  }
}

void ReadKms(Reader& reader, const YAML::Node& value, const std::string& path, Provider& provider) {
  if (!reader.Keys(value, path, {"apiVersion", "name", "endpoint", "cachesize", "timeout"})) {
    return;
  }
  KmsSettings& kms = provider.kms;
  kms.api_version = reader.Scalar(value, "apiVersion", path).value_or("");
  kms.name = reader.Scalar(value, "name", path).value_or("");
  kms.endpoint = reader.Scalar(value, "endpoint", path).value_or("");
  kms.timeout = reader.Scalar(value, "timeout", path);
  kms.cachesize = reader.Scalar(value, "cachesize", path);
  if (!kms.api_version.empty() && kms.api_version != "v1" && kms.api_version != "v2") {
    reader.Problem(Join(path, "apiVersion"),
                   absl::StrCat("\"", kms.api_version, "\" is not supported; only v1 and v2 (write v2)"));
  }
  if (kms.cachesize.has_value()) {
    int64_t size = 0;
    if (kms.IsV2()) {
      reader.Problem(Join(path, "cachesize"), "is not supported in v2 (remove it)");
    } else if (!absl::SimpleAtoi(*kms.cachesize, &size)) {
      reader.Problem(Join(path, "cachesize"), absl::StrCat("\"", *kms.cachesize, "\" is not a whole number"));
    } else if (size == 0) {
      reader.Problem(Join(path, "cachesize"), "must be positive, or negative to disable the cache; 0 is invalid");
    }
  }
}

void ReadProvider(Reader& reader, const YAML::Node& node, const std::string& path, Provider& provider) {
  provider.path = path;
  if (!reader.Keys(node, path, {"identity", "aescbc", "aesgcm", "secretbox", "kms"})) {
    return;
  }
  std::vector<std::string> found;
  for (const auto& entry : node) {
    const std::string key = entry.first.IsScalar() ? entry.first.Scalar() : std::string();
    if (TypeOf(key) != ProviderType::kNone && std::find(found.begin(), found.end(), key) == found.end()) {
      found.push_back(key);
    }
  }
  if (found.empty()) {
    reader.Problem(path, "names no provider; write one of identity: {}, aescbc, aesgcm, secretbox or kms");
    return;
  }
  if (found.size() > 1) {
    reader.Problem(path, absl::StrCat("names more than one provider (", absl::StrJoin(found, ", "),
                                      "); give each its own list element"));
  }
  provider.type = TypeOf(found.front());
  const std::string value_path = Join(path, found.front());
  const YAML::Node value = node[found.front()];
  if (value.IsNull()) {
    // Go decodes `identity:` (null) into a nil pointer: kube-apiserver then sees no provider at all.
    reader.Problem(value_path, found.front() == "identity" ? "is empty; write identity: {}"
                                                           : "is empty; kube-apiserver sees no provider here");
    return;
  }
  switch (provider.type) {
    case ProviderType::kIdentity:
      reader.Keys(value, value_path, {});
      break;
    case ProviderType::kAesCbc:
    case ProviderType::kAesGcm:
    case ProviderType::kSecretbox:
      ReadKeys(reader, value, value_path, provider.type, provider);
      break;
    case ProviderType::kKms:
      ReadKms(reader, value, value_path, provider);
      break;
    case ProviderType::kNone:
      break;
  }
}

bool HasCapital(std::string_view text) {
  return std::any_of(text.begin(), text.end(), [](char c) { return c >= 'A' && c <= 'Z'; });
}

std::string GroupResourceText(const GroupResource& gr) {
  if (gr.group.empty()) {
    return gr.resource == "*" ? "*." : gr.resource;
  }
  return absl::StrCat(gr.resource, ".", gr.group);
}

// validation_encryption.go validateResourceNames and validateResourceOverlap, for one entry.
void CheckEntryResources(Reader& reader, const ResourceEntry& entry) {
  const std::string path = Join(entry.path, "resources");
  std::vector<GroupResource> parsed;
  for (size_t i = 0; i < entry.resources.size(); ++i) {
    const std::string& text = entry.resources[i];
    const GroupResource gr = ParseGroupResource(text);
    parsed.push_back(gr);
    if (HasCapital(text)) {
      reader.Problem(Index(path, i), absl::StrCat("\"", text, "\" has capital letters; resource names are lowercase"));
    } else if (text == "*") {
      reader.Problem(Index(path, i), "\"*\" is not allowed; use \"*.\" for the core group or \"*.*\" for everything");
    } else if (gr.group == "events.k8s.io") {
      reader.Problem(Index(path, i), "events.k8s.io objects are stored under \"events\"; write events instead");
    } else if (gr.group == "extensions") {
      reader.Problem(Index(path, i), "the extensions group has been removed and cannot be encrypted");
    } else if (gr.group == "*" && gr.resource != "*") {
      reader.Problem(Index(path, i), absl::StrCat("\"", text, "\" names one resource across all groups; not supported"));
    }
  }
  bool duplicate = false;
  bool overlap = false;
  for (size_t i = 0; i < parsed.size(); ++i) {
    for (size_t j = 0; j < parsed.size(); ++j) {
      if (i == j) {
        continue;
      }
      const GroupResource& a = parsed[i];
      const GroupResource& b = parsed[j];
      if (a == b) {
        duplicate = true;
      } else if ((a.group == "*" && a.resource == "*") ||
                 (a.group == b.group && (a.resource == "*" || b.resource == "*"))) {
        overlap = true;
      }
    }
  }
  if (duplicate) {
    reader.Problem(path, "names the same resource more than once");
  }
  if (overlap) {
    reader.Problem(path, "mixes a wildcard with resources it already covers (e.g. secrets and \"*.\"); one of "
                         "them would never apply");
  }
}

}  // namespace

std::string_view ProviderTypeName(ProviderType type) {
  switch (type) {
    case ProviderType::kIdentity:
      return "identity";
    case ProviderType::kAesCbc:
      return "aescbc";
    case ProviderType::kAesGcm:
      return "aesgcm";
    case ProviderType::kSecretbox:
      return "secretbox";
    case ProviderType::kKms:
      return "kms";
    case ProviderType::kNone:
      break;
  }
  return "(none)";
}

GroupResource ParseGroupResource(std::string_view text) {
  const size_t dot = text.find('.');
  if (dot == std::string_view::npos) {
    return GroupResource{"", std::string(text)};
  }
  return GroupResource{std::string(text.substr(dot + 1)), std::string(text.substr(0, dot))};
}

std::vector<const Provider*> EncryptionConfigFile::KmsProviders() const {
  std::vector<const Provider*> out;
  for (const ResourceEntry& entry : entries) {
    for (const Provider& provider : entry.providers) {
      if (provider.type == ProviderType::kKms) {
        out.push_back(&provider);
      }
    }
  }
  return out;
}

bool EncryptionConfigFile::HoldsStaticKeys() const {
  for (const ResourceEntry& entry : entries) {
    for (const Provider& provider : entry.providers) {
      if (provider.type == ProviderType::kAesCbc || provider.type == ProviderType::kAesGcm ||
          provider.type == ProviderType::kSecretbox) {
        return true;
      }
    }
  }
  return false;
}

absl::StatusOr<EncryptionConfigFile> ParseEncryptionConfig(const std::string& yaml, const std::string& file) {
  if (absl::StripAsciiWhitespace(yaml).empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(file, ": is empty; fix: write an EncryptionConfiguration (kmsplugin render prints one)"));
  }
  if (auto nesting = config::CheckYamlNesting(yaml, file); !nesting.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        nesting.message(), "; fix: write an EncryptionConfiguration (kmsplugin render prints one)"));
  }
  std::vector<YAML::Node> documents;
  try {
    for (YAML::Node& document : YAML::LoadAll(yaml)) {
      if (!document.IsNull()) {
        documents.push_back(document);
      }
    }
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(file, ": is not valid YAML (line ", e.mark.line + 1, ", column ",
                                                   e.mark.column + 1, ": ", e.msg,
                                                   "); fix: correct the YAML syntax"));
  }
  if (documents.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(file, ": holds no YAML document; fix: write an EncryptionConfiguration"));
  }
  const YAML::Node& root = documents.front();
  if (!root.IsMap()) {
    return absl::InvalidArgumentError(absl::StrCat(file, ": top level is ", ShapeName(root),
                                                   ", not a mapping; fix: write an EncryptionConfiguration "
                                                   "(apiVersion, kind, resources)"));
  }
  EncryptionConfigFile config;
  config.file = file;
  Reader reader(config.problems);
  if (documents.size() > 1) {
    // kube-apiserver expects a single object; what it does with further documents is not verified here.
    reader.Problem("", absl::StrCat("the file holds ", documents.size(),
                                    " YAML documents; keep exactly one EncryptionConfiguration per file"));
  }
  reader.Keys(root, "", {"apiVersion", "kind", "resources"});
  config.api_version = reader.Scalar(root, "apiVersion", "").value_or("");
  config.kind = reader.Scalar(root, "kind", "").value_or("");
  const YAML::Node resources = root["resources"];
  if (!resources.IsDefined() || resources.IsNull() || (resources.IsSequence() && resources.size() == 0)) {
    reader.Problem("resources", "at least one entry is required");
    return config;
  }
  if (!resources.IsSequence()) {
    reader.Problem("resources", absl::StrCat("must be a list, not ", ShapeName(resources)));
    return config;
  }
  for (size_t i = 0; i < resources.size(); ++i) {
    ResourceEntry entry;
    entry.path = Index("resources", i);
    const YAML::Node node = resources[i];
    if (!reader.Keys(node, entry.path, {"resources", "providers"})) {
      config.entries.push_back(std::move(entry));
      continue;
    }
    const YAML::Node names = node["resources"];
    const std::string names_path = Join(entry.path, "resources");
    if (!names.IsDefined() || names.IsNull() || (names.IsSequence() && names.size() == 0)) {
      reader.Problem(names_path, "at least one resource is required");
    } else if (!names.IsSequence()) {
      reader.Problem(names_path, absl::StrCat("must be a list, not ", ShapeName(names)));
    } else {
      for (size_t j = 0; j < names.size(); ++j) {
        if (!names[j].IsScalar() || names[j].Scalar().empty()) {
          reader.Problem(Index(names_path, j), "must be a resource name such as secrets");
          continue;
        }
        entry.resources.push_back(names[j].Scalar());
      }
    }
    const YAML::Node providers = node["providers"];
    const std::string providers_path = Join(entry.path, "providers");
    if (!providers.IsDefined() || providers.IsNull() || (providers.IsSequence() && providers.size() == 0)) {
      reader.Problem(providers_path, "at least one provider is required");
    } else if (!providers.IsSequence()) {
      reader.Problem(providers_path, absl::StrCat("must be a list, not ", ShapeName(providers)));
    } else {
      for (size_t j = 0; j < providers.size(); ++j) {
        Provider provider;
        ReadProvider(reader, providers[j], Index(providers_path, j), provider);
        entry.providers.push_back(std::move(provider));
      }
    }
    CheckEntryResources(reader, entry);
    config.entries.push_back(std::move(entry));
  }
  // config.go: a resource listed after a "*.<group>" or "*.*" rule that already covers it is refused at start.
  std::vector<GroupResource> earlier;
  for (const ResourceEntry& entry : config.entries) {
    std::vector<GroupResource> here;
    for (size_t j = 0; j < entry.resources.size(); ++j) {
      const GroupResource gr = ParseGroupResource(entry.resources[j]);
      const GroupResource group_wildcard{gr.group, "*"};
      const GroupResource all{"*", "*"};
      for (const GroupResource& mask : {group_wildcard, all}) {
        if (std::find(earlier.begin(), earlier.end(), mask) != earlier.end()) {
          reader.Problem(Index(Join(entry.path, "resources"), j),
                         absl::StrCat("\"", entry.resources[j], "\" is masked by the earlier rule \"",
                                      GroupResourceText(mask), "\" (kube-apiserver refuses this; list specific "
                                      "resources before wildcards)"));
          break;
        }
      }
      here.push_back(gr);
    }
    earlier.insert(earlier.end(), here.begin(), here.end());
  }
  return config;
}

}  // namespace kmsplugin::doctor
