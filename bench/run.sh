#!/usr/bin/env bash
# bench/run.sh: builds the plugin and the bench tools (Release), then compares `kmsplugin serve` (local key
# source) against kms_null_server (same gRPC stack, no crypto) with kms_loadgen, in one run, and checks the
# performance targets. See bench/RESULTS.md for what is measured and why the figures are ratios.
#
# Usage: bench/run.sh
# Environment (all optional):
#   BENCH_SECONDS=5         measured seconds per loadgen run
#   BENCH_WARMUP=1          unmeasured warmup seconds per run
#   BENCH_ROUNDS=3          repeat the whole matrix; figures are medians over rounds, and each ratio is the
#                           median of the per-round ratios of the two adjacent (interleaved) runs
#   BENCH_OPS="encrypt decrypt status"     (also v1encrypt, v1decrypt)
#   BENCH_CONCURRENCY="1 8 32"
#   BENCH_BUILD_DIR=build-bench            build directory (relative to the repository root)
#   BENCH_SKIP_BUILD=1      use the binaries already in the build directory
#   KMSPLUGIN_BIN=PATH      plugin binary to use instead of the one in the build directory
#   BENCH_NULL_VS_NULL=1    ignore the plugin and compare two null servers (sanity check: ratios ~1.0)
#   BENCH_STRICT=1          exit 3 when a target is missed
#   BENCH_BACKENDS="pkcs11 vault"   after the local-vs-null matrix, bench/run_backends.sh compares the pkcs11 key
#                           source (SoftHSM2) with local and the vault key source with a raw libcurl round trip
#                           (about 4 more minutes); BENCH_BACKENDS=none skips it
# Output: a table on stdout, bench/results/latest.json, and raw per-run lines in bench/results/latest.raw.jsonl.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${BENCH_BUILD_DIR:-build-bench}
[[ $BUILD = /* ]] || BUILD=$ROOT/$BUILD
SECS=${BENCH_SECONDS:-5}
WARM=${BENCH_WARMUP:-1}
ROUNDS=${BENCH_ROUNDS:-3}
OPS=${BENCH_OPS:-encrypt decrypt status}
CONCS=${BENCH_CONCURRENCY:-1 8 32}
PY=/usr/bin/python3
[[ -x $PY ]] || PY=python3
RESULTS=$ROOT/bench/results
mkdir -p "$RESULTS"
RAW=$RESULTS/latest.raw.jsonl
: >"$RAW"

log() { echo "run.sh: $*" >&2; }

# ---- build ----------------------------------------------------------------------------------------------------
if [[ ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
  log "configuring $BUILD (Release)"
  cmake -S "$ROOT" -B "$BUILD" -DKMSPLUGIN_TESTS=OFF -DCMAKE_BUILD_TYPE=Release >/dev/null
  log "building kms_loadgen kms_null_server kms_vault_raw"
  cmake --build "$BUILD" -j2 --target kms_loadgen kms_null_server kms_vault_raw >/dev/null
  if [[ -z ${KMSPLUGIN_BIN:-} && ${BENCH_NULL_VS_NULL:-0} != 1 ]]; then
    if ! cmake --build "$BUILD" --target help 2>/dev/null | grep -qE '(^|[ .])kmsplugin(:|$| )'; then
      log "no kmsplugin target in this tree yet"
    else
      log "building kmsplugin"
      if ! cmake --build "$BUILD" -j2 --target kmsplugin >"$RESULTS/build-kmsplugin.log" 2>&1; then
        log "kmsplugin did not build (see bench/results/build-kmsplugin.log); an older binary is used if one exists"
      fi
    fi
  fi
fi
LOADGEN=$BUILD/bench/kms_loadgen
NULLSRV=$BUILD/bench/kms_null_server
[[ -x $LOADGEN && -x $NULLSRV ]] || { log "missing $LOADGEN or $NULLSRV"; exit 2; }
PLUGIN=${KMSPLUGIN_BIN:-}
if [[ -z $PLUGIN && ${BENCH_NULL_VS_NULL:-0} != 1 ]]; then
  PLUGIN=$(find "$BUILD" -path "$BUILD/bench" -prune -o -type f -name kmsplugin -perm -u+x -print 2>/dev/null | head -n1)
fi
[[ ${BENCH_NULL_VS_NULL:-0} = 1 ]] && PLUGIN=

# ---- servers --------------------------------------------------------------------------------------------------
# A short temp dir: Unix socket paths are limited to 108 bytes.
TMP=$(mktemp -d /tmp/kmsbench.XXXXXX)
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_for_socket() {  # PID SOCKET
  local i
  for ((i = 0; i < 100; i++)); do
    kill -0 "$1" 2>/dev/null || { log "server $1 exited before listening"; return 1; }
    if [[ -S $2 ]] && "$LOADGEN" --socket "$2" --op status --concurrency 1 --duration 0.1 --warmup 0 >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.1
  done
  log "no answer on $2 after 10 s"
  return 1
}

"$NULLSRV" --socket "$TMP/null.sock" 2>"$TMP/null.log" &
NULL_PID=$!
PIDS+=("$NULL_PID")
wait_for_socket "$NULL_PID" "$TMP/null.sock"

MODE=plugin-vs-null
CAND=plugin
if [[ -n $PLUGIN ]]; then
  cat >"$TMP/config.yaml" <<EOF
http:
  listen: 127.0.0.1:0
environments:
  - name: bench
    socket: $TMP/plugin.sock
    keySource:
      local:
        keyring: $TMP/bench.keyring
        rootKeyFile: $TMP/bench.rootkey
EOF
  log "plugin: $PLUGIN"
  if ! "$PLUGIN" init --config "$TMP/config.yaml" >"$TMP/init.log" 2>&1; then
    log "kmsplugin init failed:"; cat "$TMP/init.log" >&2; exit 2
  fi
  "$PLUGIN" serve --config "$TMP/config.yaml" >"$TMP/plugin.log" 2>&1 &
  CAND_PID=$!
  PIDS+=("$CAND_PID")
  if ! wait_for_socket "$CAND_PID" "$TMP/plugin.sock"; then
    log "kmsplugin serve did not come up:"; tail -n 20 "$TMP/plugin.log" >&2; exit 2
  fi
  CAND_SOCK=$TMP/plugin.sock
else
  MODE=null-vs-null
  CAND=null2
  log "no kmsplugin binary: comparing two null servers (ratios should be ~1.0)"
  "$NULLSRV" --socket "$TMP/null2.sock" 2>"$TMP/null2.log" &
  CAND_PID=$!
  PIDS+=("$CAND_PID")
  wait_for_socket "$CAND_PID" "$TMP/null2.sock"
  CAND_SOCK=$TMP/null2.sock
fi

# ---- measurement ----------------------------------------------------------------------------------------------
cpu_ticks() {  # utime+stime of PID in clock ticks (fields 14 and 15 of /proc/PID/stat; comm may hold spaces)
  sed 's/^.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'
}
rss_kib() {  # FIELD PID: VmRSS, RssAnon or RssFile in KiB
  awk -v f="$1:" '$1 == f { print $2 }' "/proc/$2/status"
}

measure() {  # NAME PID SOCKET OP CONCURRENCY ROUND
  local name=$1 pid=$2 sock=$3 op=$4 conc=$5 round=$6 before after out rc=0
  kill -0 "$pid" 2>/dev/null || { log "server $name (pid $pid) is gone"; exit 2; }
  before=$(cpu_ticks "$pid")
  out=$("$LOADGEN" --socket "$sock" --op "$op" --concurrency "$conc" --duration "$SECS" --warmup "$WARM" \
    2>>"$TMP/loadgen.err") || rc=$?
  after=$(cpu_ticks "$pid")
  if [[ -z $out ]]; then
    log "loadgen produced nothing for $name $op c=$conc (exit $rc)"; tail -n 5 "$TMP/loadgen.err" >&2; exit 2
  fi
  printf '{"server":"%s","round":%d,"exit":%d,"cpu_ticks":%d,"rss_kib":%d,"rss_anon_kib":%d,"rss_file_kib":%d,"loadgen":%s}\n' \
    "$name" "$round" "$rc" "$((after - before))" "$(rss_kib VmRSS "$pid")" "$(rss_kib RssAnon "$pid")" \
    "$(rss_kib RssFile "$pid")" "$out" >>"$RAW"
  log "$(printf '%-7s %-8s c=%-3s %s' "$name" "$op" "$conc" "$out")"
}

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
i=0
for ((round = 1; round <= ROUNDS; round++)); do
  for op in $OPS; do
    for conc in $CONCS; do
      # Interleave, alternating which server goes first (ABBA), so drift and noise hit both alike.
      if ((i % 2 == 0)); then
        measure null "$NULL_PID" "$TMP/null.sock" "$op" "$conc" "$round"
        measure "$CAND" "$CAND_PID" "$CAND_SOCK" "$op" "$conc" "$round"
      else
        measure "$CAND" "$CAND_PID" "$CAND_SOCK" "$op" "$conc" "$round"
        measure null "$NULL_PID" "$TMP/null.sock" "$op" "$conc" "$round"
      fi
      i=$((i + 1))
    done
  done
done

# ---- report ---------------------------------------------------------------------------------------------------
export BENCH_MODE=$MODE BENCH_CAND=$CAND BENCH_SECS=$SECS BENCH_WARM=$WARM BENCH_ROUNDS_N=$ROUNDS
export BENCH_CLK_TCK=$(getconf CLK_TCK) BENCH_PLUGIN=${PLUGIN:-}
export BENCH_LOAD_BEFORE="$LOAD_BEFORE" BENCH_LOAD_AFTER="$(cut -d' ' -f1-3 /proc/loadavg)"
export BENCH_COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo none)
RC=0
"$PY" - "$RAW" "$RESULTS/latest.json" <<'PYEOF' || RC=$?
import json, os, statistics, sys, time, platform

raw_path, out_path = sys.argv[1], sys.argv[2]
env = os.environ
mode, cand = env["BENCH_MODE"], env["BENCH_CAND"]
tck = float(env["BENCH_CLK_TCK"])
runs = [json.loads(l) for l in open(raw_path) if l.strip()]

groups = {}
per_round = {}  # (server, op, concurrency, round) -> figures
for r in runs:
    lg = r["loadgen"]
    calls = max(lg.get("calls_total", lg["ops"] + lg["errors"]), 1)
    fig = {
        "ops": lg["ops"], "errors": lg["errors"], "ops_per_sec": lg["ops_per_sec"],
        "p50_us": lg["p50_us"], "p99_us": lg["p99_us"], "p999_us": lg["p999_us"], "max_us": lg["max_us"],
        "cpu_us_per_req": r["cpu_ticks"] / tck * 1e6 / calls,
        "rss_mib": r["rss_kib"] / 1024.0,
        "rss_anon_mib": r.get("rss_anon_kib", 0) / 1024.0,
        "rss_file_mib": r.get("rss_file_kib", 0) / 1024.0,
        "client_cpu_us_per_call": lg.get("client_cpu_us_per_call", 0.0),
    }
    groups.setdefault((r["server"], lg["op"], lg["concurrency"]), []).append(fig)
    per_round[(r["server"], lg["op"], lg["concurrency"], r["round"])] = fig

med = lambda xs: statistics.median(xs)
results = []
for (server, op, conc), rs in groups.items():
    results.append({
        "server": server, "op": op, "concurrency": conc, "rounds": len(rs),
        "ops": sum(x["ops"] for x in rs), "errors": sum(x["errors"] for x in rs),
        **{k: round(med([x[k] for x in rs]), 2) for k in
           ("ops_per_sec", "p50_us", "p99_us", "p999_us", "cpu_us_per_req", "client_cpu_us_per_call")},
        "max_us": max(x["max_us"] for x in rs),
        "rss_mib": round(max(x["rss_mib"] for x in rs), 2),
        "rss_anon_mib": round(max(x["rss_anon_mib"] for x in rs), 2),
        "rss_file_mib": round(max(x["rss_file_mib"] for x in rs), 2),
    })
idx = {(r["server"], r["op"], r["concurrency"]): r for r in results}
ops_order = []
for r in runs:
    key = (r["loadgen"]["op"], r["loadgen"]["concurrency"])
    if key not in ops_order:
        ops_order.append(key)

# Ratios: candidate/null within each round (the two runs were adjacent, so they share the noise), then the
# median over rounds.
def paired_ratio(op, conc, key):
    rs = []
    for (server, o, c, rnd), fig in per_round.items():
        if server == "null" and o == op and c == conc:
            other = per_round.get((cand, op, conc, rnd))
            if other and fig[key]:
                rs.append(other[key] / fig[key])
    return round(med(rs), 3) if rs else None

ratios = []
for op, conc in ops_order:
    if idx.get(("null", op, conc)) and idx.get((cand, op, conc)):
        ratios.append({"op": op, "concurrency": conc,
                       "ops_per_sec": paired_ratio(op, conc, "ops_per_sec"),
                       "p99": paired_ratio(op, conc, "p99_us"),
                       "cpu_per_req": paired_ratio(op, conc, "cpu_us_per_req")})
ridx = {(r["op"], r["concurrency"]): r for r in ratios}

targets = []
def target(name, value, limit, ok):
    targets.append({"target": name, "value": value, "limit": limit,
                    "result": "PASS" if ok else "MISS"})
for op in ("encrypt", "decrypt"):
    r = ridx.get((op, 8))
    if r:
        target(f"{op} c=8 ops/s >= 0.8x null", r["ops_per_sec"], 0.8, r["ops_per_sec"] >= 0.8)
        target(f"{op} c=8 p99 <= 1.5x null", r["p99"], 1.5, r["p99"] <= 1.5)
        target(f"{op} c=8 CPU/request <= 1.5x null", r["cpu_per_req"], 1.5, r["cpu_per_req"] <= 1.5)
r = ridx.get(("status", 8))
if r:
    target("status c=8 ops/s >= 0.9x null", r["ops_per_sec"], 0.9, r["ops_per_sec"] >= 0.9)
cand_rss = [x["rss_mib"] for x in results if x["server"] == cand]
if cand_rss:
    target(f"{cand} RSS after the runs <= 25 MiB (max over runs)", max(cand_rss), 25.0, max(cand_rss) <= 25.0)
for r in results:
    if r["errors"]:
        target(f"{r['server']} {r['op']} c={r['concurrency']} no errors", r["errors"], 0, False)

cpu_model = "unknown"
try:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip(); break
except OSError:
    pass
meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": env["BENCH_COMMIT"],
        "mode": mode, "candidate": cand, "plugin_binary": env["BENCH_PLUGIN"] or None,
        "seconds": float(env["BENCH_SECS"]), "warmup": float(env["BENCH_WARM"]),
        "rounds": int(env["BENCH_ROUNDS_N"]), "cpus": os.cpu_count(), "cpu_model": cpu_model,
        "kernel": platform.release(),
        "loadavg_before": env["BENCH_LOAD_BEFORE"], "loadavg_after": env["BENCH_LOAD_AFTER"],
        "notes": "client and servers share the machine; compare ratios, not absolute figures. "
                 "cpu_us_per_req = server utime+stime over the whole loadgen process / calls_total."}
json.dump({"meta": meta, "results": results, "ratios": ratios, "targets": targets},
          open(out_path, "w"), indent=1)

print(f"\nmode: {mode}   {meta['cpus']} CPUs ({cpu_model}), {meta['seconds']:g} s + {meta['warmup']:g} s warmup, "
      f"{meta['rounds']} round(s), commit {meta['commit']}, load average {meta['loadavg_before']} -> "
      f"{meta['loadavg_after']}\n")
print("| op | conc | server | ops/s | p50 µs | p99 µs | p99.9 µs | max µs | server CPU µs/req | client CPU µs/req "
      "| RSS MiB (anon+file) | errors |")
print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|")
for op, conc in ops_order:
    for s in ("null", cand):
        x = idx.get((s, op, conc))
        if x:
            print(f"| {op} | {conc} | {s} | {x['ops_per_sec']:.0f} | {x['p50_us']:.0f} | {x['p99_us']:.0f} | "
                  f"{x['p999_us']:.0f} | {x['max_us']:.0f} | {x['cpu_us_per_req']:.1f} | {x['client_cpu_us_per_call']:.1f} | "
                  f"{x['rss_mib']:.1f} ({x['rss_anon_mib']:.1f}+{x['rss_file_mib']:.1f}) | "
                  f"{x['errors']} |")
print(f"\n| op | conc | ops/s {cand}/null | p99 {cand}/null | CPU/req {cand}/null |")
print("|---|---:|---:|---:|---:|")
for r in ratios:
    print(f"| {r['op']} | {r['concurrency']} | {r['ops_per_sec']} | {r['p99']} | {r['cpu_per_req']} |")
print("\n| target | value | limit | result |")
print("|---|---:|---:|---|")
for t in targets:
    print(f"| {t['target']} | {t['value']} | {t['limit']} | {t['result']} |")
print(f"\nwrote {out_path}")
sys.exit(3 if os.environ.get("BENCH_STRICT") == "1" and any(t["result"] == "MISS" for t in targets) else 0)
PYEOF

# ---- key sources with a backend (issues 3, 4) -----------------------------------------------------------------
if [[ ${BENCH_BACKENDS:-pkcs11 vault} != none && $MODE = plugin-vs-null ]]; then
  cleanup
  PIDS=()
  BENCH_SKIP_BUILD=1 BENCH_BUILD_DIR=$BUILD KMSPLUGIN_BIN=$PLUGIN "$ROOT/bench/run_backends.sh" || RC=$((RC ? RC : $?))
fi
exit "$RC"
