"""``hekitrace snapshot`` / ``hekitrace vms`` through the real CLI: golden outputs for
the bundled attack example (state rebuilt with --from), and the error cases an operator
meets (no daemon, unknown/ambiguous VM, socket denied, daemon dying mid-reply): one
line on stderr, a documented exit status, never a traceback.

Regenerate the golden files with ``HEKITRACE_UPDATE_GOLDEN=1`` (the one switch for every
golden file, tests/conftest.py) and review the diff.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from hekitrace.commands import exit_status

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "fixtures" / "snapshot"
ATTACK = str(ROOT / "examples" / "attack.jsonl")


def cli(*args: str, cwd: Path = ROOT, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hekitrace.cli", *args], cwd=cwd,
                          check=False, capture_output=True, text=True, timeout=120, **kw)


@pytest.fixture(scope="module")
def empty_config(tmp_path_factory) -> str:
    """Defaults, except MBEC as the examples were recorded (no notice line on stderr)."""
    path = tmp_path_factory.mktemp("cfg") / "hekitrace.yaml"
    path.write_text("abi:\n  mbec: true\n")
    return str(path)


@pytest.mark.parametrize("name,args", [
    ("summary.txt", ["snapshot", "victim-wt"]),
    ("summary-degraded.txt", ["snapshot", "victim-ml"]),
    ("ranges.txt", ["snapshot", "victim-wt", "--ranges"]),
    ("ranges-applied.txt", ["snapshot", "418050", "--ranges", "--map", "applied"]),
    ("snapshot.json", ["snapshot", "victim-wt", "-o", "json"]),
    ("snapshot.yaml", ["snapshot", "victim-wt", "-o", "yaml"]),
    ("vms.txt", ["vms"]),
    ("vms.json", ["vms", "-o", "json"]),
    ("at.txt", ["snapshot", "victim-wt", "--at", "2026-11-25T15:00:01Z"]),
])
def test_golden_output(name, args, empty_config, golden):
    result = cli(*args, "--from", ATTACK, "--config", empty_config)
    assert result.returncode == 0, result.stderr
    golden(GOLDEN / name, result.stdout)
    if name.endswith(".txt"):
        assert max(len(line) for line in result.stdout.splitlines()) <= 80


def test_json_and_yaml_are_the_same_document(empty_config):
    js = json.loads((GOLDEN / "snapshot.json").read_text())
    ym = yaml.safe_load((GOLDEN / "snapshot.yaml").read_text())
    assert js == ym
    assert js["vm"]["name"] == "victim-wt" and js["findings"][0]["rule"] == "protected_write"
    assert len(js["ranges"]) == js["vm"]["ranges_stored"]["requested"]


def test_at_shows_the_state_before_lockdown():
    text = (GOLDEN / "at.txt").read_text()
    assert "lockdown NO" in text and "FINDINGS: 0" in text


def test_diff_against_saved_snapshot(tmp_path, empty_config, golden):
    before = cli("snapshot", "victim-wt", "-o", "json", "--from", ATTACK, "--at",
                 "2026-11-25T15:00:01.5Z", "--config", empty_config)
    assert before.returncode == 0, before.stderr
    saved = tmp_path / "before.json"
    saved.write_text(before.stdout)
    result = cli("snapshot", "victim-wt", "--diff", str(saved), "--from", ATTACK,
                 "--config", empty_config)
    assert result.returncode == 0, result.stderr
    golden(GOLDEN / "diff.txt", result.stdout)
    assert "+CR4.SMEP" in result.stdout and "protected_write" in result.stdout


def test_help_shows_examples():
    result = cli("snapshot", "--help")
    assert result.returncode == 0
    assert "examples:" in result.stdout and "hekitrace snapshot web1 --diff" in result.stdout
    result = cli("vms", "--help")
    assert "examples:" in result.stdout


def _one_line_error(result: subprocess.CompletedProcess, status: int, *needles: str) -> None:
    assert result.returncode == status, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    first = result.stderr.splitlines()[0]
    for needle in needles:
        assert needle in first, first


def test_no_daemon(tmp_path):
    sock = tmp_path / "control.sock"
    for args in (["snapshot", "web1"], ["vms"]):
        result = cli(*args, "--socket", str(sock))
        _one_line_error(result, exit_status.NO_DAEMON, "no daemon is running", str(sock),
                        "systemctl start hekitrace", "--from FILE")
        assert len(result.stderr.splitlines()) == 1


def test_unknown_vm_lists_the_known(empty_config):
    result = cli("snapshot", "nosuchvm", "--from", ATTACK, "--config", empty_config)
    _one_line_error(result, exit_status.UNKNOWN_VM, "unknown VM 'nosuchvm'")
    assert "victim-wt (pid 418050)" in result.stderr


def test_at_without_from_is_a_usage_error(tmp_path):
    result = cli("snapshot", "web1", "--at", "+1", "--socket", str(tmp_path / "s"))
    _one_line_error(result, 2, "--at needs --from")


def test_bad_saved_snapshot(tmp_path, empty_config):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    result = cli("snapshot", "victim-wt", "--diff", str(bad), "--from", ATTACK,
                 "--config", empty_config)
    _one_line_error(result, 4, "not a JSON snapshot")


class FakeDaemon:
    """A real Unix socket server answering each connection with fixed bytes, then closing."""

    def __init__(self, path: Path, reply: bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(4)
        self.reply = reply
        self.requests: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                self.requests.append(conn.recv(65536))
                conn.sendall(self.reply)

    def close(self) -> None:
        self.sock.close()


def test_daemon_dies_mid_reply(tmp_path):
    path = tmp_path / "control.sock"
    daemon = FakeDaemon(path, b'{"ok": true, "result": {"schema": 1, "vm": {"na')
    try:
        result = cli("snapshot", "web1", "--socket", str(path))
    finally:
        daemon.close()
    _one_line_error(result, exit_status.FAILURE, "closed the connection after", "did it die?")
    assert json.loads(daemon.requests[0]) == {"op": "snapshot", "vm": "web1",
                                              "maps": ["requested", "applied"]}


def test_ambiguous_vm_from_daemon(tmp_path):
    path = tmp_path / "control.sock"
    reply = {"ok": False, "error": {"code": "ambiguous_vm",
                                    "message": "VM 'web1' is ambiguous: 2 VMs match",
                                    "choices": ["web1 (pid 1)", "web1 (pid 2)"]}}
    daemon = FakeDaemon(path, json.dumps(reply).encode() + b"\n")
    try:
        result = cli("snapshot", "web1", "--socket", str(path))
    finally:
        daemon.close()
    _one_line_error(result, exit_status.UNKNOWN_VM, "ambiguous")
    assert "web1 (pid 2)" in result.stderr


def test_snapshot_from_daemon_reply_renders(tmp_path):
    """A daemon's reply (here the golden JSON) renders like --from does."""
    path = tmp_path / "control.sock"
    doc = json.loads((GOLDEN / "snapshot.json").read_text())
    daemon = FakeDaemon(path, json.dumps({"ok": True, "result": doc}).encode() + b"\n")
    try:
        result = cli("snapshot", "victim-wt", "--socket", str(path))
    finally:
        daemon.close()
    assert result.returncode == 0, result.stderr
    assert result.stdout == (GOLDEN / "summary.txt").read_text()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown a socket and setuid")
def test_socket_permission_denied(tmp_path):
    os.chmod(tmp_path, 0o755)
    path = tmp_path / "control.sock"
    daemon = FakeDaemon(path, b'{"ok": true, "result": {"vms": []}}\n')
    os.chmod(path, 0o600)
    env = dict(os.environ, PYTHONPATH=str(ROOT), HOME="/tmp")
    try:
        result = cli("vms", "--socket", str(path), user=65534, group=65534, env=env,
                     cwd=Path("/tmp"))
    finally:
        daemon.close()
    _one_line_error(result, exit_status.PERMISSION_DENIED, "permission denied", str(path))
