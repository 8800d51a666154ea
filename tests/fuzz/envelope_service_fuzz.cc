// Fuzz target: KMS v2 and v1beta1 request handling in core's EnvelopeService (core/envelope_service.h): the
// ciphertext, key_id and annotations of a DecryptRequest (v1beta1 carries only the ciphertext) and the plaintext
// of an EncryptRequest, as the gRPC adapters hand them over. Two key sources: the test fake
// (tests/support/fake_key_source.h: versions retired, active and current) and a real local keyring (its own
// key_ref parsing and XChaCha20-Poly1305 unwrap), chosen by the input.
//
// The input (FuzzedDataProvider) picks one of three shapes:
//   0  a DecryptRequest made of fuzz bytes (ciphertext, key_id, annotations);
//   1  Encrypt of fuzz plaintext, then Decrypt of exactly what it returned: must give the plaintext back;
//   2  the same with fuzz edits to the ciphertext bytes, the key_id or the annotations: any change must be refused.
// Properties: never crashes, hangs or leaks; Encrypt refuses only a plaintext outside 1..kMaxPlaintextSize; what
// Encrypt returns decrypts to the plaintext; nothing edited decrypts.

#include <fuzzer/FuzzedDataProvider.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>

#include "kmsplugin/core/envelope_service.h"
#include "kmsplugin/keysource/common/atomic_file.h"
#include "kmsplugin/keysource/local/keyring.h"
#include "kmsplugin/keysource/local/local_key_source.h"
#include "tests/support/fake_clock.h"
#include "tests/support/fake_key_source.h"
#include "tests/support/fake_random.h"

