#!/usr/bin/env bash
# bench/threads.sh: thread churn and memory of a running `kmsplugin serve` under load (issues 11 and 15).
#
# For each concurrency, runs kms_loadgen against the plugin's socket and, after a warm-up, counts the clone and
# clone3 system calls of the whole daemon (every thread, `strace -f -c`) over STRACE_SECONDS of steady load.
# Zero means no thread was created while serving. Then floods the socket with FLOOD_CLIENTS clients (one channel
# each) and reports the daemon's VmRSS before, at the end of the flood, and IDLE_SECONDS after it.
#
# Usage: bench/threads.sh KMSPLUGIN_BIN LOADGEN_BIN
# Environment: OP=encrypt  CONCS="1 8 32"  STRACE_SECONDS=4  FLOOD_CLIENTS=1000  IDLE_SECONDS=15
# Output: one line per measurement on stdout. Needs strace and ptrace permission (root, or ptrace_scope 0).
set -euo pipefail
PLUGIN=${1:?usage: threads.sh KMSPLUGIN_BIN LOADGEN_BIN}
LOADGEN=${2:?usage: threads.sh KMSPLUGIN_BIN LOADGEN_BIN}
OP=${OP:-encrypt}
CONCS=${CONCS:-1 8 32}
SECS=${STRACE_SECONDS:-4}
FLOOD=${FLOOD_CLIENTS:-1000}
IDLE=${IDLE_SECONDS:-15}

TMP=$(mktemp -d /tmp/kmsthr.XXXXXX)
PID=
cleanup() {
  [[ -n $PID ]] && kill -TERM "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
  rm -rf "$TMP"
}
trap cleanup EXIT
cat >"$TMP/config.yaml" <<CFG
http:
  enabled: false
environments:
  - name: bench
    socket: $TMP/p.sock
    keySource:
      local:
        keyring: $TMP/bench.keyring
        rootKeyFile: $TMP/bench.rootkey
CFG
"$PLUGIN" init --config "$TMP/config.yaml" >/dev/null 2>&1
"$PLUGIN" serve --config "$TMP/config.yaml" 2>"$TMP/serve.log" &
PID=$!
for ((i = 0; i < 100; i++)); do
  "$LOADGEN" --socket "$TMP/p.sock" --op status --concurrency 1 --duration 0.1 --warmup 0 >/dev/null 2>&1 && break
  sleep 0.1
done
rss() { awk '/^VmRSS/ {print $2 " kB"}' "/proc/$PID/status"; }
threads() { ls "/proc/$PID/task" | wc -l; }

for c in $CONCS; do
  total=$((SECS + 4))
  "$LOADGEN" --socket "$TMP/p.sock" --op "$OP" --concurrency "$c" --warmup 2 --duration "$total" >"$TMP/load.json" 2>/dev/null &
  LG=$!
  sleep 2  # warm-up: pools and connections are set up
  timeout -s INT "$SECS" strace -f -c -e trace=clone3,clone -p "$PID" -o "$TMP/strace.txt" 2>/dev/null || true
  wait "$LG" || true
  clones=$(awk '$NF ~ /^clone3?$/ {n += $4} END {print n + 0}' "$TMP/strace.txt")
  ops=$(sed -n 's/.*"ops_per_sec":\([0-9.]*\).*/\1/p' "$TMP/load.json")
  echo "op=$OP concurrency=$c clone_calls_in_${SECS}s=$clones ops_per_sec=$ops threads=$(threads) rss=$(rss)"
done

echo "flood: before rss=$(rss) threads=$(threads)"
"$LOADGEN" --socket "$TMP/p.sock" --op "$OP" --concurrency "$FLOOD" --warmup 1 --duration 5 >"$TMP/flood.json" 2>/dev/null || true
echo "flood: after $FLOOD clients rss=$(rss) threads=$(threads) $(sed -n 's/.*"ops_per_sec":\([0-9.]*\).*"errors_by_code":\({[^}]*}\).*/ops_per_sec=\1 errors=\2/p' "$TMP/flood.json")"
sleep "$IDLE"
echo "flood: ${IDLE}s idle later rss=$(rss) threads=$(threads)"
