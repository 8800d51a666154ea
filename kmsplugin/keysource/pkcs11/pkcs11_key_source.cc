// The only translation unit that includes the PKCS#11 header: p11-kit's compat API #defines lowercase names
// (iv_len, hash_alg, ...), so it is kept away from every other file.
#include "kmsplugin/keysource/pkcs11/pkcs11_key_source.h"

#include <dlfcn.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <map>
#include <tuple>

#include "absl/base/thread_annotations.h"
#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "kmsplugin/config/file_checks.h"
#include "kmsplugin/core/sv.h"
#include "kmsplugin/core/version_rules.h"

// Last, so that its lowercase compat macros cannot rename anything in the headers above.
// clang-format off
#include <p11-kit/pkcs11.h>
// clang-format on

namespace kmsplugin::keysource::pkcs11 {
namespace {

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
// The object itself forbids the operation: a retired key (CKA_ENCRYPT/CKA_DECRYPT false: KEY_FUNCTION_NOT_PERMITTED)
// or a change to an object created with CKA_MODIFIABLE false (SoftHSM: ACTION_PROHIBITED from C_SetAttributeValue,
// ATTRIBUTE_READ_ONLY from C_CopyObject). Never retried: the same call would be refused again.
bool IsRefusedByObject(CK_RV rv) {
  return rv == CKR_KEY_FUNCTION_NOT_PERMITTED || rv == CKR_ACTION_PROHIBITED || rv == CKR_ATTRIBUTE_READ_ONLY;
}
bool IsPinRefused(CK_RV rv) {
  return rv == CKR_PIN_INCORRECT || rv == CKR_PIN_LOCKED || rv == CKR_PIN_EXPIRED || rv == CKR_PIN_INVALID ||
         rv == CKR_PIN_LEN_RANGE;
}

// A blank-padded fixed-size PKCS#11 text field, trimmed.
std::string PaddedText(const unsigned char* text, size_t size) {
  std::string out(reinterpret_cast<const char*>(text), size);
  while (!out.empty() && (out.back() == ' ' || out.back() == '\0')) {
    out.pop_back();
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Module: one dlopen'ed PKCS#11 library per path, shared by every key source of the process. C_Initialize runs
// once; a full re-initialisation (C_Finalize + C_Initialize) takes `call_mu` as writer so that no call of any
// key source is inside the module meanwhile; every other call holds it as reader.
class Module {
 public:
  static absl::StatusOr<std::shared_ptr<Module>> Load(const std::string& path) {
    static absl::Mutex registry_mu(absl::kConstInit);
    static auto* registry = new std::map<std::string, std::weak_ptr<Module>>();
    absl::MutexLock lock(&registry_mu);
    if (auto it = registry->find(path); it != registry->end()) {
      if (auto module = it->second.lock()) {
        return module;
      }
    }
    // The module stays mapped for the life of the process: unloading a PKCS#11 library that spawned threads
    // or registered atexit handlers is unsafe, and a later key source may load it again.
    void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr) {
      const char* error = dlerror();
      return absl::FailedPreconditionError(
          absl::StrCat("cannot load PKCS#11 module ", path, ": ", error != nullptr ? error : "unknown error",
                       "; fix: set keySource.pkcs11.module to the path of the token's PKCS#11 library"));
    }
    auto get_function_list = reinterpret_cast<CK_C_GetFunctionList>(dlsym(handle, "C_GetFunctionList"));
    CK_FUNCTION_LIST_PTR functions = nullptr;
    if (get_function_list == nullptr || get_function_list(&functions) != CKR_OK || functions == nullptr) {
      return absl::FailedPreconditionError(absl::StrCat("PKCS#11 module ", path,
                                                        " has no usable C_GetFunctionList; fix: point "
                                                        "keySource.pkcs11.module at a PKCS#11 library"));
    }
    auto module = std::shared_ptr<Module>(new Module(path, functions));
    if (auto status = module->InitialiseFirst(); !status.ok()) {
      return status;
    }
    (*registry)[path] = module;
    return module;
  }

  ~Module() {
    absl::WriterMutexLock lock(&call_mu_);
    if (initialised_ && owns_initialisation_) {
      functions_->C_Finalize(nullptr);
    }
  }

  CK_FUNCTION_LIST_PTR f() const { return functions_; }
  absl::Mutex& call_mu() ABSL_LOCK_RETURNED(call_mu_) { return call_mu_; }
  uint64_t generation() const { return generation_.load(); }
  const std::string& path() const { return path_; }

  // C_Finalize + C_Initialize, unless another key source already did it since `observed_generation`.
  absl::Status Reinitialise(uint64_t observed_generation) {
    absl::WriterMutexLock lock(&call_mu_);
    if (initialised_ && generation_.load() != observed_generation) {
      return absl::OkStatus();
    }
    if (initialised_) {
      functions_->C_Finalize(nullptr);
      initialised_ = false;
    }
    const CK_RV rv = Initialise();
    if (rv != CKR_OK && rv != CKR_CRYPTOKI_ALREADY_INITIALIZED) {
      return absl::UnavailableError(absl::StrCat("C_Initialize of PKCS#11 module ", path_, " failed: ", Rv(rv)));
    }
    initialised_ = true;
    generation_.fetch_add(1);
    return absl::OkStatus();
  }

 private:
  Module(std::string path, CK_FUNCTION_LIST_PTR functions) : path_(std::move(path)), functions_(functions) {}

  CK_RV Initialise() ABSL_EXCLUSIVE_LOCKS_REQUIRED(call_mu_) {
    // Without CKF_OS_LOCKING_OK SoftHSM disables its internal locks and is not thread-safe.
    CK_C_INITIALIZE_ARGS args{};
    args.flags = CKF_OS_LOCKING_OK;
    return functions_->C_Initialize(&args);
  }

  absl::Status InitialiseFirst() {
    absl::WriterMutexLock lock(&call_mu_);
    const CK_RV rv = Initialise();
    if (rv == CKR_CRYPTOKI_ALREADY_INITIALIZED) {
      // Another component of the process initialised it: use it, but never finalise it at exit.
      owns_initialisation_ = false;
    } else if (rv != CKR_OK) {
      return absl::UnavailableError(absl::StrCat("C_Initialize of PKCS#11 module ", path_, " failed: ", Rv(rv),
                                                 "; fix: check the module's configuration (for SoftHSM2, "
                                                 "SOFTHSM2_CONF and its token directory)"));
    }
    initialised_ = true;
    generation_.store(1);
    return absl::OkStatus();
  }

  const std::string path_;
  CK_FUNCTION_LIST_PTR const functions_;
  absl::Mutex call_mu_;
  bool initialised_ ABSL_GUARDED_BY(call_mu_) = false;
  bool owns_initialisation_ = true;
  std::atomic<uint64_t> generation_{0};
};

// Identity of the PIN file's current contents on disk, to notice that an operator rewrote it.
struct PinFileStamp {
  dev_t device = 0;
  ino_t inode = 0;
  off_t size = 0;
  int64_t mtime_ns = 0;
  int64_t ctime_ns = 0;
  bool operator==(const PinFileStamp&) const = default;
};

struct PinFile {
  crypto::SecretBytes pin;
  PinFileStamp stamp;
};

absl::StatusOr<PinFile> ReadPinFile(const std::string& path) {
  if (auto status = config::CheckSecretFile(path, "PIN file"); !status.ok()) {
    return status;
  }
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY);
  if (fd < 0) {
    return absl::FailedPreconditionError(absl::StrCat("cannot open PIN file ", path, ": ", std::strerror(errno),
                                                      "; fix: check the path and its permissions"));
  }
  struct stat info {};
  if (fstat(fd, &info) != 0 || !S_ISREG(info.st_mode) || (info.st_mode & (S_IRWXG | S_IRWXO)) != 0) {
    close(fd);
    return absl::FailedPreconditionError(
        absl::StrCat("PIN file ", path, " is not a regular file of mode 0600 or stricter; fix: chmod 600 ", path));
  }
  constexpr size_t kMaxPin = 256;
  crypto::SecretBytes buffer(kMaxPin + 1);
  size_t filled = 0;
  while (filled < buffer.size()) {
    const ssize_t n = read(fd, buffer.data() + filled, buffer.size() - filled);
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n < 0) {
      close(fd);
      return absl::FailedPreconditionError(absl::StrCat("cannot read PIN file ", path, ": ", std::strerror(errno)));
    }
    if (n == 0) {
      break;
    }
    filled += static_cast<size_t>(n);
  }
  close(fd);
  if (filled > kMaxPin) {
    return absl::FailedPreconditionError(
        absl::StrCat("PIN file ", path, " is longer than ", kMaxPin, " bytes; fix: write only the user PIN in it"));
  }
  size_t length = filled;
  while (length > 0 && (buffer.data()[length - 1] == '\n' || buffer.data()[length - 1] == '\r')) {
    --length;
  }
  if (length == 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("PIN file ", path, " is empty; fix: write the token's user PIN in it"));
  }
  PinFile out;
  out.pin = crypto::SecretBytes::CopyOf(absl::Span<const uint8_t>(buffer.data(), length));
  out.stamp = PinFileStamp{info.st_dev, info.st_ino, info.st_size,
                           int64_t{info.st_mtim.tv_sec} * 1'000'000'000 + info.st_mtim.tv_nsec,
                           int64_t{info.st_ctim.tv_sec} * 1'000'000'000 + info.st_ctim.tv_nsec};
  return out;
}

std::optional<PinFileStamp> StatPinFile(const std::string& path) {
  struct stat info {};
  if (stat(path.c_str(), &info) != 0) {
    return std::nullopt;
  }
  return PinFileStamp{info.st_dev, info.st_ino, info.st_size,
                      int64_t{info.st_mtim.tv_sec} * 1'000'000'000 + info.st_mtim.tv_nsec,
                      int64_t{info.st_ctim.tv_sec} * 1'000'000'000 + info.st_ctim.tv_nsec};
}

// Parses "<prefix>-v<N>"; 0 when `label` is not one of ours.
uint64_t VersionFromLabel(std::string_view label, std::string_view prefix) {
  if (label.size() <= prefix.size() + 2 || label.substr(0, prefix.size()) != prefix ||
      label.substr(prefix.size(), 2) != "-v") {
    return 0;
  }
  std::string_view digits = label.substr(prefix.size() + 2);
  if (digits.empty() || digits.size() > 19 || digits[0] == '0' ||
      !std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; })) {
    return 0;
  }
  uint64_t version = 0;
  return absl::SimpleAtoi(absl::string_view(digits.data(), digits.size()), &version) ? version : 0;
}

}  // namespace

