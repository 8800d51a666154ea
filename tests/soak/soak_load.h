#pragma once

// The soak's load and its records (tests/soak/soak_test.cc):
// - Ledger: every finished call (environment, RPC, code, client-side start and end) and every ciphertext the plugin
//   issued with the plaintext it must decrypt to;
// - Timeline: the windows in which a fault was in force, by source and kind, to say which fault a failed call
//   met;
// - SoakLoad: per environment, `writers` threads making a seeded random mix of v2 and v1beta1 Encrypt and Decrypt
//   (Decrypt replays a ciphertext issued earlier and compares the plaintext) and one thread calling Status every
//   `status_period`. Each thread has its own channel (its own connection), as the closed-loop load generator in
//   bench/loadgen.cc does, and every call carries a deadline.

#include <atomic>
#include <chrono>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/time/clock.h"
#include "tests/support/kms_client.h"

namespace kmsplugin::testing::soak {

using Steady = std::chrono::steady_clock;
using std::chrono::milliseconds;

enum class Rpc { kEncrypt, kDecrypt, kStatus, kV1Encrypt, kV1Decrypt };
inline constexpr int kRpcs = 5;
inline const char* RpcName(Rpc rpc) {
  static const char* const kNames[kRpcs] = {"v2.Encrypt", "v2.Decrypt", "v2.Status", "v1beta1.Encrypt",
                                            "v1beta1.Decrypt"};
  return kNames[static_cast<int>(rpc)];
}

// grpc::StatusCode as its name.
inline const char* CodeName(int code) {
  static const char* const kNames[] = {
      "OK",        "CANCELLED",      "UNKNOWN",           "INVALID_ARGUMENT",   "DEADLINE_EXCEEDED",
      "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
      "ABORTED",   "OUT_OF_RANGE",   "UNIMPLEMENTED",     "INTERNAL",           "UNAVAILABLE",
      "DATA_LOSS", "UNAUTHENTICATED"};
  return code >= 0 && code <= 16 ? kNames[code] : "?";
}

// One finished call, timed on the client's monotonic clock.
struct Call {
  int env = 0;
  Rpc rpc = Rpc::kStatus;
  int code = 0;
  // DEADLINE_EXCEEDED raised by the client's own timer (gRPC's "Deadline Exceeded"), not answered by the plugin.
  bool cut_by_client = false;
  Steady::time_point start, end;
  milliseconds deadline{0};
  milliseconds Took() const { return std::chrono::duration_cast<milliseconds>(end - start); }
};

// A ciphertext the plugin issued and the plaintext it must give back.
struct Issued {
  int env = 0;
  bool v1 = false;
  std::string plaintext;
  std::string ciphertext;
  std::string key_id;  // v2
  std::map<std::string, std::string> annotations;
};

class Ledger {
 public:
  void AddCall(const Call& call) {
    std::lock_guard<std::mutex> lock(mu_);
    calls_.push_back(call);
  }
  void AddIssued(Issued issued) {
    std::lock_guard<std::mutex> lock(mu_);
    by_kind_[{issued.env, issued.v1}].push_back(issued_.size());
    issued_.push_back(std::move(issued));
  }
  // A random earlier ciphertext of `env` and API; false when there is none yet.
  bool Pick(int env, bool v1, std::mt19937_64& rng, Issued* out) {
    std::lock_guard<std::mutex> lock(mu_);
    const std::vector<size_t>& of_kind = by_kind_[{env, v1}];
    if (of_kind.empty()) {
      return false;
    }
    *out = issued_[of_kind[std::uniform_int_distribution<size_t>(0, of_kind.size() - 1)(rng)]];
    return true;
  }
  // A problem that fails the soak by itself (a wrong plaintext, an empty ciphertext).
  void AddAnomaly(std::string what) {
    std::lock_guard<std::mutex> lock(mu_);
    anomalies_.push_back(std::move(what));
  }

  std::vector<Call> calls() const {
    std::lock_guard<std::mutex> lock(mu_);
    return calls_;
  }
  std::vector<Issued> issued() const {
    std::lock_guard<std::mutex> lock(mu_);
    return issued_;
  }
  std::vector<std::string> anomalies() const {
    std::lock_guard<std::mutex> lock(mu_);
    return anomalies_;
  }

