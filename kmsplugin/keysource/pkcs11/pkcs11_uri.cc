#include <memory>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "kmsplugin/keysource/pkcs11/pkcs11_uri.h"
// Last: p11-kit's uri.h includes its pkcs11.h (see cryptoki.h on the order).
#include "kmsplugin/keysource/pkcs11/cryptoki.h"
// clang-format off
#include <p11-kit/p11-kit.h>
#include <p11-kit/uri.h>
// clang-format on

namespace kmsplugin::keysource::pkcs11 {
namespace {

struct UriDeleter {
  void operator()(P11KitUri* uri) const { p11_kit_uri_free(uri); }
};

// A space-padded CK_TOKEN_INFO field: unset when all zero (p11-kit leaves fields the URI does not name zeroed),
// else its text without the padding (p11_kit_space_strlen).
std::optional<std::string> PaddedField(const unsigned char* field, size_t size) {
  bool any = false;
  for (size_t i = 0; i < size; ++i) {
    any = any || field[i] != 0;
  }
  if (!any) {
    return std::nullopt;
  }
  return std::string(reinterpret_cast<const char*>(field), p11_kit_space_strlen(field, size));
}

bool AnySet(const unsigned char* field, size_t size) { return PaddedField(field, size).has_value(); }

}  // namespace

absl::StatusOr<Pkcs11UriFields> ParsePkcs11Uri(const std::string& text, const config::FieldContext& context) {
  const std::string fix_example = "write e.g. \"pkcs11:token=kms;object=kmsplugin-prod?module-path=/usr/lib/softhsm/"
                                  "libsofthsm2.so&pin-source=file:/etc/kmsplugin/kms.pin\"";
  std::unique_ptr<P11KitUri, UriDeleter> uri(p11_kit_uri_new());
  if (uri == nullptr) {
    return absl::ResourceExhaustedError("out of memory parsing a PKCS#11 URI");
  }
  if (const int parsed = p11_kit_uri_parse(text.c_str(), P11_KIT_URI_FOR_ANY, uri.get()); parsed != P11_KIT_URI_OK) {
    return context.Error(absl::StrCat("is not a PKCS#11 URI (RFC 7512): ", p11_kit_uri_message(parsed)),
                         fix_example);
  }
  if (p11_kit_uri_any_unrecognized(uri.get())) {
    return context.Error("has attributes p11-kit does not recognise",
                         absl::StrCat("keep token or serial, object, module-path and pin-source; ", fix_example));
  }
  if (p11_kit_uri_get_pin_value(uri.get()) != nullptr) {
    return context.Error("holds the PIN itself (pin-value), which would put it in the config",
                         "move the PIN to a file of mode 0600 and write pin-source=file:/etc/kmsplugin/kms.pin");
  }
  if (p11_kit_uri_get_module_name(uri.get()) != nullptr) {
    return context.Error("names a module by p11-kit registry name (module-name)",
                         "name the module file with module-path=/absolute/path.so (its owner and mode are checked)");
  }
  if (p11_kit_uri_get_slot_id(uri.get()) != static_cast<CK_SLOT_ID>(-1) ||
      p11_kit_uri_get_slot_info(uri.get())->slotDescription[0] != 0 ||
      p11_kit_uri_get_slot_info(uri.get())->manufacturerID[0] != 0) {
    return context.Error("selects a slot (slot-id, slot-description or slot-manufacturer)",
                         "select the token by token=LABEL or serial=SERIAL: slot numbers are not stable");
  }
  const CK_INFO* module_info = p11_kit_uri_get_module_info(uri.get());
  if (AnySet(module_info->manufacturerID, sizeof(module_info->manufacturerID)) ||
      AnySet(module_info->libraryDescription, sizeof(module_info->libraryDescription)) ||
      module_info->libraryVersion.major != static_cast<CK_BYTE>(-1)) {
    return context.Error("selects a library (library-manufacturer, library-description or library-version)",
                         "name the module file with module-path=/absolute/path.so");
  }
  Pkcs11UriFields fields;
  CK_TOKEN_INFO* token = p11_kit_uri_get_token_info(uri.get());
  if (AnySet(token->manufacturerID, sizeof(token->manufacturerID)) || AnySet(token->model, sizeof(token->model))) {
    return context.Error("selects the token by manufacturer or model",
                         "select it by token=LABEL or serial=SERIAL, which name one token");
  }
  fields.token_label = PaddedField(token->label, sizeof(token->label));
  fields.token_serial = PaddedField(token->serialNumber, sizeof(token->serialNumber));
  if (CK_ATTRIBUTE* id = p11_kit_uri_get_attribute(uri.get(), CKA_ID); id != nullptr) {
    return context.Error("names one object by id, but kmsplugin keeps one object per key version",
                         "name the versions' label prefix with object=PREFIX (they are PREFIX-v1, PREFIX-v2, ...)");
  }
  if (CK_ATTRIBUTE* type = p11_kit_uri_get_attribute(uri.get(), CKA_CLASS); type != nullptr) {
    const bool secret_key = type->ulValueLen == sizeof(CK_OBJECT_CLASS) &&
                            *static_cast<const CK_OBJECT_CLASS*>(type->pValue) == CKO_SECRET_KEY;
    if (!secret_key) {
      return context.Error("names an object type other than secret-key",
                           "drop type= or write type=secret-key (the key versions are AES secret keys)");
    }
  }
  if (CK_ATTRIBUTE* label = p11_kit_uri_get_attribute(uri.get(), CKA_LABEL); label != nullptr) {
    fields.object_label = std::string(static_cast<const char*>(label->pValue), label->ulValueLen);
  }
  if (const char* path = p11_kit_uri_get_module_path(uri.get()); path != nullptr) {
    fields.module_path = path;
  }
  if (const char* source = p11_kit_uri_get_pin_source(uri.get()); source != nullptr) {
    absl::string_view file(source);
    absl::ConsumePrefix(&file, "file:");
    if (file.empty() || file[0] != '/') {
      return context.Error(absl::StrCat("pin-source \"", std::string(source).substr(0, 128),
                                        "\" is not file:/absolute/path"),
                           "write pin-source=file:/etc/kmsplugin/kms.pin (a file of mode 0600 holding the PIN)");
    }
    fields.pin_file = std::string(file);
  }
  return fields;
}

}  // namespace kmsplugin::keysource::pkcs11
