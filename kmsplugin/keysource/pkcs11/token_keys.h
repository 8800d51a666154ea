#pragma once

// The key objects on the token: listing the versions, finding one by CKA_ID, generating a version, setting its
// usage (the retired marker), destroying it. Plain PKCS#11 calls on a session the caller holds (session_pool.h);
// no recovery, no state. Internal to this folder (includes cryptoki.h).
//
// Each version is an AES-256 secret key: CKA_TOKEN, CKA_PRIVATE, CKA_SENSITIVE, !CKA_EXTRACTABLE, CKA_ENCRYPT,
// CKA_DECRYPT, no wrap/unwrap/derive/sign, CKA_ALLOWED_MECHANISMS = {CKM_AES_GCM}, CKA_MODIFIABLE (so that it can
// be retired), CKA_LABEL "<key_label>-v<N>", CKA_ID = EncodeKeyRef(N, created) (key_ref.h).

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/time/time.h"
#include "kmsplugin/keysource/pkcs11/cryptoki.h"

namespace kmsplugin::keysource::pkcs11 {

// One of our key objects as the token lists it.
struct TokenKey {
  uint64_t version = 0;
  std::string label;
  std::string key_ref;  // CKA_ID
  absl::Time created;
  CK_OBJECT_HANDLE handle = CK_INVALID_HANDLE;
  bool decrypt = true;      // CKA_DECRYPT: false means retired
  bool encrypt = true;      // CKA_ENCRYPT: false with CKA_DECRYPT true means staged
  bool modifiable = false;  // CKA_MODIFIABLE: false for versions made before retirement existed
};

// Every AES secret key labelled "<key_label>-v<N>" whose CKA_ID is a key_ref of version N, in token order.
// Objects that cannot be read or do not follow the layout are skipped. The rv of the first failing call that
// means the session or device is gone, else CKR_OK.
CK_RV ListKeys(CK_FUNCTION_LIST_PTR f, CK_SESSION_HANDLE session, std::string_view key_label,
               std::vector<TokenKey>* out);

// The one AES secret key whose CKA_ID is `key_ref`. CKR_OK with *key = CK_INVALID_HANDLE when absent.
CK_RV FindKey(CK_FUNCTION_LIST_PTR f, CK_SESSION_HANDLE session, std::string_view key_ref, CK_OBJECT_HANDLE* key);

// Whether at least one private AES secret key is visible: after a logout or with the token gone, none is.
bool AnyPrivateAesKeyVisible(CK_FUNCTION_LIST_PTR f, CK_SESSION_HANDLE session);

// C_GenerateKey of a version with the template above; `encrypt` false makes a staged version (CKA_ENCRYPT false:
// the token itself refuses to encrypt under it until Promote sets it).
CK_RV GenerateKey(CK_FUNCTION_LIST_PTR f, CK_SESSION_HANDLE session, const std::string& label,
                  const std::string& key_ref, bool encrypt, CK_OBJECT_HANDLE* key);

// Sets CKA_ENCRYPT and CKA_DECRYPT of `key` to `usable` in one C_SetAttributeValue.
CK_RV SetUsage(CK_FUNCTION_LIST_PTR f, CK_SESSION_HANDLE session, CK_OBJECT_HANDLE key, bool usable);

// CKM_AES_GCM in the token under `key`: `iv` of kGcmIvSize bytes, a 128-bit tag, `aad` (non-empty: SoftHSM
// 2.6.1 mishandles an empty one). Encrypt writes ciphertext || tag to `out` (*out_len: its capacity, then the
// length written); Decrypt writes the plaintext of `body` (ciphertext || tag) likewise.
CK_RV GcmEncrypt(CK_FUNCTION_LIST_PTR f, CK_SESSION_HANDLE session, CK_OBJECT_HANDLE key, const char* iv,
                 std::string_view aad, std::string_view plaintext, char* out, CK_ULONG* out_len);
CK_RV GcmDecrypt(CK_FUNCTION_LIST_PTR f, CK_SESSION_HANDLE session, CK_OBJECT_HANDLE key, const char* iv,
                 std::string_view aad, std::string_view body, uint8_t* out, CK_ULONG* out_len);

}  // namespace kmsplugin::keysource::pkcs11
