#!/usr/bin/env bash
# `systemd-analyze verify` on a copy of deploy/systemd/kmsplugin.service whose ExecStart points at the built binary
# (verify checks that the command exists and is executable). Any output that mentions the unit fails the test.
set -euo pipefail
source_dir=${1:?usage: systemd_verify_test.sh SOURCE_DIR BINARY}
binary=${2:?usage: systemd_verify_test.sh SOURCE_DIR BINARY}
command -v systemd-analyze >/dev/null || { echo "SKIP: systemd-analyze not installed"; exit 77; }
[[ -x $binary ]] || { echo "FAIL: $binary not built (cmake --build ... --target kmsplugin)"; exit 1; }
unit=$source_dir/deploy/systemd/kmsplugin.service
grep -q '^ExecStart=/usr/local/bin/kmsplugin serve --config /etc/kmsplugin/config.yaml$' "$unit" \
  || { echo "FAIL: $unit: ExecStart is not '/usr/local/bin/kmsplugin serve --config /etc/kmsplugin/config.yaml'"; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sed "s|^ExecStart=/usr/local/bin/kmsplugin |ExecStart=$binary |" "$unit" >"$work/kmsplugin.service"

status=0
output=$(systemd-analyze verify --man=no "$work/kmsplugin.service" 2>&1) || status=$?
echo "$output"
if ((status != 0)); then
  echo "FAIL: systemd-analyze verify exited $status"
  exit 1
fi
if grep -q 'kmsplugin' <<<"$output"; then
  echo "FAIL: systemd-analyze verify printed warnings about kmsplugin.service (above)"
  exit 1
fi

# Settings the runbook and the static pod rely on: these must not be lost in an edit.
for line in 'Type=notify' 'NotifyAccess=main' 'ExecReload=/bin/kill -HUP $MAINPID' 'User=kmsplugin' 'Group=kmsplugin' \
            'RuntimeDirectory=kmsplugin' 'RuntimeDirectoryMode=0750' 'RuntimeDirectoryPreserve=yes' \
            'StateDirectory=kmsplugin' 'ConfigurationDirectory=kmsplugin' 'UMask=0077' 'LimitCORE=0' \
            'NoNewPrivileges=yes' 'CapabilityBoundingSet=' 'AmbientCapabilities=' 'Restart=on-failure' \
            'MemoryDenyWriteExecute=yes' 'SystemCallFilter=@system-service'; do
  grep -qxF "$line" "$unit" || { echo "FAIL: $unit lacks the line: $line"; exit 1; }
done
# Locked memory for libsodium: LimitMEMLOCK of at least 16M, and @memlock not denied.
memlock=$(sed -n 's/^LimitMEMLOCK=\([0-9]*\)M$/\1/p' "$unit")
[[ -n $memlock && $memlock -ge 16 ]] || { echo "FAIL: LimitMEMLOCK must be at least 16M"; exit 1; }
if grep -E '^SystemCallFilter=~.*@memlock' "$unit"; then
  echo "FAIL: libsodium's guarded memory needs mlock: do not deny @memlock"
  exit 1
fi
# TimeoutStopSec above the plugin's default shutdownGracePeriod (10s).
stop=$(sed -n 's/^TimeoutStopSec=\([0-9]*\)s$/\1/p' "$unit")
[[ -n $stop && $stop -gt 10 ]] || { echo "FAIL: TimeoutStopSec must exceed server.shutdownGracePeriod (10s)"; exit 1; }
echo "OK: systemd-analyze verify is clean for kmsplugin.service"
