#include "kmsplugin/keysource/common/atomic_file.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "crypto/secret_bytes.h"

namespace kmsplugin::keysource {
namespace {

absl::Status FsyncDirectory(const std::filesystem::path& dir) {
  const int fd = open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) {
    return absl::InternalError(absl::StrCat("cannot open directory ", dir.string(), " to fsync it: ",
                                            std::strerror(errno)));
  }
  const int rc = fsync(fd);
  const int error = errno;
  close(fd);
  if (rc != 0) {
    return absl::InternalError(absl::StrCat("fsync of directory ", dir.string(), " failed: ", std::strerror(error)));
  }
  return absl::OkStatus();
}

// Overwrites a regular file with zeros (it may hold key material) before it is unlinked.
void ZeroFile(const std::string& path) {
  const int fd = open(path.c_str(), O_WRONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) {
    return;
  }
  struct stat info {};
  if (fstat(fd, &info) == 0 && S_ISREG(info.st_mode)) {
    const char zeros[4096] = {};
    for (off_t done = 0; done < info.st_size;) {
      const ssize_t n = pwrite(fd, zeros, std::min<off_t>(sizeof(zeros), info.st_size - done), done);
      if (n <= 0) {
        break;
      }
      done += n;
    }
    fsync(fd);
  }
  close(fd);
}

}  // namespace

absl::Status WriteFileAtomically(const std::string& path, const std::string& bytes, bool exclusive,
                                 size_t max_bytes) {
  // The writer never produces what the reader refuses: a file past the read limit would lock every later command
  // and the daemon out, with no recovery but a backup.
  if (bytes.size() > max_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        path, " would grow to ", bytes.size(), " bytes, past the ", max_bytes,
        " bytes that are read back; nothing was written; fix: retire and destroy old versions, or start a new "
        "keyring for a new environment"));
  }
  const std::filesystem::path target(path);
  const std::filesystem::path dir = target.has_parent_path() ? target.parent_path() : ".";
  // mkstemp: a unique name created with O_EXCL and mode 0600, so a temp file a crashed writer left behind (even
  // one with our pid, as PID 1 in a container) never blocks a later write.
  std::string temp = absl::StrCat(path, ".tmp-XXXXXX");
  const int fd = mkstemp(temp.data());
  if (fd < 0) {
    return absl::FailedPreconditionError(absl::StrCat("cannot create a temporary file next to ", path, ": ",
                                                      std::strerror(errno), "; fix: check that ", dir.string(),
                                                      " exists and is writable"));
  }
  size_t written = 0;
  while (written < bytes.size()) {
    const ssize_t n = write(fd, bytes.data() + written, bytes.size() - written);
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n <= 0) {
      const int error = errno;
      close(fd);
      unlink(temp.c_str());
      return absl::ResourceExhaustedError(absl::StrCat("cannot write ", temp, ": ", std::strerror(error)));
    }
    written += static_cast<size_t>(n);
  }
  if (fsync(fd) != 0) {
    const int error = errno;
    close(fd);
    unlink(temp.c_str());
    return absl::InternalError(absl::StrCat("fsync of ", temp, " failed: ", std::strerror(error)));
  }
  close(fd);
  if (exclusive) {
    // link() fails if the target exists, so a racing init can never replace key material.
    if (link(temp.c_str(), path.c_str()) != 0) {
      const int error = errno;
      unlink(temp.c_str());
      if (error == EEXIST) {
        return absl::AlreadyExistsError(absl::StrCat(path, " already exists; it is never overwritten"));
      }
      return absl::FailedPreconditionError(absl::StrCat("cannot create ", path, ": ", std::strerror(error)));
    }
    unlink(temp.c_str());
  } else if (rename(temp.c_str(), path.c_str()) != 0) {
    const int error = errno;
    unlink(temp.c_str());
    return absl::FailedPreconditionError(absl::StrCat("cannot replace ", path, ": ", std::strerror(error)));
  }
  return FsyncDirectory(dir);
}

int RemoveStaleTemporaries(const std::string& path, absl::Duration min_age) {
  const std::filesystem::path target(path);
  const std::string dir = target.has_parent_path() ? target.parent_path().string() : ".";
  const std::string prefix = absl::StrCat(target.filename().string(), ".tmp-");
  DIR* listing = opendir(dir.c_str());
  if (listing == nullptr) {
    return 0;
  }
  int removed = 0;
  const absl::Time now = absl::Now();
  while (const dirent* entry = readdir(listing)) {
    const std::string name = entry->d_name;
    // mkstemp's suffix is exactly six characters.
    if (!absl::StartsWith(name, prefix) || name.size() != prefix.size() + 6) {
      continue;
    }
    const std::string file = absl::StrCat(dir, "/", name);
    struct stat info {};
    // Only our own regular files, and never one that is hard-linked elsewhere: an exclusive write links its
    // temporary file as the target before it unlinks it, and zeroing that would zero the key file itself.
    if (lstat(file.c_str(), &info) != 0 || !S_ISREG(info.st_mode) || info.st_uid != geteuid() ||
        info.st_nlink != 1) {
      continue;
    }
    if (now - absl::TimeFromTimespec(info.st_mtim) < min_age) {
      continue;  // a writer may still be working on it
    }
    ZeroFile(file);
    if (unlink(file.c_str()) == 0) {
      ++removed;
    }
  }
  closedir(listing);
  return removed;
}

}  // namespace kmsplugin::keysource
