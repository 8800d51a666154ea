#!/usr/bin/env bash
# The static pod's memory limit is tied to a measurement (issue 11, item 13): `kmsplugin serve` with a passphrase
# keyring at the default Argon2id parameters (64 MiB, written by `init`) is started, reloaded once (SIGHUP derives
# the root key again while the old one still serves), and its peak RSS (VmHWM) is read from /proc. The limit of
# the kmsplugin container, in deploy/kubernetes/kmsplugin-static-pod.yaml and in `render --kind static-pod`, must
# be at least the peak plus a 25 % margin, so the two cannot drift apart (it was 64Mi against a peak of ~87 MB).
set -euo pipefail
source_dir=${1:?usage: memory_limit_test.sh SOURCE_DIR BINARY}
binary=${2:?usage: memory_limit_test.sh SOURCE_DIR BINARY}
[[ -x $binary ]] || { echo "FAIL: $binary not built"; exit 1; }
/usr/bin/python3 -c 'import yaml' 2>/dev/null || { echo "SKIP: python3-yaml not installed"; exit 77; }
work=$(mktemp -d)
pid=
trap '[[ -n $pid ]] && kill "$pid" 2>/dev/null; rm -rf "$work"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

# The memory limit of the kmsplugin container of a pod manifest, in bytes.
limit_of() {
  /usr/bin/python3 - "$1" <<'PY'
import re, sys, yaml
pod = yaml.safe_load(open(sys.argv[1]))
[c] = [c for c in pod["spec"]["containers"] if c["name"] == "kmsplugin"]
value = str(c["resources"]["limits"]["memory"])
m = re.fullmatch(r"(\d+)(Ki|Mi|Gi)?", value)
if not m:
    sys.exit(f"unreadable memory limit {value!r}")
print(int(m.group(1)) * {None: 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}[m.group(2)])
PY
}

mkdir -m 0700 "$work/state" "$work/run"
printf 'correct horse battery staple\n' >"$work/state/passphrase"
chmod 0600 "$work/state/passphrase"
cat >"$work/config.yaml" <<YAML
http:
  enabled: false
server:
  pollInterval: 1s
environments:
  - name: dev
    socket: $work/run/dev.sock
    keySource:
      local:
        keyring: $work/state/dev.keyring
        passphraseFile: $work/state/passphrase
YAML
chmod 0600 "$work/config.yaml"
"$binary" init --config "$work/config.yaml" >/dev/null || fail "init exited non-zero"
grep -q '"memLimit": 67108864' "$work/state/dev.keyring" || fail "init no longer writes memLimit 64 MiB: update this test"

"$binary" serve --config "$work/config.yaml" 2>"$work/serve.log" &
pid=$!
status() { "$binary" status --socket "$work/run/dev.sock" 2>/dev/null; }
for _ in $(seq 1 300); do status >/dev/null && break; kill -0 "$pid" 2>/dev/null || fail "serve died: $(cat "$work/serve.log")"; sleep 0.1; done
status >/dev/null || fail "serve never answered Status"
kill -HUP "$pid"
for _ in $(seq 1 300); do grep -q '"config reloaded"' "$work/serve.log" && break; sleep 0.1; done
grep -q '"config reloaded"' "$work/serve.log" || fail "no reload logged: $(tail -3 "$work/serve.log")"
peak_kb=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status")
kill -TERM "$pid"
wait "$pid" || fail "serve exited non-zero on SIGTERM"
pid=
[[ -n $peak_kb ]] || fail "no VmHWM"
peak=$((peak_kb * 1024))
needed=$((peak + peak / 4))
echo "measured: peak RSS (VmHWM) of serve with a 64 MiB Argon2id passphrase keyring, after one reload: $((peak_kb / 1024)) MiB; with 25 % margin: $((needed >> 20)) MiB"

shipped=$(limit_of "$source_dir/deploy/kubernetes/kmsplugin-static-pod.yaml")
(( shipped >= needed )) || fail "deploy/kubernetes/kmsplugin-static-pod.yaml limits the kmsplugin container to $((shipped >> 20))Mi, below the measured peak $((peak_kb / 1024)) MiB + 25 %: raise it (and the comment's figure)"
"$binary" render --config "$work/config.yaml" --kind static-pod --image registry.example/kmsplugin:1 >"$work/pod.yaml" \
  || fail "render --kind static-pod exited non-zero"
rendered=$(limit_of "$work/pod.yaml")
(( rendered == shipped )) || fail "render --kind static-pod limits memory to $((rendered >> 20))Mi, the shipped pod to $((shipped >> 20))Mi"
echo "OK: the static pod's limit $((shipped >> 20))Mi covers the measured peak with 25 % margin, shipped and rendered"
