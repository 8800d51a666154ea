#pragma once

// `kmsplugin doctor`: checks a kube-apiserver EncryptionConfiguration against the running plugin(s) and,
// optionally, against kmsplugin's own config; one row per check (kmsplugin/doctor/doctor.h lists them).
//
//   kmsplugin doctor --encryption-config FILE [--config kmsplugin.yaml] [--timeout 3s] [--json]
//
// Exit codes: 0 no check FAILs (WARNs allowed); 1 a check FAILs; 2 usage error, or FILE (or --config) cannot be
// read or parsed: one line on stderr naming the problem and the fix.

#include <memory>
#include <ostream>
#include <string>

#include <CLI/CLI.hpp>

#include "kmsplugin/config/config.h"
#include "kmsplugin/doctor/status_prober.h"

namespace kmsplugin::cli {

struct DoctorFlags {
  std::string encryption_config;   // required
  std::string config_path;         // optional: kmsplugin's config, for the kmsplugin.* checks
  std::string timeout = "3s";      // per Status call: a duration (3s, 500ms) or seconds
  bool json = false;
};

// Registers the flags above on `subcommand` (app.add_subcommand("doctor", ...)).
void AddDoctorFlags(CLI::App& subcommand, DoctorFlags& flags);

// Runs the checks; the table (or JSON) on `out`, usage and file errors on `err`. Returns the exit code.
int RunDoctor(const DoctorFlags& flags, const config::KeySourceParsers& parsers);
int RunDoctor(const DoctorFlags& flags, const config::KeySourceParsers& parsers, doctor::StatusProber& prober,
              std::ostream& out, std::ostream& err);

// KMS v2 Status over gRPC on a Unix socket (insecure channel, as kube-apiserver dials), failing fast when nothing
// listens so the error names the cause.
std::unique_ptr<doctor::StatusProber> NewGrpcStatusProber();

}  // namespace kmsplugin::cli
