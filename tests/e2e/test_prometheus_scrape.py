"""A real Prometheus server (Debian's ``prometheus``) on loopback scrapes
``hekitrace replay examples/attack.jsonl --metrics-port N`` with the shipped alert rules
loaded: its query API returns the expected series, and HekitraceCriticalFinding fires
for the attack example's victims (a counter that first appears above zero still alerts).
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "packaging" / "prometheus" / "hekitrace-alerts.yml"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return json.load(reply)


def wait_for(what: str, check, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except OSError as error:
            last = error
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


@pytest.fixture
def replay_and_prometheus(tmp_path):
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus missing: scripts/setup.sh installs Debian's prometheus")
    metrics_port, prom_port = free_port(), free_port()
    config = tmp_path / "hekitrace.yaml"
    config.write_text("abi:\n  mbec: true\n")
    replay = subprocess.Popen([sys.executable, "-m", "hekitrace.cli", "replay",
                               str(ROOT / "examples" / "attack.jsonl"), "--metrics-port",
                               str(metrics_port), "--config", str(config)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    (tmp_path / "prometheus.yml").write_text(f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
rule_files: [{RULES}]
scrape_configs:
  - job_name: hekitrace
    static_configs: [{{targets: ["127.0.0.1:{metrics_port}"]}}]
""")
    prom = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        yield f"http://127.0.0.1:{prom_port}"
    finally:
        for proc in (prom, replay):
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def query(base: str, promql: str) -> list[dict]:
    doc = get_json(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
    assert doc["status"] == "success", doc
    return doc["data"]["result"]


def test_prometheus_scrapes_replay_and_alert_fires(replay_and_prometheus):
    base = replay_and_prometheus
    wait_for("the hekitrace target to be up",
             lambda: query(base, 'up{job="hekitrace"} == 1'))
    def six_locked() -> list[dict] | None:
        rows = query(base, "hekitrace_vm_locked_down == 1")
        return rows if len(rows) == 6 else None

    locked = wait_for("six locked-down VMs", six_locked)
    assert {r["metric"]["vm"] for r in locked} == {
        "victim-wt", "victim-xd", "victim-cr", "victim-ro", "victim-wx", "victim-ml"}
    findings = query(base, 'hekitrace_findings_total{rule="protected_write"}')
    assert [(r["metric"]["vm"], r["value"][1]) for r in findings] == [("victim-wt", "4000")]
    assert query(base, 'hekitrace_vm_protected_pages{vm="victim-wt",map="applied",'
                       'class="r-x_immutable"}')

    def firing() -> list[dict]:
        alerts = get_json(f"{base}/api/v1/alerts")["data"]["alerts"]
        return [a for a in alerts if a["state"] == "firing"]

    def critical_for_wt():
        return [a for a in firing() if a["labels"]["alertname"] == "HekitraceCriticalFinding"
                and a["labels"].get("vm") == "victim-wt"]

    alert = wait_for("HekitraceCriticalFinding for victim-wt", critical_for_wt)[0]
    assert alert["labels"]["rule"] == "protected_write"
    assert "victim-wt" in alert["annotations"]["description"]
    names = {(a["labels"]["alertname"], a["labels"].get("vm")) for a in firing()}
    assert ("HekitraceCrPinViolation", "victim-cr") in names
    assert ("HekitraceImmutableRelaxed", "victim-ro") in names
    # a healthy replay is ready: the not-ready alert stays quiet
    assert not [n for n in names if n[0] == "HekitraceNotReady"]
