"""Parses every YAML file under deploy/ and checks the structure of the manifests kmsplugin ships.

Usage: /usr/bin/python3 check_manifests.py SOURCE_DIR   (needs PyYAML: Debian python3-yaml)
Prints one line per problem, naming the file and the field, and exits 1 if there is any.
"""
import os
import re
import sys

import yaml

source_dir = sys.argv[1]
deploy = os.path.join(source_dir, "deploy")
problems = []


def problem(path, message):
    problems.append(f"{os.path.relpath(path, source_dir)}: {message}")


def seconds(value):
    """A Kubernetes/Go duration like 3s, 1m30s, 500ms -> seconds (float), or None."""
    if not isinstance(value, str):
        return None
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", value)
    if not parts or "".join(n + u for n, u in parts) != value:
        return None
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * scale[u] for n, u in parts)


# 1. Every YAML file under deploy/ parses.
documents = {}
for root, _, files in os.walk(deploy):
    for name in sorted(files):
        if not name.endswith((".yaml", ".yml")):
            continue
        path = os.path.join(root, name)
        try:
            with open(path) as stream:
                documents[path] = [d for d in yaml.safe_load_all(stream) if d is not None]
        except yaml.YAMLError as error:
            problem(path, f"does not parse: {error}")
print(f"parsed {len(documents)} YAML files under deploy/")


def require(path, condition, message):
    if not condition:
        problem(path, message)
    return condition


def one_document(rel, kind):
    path = os.path.join(deploy, rel)
    if not require(path, path in documents, "missing or unparseable"):
        return path, None
    docs = documents[path]
    if not require(path, len(docs) == 1 and isinstance(docs[0], dict), "expected exactly one YAML mapping"):
        return path, None
    require(path, docs[0].get("kind") == kind, f"kind must be {kind}, found {docs[0].get('kind')!r}")
    return path, docs[0]


# 2. The annotated config example: the sockets and grace period the manifests depend on.
config_path, config = os.path.join(deploy, "config.example.yaml"), None
if config_path in documents and documents[config_path]:
    config = documents[config_path][0]
env_sockets = {}
grace = 10.0
if config:
    for env in config.get("environments") or []:
        env_sockets[env.get("name")] = env.get("socket")
    grace = seconds((config.get("server") or {}).get("shutdownGracePeriod", "10s")) or 10.0
    require(config_path, env_sockets, "no environments")

# 3. Static pod.
path, pod = one_document("kubernetes/kmsplugin-static-pod.yaml", "Pod")
if pod:
    require(path, pod.get("apiVersion") == "v1", "apiVersion must be v1")
    require(path, (pod.get("metadata") or {}).get("namespace") == "kube-system", "metadata.namespace: kube-system")
    spec = pod.get("spec") or {}
    require(path, spec.get("priorityClassName") == "system-node-critical",
            "spec.priorityClassName must be system-node-critical")
    require(path, spec.get("hostNetwork") is True, "spec.hostNetwork must be true (probes on 127.0.0.1:9880)")
    tgps = spec.get("terminationGracePeriodSeconds")
    require(path, isinstance(tgps, int) and tgps > grace,
            f"spec.terminationGracePeriodSeconds ({tgps}) must exceed server.shutdownGracePeriod ({grace:g}s)")
    volumes = {v.get("name"): v for v in spec.get("volumes") or []}
    host_paths = {name: (v.get("hostPath") or {}) for name, v in volumes.items()}
    by_host = {hp.get("path"): (name, hp) for name, hp in host_paths.items()}
    for host_dir, wanted_type in (("/run/kmsplugin", "DirectoryOrCreate"), ("/etc/kmsplugin", None),
                                  ("/var/lib/kmsplugin", None)):
        if require(path, host_dir in by_host, f"no hostPath volume for {host_dir}") and wanted_type:
            require(path, by_host[host_dir][1].get("type") == wanted_type,
                    f"hostPath {host_dir} must have type {wanted_type}")
    pod_security = spec.get("securityContext") or {}
    containers = spec.get("containers") or []
    main = next((c for c in containers if c.get("name") == "kmsplugin"), None)
    if require(path, main is not None, "no container named kmsplugin"):
        args = main.get("args") or []
        require(path, args[:1] == ["serve"] and "--config" in args, "container args must be serve --config FILE")
        for probe, wanted in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            get = (main.get(probe) or {}).get("httpGet") or {}
            require(path, get.get("path") == wanted, f"{probe}.httpGet.path must be {wanted}")
            require(path, get.get("port") == 9880, f"{probe}.httpGet.port must be 9880")
            require(path, get.get("host") == "127.0.0.1", f"{probe}.httpGet.host must be 127.0.0.1")
        resources = main.get("resources") or {}
        require(path, (resources.get("requests") or {}).get("memory") and (resources.get("limits") or {}).get("memory"),
                "resources.requests.memory and resources.limits.memory are required")
        require(path, (resources.get("requests") or {}).get("cpu"), "resources.requests.cpu is required")
        sc = main.get("securityContext") or {}
        require(path, sc.get("readOnlyRootFilesystem") is True, "securityContext.readOnlyRootFilesystem: true")
        require(path, sc.get("allowPrivilegeEscalation") is False, "securityContext.allowPrivilegeEscalation: false")
        require(path, (sc.get("capabilities") or {}).get("drop") == ["ALL"], "capabilities.drop must be [ALL]")
        require(path, not (sc.get("capabilities") or {}).get("add"), "the plugin needs no capabilities")
        run_as = sc.get("runAsUser", pod_security.get("runAsUser"))
        non_root = sc.get("runAsNonRoot", pod_security.get("runAsNonRoot"))
        require(path, non_root is True and isinstance(run_as, int) and run_as > 0,
                "runAsNonRoot: true with a fixed non-zero runAsUser")
        mounts = {m.get("name"): m for m in main.get("volumeMounts") or []}
        for host_dir, read_only in (("/run/kmsplugin", False), ("/etc/kmsplugin", True), ("/var/lib/kmsplugin", False)):
            name = by_host.get(host_dir, (None,))[0]
            mount = mounts.get(name)
            if require(path, mount is not None, f"container does not mount the {host_dir} volume"):
                require(path, mount.get("mountPath") == host_dir, f"{host_dir} must be mounted at the same path")
                require(path, bool(mount.get("readOnly")) == read_only,
                        f"{host_dir} must be mounted {'read-only' if read_only else 'read-write'}")
    for env, socket in env_sockets.items():
        require(path, isinstance(socket, str) and socket.startswith("/run/kmsplugin/"),
                f"config.example.yaml environment {env}: socket {socket} is outside the shared /run/kmsplugin")

