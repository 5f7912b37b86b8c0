"""A real Prometheus server (Debian's ``prometheus``) for e2e tests, and the dashboard's
queries as Grafana would send them to it.

``PrometheusProcess(tmp_path, scrape_configs)`` starts one on a free loopback port with
the shipped alert rules and a 1 s scrape interval; ``query`` runs PromQL through its HTTP
API; ``label_values`` answers a Grafana ``label_values(selector, label)`` variable query
the way Grafana's Prometheus data source does (``/api/v1/label/<label>/values`` with
``match[]``). ``dashboard_targets`` and ``substitute`` turn the shipped dashboard's panel
queries into PromQL for one choice of its variables.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.daemon_proc import free_port

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "packaging" / "prometheus" / "hekitrace-alerts.yml"
DASHBOARD = ROOT / "packaging" / "grafana" / "hekitrace.json"


def wait_until(what: str, check, timeout: float = 90.0):
    """Poll ``check`` until it returns something truthy (and return that)."""
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


class PrometheusProcess:
    def __init__(self, directory: Path, scrape_configs: str) -> None:
        if shutil.which("prometheus") is None:
            pytest.fail("prometheus missing: scripts/setup.sh installs Debian's prometheus")
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        config = directory / "prometheus.yml"
        config.write_text("global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
                          f"rule_files: [{RULES}]\nscrape_configs:\n{scrape_configs}")
        self.log = directory / "prometheus.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                ["prometheus", f"--config.file={config}",
                 f"--storage.tsdb.path={directory / 'prometheus-data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=subprocess.DEVNULL, stderr=log)

    def get(self, path: str, **params: str) -> dict:
        url = f"{self.base}{path}?" + urllib.parse.urlencode(params, doseq=True)
        with urllib.request.urlopen(url, timeout=10) as reply:
            doc = json.load(reply)
        assert doc["status"] == "success", doc
        return doc["data"]

    def query(self, promql: str) -> list[dict]:
        return self.get("/api/v1/query", query=promql)["result"]

    def label_values(self, definition: str) -> list[str]:
        """A Grafana ``label_values(SELECTOR, LABEL)`` variable query."""
        match = re.fullmatch(r"label_values\((.*), *(\w+)\)", definition)
        assert match, definition
        selector, label = match.groups()
        return self.get(f"/api/v1/label/{label}/values", **{"match[]": selector})

    def targets(self) -> list[dict]:
        return self.get("/api/v1/targets")["activeTargets"]

    def close(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title + refId, expression) of every panel query of the shipped dashboard."""
    return [(f"{panel['title']} [{target['refId']}]", target["expr"])
            for panel in dashboard()["panels"] for target in panel.get("targets", ())]


def dashboard_variable(name: str) -> str:
    """The query (``definition``) of template variable ``name``."""
    var = next(v for v in dashboard()["templating"]["list"] if v["name"] == name)
    return var["definition"]


def regex_value(value: str) -> str:
    """One chosen value as Grafana puts it into a ``=~"..."`` matcher: regex-escaped,
    then escaped for a PromQL double-quoted string."""
    return re.escape(value).replace("\\", "\\\\")


def substitute(expr: str, instance: str | None, vm: str | None,
               rate_interval: str = "1m") -> str:
    """``expr`` with ``$instance`` and ``$vm`` set to one value each (None: All, which the
    dashboard maps to ``.*``) and ``$__rate_interval`` to ``rate_interval``."""
    out = expr.replace("$__rate_interval", rate_interval)
    out = out.replace("$instance", ".*" if instance is None else regex_value(instance))
    out = out.replace("$vm", ".*" if vm is None else regex_value(vm))
    assert "$" not in out, out
    return out
