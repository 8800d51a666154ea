#pragma once

// Daemon scenarios every key source must pass, written once; tests/integration/*_serve_test.cc run them against
// their own setup (a SoftHSM token, the Vault-API test server) and add what is particular to their backend.
// Each takes the socket of a serving environment and the source's way of reading a version out of a key_id.

#include <signal.h>

#include <atomic>
#include <functional>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "absl/time/clock.h"
#include "tests/support/daemon.h"
#include "tests/support/kms_client.h"
#include "tests/support/rotation_load.h"

namespace kmsplugin::testing {

using VersionOfFn = std::function<unsigned long(const std::string&)>;

inline bool ScenarioHas(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

// Both APIs round-trip, under the key_id Status reports; a tampered ciphertext of either API is INVALID_ARGUMENT
// (the backend's authentication refuses it, nothing retries or crashes); Status stays healthy after.
inline void ScenarioRoundTripBothApis(const std::string& socket) {
  const v2::StatusResponse status = DaemonDriver::Status(socket);
  CHECK(status.healthz() == "ok");
  KmsClient client(socket);
  v2::EncryptResponse encrypted;
  REQUIRE(client.Encrypt(std::string(32, 'p'), encrypted).ok());
  CHECK(encrypted.key_id() == status.key_id());
  v2::DecryptResponse decrypted;
  REQUIRE(client.DecryptResponseOf(encrypted, decrypted).ok());
  CHECK(decrypted.plaintext() == std::string(32, 'p'));
  v1beta1::EncryptResponse v1_encrypted;
  REQUIRE(client.V1Encrypt(std::string(48, 'q'), v1_encrypted).ok());
  v1beta1::DecryptResponse v1_decrypted;
  REQUIRE(client.V1Decrypt(v1_encrypted.cipher(), v1_decrypted).ok());
  CHECK(v1_decrypted.plain() == std::string(48, 'q'));
  std::string tampered = encrypted.ciphertext();
  tampered[tampered.size() - 1] ^= 0x01;
  std::map<std::string, std::string> annotations(encrypted.annotations().begin(), encrypted.annotations().end());
  CHECK(client.Decrypt(tampered, encrypted.key_id(), annotations, decrypted).error_code() ==
        grpc::StatusCode::INVALID_ARGUMENT);
  std::string v1_tampered = v1_encrypted.cipher();
  v1_tampered[v1_tampered.size() / 2] ^= 0x20;
  CHECK(client.V1Decrypt(v1_tampered, v1_decrypted).error_code() == grpc::StatusCode::INVALID_ARGUMENT);
  CHECK(DaemonDriver::Status(socket).healthz() == "ok");
}

// `kmsplugin rotate`, then SIGHUP: Status moves to version 2 at once (not before: the poll interval is long),
// Encrypt follows, ciphertexts of both APIs made before keep decrypting, the old key_id with a new ciphertext is a
// mismatch, and `keys` lists both versions, table and JSON. Returns the new key_id.
inline std::string ScenarioRotateThenHup(const DaemonDriver& d, Subprocess& server, const std::string& env,
                                         const std::string& socket, const VersionOfFn& version_of) {
  const std::string before = DaemonDriver::Status(socket).key_id();
  KmsClient client(socket);
  v2::EncryptResponse old_ciphertext;
  REQUIRE(client.Encrypt(std::string(32, 'o'), old_ciphertext).ok());
  v1beta1::EncryptResponse old_v1;
  REQUIRE(client.V1Encrypt(std::string(32, 'O'), old_v1).ok());
  const RunResult rotate = d.Rotate(env);
  INFO(rotate.out << rotate.err);
  REQUIRE(rotate.exit_code == 0);
  CHECK(DaemonDriver::Status(socket).key_id() == before);  // a poll interval of an hour: nothing yet
  const std::string after = DaemonDriver::KeyIdAfterHup(server, socket, before);
  CHECK(after != before);
  CHECK(version_of(after) == 2);
  CHECK(ScenarioHas(rotate.out, after));
  v2::EncryptResponse fresh;
  REQUIRE(client.Encrypt(std::string(32, 'n'), fresh).ok());
  CHECK(fresh.key_id() == after);
  v2::DecryptResponse decrypted;
  REQUIRE(client.DecryptResponseOf(old_ciphertext, decrypted).ok());
  CHECK(decrypted.plaintext() == std::string(32, 'o'));
  v1beta1::DecryptResponse v1_decrypted;
  REQUIRE(client.V1Decrypt(old_v1.cipher(), v1_decrypted).ok());
  CHECK(v1_decrypted.plain() == std::string(32, 'O'));
  std::map<std::string, std::string> annotations(fresh.annotations().begin(), fresh.annotations().end());
  CHECK(client.Decrypt(fresh.ciphertext(), before, annotations, decrypted).error_code() ==
        grpc::StatusCode::INVALID_ARGUMENT);
  const RunResult table = d.Cli({"keys", "--config", d.config, "--env", env});
  CHECK(table.exit_code == 0);
  CHECK(ScenarioHas(table.out, before));
  CHECK(ScenarioHas(table.out, after));
  const RunResult json = d.Cli({"keys", "--config", d.config, "--env", env, "--json"});
  REQUIRE(json.exit_code == 0);
  const auto doc = nlohmann::json::parse(json.out);
  REQUIRE(doc["versions"].size() == 2);
  CHECK(doc["versions"][0]["keyId"] == before);
  CHECK(doc["versions"][0]["state"] == "active");
  CHECK(doc["versions"][1]["keyId"] == after);
  CHECK(doc["versions"][1]["state"] == "current");
  CHECK(server.Running());
  return after;
}

// Three rotations (each followed by SIGHUP) under Encrypt/Decrypt load: Status and Encrypt never disagree, no call
// fails, the daemon ends on version 4, and every ciphertext made during the run decrypts again.
inline void ScenarioRotationUnderLoad(const DaemonDriver& d, Subprocess& server, const std::string& env,
                                      const std::string& socket, const VersionOfFn& version_of, int writers,
                                      absl::Duration pause, int min_rounds) {
  RotationLoad load(socket, version_of, writers);
  for (int r = 0; r < 3; ++r) {
    absl::SleepFor(pause);
    const RunResult rotate = d.Rotate(env);
    INFO(rotate.err);
    CHECK(rotate.exit_code == 0);
    server.Signal(SIGHUP);
  }
  absl::SleepFor(absl::Milliseconds(400));
  load.Stop();
  CHECK(load.failures() == 0);
  CHECK(load.disagreements() == 0);
  CHECK(load.rounds() > min_rounds);
  CHECK(version_of(DaemonDriver::Status(socket).key_id()) == 4);
  std::set<std::string> key_ids;
  CHECK(load.DecryptAllAgain(key_ids) == 0);
  CHECK(key_ids.size() >= 3);
}

// `streams` clients, each on its own channel (its own HTTP/2 connection), `rounds` Encrypt+Decrypt each: no call
// fails (none refused for capacity), every plaintext comes back; the errors seen are in the INFO on failure.
inline void ScenarioConcurrentStreams(const std::string& socket, int streams, int rounds) {
  std::atomic<int> failures{0}, calls{0};
  std::mutex mu;
  std::map<std::string, int> errors;
  std::vector<std::thread> threads;
  for (int t = 0; t < streams; ++t) {
    threads.emplace_back([&, t] {
      KmsClient client(socket);
      const std::string plaintext(32, static_cast<char>('A' + t % 26));
      for (int i = 0; i < rounds; ++i) {
        v2::EncryptResponse encrypted;
        v2::DecryptResponse decrypted;
        grpc::Status status = client.Encrypt(plaintext, encrypted);
        if (status.ok()) {
          status = client.DecryptResponseOf(encrypted, decrypted);
        }
        if (!status.ok() || decrypted.plaintext() != plaintext) {
          ++failures;
          std::lock_guard<std::mutex> lock(mu);
          ++errors[std::to_string(status.error_code()) + " " + status.error_message()];
        }
        calls += 2;
      }
    });
  }
  for (std::thread& thread : threads) {
    thread.join();
  }
  std::string seen;
  for (const auto& [error, n] : errors) {
    seen += std::to_string(n) + "x " + error + "\n";
  }
  INFO(seen);
  CHECK(failures.load() == 0);
  CHECK(calls.load() == streams * rounds * 2);
  CHECK(DaemonDriver::Status(socket).healthz() == "ok");
}

}  // namespace kmsplugin::testing