std::string EncodeKeyRef(uint64_t version, absl::Time created) {
  std::string out(kKeyRefSize, '\0');
  out[0] = 0x01;
  const uint64_t micros = static_cast<uint64_t>(absl::ToUnixMicros(created));
  for (int i = 0; i < 8; ++i) {
    out[1 + i] = static_cast<char>((version >> (56 - 8 * i)) & 0xff);
    out[9 + i] = static_cast<char>((micros >> (56 - 8 * i)) & 0xff);
  }
  return out;
}

absl::StatusOr<DecodedKeyRef> DecodeKeyRef(std::string_view key_ref) {
  if (key_ref.size() != kKeyRefSize || static_cast<uint8_t>(key_ref[0]) != 0x01) {
    return absl::InvalidArgumentError(
        absl::StrCat("pkcs11 key reference of ", key_ref.size(), " bytes is not in the expected 17-byte format 0x01"));
  }
  uint64_t version = 0;
  uint64_t micros = 0;
  for (int i = 0; i < 8; ++i) {
    version = (version << 8) | static_cast<uint8_t>(key_ref[1 + i]);
    micros = (micros << 8) | static_cast<uint8_t>(key_ref[9 + i]);
  }
  if (version == 0) {
    return absl::InvalidArgumentError("pkcs11 key reference names version 0");
  }
  return DecodedKeyRef{version, absl::FromUnixMicros(static_cast<int64_t>(micros))};
}

// ---------------------------------------------------------------------------------------------------------------
class Pkcs11KeySource::Impl {
 public:
  explicit Impl(Pkcs11Options options, std::shared_ptr<Module> module, PinFile pin)
      : options_(std::move(options)),
        module_(std::move(module)),
        f_(module_->f()),
        clock_(options_.clock != nullptr ? options_.clock : &core::SystemClock()),
        random_(options_.random != nullptr ? options_.random : &crypto::SystemRandom()),
        pin_(std::move(pin.pin)),
        pin_stamp_(pin.stamp),
        backoff_(options_.reinit_backoff_initial) {
    token_name_ = options_.token_label.has_value() ? absl::StrCat("token labelled \"", *options_.token_label, "\"")
                                                   : absl::StrCat("token with serial \"", *options_.token_serial, "\"");
  }

  ~Impl() {
    absl::MutexLock lock(&mu_);
    if (ready_ && generation_ == module_->generation()) {
      absl::ReaderMutexLock call_lock(&module_->call_mu());
      for (CK_SESSION_HANDLE session : free_) {
        f_->C_CloseSession(session);
      }
      if (anchor_ != CK_INVALID_HANDLE) {
        f_->C_CloseSession(anchor_);
      }
    }
  }

  absl::Status Start(absl::Time deadline) {
    {
      absl::MutexLock lock(&mu_);
      if (auto status = SetUpLocked(); !status.ok()) {
        return status;
      }
    }
    return RefreshVersions(deadline);
  }

  std::string TokenSerial() const {
    absl::MutexLock lock(&mu_);
    return token_serial_;
  }

  SessionPoolStats PoolStats() const {
    absl::MutexLock lock(&mu_);
    return SessionPoolStats{options_.session_pool_size, open_count_, static_cast<int>(free_.size())};
  }

  absl::StatusOr<core::KeyVersion> Current() const {
    absl::MutexLock lock(&mu_);
    if (versions_.empty()) {
      if (!pin_error_.ok()) {
        return pin_error_;
      }
      return absl::FailedPreconditionError(
          absl::StrCat("no key version \"", options_.key_label, "-v<N>\" on the PKCS#11 ", token_name_,
                       "; fix: run `kmsplugin init` to create the first version (or check keyLabel)"));
    }
    const core::KeyVersion& newest = versions_.back().version;
    if (newest.state == core::KeyState::kRetired) {
      // Only tools other than kmsplugin can get here (Retire refuses the current version). Encrypting under a
      // version that no longer decrypts would lose the Secret, and falling back to an older one would move the
      // key_id backwards: neither.
      return absl::FailedPreconditionError(absl::StrCat(
          "the newest pkcs11 key version ", newest.version, " (", newest.key_id,
          ") is retired on the token (CKA_DECRYPT is false), so there is no version to encrypt under; fix: reinstate "
          "it (`kmsplugin retire --reinstate`) or rotate"));
    }
    return newest;
  }

  absl::StatusOr<core::KeyVersion> Lookup(std::string_view key_ref) const {
    absl::MutexLock lock(&mu_);
    for (const Entry& entry : versions_) {
      if (entry.version.key_ref == key_ref) {
        return entry.version;
      }
    }
    return absl::NotFoundError("no key version of this pkcs11 key source has that key reference");
  }

  absl::StatusOr<std::vector<core::KeyVersion>> Versions() const {
    absl::MutexLock lock(&mu_);
    std::vector<core::KeyVersion> out;
    for (const Entry& entry : versions_) {
      out.push_back(entry.version);
    }
    return out;
  }

