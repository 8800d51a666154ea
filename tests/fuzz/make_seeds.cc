// Writes the seeds of tests/fuzz/corpus that only the project's own code can make (sealed keyrings, envelopes,
// EncryptedObject values, PKCS#11 key_refs, EnvelopeService requests in FuzzedDataProvider's layout). Run it after
// a format change and commit what it writes:
//   kms_fuzz_make_seeds tests/fuzz/corpus
// The hand-written seeds (YAML, Vault answers, URIs, durations) sit next to these; this program does not touch
// them. Deterministic: FakeRandom and fixed times, so re-running it changes no file.

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "crypto/envelope_format.h"
#include "encrypted_object.pb.h"
#include "kmsplugin/core/envelope_service.h"
#include "kmsplugin/keysource/local/keyring.h"
#include "kmsplugin/keysource/pkcs11/key_ref.h"
#include "tests/support/fake_clock.h"
#include "tests/support/fake_key_source.h"
#include "tests/support/fake_random.h"

namespace {

using namespace kmsplugin;

std::filesystem::path g_root;

void Write(const std::string& target, const std::string& name, const std::string& bytes) {
  const std::filesystem::path dir = g_root / target;
  std::filesystem::create_directories(dir);
  std::ofstream out(dir / name, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) {
    std::fprintf(stderr, "cannot write %s\n", (dir / name).c_str());
    std::exit(1);
  }
}

template <typename T>
T Must(absl::StatusOr<T> value) {
  if (!value.ok()) {
    std::fprintf(stderr, "%s\n", std::string(value.status().message()).c_str());
    std::exit(1);
  }
  return *std::move(value);
}

std::string Envelope(crypto::KeySourceKind kind, std::string environment, std::string key_ref, std::string wrapped) {
  return Must(crypto::EncodeEnvelope({{kind, std::move(environment), std::move(key_ref)}, std::move(wrapped)}));
}

void EnvelopeFormat() {
  const std::string a = Envelope(crypto::KeySourceKind::kLocal, "prod", "local:v3:1800000000", std::string(72, 'w'));
  Write("envelope_format_fuzz", "local", a);
  Write("envelope_format_fuzz", "vault-smallest",
        Envelope(crypto::KeySourceKind::kVault, "a", "k", std::string(1, '\0')));
  Write("envelope_format_fuzz", "vault",
        Envelope(crypto::KeySourceKind::kVault, "dev", "v2@1800000000", "vault:v2:" + std::string(60, 'A')));
  Write("envelope_format_fuzz", "pkcs11",
        Envelope(crypto::KeySourceKind::kPkcs11, "prod-eu-1",
                 keysource::pkcs11::EncodeKeyRef(7, absl::FromUnixSeconds(1'800'000'000)), std::string(60, '\x5a')));
  std::string largest_ref, largest_wrapped;
  for (int i = 0; i < 255; ++i) largest_ref.push_back(static_cast<char>(i));
  for (int i = 0; i < 700; ++i) largest_wrapped.push_back(static_cast<char>((7 * i) % 256));
  Write("envelope_format_fuzz", "largest",
        Envelope(crypto::KeySourceKind::kPkcs11, "abcdefghijklmnopqrstuvwxyz0123456789-abcdefghijklmnopqrstuvwxyz",
                 largest_ref, largest_wrapped));
  Write("envelope_format_fuzz", "near-truncated", a.substr(0, a.size() - 1));
  Write("envelope_format_fuzz", "near-trailing-byte", a + "x");
  std::string version2 = a;
  version2[0] = '\x02';
  Write("envelope_format_fuzz", "near-version-2", version2);
}

// Keyrings sealed under keyring_fuzz's fixed root key (32 bytes of 0x4b).
void Keyrings() {
  const crypto::SecretBytes root = crypto::SecretBytes::CopyOf(std::string(keysource::local::kRootKeySize, '\x4b'));
  testing::FakeRandom random("keyring seeds");
  const absl::Time t0 = absl::FromUnixSeconds(1'800'000'000);
  keysource::local::Keyring one = keysource::local::NewKeyring({}, t0, random);
  Write("keyring_fuzz", "file-one-version", Must(keysource::local::SealKeyring(one, root, random)));
  keysource::local::Keyring three = keysource::local::NewKeyring({}, t0, random);
  keysource::local::AppendVersion(three, t0 + absl::Hours(24), random);
  keysource::local::AppendVersion(three, t0 + absl::Hours(48), random);
  three.versions[0].info.state = core::KeyState::kRetired;
  const std::string sealed = Must(keysource::local::SealKeyring(three, root, random));
  Write("keyring_fuzz", "file-three-versions", sealed);
  keysource::local::Keyring pass =
      keysource::local::NewKeyring(keysource::local::NewPassphraseParams(random), t0, random);
  Write("keyring_fuzz", "passphrase-params", Must(keysource::local::SealKeyring(pass, root, random)));
  // Near-valid: the MAC broken (its last base64 digit changed), and one version's state edited.
  std::string bad_mac = sealed;
  const size_t mac = bad_mac.rfind("\"mac\"");
  if (mac != std::string::npos) {
    const size_t end = bad_mac.find('"', bad_mac.find('"', mac + 6) + 1);
    bad_mac[end - 2] = bad_mac[end - 2] == 'A' ? 'B' : 'A';
  }
  Write("keyring_fuzz", "near-bad-mac", bad_mac);
  std::string edited = sealed;
  const size_t retired = edited.find("\"retired\"");
  if (retired != std::string::npos) {
    edited.replace(retired, 9, "\"active\"");
  }
  Write("keyring_fuzz", "near-state-edited", edited);
}

std::string EncryptedObject(const std::string& key_id, const std::string& dek_source, int type) {
  kmsplugin::etcd::EncryptedObject object;
  object.set_encrypteddata(std::string(48, '\x11'));
  object.set_keyid(key_id);
  object.set_encrypteddeksource(dek_source);
  object.set_encrypteddeksourcetype(static_cast<kmsplugin::etcd::EncryptedDEKSourceType>(type));
  (*object.mutable_annotations())["format.kmsplugin.io"] = "1";
  return object.SerializeAsString();
}

void EtcdValues() {
  const std::string envelope =
      Envelope(crypto::KeySourceKind::kLocal, "prod", "local:v3:1800000000", std::string(72, 'w'));
  const std::string key_id = "local:0011223344556677:v3:1800000000";
  Write("value_classifier_fuzz", "kms-v2-seed",
        "k8s:enc:kms:v2:kmsplugin-prod:" + EncryptedObject(key_id, envelope, 1));
  Write("value_classifier_fuzz", "kms-v2-aes-gcm-key",
        "k8s:enc:kms:v2:kmsplugin-prod:" + EncryptedObject(key_id, envelope, 0));
  Write("value_classifier_fuzz", "kms-v2-foreign-dek",
        "k8s:enc:kms:v2:other:" + EncryptedObject("arn:aws:kms:key/1", std::string(40, 'q'), 1));
  std::string v1 = "k8s:enc:kms:v1:kmsplugin-prod:";
  v1.push_back(static_cast<char>(envelope.size() >> 8));
  v1.push_back(static_cast<char>(envelope.size() & 0xff));
  Write("value_classifier_fuzz", "kms-v1", v1 + envelope + std::string(40, 'd'));
  Write("value_classifier_fuzz", "kms-v1-foreign-dek",
        std::string("k8s:enc:kms:v1:other:\x00\x04", 23) + "abcd" + "data");
}

void Pkcs11KeyRefs() {
  Write("pkcs11_key_ref_fuzz", "v1", keysource::pkcs11::EncodeKeyRef(1, absl::FromUnixSeconds(1'800'000'000)));
  Write("pkcs11_key_ref_fuzz", "v-max", keysource::pkcs11::EncodeKeyRef(UINT64_MAX, absl::FromUnixMicros(-1)));
  Write("pkcs11_key_ref_fuzz", "label-v12", "kek-v12");
  Write("pkcs11_key_ref_fuzz", "label-leading-zero", "kek-v012");
}

// EnvelopeService requests in FuzzedDataProvider's layout: strings from the front (a backslash and another byte
// end one; "\\" is one backslash), the choices one byte each from the back, last byte first.
std::string FdpString(const std::string& s) {
  std::string out;
  for (char c : s) {
    out += c;
    if (c == '\\') out += '\\';
  }
  return out + "\\e";
}

void ServiceRequests() {
  // The fuzz target's fake source: versions at t0, t0+1h, t0+2h; the first retired.
  testing::FakeClock clock;
  testing::FakeRandom random("seeds");
  auto fake = std::make_shared<testing::FakeKeySource>("dev");
  fake->AddVersion(clock.Now());
  fake->AddVersion(clock.Now() + absl::Hours(1));
  fake->AddVersion(clock.Now() + absl::Hours(2));
  fake->SetState(1, core::KeyState::kRetired);
  core::EnvelopeService service({.environment = "dev"}, fake, clock, random);
  const core::EncryptResult r = Must(service.Encrypt(std::string(32, 's'), clock.Now() + absl::Seconds(5)));
  // Tail bytes, last consumed first: [annotation is the format key][annotation count][v1beta1][shape][source].
  const std::string v2 = FdpString(r.key_id) + FdpString("1") + r.ciphertext + std::string("\x01\x01\x00\x00\x00", 5);
  Write("envelope_service_fuzz", "v2-decrypt-fake", v2);
  const std::string v1 = FdpString("") + r.ciphertext + std::string("\x00\x01\x00\x00", 4);
  Write("envelope_service_fuzz", "v1beta1-decrypt-fake", v1);
  Write("envelope_service_fuzz", "v2-wrong-key-id",
        FdpString(r.key_id + "x") + FdpString("1") + r.ciphertext + std::string("\x01\x01\x00\x00\x00", 5));
  for (const char source : {'\x00', '\x01'}) {
    const std::string name = source ? "local" : "fake";
    Write("envelope_service_fuzz", "roundtrip-" + name,
          FdpString(std::string(32, 'k')) + std::string("\x00\x01", 2) + source);
    Write("envelope_service_fuzz", "roundtrip-v1beta1-" + name,
          FdpString("ping") + std::string("\x01\x01", 2) + source);
    Write("envelope_service_fuzz", "edit-" + name,
          FdpString(std::string(32, 'k')) + std::string("\x07\x05\x03\x00\x02", 5) + source);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s tests/fuzz/corpus\n", argv[0]);
    return 2;
  }
  g_root = argv[1];
  EnvelopeFormat();
  Keyrings();
  EtcdValues();
  Pkcs11KeyRefs();
  ServiceRequests();
  return 0;
}
