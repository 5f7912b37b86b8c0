"""packaging/systemd/hekitrace.service: verified by systemd, and consistent with what
the daemon does and needs (the other e2e tests run the daemon with its capability set)."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

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
