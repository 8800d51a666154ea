// A test-only PKCS#11 module that forwards every call to SoftHSM2 (or $KMS_INTERPOSER_TARGET) and records what
// the key source sends: C_Login, C_Initialize, C_SetAttributeValue and C_DestroyObject counts, the CK_GCM_PARAMS
// of every C_EncryptInit/C_DecryptInit, and any CKR_OPERATION_ACTIVE. It can also inject a return value into the
// next N calls of one function. Tests reach the controls with dlopen() of this same file (dlopen returns the
// handle the key source already holds).
#include <dlfcn.h>
#include <p11-kit/pkcs11.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <set>
#include <string>

namespace {

CK_FUNCTION_LIST real;
CK_FUNCTION_LIST mine;
std::once_flag loaded;
bool load_ok = false;

std::mutex mu;
std::string inject_function;
CK_RV inject_rv = CKR_OK;
int inject_count = 0;
CK_RV login_rv = CKR_OK;  // CKR_OK = forward
CK_SESSION_HANDLE last_login_session = 0;
std::set<std::string> ivs;

std::atomic<long> login_calls{0};
std::atomic<long> login_ok{0};  // C_Login calls SoftHSM answered with CKR_OK
std::atomic<long> initialize_calls{0};
std::atomic<long> gcm_inits{0};
std::atomic<long> bad_gcm_params{0};
std::atomic<long> operation_active{0};
std::atomic<long> decrypt_inits{0};
std::atomic<long> set_attribute_calls{0};
std::atomic<long> destroy_calls{0};
std::atomic<unsigned long> last_aad_len{0};

bool Inject(const char* function, CK_RV* rv) {
  std::lock_guard<std::mutex> lock(mu);
  if (inject_count > 0 && inject_function == function) {
    --inject_count;
    *rv = inject_rv;
    return true;
  }
  return false;
}

CK_RV Note(CK_RV rv) {
  if (rv == CKR_OPERATION_ACTIVE) {
    operation_active.fetch_add(1);
  }
  return rv;
}

void RecordGcm(CK_MECHANISM_PTR mechanism) {
  if (mechanism == nullptr || mechanism->mechanism != CKM_AES_GCM) {
    return;
  }
  gcm_inits.fetch_add(1);
  if (mechanism->ulParameterLen != sizeof(CK_GCM_PARAMS) || mechanism->pParameter == nullptr) {
    bad_gcm_params.fetch_add(1);
    return;
  }
  const auto* params = static_cast<const CK_GCM_PARAMS*>(mechanism->pParameter);
  if (params->ulIvLen != 12 || params->pIv == nullptr || params->ulTagBits != 128 || params->ulAADLen == 0 ||
      params->pAAD == nullptr) {
    bad_gcm_params.fetch_add(1);
  }
  last_aad_len.store(params->ulAADLen);
  if (params->pIv != nullptr) {
    std::lock_guard<std::mutex> lock(mu);
    ivs.insert(std::string(reinterpret_cast<const char*>(params->pIv), params->ulIvLen));
  }
}

CK_RV MyInitialize(CK_VOID_PTR args) {
  initialize_calls.fetch_add(1);
  CK_RV rv;
  if (Inject("C_Initialize", &rv)) {
    return rv;
  }
  return real.C_Initialize(args);
}

CK_RV MyLogin(CK_SESSION_HANDLE session, CK_USER_TYPE user, CK_UTF8CHAR_PTR pin, CK_ULONG pin_len) {
  login_calls.fetch_add(1);
  {
    std::lock_guard<std::mutex> lock(mu);
    last_login_session = session;
    if (login_rv != CKR_OK) {
      return login_rv;
    }
  }
  const CK_RV rv = real.C_Login(session, user, pin, pin_len);
  if (rv == CKR_OK) {
    login_ok.fetch_add(1);
  }
  return rv;
}

CK_RV MyEncryptInit(CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism, CK_OBJECT_HANDLE key) {
  RecordGcm(mechanism);
  CK_RV rv;
  if (Inject("C_EncryptInit", &rv)) {
    return rv;
  }
  return Note(real.C_EncryptInit(session, mechanism, key));
}

CK_RV MyDecryptInit(CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism, CK_OBJECT_HANDLE key) {
  decrypt_inits.fetch_add(1);
  RecordGcm(mechanism);
  CK_RV rv;
  if (Inject("C_DecryptInit", &rv)) {
    return rv;
  }
  return Note(real.C_DecryptInit(session, mechanism, key));
}

CK_RV MyEncrypt(CK_SESSION_HANDLE session, CK_BYTE_PTR in, CK_ULONG in_len, CK_BYTE_PTR out, CK_ULONG_PTR out_len) {
  CK_RV rv;
  if (Inject("C_Encrypt", &rv)) {
    // Finish the real operation so the session is clean, then report the injected failure.
    real.C_Encrypt(session, in, in_len, out, out_len);
    return rv;
  }
  return Note(real.C_Encrypt(session, in, in_len, out, out_len));
}

CK_RV MyDecrypt(CK_SESSION_HANDLE session, CK_BYTE_PTR in, CK_ULONG in_len, CK_BYTE_PTR out, CK_ULONG_PTR out_len) {
  return Note(real.C_Decrypt(session, in, in_len, out, out_len));
}

CK_RV MySetAttributeValue(CK_SESSION_HANDLE session, CK_OBJECT_HANDLE object, CK_ATTRIBUTE_PTR attributes,
                          CK_ULONG count) {
  set_attribute_calls.fetch_add(1);
  CK_RV rv;
  if (Inject("C_SetAttributeValue", &rv)) {
    return rv;
  }
  return real.C_SetAttributeValue(session, object, attributes, count);
}

CK_RV MyDestroyObject(CK_SESSION_HANDLE session, CK_OBJECT_HANDLE object) {
  destroy_calls.fetch_add(1);
  CK_RV rv;
  if (Inject("C_DestroyObject", &rv)) {
    return rv;
  }
  return real.C_DestroyObject(session, object);
}

CK_RV MyFindObjectsInit(CK_SESSION_HANDLE session, CK_ATTRIBUTE_PTR attributes, CK_ULONG count) {
  return Note(real.C_FindObjectsInit(session, attributes, count));
}

void Load() {
  const char* target = std::getenv("KMS_INTERPOSER_TARGET");
  void* handle = dlopen(target != nullptr ? target : "/usr/lib/softhsm/libsofthsm2.so", RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    return;
  }
  auto get = reinterpret_cast<CK_C_GetFunctionList>(dlsym(handle, "C_GetFunctionList"));
  CK_FUNCTION_LIST_PTR list = nullptr;
  if (get == nullptr || get(&list) != CKR_OK) {
    return;
  }
  real = *list;
  mine = *list;
  mine.C_Initialize = MyInitialize;
  mine.C_Login = MyLogin;
  mine.C_EncryptInit = MyEncryptInit;
  mine.C_DecryptInit = MyDecryptInit;
  mine.C_Encrypt = MyEncrypt;
  mine.C_Decrypt = MyDecrypt;
  mine.C_FindObjectsInit = MyFindObjectsInit;
  mine.C_SetAttributeValue = MySetAttributeValue;
  mine.C_DestroyObject = MyDestroyObject;
  load_ok = true;
}

}  // namespace

