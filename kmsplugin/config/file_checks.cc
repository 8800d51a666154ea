#include "kmsplugin/config/file_checks.h"

#include <sys/stat.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kmsplugin/core/sv.h"

namespace kmsplugin::config {
namespace {

absl::Status Stat(const std::string& path, std::string_view what, struct stat& info) {
  if (stat(path.c_str(), &info) != 0) {
    const int error = errno;
    const std::string reason = std::strerror(error);
    if (error == ENOENT) {
      return absl::NotFoundError(absl::StrCat(Sv(what), " ", path, " does not exist; fix: create it (kmsplugin init) "
                                              "or correct the path in the config"));
    }
    return absl::FailedPreconditionError(
        absl::StrCat("cannot read ", Sv(what), " ", path, ": ", reason, "; fix: check the path and its permissions"));
  }
  if (!S_ISREG(info.st_mode)) {
    return absl::FailedPreconditionError(
        absl::StrCat(Sv(what), " ", path, " is not a regular file; fix: point the config at the file itself"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status CheckSecretFile(const std::string& path, std::string_view what) {
  struct stat info {};
  if (auto status = Stat(path, what, info); !status.ok()) {
    return status;
  }
  if ((info.st_mode & (S_IRWXG | S_IRWXO)) != 0) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "%s %s can be read or written by group or others (mode %04o); fix: chmod 600 %s", Sv(what), path,
        info.st_mode & 07777, path));
  }
  return absl::OkStatus();
}

absl::Status CheckFileNotWritableByOthers(const std::string& path, std::string_view what) {
  struct stat info {};
  if (auto status = Stat(path, what, info); !status.ok()) {
    return status;
  }
  if ((info.st_mode & (S_IWGRP | S_IWOTH)) != 0) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "%s %s can be written by group or others (mode %04o); fix: chmod go-w %s", Sv(what), path,
        info.st_mode & 07777, path));
  }
  return absl::OkStatus();
}

}  // namespace kmsplugin::config