  absl::StatusOr<std::string> Wrap(const core::KeyVersion& version, std::string_view plaintext,
                                   std::string_view associated_data, absl::Time deadline) {
    if (associated_data.empty()) {
      return absl::InvalidArgumentError(
          "pkcs11 wrap refused: the associated data is empty (it must bind the "
          "environment and key version)");
    }
    if (plaintext.empty() || plaintext.size() > kMaxWrapPlaintextSize) {
      return absl::InvalidArgumentError(absl::StrCat("pkcs11 wrap refused: plaintext of ", plaintext.size(),
                                                     " bytes (must be 1..", kMaxWrapPlaintextSize, ")"));
    }
    auto known = Lookup(version.key_ref);
    if (!known.ok()) {
      return absl::FailedPreconditionError(absl::StrCat("pkcs11 wrap refused: key version ", version.version, " (",
                                                        version.key_id, ") is not known to this key source"));
    }
    if (known->state == core::KeyState::kRetired) {
      return absl::FailedPreconditionError(
          absl::StrCat("pkcs11 wrap refused: key version ", version.version, " (", version.key_id, ") is retired"));
    }
    std::string out(kGcmIvSize + plaintext.size() + kGcmTagSize, '\0');
    // A fresh IV from our CSPRNG every call: the token never chooses it (SoftHSM would accept an empty one).
    random_->Fill(absl::Span<uint8_t>(reinterpret_cast<uint8_t*>(out.data()), kGcmIvSize));
    CK_ULONG out_len = 0;
    auto status = WithKey(
        deadline, version.key_ref, "C_Encrypt",
        [&](CK_SESSION_HANDLE session, CK_OBJECT_HANDLE key) -> CK_RV {
          CK_GCM_PARAMS params{};
          params.pIv = reinterpret_cast<CK_BYTE_PTR>(out.data());
          params.ulIvLen = kGcmIvSize;
          params.ulIvBits = kGcmIvSize * 8;
          params.pAAD = reinterpret_cast<CK_BYTE_PTR>(const_cast<char*>(associated_data.data()));
          params.ulAADLen = associated_data.size();
          params.ulTagBits = kGcmTagSize * 8;
          CK_MECHANISM mechanism{CKM_AES_GCM, &params, sizeof(params)};
          CK_RV rv = f_->C_EncryptInit(session, &mechanism, key);
          if (rv != CKR_OK) {
            return rv;
          }
          out_len = out.size() - kGcmIvSize;
          return f_->C_Encrypt(session, reinterpret_cast<CK_BYTE_PTR>(const_cast<char*>(plaintext.data())),
                               plaintext.size(), reinterpret_cast<CK_BYTE_PTR>(out.data() + kGcmIvSize), &out_len);
        },
        /*decrypt=*/false);
    if (status.code() == absl::StatusCode::kNotFound) {
      return absl::FailedPreconditionError(absl::StrCat("pkcs11 wrap refused: key version ", version.version, " (",
                                                        version.key_id, ") ", status.message()));
    }
    if (status.code() == absl::StatusCode::kFailedPrecondition) {
      // The token refused: another process retired this version after our last Refresh (Retire clears
      // CKA_ENCRYPT along with CKA_DECRYPT, so a stale view cannot encrypt new Secrets under it).
      return absl::FailedPreconditionError(absl::StrCat("pkcs11 wrap refused: the token says key version ",
                                                        version.version, " (", version.key_id, ") is retired (",
                                                        status.message(), ")"));
    }
    if (!status.ok()) {
      return status;
    }
    if (out_len != plaintext.size() + kGcmTagSize) {
      return absl::InternalError(absl::StrCat("pkcs11 token returned ", out_len, " bytes of AES-GCM output for ",
                                              plaintext.size(), " bytes of plaintext (expected a 16-byte tag)"));
    }
    return out;
  }

  absl::StatusOr<crypto::SecretBytes> Unwrap(std::string_view key_ref, std::string_view wrapped,
                                             std::string_view associated_data, absl::Time deadline) {
    if (associated_data.empty()) {
      return absl::InvalidArgumentError("pkcs11 unwrap refused: the associated data is empty");
    }
    // Checked here, before the token sees anything: SoftHSM would accept a short IV or a missing tag.
    if (wrapped.size() < kGcmIvSize + 1 + kGcmTagSize ||
        wrapped.size() > kGcmIvSize + kMaxWrapPlaintextSize + kGcmTagSize) {
      return absl::InvalidArgumentError(absl::StrCat("pkcs11 wrapped key of ", wrapped.size(),
                                                     " bytes is malformed (expected a 12-byte IV, 1..",
                                                     kMaxWrapPlaintextSize, " bytes of ciphertext and a 16-byte tag)"));
    }
    if (auto decoded = DecodeKeyRef(key_ref); !decoded.ok()) {
      return absl::InvalidArgumentError(decoded.status().message());
    }
    auto known = Lookup(key_ref);
    if (!known.ok()) {
      return absl::FailedPreconditionError(absl::StrCat("pkcs11 key version ", DecodeKeyRef(key_ref)->version,
                                                        " named by the ciphertext is not "
                                                        "on the ",
                                                        token_name_, " under label prefix \"", options_.key_label,
                                                        "\" (another token, another environment, or a deleted key)"));
    }
    if (known->state == core::KeyState::kRetired) {
      return absl::FailedPreconditionError(RetiredMessage(known->version, known->key_id, ""));
    }
    const size_t body = wrapped.size() - kGcmIvSize;
    crypto::SecretBytes buffer(body);
    CK_ULONG out_len = 0;
    auto status = WithKey(
        deadline, key_ref, "C_Decrypt",
        [&](CK_SESSION_HANDLE session, CK_OBJECT_HANDLE key) -> CK_RV {
          CK_GCM_PARAMS params{};
          params.pIv = reinterpret_cast<CK_BYTE_PTR>(const_cast<char*>(wrapped.data()));
          params.ulIvLen = kGcmIvSize;
          params.ulIvBits = kGcmIvSize * 8;
          params.pAAD = reinterpret_cast<CK_BYTE_PTR>(const_cast<char*>(associated_data.data()));
          params.ulAADLen = associated_data.size();
          params.ulTagBits = kGcmTagSize * 8;
          CK_MECHANISM mechanism{CKM_AES_GCM, &params, sizeof(params)};
          CK_RV rv = f_->C_DecryptInit(session, &mechanism, key);
          if (rv != CKR_OK) {
            return rv;
          }
          out_len = buffer.size();
          return f_->C_Decrypt(session, reinterpret_cast<CK_BYTE_PTR>(const_cast<char*>(wrapped.data() + kGcmIvSize)),
                               body, buffer.data(), &out_len);
        },
        /*decrypt=*/true);
    if (status.code() == absl::StatusCode::kNotFound) {
      return absl::FailedPreconditionError(absl::StrCat("pkcs11 key version ", known->version, " (", known->key_id,
                                                        ") named by the ciphertext ", status.message()));
    }
    if (status.code() == absl::StatusCode::kFailedPrecondition) {
      // Our view said active, the token says CKA_DECRYPT is false: another process retired it since our last
      // Refresh.
      return absl::FailedPreconditionError(
          RetiredMessage(known->version, known->key_id, absl::StrCat(" on the token (", status.message(), ")")));
    }
    if (!status.ok()) {
      return status;
    }
    if (out_len != body - kGcmTagSize) {
      return absl::InvalidArgumentError("pkcs11 wrapped key does not authenticate (unexpected plaintext length)");
    }
    return crypto::SecretBytes::CopyOf(absl::Span<const uint8_t>(buffer.data(), out_len));
  }

  absl::Status Refresh(absl::Time deadline) {
    {
      absl::MutexLock lock(&mu_);
      if (!pin_error_.ok()) {
        const std::optional<PinFileStamp> stamp = StatPinFile(options_.pin_file);
        if (!stamp.has_value() || *stamp == pin_stamp_) {
          return absl::Status(pin_error_.code(),
                              absl::StrCat(pin_error_.message(), " (the PIN file has not changed since)"));
        }
        auto pin = ReadPinFile(options_.pin_file);
        if (!pin.ok()) {
          return pin.status();
        }
        pin_ = std::move(pin->pin);
        pin_stamp_ = pin->stamp;
        pin_error_ = absl::OkStatus();
        // One login attempt with the new PIN happens in EnsureReadyLocked below.
      }
    }
    return RefreshVersions(deadline);
  }

