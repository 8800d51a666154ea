#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "kmsplugin/keysource/pkcs11/key_ref.h"
#include "kmsplugin/keysource/pkcs11/pkcs11_key_source.h"
// Last: these include cryptoki.h.
#include "kmsplugin/keysource/pkcs11/errors.h"
#include "kmsplugin/keysource/pkcs11/token_keys.h"

namespace kmsplugin::keysource::pkcs11 {

CK_RV ListKeys(CK_FUNCTION_LIST_PTR f, CK_SESSION_HANDLE session, std::string_view key_label,
               std::vector<TokenKey>* out) {
  out->clear();
  CK_OBJECT_CLASS klass = CKO_SECRET_KEY;
  CK_KEY_TYPE key_type = CKK_AES;
  CK_ATTRIBUTE query[] = {{CKA_CLASS, &klass, sizeof(klass)}, {CKA_KEY_TYPE, &key_type, sizeof(key_type)}};
  CK_RV rv = f->C_FindObjectsInit(session, query, 2);
  if (rv != CKR_OK) {
    return rv;
  }
  std::vector<CK_OBJECT_HANDLE> handles;
  while (true) {
    CK_OBJECT_HANDLE batch[64];
    CK_ULONG found = 0;
    rv = f->C_FindObjects(session, batch, 64, &found);
    if (rv != CKR_OK || found == 0) {
      break;
    }
    handles.insert(handles.end(), batch, batch + found);
  }
  // Always finish the find: it occupies the session's only operation slot.
  const CK_RV final_rv = f->C_FindObjectsFinal(session);
  if (rv != CKR_OK) {
    return rv;
  }
  if (final_rv != CKR_OK) {
    return final_rv;
  }
  for (CK_OBJECT_HANDLE handle : handles) {
    CK_ATTRIBUTE sizes[] = {{CKA_LABEL, nullptr, 0}, {CKA_ID, nullptr, 0}};
    rv = f->C_GetAttributeValue(session, handle, sizes, 2);
    if (rv != CKR_OK) {
      if (IsSessionGone(rv) || IsDeviceGone(rv)) {
        return rv;
      }
      continue;  // an object we cannot read is not one of ours
    }
    if (sizes[0].ulValueLen > 256 || sizes[1].ulValueLen != kKeyRefSize) {
      continue;
    }
    std::string label(sizes[0].ulValueLen, '\0');
    std::string id(sizes[1].ulValueLen, '\0');
    CK_BBOOL decrypt = CK_FALSE;
    CK_BBOOL encrypt = CK_FALSE;
    CK_BBOOL modifiable = CK_FALSE;
    CK_ATTRIBUTE values[] = {{CKA_LABEL, label.data(), label.size()},
                             {CKA_ID, id.data(), id.size()},
                             {CKA_DECRYPT, &decrypt, sizeof(decrypt)},
                             {CKA_MODIFIABLE, &modifiable, sizeof(modifiable)},
                             {CKA_ENCRYPT, &encrypt, sizeof(encrypt)}};
    rv = f->C_GetAttributeValue(session, handle, values, 5);
    if (rv != CKR_OK) {
      if (IsSessionGone(rv) || IsDeviceGone(rv)) {
        return rv;
      }
      continue;
    }
    const uint64_t version = VersionFromLabel(label, key_label);
    auto decoded = DecodeKeyRef(id);
    if (version == 0 || !decoded.ok() || decoded->version != version) {
      continue;
    }
    TokenKey key;
    key.version = version;
    key.label = std::move(label);
    key.key_ref = std::move(id);
    key.created = decoded->created;
    key.handle = handle;
    key.decrypt = decrypt == CK_TRUE;
    key.encrypt = encrypt == CK_TRUE;
    key.modifiable = modifiable == CK_TRUE;
    out->push_back(std::move(key));
  }
  return CKR_OK;
}

CK_RV FindKey(CK_FUNCTION_LIST_PTR f, CK_SESSION_HANDLE session, std::string_view key_ref, CK_OBJECT_HANDLE* key) {
  CK_OBJECT_CLASS klass = CKO_SECRET_KEY;
  CK_KEY_TYPE key_type = CKK_AES;
  CK_ATTRIBUTE query[] = {
      {CKA_CLASS, &klass, sizeof(klass)},
      {CKA_KEY_TYPE, &key_type, sizeof(key_type)},
      {CKA_ID, const_cast<char*>(key_ref.data()), key_ref.size()},
  };
  CK_RV rv = f->C_FindObjectsInit(session, query, 3);
  if (rv != CKR_OK) {
    return rv;
  }
  CK_OBJECT_HANDLE found[2];
  CK_ULONG n = 0;
  rv = f->C_FindObjects(session, found, 2, &n);
  const CK_RV final_rv = f->C_FindObjectsFinal(session);
  if (rv != CKR_OK) {
    return rv;
  }
  if (final_rv != CKR_OK) {
    return final_rv;
  }
  *key = n == 1 ? found[0] : CK_INVALID_HANDLE;
  return CKR_OK;
}

bool AnyPrivateAesKeyVisible(CK_FUNCTION_LIST_PTR f, CK_SESSION_HANDLE session) {
  CK_OBJECT_CLASS klass = CKO_SECRET_KEY;
  CK_KEY_TYPE key_type = CKK_AES;
  CK_BBOOL yes = CK_TRUE;
  CK_ATTRIBUTE query[] = {
      {CKA_CLASS, &klass, sizeof(klass)},
      {CKA_KEY_TYPE, &key_type, sizeof(key_type)},
      {CKA_PRIVATE, &yes, sizeof(yes)},
  };
  if (f->C_FindObjectsInit(session, query, 3) != CKR_OK) {
    return false;
  }
  CK_OBJECT_HANDLE found = CK_INVALID_HANDLE;
  CK_ULONG n = 0;
  const CK_RV rv = f->C_FindObjects(session, &found, 1, &n);
  f->C_FindObjectsFinal(session);
  return rv == CKR_OK && n > 0;
}

CK_RV GenerateKey(CK_FUNCTION_LIST_PTR f, CK_SESSION_HANDLE session, const std::string& label,
                  const std::string& key_ref, bool encrypt, CK_OBJECT_HANDLE* key) {
  CK_OBJECT_CLASS klass = CKO_SECRET_KEY;
  CK_KEY_TYPE key_type = CKK_AES;
  CK_ULONG value_len = 32;
  CK_BBOOL yes = CK_TRUE;
  CK_BBOOL no = CK_FALSE;
  CK_BBOOL may_encrypt = encrypt ? CK_TRUE : CK_FALSE;
  CK_MECHANISM_TYPE allowed[] = {CKM_AES_GCM};
  CK_ATTRIBUTE attributes[] = {
      {CKA_CLASS, &klass, sizeof(klass)},
      {CKA_KEY_TYPE, &key_type, sizeof(key_type)},
      {CKA_VALUE_LEN, &value_len, sizeof(value_len)},
      {CKA_TOKEN, &yes, sizeof(yes)},
      {CKA_PRIVATE, &yes, sizeof(yes)},
      {CKA_SENSITIVE, &yes, sizeof(yes)},
      {CKA_EXTRACTABLE, &no, sizeof(no)},
      {CKA_ENCRYPT, &may_encrypt, sizeof(may_encrypt)},
      {CKA_DECRYPT, &yes, sizeof(yes)},
      {CKA_WRAP, &no, sizeof(no)},
      {CKA_UNWRAP, &no, sizeof(no)},
      {CKA_DERIVE, &no, sizeof(no)},
      {CKA_SIGN, &no, sizeof(no)},
      {CKA_VERIFY, &no, sizeof(no)},
      // Modifiable, so that Retire can clear CKA_ENCRYPT/CKA_DECRYPT. SoftHSM 2.6.1 still refuses to turn
      // CKA_SENSITIVE off, CKA_EXTRACTABLE on, or to change CKA_ALLOWED_MECHANISMS or CKA_MODIFIABLE
      // (CKR_ATTRIBUTE_READ_ONLY), so the key stays sensitive, non-extractable and GCM-only.
      {CKA_MODIFIABLE, &yes, sizeof(yes)},
      {CKA_LABEL, const_cast<char*>(label.data()), label.size()},
      {CKA_ID, const_cast<char*>(key_ref.data()), key_ref.size()},
      {CKA_ALLOWED_MECHANISMS, allowed, sizeof(allowed)},
  };
  CK_MECHANISM mechanism{CKM_AES_KEY_GEN, nullptr, 0};
  return f->C_GenerateKey(session, &mechanism, attributes, sizeof(attributes) / sizeof(attributes[0]), key);
}

CK_RV SetUsage(CK_FUNCTION_LIST_PTR f, CK_SESSION_HANDLE session, CK_OBJECT_HANDLE key, bool usable) {
  CK_BBOOL value = usable ? CK_TRUE : CK_FALSE;
  CK_ATTRIBUTE usage[] = {{CKA_ENCRYPT, &value, sizeof(value)}, {CKA_DECRYPT, &value, sizeof(value)}};
  // Setting the same two attributes again is idempotent, so a CKR_GENERAL_ERROR is tried twice more: SoftHSM2's
  // file object store fails an attribute write that races another thread's use of the object and says
  // CKR_GENERAL_ERROR, and the same call succeeds right after (softhsm/SoftHSMv2#573). Anything else, and a third
  // failure, is the caller's to report.
  CK_RV rv = CKR_GENERAL_ERROR;
  for (int attempt = 0; attempt < 3; ++attempt) {
    rv = f->C_SetAttributeValue(session, key, usage, 2);
    if (rv != CKR_GENERAL_ERROR) {
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5 * (attempt + 1)));
  }
  return rv;
}

