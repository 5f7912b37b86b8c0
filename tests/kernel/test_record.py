"""``hekitrace record`` on the real kernel: a VM created, given a memslot and closed by
this test while the recorder runs ends up in the trace, and Ctrl-C stops it cleanly with
its one-line summary."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from hekitrace.state.events import Memslot, VmCreated, VmDestroyed
from hekitrace.trace.file import TraceReader
from tests.vmm import Vmm

pytestmark = pytest.mark.kernel


if os.geteuid() != 0:
    pytest.skip("kernel tests need root (BPF, /dev/kvm)", allow_module_level=True)

_HEKITRACE = [sys.executable, "-m", "hekitrace.cli"]


def _start(*args: str) -> subprocess.Popen:
    child = subprocess.Popen([*_HEKITRACE, "record", *args],
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = child.stderr.readline()
        if not line:
            break
        if "recording to" in line:
            return child
    child.kill()
    pytest.fail(f"recorder did not start: exit {child.wait()}, {child.stderr.read()}")


@pytest.mark.parametrize("encoding", ["jsonl", "binary"])
def test_record_writes_a_vm_lifecycle_and_stops_on_ctrl_c(tmp_path, encoding):
    out = tmp_path / f"trace.{encoding}"
    child = _start("-w", str(out), "--format", encoding, "--no-discovery")
    try:
        with Vmm() as vm:
            vm.add_memslot(gpa=0x100000, size_bytes=1 << 20)
        time.sleep(1.0)  # > one recorder tick
    finally:
        child.send_signal(signal.SIGINT)
        status = child.wait(30)
        err = child.stderr.read()
    assert status == 0, err
    summary = err.strip().splitlines()[-1]
    assert summary.startswith("hekitrace record: ") and f"({encoding})" in summary
    assert "lost 0" in summary
    problems: list = []
    events = [ev for ev in TraceReader(out, errors=problems) if ev.tgid == os.getpid()]
    assert problems == []
    created = [ev for ev in events if isinstance(ev, VmCreated)]
    assert {ev.source for ev in created} >= {"uevent"}
    slots = [ev for ev in events if isinstance(ev, Memslot)]
    assert [(ev.gpa, ev.size_bytes) for ev in slots][:1] == [(0x100000, 1 << 20)]
    assert any(isinstance(ev, VmDestroyed) for ev in events)
    assert "vm_created" in summary and "memslot" in summary


def test_record_duration_stops_by_itself(tmp_path):
    out = tmp_path / "t.htrace"
    child = _start("-w", str(out), "--duration", "1")
    assert child.wait(30) == 0
    assert "events in 1." in child.stderr.read().strip().splitlines()[-1]
    assert out.stat().st_size > 0
    assert out.stat().st_mode & 0o777 == 0o600   # VM names and maps: owner only (issue 19)


def test_record_rejects_a_non_positive_duration(tmp_path):
    proc = subprocess.run([*_HEKITRACE, "record", "-w", str(tmp_path / "x"), "--duration", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2  # EXIT_USAGE
    assert proc.stderr == ("hekitrace record: error: --duration 0.0: expected a positive "
                           "number of seconds\n")
    assert not (tmp_path / "x").exists()


def test_record_to_stdout_streams_json_lines(tmp_path):
    child = subprocess.Popen([*_HEKITRACE, "record", "-w", "-", "--format", "jsonl",
                              "--duration", "3", "--no-discovery"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and "recording to" not in child.stderr.readline():
        pass
    with Vmm() as vm:
        vm.add_memslot(gpa=0x200000, size_bytes=1 << 16)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[0]["kind"] == "header"
    # the recording host's MBEC setting travels with the trace (replay honours it)
    assert lines[0]["extra"]["mbec"] is False
    mine = [ev for ev in lines[1:] if ev["tgid"] == os.getpid()]
    assert any(ev["kind"] == "memslot" and ev["size_bytes"] == 1 << 16 for ev in mine)
    assert "to stdout (jsonl)" in err.strip().splitlines()[-1]
