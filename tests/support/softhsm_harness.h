#pragma once

// SoftHsmHarness: a private SoftHSM2 world per test. It creates a temporary directory with its own
// softhsm2.conf and token directory, points SOFTHSM2_CONF at it (process-wide: one harness at a time, and every
// key source using the module must be gone before the next harness starts), and initialises tokens with
// softhsm2-util. The directory is removed when the harness dies.

#include <string>

namespace kmsplugin::testing {

inline constexpr char kSoftHsmModule[] = "/usr/lib/softhsm/libsofthsm2.so";

class SoftHsmHarness {
 public:
  SoftHsmHarness();
  ~SoftHsmHarness();
  SoftHsmHarness(const SoftHsmHarness&) = delete;
  SoftHsmHarness& operator=(const SoftHsmHarness&) = delete;

  // softhsm2-util --init-token --free --label LABEL --pin PIN --so-pin SO_PIN. Returns the token's serial.
  std::string InitToken(const std::string& label, const std::string& pin, const std::string& so_pin = "5678");

  // Writes `contents` to <dir>/<name> with `mode`; returns the path.
  std::string WriteFile(const std::string& name, const std::string& contents, int mode = 0600);

  const std::string& dir() const { return dir_; }
  const std::string& token_dir() const { return token_dir_; }

  // Runs a shell command with SOFTHSM2_CONF set; returns its stdout. Aborts the test on a non-zero exit.
  std::string Run(const std::string& command);

 private:
  std::string dir_;
  std::string token_dir_;
  std::string conf_;
};

}  // namespace kmsplugin::testing
