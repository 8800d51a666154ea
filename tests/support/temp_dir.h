#pragma once

// TempDir: a private directory under /tmp (short paths: a Unix socket path holds at most 107 bytes), removed
// with everything in it when the object dies.

#include <stdlib.h>
#include <sys/stat.h>

#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>

namespace kmsplugin::testing {

class TempDir {
 public:
  TempDir() {
    char pattern[] = "/tmp/kp-XXXXXX";
    if (mkdtemp(pattern) == nullptr) {
      throw std::runtime_error("mkdtemp failed");
    }
    path_ = pattern;
  }
  ~TempDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::string& path() const { return path_; }
  std::string File(const std::string& name) const { return path_ + "/" + name; }

  // Writes `contents` to `name` with `mode`; returns the full path.
  std::string Write(const std::string& name, const std::string& contents, mode_t mode = 0600) const {
    const std::string file = File(name);
    std::ofstream(file, std::ios::binary | std::ios::trunc) << contents;
    chmod(file.c_str(), mode);
    return file;
  }

 private:
  std::string path_;
};

inline std::string ReadWholeFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

}  // namespace kmsplugin::testing