 private:
  mutable std::mutex mu_;
  std::vector<Call> calls_;
  std::vector<Issued> issued_;
  std::map<std::pair<int, bool>, std::vector<size_t>> by_kind_;
  std::vector<std::string> anomalies_;
};

// When each fault was in force.
class Timeline {
 public:
  struct Window {
    std::string source;  // "vault", "pkcs11", "ops"
    std::string kind;
    Steady::time_point start, end;
    bool open = true;
  };

  size_t Begin(const std::string& source, const std::string& kind) {
    std::lock_guard<std::mutex> lock(mu_);
    windows_.push_back({source, kind, Steady::now(), Steady::time_point::max(), true});
    return windows_.size() - 1;
  }
  void End(size_t window) {
    std::lock_guard<std::mutex> lock(mu_);
    windows_[window].end = Steady::now();
    windows_[window].open = false;
  }
  // The kind of the latest `source` fault that overlapped [from, to] or ended less than `grace` before `from`;
  // "" when none did.
  std::string During(const std::string& source, Steady::time_point from, Steady::time_point to,
                     milliseconds grace) const {
    std::lock_guard<std::mutex> lock(mu_);
    const Window* found = nullptr;
    for (const Window& w : windows_) {
      const Steady::time_point until = w.open ? Steady::time_point::max() : w.end + grace;
      if (w.source == source && w.start <= to && from <= until && (found == nullptr || w.start > found->start)) {
        found = &w;
      }
    }
    return found == nullptr ? "" : found->kind;
  }
  // Every fault or operation in force during [from, to], as "source: kind; ...".
  std::string InForce(Steady::time_point from, Steady::time_point to) const {
    std::lock_guard<std::mutex> lock(mu_);
    std::string out;
    for (const Window& w : windows_) {
      if (w.start <= to && from <= w.end) {
        out += (out.empty() ? "" : "; ") + w.source + ": " + w.kind;
      }
    }
    return out.empty() ? "nothing" : out;
  }
  std::vector<Window> windows() const {
    std::lock_guard<std::mutex> lock(mu_);
    return windows_;
  }

 private:
  mutable std::mutex mu_;
  std::vector<Window> windows_;
};

struct LoadOptions {
  int writers = 3;                     // Encrypt/Decrypt threads per environment
  milliseconds crypt_deadline{2250};   // per Encrypt/Decrypt call
  milliseconds status_deadline{1000};  // per Status call
  milliseconds status_period{50};      // one Status call per environment this often
  milliseconds max_pause{20};          // a writer waits up to this long (uniform) between two calls
};

class SoakLoad {
 public:
  SoakLoad(std::vector<std::string> sockets, LoadOptions options, uint64_t seed, Ledger& ledger)
      : sockets_(std::move(sockets)), options_(options), ledger_(ledger) {
    std::mt19937_64 seeds(seed);
    for (int env = 0; env < static_cast<int>(sockets_.size()); ++env) {
      for (int w = 0; w < options_.writers; ++w) {
        threads_.emplace_back([this, env, s = seeds()] { Write(env, s); });
      }
      threads_.emplace_back([this, env] { PollStatus(env); });
    }
  }
  ~SoakLoad() { Stop(); }
  SoakLoad(const SoakLoad&) = delete;
  SoakLoad& operator=(const SoakLoad&) = delete;

  // While paused, no call is made (the daemon goes idle); calls already in flight finish.
  void Pause(bool paused) { paused_ = paused; }
  void Stop() {
    stop_ = true;
    for (std::thread& thread : threads_) {
      if (thread.joinable()) {
        thread.join();
      }
    }
  }
  // Distinct Status key_ids per environment, in the order first seen; a key_id seen again after another one
  // (a flip-flop: README, key_id "never moves backwards") is an anomaly in the ledger.
  std::vector<std::string> KeyIds(int env) const {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = key_ids_.find(env);
    return it == key_ids_.end() ? std::vector<std::string>() : it->second;
  }
  // Status answers whose healthz was not "ok", per environment.
  long Unhealthy(int env) const {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = unhealthy_.find(env);
    return it == unhealthy_.end() ? 0 : it->second;
  }

 private:
  void Record(int env, Rpc rpc, const grpc::Status& status, Steady::time_point start, milliseconds deadline) {
    Call call;
    call.env = env;
    call.rpc = rpc;
    call.code = status.error_code();
    call.cut_by_client =
        status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED && status.error_message() == "Deadline Exceeded";
    call.start = start;
    call.end = Steady::now();
    call.deadline = deadline;
    ledger_.AddCall(call);
  }

