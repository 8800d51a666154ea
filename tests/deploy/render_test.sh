#!/usr/bin/env bash
# `kmsplugin render --kind static-pod|systemd-unit` from real configs:
# - for the documented layout (deploy/config.example.yaml: sockets in /run/kmsplugin, keyrings in /var/lib/kmsplugin,
#   keys in /etc/kmsplugin) the rendered unit has exactly the directives of deploy/systemd/kmsplugin.service, apart
#   from ExecStart's config path, and passes `systemd-analyze verify`;
# - for a layout outside those directories, with a socket group and HTTP off, the unit opens exactly those
#   directories and the static pod mounts them (writable only where the plugin writes), with supplementalGroups and
#   a Status exec probe; a relative key path is refused naming it.
set -euo pipefail
source_dir=${1:?usage: render_test.sh SOURCE_DIR BINARY}
binary=${2:?usage: render_test.sh SOURCE_DIR BINARY}
[[ -x $binary ]] || { echo "FAIL: $binary not built"; exit 1; }
/usr/bin/python3 -c 'import yaml' 2>/dev/null || { echo "SKIP: python3-yaml not installed"; exit 77; }
command -v systemd-analyze >/dev/null || { echo "SKIP: systemd-analyze not installed"; exit 77; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

# Directives of a unit file: non-comment "Key=value" lines, sorted, one per line.
directives() { grep -E '^[A-Za-z]+=' "$1" | sort; }

# 1. The documented layout renders the shipped unit.
install -m 0600 "$source_dir/deploy/config.example.yaml" "$work/config.yaml"
"$binary" render --config "$work/config.yaml" --kind systemd-unit >"$work/rendered.service" \
  || fail "render --kind systemd-unit exited non-zero"
grep -qxF "ExecStart=/usr/local/bin/kmsplugin serve --config $work/config.yaml" "$work/rendered.service" \
  || fail "ExecStart does not name the config: $(grep ExecStart "$work/rendered.service")"
diff <(directives "$source_dir/deploy/systemd/kmsplugin.service" | grep -v '^ExecStart=' | grep -v '^ConfigurationDirectory') \
     <(directives "$work/rendered.service" | grep -v '^ExecStart=') \
  || fail "rendered unit and deploy/systemd/kmsplugin.service differ (above; < shipped, > rendered)"
sed "s|^ExecStart=/usr/local/bin/kmsplugin |ExecStart=$binary |" "$work/rendered.service" >"$work/kmsplugin.service"
out=$(systemd-analyze verify --man=no "$work/kmsplugin.service" 2>&1) || fail "systemd-analyze verify: $out"
if grep -q kmsplugin <<<"$out"; then fail "systemd-analyze verify warns: $out"; fi
echo "OK: the documented layout renders deploy/systemd/kmsplugin.service's directives and verifies"

# 2. Another layout: keys under /srv, sockets in /var/run/kms, a socket group, HTTP off.
group=$(id -gn)
mkdir -p "$work/etc"
cat >"$work/etc/custom.yaml" <<YAML
http:
  enabled: false
server:
  shutdownGracePeriod: 25s
environments:
  - name: dev
    socket: /var/run/kms/dev.sock
    socketGroup: $group
    keySource:
      local:
        keyring: /srv/kms/keyrings/dev.keyring
        rootKeyFile: /srv/kms/secrets/dev.rootkey
  - name: prod
    socket: /var/run/kms/prod.sock
    keySource:
      vault:
        address: https://vault.example:8200
        keyName: k8s-prod
        tls:
          caFile: /srv/kms/vault/ca.pem
        auth:
          token:
            file: /srv/kms/secrets/prod.token
YAML
chmod 0600 "$work/etc/custom.yaml"
"$binary" render --config "$work/etc/custom.yaml" --kind systemd-unit >"$work/custom.service" \
  || fail "render of the custom layout exited non-zero: $(cat "$work/custom.service")"
for line in "ReadWritePaths=/var/run/kms" "ReadWritePaths=/srv/kms/keyrings" "SupplementaryGroups=$group" \
            "TimeoutStopSec=45s" "ProtectSystem=strict"; do
  grep -qxF "$line" "$work/custom.service" || fail "custom unit lacks '$line'"
done
for absent in "RuntimeDirectory=kmsplugin" "StateDirectory=kmsplugin" "PrivateUsers=yes" \
              "ReadWritePaths=/srv/kms/secrets" "ReadWritePaths=/srv/kms/vault"; do
  if grep -qxF "$absent" "$work/custom.service"; then fail "custom unit should not have '$absent'"; fi
done
sed "s|^ExecStart=/usr/local/bin/kmsplugin |ExecStart=$binary |" "$work/custom.service" >"$work/kmsplugin.service"
out=$(systemd-analyze verify --man=no "$work/kmsplugin.service" 2>&1) || fail "systemd-analyze verify (custom): $out"
if grep -q kmsplugin <<<"$out"; then fail "systemd-analyze verify warns (custom): $out"; fi

"$binary" render --config "$work/etc/custom.yaml" --kind static-pod --image registry.example/kmsplugin:1 \
  >"$work/pod.yaml" || fail "render --kind static-pod exited non-zero"
GID=$(id -g) CONFIG="$work/etc/custom.yaml" /usr/bin/python3 - "$work/pod.yaml" <<'PY'
import os, sys, yaml
pod = yaml.safe_load(open(sys.argv[1]))
spec = pod["spec"]
assert pod["kind"] == "Pod" and pod["metadata"]["namespace"] == "kube-system", pod["metadata"]
assert spec["priorityClassName"] == "system-node-critical"
assert spec["terminationGracePeriodSeconds"] == 45, spec["terminationGracePeriodSeconds"]
assert spec["securityContext"]["supplementalGroups"] == [int(os.environ["GID"])], spec["securityContext"]
volumes = {v["name"]: v["hostPath"] for v in spec["volumes"]}
container = spec["containers"][0]
assert container["image"] == "registry.example/kmsplugin:1"
assert container["args"] == ["serve", "--config", os.environ["CONFIG"]], container["args"]
mounts = {m["mountPath"]: (volumes[m["name"]], m.get("readOnly", False)) for m in container["volumeMounts"]}
expected = {  # directory -> read-only?
    os.path.dirname(os.environ["CONFIG"]): True,
    "/var/run/kms": False,
    "/srv/kms/keyrings": False,
    "/srv/kms/secrets": True,
    "/srv/kms/vault": True,
}
assert set(mounts) == set(expected), sorted(mounts)
for path, read_only in expected.items():
    host, ro = mounts[path]
    assert host["path"] == path and ro == read_only, (path, host, ro)
    assert host["type"] == ("Directory" if read_only else "DirectoryOrCreate"), (path, host)
assert "livenessProbe" not in container  # HTTP is off: no liveness, readiness through Status
probe = container["readinessProbe"]["exec"]["command"]
assert probe[1:] == ["status", "--socket", "/var/run/kms/dev.sock"], probe
init = spec["initContainers"][0]
script = init["command"][2]
assert "chown 65532:65532 '/srv/kms/keyrings' '/var/run/kms'" in script, script
assert "chmod 0751 '/var/run/kms'" in script and "chmod 0700 '/srv/kms/keyrings'" in script, script
assert {m["mountPath"] for m in init["volumeMounts"]} == {"/var/run/kms", "/srv/kms/keyrings"}, init["volumeMounts"]
print("OK: static pod mounts exactly the configured directories")
PY

# The documented layout's static pod probes the configured HTTP address.
"$binary" render --config "$work/config.yaml" --kind static-pod >"$work/pod-default.yaml" \
  || fail "render --kind static-pod (documented layout) exited non-zero"
/usr/bin/python3 - "$work/pod-default.yaml" <<'PY'
import sys, yaml
c = yaml.safe_load(open(sys.argv[1]))["spec"]["containers"][0]
for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
    get = c[probe]["httpGet"]
    assert (get["host"], get["port"], get["path"]) == ("127.0.0.1", 9880, path), get
print("OK: probes on 127.0.0.1:9880")
PY

# 3. Relative key paths and unknown kinds are refused, naming the problem.
sed 's|/srv/kms/keyrings/dev.keyring|keyrings/dev.keyring|' "$work/etc/custom.yaml" >"$work/etc/relative.yaml"
chmod 0600 "$work/etc/relative.yaml"
if out=$("$binary" render --config "$work/etc/relative.yaml" --kind static-pod 2>&1); then fail "relative path accepted"; fi
grep -q 'keyring: "keyrings/dev.keyring" is not an absolute path' <<<"$out" || fail "relative path error unclear: $out"
if out=$("$binary" render --config "$work/config.yaml" --kind helm 2>&1); then fail "--kind helm accepted"; fi
grep -q 'is not one of encryption-config, static-pod, systemd-unit' <<<"$out" || fail "bad kind error unclear: $out"
if out=$("$binary" render --config "$work/config.yaml" 2>&1); then fail "encryption-config without --env accepted"; fi
grep -q 'needs --env' <<<"$out" || fail "missing --env error unclear: $out"
echo "OK"
