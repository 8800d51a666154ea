#include "kmsplugin/keysource/common/secret_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "kmsplugin/config/file_checks.h"
#include "kmsplugin/core/sv.h"

namespace kmsplugin::keysource {

FileStamp StampOf(const struct stat& info) {
  return FileStamp{info.st_dev,
                   info.st_ino,
                   info.st_size,
                   int64_t{info.st_mtim.tv_sec} * 1'000'000'000 + info.st_mtim.tv_nsec,
                   int64_t{info.st_ctim.tv_sec} * 1'000'000'000 + info.st_ctim.tv_nsec,
                   info.st_mode};
}

std::optional<FileStamp> StatStamp(const std::string& path) {
  struct stat info {};
  if (stat(path.c_str(), &info) != 0) {
    return std::nullopt;
  }
  return StampOf(info);
}

absl::StatusOr<SecretFile> ReadSecretFile(const std::string& path, std::string_view what,
                                          const SecretFileOptions& options) {
  // The same open and checks as every checked file (config/file_checks.h); only the read differs: into locked
  // memory, never into a std::string that could be copied or left in the heap.
  struct stat info {};
  auto opened = config::OpenCheckedFile(path, what, config::FileKind::kSecret, /*follow_links=*/true, &info);
  if (!opened.ok()) {
    return opened.status();
  }
  const int fd = *opened;
  // One byte more than allowed tells "too large" from "exactly at the limit".
  crypto::SecretBytes buffer(options.max_bytes + 1);
  size_t filled = 0;
  while (filled < buffer.size()) {
    const ssize_t n = read(fd, buffer.data() + filled, buffer.size() - filled);
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
    filled += static_cast<size_t>(n);
  }
  close(fd);
  if (filled > options.max_bytes) {
    return absl::FailedPreconditionError(absl::StrCat(Sv(what), " ", path, " is larger than ", options.max_bytes,
                                                      " bytes; fix: write only the credential into it"));
  }
  size_t begin = 0;
  size_t end = filled;
  const uint8_t* data = buffer.data();
  if (options.trim_newlines || options.trim_blanks) {
    while (end > begin && (data[end - 1] == '\n' || data[end - 1] == '\r' ||
                           (options.trim_blanks && (data[end - 1] == ' ' || data[end - 1] == '\t')))) {
      --end;
    }
  }
  if (options.trim_blanks) {
    while (begin < end && (data[begin] == ' ' || data[begin] == '\t' || data[begin] == '\n' || data[begin] == '\r')) {
      ++begin;
    }
  }
  if (end == begin && !options.allow_empty) {
    return absl::FailedPreconditionError(
        absl::StrCat(Sv(what), " ", path, " is empty; fix: write the credential into it"));
  }
  if (options.printable_only) {
    for (size_t i = begin; i < end; ++i) {
      if (data[i] < 0x20 || data[i] > 0x7e) {
        return absl::FailedPreconditionError(absl::StrCat(Sv(what), " ", path,
                                                          " holds non-printable characters; fix: write only the "
                                                          "credential, on one line"));
      }
    }
  }
  SecretFile out;
  out.bytes = crypto::SecretBytes::CopyOf(absl::Span<const uint8_t>(data + begin, end - begin));
  out.stamp = StampOf(info);
  return out;
}

}  // namespace kmsplugin::keysource