namespace {

using namespace kmsplugin;

struct World {
  testing::FakeClock clock;
  testing::FakeRandom random{"envelope service fuzz"};
  std::shared_ptr<testing::FakeKeySource> fake;
  std::shared_ptr<core::KeySource> local;
};

// A local keyring of three versions (the first retired) under a root key file, in a private temp directory.
std::shared_ptr<core::KeySource> OpenLocal(World& world) {
  std::string pattern = (std::filesystem::temp_directory_path() / "kms-service-fuzz-XXXXXX").string();
  if (mkdtemp(pattern.data()) == nullptr) {
    std::abort();
  }
  static std::string dir;
  dir = pattern;
  std::atexit([] { std::filesystem::remove_all(dir); });
  const std::string root_file = dir + "/root.key";
  const std::string keyring_file = dir + "/dev.keyring";
  const crypto::SecretBytes root = crypto::SecretBytes::CopyOf(std::string(keysource::local::kRootKeySize, 'r'));
  keysource::local::Keyring keyring = keysource::local::NewKeyring({}, world.clock.Now(), world.random);
  keysource::local::AppendVersion(keyring, world.clock.Now() + absl::Hours(1), world.random);
  keysource::local::AppendVersion(keyring, world.clock.Now() + absl::Hours(2), world.random);
  keyring.versions[0].info.state = core::KeyState::kRetired;
  auto sealed = keysource::local::SealKeyring(keyring, root, world.random);
  if (!sealed.ok() || !keysource::WriteFileAtomically(root_file, std::string(root.view()), /*exclusive=*/true).ok() ||
      !keysource::WriteFileAtomically(keyring_file, *sealed, /*exclusive=*/true).ok()) {
    std::abort();
  }
  keysource::local::LocalOptions options;
  options.keyring = keyring_file;
  options.root_key_file = root_file;
  auto source = keysource::local::LocalKeySource::Open(options, "dev", world.clock, world.random);
  if (!source.ok()) {
    std::fprintf(stderr, "local key source: %s\n", std::string(source.status().message()).c_str());
    std::abort();
  }
  return *source;
}

World& TheWorld() {
  static World* world = [] {
    auto* w = new World;
    w->fake = std::make_shared<testing::FakeKeySource>("dev");
    w->fake->AddVersion(w->clock.Now());
    w->fake->AddVersion(w->clock.Now() + absl::Hours(1));
    w->fake->AddVersion(w->clock.Now() + absl::Hours(2));
    w->fake->SetState(1, core::KeyState::kRetired);
    w->local = OpenLocal(*w);
    return w;
  }();
  return *world;
}

core::Annotations FuzzAnnotations(FuzzedDataProvider& in) {
  core::Annotations annotations;
  const int count = in.ConsumeIntegralInRange(0, 3);
  for (int i = 0; i < count; ++i) {
    std::string key = in.ConsumeBool() ? std::string(core::kFormatAnnotationKey) : in.ConsumeRandomLengthString(64);
    annotations[std::move(key)] = in.ConsumeRandomLengthString(64);
  }
  return annotations;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  World& world = TheWorld();
  FuzzedDataProvider in(data, size);
  std::shared_ptr<core::KeySource> source =
      in.ConsumeBool() ? world.local : std::static_pointer_cast<core::KeySource>(world.fake);
  core::EnvelopeService service({.environment = "dev"}, source, world.clock, world.random);
  const absl::Time deadline = world.clock.Now() + absl::Seconds(10);
  const int shape = in.ConsumeIntegralInRange(0, 2);
  const bool v1beta1 = in.ConsumeBool();

  if (shape == 0) {
    core::DecryptMetadata metadata;
    metadata.key_id = in.ConsumeRandomLengthString(256);
    metadata.annotations = FuzzAnnotations(in);
    const std::string ciphertext = in.ConsumeRemainingBytesAsString();
    auto plaintext = service.Decrypt(ciphertext, v1beta1 ? nullptr : &metadata, deadline);
    if (!plaintext.ok() && plaintext.status().message().empty()) {
      std::abort();
    }
    (void)service.Status();
    return 0;
  }

  const std::string plaintext = in.ConsumeRandomLengthString(core::kMaxPlaintextSize + 16);
  auto encrypted = service.Encrypt(plaintext, deadline);
  const bool fits = !plaintext.empty() && plaintext.size() <= core::kMaxPlaintextSize;
  if (encrypted.ok() != fits) {
    std::abort();
  }
  if (!encrypted.ok()) {
    if (encrypted.status().code() != absl::StatusCode::kInvalidArgument) {
      std::abort();
    }
    return 0;
  }
  std::string ciphertext = encrypted->ciphertext;
  core::DecryptMetadata metadata{encrypted->key_id, encrypted->annotations};
  if (shape == 2) {
    const int edits = in.ConsumeIntegralInRange(1, 4);
    for (int i = 0; i < edits; ++i) {
      switch (in.ConsumeIntegralInRange(0, 5)) {
        case 0:
          metadata.key_id = in.ConsumeRandomLengthString(256);
          break;
        case 1:
          metadata.annotations = FuzzAnnotations(in);
          break;
        case 2:
          ciphertext.resize(in.ConsumeIntegralInRange<size_t>(0, ciphertext.size()));
          break;
        case 3:
          ciphertext += in.ConsumeRandomLengthString(32);
          break;
        default:
          if (!ciphertext.empty()) {
            ciphertext[in.ConsumeIntegralInRange<size_t>(0, ciphertext.size() - 1)] = in.ConsumeIntegral<char>();
          }
          break;
      }
    }
  }
  const bool edited =
      ciphertext != encrypted->ciphertext ||
      (!v1beta1 && (metadata.key_id != encrypted->key_id || metadata.annotations != encrypted->annotations));
  auto decrypted = service.Decrypt(ciphertext, v1beta1 ? nullptr : &metadata, deadline);
  if (edited) {
    if (decrypted.ok()) {
      std::abort();  // an edited request decrypted
    }
  } else if (!decrypted.ok() || decrypted->view() != plaintext) {
    std::abort();  // a request exactly as Encrypt answered it did not round-trip
  }
  return 0;
}