# 4. kubeadm ClusterConfiguration patch.
path, kubeadm = one_document("kubernetes/kubeadm-clusterconfiguration-patch.yaml", "ClusterConfiguration")
kubeadm_mounts = {}
if kubeadm:
    require(path, kubeadm.get("apiVersion") == "kubeadm.k8s.io/v1beta3", "apiVersion must be kubeadm.k8s.io/v1beta3")
    api = kubeadm.get("apiServer") or {}
    extra = api.get("extraArgs") or {}
    require(path, isinstance(extra, dict), "v1beta3 apiServer.extraArgs is a map of strings")
    config_file = extra.get("encryption-provider-config")
    require(path, isinstance(config_file, str) and config_file.startswith("/"),
            "apiServer.extraArgs.encryption-provider-config must be an absolute path")
    require(path, extra.get("encryption-provider-config-automatic-reload") == "true",
            'apiServer.extraArgs.encryption-provider-config-automatic-reload must be the string "true"')
    for volume in api.get("extraVolumes") or []:
        for field in ("name", "hostPath", "mountPath"):
            require(path, volume.get(field), f"extraVolumes entry {volume} lacks {field}")
        kubeadm_mounts[volume.get("mountPath")] = volume
    require(path, "/run/kmsplugin" in kubeadm_mounts, "no extraVolume mounts /run/kmsplugin into kube-apiserver")
    if "/run/kmsplugin" in kubeadm_mounts:
        require(path, kubeadm_mounts["/run/kmsplugin"].get("hostPath") == "/run/kmsplugin",
                "the socket volume must be hostPath /run/kmsplugin")
    if isinstance(config_file, str):
        holder = os.path.dirname(config_file)
        require(path, holder in kubeadm_mounts, f"no extraVolume mounts {holder} (holding {config_file})")
        require(path, holder == "/etc/kubernetes/enc", "the EncryptionConfiguration must live in /etc/kubernetes/enc")


