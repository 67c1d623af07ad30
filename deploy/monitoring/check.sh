#!/usr/bin/env bash
# Checks the monitoring files: the alerting rules (promtool check rules, and the unit
# tests in shroud.rules.test.yml with promtool test rules), the Grafana dashboard
# (valid JSON, every query parses as PromQL, checked by promtool as recording rules),
# and that every metric the rules and the dashboard use is one the relay exports
# (named in relay/src/metrics.rs). promtool: Debian package `prometheus`.
set -euo pipefail
cd "$(dirname "$0")"
command -v promtool >/dev/null || { echo "check.sh: promtool is missing (apt-get install prometheus)" >&2; exit 1; }

promtool check rules shroud.rules.yml
promtool test rules shroud.rules.test.yml

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 - "$tmp/dashboard.rules.yml" <<'PY'
import json, re, sys
d = json.load(open("shroud-dashboard.json"))
assert d["uid"] and d["panels"], "dashboard without uid or panels"
ids = [p["id"] for p in d["panels"]]
assert len(ids) == len(set(ids)), "duplicate panel ids"
exprs = [t["expr"] for p in d["panels"] for t in p["targets"]]
exprs += [v["query"] for v in d["templating"]["list"] if v["type"] == "query"]
subst = {"$job": "shroud", "$instance": ".*", "$__rate_interval": "5m"}
lines = ["groups:", "  - name: dashboard", "    rules:"]
for i, e in enumerate(exprs):
    m = re.fullmatch(r"label_values\((.*), *\w+\)", e)
    if m:
        e = m.group(1)
    for k, v in subst.items():
        e = e.replace(k, v)
    lines += [f"      - record: dashboard:expr{i}", f"        expr: {json.dumps(e)}"]
open(sys.argv[1], "w").write("\n".join(lines) + "\n")
print(f"dashboard: {len(d['panels'])} panels, {len(exprs)} queries")
PY
promtool check rules "$tmp/dashboard.rules.yml"

python3 - <<'PY'
import re
source = open("../../relay/src/metrics.rs").read()
exported = set(re.findall(r'"((?:shroud|process)_[a-z_]+)"', source))
used = set()
for f in ("shroud.rules.yml", "shroud-dashboard.json"):
    used |= set(re.findall(r"\b((?:shroud|process)_[a-z_]+)", open(f).read()))
def base(n):
    for suffix in ("_bucket", "_total", "_sum", "_count"):
        if n.endswith(suffix) and n[: -len(suffix)] in exported:
            return n[: -len(suffix)]
    return n
missing = sorted(n for n in used if base(n) not in exported)
assert not missing, f"used but not exported by the relay: {missing}"
print(f"metrics: {len(used)} names used, all exported")
PY
echo "monitoring: OK"
