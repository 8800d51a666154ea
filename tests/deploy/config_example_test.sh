#!/usr/bin/env bash
# deploy/config.example.yaml loads with the real binary: `kmsplugin render` exits 0 for each of its environments
# (local, pkcs11 and vault sections must all parse). The copy is mode 0600, as an installed config would be.
set -euo pipefail
source_dir=${1:?usage: config_example_test.sh SOURCE_DIR BINARY}
binary=${2:?usage: config_example_test.sh SOURCE_DIR BINARY}
[[ -x $binary ]] || { echo "FAIL: $binary not built"; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
install -m 0600 "$source_dir/deploy/config.example.yaml" "$work/config.yaml"

failed=0
for env in dev test prod; do
  echo "== kmsplugin render --config config.yaml --env $env"
  if ! out=$("$binary" render --config "$work/config.yaml" --env "$env" 2>&1); then
    echo "$out"
    echo "FAIL: render exited non-zero for environment $env"
    failed=1
    continue
  fi
  echo "$out"
  grep -q "endpoint: unix:///run/kmsplugin/$env.sock" <<<"$out" \
    || { echo "FAIL: render for $env does not point at unix:///run/kmsplugin/$env.sock"; failed=1; }
done
# The rendered configuration parses as the shape deploy/kubernetes/encryption-config/ uses.
if [[ $failed == 0 ]] && /usr/bin/python3 -c 'import yaml' 2>/dev/null; then
  "$binary" render --config "$work/config.yaml" --env prod --identity-fallback | /usr/bin/python3 -c '
import sys, yaml
doc = yaml.safe_load(sys.stdin)
assert doc["kind"] == "EncryptionConfiguration", doc
providers = doc["resources"][0]["providers"]
assert providers[0]["kms"]["apiVersion"] == "v2", providers
assert providers[-1] == {"identity": {}}, providers
print("OK: rendered EncryptionConfiguration (with --identity-fallback) parses")
' || failed=1
fi
# A v1 fallback says, in the file itself, the feature gate kube-apiserver 1.29+ needs to load it, and doctor warns.
if [[ $failed == 0 ]]; then
  "$binary" render --config "$work/config.yaml" --env prod --v1-fallback >"$work/v1.yaml" || failed=1
  grep -q -- "--feature-gates=KMSv1=true" "$work/v1.yaml" \
    || { echo "FAIL: render --v1-fallback does not name the KMSv1 feature gate"; failed=1; }
  doctor_out=$("$binary" doctor --encryption-config "$work/v1.yaml" --json 2>&1) || true
  /usr/bin/python3 -c '
import json, sys
doc = json.loads(sys.argv[1])
row = [c for c in doc["checks"] if c["id"] == "kms.v1-feature-gate"]
assert row and row[0]["verdict"] == "WARN" and "--feature-gates=KMSv1=true" in row[0]["found"], doc
print("OK: doctor warns on the v1 fallback with the feature gate it needs")
' "$doctor_out" || { echo "FAIL: doctor on a v1 fallback: $doctor_out"; failed=1; }
fi
exit $failed