# 5. EncryptionConfigurations.
def check_encryption_config(path, doc, index):
    where = f"document {index + 1}: "
    if not require(path, isinstance(doc, dict), where + "not a mapping"):
        return []
    require(path, doc.get("apiVersion") == "apiserver.config.k8s.io/v1", where + "apiVersion must be apiserver.config.k8s.io/v1")
    require(path, doc.get("kind") == "EncryptionConfiguration", where + "kind must be EncryptionConfiguration")
    names, kms_seen = [], []
    secrets_entries = 0
    for entry in doc.get("resources") or []:
        resources = entry.get("resources") or []
        providers = entry.get("providers") or []
        require(path, providers, where + f"resources {resources} has no providers")
        for position, provider in enumerate(providers):
            require(path, isinstance(provider, dict) and len(provider) == 1,
                    where + f"provider {position + 1} must have exactly one type")
            if "identity" in provider:
                require(path, position == len(providers) - 1 and position > 0,
                        where + "identity may only be the trailing read fallback, never the first (writing) provider")
            if "kms" in provider:
                kms = provider["kms"] or {}
                name = kms.get("name")
                names.append(name)
                kms_seen.append(kms)
                require(path, kms.get("apiVersion") == "v2", where + f"kms {name}: apiVersion must be v2")
                require(path, isinstance(name, str) and name and ":" not in name,
                        where + f"kms name {name!r} must be non-empty and contain no ':'")
                endpoint = kms.get("endpoint") or ""
                require(path, re.fullmatch(r"unix:///[^\s]+", endpoint) is not None,
                        where + f"kms {name}: endpoint {endpoint!r} must be unix:// and an absolute path")
                require(path, endpoint.startswith("unix:///run/kmsplugin/") and endpoint.endswith(".sock"),
                        where + f"kms {name}: endpoint must be unix:///run/kmsplugin/<env>.sock")
                timeout = seconds(kms.get("timeout"))
                require(path, timeout is not None and timeout > 0, where + f"kms {name}: timeout must be a positive duration")
                require(path, "cachesize" not in kms, where + f"kms {name}: cachesize is not supported in v2")
        if "secrets" in resources:
            secrets_entries += 1
            first = providers[0] if providers else {}
            require(path, "kms" in first and (first["kms"] or {}).get("apiVersion") == "v2",
                    where + "the first (writing) provider for secrets must be a kms v2 provider")
    require(path, secrets_entries == 1, where + "exactly one resources entry must cover secrets")
    require(path, len(names) == len(set(names)), where + f"kms provider names must be unique: {names}")
    return kms_seen


def providers_of(doc):
    for entry in doc.get("resources") or []:
        if "secrets" in (entry.get("resources") or []):
            return entry.get("providers") or []
    return []


enc_dir = os.path.join(deploy, "kubernetes", "encryption-config")
expected = ["new-cluster.yaml", "migrate-from-identity.yaml", "migrate-between-key-sources.yaml", "dev-test-prod.yaml"]
for name in expected:
    path = os.path.join(enc_dir, name)
    if not require(path, path in documents, "missing or unparseable"):
        continue
    docs = documents[path]
    kms_by_doc = [check_encryption_config(path, doc, i) for i, doc in enumerate(docs)]
    providers = providers_of(docs[0]) if docs and isinstance(docs[0], dict) else []
    if name == "new-cluster.yaml":
        require(path, len(docs) == 1, "one document")
        require(path, not any("identity" in p for p in providers), "a new cluster needs no identity fallback")
    elif name == "migrate-from-identity.yaml":
        require(path, len(docs) == 1, "one document")
        require(path, providers and providers[-1] == {"identity": {}}, "the last provider must be identity: {}")
    elif name == "migrate-between-key-sources.yaml":
        require(path, len(docs) == 1, "one document")
        kms = [p["kms"] for p in providers if "kms" in p]
        require(path, len(kms) >= 2, "needs the new kms provider first and the old one second")
        if len(kms) >= 2:
            require(path, kms[0]["endpoint"] != kms[1]["endpoint"], "new and old providers must use different sockets")
    elif name == "dev-test-prod.yaml":
        require(path, len(docs) == 3, "one document per cluster: dev, test, prod")
        endpoints = [k[0]["endpoint"] for k in kms_by_doc if k]
        names = [k[0]["name"] for k in kms_by_doc if k]
        require(path, len(set(endpoints)) == len(endpoints), "each cluster must point at its own socket")
        require(path, len(set(names)) == len(names), "each cluster's provider must have its own name")
        require(path, all(len(k) == 1 for k in kms_by_doc), "each cluster's file lists only its own kms provider")
        for endpoint in endpoints:
            socket = endpoint[len("unix://"):]
            require(path, socket in env_sockets.values(),
                    f"{endpoint} is not the socket of any environment in deploy/config.example.yaml")
    # Every socket kube-apiserver dials must be inside a directory the kubeadm patch mounts.
    for kms_list in kms_by_doc:
        for kms in kms_list:
            socket = (kms.get("endpoint") or "")[len("unix://"):]
            require(path, os.path.dirname(socket) in kubeadm_mounts,
                    f"kms {kms.get('name')}: {os.path.dirname(socket)} is not mounted into kube-apiserver by the kubeadm patch")
for path in documents:
    if os.path.dirname(path) == enc_dir and os.path.basename(path) not in expected:
        for i, doc in enumerate(documents[path]):
            check_encryption_config(path, doc, i)

for line in problems:
    print("FAIL:", line)
if problems:
    sys.exit(1)
print("OK: every YAML file under deploy/ parses and the manifests have the expected structure")
