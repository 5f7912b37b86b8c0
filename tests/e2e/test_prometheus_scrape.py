"""A real Prometheus server (Debian's ``prometheus``) on loopback scrapes
``hekitrace replay examples/attack.jsonl --metrics-port N`` with the shipped alert rules
loaded: its query API returns the expected series, and HekitraceCriticalFinding fires
for the attack example's victims (a counter that first appears above zero still alerts).
"""

from __future__ import annotations

import json
import os
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


# -- a running daemon --------------------------------------------------------------------

def test_prometheus_scrapes_daemon_and_cli_reads_it(tmp_path):
    """The real daemon watches this process as a VMM (a real KVM VM from tests/vmm.py);
    a guest protection hypercall is driven through the daemon's own program
    (BPF_PROG_TEST_RUN). Prometheus scrapes the daemon; `hekitrace vms` and
    `hekitrace snapshot PID` (the real CLI) read it over the control socket."""
    from hekitrace.capture.testrun import run_raw_tracepoint
    from hekitrace.config.abi import DEFAULT_PROFILE
    from tests.e2e.daemon_proc import (
        DaemonProcess,
        bpf_prog_ids_of,
        bpf_progs,
        metric_value,
        prog_fd_by_id,
    )
    from tests.vmm import Vmm

    if shutil.which("prometheus") is None:
        pytest.fail("prometheus missing: scripts/setup.sh installs Debian's prometheus")
    daemon = DaemonProcess().start()
    prom_port = free_port()
    (tmp_path / "prometheus.yml").write_text(f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
rule_files: [{RULES}]
scrape_configs:
  - job_name: hekitrace
    static_configs: [{{targets: ["127.0.0.1:{daemon.port}"]}}]
""")
    prom = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{prom_port}"
    me = str(os.getpid())
    ids = bpf_prog_ids_of(daemon.proc.pid)
    names = bpf_progs()
    fd = prog_fd_by_id(next(i for i in ids if names.get(i) == "hk_hypercall_raw"))
    try:
        with Vmm() as vm:
            vm.add_memslot(0x0, 64 << 20)
            wait_for("the VM in hekitrace_vm_info", lambda: f'pid="{me}"' in daemon.metrics())
            # kernel text r-x immutable, 16..24 MiB (guest bits R|X|IMMUTABLE = 1|4|8)
            head = vm.write_heki_list([0x100000], [(0x1000000, 0x1800000, 13)])
            run_raw_tracepoint(fd, [DEFAULT_PROFILE.protect_memory, head, 0, 0, 0])
            wait_for("2048 requested pages", lambda: any(
                metric_value(daemon.metrics(), line.split(" ")[0]) == 2048.0
                for line in daemon.metrics().splitlines()
                if line.startswith("hekitrace_vm_protected_pages")
                and 'class="r-x_immutable"' in line and 'map="requested"' in line))

            series = wait_for("the daemon's series in Prometheus", lambda: query(
                base, f'hekitrace_vm_protected_pages{{map="requested",class="r-x_immutable"}}'
                      f' == 2048 and on (vm) hekitrace_vm_info{{pid="{me}"}}'))
            assert series[0]["metric"]["job"] == "hekitrace"
            assert query(base, "hekitrace_ready == 1")
            assert query(base, 'hekitrace_hook_attached{hook="hypercall"} == 1')

            cli = [sys.executable, "-m", "hekitrace.cli"]
            vms = subprocess.run([*cli, "vms", "-o", "json", "--socket", daemon.socket_path],
                                 check=False, capture_output=True, text=True, timeout=60)
            assert vms.returncode == 0, vms.stderr
            assert any(str(v["pid"]) == me for v in json.loads(vms.stdout))
            snap = subprocess.run([*cli, "snapshot", me, "--socket", daemon.socket_path],
                                  check=False, capture_output=True, text=True, timeout=60)
            assert snap.returncode == 0, snap.stderr
            assert "r-x immutable" in snap.stdout and "8.0 MiB" in snap.stdout
            table = subprocess.run([*cli, "snapshot", me, "--ranges", "--map", "requested",
                                    "--socket", daemon.socket_path], check=False,
                                   capture_output=True, text=True, timeout=60)
            assert "0x000001000000  0x000001800000     8.0 MiB  r-x I" in table.stdout
    finally:
        os.close(fd)
        prom.send_signal(signal.SIGINT)
        try:
            prom.wait(timeout=20)
        except subprocess.TimeoutExpired:
            prom.kill()
            prom.wait()
        daemon.close()
