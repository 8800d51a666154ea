#include "kmsplugin/cli/doctor.h"

#include <sys/stat.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>

#include <grpcpp/create_channel.h>
#include <grpcpp/grpcpp.h>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "kms_v2.grpc.pb.h"
#include "kmsplugin/core/duration_flag.h"
#include "kmsplugin/doctor/doctor.h"
#include "kmsplugin/doctor/encryption_config.h"
#include "kmsplugin/doctor/report.h"

namespace kmsplugin::cli {
namespace {

constexpr int kUsageExit = 2;

class GrpcStatusProber : public doctor::StatusProber {
 public:
  absl::StatusOr<doctor::StatusReply> Status(const std::string& socket_path, absl::Duration timeout) override {
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    auto channel = grpc::CreateCustomChannel(absl::StrCat("unix:", socket_path), grpc::InsecureChannelCredentials(),
                                             args);
    auto stub = v2::KeyManagementService::NewStub(channel);
    grpc::ClientContext context;
    // Not wait-for-ready (kube-apiserver's choice): a missing socket or refused connection fails at once with
    // its cause, which is what the operator needs to read.
    context.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
    v2::StatusResponse response;
    const absl::Time start = absl::Now();
    const grpc::Status status = stub->Status(&context, v2::StatusRequest(), &response);
    const absl::Duration latency = absl::Now() - start;
    if (!status.ok()) {
      // gRPC and absl share the canonical code numbering.
      return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
    }
    return doctor::StatusReply{response.version(), response.healthz(), response.key_id(), latency};
  }
};

int UsageError(std::ostream& err, const std::string& text) {
  err << "kmsplugin doctor: " << text << "\n";
  return kUsageExit;
}

}  // namespace

void AddDoctorFlags(CLI::App& subcommand, DoctorFlags& flags) {
  subcommand.add_option("--encryption-config", flags.encryption_config,
                        "the kube-apiserver EncryptionConfiguration (--encryption-provider-config) to check");
  subcommand.add_option("--config", flags.config_path,
                        "kmsplugin's config: also check that every kms endpoint is one of its environments");
  subcommand.add_option("--timeout", flags.timeout, "deadline of each Status call (3s, 500ms, or seconds)")
      ->capture_default_str();
  subcommand.add_flag("--json", flags.json, "machine-readable output");
}

std::unique_ptr<doctor::StatusProber> NewGrpcStatusProber() { return std::make_unique<GrpcStatusProber>(); }

int RunDoctor(const DoctorFlags& flags, const config::KeySourceParsers& parsers) {
  auto prober = NewGrpcStatusProber();
  return RunDoctor(flags, parsers, *prober, std::cout, std::cerr);
}

int RunDoctor(const DoctorFlags& flags, const config::KeySourceParsers& parsers, doctor::StatusProber& prober,
              std::ostream& out, std::ostream& err) {
  if (flags.encryption_config.empty()) {
    return UsageError(err, "--encryption-config FILE is required; fix: pass the file kube-apiserver's "
                           "--encryption-provider-config names, e.g. /etc/kubernetes/enc/encryption-config.yaml");
  }
  const std::optional<absl::Duration> timeout = core::ParseDurationFlag(flags.timeout);
  if (!timeout.has_value() || *timeout <= absl::ZeroDuration()) {
    return UsageError(err, core::DurationFlagError("--timeout", flags.timeout));
  }
  const std::string& path = flags.encryption_config;
  struct stat info {};
  if (stat(path.c_str(), &info) != 0) {
    return UsageError(err, absl::StrCat(path, ": cannot read: ", std::strerror(errno),
                                        "; fix: pass the file kube-apiserver's --encryption-provider-config names "
                                        "(run doctor where that file is, as a user who can read it)"));
  }
  if (!S_ISREG(info.st_mode)) {
    return UsageError(err, absl::StrCat(path, ": is not a regular file; fix: pass the EncryptionConfiguration file"));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in.is_open()) {
    return UsageError(err, absl::StrCat(path, ": cannot open: ", std::strerror(errno),
                                        "; fix: run doctor as a user who can read the file (e.g. with sudo)"));
  }
  std::stringstream text;
  text << in.rdbuf();
  if (in.bad()) {
    return UsageError(err, absl::StrCat(path, ": cannot read: ", std::strerror(errno),
                                        "; fix: check the file and the disk it is on"));
  }
  auto file = doctor::ParseEncryptionConfig(text.str(), path);
  if (!file.ok()) {
    return UsageError(err, std::string(file.status().message()));
  }
  std::optional<config::Config> plugin_config;
  if (!flags.config_path.empty()) {
    auto loaded = config::LoadConfig(flags.config_path, parsers);
    if (!loaded.ok()) {
      return UsageError(err, std::string(loaded.status().message()));
    }
    plugin_config = std::move(*loaded);
  }
  doctor::DoctorOptions options;
  options.file_mode = info.st_mode;
  options.probe_timeout = *timeout;
  options.plugin_config = plugin_config.has_value() ? &*plugin_config : nullptr;
  const std::vector<doctor::CheckResult> results = doctor::RunChecks(*file, options, prober);
  if (flags.json) {
    out << doctor::ResultsJson(results).dump(2) << "\n";
  } else {
    out << "encryption config: " << path << "\n" << doctor::RenderTable(results);
  }
  return doctor::ExitCodeFor(results);
}

}  // namespace kmsplugin::cli
