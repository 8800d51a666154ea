#pragma once

// DirectToken: direct access to the SoftHSM instance the key source uses (same process, same initialised module),
// to look at key objects, change them behind the key source's back, and forge inputs the key source itself would
// never produce. Shared by the PKCS#11 key source tests.

#include <dlfcn.h>
#include <p11-kit/pkcs11.h>

#include <catch2/catch.hpp>
#include <string>
#include <vector>

#include "tests/support/softhsm_harness.h"

namespace kmsplugin::testing {

class DirectToken {
 public:
  explicit DirectToken(const std::string& label = "kms") {
    void* handle = dlopen(kSoftHsmModule, RTLD_NOW | RTLD_LOCAL);
    REQUIRE(handle != nullptr);
    auto get = reinterpret_cast<CK_C_GetFunctionList>(dlsym(handle, "C_GetFunctionList"));
    REQUIRE(get(&f_) == CKR_OK);
    CK_ULONG count = 0;
    REQUIRE(f_->C_GetSlotList(CK_TRUE, nullptr, &count) == CKR_OK);
    std::vector<CK_SLOT_ID> slots(count);
    REQUIRE(f_->C_GetSlotList(CK_TRUE, slots.data(), &count) == CKR_OK);
    for (CK_SLOT_ID slot : slots) {
      CK_TOKEN_INFO info{};
      f_->C_GetTokenInfo(slot, &info);
      std::string token_label(reinterpret_cast<char*>(info.label), sizeof(info.label));
      token_label.erase(token_label.find_last_not_of(' ') + 1);
      if (token_label == label) {
        REQUIRE(f_->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr, &session_) == CKR_OK);
        const CK_RV rv = f_->C_Login(session_, CKU_USER, (CK_UTF8CHAR_PTR) "1234", 4);
        REQUIRE((rv == CKR_OK || rv == CKR_USER_ALREADY_LOGGED_IN));
        return;
      }
    }
    FAIL("token not found");
  }
  ~DirectToken() { f_->C_CloseSession(session_); }

  CK_OBJECT_HANDLE Find(const std::string& id) {
    CK_ATTRIBUTE query[] = {{CKA_ID, const_cast<char*>(id.data()), id.size()}};
    REQUIRE(f_->C_FindObjectsInit(session_, query, 1) == CKR_OK);
    CK_OBJECT_HANDLE found = CK_INVALID_HANDLE;
    CK_ULONG count = 0;
    f_->C_FindObjects(session_, &found, 1, &count);
    f_->C_FindObjectsFinal(session_);
    REQUIRE(count == 1);
    return found;
  }

  CK_BBOOL Bool(CK_OBJECT_HANDLE key, CK_ATTRIBUTE_TYPE type) {
    CK_BBOOL value = 2;
    CK_ATTRIBUTE attribute{type, &value, sizeof(value)};
    REQUIRE(f_->C_GetAttributeValue(session_, key, &attribute, 1) == CKR_OK);
    return value;
  }

  // AES-GCM under `key` with any IV length and tag length: what a careless client could produce.
  std::string Seal(CK_OBJECT_HANDLE key, const std::string& iv, CK_ULONG tag_bits, const std::string& plaintext,
                   const std::string& aad) {
    CK_GCM_PARAMS params{};
    params.pIv = (CK_BYTE_PTR)iv.data();
    params.ulIvLen = iv.size();
    params.ulIvBits = iv.size() * 8;
    params.pAAD = (CK_BYTE_PTR)aad.data();
    params.ulAADLen = aad.size();
    params.ulTagBits = tag_bits;
    CK_MECHANISM mechanism{CKM_AES_GCM, &params, sizeof(params)};
    REQUIRE(f_->C_EncryptInit(session_, &mechanism, key) == CKR_OK);
    std::string out(plaintext.size() + 16, '\0');
    CK_ULONG out_len = out.size();
    REQUIRE(f_->C_Encrypt(session_, (CK_BYTE_PTR)plaintext.data(), plaintext.size(), (CK_BYTE_PTR)out.data(),
                          &out_len) == CKR_OK);
    out.resize(out_len);
    return iv + out;
  }

  CK_FUNCTION_LIST_PTR f() { return f_; }
  CK_SESSION_HANDLE session() { return session_; }

  // How many objects carry CKA_ID `id` (0 once destroyed), by a raw C_FindObjects.
  CK_ULONG Count(const std::string& id) {
    CK_ATTRIBUTE query[] = {{CKA_ID, const_cast<char*>(id.data()), id.size()}};
    REQUIRE(f_->C_FindObjectsInit(session_, query, 1) == CKR_OK);
    CK_OBJECT_HANDLE found[4];
    CK_ULONG count = 0;
    REQUIRE(f_->C_FindObjects(session_, found, 4, &count) == CKR_OK);
    f_->C_FindObjectsFinal(session_);
    return count;
  }

  CK_RV SetBool(CK_OBJECT_HANDLE key, CK_ATTRIBUTE_TYPE type, CK_BBOOL value) {
    CK_ATTRIBUTE attribute{type, &value, sizeof(value)};
    return f_->C_SetAttributeValue(session_, key, &attribute, 1);
  }

 private:
  CK_FUNCTION_LIST_PTR f_ = nullptr;
  CK_SESSION_HANDLE session_ = CK_INVALID_HANDLE;
};

}  // namespace kmsplugin::testing
