#!/usr/bin/env bash
# deploy/prometheus/kmsplugin-scrape.yml, checked with Prometheus' own promtool (Debian's prometheus package):
# - it is a valid Prometheus configuration (promtool also checks that the TLS files it names exist, so they are
#   placed in a scratch directory first);
# - it has a job for the plain loopback listener and an https job named kmsplugin (the job the alert rules watch)
#   with tls_config cert_file, key_file and ca_file;
# - the TLS job's port is the one deploy/config.example.yaml gives http.tls.listen;
# - promtool refuses it when the client key is missing (so the check above is not vacuous).
set -euo pipefail
source_dir=${1:?usage: prometheus_scrape_test.sh SOURCE_DIR}
command -v promtool >/dev/null || { echo "SKIP: promtool (Debian package prometheus) not installed"; exit 77; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
example=$source_dir/deploy/prometheus/kmsplugin-scrape.yml
secrets=/etc/prometheus/secrets/kmsplugin-metrics/
grep -q "$secrets" "$example" || { echo "FAIL: $example no longer names its files under $secrets"; exit 1; }
sed "s|$secrets|$work/|g" "$example" > "$work/scrape.yml"
touch "$work/ca.crt" "$work/client.crt" "$work/client.key"
promtool check config "$work/scrape.yml"

/usr/bin/python3 - "$work/scrape.yml" "$source_dir/deploy/config.example.yaml" <<'PY'
import re, sys, yaml
scrape = yaml.safe_load(open(sys.argv[1]))
example = yaml.safe_load(open(sys.argv[2]))
jobs = {j["job_name"]: j for j in scrape["scrape_configs"]}
local, tls = jobs.get("kmsplugin-local"), jobs.get("kmsplugin")
assert local and tls, f"expected jobs kmsplugin-local and kmsplugin (the alert rules' job), found {sorted(jobs)}"
assert local.get("scheme", "http") == "http", "the loopback job scrapes plain HTTP"
assert any(t.startswith("127.0.0.1:") for c in local["static_configs"] for t in c["targets"]), "loopback target"
assert tls["scheme"] == "https", "the TLS job must use scheme https"
for field in ("cert_file", "key_file", "ca_file"):
    assert tls["tls_config"].get(field), f"tls_config.{field} is missing"
listen = example["http"]["tls"]["listen"]
port = listen.rsplit(":", 1)[1]
targets = [t for c in tls["static_configs"] for t in c["targets"]]
assert targets and all(t.endswith(":" + port) for t in targets), f"TLS targets {targets} must use port {port}"
print(f"OK: jobs {sorted(jobs)}; TLS targets on port {port}")
PY

rm "$work/client.key"
if promtool check config "$work/scrape.yml" >/dev/null 2>&1; then
  echo "FAIL: promtool accepted the config without the client key file"
  exit 1
fi
echo "OK: the scrape config example passes promtool check config"
