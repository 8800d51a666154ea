#pragma once

// VaultTestServer: runs tests/vault_server/vault_test_server.py (Python 3 stdlib + python3-cryptography, always
// /usr/bin/python3) as a child process for one test, with N API listeners sharing one key store, HTTPS with a
// test CA generated at test time (openssl CLI), optional client-certificate checks, and its control channel.
// The child exits when its stdin closes, so a crashed test leaves no server behind. With Options::persistent the
// server keeps its storage in a file, so Kill() (SIGKILL) and Restart() play a Vault process that dies and comes
// back on the same addresses with the same keys and tokens, sealed until unsealed.

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <mutex>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <curl/curl.h>
#include <nlohmann/json.hpp>

extern char** environ;

namespace kmsplugin::testing {

// Every temporary directory a test makes; removed when the test binary exits.
inline std::string RegisterTempDir(const char* prefix) {
  struct Registry {
    std::mutex mu;
    std::vector<std::string> dirs;
    ~Registry() {
      std::error_code ignored;
      for (const auto& d : dirs) {
        std::filesystem::remove_all(d, ignored);
      }
    }
  };
  static Registry registry;
  std::string tmpl = std::string("/tmp/") + prefix + ".XXXXXX";
  if (mkdtemp(tmpl.data()) == nullptr) {
    throw std::runtime_error("mkdtemp failed");
  }
  std::lock_guard<std::mutex> lock(registry.mu);
  registry.dirs.push_back(tmpl);
  return tmpl;
}

// A directory with a test CA, a server certificate (localhost, vault.test, 127.0.0.1), a client certificate and
// an unrelated CA. Made once per test binary.
struct TestPki {
  std::string dir, ca, server_cert, server_key, client_cert, client_key, other_ca;
  static const TestPki& Get() {
    static const TestPki pki = Make();
    return pki;
  }

 private:
  static TestPki Make() {
    TestPki p;
    p.dir = RegisterTempDir("kms-vault-pki");
    const std::string d = p.dir;
    const std::string ec = " -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes ";
    std::string script =
        "set -e; cd " + d + ";" +
        "openssl req -x509" + ec + "-keyout ca.key -out ca.crt -days 2 -subj /CN=kms-test-ca 2>/dev/null;" +
        "openssl req -x509" + ec + "-keyout other.key -out other-ca.crt -days 2 -subj /CN=other-ca 2>/dev/null;" +
        "openssl req" + ec + "-keyout server.key -out server.csr -subj /CN=localhost 2>/dev/null;" +
        "printf 'subjectAltName=DNS:localhost,DNS:vault.test,IP:127.0.0.1\\nextendedKeyUsage=serverAuth\\n' > s.ext;" +
        "openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days 2 "
        "-extfile s.ext 2>/dev/null;" +
        "openssl req" + ec + "-keyout client.key -out client.csr -subj /CN=kms-client 2>/dev/null;" +
        "printf 'extendedKeyUsage=clientAuth\\n' > c.ext;" +
        "openssl x509 -req -in client.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out client.crt -days 2 "
        "-extfile c.ext 2>/dev/null;" +
        "chmod 600 *.key";
    if (std::system(script.c_str()) != 0) {
      throw std::runtime_error("openssl failed to make the test PKI");
    }
    p.ca = d + "/ca.crt";
    p.server_cert = d + "/server.crt";
    p.server_key = d + "/server.key";
    p.client_cert = d + "/client.crt";
    p.client_key = d + "/client.key";
    p.other_ca = d + "/other-ca.crt";
    return p;
  }
};

inline std::string MakeTempDir() { return RegisterTempDir("kms-vault-test"); }

inline void WriteFile(const std::string& path, const std::string& content, mode_t mode = 0600) {
  std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << content;
  }
  chmod(tmp.c_str(), mode);
  rename(tmp.c_str(), path.c_str());
}

class VaultTestServer {
 public:
  struct Options {
    int listeners = 1;
    bool tls = true;
    bool client_ca = false;
    std::string namespaces;
    bool persistent = false;  // storage in a file, so Restart() finds it again
    static Options Persistent() {
      Options o;
      o.persistent = true;
      return o;
    }
    static Options Listeners(int n) {
      Options o;
      o.listeners = n;
      return o;
    }
    static Options ClientCa() {
      Options o;
      o.client_ca = true;
      return o;
    }
    static Options Namespaces(std::string ns) {
      Options o;
      o.namespaces = std::move(ns);
      return o;
    }
  };

  VaultTestServer() : VaultTestServer(Options{}) {}
  explicit VaultTestServer(Options options) : options_(options) {
    dir_ = MakeTempDir();
    Spawn(/*sealed=*/false);
  }

  ~VaultTestServer() { Stop(); }