  absl::StatusOr<core::KeyVersion> Rotate(absl::Time deadline) {
    absl::MutexLock rotate_lock(&rotate_mu_);
    if (auto status = RefreshVersions(deadline); !status.ok()) {
      return status;
    }
    uint64_t next = 1;
    {
      absl::MutexLock lock(&mu_);
      if (!versions_.empty()) {
        next = versions_.back().version.version + 1;
      }
    }
    const absl::Time created = absl::FromUnixMicros(absl::ToUnixMicros(clock_->Now()));
    const std::string label = absl::StrCat(options_.key_label, "-v", next);
    const std::string id = EncodeKeyRef(next, created);
    CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;
    auto status = WithSession(deadline, "C_GenerateKey", [&](CK_SESSION_HANDLE session) -> CK_RV {
      CK_OBJECT_CLASS klass = CKO_SECRET_KEY;
      CK_KEY_TYPE key_type = CKK_AES;
      CK_ULONG value_len = 32;
      CK_BBOOL yes = CK_TRUE;
      CK_BBOOL no = CK_FALSE;
      CK_MECHANISM_TYPE allowed[] = {CKM_AES_GCM};
      CK_ATTRIBUTE attributes[] = {
          {CKA_CLASS, &klass, sizeof(klass)},
          {CKA_KEY_TYPE, &key_type, sizeof(key_type)},
          {CKA_VALUE_LEN, &value_len, sizeof(value_len)},
          {CKA_TOKEN, &yes, sizeof(yes)},
          {CKA_PRIVATE, &yes, sizeof(yes)},
          {CKA_SENSITIVE, &yes, sizeof(yes)},
          {CKA_EXTRACTABLE, &no, sizeof(no)},
          {CKA_ENCRYPT, &yes, sizeof(yes)},
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
          {CKA_ID, const_cast<char*>(id.data()), id.size()},
          {CKA_ALLOWED_MECHANISMS, allowed, sizeof(allowed)},
      };
      CK_MECHANISM mechanism{CKM_AES_KEY_GEN, nullptr, 0};
      return f_->C_GenerateKey(session, &mechanism, attributes, sizeof(attributes) / sizeof(attributes[0]), &key);
    });
    if (!status.ok()) {
      return status;
    }
    if (auto refreshed = RefreshVersions(deadline); !refreshed.ok()) {
      return refreshed;
    }
    absl::MutexLock lock(&mu_);
    for (const Entry& entry : versions_) {
      if (entry.version.key_ref == id) {
        return entry.version;
      }
    }
    return absl::InternalError(absl::StrCat("created key ", label, " but it is not listed on the token"));
  }

  // Retire: CKA_ENCRYPT and CKA_DECRYPT cleared on each chosen object, oldest first, so that the retired set
  // stays a floor even when a call fails halfway.
  absl::StatusOr<std::vector<core::KeyVersion>> Retire(uint64_t version, absl::Time deadline) {
    absl::MutexLock rotate_lock(&rotate_mu_);
    if (auto status = RefreshVersions(deadline); !status.ok()) {
      return status;
    }
    auto targets = core::VersionsToRetire(VersionsSnapshot(), version);
    if (!targets.ok()) {
      return targets.status();
    }
    // Every object must accept the change before the first one is touched.
    for (const core::KeyVersion& target : *targets) {
      if (auto entry = EntryOf(target.key_ref); entry.has_value() && !entry->modifiable) {
        return absl::FailedPreconditionError(NotModifiableMessage(*entry, ""));
      }
    }
    return SetUsage(*targets, /*usable=*/false, deadline);
  }

  // Reinstate: CKA_ENCRYPT and CKA_DECRYPT set again, newest first (the retired set stays a floor).
  absl::StatusOr<std::vector<core::KeyVersion>> Reinstate(uint64_t version, absl::Time deadline) {
    absl::MutexLock rotate_lock(&rotate_mu_);
    if (auto status = RefreshVersions(deadline); !status.ok()) {
      return status;
    }
    auto targets = core::VersionsToReinstate(VersionsSnapshot(), version);
    if (!targets.ok()) {
      return targets.status();
    }
    std::reverse(targets->begin(), targets->end());
    auto done = SetUsage(*targets, /*usable=*/true, deadline);
    if (done.ok()) {
      std::reverse(done->begin(), done->end());
    }
    return done;
  }

  // DestroyRetired: C_DestroyObject on `version` and every older version, all retired already, oldest first.
  absl::StatusOr<std::vector<core::KeyVersion>> DestroyRetired(uint64_t version, absl::Time deadline) {
    absl::MutexLock rotate_lock(&rotate_mu_);
    if (auto status = RefreshVersions(deadline); !status.ok()) {
      return status;
    }
    auto targets = core::VersionsToDestroy(VersionsSnapshot(), version);
    if (!targets.ok()) {
      return targets.status();
    }
    std::vector<core::KeyVersion> destroyed;
    for (const core::KeyVersion& target : *targets) {
      auto status = WithKey(
          deadline, target.key_ref, absl::StrCat("C_DestroyObject of key version ", target.version),
          [&](CK_SESSION_HANDLE session, CK_OBJECT_HANDLE key) -> CK_RV { return f_->C_DestroyObject(session, key); },
          /*decrypt=*/false);
      // NOT_FOUND: another process destroyed it meanwhile, which is what this call wanted too.
      if (!status.ok() && status.code() != absl::StatusCode::kNotFound) {
        return PartialFailure(status, "destroyed", destroyed);
      }
      {
        absl::MutexLock lock(&mu_);
        versions_.erase(std::remove_if(versions_.begin(), versions_.end(),
                                       [&](const Entry& e) { return e.version.key_ref == target.key_ref; }),
                        versions_.end());
        RecomputeStatesLocked();
      }
      destroyed.push_back(target);
    }
    // The local view is updated already; a failing re-read only leaves it as it is.
    RefreshVersions(deadline).IgnoreError();
    return destroyed;
  }

 private:
  struct Entry {
    core::KeyVersion version;
    std::string label;
    CK_OBJECT_HANDLE handle = CK_INVALID_HANDLE;
    bool decrypt = true;      // CKA_DECRYPT as last read: false means retired
    bool modifiable = false;  // CKA_MODIFIABLE: false for versions made before retirement existed
  };
  struct Session {
    CK_SESSION_HANDLE handle = CK_INVALID_HANDLE;
    uint64_t generation = 0;
  };

  // ---- retirement ----

  std::vector<core::KeyVersion> VersionsSnapshot() const {
    absl::MutexLock lock(&mu_);
    std::vector<core::KeyVersion> out;
    for (const Entry& entry : versions_) {
      out.push_back(entry.version);
    }
    return out;
  }

  std::optional<Entry> EntryOf(std::string_view key_ref) const {
    absl::MutexLock lock(&mu_);
    for (const Entry& entry : versions_) {
      if (entry.version.key_ref == key_ref) {
        return entry;
      }
    }
    return std::nullopt;
  }

  std::string RetiredMessage(uint64_t version, const std::string& key_id, absl::string_view where) const {
    return absl::StrCat("pkcs11 key version ", version, " (", key_id, ") is retired", where,
                        " and no longer decrypts; fix: if Secrets still need it, reinstate it "
                        "(`kmsplugin retire --reinstate`)");
  }

