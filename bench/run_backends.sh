#!/usr/bin/env bash
# bench/run_backends.sh: the HSM and Vault key sources under load, each beside a baseline measured in the same run
# (issues 3 and 4). bench/run.sh calls it after the local-vs-null comparison; it also runs on its own.
#
#   pkcs11 vs local: two `kmsplugin serve` processes, one on a SoftHSM2 token (private SOFTHSM2_CONF in a temp dir),
#     one on the local key source; kms_loadgen Encrypt and Decrypt at each concurrency, interleaved ABBA.
#     Targets (c=8): pkcs11 ops/s >= 0.7x local; pkcs11 server CPU/request <= local + 50 us.
#   vault vs raw: the Vault-API test server (tests/vault_server, HTTPS with a test CA made here) with two
#     listeners sharing one key store: `kmsplugin serve` uses listener 0, kms_vault_raw (bench/vault_raw_roundtrip.cc:
#     the same Transit request over libcurl keep-alive, no gRPC) uses listener 1, so the server's per-listener
#     counters separate the two. Targets: plugin p50 <= raw p50 + 0.3 ms (c=1, where the Python server is not
#     saturated); TCP connections the plugin opened over its whole life <= its gRPC worker threads (32); exactly one
#     Vault request per Encrypt/Decrypt call and none per Status (server counters against loadgen's calls_total).
#
# Environment (all optional):
#   BENCH_BACKENDS="pkcs11 vault"   which comparisons to run
#   BENCH_BACKENDS_SECONDS=3        measured seconds per run
#   BENCH_BACKENDS_WARMUP=0.5       warmup seconds per run
#   BENCH_BACKENDS_ROUNDS=2         rounds of the whole matrix (figures are medians, ratios paired per round)
#   BENCH_CONCURRENCY="1 8 32"
#   BENCH_BUILD_DIR=build-bench, BENCH_SKIP_BUILD=1, KMSPLUGIN_BIN=PATH, BENCH_STRICT=1 (exit 3 on a MISS)
# Output: tables on stdout, bench/results/backends.json, raw lines in bench/results/backends.raw.jsonl.
# Default runtime: about 4 minutes.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${BENCH_BUILD_DIR:-build-bench}
[[ $BUILD = /* ]] || BUILD=$ROOT/$BUILD
SECS=${BENCH_BACKENDS_SECONDS:-3}
WARM=${BENCH_BACKENDS_WARMUP:-0.5}
ROUNDS=${BENCH_BACKENDS_ROUNDS:-2}
CONCS=${BENCH_CONCURRENCY:-1 8 32}
WHICH=${BENCH_BACKENDS:-pkcs11 vault}
SOFTHSM_MODULE=/usr/lib/softhsm/libsofthsm2.so
PY=/usr/bin/python3
[[ -x $PY ]] || PY=python3
RESULTS=$ROOT/bench/results
mkdir -p "$RESULTS"
RAW=$RESULTS/backends.raw.jsonl
: >"$RAW"

log() { echo "run_backends.sh: $*" >&2; }

if [[ ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
  log "configuring $BUILD (Release)"
  cmake -S "$ROOT" -B "$BUILD" -DKMSPLUGIN_TESTS=OFF -DCMAKE_BUILD_TYPE=Release >/dev/null
  log "building kmsplugin kms_loadgen kms_vault_raw"
  cmake --build "$BUILD" -j2 --target kmsplugin kms_loadgen kms_vault_raw >/dev/null
fi
LOADGEN=$BUILD/bench/kms_loadgen
RAWTOOL=$BUILD/bench/kms_vault_raw
PLUGIN=${KMSPLUGIN_BIN:-$BUILD/kmsplugin/cli/kmsplugin}
for f in "$LOADGEN" "$PLUGIN"; do [[ -x $f ]] || { log "missing $f"; exit 2; }; done

TMP=$(mktemp -d /tmp/kmsbb.XXXXXX)
PIDS=()
VFD=
cleanup() {
  local pid
  [[ -n $VFD ]] && eval "exec $VFD>&-" || true  # closing its stdin stops the Vault test server
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_for_socket() {  # PID SOCKET
  local i
  for ((i = 0; i < 150; i++)); do
    kill -0 "$1" 2>/dev/null || { log "server $1 exited before listening"; return 1; }
    if [[ -S $2 ]] && "$LOADGEN" --socket "$2" --op status --concurrency 1 --duration 0.1 --warmup 0 >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.1
  done
  log "no answer on $2 after 15 s"
  return 1
}
cpu_ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'; }
rss_kib() { awk '$1 == "VmRSS:" { print $2 }' "/proc/$1/status"; }

start_plugin() {  # NAME CONFIG SOCKET -> sets STARTED_PID
  local name=$1 config=$2 sock=$3
  if ! "$PLUGIN" init --config "$config" >"$TMP/$name.init.log" 2>&1; then
    log "kmsplugin init ($name) failed:"; cat "$TMP/$name.init.log" >&2; exit 2
  fi
  "$PLUGIN" serve --config "$config" >"$TMP/$name.log" 2>&1 &
  STARTED_PID=$!
  PIDS+=("$STARTED_PID")
  if ! wait_for_socket "$STARTED_PID" "$sock"; then
    log "kmsplugin serve ($name) did not come up:"; tail -n 20 "$TMP/$name.log" >&2; exit 2
  fi
}

# Vault test server counters (listener 0 = plugin, 1 = raw baseline).
CTRL=
vault_stats() { curl -sf "http://127.0.0.1:$CTRL/stats"; }
vault_control() { curl -sf -X POST "http://127.0.0.1:$CTRL/control" -d "$1" >/dev/null; }

# measure SERVER PID ROUND CMD... : runs CMD (a loadgen-shaped JSON line on stdout), records server CPU and, when
# the Vault server runs, its counters before and after.
measure() {
  local name=$1 pid=$2 round=$3 before after out rc=0 s0='null' s1='null'
  shift 3
  kill -0 "$pid" 2>/dev/null || { log "server $name (pid $pid) is gone"; tail -n 20 "$TMP"/*.log >&2; exit 2; }
  [[ -n $CTRL ]] && s0=$(vault_stats)
  before=$(cpu_ticks "$pid")
  out=$("$@" 2>>"$TMP/load.err") || rc=$?
  after=$(cpu_ticks "$pid")
  [[ -n $CTRL ]] && s1=$(vault_stats)
  if [[ -z $out ]]; then
    log "no output for $name: $*"; tail -n 5 "$TMP/load.err" >&2; exit 2
  fi
  printf '{"server":"%s","round":%d,"exit":%d,"cpu_ticks":%d,"rss_kib":%d,"vault_before":%s,"vault_after":%s,"loadgen":%s}\n' \
    "$name" "$round" "$rc" "$((after - before))" "$(rss_kib "$pid")" "$s0" "$s1" "$out" >>"$RAW"
  log "$(printf '%-7s %s' "$name" "$out")"
}
lg() { echo "$LOADGEN" --socket "$1" --op "$2" --concurrency "$3" --duration "$SECS" --warmup "$WARM"; }

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)

# ---- pkcs11 vs local ------------------------------------------------------------------------------------------
if [[ " $WHICH " = *" pkcs11 "* ]]; then
  [[ -r $SOFTHSM_MODULE ]] || { log "no $SOFTHSM_MODULE (apt-get install softhsm2)"; exit 2; }
  mkdir -p "$TMP/tokens"
  printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n' \
    "$TMP/tokens" >"$TMP/softhsm2.conf"
  export SOFTHSM2_CONF=$TMP/softhsm2.conf
  softhsm2-util --init-token --free --label bench --pin 1234 --so-pin 5678 >/dev/null
  (umask 077; echo 1234 >"$TMP/user.pin")
  cat >"$TMP/local.yaml" <<EOF
http: {listen: 127.0.0.1:0}
environments:
  - name: bench
    socket: $TMP/local.sock
    keySource:
      local: {keyring: $TMP/bench.keyring, rootKeyFile: $TMP/bench.rootkey}
EOF
  cat >"$TMP/pkcs11.yaml" <<EOF
http: {listen: 127.0.0.1:0}
environments:
  - name: bench
    socket: $TMP/pkcs11.sock
    keySource:
      pkcs11: {module: $SOFTHSM_MODULE, tokenLabel: bench, pinFile: $TMP/user.pin, keyLabel: kmsplugin-bench}
EOF
  chmod 600 "$TMP"/*.yaml
  start_plugin local "$TMP/local.yaml" "$TMP/local.sock"; LOCAL_PID=$STARTED_PID
  start_plugin pkcs11 "$TMP/pkcs11.yaml" "$TMP/pkcs11.sock"; P11_PID=$STARTED_PID
  log "pkcs11 vs local: ${SECS}s + ${WARM}s warmup, $ROUNDS round(s)"
  i=0
  for ((round = 1; round <= ROUNDS; round++)); do
    for op in encrypt decrypt; do
      for conc in $CONCS; do
        if ((i % 2 == 0)); then
          measure local "$LOCAL_PID" "$round" $(lg "$TMP/local.sock" "$op" "$conc")
          measure pkcs11 "$P11_PID" "$round" $(lg "$TMP/pkcs11.sock" "$op" "$conc")
        else
          measure pkcs11 "$P11_PID" "$round" $(lg "$TMP/pkcs11.sock" "$op" "$conc")
          measure local "$LOCAL_PID" "$round" $(lg "$TMP/local.sock" "$op" "$conc")
        fi
        i=$((i + 1))
      done
    done
  done
  kill -TERM "$LOCAL_PID" "$P11_PID" 2>/dev/null || true
  wait "$LOCAL_PID" "$P11_PID" 2>/dev/null || true
fi

# ---- vault vs raw libcurl -------------------------------------------------------------------------------------
if [[ " $WHICH " = *" vault "* ]]; then
  [[ -x $RAWTOOL ]] || { log "missing $RAWTOOL"; exit 2; }
  mkdir -p "$TMP/pki"
  (
    cd "$TMP/pki"
    ec="-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
    openssl req -x509 $ec -keyout ca.key -out ca.crt -days 2 -subj /CN=kms-bench-ca 2>/dev/null
    openssl req $ec -keyout server.key -out server.csr -subj /CN=localhost 2>/dev/null
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >s.ext
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days 2 \
      -extfile s.ext 2>/dev/null
    chmod 600 ./*.key
  )
  mkfifo "$TMP/vault.stdin"
  "$PY" "$ROOT/tests/vault_server/vault_test_server.py" --ready-file "$TMP/vault.ready" --listeners 2 \
    --tls-cert "$TMP/pki/server.crt" --tls-key "$TMP/pki/server.key" --root-token root-bench \
    <"$TMP/vault.stdin" 2>"$TMP/vault-server.log" &
  VAULT_PID=$!
  PIDS+=("$VAULT_PID")
  exec {VFD}>"$TMP/vault.stdin"
  for ((j = 0; j < 100; j++)); do [[ -s $TMP/vault.ready ]] && break; sleep 0.1; done
  [[ -s $TMP/vault.ready ]] || { log "the Vault test server did not start"; cat "$TMP/vault-server.log" >&2; exit 2; }
  read -r P0 P1 CTRL < <("$PY" -c 'import json,sys; j=json.load(open(sys.argv[1])); print(*j["api"], j["control"])' \
    "$TMP/vault.ready")
  (umask 077; echo "hvs.bench-token" >"$TMP/vault-token")
  vault_control '{"add_token": {"id": "hvs.bench-token", "ttl": 0, "renewable": true, "max_ttl": 0}}'
  cat >"$TMP/vault.yaml" <<EOF
http: {listen: 127.0.0.1:0}
server: {pollInterval: 1h}
environments:
  - name: bench
    socket: $TMP/vault.sock
    keySource:
      vault:
        addresses: [https://127.0.0.1:$P0]
        keyName: kms
        tls: {caFile: $TMP/pki/ca.crt}
        auth: {token: {file: $TMP/vault-token}}
        pollInterval: 1h
EOF
  chmod 600 "$TMP/vault.yaml"
  if ! "$PLUGIN" init --config "$TMP/vault.yaml" >"$TMP/vault.init.log" 2>&1; then
    log "kmsplugin init (vault) failed:"; cat "$TMP/vault.init.log" >&2; exit 2
  fi
  vault_control '{"all": true, "reset_stats": true}'  # count the daemon's connections from its first one
  "$PLUGIN" serve --config "$TMP/vault.yaml" >"$TMP/vault.log" 2>&1 &
  VP_PID=$!
  PIDS+=("$VP_PID")
  wait_for_socket "$VP_PID" "$TMP/vault.sock" || { tail -n 20 "$TMP/vault.log" >&2; exit 2; }
  RAWARGS=(--address "https://127.0.0.1:$P1" --ca-file "$TMP/pki/ca.crt" --token-file "$TMP/vault-token")
  log "vault vs raw: ${SECS}s + ${WARM}s warmup, $ROUNDS round(s)"
  i=0
  for ((round = 1; round <= ROUNDS; round++)); do
    for op in encrypt decrypt; do
      for conc in $CONCS; do
        rawcmd=("$RAWTOOL" "${RAWARGS[@]}" --op "$op" --concurrency "$conc" --duration "$SECS" --warmup "$WARM")
        if ((i % 2 == 0)); then
          measure raw "$VAULT_PID" "$round" "${rawcmd[@]}"
          measure vault "$VP_PID" "$round" $(lg "$TMP/vault.sock" "$op" "$conc")
        else
          measure vault "$VP_PID" "$round" $(lg "$TMP/vault.sock" "$op" "$conc")
          measure raw "$VAULT_PID" "$round" "${rawcmd[@]}"
        fi
        i=$((i + 1))
      done
    done
  done
  for conc in $CONCS; do
    measure vault "$VP_PID" 1 $(lg "$TMP/vault.sock" status "$conc")
  done
  FINAL_STATS=$(vault_stats)
  echo "{\"final_vault_stats\": $FINAL_STATS}" >>"$RAW"
fi

# ---- report ---------------------------------------------------------------------------------------------------
export BENCH_CLK_TCK=$(getconf CLK_TCK) BENCH_SECS=$SECS BENCH_WARM=$WARM BENCH_ROUNDS_N=$ROUNDS
export BENCH_LOAD_BEFORE="$LOAD_BEFORE" BENCH_LOAD_AFTER="$(cut -d' ' -f1-3 /proc/loadavg)"
export BENCH_COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo none)
"$PY" "$ROOT/bench/report_backends.py" "$RAW" "$RESULTS/backends.json"
