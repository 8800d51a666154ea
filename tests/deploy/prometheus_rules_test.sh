#!/usr/bin/env bash
# deploy/prometheus and deploy/grafana, checked with Prometheus' own promtool (Debian's prometheus package):
# - the alert rules parse and pass their unit tests (kmsplugin-alerts.test.yml);
# - every dashboard query is valid PromQL: each becomes a recording rule that `promtool check rules` parses
#   (Grafana's $__rate_interval/$__range and $instance are replaced by what Grafana would substitute);
# - every metric the rules and the dashboard name is one the plugin exports (a renamed metric breaks this test,
#   not a production alert).
set -euo pipefail
source_dir=${1:?usage: prometheus_rules_test.sh SOURCE_DIR}
command -v promtool >/dev/null || { echo "SKIP: promtool (Debian package prometheus) not installed"; exit 77; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$source_dir/deploy/prometheus"
promtool check rules kmsplugin-alerts.yml
promtool test rules kmsplugin-alerts.test.yml

/usr/bin/python3 - "$source_dir" "$work/dashboard-rules.yml" <<'PY'
import json, os, re, sys
source, out = sys.argv[1], sys.argv[2]
dashboard = json.load(open(os.path.join(source, "deploy/grafana/kmsplugin-dashboard.json")))
exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
assert exprs, "the dashboard has no queries"
for p in dashboard["panels"]:
    assert p["datasource"]["uid"] == "${datasource}", f"panel {p['title']!r} must use the datasource variable"
lines = ["groups:", "  - name: dashboard", "    rules:"]
for i, e in enumerate(exprs):
    e = e.replace("$__rate_interval", "5m").replace("$__range", "1h").replace("$instance", ".*")
    lines.append(f"      - record: dashboard:query_{i}")
    lines.append("        expr: " + json.dumps(e))
open(out, "w").write("\n".join(lines) + "\n")
# Metric names used by the rules and the dashboard, against the names the source registers.
exported = set()
for root, _, files in os.walk(os.path.join(source, "kmsplugin")):
    for f in files:
        if f.endswith(".cc"):
            exported |= set(re.findall(r'"(kmsplugin_[a-z_]+)"', open(os.path.join(root, f)).read()))
used = set(re.findall(r"\b(kmsplugin_[a-z_]+)", " ".join(exprs) +
                      open(os.path.join(source, "deploy/prometheus/kmsplugin-alerts.yml")).read()))
unknown = sorted(u for u in used if re.sub(r"_(bucket|sum|count)$", "", u) not in exported)
if unknown:
    sys.exit(f"FAIL: rules or dashboard use metrics the plugin does not export: {unknown}")
print(f"OK: {len(exprs)} dashboard queries; {len(used)} metric names, all exported")
PY
promtool check rules "$work/dashboard-rules.yml"
echo "OK: alert rules pass their unit tests; every dashboard query is valid PromQL"
