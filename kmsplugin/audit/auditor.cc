#include "kmsplugin/audit/auditor.h"

#include <algorithm>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "kmsplugin/audit/scanner.h"
#include "kmsplugin/core/sv.h"

namespace kmsplugin::audit {
namespace {

constexpr char kUnknownKeyId[] = "unknown";

KeyStatus StatusOf(core::KeyState state) {
  switch (state) {
    case core::KeyState::kCurrent:
      return KeyStatus::kCurrent;
    case core::KeyState::kActive:
    case core::KeyState::kStaged:  // decrypts; objects under it were written by a node where it is promoted
      return KeyStatus::kActive;
    case core::KeyState::kRetired:
      return KeyStatus::kRetired;
  }
  return KeyStatus::kUnknown;
}

void AddName(std::vector<std::string>& names, std::string_view name, size_t max_names) {
  if (names.size() < max_names) {
    names.emplace_back(name);
  }
}

class PrefixAuditor {
 public:
  PrefixAuditor(PrefixReport& report, const KeyCatalog* catalog, size_t max_names, size_t max_names_per_key,
                ObjectDecryptor* decryptor)
      : report_(report),
        catalog_(catalog),
        max_names_(max_names),
        max_names_per_key_(max_names_per_key),
        decryptor_(decryptor) {}

  void Visit(std::string_view key, std::string_view value) {
    std::string_view name = key.substr(std::min(key.size(), report_.prefix.size()));
    ++report_.objects;
    const Classification c = ClassifyValue(value);
    GroupKey group_key{c.kind, c.provider, ""};
    GroupCount probe;
    const KnownKey* known = nullptr;
    switch (c.kind) {
      case StorageKind::kIdentity:
        ++report_.unencrypted;
        AddName(report_.unencrypted_names, name, max_names_);
        break;
      case StorageKind::kMalformed:
        ++report_.malformed;
        if (report_.malformed_objects.size() < max_names_) {
          report_.malformed_objects.push_back(MalformedObject{std::string(name), c.problem});
        }
        break;
      case StorageKind::kAesCbc:
      case StorageKind::kAesGcm:
      case StorageKind::kSecretbox:
        break;
      case StorageKind::kKmsV2:
        group_key.key_id = c.key_id;
        if (catalog_ != nullptr) {
          known = catalog_->FindKeyId(c.key_id);
        }
        break;
      case StorageKind::kKmsV1:
        group_key.key_id = kUnknownKeyId;
        if (catalog_ != nullptr && c.envelope.has_value()) {
          known = catalog_->FindKeyRef(c.envelope->environment, c.envelope->key_ref);
          if (known != nullptr) {
            group_key.key_id = known->key_id;
          }
        }
        break;
    }
    auto [it, inserted] = report_.groups.try_emplace(group_key);
    GroupCount& group = it->second;
    if (inserted) {
      if (c.kind == StorageKind::kKmsV2 || c.kind == StorageKind::kKmsV1) {
        if (known != nullptr) {
          group.environment = known->environment;
          group.version = known->version;
          group.status = StatusOf(known->state);
        } else {
          group.environment = c.envelope.has_value() ? c.envelope->environment : "";
          group.status = catalog_ == nullptr ? KeyStatus::kNotChecked : KeyStatus::kUnknown;
        }
      } else {
        group.status = KeyStatus::kNotKms;
      }
    }
    ++group.objects;
    AddName(group.names, name, max_names_per_key_);
    if (c.kind == StorageKind::kKmsV2) {
      ++group.by_dek_source_type[c.dek_source_type];
    }
    if (group.status == KeyStatus::kUnknown) {
      ++report_.unknown_key;
      AddName(report_.unknown_key_names, name, max_names_);
    } else if (group.status == KeyStatus::kRetired) {
      ++report_.retired_key;
      AddName(report_.retired_key_names, name, max_names_);
    }
    if (decryptor_ != nullptr && c.kind != StorageKind::kIdentity && c.kind != StorageKind::kMalformed) {
      Decrypt(key, value, name, group);
    }
  }

