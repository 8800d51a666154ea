#include "kmsplugin/config/file_checks.h"

#include <fcntl.h>
#include <pwd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kmsplugin/core/sv.h"

namespace kmsplugin::config {
namespace {

// getpwuid_r with a fixed buffer: enough for any passwd entry (only the name is used).
std::string NameOf(uid_t uid);

std::string UserName(uid_t uid) { return absl::StrCat(NameOf(uid), " (uid ", uid, ")"); }

bool TrustedOwner(uid_t owner) { return owner == 0 || owner == geteuid(); }

// The plain user name of `uid` (its number when it has none).
std::string NameOf(uid_t uid) {
  struct passwd entry {};
  struct passwd* found = nullptr;
  char buffer[4096];
  if (getpwuid_r(uid, &entry, buffer, sizeof(buffer), &found) == 0 && found != nullptr) {
    return found->pw_name;
  }
  return absl::StrCat(uid);
}

// The two ways out: run as the file's owner (the service user's files, read by a command run as root), or give the
// file to the user kmsplugin runs as.
std::string OwnerFix(const std::string& path, uid_t owner) {
  return absl::StrCat("run kmsplugin as that user (sudo runuser -u ", NameOf(owner), " -- kmsplugin ...), or chown ",
                      NameOf(geteuid()), " ", path);
}

absl::Status Stat(const std::string& path, std::string_view what, struct stat& info) {
  if (stat(path.c_str(), &info) != 0) {
    const int error = errno;
    const std::string reason = std::strerror(error);
    if (error == ENOENT) {
      return absl::NotFoundError(absl::StrCat(Sv(what), " ", path, " does not exist; fix: correct the path in the "
                                              "config, or restore the file from a backup"));
    }
    if (error == ELOOP) {
      return absl::FailedPreconditionError(absl::StrCat(Sv(what), " ", path, ": ", reason,
                                                        "; fix: point the config at the file itself, not at a link "
                                                        "loop"));
    }
    return absl::FailedPreconditionError(
        absl::StrCat("cannot read ", Sv(what), " ", path, ": ", reason, "; fix: check the path and its permissions"));
  }
  return absl::OkStatus();
}

absl::Status CheckRegularAndOwner(const struct stat& info, const std::string& path, std::string_view what) {
  if (!S_ISREG(info.st_mode)) {
    return absl::FailedPreconditionError(
        absl::StrCat(Sv(what), " ", path, " is not a regular file; fix: point the config at the file itself"));
  }
  if (!TrustedOwner(info.st_uid)) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "%s %s is owned by %s (mode %04o), not by root or by the user kmsplugin runs as (%s): that user could "
        "change it; fix: %s",
        Sv(what), path, UserName(info.st_uid), info.st_mode & 07777, UserName(geteuid()),
        OwnerFix(path, info.st_uid)));
  }
  return absl::OkStatus();
}

}  // namespace

namespace {

absl::Status UntrustedComponent(const std::string& component, const struct stat& info, const std::string& path,
                                std::string_view what, bool link) {
  if (!TrustedOwner(info.st_uid)) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "the %s %s on the way to %s %s is owned by %s, not by root or by the user kmsplugin runs as (%s): that "
        "user could replace the file; fix: %s",
        link ? "symbolic link" : "directory", component, Sv(what), path, UserName(info.st_uid),
        UserName(geteuid()), OwnerFix(component, info.st_uid)));
  }
  return absl::FailedPreconditionError(absl::StrFormat(
      "the directory %s on the way to %s %s can be written by group or others (mode %04o), so they could replace "
      "the file; fix: chmod go-w %s",
      component, Sv(what), path, info.st_mode & 07777, component));
}

