#include "kmsplugin/config/file_checks.h"

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

absl::Status CheckDirectoryOf(const std::string& path, std::string_view what) {
  char resolved[PATH_MAX];
  std::string dir;
  if (realpath(path.c_str(), resolved) != nullptr) {
    dir = resolved;
  } else {
    dir = path;
  }
  const size_t slash = dir.rfind('/');
  dir = slash == std::string::npos ? "." : slash == 0 ? "/" : dir.substr(0, slash);
  struct stat info {};
  if (stat(dir.c_str(), &info) != 0) {
    return absl::FailedPreconditionError(absl::StrCat("cannot read the directory ", dir, " of ", Sv(what), " ", path,
                                                      ": ", std::strerror(errno), "; fix: check the path"));
  }
  if (!TrustedOwner(info.st_uid)) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "the directory %s of %s %s is owned by %s, not by root or by the user kmsplugin runs as (%s): that user "
        "could replace the file; fix: %s",
        dir, Sv(what), path, UserName(info.st_uid), UserName(geteuid()), OwnerFix(dir, info.st_uid)));
  }
  if ((info.st_mode & (S_IWGRP | S_IWOTH)) != 0 && (info.st_mode & S_ISVTX) == 0) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "the directory %s of %s %s can be written by group or others (mode %04o), so they could replace the "
        "file; fix: chmod go-w %s",
        dir, Sv(what), path, info.st_mode & 07777, dir));
  }
  return absl::OkStatus();
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
