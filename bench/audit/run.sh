#!/usr/bin/env bash
# Audit benchmark: fill a fresh etcd with OBJECTS objects written as kube-apiserver writes them (95% KMS v2 seed
# mode, 3% KMS v1, 2% identity; ~0.6 KB plaintext each) through an in-process kmsplugin, then time
# `audit --config ... --json` at several page sizes under /usr/bin/time -v (wall clock, peak RSS).
#
#   bash bench/audit/run.sh [BUILD_DIR] [OBJECTS]      # defaults: build-audit, 100000
#
# Needs etcd-server (etcd) and the targets audit_cli and audit_bench_writer (built here if missing).
# etcd's data dir lives on /dev/shm so the figures measure the audit, not the disk. Runs in about 2-3 minutes.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BUILD=${1:-$ROOT/build-audit}
OBJECTS=${2:-100000}
TOOLS=$BUILD/tests/audit

if [[ ! -x $TOOLS/audit_cli || ! -x $TOOLS/audit_bench_writer ]]; then
  cmake --build "$BUILD" -j2 --target audit_cli audit_bench_writer
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
WORK=$(mktemp -d /dev/shm/kp-audit-bench-XXXXXX)
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

echo "== writing $OBJECTS objects (kube-apiserver's format, through kmsplugin)"
mkdir -p "$WORK/out"
AUDIT_BENCH_ETCD=$CLIENT AUDIT_BENCH_OBJECTS=$OBJECTS AUDIT_BENCH_DIR=$WORK/out \
  "$TOOLS/audit_bench_writer" "[.bench]" --success 2>/dev/null | grep -E "^(wrote|key_id)" || true
DB_BYTES=$(ETCDCTL_API=3 etcdctl --endpoints "$CLIENT" endpoint status -w json | python3 -c \
  'import json,sys; print(json.load(sys.stdin)[0]["Status"]["dbSize"])')
echo "etcd db size: $((DB_BYTES / 1024 / 1024)) MiB"

printf '\n%-10s %10s %12s %12s %s\n' "page-size" "seconds" "objects/s" "peak RSS" "exit"
for page in 100 500 2000; do
  set +e
  /usr/bin/time -v "$TOOLS/audit_cli" --config "$WORK/out/config.yaml" --endpoints "$CLIENT" \
    --page-size "$page" --json >"$WORK/report-$page.json" 2>"$WORK/time-$page.txt"
  code=$?
  set -e
  wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {print $2}' "$WORK/time-$page.txt")
  secs=$(python3 -c "p='$wall'.split(':'); print(sum(float(x)*60**i for i,x in enumerate(reversed(p))))")
  rss=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$WORK/time-$page.txt")
  objs=$(python3 -c "import json; print(json.load(open('$WORK/report-$page.json'))['prefixes'][0]['objects'])")
  rate=$(python3 -c "print(int($objs/max($secs,0.001)))")
  printf '%-10s %10.2f %12s %9s KiB %s\n' "$page" "$secs" "$rate" "$rss" "$code"
done
echo
python3 - "$WORK/report-500.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
p = r["prefixes"][0]
print(f'{p["objects"]} objects under {p["prefix"]}: {p["unencrypted"]} unencrypted, {p["unknownKeyId"]} unknown key_id')
for g in p["groups"]:
    print(f'  {g["storage"]:9} {g["provider"] or "-":18} {g["state"]:8} {g["objects"]}')
PY