  // SIGKILL, as a crashed or OOM-killed Vault: every connection is reset, the addresses refuse connections.
  void Kill() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
      pid_ = -1;
    }
    if (stdin_ >= 0) {
      close(stdin_);
      stdin_ = -1;
    }
  }
  // Starts the server again on the same ports (needs Options::persistent): same storage, every listener sealed as a
  // restarted Vault is until unsealed (Control({{"all", true}, {"sealed", false}})).
  void Restart() {
    if (!options_.persistent) {
      throw std::runtime_error("VaultTestServer::Restart needs Options::persistent");
    }
    Kill();
    Spawn(/*sealed=*/true);
  }

  void Stop() {
    if (stdin_ >= 0) {
      close(stdin_);
      stdin_ = -1;
    }
    if (pid_ > 0) {
      for (int i = 0; i < 40; ++i) {
        if (waitpid(pid_, nullptr, WNOHANG) == pid_) {
          pid_ = -1;
          return;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(25));
      }
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
      pid_ = -1;
    }
  }

  std::string Address(int listener = 0) const {
    return std::string(options_.tls ? "https" : "http") + "://127.0.0.1:" + std::to_string(ports_.at(listener));
  }
  int Port(int listener = 0) const { return ports_.at(listener); }

  // POSTs a control request; throws if the server refuses it.
  void Control(const nlohmann::json& request) {
    std::string reply;
    long status = Http("POST", "/control", request.dump(), &reply);
    if (status != 200) {
      throw std::runtime_error("control request failed: " + reply);
    }
  }
  nlohmann::json Stats() {
    std::string reply;
    Http("GET", "/stats", "", &reply);
    return nlohmann::json::parse(reply);
  }
  int Requests(int listener, const std::string& path) {
    auto j = Stats()["listeners"][listener]["requests"];
    return j.contains(path) ? j[path].get<int>() : 0;
  }
  int Connections(int listener) { return Stats()["listeners"][listener]["connections"].get<int>(); }

 private:
  void Spawn(bool sealed) {
    const TestPki& pki = TestPki::Get();
    const std::string ready = dir_ + "/ready.json";
    unlink(ready.c_str());
    std::vector<std::string> args = {"/usr/bin/python3", std::string(KMS_SOURCE_DIR) +
                                                             "/tests/vault_server/vault_test_server.py",
                                     "--ready-file", ready, "--listeners", std::to_string(options_.listeners),
                                     "--root-token", "root-setup-token"};
    if (options_.tls) {
      args.insert(args.end(), {"--tls-cert", pki.server_cert, "--tls-key", pki.server_key});
      if (options_.client_ca) {
        args.insert(args.end(), {"--client-ca", pki.ca});
      }
    }
    if (!options_.namespaces.empty()) {
      args.insert(args.end(), {"--namespaces", options_.namespaces});
    }
    if (options_.persistent) {
      args.insert(args.end(), {"--state-file", dir_ + "/state.json"});
    }
    if (!ports_.empty()) {
      std::string list;
      for (int port : ports_) {
        list += (list.empty() ? "" : ",") + std::to_string(port);
      }
      args.insert(args.end(), {"--ports", list});
    }
    if (sealed) {
      args.push_back("--sealed");
    }
    int fds[2];
    // Close-on-exec: a later child (the daemon, a CLI) must not hold the server's stdin open. dup2 onto the
    // server's stdin clears the flag there.
    if (pipe2(fds, O_CLOEXEC) != 0) {
      throw std::runtime_error("pipe");
    }
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, fds[0], 0);
    posix_spawn_file_actions_addclose(&actions, fds[1]);
    std::vector<char*> argv;
    for (auto& a : args) {
      argv.push_back(a.data());
    }
    argv.push_back(nullptr);
    if (posix_spawn(&pid_, argv[0], &actions, nullptr, argv.data(), environ) != 0) {
      throw std::runtime_error("cannot start the Vault test server");
    }
    posix_spawn_file_actions_destroy(&actions);
    close(fds[0]);
    stdin_ = fds[1];
    std::vector<int> ports;
    for (int i = 0; i < 200 && ports.empty(); ++i) {
      std::ifstream in(ready);
      if (in) {
        nlohmann::json j = nlohmann::json::parse(in);
        for (auto& p : j["api"]) {
          ports.push_back(p.get<int>());
        }
        control_port_ = j["control"].get<int>();
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    if (ports.empty()) {
      Stop();
      throw std::runtime_error("the Vault test server did not start");
    }
    ports_ = ports;
  }

  static size_t Collect(char* data, size_t size, size_t n, void* user) {
    static_cast<std::string*>(user)->append(data, size * n);
    return size * n;
  }
  long Http(const std::string& method, const std::string& path, const std::string& body, std::string* reply) {
    CURL* curl = curl_easy_init();
    std::string url = "http://127.0.0.1:" + std::to_string(control_port_) + path;
    curl_easy_setopt(curl, CURLOPT_URL, url.c_str());
    curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS, 5000L);
    curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, Collect);
    curl_easy_setopt(curl, CURLOPT_WRITEDATA, reply);
    if (method == "POST") {
      curl_easy_setopt(curl, CURLOPT_POSTFIELDS, body.c_str());
    }
    long status = 0;
    if (curl_easy_perform(curl) == CURLE_OK) {
      curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &status);
    }
    curl_easy_cleanup(curl);
    return status;
  }

  Options options_;
  std::string dir_;
  pid_t pid_ = -1;
  int stdin_ = -1;
  std::vector<int> ports_;
  int control_port_ = 0;
};

}  // namespace kmsplugin::testing
