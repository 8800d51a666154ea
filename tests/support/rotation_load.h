#pragma once

// RotationLoad: the load a key rotation must survive, as kube-apiserver produces it, against the plugin on one
// socket, from construction until Stop():
// - `writers` threads Encrypt then Decrypt a seed, keeping every ciphertext (written());
// - one thread calls Status, Encrypt, Status. Encrypt's key_id must lie between the two Status key_ids (equal to
//   them when they are equal), no key_id may move backwards, and healthz must stay "ok"; otherwise it counts a
//   disagreement.
// A failed call counts in failures(). The caller rotates meanwhile, then checks the counters after Stop().

#include <atomic>
#include <functional>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "tests/support/kms_client.h"

namespace kmsplugin::testing {

class RotationLoad {
 public:
  // The key version a key_id names; 0 when it is not one of the source's key_ids.
  using VersionOf = std::function<unsigned long(const std::string& key_id)>;

  RotationLoad(std::string socket, VersionOf version_of, int writers = 4)
      : socket_(std::move(socket)), version_of_(std::move(version_of)) {
    for (int w = 0; w < writers; ++w) {
      threads_.emplace_back([this] { Write(); });
    }
    threads_.emplace_back([this] { Agree(); });
  }
  ~RotationLoad() { Stop(); }
  RotationLoad(const RotationLoad&) = delete;
  RotationLoad& operator=(const RotationLoad&) = delete;

  void Stop() {
    stop_ = true;
    for (std::thread& thread : threads_) {
      if (thread.joinable()) {
        thread.join();
      }
    }
  }

  int failures() const { return failures_.load(); }
  int disagreements() const { return disagreements_.load(); }
  // Status/Encrypt/Status rounds completed.
  int rounds() const { return rounds_.load(); }
  // Every ciphertext the writers got; complete after Stop().
  const std::vector<v2::EncryptResponse>& written() const { return written_; }

  // After Stop(): decrypts every written ciphertext again; returns how many failed and adds their key_ids.
  int DecryptAllAgain(std::set<std::string>& key_ids) const {
    KmsClient client(socket_);
    int failed = 0;
    for (const v2::EncryptResponse& encrypted : written_) {
      key_ids.insert(encrypted.key_id());
      v2::DecryptResponse decrypted;
      failed += client.DecryptResponseOf(encrypted, decrypted).ok() ? 0 : 1;
    }
    return failed;
  }

 private:
  void Write() {
    const std::string seed(32, 'w');
    KmsClient client(socket_);
    while (!stop_.load()) {
      v2::EncryptResponse encrypted;
      if (!client.Encrypt(seed, encrypted).ok()) {
        ++failures_;
        continue;
      }
      v2::DecryptResponse decrypted;
      if (!client.DecryptResponseOf(encrypted, decrypted).ok() || decrypted.plaintext() != seed) {
        ++failures_;
      }
      std::lock_guard<std::mutex> lock(mu_);
      written_.push_back(std::move(encrypted));
    }
  }

  void Agree() {
    KmsClient client(socket_);
    unsigned long last = 0;
    while (!stop_.load()) {
      v2::StatusResponse s1, s2;
      v2::EncryptResponse e;
      if (!client.Status(s1).ok() || !client.Encrypt(std::string(32, 'a'), e).ok() || !client.Status(s2).ok()) {
        ++failures_;
        continue;
      }
      const unsigned long a = version_of_(s1.key_id()), b = version_of_(e.key_id()), c = version_of_(s2.key_id());
      if (a == 0 || a > b || b > c || (s1.key_id() == s2.key_id() && e.key_id() != s1.key_id()) || a < last ||
          s1.healthz() != "ok") {
        ++disagreements_;
      }
      last = c;
      ++rounds_;
    }
  }

  const std::string socket_;
  const VersionOf version_of_;
  std::atomic<bool> stop_{false};
  std::atomic<int> failures_{0};
  std::atomic<int> disagreements_{0};
  std::atomic<int> rounds_{0};
  std::mutex mu_;
  std::vector<v2::EncryptResponse> written_;
  std::vector<std::thread> threads_;
};

}  // namespace kmsplugin::testing
