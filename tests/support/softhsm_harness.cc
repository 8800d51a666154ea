#include "tests/support/softhsm_harness.h"

#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <fstream>
#include <regex>
#include <stdexcept>

namespace kmsplugin::testing {

SoftHsmHarness::SoftHsmHarness() {
  const char* tmp = getenv("TMPDIR");
  std::string pattern = std::string(tmp != nullptr ? tmp : "/tmp") + "/kms-softhsm-XXXXXX";
  if (mkdtemp(pattern.data()) == nullptr) {
    throw std::runtime_error("mkdtemp failed");
  }
  dir_ = pattern;
  token_dir_ = dir_ + "/tokens";
  mkdir(token_dir_.c_str(), 0700);
  conf_ = dir_ + "/softhsm2.conf";
  std::ofstream(conf_) << "directories.tokendir = " << token_dir_ << "\n"
                       << "objectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n"
                       << "slots.mechanisms = ALL\nlibrary.reset_on_fork = false\n";
  setenv("SOFTHSM2_CONF", conf_.c_str(), 1);
}

SoftHsmHarness::~SoftHsmHarness() {
  const std::string command = "rm -rf '" + dir_ + "'";
  if (system(command.c_str()) != 0) {
    // Nothing more to do in a destructor: the directory is in TMPDIR.
  }
}

std::string SoftHsmHarness::Run(const std::string& command) {
  const std::string full = "SOFTHSM2_CONF='" + conf_ + "' " + command + " 2>&1";
  FILE* pipe = popen(full.c_str(), "r");
  if (pipe == nullptr) {
    throw std::runtime_error("popen failed: " + command);
  }
  std::string out;
  char buffer[4096];
  size_t n;
  while ((n = fread(buffer, 1, sizeof(buffer), pipe)) > 0) {
    out.append(buffer, n);
  }
  const int status = pclose(pipe);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    throw std::runtime_error("command failed: " + command + "\n" + out);
  }
  return out;
}

std::string SoftHsmHarness::InitToken(const std::string& label, const std::string& pin, const std::string& so_pin) {
  Run("softhsm2-util --init-token --free --label '" + label + "' --pin '" + pin + "' --so-pin '" + so_pin + "'");
  const std::string slots = Run("softhsm2-util --show-slots");
  // Each initialised slot prints "Label: <label>" a few lines after its "Serial number: <serial>".
  const std::regex entry(R"(Serial number:\s*([0-9a-fA-F]+)[\s\S]*?Label:\s*([^\n]*?)\s*\n)");
  for (auto it = std::sregex_iterator(slots.begin(), slots.end(), entry); it != std::sregex_iterator(); ++it) {
    if ((*it)[2].str() == label) {
      return (*it)[1].str();
    }
  }
  throw std::runtime_error("no serial found for token " + label + " in:\n" + slots);
}

std::string SoftHsmHarness::WriteFile(const std::string& name, const std::string& contents, int mode) {
  const std::string path = dir_ + "/" + name;
  std::ofstream(path, std::ios::trunc) << contents;
  chmod(path.c_str(), mode);
  return path;
}

}  // namespace kmsplugin::testing
