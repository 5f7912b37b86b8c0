"""The Grafana dashboard: valid JSON Grafana can import, unique panel ids, a gridPos per
panel inside the 24-column grid, templated datasource/instance/vm, and every metric a
panel queries is one of the names fixed in docs/internals.md."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "packaging" / "grafana" / "hekitrace.json"
PROMQL_WORDS = {"sum", "by", "count", "rate", "increase", "sort_desc", "label_values",
                "instance", "vm", "rule", "severity", "stage", "reason", "kind", "class",
                "map", "without", "and", "or", "unless", "on", "max", "min", "avg"}


def documented_metrics() -> set[str]:
    text = (ROOT / "docs" / "internals.md").read_text()
    section = text.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"\b(hekitrace_[a-z_]+)", section))


def metric_names(expr: str) -> set[str]:
    expr = re.sub(r"\{[^}]*\}", "", expr)       # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)      # ranges
    return set(re.findall(r"\b(hekitrace_[a-z_]+)", expr))


def test_dashboard_structure():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 30
    names = {v["name"]: v for v in dash["templating"]["list"]}
    assert names["datasource"]["type"] == "datasource"
    assert names["datasource"]["query"] == "prometheus"
    assert {"instance", "vm"} <= set(names)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in dash["panels"]:
        grid = panel["gridPos"]
        assert {"x", "y", "w", "h"} <= set(grid), panel["title"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboard_queries_only_documented_metrics():
    known = documented_metrics()
    assert "hekitrace_findings_total" in known and len(known) > 20
    dash = json.loads(DASHBOARD.read_text())
    used: set[str] = set()
    for panel in dash["panels"]:
        for target in panel.get("targets", ()):
            names = metric_names(target["expr"])
            assert names, f"{panel['title']}: no hekitrace metric in {target['expr']}"
            assert names <= known, f"{panel['title']}: unknown {names - known}"
            used |= names
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            assert metric_names(var["definition"]) <= known
    # the fleet and drill-down views the issue asks for
    for needed in ("hekitrace_vms", "hekitrace_vm_locked_down", "hekitrace_findings_total",
                   "hekitrace_vm_protected_pages", "hekitrace_events_lost_total",
                   "hekitrace_hook_attached"):
        assert needed in used, needed


def test_alert_rules_use_only_documented_metrics():
    rules = (ROOT / "packaging" / "prometheus" / "hekitrace-alerts.yml").read_text()
    exprs = re.findall(r"expr: \|?\n?((?:.*\n)*?)\s*(?:for|labels):", rules)
    used = set().union(*(metric_names(e) for e in exprs))
    assert used and used <= documented_metrics(), used - documented_metrics()
