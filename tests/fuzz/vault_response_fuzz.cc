// Fuzz target: every Vault HTTP response kmsplugin parses (keysource/vault), through the real VaultClient and
// VaultKeySource over a transport that answers from the fuzz input instead of a network: logins (AppRole, JWT,
// cert), token lookup-self and renew-self, key metadata (keys/<key>), encrypt, decrypt, keys/<key>/config,
// rotate, init's key read, redirects, Retry-After, and the "errors" array of every refusal.
//
// Input (text, so seeds are real Vault answers and read as such):
//   line 1:  <auth><ops> [key_ref] [wrapped]
//            auth: t token file, a AppRole, j JWT, c cert; then the calls after Open (which authenticates and
//            reads the key metadata) in order: W wrap, U unwrap(key_ref, wrapped), R refresh, T rotate,
//            X retire(1), I reinstate(1), C current, V versions, L lookup(key_ref), B an hour passes and the
//            background upkeep runs once (renew-self, lookup-self or a new login), K init's CreateKey
//   then one answer a line, in the order requests are made:  <HTTP status> <body>  (status 0: the connection
//   failed; 3xx: the body is the Location; 429: Retry-After 1 ms). When the answers run out, every further
//   request fails to connect, without retry.
// Properties: never crashes, throws, hangs or leaks; every failure is a status with a message; no Vault token
// from a response appears in any status message.

#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <deque>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "kmsplugin/keysource/vault/http_transport.h"
#include "kmsplugin/keysource/vault/vault_client.h"
#include "kmsplugin/keysource/vault/vault_key_source.h"
#include "tests/support/fake_clock.h"

namespace {

using namespace kmsplugin::keysource::vault;

// The token every seed's login answers with; no status message may contain it.
constexpr absl::string_view kSeedToken = "hvs.FUZZSEEDTOKEN";

// Answers each request with the next line of the input.
class ScriptedTransport : public HttpTransport {
 public:
  explicit ScriptedTransport(std::deque<absl::string_view> answers) : answers_(std::move(answers)) {}

  HttpResponse Send(HttpRequest& /*request*/, absl::Duration /*timeout*/, absl::Time /*deadline*/) override {
    HttpResponse response;
    if (answers_.empty()) {
      response.transport = absl::UnavailableError("fuzz: no more answers");
      response.retryable = false;
      return response;
    }
    absl::string_view line = answers_.front();
    answers_.pop_front();
    const size_t space = line.find(' ');
    const absl::string_view code = line.substr(0, space);
    const absl::string_view body = space == absl::string_view::npos ? absl::string_view() : line.substr(space + 1);
    if (!absl::SimpleAtoi(code, &response.status) || response.status <= 0 || response.status > 999) {
      response.transport = absl::UnavailableError("fuzz: connection refused");
      return response;
    }
    if (response.status >= 300 && response.status < 400) {
      response.location = std::string(body);
    } else {
      response.body = std::string(body);
    }
    if (response.status == 429) {
      response.retry_after = absl::Milliseconds(1);
    }
    return response;
  }