  void Write(int env, uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<double> dice(0.0, 1.0);
    std::uniform_int_distribution<int> byte(0, 255);
    std::uniform_int_distribution<int> pause(0, static_cast<int>(options_.max_pause.count()));
    KmsClient client(sockets_[env]);
    const milliseconds deadline = options_.crypt_deadline;
    while (!stop_.load()) {
      if (paused_.load()) {
        absl::SleepFor(absl::Milliseconds(20));
        continue;
      }
      const double roll = dice(rng);
      const bool v1 = roll >= 0.75;
      Issued earlier;
      const bool decrypt = (roll >= 0.40 && roll < 0.75) || roll >= 0.87;
      if (decrypt && ledger_.Pick(env, v1, rng, &earlier)) {
        const Steady::time_point start = Steady::now();
        grpc::Status status;
        std::string plaintext;
        if (v1) {
          v1beta1::DecryptResponse response;
          status = client.V1Decrypt(earlier.ciphertext, response, "v1beta1", deadline);
          plaintext = response.plain();
        } else {
          v2::DecryptResponse response;
          status = client.Decrypt(earlier.ciphertext, earlier.key_id, earlier.annotations, response, deadline);
          plaintext = response.plaintext();
        }
        Record(env, v1 ? Rpc::kV1Decrypt : Rpc::kDecrypt, status, start, deadline);
        if (status.ok() && plaintext != earlier.plaintext) {
          ledger_.AddAnomaly(std::string(v1 ? "v1beta1" : "v2") + " Decrypt on " + sockets_[env] +
                             " returned another plaintext than the one encrypted");
        }
      } else {
        Issued issued;
        issued.env = env;
        issued.v1 = v1;
        issued.plaintext.resize(32);
        for (char& c : issued.plaintext) {
          c = static_cast<char>(byte(rng));
        }
        const Steady::time_point start = Steady::now();
        grpc::Status status;
        if (v1) {
          v1beta1::EncryptResponse response;
          status = client.V1Encrypt(issued.plaintext, response, "v1beta1", deadline);
          issued.ciphertext = response.cipher();
        } else {
          v2::EncryptResponse response;
          status = client.Encrypt(issued.plaintext, response, deadline);
          issued.ciphertext = response.ciphertext();
          issued.key_id = response.key_id();
          issued.annotations.insert(response.annotations().begin(), response.annotations().end());
        }
        Record(env, v1 ? Rpc::kV1Encrypt : Rpc::kEncrypt, status, start, deadline);
        if (status.ok()) {
          if (issued.ciphertext.empty() || (!v1 && issued.key_id.empty())) {
            ledger_.AddAnomaly("Encrypt on " + sockets_[env] + " succeeded with an empty ciphertext or key_id");
          } else {
            ledger_.AddIssued(std::move(issued));
          }
        }
      }
      absl::SleepFor(absl::Milliseconds(pause(rng)));
    }
  }

  void PollStatus(int env) {
    KmsClient client(sockets_[env]);
    std::set<std::string> seen;
    std::string last;
    while (!stop_.load()) {
      if (!paused_.load()) {
        const Steady::time_point start = Steady::now();
        v2::StatusResponse response;
        const grpc::Status status = client.Status(response, options_.status_deadline);
        Record(env, Rpc::kStatus, status, start, options_.status_deadline);
        if (status.ok()) {
          std::lock_guard<std::mutex> lock(mu_);
          if (response.healthz() != "ok") {
            ++unhealthy_[env];
          }
          if (response.key_id() != last) {
            if (seen.count(response.key_id()) > 0) {
              ledger_.AddAnomaly("Status on " + sockets_[env] + " went back to key_id " + response.key_id() +
                                 " after " + last);
            }
            seen.insert(response.key_id());
            key_ids_[env].push_back(response.key_id());
            last = response.key_id();
          }
        }
      }
      std::this_thread::sleep_for(options_.status_period);
    }
  }

  const std::vector<std::string> sockets_;
  const LoadOptions options_;
  Ledger& ledger_;
  std::atomic<bool> stop_{false};
  std::atomic<bool> paused_{false};
  mutable std::mutex mu_;
  std::map<int, std::vector<std::string>> key_ids_;
  std::map<int, long> unhealthy_;
  std::vector<std::thread> threads_;
};

}  // namespace kmsplugin::testing::soak