 private:
  void Decrypt(std::string_view key, std::string_view value, std::string_view name, GroupCount& group) {
    DecryptResult result = decryptor_->Check(key, value);
    switch (result.verdict) {
      case DecryptVerdict::kDecrypts:
        ++report_.decrypted;
        ++group.decrypted;
        break;
      case DecryptVerdict::kNotCheckable:
      case DecryptVerdict::kNotEncrypted:
        ++report_.not_checkable;
        break;
      case DecryptVerdict::kFails:
        ++report_.undecryptable;
        if (group.status != KeyStatus::kUnknown && group.status != KeyStatus::kRetired) {
          ++report_.undecryptable_not_counted;
        }
        if (report_.undecryptable_objects.size() < max_names_) {
          report_.undecryptable_objects.push_back(UndecryptableObject{std::string(name), std::move(result.reason)});
        }
        break;
    }
  }

  PrefixReport& report_;
  const KeyCatalog* catalog_;
  size_t max_names_;
  size_t max_names_per_key_;
  ObjectDecryptor* decryptor_;
};

std::string Pad(std::string text, size_t width) {
  if (text.size() < width) {
    text.resize(width, ' ');
  }
  return text;
}

std::string NamesLine(const std::vector<std::string>& names, uint64_t total) {
  std::string line;
  for (const std::string& name : names) {
    absl::StrAppend(&line, line.empty() ? "" : ", ", name);
  }
  if (total > names.size()) {
    absl::StrAppend(&line, " ... and ", total - names.size(), " more");
  }
  return line;
}

nlohmann::json NamesJson(const std::vector<std::string>& names) {
  nlohmann::json out = nlohmann::json::array();
  for (const std::string& name : names) {
    out.push_back(name);
  }
  return out;
}

}  // namespace

std::string_view KeyStatusName(KeyStatus status) {
  switch (status) {
    case KeyStatus::kCurrent:
      return "current";
    case KeyStatus::kActive:
      return "active";
    case KeyStatus::kRetired:
      return "retired";
    case KeyStatus::kUnknown:
      return "unknown";
    case KeyStatus::kNotChecked:
      return "not-checked";
    case KeyStatus::kNotKms:
      return "-";
  }
  return "?";
}

uint64_t AuditReport::problems() const {
  uint64_t total = 0;
  for (const PrefixReport& prefix : prefixes) {
    total += prefix.problems();
  }
  return total;
}

absl::StatusOr<AuditReport> RunAuditScan(EtcdClient& client, const KeyCatalog* catalog,
                                         const AuditOptions& options) {
  if (options.prefixes.empty()) {
    return absl::InvalidArgumentError("no prefix to audit");
  }
  AuditReport report;
  report.keys_checked = catalog != nullptr;
  report.decrypt_checked = options.decryptor != nullptr;
  if (catalog != nullptr) {
    report.environments = catalog->environments();
  }
  for (const std::string& prefix : options.prefixes) {
    PrefixReport prefix_report;
    prefix_report.prefix = prefix;
    PrefixAuditor auditor(prefix_report, catalog, options.max_names, options.max_names_per_key, options.decryptor);
    ScanOptions scan;
    scan.prefix = prefix;
    scan.page_size = options.page_size;
    scan.revision = report.revision;
    auto scanned = ScanPrefix(client, scan,
                              [&auditor](std::string_view key, std::string_view value) { auditor.Visit(key, value); });
    if (!scanned.ok()) {
      return scanned.status();
    }
    report.revision = scanned->revision;
    report.prefixes.push_back(std::move(prefix_report));
  }
  report.endpoint = client.endpoint();
  return report;
}

int ExitCodeFor(const AuditReport& report) { return report.problems() == 0 ? 0 : 1; }

std::string RenderTable(const AuditReport& report) {
  std::ostringstream out;
  out << "etcd " << report.endpoint << " at revision " << report.revision << "; key ids "
      << (report.keys_checked ? "checked against environment(s): " : "NOT checked (no --config)");
  for (size_t i = 0; i < report.environments.size(); ++i) {
    out << (i == 0 ? "" : ", ") << report.environments[i];
  }
  out << (report.decrypt_checked ? "; every encrypted object decrypted for real" : "") << "\n";
  for (const PrefixReport& p : report.prefixes) {
    out << "\n" << p.prefix << ": " << p.objects << " object(s)\n";
    if (p.objects == 0) {
      continue;
    }
    size_t provider_width = 8;
    size_t key_width = 6;
    for (const auto& [key, group] : p.groups) {
      provider_width = std::max(provider_width, key.provider.size());
      key_width = std::max(key_width, key.key_id.size());
    }
    out << "  " << Pad("STORAGE", 10) << " " << Pad("PROVIDER", provider_width) << " " << Pad("KEY_ID", key_width)
        << " " << Pad("ENV", 12) << " " << Pad("STATE", 11) << " OBJECTS\n";
    for (const auto& [key, group] : p.groups) {
      out << "  " << Pad(std::string(StorageKindName(key.kind)), 10) << " "
          << Pad(key.provider.empty() ? "-" : key.provider, provider_width) << " "
          << Pad(key.key_id.empty() ? "-" : key.key_id, key_width) << " "
          << Pad(group.environment.empty() ? "-" : group.environment, 12) << " "
          << Pad(std::string(KeyStatusName(group.status)), 11) << " " << group.objects << "\n";
    }
    if (p.unencrypted > 0) {
      out << "  NOT ENCRYPTED (" << p.unencrypted << "): " << NamesLine(p.unencrypted_names, p.unencrypted) << "\n";
    }
    if (p.unknown_key > 0) {
      out << "  UNDER AN UNKNOWN KEY_ID (" << p.unknown_key
          << "): " << NamesLine(p.unknown_key_names, p.unknown_key) << "\n";
    }
    if (p.retired_key > 0) {
      out << "  UNDER A RETIRED KEY (" << p.retired_key << "): " << NamesLine(p.retired_key_names, p.retired_key)
          << "\n";
    }
    if (p.malformed > 0) {
      out << "  MALFORMED (" << p.malformed << "):\n";
      for (const MalformedObject& m : p.malformed_objects) {
        out << "    " << m.name << ": " << m.problem << "\n";
      }
      if (p.malformed > p.malformed_objects.size()) {
        out << "    ... and " << p.malformed - p.malformed_objects.size() << " more\n";
      }
    }
    if (report.decrypt_checked) {
      out << "  DECRYPT: " << p.decrypted << " of " << p.decrypted + p.undecryptable << " KMS object(s) decrypt";
      if (p.not_checkable > 0) {
        out << "; " << p.not_checkable << " not checkable (aescbc/aesgcm/secretbox: keys only kube-apiserver has)";
      }
      out << "\n";
      if (p.undecryptable > 0) {
        out << "  DOES NOT DECRYPT (" << p.undecryptable << "):\n";
        for (const UndecryptableObject& u : p.undecryptable_objects) {
          out << "    " << u.name << ": " << u.reason << "\n";
        }
        if (p.undecryptable > p.undecryptable_objects.size()) {
          out << "    ... and " << p.undecryptable - p.undecryptable_objects.size() << " more\n";
        }
      }
    }
  }
  const uint64_t problems = report.problems();
  out << "\n"
      << (problems == 0 ? (report.decrypt_checked
                               ? "OK: every object is encrypted under a known, unretired key, and every KMS object "
                                 "decrypts\n"
                               : "OK: every object is encrypted under a known, unretired key\n")
                        : absl::StrCat("PROBLEMS: ", problems,
                                       report.decrypt_checked
                                           ? " object(s) unencrypted, malformed, under an unknown or retired key, or "
                                             "not decrypting; "
                                           : " object(s) unencrypted, malformed, or under an unknown or retired key; ",
                                       "rewrite them (kubectl get secrets -A -o json | kubectl replace -f -) or "
                                       "add the missing environment to the config\n"));
  return out.str();
}

nlohmann::json ToJson(const AuditReport& report) {
  nlohmann::json prefixes = nlohmann::json::array();
  for (const PrefixReport& p : report.prefixes) {
    nlohmann::json groups = nlohmann::json::array();
    for (const auto& [key, group] : p.groups) {
      nlohmann::json g = {{"storage", std::string(StorageKindName(key.kind))},
                          {"provider", key.provider},
                          {"keyId", key.key_id},
                          {"environment", group.environment},
                          {"state", std::string(KeyStatusName(group.status))},
                          {"objects", group.objects}};
      if (group.version != 0) {
        g["version"] = group.version;
      }
      if (report.decrypt_checked) {
        g["decrypts"] = group.decrypted;
      }
      if (!group.by_dek_source_type.empty()) {
        nlohmann::json types = nlohmann::json::object();
        for (const auto& [type, count] : group.by_dek_source_type) {
          types[DekSourceTypeName(type)] = count;
        }
        g["dekSourceTypes"] = types;
      }
      groups.push_back(g);
    }
    nlohmann::json malformed = nlohmann::json::array();
    for (const MalformedObject& m : p.malformed_objects) {
      malformed.push_back({{"name", m.name}, {"problem", m.problem}});
    }
    nlohmann::json entry = {{"prefix", p.prefix},
                        {"objects", p.objects},
                        {"unencrypted", p.unencrypted},
                        {"unknownKeyId", p.unknown_key},
                        {"retiredKey", p.retired_key},
                        {"malformed", p.malformed},
                        {"problems", p.problems()},
                        {"groups", groups},
                        {"unencryptedNames", NamesJson(p.unencrypted_names)},
                        {"unknownKeyIdNames", NamesJson(p.unknown_key_names)},
                        {"retiredKeyNames", NamesJson(p.retired_key_names)},
                        {"malformedObjects", malformed},
                        {"namesTruncated", p.unencrypted > p.unencrypted_names.size() ||
                                               p.unknown_key > p.unknown_key_names.size() ||
                                               p.retired_key > p.retired_key_names.size() ||
                                               p.malformed > p.malformed_objects.size() ||
                                               p.undecryptable > p.undecryptable_objects.size()}};
    if (report.decrypt_checked) {
      nlohmann::json failures = nlohmann::json::array();
      for (const UndecryptableObject& u : p.undecryptable_objects) {
        failures.push_back({{"name", u.name}, {"reason", u.reason}});
      }
      entry["decrypt"] = {{"decrypts", p.decrypted},
                          {"fails", p.undecryptable},
                          {"notCheckable", p.not_checkable},
                          {"failures", failures}};
    }
    prefixes.push_back(std::move(entry));
  }
  return {{"endpoint", report.endpoint},
          {"revision", report.revision},
          {"keysChecked", report.keys_checked},
          {"decryptChecked", report.decrypt_checked},
          {"environments", report.environments},
          {"prefixes", prefixes},
          {"problems", report.problems()},
          {"ok", report.problems() == 0}};
}

absl::StatusOr<KeyUsageReport> CountKeyUsage(EtcdClient& client, const KeyCatalog& catalog,
                                             const std::string& environment, const AuditOptions& options) {
  KeyUsageReport usage;
  usage.environment = environment;
  for (const KnownKey& key : catalog.KeysOf(environment)) {
    usage.keys.push_back(KeyUsage{key, 0});
  }
  if (usage.keys.empty()) {
    return absl::NotFoundError(absl::StrCat("environment \"", environment, "\" has no known key versions"));
  }
  AuditOptions scan_options = options;
  scan_options.max_names_per_key = options.max_names;
  scan_options.max_names = 0;
  auto report = RunAuditScan(client, &catalog, scan_options);
  if (!report.ok()) {
    return report.status();
  }
  usage.revision = report->revision;
  for (const PrefixReport& p : report->prefixes) {
    for (const auto& [key, group] : p.groups) {
      if (group.environment != environment || key.key_id.empty()) {
        continue;
      }
      for (KeyUsage& u : usage.keys) {
        if (u.key.key_id == key.key_id) {
          u.objects += group.objects;
          for (const std::string& name : group.names) {
            if (u.names.size() < options.max_names) {
              u.names.push_back(p.prefix + name);
            }
          }
        }
      }
    }
  }
  return usage;
}

}  // namespace kmsplugin::audit