  std::string NotModifiableMessage(const Entry& entry, absl::string_view token_said) const {
    return absl::StrCat(
        "pkcs11 key version ", entry.version.version, " (", entry.label, ", CKA_ID ",
        absl::BytesToHexString(entry.version.key_ref),
        ") cannot be retired: it was created with CKA_MODIFIABLE=false (by a kmsplugin from before retirement "
        "existed), and the token refuses every change to such an object, C_CopyObject included",
        token_said,
        "; nothing was changed. Retiring is a floor, so while this version is on the token no version at or above "
        "it can be retired; fix: once the audit finds no Secret under it, delete it for good with the token's tools "
        "(e.g. pkcs11-tool --module ",
        options_.module_path, " --login --delete-object --type secrkey --id ",
        absl::BytesToHexString(entry.version.key_ref), " on the ", token_name_,
        "); versions created by `kmsplugin rotate` from now on are modifiable and can be retired (and reinstated)");
  }

  absl::Status PartialFailure(const absl::Status& status, absl::string_view verb,
                              const std::vector<core::KeyVersion>& done) const {
    // The local view already reflects every object changed so far.
    std::vector<std::string> numbers;
    for (const core::KeyVersion& v : done) {
      numbers.push_back(absl::StrCat(v.version));
    }
    return absl::Status(status.code(), absl::StrCat(status.message(), "; ", verb, " before the failure: ",
                                                    numbers.empty() ? "none" : absl::StrJoin(numbers, ", "),
                                                    "; fix: run the same command again once the cause is fixed"));
  }

  // Sets CKA_ENCRYPT and CKA_DECRYPT of each target (in the order given) to `usable`, updating the local view
  // after each object so that this process agrees with the token at once. Returns the targets in their new state.
  absl::StatusOr<std::vector<core::KeyVersion>> SetUsage(const std::vector<core::KeyVersion>& targets, bool usable,
                                                         absl::Time deadline) {
    std::vector<core::KeyVersion> done;
    for (const core::KeyVersion& target : targets) {
      auto status = WithKey(
          deadline, target.key_ref, absl::StrCat("C_SetAttributeValue of key version ", target.version),
          [&](CK_SESSION_HANDLE session, CK_OBJECT_HANDLE key) -> CK_RV {
            CK_BBOOL value = usable ? CK_TRUE : CK_FALSE;
            CK_ATTRIBUTE usage[] = {{CKA_ENCRYPT, &value, sizeof(value)}, {CKA_DECRYPT, &value, sizeof(value)}};
            return f_->C_SetAttributeValue(session, key, usage, 2);
          },
          /*decrypt=*/false);
      if (status.code() == absl::StatusCode::kFailedPrecondition) {
        // The token refuses to change the object although we read CKA_MODIFIABLE true (or it changed since).
        if (auto entry = EntryOf(target.key_ref); entry.has_value()) {
          status = absl::FailedPreconditionError(
              NotModifiableMessage(*entry, absl::StrCat(" (the token answered ", status.message(), ")")));
        }
      } else if (status.code() == absl::StatusCode::kNotFound) {
        status = absl::NotFoundError(absl::StrCat("pkcs11 key version ", target.version, " ", status.message()));
      }
      if (!status.ok()) {
        return PartialFailure(status, usable ? "reinstated" : "retired", done);
      }
      absl::MutexLock lock(&mu_);
      for (Entry& entry : versions_) {
        if (entry.version.key_ref == target.key_ref) {
          entry.decrypt = usable;
        }
      }
      RecomputeStatesLocked();
      for (const Entry& entry : versions_) {
        if (entry.version.key_ref == target.key_ref) {
          done.push_back(entry.version);
        }
      }
    }
    // The local view is updated already; a failing re-read only leaves it as it is.
    RefreshVersions(deadline).IgnoreError();
    // Report the targets as the token now has them.
    for (core::KeyVersion& v : done) {
      if (auto entry = EntryOf(v.key_ref); entry.has_value()) {
        v = entry->version;
      }
    }
    return done;
  }

  // ---- set-up, login, re-initialisation (all under mu_) ----