// Each directory of `absolute` (a path starting with "/"), from the root down to the one holding the last
// component, checked with lstat: links are judged by their owner, not followed.
absl::Status CheckChain(const std::string& absolute, const std::string& path, std::string_view what) {
  size_t end = absolute.rfind('/');
  for (size_t slash = 0; slash != std::string::npos && slash <= end; slash = absolute.find('/', slash + 1)) {
    const std::string component = slash == 0 ? "/" : absolute.substr(0, slash);
    struct stat info {};
    if (lstat(component.c_str(), &info) != 0) {
      return absl::FailedPreconditionError(absl::StrCat("cannot read ", component, " on the way to ", Sv(what), " ",
                                                        path, ": ", std::strerror(errno), "; fix: check the path"));
    }
    if (S_ISLNK(info.st_mode)) {
      if (!TrustedOwner(info.st_uid)) {
        return UntrustedComponent(component, info, path, what, /*link=*/true);
      }
      continue;  // where it points is checked on the resolved path
    }
    if (!TrustedOwner(info.st_uid) ||
        ((info.st_mode & (S_IWGRP | S_IWOTH)) != 0 && (info.st_mode & S_ISVTX) == 0)) {
      return UntrustedComponent(component, info, path, what, /*link=*/false);
    }
    if (slash == end) {
      break;
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status CheckDirectoryOf(const std::string& path, std::string_view what) {
  std::string absolute = path;
  if (absolute.empty() || absolute[0] != '/') {
    char cwd[PATH_MAX];
    if (getcwd(cwd, sizeof(cwd)) == nullptr) {
      return absl::FailedPreconditionError(absl::StrCat("cannot resolve ", Sv(what), " ", path,
                                                        "; fix: use an absolute path"));
    }
    absolute = absl::StrCat(cwd, "/", path);
  }
  if (auto status = CheckChain(absolute, path, what); !status.ok()) {
    return status;
  }
  char resolved[PATH_MAX];
  if (realpath(absolute.c_str(), resolved) != nullptr && absolute != resolved) {
    return CheckChain(resolved, path, what);
  }
  return absl::OkStatus();
}

absl::StatusOr<int> OpenCheckedFile(const std::string& path, std::string_view what, FileKind kind,
                                    bool follow_links, struct stat* info) {
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK | (follow_links ? 0 : O_NOFOLLOW));
  if (fd < 0) {
    const int error = errno;
    if (error == ENOENT) {
      return absl::NotFoundError(absl::StrCat(Sv(what), " ", path, " does not exist; fix: correct the path in the "
                                              "config, or restore the file from a backup"));
    }
    if (error == ELOOP) {
      return absl::FailedPreconditionError(absl::StrCat(
          Sv(what), " ", path, " is a symbolic link; fix: point the config at the file itself (",
          follow_links ? "a link loop" : "links are not followed here", ")"));
    }
    return absl::FailedPreconditionError(absl::StrCat("cannot open ", Sv(what), " ", path, ": ",
                                                      std::strerror(error), "; fix: check the path and its owner"));
  }
  absl::Status checked = fstat(fd, info) != 0
                             ? absl::FailedPreconditionError(absl::StrCat("cannot stat ", Sv(what), " ", path))
                         : kind == FileKind::kSecret ? CheckSecretStat(*info, path, what)
                                                     : CheckTrustedStat(*info, path, what);
  if (!checked.ok()) {
    close(fd);
    return checked;
  }
  return fd;
}

absl::StatusOr<CheckedFile> ReadCheckedFile(const std::string& path, std::string_view what, FileKind kind,
                                            size_t max_bytes, bool follow_links) {
  CheckedFile out;
  auto opened = OpenCheckedFile(path, what, kind, follow_links, &out.info);
  if (!opened.ok()) {
    return opened.status();
  }
  const int fd = *opened;
  char buffer[8192];
  while (true) {
    const ssize_t n = read(fd, buffer, sizeof(buffer));
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n < 0) {
      const int error = errno;
      close(fd);
      return absl::FailedPreconditionError(absl::StrCat("cannot read ", Sv(what), " ", path, ": ",
                                                        std::strerror(error)));
    }
    if (n == 0) {
      break;
    }
    out.bytes.append(buffer, static_cast<size_t>(n));
    if (out.bytes.size() > max_bytes) {
      close(fd);
      return absl::FailedPreconditionError(absl::StrCat(Sv(what), " ", path, " is larger than ", max_bytes,
                                                        " bytes; it is not a ", Sv(what)));
    }
  }
  close(fd);
  return out;
}

absl::Status CheckSecretStat(const struct stat& info, const std::string& path, std::string_view what) {
  if (auto status = CheckRegularAndOwner(info, path, what); !status.ok()) {
    return status;
  }
  if ((info.st_mode & (S_IRWXG | S_IRWXO)) != 0) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "%s %s can be read or written by group or others (mode %04o); fix: chmod 600 %s", Sv(what), path,
        info.st_mode & 07777, path));
  }
  return CheckDirectoryOf(path, what);
}

absl::Status CheckSecretFile(const std::string& path, std::string_view what) {
  struct stat info {};
  if (auto status = Stat(path, what, info); !status.ok()) {
    return status;
  }
  return CheckSecretStat(info, path, what);
}

absl::Status CheckTrustedStat(const struct stat& info, const std::string& path, std::string_view what) {
  if (auto status = CheckRegularAndOwner(info, path, what); !status.ok()) {
    return status;
  }
  if ((info.st_mode & (S_IWGRP | S_IWOTH)) != 0) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "%s %s can be written by group or others (mode %04o); fix: chmod go-w %s", Sv(what), path,
        info.st_mode & 07777, path));
  }
  return CheckDirectoryOf(path, what);
}

absl::Status CheckTrustedFile(const std::string& path, std::string_view what) {
  struct stat info {};
  if (auto status = Stat(path, what, info); !status.ok()) {
    return status;
  }
  return CheckTrustedStat(info, path, what);
}

absl::Status CheckFileNotWritableByOthers(const std::string& path, std::string_view what) {
  return CheckTrustedFile(path, what);
}

}  // namespace kmsplugin::config
