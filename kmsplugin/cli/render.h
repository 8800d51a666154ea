#pragma once

// `kmsplugin render`: what an operator deploys, derived from the current config so that nothing is copied by hand.
//
//   --kind encryption-config  (default) the EncryptionConfiguration for one environment (--env): KMS v2 first,
//                             then optional fallbacks while migrating (--v1-fallback, --identity-fallback).
//   --kind static-pod         a kube-system static pod for control-plane nodes: every socket directory, the config
//                             directory and every key-material directory the config names as hostPath mounts, the
//                             HTTP probes on the configured address, the grace period from the config.
//   --kind systemd-unit       the systemd service with the sandbox of deploy/systemd/kmsplugin.service, opened
//                             exactly for the directories the config names (and SupplementaryGroups= for socket
//                             groups).
// The hand-written files in deploy/ carry the explanations; a test keeps the rendered unit's directives equal to
// deploy/systemd/kmsplugin.service for the default layout.

#include <string>

#include "absl/status/statusor.h"
#include "kmsplugin/config/config.h"

namespace kmsplugin::cli {

struct RenderOptions {
  std::string config_path;  // as given on the command line; made absolute for ExecStart and the mounts
  std::string kind = "encryption-config";
  std::string environment;        // encryption-config only
  std::string provider_name;      // default kmsplugin-<env>
  std::string timeout = "3s";     // kube-apiserver's per-call timeout
  bool identity_fallback = false;
  bool v1_fallback = false;
  std::string image = "kmsplugin:" KMSPLUGIN_VERSION;
  std::string binary = "/usr/local/bin/kmsplugin";
  int uid = 65532;  // the static pod's user; the systemd unit uses User=kmsplugin
};

absl::StatusOr<std::string> RenderEncryptionConfig(const config::Config& config, const RenderOptions& options);
absl::StatusOr<std::string> RenderStaticPod(const config::Config& config, const RenderOptions& options);
absl::StatusOr<std::string> RenderSystemdUnit(const config::Config& config, const RenderOptions& options);

// Loads the config and prints the chosen kind on stdout; errors on stderr. Returns the exit code.
int RunRender(const RenderOptions& options, const config::KeySourceParsers& parsers);

}  // namespace kmsplugin::cli
