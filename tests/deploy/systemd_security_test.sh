#!/usr/bin/env bash
# Records the exposure figure of `systemd-analyze security --offline=true` for deploy/systemd/kmsplugin.service and
# fails when it rises above MAX_EXPOSURE (0 = fully locked down, 10 = unprotected; 2.0 is deep in "OK").
set -euo pipefail
source_dir=${1:?usage: systemd_security_test.sh SOURCE_DIR BINARY}
binary=${2:?usage: systemd_security_test.sh SOURCE_DIR BINARY}
max_exposure=${MAX_EXPOSURE:-2.0}
command -v systemd-analyze >/dev/null || { echo "SKIP: systemd-analyze not installed"; exit 77; }
systemd-analyze security --help 2>/dev/null | grep -q -- '--offline' \
  || { echo "SKIP: this systemd-analyze has no --offline (systemd 250+ needed)"; exit 77; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sed "s|^ExecStart=/usr/local/bin/kmsplugin |ExecStart=$binary |" "$source_dir/deploy/systemd/kmsplugin.service" \
  >"$work/kmsplugin.service"
output=$(systemd-analyze security --offline=true --no-pager "$work/kmsplugin.service" 2>&1) || true
# The items that still add exposure, then the overall figure.
grep -E '^✗' <<<"$output" || true
overall=$(grep -E 'Overall exposure level for kmsplugin.service' <<<"$output" || true)
echo "$overall"
exposure=$(sed -n 's/.*Overall exposure level for kmsplugin.service: \([0-9.]*\).*/\1/p' <<<"$overall")
if [[ -z $exposure ]]; then
  echo "$output"
  echo "FAIL: no overall exposure figure in the output above"
  exit 1
fi
echo "exposure=$exposure (maximum allowed $max_exposure)"
if ! awk -v e="$exposure" -v m="$max_exposure" 'BEGIN { exit !(e <= m) }'; then
  echo "FAIL: exposure $exposure is above $max_exposure"
  exit 1
fi
