"""The alert rules: promtool accepts them and their unit tests pass; every alert has a
summary, a description naming the VM or hook, a runbook section, and promtool tests that
both fire it and keep it quiet."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "packaging" / "prometheus"
RULES = PROM / "hekitrace-alerts.yml"
TESTS = PROM / "hekitrace-alerts.test.yml"

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool missing: scripts/setup.sh installs "
                                           "Debian's prometheus package")


def alerts() -> list[dict]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


@needs_promtool
def test_promtool_check_rules():
    result = subprocess.run(["promtool", "check", "rules", str(RULES)], check=False, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_test_rules():
    result = subprocess.run(["promtool", "test", "rules", TESTS.name], cwd=PROM,
                            check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_every_alert_is_documented_and_annotated():
    runbook = (ROOT / "docs" / "runbook.md").read_text()
    headings = {h.strip().lower() for h in re.findall(r"^## (.+)$", runbook, re.MULTILINE)}
    for rule in alerts():
        name = rule["alert"]
        ann = rule["annotations"]
        assert ann.get("summary") and ann.get("description"), name
        assert "{{ $labels.instance }}" in ann["description"], name
        assert name.lower() in headings, f"docs/runbook.md has no '## {name}' section"
        assert ann["runbook_url"].endswith("#" + name.lower()), name
        assert rule["labels"]["severity"] in ("warning", "critical"), name


def test_every_alert_is_unit_tested_both_ways():
    doc = yaml.safe_load(TESTS.read_text())
    fired, quiet = set(), set()
    for case in doc["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {r["alert"] for r in alerts()}
    assert names <= fired, f"never shown to fire: {names - fired}"
    assert names <= quiet, f"never shown to stay quiet: {names - quiet}"