extern "C" {

__attribute__((visibility("default"))) CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR out) {
  std::call_once(loaded, Load);
  if (!load_ok || out == nullptr) {
    return CKR_GENERAL_ERROR;
  }
  *out = &mine;
  return CKR_OK;
}

__attribute__((visibility("default"))) void kms_interposer_reset() {
  std::lock_guard<std::mutex> lock(mu);
  inject_count = 0;
  login_rv = CKR_OK;
  ivs.clear();
  login_calls = 0;
  login_ok = 0;
  initialize_calls = 0;
  gcm_inits = 0;
  bad_gcm_params = 0;
  operation_active = 0;
  decrypt_inits = 0;
  set_attribute_calls = 0;
  destroy_calls = 0;
}

__attribute__((visibility("default"))) void kms_interposer_inject(const char* function, unsigned long rv, int count) {
  std::lock_guard<std::mutex> lock(mu);
  inject_function = function;
  inject_rv = rv;
  inject_count = count;
}

__attribute__((visibility("default"))) void kms_interposer_set_login_rv(unsigned long rv) {
  std::lock_guard<std::mutex> lock(mu);
  login_rv = rv;
}

// Logs the application out of the token through the session the key source logged in with.
__attribute__((visibility("default"))) unsigned long kms_interposer_logout() {
  CK_SESSION_HANDLE session;
  {
    std::lock_guard<std::mutex> lock(mu);
    session = last_login_session;
  }
  return real.C_Logout(session);
}

__attribute__((visibility("default"))) long kms_interposer_counter(const char* name) {
  const std::string n = name;
  if (n == "login") return login_calls.load();
  if (n == "login_ok") return login_ok.load();
  if (n == "initialize") return initialize_calls.load();
  if (n == "gcm_inits") return gcm_inits.load();
  if (n == "bad_gcm_params") return bad_gcm_params.load();
  if (n == "operation_active") return operation_active.load();
  if (n == "decrypt_inits") return decrypt_inits.load();
  if (n == "set_attribute") return set_attribute_calls.load();
  if (n == "destroy") return destroy_calls.load();
  if (n == "last_aad_len") return static_cast<long>(last_aad_len.load());
  if (n == "distinct_ivs") {
    std::lock_guard<std::mutex> lock(mu);
    return static_cast<long>(ivs.size());
  }
  return -1;
}

}  // extern "C"
