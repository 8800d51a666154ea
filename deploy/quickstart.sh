#!/usr/bin/env bash
# From a fresh Debian bookworm machine to a serving plugin: installs what is missing, builds (Release), creates a
# local keyring in a state directory if there is none, starts `kmsplugin serve`, and shows it serving: a Status
# call against the socket and the EncryptionConfiguration to hand to kube-apiserver.
#   KMSPLUGIN_STATE_DIR   where config, keys and the socket live (default: ~/.local/state/kmsplugin)
set -euo pipefail
cd "$(dirname "$0")/.."

bash deploy/install-deps.sh build
cmake -S . -B build/release -DCMAKE_BUILD_TYPE=Release -DKMSPLUGIN_TESTS=OFF -DKMSPLUGIN_BENCH=OFF >/dev/null
cmake --build build/release -j"$(nproc)" --target kmsplugin
bin=$PWD/build/release/kmsplugin/cli/kmsplugin

state=${KMSPLUGIN_STATE_DIR:-$HOME/.local/state/kmsplugin}
mkdir -p "$state"
chmod 700 "$state"
config=$state/config.yaml
if [[ ! -f $config ]]; then
  umask 077
  cat >"$config" <<YAML
# kmsplugin quickstart: one local environment (the embedded default). See deploy/config.example.yaml.
environments:
  - name: dev
    socket: $state/run/kms.sock
    keySource:
      local:
        keyring: $state/keys/dev.keyring
        rootKeyFile: $state/keys/dev.rootkey
YAML
fi
"$bin" init --config "$config"

pidfile=$state/kmsplugin.pid
if [[ -f $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
  echo "kmsplugin is already running (pid $(cat "$pidfile")); restarting it"
  kill "$(cat "$pidfile")"
  while kill -0 "$(cat "$pidfile")" 2>/dev/null; do sleep 0.1; done
fi
nohup "$bin" serve --config "$config" >"$state/kmsplugin.log" 2>&1 &
echo $! >"$pidfile"
socket=$state/run/kms.sock
serving=no
for _ in $(seq 100); do
  if "$bin" status --socket "$socket" --timeout 200ms >/dev/null 2>&1; then serving=yes; break; fi
  kill -0 "$(cat "$pidfile")" 2>/dev/null || break
  sleep 0.1
done
if [[ $serving != yes ]]; then
  echo "kmsplugin did not come up on $socket; its log, $state/kmsplugin.log, ends with:" >&2
  tail -n 20 "$state/kmsplugin.log" >&2
  exit 1
fi

echo
echo "== kmsplugin is serving (pid $(cat "$pidfile"), log $state/kmsplugin.log) =="
"$bin" status --socket "$socket"
echo
echo "== EncryptionConfiguration for kube-apiserver (--encryption-provider-config) =="
"$bin" render --config "$config" --env dev --identity-fallback
echo
echo "Rotate:  $bin rotate --config $config --env dev"
echo "Stop:    kill \$(cat $pidfile)"