namespace {

CK_GCM_PARAMS Gcm(const char* iv, std::string_view aad) {
  CK_GCM_PARAMS gcm{};
  gcm.pIv = reinterpret_cast<CK_BYTE_PTR>(const_cast<char*>(iv));
  gcm.ulIvLen = kGcmIvSize;
  gcm.ulIvBits = kGcmIvSize * 8;
  gcm.pAAD = reinterpret_cast<CK_BYTE_PTR>(const_cast<char*>(aad.data()));
  gcm.ulAADLen = aad.size();
  gcm.ulTagBits = kGcmTagSize * 8;
  return gcm;
}

}  // namespace

CK_RV GcmEncrypt(CK_FUNCTION_LIST_PTR f, CK_SESSION_HANDLE session, CK_OBJECT_HANDLE key, const char* iv,
                 std::string_view aad, std::string_view plaintext, char* out, CK_ULONG* out_len) {
  CK_GCM_PARAMS gcm = Gcm(iv, aad);
  CK_MECHANISM mechanism{CKM_AES_GCM, &gcm, sizeof(gcm)};
  const CK_RV rv = f->C_EncryptInit(session, &mechanism, key);
  if (rv != CKR_OK) {
    return rv;
  }
  return f->C_Encrypt(session, reinterpret_cast<CK_BYTE_PTR>(const_cast<char*>(plaintext.data())), plaintext.size(),
                      reinterpret_cast<CK_BYTE_PTR>(out), out_len);
}

CK_RV GcmDecrypt(CK_FUNCTION_LIST_PTR f, CK_SESSION_HANDLE session, CK_OBJECT_HANDLE key, const char* iv,
                 std::string_view aad, std::string_view body, uint8_t* out, CK_ULONG* out_len) {
  CK_GCM_PARAMS gcm = Gcm(iv, aad);
  CK_MECHANISM mechanism{CKM_AES_GCM, &gcm, sizeof(gcm)};
  const CK_RV rv = f->C_DecryptInit(session, &mechanism, key);
  if (rv != CKR_OK) {
    return rv;
  }
  return f->C_Decrypt(session, reinterpret_cast<CK_BYTE_PTR>(const_cast<char*>(body.data())), body.size(), out,
                      out_len);
}

}  // namespace kmsplugin::keysource::pkcs11
