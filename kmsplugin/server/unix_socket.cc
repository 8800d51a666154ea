#include "kmsplugin/server/unix_socket.h"

#include <grp.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "absl/strings/str_cat.h"

namespace kmsplugin::server {
namespace {

// True when a server accepts connections on `path`.
bool SomethingAnswers(const std::string& path) {
  const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    return false;
  }
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  std::strncpy(address.sun_path, path.c_str(), sizeof(address.sun_path) - 1);
  const bool answers = connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0;
  close(fd);
  return answers;
}

}  // namespace

absl::StatusOr<gid_t> LookupGroup(const std::string& group) {
  struct group entry {};
  struct group* found = nullptr;
  char buffer[4096];
  if (getgrnam_r(group.c_str(), &entry, buffer, sizeof(buffer), &found) != 0 || found == nullptr) {
    return absl::NotFoundError(absl::StrCat("socket group \"", group,
                                            "\" does not exist; fix: create it or correct socketGroup"));
  }
  return found->gr_gid;
}

absl::Status PrepareSocketPath(const std::string& path, const std::optional<std::string>& group) {
  const std::filesystem::path dir = std::filesystem::path(path).parent_path();
  std::error_code error;
  if (!std::filesystem::exists(dir, error)) {
    std::filesystem::create_directories(dir, error);
    if (error) {
      return absl::FailedPreconditionError(absl::StrCat("cannot create socket directory ", dir.string(), ": ",
                                                        error.message()));
    }
    if (group.has_value()) {
      auto gid = LookupGroup(*group);
      if (!gid.ok()) {
        return gid.status();
      }
      chmod(dir.c_str(), 0750);
      if (chown(dir.c_str(), static_cast<uid_t>(-1), *gid) != 0) {
        return absl::PermissionDeniedError(absl::StrCat("cannot give ", dir.string(), " to group ", *group, ": ",
                                                        std::strerror(errno)));
      }
    } else {
      chmod(dir.c_str(), 0700);
    }
  }
  struct stat info {};
  if (lstat(path.c_str(), &info) != 0) {
    if (errno == ENOENT) {
      return absl::OkStatus();
    }
    return absl::FailedPreconditionError(absl::StrCat("cannot inspect socket path ", path, ": ", std::strerror(errno)));
  }
  if (!S_ISSOCK(info.st_mode)) {
    return absl::FailedPreconditionError(absl::StrCat(path, " exists and is not a socket; fix: remove it or "
                                                      "choose another socket path"));
  }
  if (SomethingAnswers(path)) {
    return absl::AlreadyExistsError(absl::StrCat("another process is already serving on ", path,
                                                 "; fix: stop it, or give this environment another socket"));
  }
  if (unlink(path.c_str()) != 0 && errno != ENOENT) {
    return absl::FailedPreconditionError(absl::StrCat("cannot remove stale socket ", path, ": ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

absl::StatusOr<ino_t> SecureSocket(const std::string& path, const std::optional<std::string>& group) {
  mode_t mode = 0600;
  if (group.has_value()) {
    auto gid = LookupGroup(*group);
    if (!gid.ok()) {
      return gid.status();
    }
    if (chown(path.c_str(), static_cast<uid_t>(-1), *gid) != 0) {
      return absl::PermissionDeniedError(absl::StrCat("cannot give socket ", path, " to group ", *group, ": ",
                                                      std::strerror(errno)));
    }
    mode = 0660;
  }
  if (chmod(path.c_str(), mode) != 0) {
    return absl::FailedPreconditionError(absl::StrCat("cannot set the mode of socket ", path, ": ",
                                                      std::strerror(errno)));
  }
  struct stat info {};
  if (lstat(path.c_str(), &info) != 0) {
    return absl::FailedPreconditionError(absl::StrCat("socket ", path, " vanished after bind"));
  }
  return info.st_ino;
}

void RemoveSocket(const std::string& path, ino_t inode) {
  struct stat info {};
  if (lstat(path.c_str(), &info) == 0 && S_ISSOCK(info.st_mode) && info.st_ino == inode) {
    unlink(path.c_str());
  }
}

}  // namespace kmsplugin::server