  // Finds the slot, opens the anchor session and logs in. Sessions of an older generation are forgotten.
  absl::Status SetUpLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    // Sessions of the same module generation may still be open: close them once the new anchor holds the
    // login (closing the last session of the application would log it out).
    std::vector<CK_SESSION_HANDLE> stale;
    if (generation_ == module_->generation()) {
      stale = free_;
      if (anchor_ != CK_INVALID_HANDLE) {
        stale.push_back(anchor_);
      }
    }
    open_count_ -= static_cast<int>(free_.size());
    free_.clear();
    ready_ = false;
    logged_in_ = false;
    anchor_ = CK_INVALID_HANDLE;
    for (Entry& entry : versions_) {
      entry.handle = CK_INVALID_HANDLE;
    }
    generation_ = module_->generation();
    absl::ReaderMutexLock call_lock(&module_->call_mu());
    CK_ULONG count = 0;
    CK_RV rv = f_->C_GetSlotList(CK_TRUE, nullptr, &count);
    std::vector<CK_SLOT_ID> slots(count);
    if (rv == CKR_OK && count > 0) {
      rv = f_->C_GetSlotList(CK_TRUE, slots.data(), &count);
      slots.resize(count);
    }
    if (rv != CKR_OK) {
      return MarkDeviceGoneLocked(absl::StrCat("C_GetSlotList failed: ", Rv(rv)));
    }
    std::vector<CK_SLOT_ID> matches;
    std::vector<std::string> seen;
    std::string serial;
    for (CK_SLOT_ID slot : slots) {
      CK_TOKEN_INFO info{};
      if (f_->C_GetTokenInfo(slot, &info) != CKR_OK || (info.flags & CKF_TOKEN_INITIALIZED) == 0) {
        continue;
      }
      const std::string label = PaddedText(info.label, sizeof(info.label));
      const std::string token_serial = PaddedText(info.serialNumber, sizeof(info.serialNumber));
      seen.push_back(absl::StrCat("\"", label, "\" (serial ", token_serial, ")"));
      if ((options_.token_label.has_value() && label == *options_.token_label) ||
          (options_.token_serial.has_value() && token_serial == *options_.token_serial)) {
        matches.push_back(slot);
        serial = token_serial;
      }
    }
    if (matches.empty()) {
      return MarkDeviceGoneLocked(absl::StrCat("no PKCS#11 ", token_name_, " in module ", module_->path(),
                                               " (tokens present: ", seen.empty() ? "none" : absl::StrJoin(seen, ", "),
                                               ")"));
    }
    if (matches.size() > 1) {
      return absl::FailedPreconditionError(
          absl::StrCat("more than one PKCS#11 ", token_name_, "; fix: select the token with tokenSerial instead"));
    }
    slot_ = matches[0];
    token_serial_ = serial;
    rv = f_->C_OpenSession(slot_, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr, &anchor_);
    if (rv != CKR_OK) {
      anchor_ = CK_INVALID_HANDLE;
      return MarkDeviceGoneLocked(absl::StrCat("C_OpenSession on the ", token_name_, " failed: ", Rv(rv)));
    }
    ready_ = true;
    absl::Status login = LoginLocked();
    for (CK_SESSION_HANDLE session : stale) {
      f_->C_CloseSession(session);
    }
    return login;
  }

  // Exactly one C_Login attempt. A refused PIN is remembered and never tried again until the file changes.
  absl::Status LoginLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) ABSL_SHARED_LOCKS_REQUIRED(module_->call_mu()) {
    if (!pin_error_.ok()) {
      return pin_error_;
    }
    const CK_RV rv = f_->C_Login(anchor_, CKU_USER, pin_.data(), pin_.size());
    if (rv == CKR_OK || rv == CKR_USER_ALREADY_LOGGED_IN) {
      logged_in_ = true;
      for (Entry& entry : versions_) {
        entry.handle = CK_INVALID_HANDLE;
      }
      return absl::OkStatus();
    }
    if (IsPinRefused(rv)) {
      std::string why;
      std::string fix;
      switch (rv) {
        case CKR_PIN_LOCKED:
          why = "the user PIN is locked after too many wrong attempts";
          fix = absl::StrCat(
              "have the token's security officer reset the user PIN (e.g. pkcs11-tool --init-pin "
              "--login --login-type so), write it to ",
              options_.pin_file, ", then reload the plugin (SIGHUP) or rerun the command");
          break;
        case CKR_PIN_EXPIRED:
          why = "the user PIN has expired";
          fix = absl::StrCat("set a new user PIN with the token's tools, write it to ", options_.pin_file,
                             ", then reload the plugin (SIGHUP) or rerun the command");
          break;
        default:
          why = "the token refused the PIN";
          fix = absl::StrCat("write the token's correct user PIN to ", options_.pin_file,
                             ", then reload the plugin (SIGHUP) or rerun the command");
          break;
      }
      pin_error_ = absl::PermissionDeniedError(absl::StrCat(
          "PKCS#11 login to the ", token_name_, " failed: ", why, " (", Rv(rv), ", PIN from ", options_.pin_file,
          "); the plugin will not try this PIN again, because repeated attempts "
          "can lock or wipe a token; fix: ",
          fix));
      return pin_error_;
    }
    if (IsSessionGone(rv)) {
      ready_ = false;
      return absl::UnavailableError(absl::StrCat("PKCS#11 login lost its session: ", Rv(rv)));
    }
    if (IsDeviceGone(rv)) {
      return MarkDeviceGoneLocked(absl::StrCat("PKCS#11 login failed: ", Rv(rv)));
    }
    return absl::UnavailableError(absl::StrCat("PKCS#11 login to the ", token_name_, " failed: ", Rv(rv)));
  }

  absl::Status MarkDeviceGoneLocked(std::string reason) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!need_reinit_) {
      need_reinit_ = true;
      next_reinit_ = absl::Now();  // the first attempt is immediate; later ones back off
    }
    ready_ = false;
    unavailable_reason_ = reason;
    return absl::UnavailableError(absl::StrCat("PKCS#11 ", token_name_, " is unavailable: ", reason));
  }

  // Brings the connection to a usable state: re-initialisation (with backoff), set-up, login.
  absl::Status EnsureReadyLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!pin_error_.ok()) {
      return pin_error_;
    }
    if (need_reinit_) {
      const absl::Time now = absl::Now();
      if (now < next_reinit_) {
        return absl::UnavailableError(absl::StrCat("PKCS#11 ", token_name_, " is unavailable (", unavailable_reason_,
                                                   "); next re-initialisation in ",
                                                   absl::FormatDuration(next_reinit_ - now)));
      }
      absl::Status status = module_->Reinitialise(generation_);
      if (status.ok()) {
        status = SetUpLocked();
      }
      if (!status.ok()) {
        if (status.code() == absl::StatusCode::kPermissionDenied) {
          need_reinit_ = false;
          return status;
        }
        unavailable_reason_ = std::string(status.message());
        next_reinit_ = absl::Now() + backoff_;
        backoff_ = std::min(backoff_ * 2, options_.reinit_backoff_max);
        return absl::UnavailableError(
            absl::StrCat("PKCS#11 ", token_name_, " is unavailable: ", status.message(), " (retrying with backoff)"));
      }
      need_reinit_ = false;
      backoff_ = options_.reinit_backoff_initial;
      return absl::OkStatus();
    }
    if (!ready_ || generation_ != module_->generation()) {
      return SetUpLocked();
    }
    if (!logged_in_) {
      absl::ReaderMutexLock call_lock(&module_->call_mu());
      return LoginLocked();
    }
    return absl::OkStatus();
  }

  // After a lost handle: is the token still logged in? (A logout drops every private object handle.)
  void NoteHandlesLostLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    for (Entry& entry : versions_) {
      entry.handle = CK_INVALID_HANDLE;
    }
    if (!ready_ || generation_ != module_->generation()) {
      return;
    }
    absl::ReaderMutexLock call_lock(&module_->call_mu());
    CK_SESSION_INFO info{};
    const CK_RV rv = f_->C_GetSessionInfo(anchor_, &info);
    if (rv != CKR_OK) {
      if (IsDeviceGone(rv)) {
        MarkDeviceGoneLocked(absl::StrCat("C_GetSessionInfo failed: ", Rv(rv))).IgnoreError();
      } else {
        ready_ = false;
      }
      return;
    }
    if (info.state != CKS_RO_USER_FUNCTIONS && info.state != CKS_RW_USER_FUNCTIONS) {
      logged_in_ = false;
    }
  }

  // ---- the session pool ----

  absl::StatusOr<Session> AcquireLocked(absl::Time deadline) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    auto available = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return !free_.empty() || open_count_ < options_.session_pool_size;
    };
    if (!mu_.AwaitWithDeadline(absl::Condition(&available), deadline)) {
      return absl::DeadlineExceededError(absl::StrCat("no PKCS#11 session became free before the deadline (pool of ",
                                                      options_.session_pool_size, ")"));
    }
    if (!free_.empty()) {
      Session session{free_.back(), generation_};
      free_.pop_back();
      return session;
    }
    CK_SESSION_HANDLE handle = CK_INVALID_HANDLE;
    CK_RV rv;
    {
      absl::ReaderMutexLock call_lock(&module_->call_mu());
      rv = f_->C_OpenSession(slot_, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr, &handle);
    }
    if (rv != CKR_OK) {
      if (IsDeviceGone(rv)) {
        return MarkDeviceGoneLocked(absl::StrCat("C_OpenSession failed: ", Rv(rv)));
      }
      return absl::UnavailableError(absl::StrCat("C_OpenSession on the ", token_name_, " failed: ", Rv(rv)));
    }
    ++open_count_;
    return Session{handle, generation_};
  }

  void Release(const Session& session, bool discard) {
    absl::MutexLock lock(&mu_);
    if (session.generation != generation_ || generation_ != module_->generation()) {
      --open_count_;  // the module was re-initialised: the handle is gone already
      return;
    }
    if (discard) {
      absl::ReaderMutexLock call_lock(&module_->call_mu());
      f_->C_CloseSession(session.handle);
      --open_count_;
      return;
    }
    free_.push_back(session.handle);
  }

  // ---- operations with recovery ----

  // Runs `op` on a pooled session; retries once after a lost session, a lost handle or a re-initialisation.
  // `op` returns the CK_RV of its last call. `find_key` (may be empty) resolves the key handle first.
  template <typename Op>
  absl::Status Run(absl::Time deadline, const std::string& what, std::string_view key_ref, bool decrypt, Op&& op) {
    absl::Status last = absl::UnavailableError(absl::StrCat(what, " did not run"));
    for (int attempt = 0; attempt < 2; ++attempt) {
      if (absl::Now() >= deadline) {
        return absl::DeadlineExceededError(absl::StrCat("PKCS#11 ", what, ": deadline exceeded"));
      }
      Session session;
      CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;
      {
        absl::MutexLock lock(&mu_);
        if (auto status = EnsureReadyLocked(); !status.ok()) {
          return status;
        }
        auto acquired = AcquireLocked(deadline);
        if (!acquired.ok()) {
          if (acquired.status().code() == absl::StatusCode::kUnavailable && need_reinit_ && attempt == 0) {
            last = acquired.status();
            continue;
          }
          return acquired.status();
        }
        session = *acquired;
        key = CachedHandleLocked(key_ref);
      }
      // Lock order: mu_ before the module's call lock, never the other way round.
      CK_RV rv = CKR_OK;
      bool key_missing = false;
      bool others_visible = false;
      {
        absl::ReaderMutexLock call_lock(&module_->call_mu());
        if (!key_ref.empty() && key == CK_INVALID_HANDLE) {
          rv = FindKey(session.handle, key_ref, &key);
          key_missing = rv == CKR_OK && key == CK_INVALID_HANDLE;
          if (key_missing) {
            others_visible = AnyPrivateAesKeyVisible(session.handle);
          }
        }
        if (rv == CKR_OK && !key_missing) {
          rv = op(session.handle, key);
        }
      }
      if (rv == CKR_OK && !key_missing) {
        if (!key_ref.empty()) {
          StoreHandle(key_ref, session.generation, key);
        }
        Release(session, false);
        return absl::OkStatus();
      }
      const bool discard = IsSessionGone(rv) || rv == CKR_OPERATION_ACTIVE;
      Release(session, discard);
      absl::MutexLock lock(&mu_);
      if (key_missing) {
        // Private objects are invisible after a logout; otherwise the token lost the key or went away, and a
        // re-initialisation (with backoff) finds out which.
        NoteHandlesLostLocked();
        if (logged_in_ && ready_ && others_visible) {
          // Logged in and other private keys are there: this one was destroyed (DestroyRetired in another
          // process, or other tools). Not a device failure: re-initialising would stall every other call.
          return absl::NotFoundError(absl::StrCat("is no longer on the ", token_name_,
                                                  " (destroyed by the retire command's destroy step in another "
                                                  "process, or deleted with other tools)"));
        }
        if (logged_in_ && ready_) {
          last = MarkDeviceGoneLocked(
              "the key object of this key version is not on the token (deleted, or the token is unavailable)");
        } else {
          last = absl::UnavailableError("PKCS#11 key lookup ran while the token was not logged in");
        }
        continue;
      }
      const std::string failure = absl::StrCat("PKCS#11 ", what, " failed: ", Rv(rv));
      if (decrypt &&
          (rv == CKR_ENCRYPTED_DATA_INVALID || rv == CKR_ENCRYPTED_DATA_LEN_RANGE || rv == CKR_GENERAL_ERROR)) {
        return absl::InvalidArgumentError(
            "pkcs11 wrapped key does not authenticate under this key version and associated data (wrong "
            "environment, tampered bytes, or another key)");
      }
      if (IsRefusedByObject(rv)) {
        return absl::FailedPreconditionError(failure);
      }
      if (IsSessionGone(rv) || rv == CKR_OPERATION_ACTIVE) {
        last = absl::UnavailableError(failure);
        continue;
      }
      if (IsHandleGone(rv)) {
        NoteHandlesLostLocked();
        last = absl::UnavailableError(failure);
        continue;
      }
      if (IsDeviceGone(rv)) {
        last = MarkDeviceGoneLocked(failure);
        continue;
      }
      if (rv == CKR_PIN_EXPIRED || rv == CKR_PIN_LOCKED) {
        return absl::PermissionDeniedError(failure);
      }
      return absl::UnavailableError(failure);
    }
    if (last.code() == absl::StatusCode::kUnavailable) {
      return last;
    }
    return absl::UnavailableError(last.message());
  }

  template <typename Op>
  absl::Status WithKey(absl::Time deadline, std::string_view key_ref, const std::string& what, Op&& op, bool decrypt) {
    return Run(deadline, what, key_ref, decrypt, std::forward<Op>(op));
  }

  template <typename Op>
  absl::Status WithSession(absl::Time deadline, const std::string& what, Op&& op) {
    return Run(deadline, what, "", false,
               [&](CK_SESSION_HANDLE session, CK_OBJECT_HANDLE) -> CK_RV { return op(session); });
  }

  CK_OBJECT_HANDLE CachedHandleLocked(std::string_view key_ref) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (key_ref.empty()) {
      return CK_INVALID_HANDLE;
    }
    for (const Entry& entry : versions_) {
      if (entry.version.key_ref == key_ref) {
        return entry.handle;
      }
    }
    return CK_INVALID_HANDLE;
  }

  void StoreHandle(std::string_view key_ref, uint64_t generation, CK_OBJECT_HANDLE handle) {
    absl::MutexLock lock(&mu_);
    if (generation != generation_) {
      return;
    }
    for (Entry& entry : versions_) {
      if (entry.version.key_ref == key_ref) {
        entry.handle = handle;
      }
    }
  }

  // Finds the one AES secret key whose CKA_ID is `key_ref`. CKR_OK with *key = CK_INVALID_HANDLE when absent.
  CK_RV FindKey(CK_SESSION_HANDLE session, std::string_view key_ref, CK_OBJECT_HANDLE* key) {
    CK_OBJECT_CLASS klass = CKO_SECRET_KEY;
    CK_KEY_TYPE key_type = CKK_AES;
    CK_ATTRIBUTE query[] = {
        {CKA_CLASS, &klass, sizeof(klass)},
        {CKA_KEY_TYPE, &key_type, sizeof(key_type)},
        {CKA_ID, const_cast<char*>(key_ref.data()), key_ref.size()},
    };
    CK_RV rv = f_->C_FindObjectsInit(session, query, 3);
    if (rv != CKR_OK) {
      return rv;
    }
    CK_OBJECT_HANDLE found[2];
    CK_ULONG count = 0;
    rv = f_->C_FindObjects(session, found, 2, &count);
    // Always finish the find: it occupies the session's only operation slot.
    const CK_RV final_rv = f_->C_FindObjectsFinal(session);
    if (rv != CKR_OK) {
      return rv;
    }
    if (final_rv != CKR_OK) {
      return final_rv;
    }
    *key = count == 1 ? found[0] : CK_INVALID_HANDLE;
    return CKR_OK;
  }

  // Whether at least one private AES secret key is visible: after a logout or with the token gone, none is.
  bool AnyPrivateAesKeyVisible(CK_SESSION_HANDLE session) {
    CK_OBJECT_CLASS klass = CKO_SECRET_KEY;
    CK_KEY_TYPE key_type = CKK_AES;
    CK_BBOOL yes = CK_TRUE;
    CK_ATTRIBUTE query[] = {
        {CKA_CLASS, &klass, sizeof(klass)},
        {CKA_KEY_TYPE, &key_type, sizeof(key_type)},
        {CKA_PRIVATE, &yes, sizeof(yes)},
    };
    if (f_->C_FindObjectsInit(session, query, 3) != CKR_OK) {
      return false;
    }
    CK_OBJECT_HANDLE found = CK_INVALID_HANDLE;
    CK_ULONG count = 0;
    const CK_RV rv = f_->C_FindObjects(session, &found, 1, &count);
    f_->C_FindObjectsFinal(session);
    return rv == CKR_OK && count > 0;
  }

  // Lists every AES secret key on the token and keeps those labelled "<key_label>-v<N>" with a matching CKA_ID.
  absl::Status RefreshVersions(absl::Time deadline) {
    std::vector<Entry> found;
    auto status = WithSession(deadline, "listing key objects", [&](CK_SESSION_HANDLE session) -> CK_RV {
      found.clear();
      CK_OBJECT_CLASS klass = CKO_SECRET_KEY;
      CK_KEY_TYPE key_type = CKK_AES;
      CK_ATTRIBUTE query[] = {{CKA_CLASS, &klass, sizeof(klass)}, {CKA_KEY_TYPE, &key_type, sizeof(key_type)}};
      CK_RV rv = f_->C_FindObjectsInit(session, query, 2);
      if (rv != CKR_OK) {
        return rv;
      }
      std::vector<CK_OBJECT_HANDLE> handles;
      while (true) {
        CK_OBJECT_HANDLE batch[64];
        CK_ULONG count = 0;
        rv = f_->C_FindObjects(session, batch, 64, &count);
        if (rv != CKR_OK || count == 0) {
          break;
        }
        handles.insert(handles.end(), batch, batch + count);
      }
      const CK_RV final_rv = f_->C_FindObjectsFinal(session);
      if (rv != CKR_OK) {
        return rv;
      }
      if (final_rv != CKR_OK) {
        return final_rv;
      }
      for (CK_OBJECT_HANDLE handle : handles) {
        CK_ATTRIBUTE sizes[] = {{CKA_LABEL, nullptr, 0}, {CKA_ID, nullptr, 0}};
        rv = f_->C_GetAttributeValue(session, handle, sizes, 2);
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
        CK_BBOOL modifiable = CK_FALSE;
        CK_ATTRIBUTE values[] = {{CKA_LABEL, label.data(), label.size()},
                                 {CKA_ID, id.data(), id.size()},
                                 {CKA_DECRYPT, &decrypt, sizeof(decrypt)},
                                 {CKA_MODIFIABLE, &modifiable, sizeof(modifiable)}};
        rv = f_->C_GetAttributeValue(session, handle, values, 4);
        if (rv != CKR_OK) {
          if (IsSessionGone(rv) || IsDeviceGone(rv)) {
            return rv;
          }
          continue;
        }
        const uint64_t version = VersionFromLabel(label, options_.key_label);
        auto decoded = DecodeKeyRef(id);
        if (version == 0 || !decoded.ok() || decoded->version != version) {
          continue;
        }
        Entry entry;
        entry.label = label;
        entry.handle = handle;
        entry.version.version = version;
        entry.version.key_ref = id;
        entry.version.created = decoded->created;
        entry.decrypt = decrypt == CK_TRUE;
        entry.modifiable = modifiable == CK_TRUE;
        found.push_back(std::move(entry));
      }
      return CKR_OK;
    });
    if (!status.ok()) {
      return status;
    }
    absl::MutexLock lock(&mu_);
    std::sort(found.begin(), found.end(), [](const Entry& a, const Entry& b) {
      return std::tie(a.version.version, a.version.created) < std::tie(b.version.version, b.version.created);
    });
    for (Entry& entry : found) {
      entry.version.key_id =
          absl::StrCat("pkcs11:", token_serial_, "/", entry.label, "@",
                       absl::FormatTime("%Y-%m-%dT%H:%M:%E6SZ", entry.version.created, absl::UTCTimeZone()));
    }
    versions_ = std::move(found);
    RecomputeStatesLocked();
    return absl::OkStatus();
  }

  // The state model: CKA_DECRYPT false is "retired" (the token enforces it, and every process reads it back);
  // otherwise the newest version is current and the others active.
  void RecomputeStatesLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    for (size_t i = 0; i < versions_.size(); ++i) {
      Entry& entry = versions_[i];
      entry.version.state = !entry.decrypt              ? core::KeyState::kRetired
                            : i + 1 == versions_.size() ? core::KeyState::kCurrent
                                                        : core::KeyState::kActive;
    }
  }

  const Pkcs11Options options_;
  const std::shared_ptr<Module> module_;
  CK_FUNCTION_LIST_PTR const f_;
  core::Clock* const clock_;
  crypto::Random* const random_;
  std::string token_name_;

  absl::Mutex rotate_mu_;
  mutable absl::Mutex mu_;
  crypto::SecretBytes pin_ ABSL_GUARDED_BY(mu_);
  PinFileStamp pin_stamp_ ABSL_GUARDED_BY(mu_);
  absl::Status pin_error_ ABSL_GUARDED_BY(mu_);
  uint64_t generation_ ABSL_GUARDED_BY(mu_) = 0;
  bool ready_ ABSL_GUARDED_BY(mu_) = false;
  bool logged_in_ ABSL_GUARDED_BY(mu_) = false;
  bool need_reinit_ ABSL_GUARDED_BY(mu_) = false;
  absl::Time next_reinit_ ABSL_GUARDED_BY(mu_);
  absl::Duration backoff_ ABSL_GUARDED_BY(mu_);
  std::string unavailable_reason_ ABSL_GUARDED_BY(mu_);
  CK_SLOT_ID slot_ ABSL_GUARDED_BY(mu_) = 0;
  std::string token_serial_ ABSL_GUARDED_BY(mu_);
  CK_SESSION_HANDLE anchor_ ABSL_GUARDED_BY(mu_) = CK_INVALID_HANDLE;
  std::vector<CK_SESSION_HANDLE> free_ ABSL_GUARDED_BY(mu_);
  int open_count_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<Entry> versions_ ABSL_GUARDED_BY(mu_);
};

