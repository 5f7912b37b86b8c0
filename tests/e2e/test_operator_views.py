"""`hekitrace status` and `hekitrace top` against a real daemon: the JSON documents, the
tables, and the full-screen view in a real pseudo-terminal (quit, Ctrl-C, resize)."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import signal
import struct
import subprocess
import termios
import time

import pytest

from tests.e2e.daemon_proc import HEKITRACE, DaemonProcess
from tests.vmm import Vmm

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def daemon():
    d = DaemonProcess().start()
    yield d
    d.close()


def _cli(daemon: DaemonProcess, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*HEKITRACE, *args, "--socket", daemon.socket_path,
                           "--config", str(daemon.config_path)],
                          capture_output=True, text=True, timeout=60, check=False,
                          stdin=subprocess.DEVNULL)


def test_status_json_lists_hooks_rules_losses_and_journal(daemon):
    proc = _cli(daemon, "status", "-o", "json")
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert status["ready"] is True and status["pid"] == daemon.proc.pid
    hooks = {h["hook"]: h for h in status["hooks"]}
    assert "hypercall" in hooks and hooks["hypercall"]["attached"] is True
    for hook in hooks.values():
        assert hook["attached"] or hook["reason"], hook      # every missing hook says why
    assert isinstance(status["events_lost_total"], list)
    assert "journal" in status and status["config"]["sha256"]
    rules = status["policy"]["rules"]
    assert rules["wx_request"] == "active"
    assert all(state == "active" or ":" in state or state == "disabled"
               for state in rules.values()), rules


def test_status_table_names_the_hooks(daemon):
    proc = _cli(daemon, "status")
    assert proc.returncode == 0, proc.stderr
    assert "READY" in proc.stdout.splitlines()[0] and "HOOKS" in proc.stdout
    assert all(len(line) <= 80 for line in proc.stdout.splitlines())


def test_status_without_daemon_is_exit_2(tmp_path):
    proc = subprocess.run([*HEKITRACE, "status", "--socket", str(tmp_path / "none.sock")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 6 and "no daemon" in proc.stderr and "--from" not in proc.stderr


def test_top_once_shows_a_vm_created_after_the_daemon(daemon):
    with Vmm() as vm:
        vm.add_memslot(0, 1 << 20)
        deadline = time.monotonic() + 30
        while True:
            proc = _cli(daemon, "top", "--once", "-o", "json", "-d", "0.5")
            assert proc.returncode == 0, proc.stderr
            frame = json.loads(proc.stdout)
            mine = [v for v in frame["vms"] if v["pid"] == os.getpid()]
            if mine or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert mine, frame
        assert set(mine[0]["rates"]) >= {"hc", "prot", "appl", "fault", "cr"}
        assert frame["interval_seconds"] >= 0.5
        table = _cli(daemon, "top", "--once", "-d", "0.2", "--vm", str(os.getpid()))
        assert table.returncode == 0 and str(os.getpid()) in table.stdout


def _spawn_top(daemon: DaemonProcess, rows: int, cols: int) -> tuple[int, int]:
    pid, fd = pty.fork()
    if pid == 0:   # the child: hekitrace top on the pty, as a person runs it
        os.environ["TERM"] = "xterm"
        os.execv(HEKITRACE[0], [*HEKITRACE, "top", "-d", "0.3", "--socket",
                                daemon.socket_path, "--config", str(daemon.config_path)])
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    return pid, fd


def _read_until(fd: int, needle: bytes, timeout: float = 20.0) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                seen += os.read(fd, 65536)
            except OSError:
                break
    return seen


def _wait_exit(pid: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("hekitrace top did not exit")


@pytest.mark.parametrize("how", ["q", "ctrl-c"])
def test_top_full_screen_redraws_on_resize_and_exits_cleanly(daemon, how):
    pid, fd = _spawn_top(daemon, 24, 80)
    try:
        assert b"hekitrace top" in _read_until(fd, b"hekitrace top")
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
        os.kill(pid, signal.SIGWINCH)
        assert b"q quit" in _read_until(fd, b"q quit")      # redrawn at the new size
        os.write(fd, b"s")                                   # change the sort column
        assert b"sorted by prot" in _read_until(fd, b"sorted by prot")
        os.write(fd, b"q" if how == "q" else b"\x03")
        assert _wait_exit(pid) == 0
    finally:
        os.close(fd)


def test_events_follow_streams_a_vm_created_after_it_started(daemon):
    proc = subprocess.Popen([*HEKITRACE, "events", "--follow", "-o", "json",
                             "--socket", daemon.socket_path, "--config",
                             str(daemon.config_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2.0)                      # subscribed before the VM exists
        with Vmm() as vm:
            vm.add_memslot(0, 1 << 20)
            deadline = time.monotonic() + 30
            seen = []
            os.set_blocking(proc.stdout.fileno(), False)
            while time.monotonic() < deadline:
                line = proc.stdout.readline()
                if not line:
                    time.sleep(0.1)
                    continue
                record = json.loads(line)
                seen.append(record["kind"])
                if record["kind"] == "vm_created" and record["tgid"] == os.getpid():
                    break
            else:
                raise AssertionError(f"no vm_created for pid {os.getpid()}; saw {seen}")
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0, proc.stderr.read()


def test_events_without_follow_prints_the_findings_held(daemon):
    proc = _cli(daemon, "events", "-o", "json")
    assert proc.returncode == 0, proc.stderr
    assert all(json.loads(line)["kind"] == "finding" for line in proc.stdout.splitlines())
    bad = _cli(daemon, "events", "--follow", "--kind", "nope")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_check_and_the_daemon_give_the_same_reason_for_a_missing_hook(daemon):
    """The attr hook on a kernel without kvm_arch_post_set_memory_attributes: 'check'
    and the daemon's status name the same reason (one function decides it)."""
    check = subprocess.run([*HEKITRACE, "check", "-o", "json", "--config",
                            str(daemon.config_path)], capture_output=True, text=True,
                           timeout=300, check=False)
    hooks = {h["hook"]: h for h in json.loads(check.stdout)["hooks"]}
    attr = hooks["kvm_arch_post_set_memory_attributes"]
    status = json.loads(_cli(daemon, "status", "-o", "json").stdout)
    daemon_attr = {h["hook"]: h for h in status["hooks"]}["attr_applied"]
    if attr["attachable"]:
        assert daemon_attr["attached"], daemon_attr
    else:
        assert not daemon_attr["attached"]
        assert attr["reason"].removeprefix("cannot attach: ") in daemon_attr["reason"], \
            (attr["reason"], daemon_attr["reason"])
