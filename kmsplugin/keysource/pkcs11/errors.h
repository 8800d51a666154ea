#pragma once

// PKCS#11 return values: their names for messages, and the classification the recovery rules act on
// (reference: backends.md B4, "Recovery table"). Internal to this folder (includes cryptoki.h).

#include <cstddef>
#include <string>

#include "kmsplugin/keysource/pkcs11/cryptoki.h"

namespace kmsplugin::keysource::pkcs11 {

// "CKR_PIN_INCORRECT", or "CKR_0x1234" for a value without a name here.
std::string CkrName(CK_RV rv);
// "CKR_PIN_INCORRECT (0xA0)": how every message shows a return value.
std::string Rv(CK_RV rv);

// The module or token went away: full re-initialisation with backoff.
bool IsDeviceGone(CK_RV rv);
// The session was closed under us: replace it, retry once.
bool IsSessionGone(CK_RV rv);
// The key handle is stale (a logout drops every private handle): log in if needed, look the key up, retry once.
bool IsHandleGone(CK_RV rv);
// The object itself forbids the operation: a retired key (CKA_ENCRYPT/CKA_DECRYPT false:
// KEY_FUNCTION_NOT_PERMITTED) or a change to an object created with CKA_MODIFIABLE false (SoftHSM:
// ACTION_PROHIBITED from C_SetAttributeValue, ATTRIBUTE_READ_ONLY from C_CopyObject). Never retried.
bool IsRefusedByObject(CK_RV rv);
// The token refused the PIN: never retried (a retry loop can lock or wipe a real token).
bool IsPinRefused(CK_RV rv);
// C_Decrypt's answer to bytes that do not authenticate (SoftHSM 2.6.1 says CKR_GENERAL_ERROR).
bool IsDecryptFailure(CK_RV rv);

// Not a token's answer: a listing of the key objects found none of the versions the source serves and no
// private key at all, although the session works. Handled as a key lookup that finds nothing while every key is
// missing: a logout (re-login) or the token away (full re-initialisation).
inline constexpr CK_RV kRvKeysVanished = CKR_VENDOR_DEFINED | 0x4B4D53;

// A blank-padded fixed-size PKCS#11 text field (token label, serial), trimmed.
std::string PaddedText(const unsigned char* text, size_t size);

}  // namespace kmsplugin::keysource::pkcs11