// ---------------------------------------------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<Pkcs11KeySource>> Pkcs11KeySource::Open(const Pkcs11Options& options,
                                                                       absl::Time deadline) {
  if (options.token_label.has_value() == options.token_serial.has_value()) {
    return absl::InvalidArgumentError("pkcs11 key source needs exactly one of token label and token serial");
  }
  if (options.key_label.empty() || options.key_label.size() > 64) {
    return absl::InvalidArgumentError("pkcs11 key label prefix must be 1..64 characters");
  }
  if (options.session_pool_size < 1) {
    return absl::InvalidArgumentError("pkcs11 session pool size must be at least 1");
  }
  auto pin = ReadPinFile(options.pin_file);
  if (!pin.ok()) {
    return pin.status();
  }
  auto module = Module::Load(options.module_path);
  if (!module.ok()) {
    return module.status();
  }
  auto impl = std::make_unique<Impl>(options, *std::move(module), *std::move(pin));
  if (auto status = impl->Start(deadline); !status.ok()) {
    return status;
  }
  return std::unique_ptr<Pkcs11KeySource>(new Pkcs11KeySource(std::move(impl)));
}

Pkcs11KeySource::Pkcs11KeySource(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Pkcs11KeySource::~Pkcs11KeySource() = default;

absl::StatusOr<core::KeyVersion> Pkcs11KeySource::Current() const { return impl_->Current(); }
absl::StatusOr<std::string> Pkcs11KeySource::Wrap(const core::KeyVersion& version, std::string_view plaintext,
                                                  std::string_view associated_data, absl::Time deadline) {
  return impl_->Wrap(version, plaintext, associated_data, deadline);
}
absl::StatusOr<crypto::SecretBytes> Pkcs11KeySource::Unwrap(std::string_view key_ref, std::string_view wrapped,
                                                            std::string_view associated_data, absl::Time deadline) {
  return impl_->Unwrap(key_ref, wrapped, associated_data, deadline);
}
absl::StatusOr<core::KeyVersion> Pkcs11KeySource::Lookup(std::string_view key_ref) const {
  return impl_->Lookup(key_ref);
}
absl::Status Pkcs11KeySource::Refresh(absl::Time deadline) { return impl_->Refresh(deadline); }
absl::StatusOr<core::KeyVersion> Pkcs11KeySource::Rotate(absl::Time deadline) { return impl_->Rotate(deadline); }
absl::StatusOr<std::vector<core::KeyVersion>> Pkcs11KeySource::Versions() const { return impl_->Versions(); }
std::string Pkcs11KeySource::TokenSerial() const { return impl_->TokenSerial(); }
SessionPoolStats Pkcs11KeySource::PoolStats() const { return impl_->PoolStats(); }

}  // namespace kmsplugin::keysource::pkcs11

