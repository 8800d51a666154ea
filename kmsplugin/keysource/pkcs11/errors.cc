#include <string>

#include "absl/strings/str_format.h"
// Last: includes cryptoki.h.
#include "kmsplugin/keysource/pkcs11/errors.h"

namespace kmsplugin::keysource::pkcs11 {

std::string CkrName(CK_RV rv) {
  switch (rv) {
#define KMS_CKR(name) \
  case name:          \
    return #name;
    KMS_CKR(CKR_OK)
    KMS_CKR(CKR_HOST_MEMORY)
    KMS_CKR(CKR_SLOT_ID_INVALID)
    KMS_CKR(CKR_GENERAL_ERROR)
    KMS_CKR(CKR_FUNCTION_FAILED)
    KMS_CKR(CKR_ARGUMENTS_BAD)
    KMS_CKR(CKR_DEVICE_ERROR)
    KMS_CKR(CKR_DEVICE_MEMORY)
    KMS_CKR(CKR_DEVICE_REMOVED)
    KMS_CKR(CKR_ENCRYPTED_DATA_INVALID)
    KMS_CKR(CKR_ENCRYPTED_DATA_LEN_RANGE)
    KMS_CKR(CKR_KEY_HANDLE_INVALID)
    KMS_CKR(CKR_MECHANISM_INVALID)
    KMS_CKR(CKR_MECHANISM_PARAM_INVALID)
    KMS_CKR(CKR_OBJECT_HANDLE_INVALID)
    KMS_CKR(CKR_OPERATION_ACTIVE)
    KMS_CKR(CKR_OPERATION_NOT_INITIALIZED)
    KMS_CKR(CKR_PIN_INCORRECT)
    KMS_CKR(CKR_PIN_INVALID)
    KMS_CKR(CKR_PIN_LEN_RANGE)
    KMS_CKR(CKR_PIN_EXPIRED)
    KMS_CKR(CKR_PIN_LOCKED)
    KMS_CKR(CKR_SESSION_CLOSED)
    KMS_CKR(CKR_SESSION_HANDLE_INVALID)
    KMS_CKR(CKR_TEMPLATE_INCONSISTENT)
    KMS_CKR(CKR_TEMPLATE_INCOMPLETE)
    KMS_CKR(CKR_ATTRIBUTE_VALUE_INVALID)
    KMS_CKR(CKR_ATTRIBUTE_READ_ONLY)
    KMS_CKR(CKR_ACTION_PROHIBITED)
    KMS_CKR(CKR_KEY_FUNCTION_NOT_PERMITTED)
    KMS_CKR(CKR_SESSION_READ_ONLY)
    KMS_CKR(CKR_TOKEN_NOT_PRESENT)
    KMS_CKR(CKR_TOKEN_NOT_RECOGNIZED)
    KMS_CKR(CKR_USER_ALREADY_LOGGED_IN)
    KMS_CKR(CKR_USER_NOT_LOGGED_IN)
    KMS_CKR(CKR_BUFFER_TOO_SMALL)
    KMS_CKR(CKR_CRYPTOKI_NOT_INITIALIZED)
    KMS_CKR(CKR_CRYPTOKI_ALREADY_INITIALIZED)
#undef KMS_CKR
    case kRvKeysVanished:
      return "no key objects visible";
    default:
      return absl::StrFormat("CKR_0x%lX", static_cast<unsigned long>(rv));
  }
}

std::string Rv(CK_RV rv) { return absl::StrFormat("%s (0x%lX)", CkrName(rv), static_cast<unsigned long>(rv)); }

bool IsDeviceGone(CK_RV rv) {
  return rv == CKR_DEVICE_REMOVED || rv == CKR_TOKEN_NOT_PRESENT || rv == CKR_CRYPTOKI_NOT_INITIALIZED ||
         rv == CKR_DEVICE_ERROR || rv == CKR_DEVICE_MEMORY || rv == CKR_TOKEN_NOT_RECOGNIZED ||
         rv == CKR_SLOT_ID_INVALID;
}

bool IsSessionGone(CK_RV rv) { return rv == CKR_SESSION_HANDLE_INVALID || rv == CKR_SESSION_CLOSED; }

bool IsHandleGone(CK_RV rv) {
  return rv == CKR_OBJECT_HANDLE_INVALID || rv == CKR_KEY_HANDLE_INVALID || rv == CKR_USER_NOT_LOGGED_IN;
}

bool IsRefusedByObject(CK_RV rv) {
  return rv == CKR_KEY_FUNCTION_NOT_PERMITTED || rv == CKR_ACTION_PROHIBITED || rv == CKR_ATTRIBUTE_READ_ONLY;
}

bool IsPinRefused(CK_RV rv) {
  return rv == CKR_PIN_INCORRECT || rv == CKR_PIN_LOCKED || rv == CKR_PIN_EXPIRED || rv == CKR_PIN_INVALID ||
         rv == CKR_PIN_LEN_RANGE;
}

bool IsDecryptFailure(CK_RV rv) {
  return rv == CKR_ENCRYPTED_DATA_INVALID || rv == CKR_ENCRYPTED_DATA_LEN_RANGE || rv == CKR_GENERAL_ERROR;
}

std::string PaddedText(const unsigned char* text, size_t size) {
  std::string out(reinterpret_cast<const char*>(text), size);
  while (!out.empty() && (out.back() == ' ' || out.back() == '\0')) {
    out.pop_back();
  }
  return out;
}

}  // namespace kmsplugin::keysource::pkcs11
