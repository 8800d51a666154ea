#include "kmsplugin/keysource/pkcs11/pkcs11_spec.h"

#include <optional>
#include <string>

#include "absl/strings/str_cat.h"
#include "kmsplugin/keysource/pkcs11/pkcs11_key_source.h"
#include "kmsplugin/keysource/pkcs11/pkcs11_uri.h"

namespace kmsplugin::keysource::pkcs11 {
namespace {

constexpr absl::Duration kOpenTimeout = absl::Seconds(30);

bool IsLabelChar(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_' || c == '.';
}

class Pkcs11Spec : public config::KeySourceSpec {
 public:
  Pkcs11Spec(Pkcs11Options options, std::optional<int> pool_size, std::string context_path)
      : options_(std::move(options)), pool_size_(pool_size), context_path_(std::move(context_path)) {}

  std::string_view Kind() const override { return "pkcs11"; }

  absl::StatusOr<config::OpenedKeySource> Open(const config::OpenContext& context) const override {
    auto source = OpenSource(context);
    if (!source.ok()) {
      return source.status();
    }
    return config::MakeOpened(std::shared_ptr<Pkcs11KeySource>(*std::move(source)));
  }

  absl::StatusOr<std::string> Init(const config::OpenContext& context) const override {
    auto source = OpenSource(context);
    if (!source.ok()) {
      return source.status();
    }
    const absl::Time deadline = Now(context) + kOpenTimeout;
    auto versions = (*source)->Versions();
    if (!versions.ok()) {
      return versions.status();
    }
    const std::string token = TokenName();
    if (!versions->empty()) {
      return absl::AlreadyExistsError(
          absl::StrCat("the PKCS#11 ", token, " already holds key version ", versions->back().version, " (label \"",
                       KeyLabel(context), "-v", versions->back().version, "\", key_id ", versions->back().key_id,
                       "); init never overwrites key material; use `kmsplugin rotate` to add a version"));
    }
    auto created = (*source)->Rotate(deadline);
    if (!created.ok()) {
      return created.status();
    }
    return absl::StrCat("created AES-256 key \"", KeyLabel(context), "-v", created->version, "\" on the PKCS#11 ",
                        token, " (key_id ", created->key_id, ")");
  }

  std::string BackendKeyIdentity() const override {
    const std::string token = options_.token_serial.has_value() ? absl::StrCat("serial=", *options_.token_serial)
                                                                : absl::StrCat("label=", *options_.token_label);
    // Without keyLabel the prefix is "kmsplugin-<environment>", which differs per environment; the config path
    // stands in for the environment name, which the parser does not see.
    const std::string key = options_.key_label.empty() ? absl::StrCat("kmsplugin-<environment of ", context_path_, ">")
                                                       : options_.key_label;
    return absl::StrCat("pkcs11:", token, "/", key);
  }

  // The module and the PIN file. Where the module keeps its own state (SoftHSM2's token directory, a network
  // HSM client's configuration) is the module's business; the rendered artifacts say so.
  std::vector<config::HostPath> HostPaths() const override {
    return {{options_.module_path, false}, {options_.pin_file, false}};
  }

 private:
  static absl::Time Now(const config::OpenContext& context) {
    return context.clock != nullptr ? context.clock->Now() : absl::Now();
  }

  std::string KeyLabel(const config::OpenContext& context) const {
    return options_.key_label.empty() ? absl::StrCat("kmsplugin-", context.environment) : options_.key_label;
  }

  std::string TokenName() const {
    return options_.token_serial.has_value() ? absl::StrCat("token with serial \"", *options_.token_serial, "\"")
                                             : absl::StrCat("token labelled \"", *options_.token_label, "\"");
  }

  absl::StatusOr<std::unique_ptr<Pkcs11KeySource>> OpenSource(const config::OpenContext& context) const {
    Pkcs11Options options = options_;
    options.key_label = KeyLabel(context);
    options.session_pool_size = pool_size_.value_or(std::max(1, context.worker_threads + 1));
    options.clock = context.clock;
    options.random = context.random;
    options.events = context.events;
    return Pkcs11KeySource::Open(options, Now(context) + kOpenTimeout);
  }