 private:
  std::deque<absl::string_view> answers_;
};

// Credential files for each auth kind, private as ReadCredentialFile demands; made once, removed at exit.
const std::filesystem::path& CredentialDir() {
  static const std::filesystem::path* dir = [] {
    std::string pattern = (std::filesystem::temp_directory_path() / "kms-vault-fuzz-XXXXXX").string();
    if (mkdtemp(pattern.data()) == nullptr) {
      std::abort();
    }
    auto* path = new std::filesystem::path(pattern);
    for (const char* name : {"token", "role_id", "secret_id", "jwt"}) {
      const std::filesystem::path file = *path / name;
      FILE* f = std::fopen(file.c_str(), "w");
      if (f == nullptr) {
        std::abort();
      }
      std::fputs(std::string(name) == "jwt" ? "eyJhbGciOiJSUzI1NiJ9.e30.c2ln\n" : "credential-value\n", f);
      std::fclose(f);
      std::filesystem::permissions(file, std::filesystem::perms::owner_read | std::filesystem::perms::owner_write);
    }
    std::atexit([] { std::filesystem::remove_all(*dir); });
    return path;
  }();
  return *dir;
}

VaultOptions OptionsFor(char auth) {
  VaultOptions options;
  options.addresses = {"https://vault-1.fuzz:8200", "https://vault-2.fuzz:8200"};
  options.key_name = "kek";
  options.poll_interval = absl::ZeroDuration();
  options.request_timeout = absl::Seconds(2);
  options.retry.max_retries = 1;
  options.retry.min_wait = absl::Microseconds(1);
  options.retry.max_wait = absl::Microseconds(2);
  const std::filesystem::path& dir = CredentialDir();
  switch (auth) {
    case 'a':
      options.auth.kind = AuthKind::kAppRole;
      options.auth.mount = "approle";
      options.auth.role_id_file = dir / "role_id";
      options.auth.secret_id_file = dir / "secret_id";
      break;
    case 'j':
      options.auth.kind = AuthKind::kJwt;
      options.auth.mount = "kubernetes";
      options.auth.role = "kmsplugin";
      options.auth.jwt_file = dir / "jwt";
      break;
    case 'c':
      options.auth.kind = AuthKind::kCert;
      options.auth.mount = "cert";
      options.auth.cert_name = "kmsplugin";
      break;
    default:
      options.auth.kind = AuthKind::kToken;
      options.auth.token_file = dir / "token";
      break;
  }
  return options;
}

void Check(const absl::Status& status) {
  if (!status.ok() && (status.message().empty() || status.message().find(kSeedToken) != absl::string_view::npos)) {
    std::abort();
  }
}
template <typename T>
void Check(const absl::StatusOr<T>& result) {
  Check(result.status());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const absl::string_view input(reinterpret_cast<const char*>(data), size);
  std::vector<absl::string_view> lines = absl::StrSplit(input, '\n');
  const std::vector<absl::string_view> head = absl::StrSplit(lines[0], absl::MaxSplits(' ', 2));
  const absl::string_view script = head[0];
  const std::string key_ref(head.size() > 1 ? head[1] : "v1@1700000000");
  const std::string wrapped(head.size() > 2 ? head[2] : "vault:v1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
  const std::deque<absl::string_view> answers(lines.begin() + 1, lines.end());
  const char auth = script.empty() ? 't' : script[0];
  const absl::string_view ops = script.empty() ? script : script.substr(1);

  kmsplugin::testing::FakeClock clock;
  auto client = VaultClient::New(OptionsFor(auth), &clock, std::make_unique<ScriptedTransport>(answers));
  if (!client.ok()) {
    std::abort();
  }
  const absl::Time deadline = absl::Now() + absl::Seconds(5);
  if (!ops.empty() && ops[0] == 'K') {
    Check(VaultKeySource::CreateKey(**client, deadline));
    return 0;
  }
  auto source = VaultKeySource::Open(std::move(*client), &clock, /*background=*/false);
  Check(source);
  if (!source.ok()) {
    return 0;
  }
  VaultKeySource& vault = **source;
  for (const char op : ops) {
    switch (op) {
      case 'W': {
        auto current = vault.Current();
        kmsplugin::core::KeyVersion version;
        if (current.ok()) {
          version = *current;
        } else {
          version.version = 1;
          version.key_ref = key_ref;
        }
        Check(vault.Wrap(version, std::string(32, 'p'), "associated data", deadline));
        break;
      }
      case 'U':
        Check(vault.Unwrap(key_ref, wrapped, "associated data", deadline));
        break;
      case 'R':
        Check(vault.Refresh(deadline));
        break;
      case 'T':
        Check(vault.Rotate(deadline));
        break;
      case 'X':
        Check(vault.Retire(1, deadline));
        break;
      case 'I':
        Check(vault.Reinstate(1, deadline));
        break;
      case 'C':
        Check(vault.Current());
        break;
      case 'V':
        Check(vault.Versions());
        break;
      case 'L':
        Check(vault.Lookup(key_ref));
        break;
      case 'B':
        clock.Advance(absl::Hours(1));
        vault.client().UpkeepOnce();
        (void)vault.client().TokenTimeToLive();
        (void)vault.BackendGauges();
        break;
      default:
        break;
    }
  }
  return 0;
}
