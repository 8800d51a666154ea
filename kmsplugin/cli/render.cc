#include "kmsplugin/cli/render.h"

#include <algorithm>
#include <filesystem>
#include <iostream>
#include <map>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kmsplugin/cli/cli_common.h"
#include "kmsplugin/keysource/registry.h"
#include "kmsplugin/server/unix_socket.h"

namespace kmsplugin::cli {
namespace {

constexpr char kRunDirectory[] = "/run/kmsplugin";
constexpr char kStateDirectory[] = "/var/lib/kmsplugin";
constexpr char kConfigDirectory[] = "/etc/kmsplugin";

// A YAML (and JSON) double-quoted scalar: safe for any path or name.
std::string Quote(const std::string& text) { return nlohmann::json(text).dump(); }

// A POSIX shell single-quoted word.
std::string ShellQuote(const std::string& text) {
  std::string out = "'";
  for (char c : text) {
    out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  }
  return out + "'";
}

std::string Parent(const std::string& path) { return std::filesystem::path(path).parent_path().string(); }

bool IsUnder(const std::string& path, const std::string& dir) {
  return path == dir || absl::StartsWith(path, dir == "/" ? dir : dir + "/");
}

// One host directory the plugin needs, and what for.
struct HostDirectory {
  std::string path;
  bool writable = false;
  std::string role;  // "config", "sockets", "keys"
};

// Every directory the config names: the config file's, each socket's (written), and each key source file's
// (written where the source writes, e.g. the local keyring). A directory inside another one that is mounted
// at least as writable is covered by it and left out.
absl::StatusOr<std::vector<HostDirectory>> HostDirectories(const config::Config& config,
                                                           const std::string& config_file) {
  std::map<std::string, HostDirectory> by_path;
  auto add = [&](const std::string& file, bool writable, const std::string& role,
                 const std::string& what) -> absl::Status {
    if (!std::filesystem::path(file).is_absolute()) {
      return absl::InvalidArgumentError(absl::StrCat(what, " \"", file, "\" is a relative path; fix: write an "
                                                     "absolute path in the config (mounts need one)"));
    }
    const std::string dir = Parent(std::filesystem::path(file).lexically_normal().string());
    auto [it, inserted] = by_path.try_emplace(dir, HostDirectory{dir, writable, role});
    it->second.writable = it->second.writable || writable;
    if (!inserted && role == "sockets") {
      it->second.role = role;
    }
    return absl::OkStatus();
  };
  if (auto status = add(config_file, false, "config", "config file"); !status.ok()) {
    return status;
  }
  for (const config::EnvironmentConfig& env : config.environments) {
    if (auto status = add(env.socket, true, "sockets", absl::StrCat("environment ", env.name, " socket"));
        !status.ok()) {
      return status;
    }
    for (const config::HostPath& file : env.key_source->HostPaths()) {
      if (auto status = add(file.path, file.writable, "keys", absl::StrCat("environment ", env.name, " key file"));
          !status.ok()) {
        return status;
      }
    }
  }
  std::vector<HostDirectory> kept;
  for (const auto& [path, dir] : by_path) {
    const bool covered = std::any_of(by_path.begin(), by_path.end(), [&](const auto& other) {
      return other.first != path && IsUnder(path, other.first) && (other.second.writable || !dir.writable);
    });
    if (!covered) {
      kept.push_back(dir);
    }
  }
  return kept;
}

// The numeric ids of the configured socket groups, resolved on this machine (render on the node).
absl::StatusOr<std::vector<gid_t>> SocketGroupIds(const config::Config& config) {
  std::set<gid_t> ids;
  for (const config::EnvironmentConfig& env : config.environments) {
    if (!env.socket_group.has_value()) {
      continue;
    }
    auto gid = server::LookupGroup(*env.socket_group);
    if (!gid.ok()) {
      return absl::NotFoundError(absl::StrCat("environment ", env.name, ": ", gid.status().message(),
                                              " on this machine; render on the control-plane node"));
    }
    ids.insert(*gid);
  }
  return std::vector<gid_t>(ids.begin(), ids.end());
}

std::vector<std::string> SocketGroupNames(const config::Config& config) {
  std::set<std::string> names;
  for (const config::EnvironmentConfig& env : config.environments) {
    if (env.socket_group.has_value()) {
      names.insert(*env.socket_group);
    }
  }
  return {names.begin(), names.end()};
}

struct ProbeAddress {
  std::string host;
  int port = 0;
};

// Where the HTTP probes reach /healthz and /readyz; nullopt when they cannot (HTTP off, or port 0).
std::optional<ProbeAddress> ProbeTarget(const config::HttpConfig& http) {
  if (!http.enabled) {
    return std::nullopt;
  }
  const size_t colon = http.listen.rfind(':');
  ProbeAddress target;
  target.host = http.listen.substr(0, colon);
  if (!target.host.empty() && target.host.front() == '[') {
    target.host = target.host.substr(1, target.host.size() - 2);
  }
  if (target.host.empty() || target.host == "0.0.0.0" || target.host == "::") {
    target.host = "127.0.0.1";
  }
  target.port = std::atoi(http.listen.c_str() + colon + 1);
  if (target.port == 0) {
    return std::nullopt;
  }
  return target;
}

std::string AbsoluteConfigPath(const RenderOptions& options) {
  return std::filesystem::absolute(options.config_path).lexically_normal().string();
}

}  // namespace

absl::StatusOr<std::string> RenderEncryptionConfig(const config::Config& config, const RenderOptions& options) {
  auto env = config.Find(options.environment);
  if (!env.ok()) {
    return env.status();
  }
  const std::string name =
      options.provider_name.empty() ? absl::StrCat("kmsplugin-", (*env)->name) : options.provider_name;
  if (name.find(':') != std::string::npos) {
    return absl::InvalidArgumentError("--provider-name must not contain ':' (it is part of the etcd prefix)");
  }
  std::ostringstream out;
  out << "# kube-apiserver --encryption-provider-config=<this file>\n"
      << "apiVersion: apiserver.config.k8s.io/v1\n"
      << "kind: EncryptionConfiguration\n"
      << "resources:\n"
      << "  - resources:\n"
      << "      - secrets\n"
      << "    providers:\n"
      << "      - kms:\n"
      << "          apiVersion: v2\n"
      << "          name: " << name << "\n"
      << "          endpoint: unix://" << (*env)->socket << "\n"
      << "          timeout: " << options.timeout << "\n";
  if (options.v1_fallback) {
    // The same socket serves v1beta1 too, so Secrets an older KMS v1 provider of this plugin wrote stay readable.
    out << "      # reads Secrets written through KMS v1; remove once `kmsplugin audit` reports no kms-v1 objects.\n"
        << "      # kube-apiserver 1.29+ loads a kms v1 provider only when started with --feature-gates=KMSv1=true.\n"
        << "      - kms:\n"
        << "          apiVersion: v1\n"
        << "          name: " << name << "-v1\n"
        << "          endpoint: unix://" << (*env)->socket << "\n"
        << "          timeout: " << options.timeout << "\n";
  }
  if (options.identity_fallback) {
    out << "      - identity: {}  # reads Secrets written before encryption; remove after rewriting them\n";
  }
  return out.str();
}

absl::StatusOr<std::string> RenderStaticPod(const config::Config& config, const RenderOptions& options) {
  const std::string config_file = AbsoluteConfigPath(options);
  auto dirs = HostDirectories(config, config_file);
  if (!dirs.ok()) {
    return dirs.status();
  }
  auto gids = SocketGroupIds(config);
  if (!gids.ok()) {
    return gids.status();
  }
  const std::string uid = absl::StrCat(options.uid);
  std::vector<std::string> owned, socket_dirs, key_dirs;
  for (const HostDirectory& dir : *dirs) {
    if (dir.writable) {
      owned.push_back(ShellQuote(dir.path));
      (dir.role == "sockets" ? socket_dirs : key_dirs).push_back(ShellQuote(dir.path));
    }
  }
  // Sockets: 0750, or 0751 with a socket group (a non-root kube-apiserver passes through; the socket's own 0660
  // guards it). Key directories: 0700.
  std::string prepare = absl::StrCat("chown ", uid, ":", uid, " ", absl::StrJoin(owned, " "));
  if (!socket_dirs.empty()) {
    absl::StrAppend(&prepare, " && chmod ", gids->empty() ? "0750 " : "0751 ", absl::StrJoin(socket_dirs, " "));
  }
  if (!key_dirs.empty()) {
    absl::StrAppend(&prepare, " && chmod 0700 ", absl::StrJoin(key_dirs, " "));
  }
  const int64_t grace = absl::ToInt64Seconds(absl::Ceil(config.server.shutdown_grace_period, absl::Seconds(1))) + 20;

  std::ostringstream out;
  out << "# Rendered by `kmsplugin render --kind static-pod --config " << config_file << "` (kmsplugin "
      << KMSPLUGIN_VERSION << ").\n"
      << "# Copy to /etc/kubernetes/manifests/kmsplugin.yaml on every control-plane node. Why each setting is there:\n"
      << "# deploy/kubernetes/kmsplugin-static-pod.yaml. Files under the mounted key directories must be owned by uid\n"
      << "# " << uid << " and mode 0600.\n"
      << "apiVersion: v1\nkind: Pod\nmetadata:\n  name: kmsplugin\n  namespace: kube-system\n  labels:\n"
      << "    app.kubernetes.io/name: kmsplugin\n    app.kubernetes.io/component: kms-plugin\n"
      << "    tier: control-plane\n"
      << "spec:\n  priorityClassName: system-node-critical\n  hostNetwork: true\n  dnsPolicy: Default\n"
      << "  # server.shutdownGracePeriod (" << absl::FormatDuration(config.server.shutdown_grace_period)
      << ") plus time to start draining\n"
      << "  terminationGracePeriodSeconds: " << grace << "\n"
      << "  automountServiceAccountToken: false\n  enableServiceLinks: false\n"
      << "  securityContext:\n    runAsNonRoot: true\n    runAsUser: " << uid << "\n    runAsGroup: " << uid << "\n";
  if (!gids->empty()) {
    out << "    # socketGroup " << absl::StrJoin(SocketGroupNames(config), ", ")
        << ": the plugin chowns each socket to it, so it must be a member\n"
        << "    supplementalGroups: [" << absl::StrJoin(*gids, ", ") << "]\n";
  }
  out << "    seccompProfile:\n      type: RuntimeDefault\n";
  if (!owned.empty()) {
    out << "  initContainers:\n"
        << "    # hostPath DirectoryOrCreate makes root-owned directories; hand the ones the plugin writes to it.\n"
        << "    - name: prepare-directories\n"
        << "      image: " << options.image << "\n      imagePullPolicy: IfNotPresent\n"
        << "      command: [\"/bin/sh\", \"-c\", " << Quote(prepare) << "]\n"
        << "      securityContext:\n        runAsNonRoot: false\n        runAsUser: 0\n        runAsGroup: 0\n"
        << "        readOnlyRootFilesystem: true\n        allowPrivilegeEscalation: false\n"
        << "        capabilities:\n          drop: [\"ALL\"]\n          add: [\"CHOWN\", \"FOWNER\"]\n"
        << "      resources:\n        requests: {cpu: 10m, memory: 16Mi}\n        limits: {memory: 32Mi}\n"
        << "      volumeMounts:\n";
    for (size_t i = 0; i < dirs->size(); ++i) {
      if ((*dirs)[i].writable) {
        out << "        - {name: host-" << i << ", mountPath: " << Quote((*dirs)[i].path) << "}\n";
      }
    }
  }
  out << "  containers:\n    - name: kmsplugin\n      image: " << options.image
      << "\n      imagePullPolicy: IfNotPresent\n"
      << "      args: [\"serve\", \"--config\", " << Quote(config_file) << "]\n";
  if (auto target = ProbeTarget(config.http); target.has_value()) {
    const std::string http = absl::StrCat("{host: ", target->host, ", port: ", target->port);
    out << "      # /healthz: alive. /readyz: every backend passed a recent wrap+unwrap probe (never restart on it).\n"
        << "      livenessProbe:\n        httpGet: " << http << ", path: /healthz, scheme: HTTP}\n"
        << "        initialDelaySeconds: 5\n        periodSeconds: 10\n        timeoutSeconds: 3\n"
        << "        failureThreshold: 3\n"
        << "      readinessProbe:\n        httpGet: " << http << ", path: /readyz, scheme: HTTP}\n"
        << "        initialDelaySeconds: 2\n        periodSeconds: 10\n        timeoutSeconds: 3\n"
        << "        failureThreshold: 1\n";
  } else {
    // Without a fixed HTTP port only Status over the socket can tell readiness; liveness would then restart the
    // plugin when a backend is down, which never helps, so there is none.
    out << "      # http is off (or on port 0) in the config: readiness asks Status on the first socket instead\n"
        << "      readinessProbe:\n        exec:\n          command: [" << Quote(options.binary)
        << ", \"status\", \"--socket\", " << Quote(config.environments.front().socket) << "]\n"
        << "        initialDelaySeconds: 2\n        periodSeconds: 10\n        timeoutSeconds: 5\n"
        << "        failureThreshold: 1\n";
  }
  out << "      resources:\n        requests: {cpu: 10m, memory: 32Mi}\n        limits: {memory: 128Mi}\n"
      << "      securityContext:\n        readOnlyRootFilesystem: true\n        allowPrivilegeEscalation: false\n"
      << "        privileged: false\n        capabilities:\n          drop: [\"ALL\"]\n"
      << "        runAsNonRoot: true\n        runAsUser: " << uid << "\n        runAsGroup: " << uid << "\n"
      << "      volumeMounts:\n";
  for (size_t i = 0; i < dirs->size(); ++i) {
    const HostDirectory& dir = (*dirs)[i];
    out << "        - {name: host-" << i << ", mountPath: " << Quote(dir.path)
        << (dir.writable ? "" : ", readOnly: true") << "}  # " << dir.role << "\n";
  }
  out << "  volumes:\n";
  for (size_t i = 0; i < dirs->size(); ++i) {
    const HostDirectory& dir = (*dirs)[i];
    out << "    - name: host-" << i << "\n      hostPath: {path: " << Quote(dir.path)
        << ", type: " << (dir.writable ? "DirectoryOrCreate" : "Directory") << "}\n";
  }
  return out.str();
}

absl::StatusOr<std::string> RenderSystemdUnit(const config::Config& config, const RenderOptions& options) {
  const std::string config_file = AbsoluteConfigPath(options);
  auto dirs = HostDirectories(config, config_file);
  if (!dirs.ok()) {
    return dirs.status();
  }
  const std::vector<std::string> groups = SocketGroupNames(config);
  bool run_directory = false, state_directory = false, under_home = false;
  std::vector<std::string> read_write;
  for (const HostDirectory& dir : *dirs) {
    under_home = under_home || IsUnder(dir.path, "/home") || IsUnder(dir.path, "/root");
    if (!dir.writable) {
      continue;  // ProtectSystem=strict leaves everything else readable
    }
    if (dir.path == kRunDirectory) {
      run_directory = true;
    } else if (IsUnder(dir.path, kStateDirectory)) {
      state_directory = true;
      if (dir.path != kStateDirectory) {
        read_write.push_back(dir.path);
      }
    } else {
      read_write.push_back(dir.path);
    }
  }
  std::ostringstream out;
  out << "# Rendered by `kmsplugin render --kind systemd-unit --config " << config_file << "` (kmsplugin "
      << KMSPLUGIN_VERSION << ").\n"
      << "# Install as /etc/systemd/system/kmsplugin.service; why each setting is there: "
         "deploy/systemd/kmsplugin.service.\n"
      << "[Unit]\nDescription=kmsplugin: Kubernetes KMS v2 plugin (envelope encryption of Secrets)\n"
      << "Documentation=file:///usr/local/share/doc/kmsplugin/RUNBOOK.md\n"
      << "Wants=network-online.target\nAfter=network-online.target\nBefore=kubelet.service\n\n"
      << "[Service]\nType=notify\nNotifyAccess=main\nWatchdogSec=60s\n"
      << "ExecStart=" << options.binary << " serve --config " << config_file << "\n"
      << "ExecReload=/bin/kill -HUP $MAINPID\nKillSignal=SIGTERM\n"
      << "TimeoutStopSec="
      << absl::ToInt64Seconds(absl::Ceil(config.server.shutdown_grace_period, absl::Seconds(1))) + 20 << "s\n"
      << "Restart=on-failure\nRestartSec=2s\n\nUser=kmsplugin\nGroup=kmsplugin\n";
  if (!groups.empty()) {
    out << "# socketGroup: the plugin chowns each socket to it, so it must be a member\n"
        << "SupplementaryGroups=" << absl::StrJoin(groups, " ") << "\n";
  }
  if (run_directory) {
    out << "RuntimeDirectory=kmsplugin\nRuntimeDirectoryMode=" << (groups.empty() ? "0750" : "0751") << "\n"
        << "RuntimeDirectoryPreserve=yes\n";
  }
  if (state_directory) {
    out << "StateDirectory=kmsplugin\nStateDirectoryMode=0700\n";
  }
  if (IsUnder(config_file, kConfigDirectory)) {
    out << "ConfigurationDirectory=kmsplugin\nConfigurationDirectoryMode=0755\n";
  }
  for (const std::string& dir : read_write) {
    out << "ReadWritePaths=" << dir << "\n";
  }
  // LimitNOFILE: the plugin raises its soft limit to this at start (daemon.cc RaiseFileLimit; issue 11).
  out << "UMask=0077\n\nLimitCORE=0\nLimitMEMLOCK=64M\nLimitNOFILE=65536\n\n"
      << "NoNewPrivileges=yes\nCapabilityBoundingSet=\nAmbientCapabilities=\nProtectSystem=strict\n"
      << "ProtectHome=" << (under_home ? "read-only" : "yes") << "\n"
      << "PrivateTmp=yes\nPrivateDevices=yes\nDevicePolicy=closed\nProtectKernelTunables=yes\n"
      << "ProtectKernelModules=yes\nProtectKernelLogs=yes\nProtectControlGroups=yes\nProtectClock=yes\n"
      << "ProtectHostname=yes\nProtectProc=invisible\nProcSubset=pid\n";
  if (groups.empty()) {
    out << "PrivateUsers=yes\n";
  } else {
    out << "# PrivateUsers= is off: it would map the socket group to nobody\n";
  }
  out << "PrivateMounts=yes\nRemoveIPC=yes\nKeyringMode=private\n"
      << "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6\nRestrictNamespaces=yes\nRestrictRealtime=yes\n"
      << "RestrictSUIDSGID=yes\nLockPersonality=yes\nMemoryDenyWriteExecute=yes\nSystemCallArchitectures=native\n"
      << "SystemCallFilter=@system-service\nSystemCallFilter=~@privileged @resources\nSystemCallErrorNumber=EPERM\n";
  for (const config::EnvironmentConfig& env : config.environments) {
    const keysource::KeySourceKindInfo* kind = keysource::FindKeySourceKind(env.key_source->Kind());
    if (kind != nullptr && !kind->systemd_note.empty()) {
      out << "# environment " << env.name << " " << kind->systemd_note << "\n";
    }
  }
  out << "\n[Install]\nWantedBy=multi-user.target\n";
  return out.str();
}

int RunRender(const RenderOptions& options, const config::KeySourceParsers& parsers) {
  auto config = config::LoadConfig(options.config_path, parsers);
  if (!config.ok()) {
    return FailConfig(config.status());
  }
  // What is valid but will fail the layout being rendered (e.g. Kubernetes auth in a static pod) is said first.
  for (const config::EnvironmentConfig& env : config->environments) {
    for (const std::string& warning : env.key_source->Warnings()) {
      std::cerr << "kmsplugin: warning: environment \"" << env.name << "\": " << warning << "\n";
    }
  }
  absl::StatusOr<std::string> text;
  if (options.kind == "encryption-config") {
    text = options.environment.empty() ? absl::InvalidArgumentError("--kind encryption-config needs --env NAME")
                                       : RenderEncryptionConfig(*config, options);
  } else if (options.kind == "static-pod") {
    text = RenderStaticPod(*config, options);
  } else if (options.kind == "systemd-unit") {
    text = RenderSystemdUnit(*config, options);
  } else {
    text = absl::InvalidArgumentError(
        absl::StrCat("--kind \"", options.kind, "\" is not one of encryption-config, static-pod, systemd-unit"));
  }
  if (!text.ok()) {
    return Fail(text.status());
  }
  std::cout << *text;
  return 0;
}

}  // namespace kmsplugin::cli
