#!/usr/bin/env bash
# `audit --decrypt` benchmark: fill a fresh etcd with OBJECTS objects written as kube-apiserver writes them (95% KMS
# v2 seed mode, 3% KMS v1, 2% identity; ~0.6 KB plaintext each) with a new DEK seed per SEED_EVERY objects (as
# apiserver restarts and rotations leave behind), then time, on the same etcd and interleaved ROUNDS times:
#   baseline   audit --config ... --json                    (classification only)
#   decrypt    audit --config ... --json --decrypt          (every object decrypted for real)
# and once `audit --snapshot FILE --decrypt` of an `etcdctl snapshot save` of it. Wall clock and peak RSS from
# /usr/bin/time -v; objects/s = objects / wall clock, including process start, config load and opening the keyring.
#
#   bash bench/audit/decrypt.sh [BUILD_DIR] [OBJECTS] [SEED_EVERY] [ROUNDS]   # build-audit 100000 1000 3
#
# Needs etcd-server, etcd-client and the targets audit_cli and audit_bench_writer (built here if missing).
# etcd's data dir and the snapshot live on /dev/shm. Runs in about 3-5 minutes.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BUILD=${1:-$ROOT/build-audit}
OBJECTS=${2:-100000}
SEED_EVERY=${3:-1000}
ROUNDS=${4:-3}
TOOLS=$BUILD/tests/audit

if [[ ! -x $TOOLS/audit_cli || ! -x $TOOLS/audit_bench_writer ]]; then
  cmake --build "$BUILD" -j2 --target audit_cli audit_bench_writer
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
WORK=$(mktemp -d /dev/shm/kp-audit-decrypt-bench-XXXXXX)
ETCD_PID=
cleanup() {
  if [[ -n $ETCD_PID ]]; then kill "$ETCD_PID" 2>/dev/null || true; wait "$ETCD_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

CLIENT=127.0.0.1:$(free_port)
PEER=127.0.0.1:$(free_port)
etcd --name bench --data-dir "$WORK/etcd" \
  --listen-client-urls "http://$CLIENT" --advertise-client-urls "http://$CLIENT" \
  --listen-peer-urls "http://$PEER" --initial-advertise-peer-urls "http://$PEER" \
  --initial-cluster "bench=http://$PEER" --logger zap --log-level error >"$WORK/etcd.log" 2>&1 &
ETCD_PID=$!
for _ in $(seq 100); do
  if ETCDCTL_API=3 etcdctl --endpoints "$CLIENT" endpoint health >/dev/null 2>&1; then break; fi
  sleep 0.1
done

echo "== writing $OBJECTS objects, a new seed per $SEED_EVERY (kube-apiserver's format, through kmsplugin)"
mkdir -p "$WORK/out"
AUDIT_BENCH_ETCD=$CLIENT AUDIT_BENCH_OBJECTS=$OBJECTS AUDIT_BENCH_DIR=$WORK/out AUDIT_BENCH_SEED_EVERY=$SEED_EVERY \
  "$TOOLS/audit_bench_writer" "[.bench]" --success 2>/dev/null | grep -E "^(wrote|key_id)" || true
DB_BYTES=$(ETCDCTL_API=3 etcdctl --endpoints "$CLIENT" endpoint status -w json | python3 -c \
  'import json,sys; print(json.load(sys.stdin)[0]["Status"]["dbSize"])')
echo "etcd db size: $((DB_BYTES / 1024 / 1024)) MiB"

# run NAME ARGS...: one timed audit; appends "NAME seconds rss_kib exit" to $WORK/runs.
run() {
  local name=$1
  shift
  set +e
  /usr/bin/time -v "$TOOLS/audit_cli" --config "$WORK/out/config.yaml" --json "$@" \
    >"$WORK/report-$name.json" 2>"$WORK/time-$name.txt"
  local code=$?
  set -e
  local wall secs rss
  wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {print $2}' "$WORK/time-$name.txt")
  secs=$(python3 -c "p='$wall'.split(':'); print(sum(float(x)*60**i for i,x in enumerate(reversed(p))))")
  rss=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$WORK/time-$name.txt")
  echo "$name $secs $rss $code" >>"$WORK/runs"
}

: >"$WORK/runs"
for round in $(seq "$ROUNDS"); do
  run "baseline-$round" --endpoints "$CLIENT"
  run "decrypt-$round" --endpoints "$CLIENT" --decrypt
done
ETCDCTL_API=3 etcdctl --endpoints "$CLIENT" snapshot save "$WORK/backup.db" >/dev/null 2>&1
run "snapshot-decrypt" --snapshot "$WORK/backup.db" --decrypt
TMP_LEFT=$(find "${TMPDIR:-/tmp}" -maxdepth 1 -name 'kmsplugin-audit-*' | wc -l)

python3 - "$WORK" "$OBJECTS" "$TMP_LEFT" <<'PY'
import json, statistics, sys
work, objects, left = sys.argv[1], int(sys.argv[2]), sys.argv[3]
runs = {}
for line in open(f"{work}/runs"):
    name, secs, rss, code = line.split()
    runs[name] = (float(secs), int(rss), int(code))
def rows(prefix):
    return [v for k, v in runs.items() if k.startswith(prefix + "-") or k == prefix]
print(f"\n{'run':<18} {'median s':>9} {'objects/s':>10} {'peak RSS':>12} {'exit':>5}  (all rounds, s)")
med = {}
for prefix in ("baseline", "decrypt", "snapshot-decrypt"):
    r = rows(prefix)
    secs = statistics.median(x[0] for x in r)
    rss = max(x[1] for x in r)
    med[prefix] = (secs, rss)
    print(f"{prefix:<18} {secs:9.2f} {int(objects/secs):10d} {rss/1024:8.1f} MiB {r[0][2]:5d}  "
          + " ".join(f"{x[0]:.2f}" for x in r))
b, d = med["baseline"], med["decrypt"]
print(f"\ndecrypt / baseline: time x{d[0]/b[0]:.2f}, peak RSS x{d[1]/b[1]:.2f}")
rep = json.load(open(f"{work}/report-decrypt-1.json"))
p = rep["prefixes"][0]
print(f'{p["objects"]} objects: {p["decrypt"]["decrypts"]} decrypt, {p["decrypt"]["fails"]} fail, '
      f'{p["decrypt"]["notCheckable"]} not checkable, {p["unencrypted"]} unencrypted (identity)')
snap = json.load(open(f"{work}/report-snapshot-decrypt.json"))
same = snap["prefixes"] == rep["prefixes"]
print(f"snapshot report identical to the live one: {same}; private dirs left in TMPDIR: {left}")
PY