namespace kmsplugin::keysource::pkcs11 {

std::vector<core::BackendGauge> Pkcs11KeySource::BackendGauges() const {
  const SessionPoolStats stats = PoolStats();
  return {{"kmsplugin_pkcs11_session_pool_size", "Configured maximum of PKCS#11 sessions for calls.",
           static_cast<double>(stats.size)},
          {"kmsplugin_pkcs11_sessions_open", "PKCS#11 sessions open now, idle or in use (the anchor not counted).",
           static_cast<double>(stats.open)},
          {"kmsplugin_pkcs11_sessions_in_use", "PKCS#11 sessions running a call now.",
           static_cast<double>(stats.open - stats.idle)}};
}

absl::StatusOr<std::vector<core::KeyVersion>> Pkcs11KeySource::Retire(uint64_t version, absl::Time deadline) {
  return impl_->Retire(version, deadline);
}
absl::StatusOr<std::vector<core::KeyVersion>> Pkcs11KeySource::Reinstate(uint64_t version, absl::Time deadline) {
  return impl_->Reinstate(version, deadline);
}
absl::StatusOr<std::vector<core::KeyVersion>> Pkcs11KeySource::DestroyRetired(uint64_t version, absl::Time deadline) {
  return impl_->DestroyRetired(version, deadline);
}

}  // namespace kmsplugin::keysource::pkcs11
