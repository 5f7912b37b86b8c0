"""packaging/systemd/hekitrace.service: verified by systemd, and consistent with what
the daemon does and needs (the other e2e tests run the daemon with its capability set;
the last test here runs it as the unit does, on a non-root uid with those capabilities
ambient). Its hardening score is a unit test (tests/unit/test_packaging.py)."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from tests.e2e.daemon_proc import HEKITRACE, ROOT, DaemonProcess, metric_value, unit_capabilities

pytestmark = pytest.mark.e2e

UNIT = Path(__file__).resolve().parents[2] / "packaging" / "systemd" / "hekitrace.service"


def _unit() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read_string(UNIT.read_text())
    return parser


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze absent: scripts/setup.sh installs 'systemd'")
def test_systemd_unit_passes_systemd_analyze_verify():
    proc = subprocess.run(["systemd-analyze", "verify", str(UNIT)], check=False, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr.strip() == "", proc.stderr


def test_systemd_unit_settings():
    unit = _unit()
    svc = unit["Service"]
    assert svc["Type"] == "notify"
    assert svc["NotifyAccess"] == "main"
    assert int(svc["WatchdogSec"]) > 0
    assert svc["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert svc["Restart"] == "on-failure"
    assert int(unit["Unit"]["StartLimitBurst"]) > 0
    assert "libvirtd.service" in unit["Unit"]["Before"]
    caps = svc["CapabilityBoundingSet"].split()
    assert svc["AmbientCapabilities"].split() == caps
    assert {"CAP_BPF", "CAP_PERFMON"} <= set(caps) and "CAP_SYS_ADMIN" not in caps
    assert svc["NoNewPrivileges"] == "yes" and svc["ProtectSystem"] == "strict"
    assert svc["RuntimeDirectory"] == svc["StateDirectory"] == "hekitrace"
    assert set(svc["RestrictAddressFamilies"].split()) == {
        "AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    assert "daemon" in svc["ExecStart"].split()


def test_systemd_unit_directories_match_the_default_config():
    from hekitrace.config.settings import DEFAULT_CONFIG_PATH, default_config
    svc = _unit()["Service"]
    cfg = default_config()
    assert cfg.control.socket.startswith(f"/run/{svc['RuntimeDirectory']}/")
    assert cfg.journal.directory == f"/var/lib/{svc['StateDirectory']}"
    assert DEFAULT_CONFIG_PATH.startswith(f"/etc/{svc['ConfigurationDirectory']}/")
    assert DEFAULT_CONFIG_PATH in svc["ExecStart"]


class DynamicUserDaemon(DaemonProcess):
    """The daemon as the unit runs it: a non-root uid (the unit's DynamicUser=) holding only
    the unit's capabilities, as ambient capabilities, with no_new_privs."""

    UID = 65534

    def start(self, timeout: float = 60.0) -> DaemonProcess:
        run = self.dir / "run"
        run.mkdir()
        os.chown(run, self.UID, self.UID)         # RuntimeDirectory= belongs to the user
        os.chmod(self.notify_path, 0o666)          # systemd's notify socket takes any uid
        env = dict(os.environ, NOTIFY_SOCKET=self.notify_path,
                   WATCHDOG_USEC=str(self.watchdog_usec), PYTHONUNBUFFERED="1")
        env.pop("WATCHDOG_PID", None)
        caps = ",".join("+" + c for c in unit_capabilities())
        cmd = ["setpriv", f"--reuid={self.UID}", f"--regid={self.UID}", "--clear-groups",
               f"--bounding-set=-all,{caps}", f"--inh-caps={caps}", f"--ambient-caps={caps}",
               "--no-new-privs", "--", *HEKITRACE, "daemon", "--config", str(self.config_path),
               "--foreground-status"]
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 (closed by stop())
        self.proc = subprocess.Popen(cmd, env=env, cwd=str(ROOT), stdout=subprocess.DEVNULL,
                                     stderr=self._stderr)
        self._reader = threading.Thread(target=self._read_notify, daemon=True)
        self._reader.start()
        self.wait_message(lambda m: m.startswith("READY=1"), timeout, since=0)
        return self


def test_daemon_works_as_the_units_dynamic_user():
    """DynamicUser=yes: every required hook attaches and root's CLI reaches the control
    socket with only the unit's capabilities on a non-root uid."""
    svc = _unit()["Service"]
    assert svc["DynamicUser"] == "yes" and svc["NoNewPrivileges"] == "yes"
    daemon = DynamicUserDaemon().start()
    try:
        status = Path(f"/proc/{daemon.proc.pid}/status").read_text()
        assert re.search(rf"^Uid:\s+{DynamicUserDaemon.UID}\s", status, re.MULTILINE), status
        metrics = daemon.metrics()
        assert metric_value(metrics, "hekitrace_ready") == 1.0, daemon.stderr()
        required = [ln for ln in metrics.splitlines()
                    if ln.startswith("hekitrace_hook_attached{") and 'required="true"' in ln]
        assert required and all(ln.endswith(" 1.0") for ln in required), required
        vms = subprocess.run([*HEKITRACE, "vms", "--socket", daemon.socket_path], cwd=str(ROOT),
                             check=False, capture_output=True, text=True, timeout=60)
        assert vms.returncode == 0, vms.stdout + vms.stderr
        assert daemon.stop() == 0, daemon.stderr()
    finally:
        daemon.close()
