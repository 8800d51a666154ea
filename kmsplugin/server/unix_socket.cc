#include "kmsplugin/server/unix_socket.h"

#include <fcntl.h>
#include <grp.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace kmsplugin::server {
namespace {

sockaddr_un AddressOf(const std::string& path) {
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  std::strncpy(address.sun_path, path.c_str(), sizeof(address.sun_path) - 1);
  return address;
}

// True when a server accepts connections on `path`.
bool SomethingAnswers(const std::string& path) {
  const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    return false;
  }
  sockaddr_un address = AddressOf(path);
  const bool answers = connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0;
  close(fd);
  return answers;
}

// The socket directory decides who can replace the socket: whoever may write there can put a link, or their own
// socket, in its place (kube-apiserver would then hand its DEKs to them). The same rule as config/file_checks.h
// has for directories of trusted files (owned by root or by us, not writable by group or others unless sticky);
// server/ does not link config/, and this is the one directory it applies to here.
// The socket's own directory: owned by root or us, and writable by nobody else, sticky or not. A sticky shared
// directory (/tmp) stops others deleting our socket, but not creating the path first while we are down (after a
// boot, between restarts, before a reload adds the environment): kube-apiserver would then talk to theirs.
// Every directory above it: owned by root or us, and not writable by others unless sticky (then nobody else can
// rename our directory away and put theirs in its place).
absl::Status CheckSocketDirectory(const std::filesystem::path& dir) {
  bool own_directory = true;
  for (std::filesystem::path at = dir; !at.empty(); at = at.parent_path()) {
    struct stat info {};
    if (stat(at.c_str(), &info) != 0) {
      return absl::FailedPreconditionError(
          absl::StrCat("cannot inspect socket directory ", at.string(), ": ", std::strerror(errno)));
    }
    if (!S_ISDIR(info.st_mode)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "socket directory ", at.string(), " is not a directory; fix: remove it or choose another socket path"));
    }
    const bool trusted_owner = info.st_uid == 0 || info.st_uid == geteuid();
    const bool group_or_others_write = (info.st_mode & (S_IWGRP | S_IWOTH)) != 0;
    const bool sticky = (info.st_mode & S_ISVTX) != 0;
    const bool writable_by_others = own_directory ? group_or_others_write : group_or_others_write && !sticky;
    if (!trusted_owner || writable_by_others) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "socket directory %s%s is owned by uid %d with mode %04o: %s could replace the socket with a link or "
          "with their own socket%s; fix: %s, or put the socket in a directory only root or uid %d can write (e.g. "
          "/run/kmsplugin, mode 0750)",
          at.string(), own_directory ? "" : absl::StrCat(" (above ", dir.string(), ")"), info.st_uid,
          info.st_mode & 07777, trusted_owner ? "group members or other users" : "its owner",
          own_directory && sticky ? " (a sticky directory stops them deleting it, not creating it first)" : "",
          trusted_owner ? absl::StrCat("chmod go-w ", at.string()) : absl::StrCat("chown ", geteuid(), " ", at.string()),
          geteuid()));
    }
    if (at == at.root_path()) {
      break;
    }
    own_directory = false;
  }
  return absl::OkStatus();
}

absl::Status Errno(const std::string& what, const std::string& path) {
  return absl::FailedPreconditionError(absl::StrCat(what, " ", path, ": ", std::strerror(errno)));
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
  if (auto status = CheckSocketDirectory(dir); !status.ok()) {
    return status;
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

absl::StatusOr<BoundSocket> BindSocket(const std::string& path, const std::optional<std::string>& group,
                                       int backlog) {
  std::optional<gid_t> gid;
  if (group.has_value()) {
    auto found = LookupGroup(*group);
    if (!found.ok()) {
      return found.status();
    }
    gid = *found;
  }
  if (path.size() >= sizeof(sockaddr_un::sun_path)) {
    return absl::InvalidArgumentError(absl::StrCat("socket path ", path, " is longer than ",
                                                   sizeof(sockaddr_un::sun_path) - 1, " bytes; fix: a shorter path"));
  }
  const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    return absl::UnavailableError(absl::StrCat("cannot create a socket for ", path, ": ", std::strerror(errno)));
  }
  // bind() creates the file with the socket inode's mode masked by umask: 0600 from the first instant, so the
  // file is never more open than intended, whatever the umask.
  sockaddr_un address = AddressOf(path);
  if (fchmod(fd, 0600) != 0 || bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0) {
    const absl::Status status = Errno("cannot bind socket", path);
    close(fd);
    return absl::Status(status.code(), absl::StrCat(status.message(), "; fix: check that its directory is writable"));
  }
  // Everything after bind works on the file opened without following links, never on the path again: a link
  // swapped in there (the directory check makes that hard; this makes it harmless) is refused, not chmodded.
  const int entry = open(path.c_str(), O_PATH | O_NOFOLLOW | O_CLOEXEC);
  struct stat info {};
  if (entry < 0 || fstat(entry, &info) != 0 || !S_ISSOCK(info.st_mode) || info.st_uid != geteuid()) {
    const int error = entry < 0 ? errno : 0;
    if (entry >= 0) {
      close(entry);
    }
    close(fd);
    return absl::FailedPreconditionError(absl::StrCat(
        "socket ", path, " was replaced right after bind (",
        error != 0 ? std::strerror(error) : "not our socket any more",
        "); nothing was changed on it; fix: make its directory writable only by the user kmsplugin runs as"));
  }
  if (gid.has_value()) {
    // chmod has no AT_EMPTY_PATH form for an O_PATH descriptor; /proc/self/fd/N names that very inode (it is
    // how glibc implements fchmodat(AT_SYMLINK_NOFOLLOW)), so no path lookup can land elsewhere.
    const std::string self = absl::StrCat("/proc/self/fd/", entry);
    if (fchownat(entry, "", static_cast<uid_t>(-1), *gid, AT_EMPTY_PATH) != 0 || chmod(self.c_str(), 0660) != 0) {
      const absl::Status status = absl::PermissionDeniedError(
          absl::StrCat("cannot give socket ", path, " to group ", *group, " with mode 0660: ", std::strerror(errno),
                       "; fix: run kmsplugin as a member of that group, with /proc mounted"));
      close(entry);
      RemoveSocket(path, info.st_ino);
      close(fd);
      return status;
    }
  }
  close(entry);
  if (listen(fd, backlog) != 0) {
    const absl::Status status = Errno("cannot listen on socket", path);
    RemoveSocket(path, info.st_ino);
    close(fd);
    return status;
  }
  return BoundSocket{fd, info.st_ino};
}

bool IsSocketFile(const std::string& path, ino_t inode) {
  struct stat info {};
  return lstat(path.c_str(), &info) == 0 && S_ISSOCK(info.st_mode) && info.st_ino == inode;
}

void RemoveSocket(const std::string& path, ino_t inode) {
  if (IsSocketFile(path, inode)) {
    unlink(path.c_str());
  }
}

}  // namespace kmsplugin::server