  const Pkcs11Options options_;
  const std::optional<int> pool_size_;
  const std::string context_path_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<config::KeySourceSpec>> ParseSpec(const YAML::Node& node,
                                                                 const config::FieldContext& context) {
  if (!node.IsMap()) {
    return context.Error("must be a mapping with module, tokenLabel or tokenSerial, and pinFile",
                         "write e.g. `pkcs11: {module: /usr/lib/softhsm/libsofthsm2.so, tokenLabel: kms, "
                         "pinFile: /etc/kmsplugin/kms.pin}`");
  }
  if (auto status = context.RejectUnknownKeys(
          node, {"uri", "module", "tokenLabel", "tokenSerial", "pinFile", "keyLabel", "sessionPoolSize"});
      !status.ok()) {
    return status;
  }
  Pkcs11Options options;
  // An RFC 7512 URI may name the module, the token, the key's label prefix and the PIN file; each may also be its
  // own key, but not both.
  Pkcs11UriFields from_uri;
  auto uri = context.OptionalString(node, "uri");
  if (!uri.ok()) {
    return uri.status();
  }
  if (uri->has_value()) {
    auto parsed = ParsePkcs11Uri(**uri, context.Child("uri"));
    if (!parsed.ok()) {
      return parsed.status();
    }
    from_uri = std::move(*parsed);
    const std::pair<const char*, bool> both[] = {
        {"module", from_uri.module_path.has_value()},
        {"tokenLabel", from_uri.token_label.has_value() || from_uri.token_serial.has_value()},
        {"tokenSerial", from_uri.token_label.has_value() || from_uri.token_serial.has_value()},
        {"keyLabel", from_uri.object_label.has_value()},
        {"pinFile", from_uri.pin_file.has_value()}};
    for (const auto& [key, in_uri] : both) {
      if (in_uri && node[key]) {
        return context.Error(absl::StrCat("uri and ", key, " both say the same thing"),
                             absl::StrCat("keep one: the uri's attribute or ", key));
      }
    }
  }
  YAML::Node effective = YAML::Clone(node);
  if (from_uri.module_path.has_value()) {
    effective["module"] = *from_uri.module_path;
  }
  if (from_uri.token_label.has_value()) {
    effective["tokenLabel"] = *from_uri.token_label;
  }
  if (from_uri.token_serial.has_value()) {
    effective["tokenSerial"] = *from_uri.token_serial;
  }
  if (from_uri.object_label.has_value()) {
    effective["keyLabel"] = *from_uri.object_label;
  }
  if (from_uri.pin_file.has_value()) {
    effective["pinFile"] = *from_uri.pin_file;
  }
  const YAML::Node& fields = effective;
  auto module = context.RequiredString(fields, "module",
                                       "set it to the token's PKCS#11 library, e.g. /usr/lib/softhsm/libsofthsm2.so "
                                       "(or module-path= in uri)");
  if (!module.ok()) {
    return module.status();
  }
  if (module->empty() || (*module)[0] != '/') {
    return context.Child("module").Error(absl::StrCat("\"", *module, "\" is not an absolute path"),
                                         "write the full path, e.g. /usr/lib/softhsm/libsofthsm2.so");
  }
  options.module_path = *module;

  auto token_label = context.OptionalString(fields, "tokenLabel");
  if (!token_label.ok()) {
    return token_label.status();
  }
  auto token_serial = context.OptionalString(fields, "tokenSerial");
  if (!token_serial.ok()) {
    return token_serial.status();
  }
  if (token_label->has_value() && token_serial->has_value()) {
    return context.Error("tokenLabel and tokenSerial are both set",
                         "keep exactly one of tokenLabel and tokenSerial (the serial is unambiguous)");
  }
  if (!token_label->has_value() && !token_serial->has_value()) {
    return context.Error("neither tokenLabel nor tokenSerial is set",
                         "set tokenLabel (or tokenSerial, or token=/serial= in uri) to the token that holds the key; "
                         "slot numbers are not stable and are not accepted");
  }
  if (token_label->has_value()) {
    if ((*token_label)->empty() || (*token_label)->size() > 32) {
      return context.Child("tokenLabel")
          .Error("must be 1 to 32 characters (the PKCS#11 token label field)",
                 "write the label given to softhsm2-util --init-token --label");
    }
    options.token_label = **token_label;
  } else {
    if ((*token_serial)->empty() || (*token_serial)->size() > 16) {
      return context.Child("tokenSerial")
          .Error("must be 1 to 16 characters (the PKCS#11 serial number field)",
                 "write the serial shown by pkcs11-tool --list-token-slots");
    }
    options.token_serial = **token_serial;
  }

  auto pin_file = context.RequiredString(fields, "pinFile",
                                         "set it to a file of mode 0600 holding the user PIN, e.g. "
                                         "/etc/kmsplugin/token.pin");
  if (!pin_file.ok()) {
    return pin_file.status();
  }
  if (pin_file->empty() || (*pin_file)[0] != '/') {
    return context.Child("pinFile").Error(absl::StrCat("\"", *pin_file, "\" is not an absolute path"),
                                          "write the full path, e.g. /etc/kmsplugin/token.pin");
  }
  options.pin_file = *pin_file;

  auto key_label = context.OptionalString(fields, "keyLabel");
  if (!key_label.ok()) {
    return key_label.status();
  }
  if (key_label->has_value()) {
    const std::string& label = **key_label;
    if (label.empty() || label.size() > 64 || !std::all_of(label.begin(), label.end(), IsLabelChar)) {
      return context.Child("keyLabel")
          .Error(absl::StrCat("\"", label, "\" is not 1 to 64 characters of [A-Za-z0-9._-]"),
                 "write a label prefix such as kmsplugin-prod; versions are stored as <keyLabel>-v1, -v2, ...");
    }
    options.key_label = label;
  }

  auto pool = context.OptionalInt(fields, "sessionPoolSize", 1, 1024);
  if (!pool.ok()) {
    return pool.status();
  }
  std::optional<int> pool_size;
  if (pool->has_value()) {
    pool_size = static_cast<int>(**pool);
  }
  return std::make_unique<Pkcs11Spec>(std::move(options), pool_size, context.path());
}

}  // namespace kmsplugin::keysource::pkcs11
