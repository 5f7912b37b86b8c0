"""``hekitrace record`` on the real kernel: a VM created, given a memslot and closed by
this test while the recorder runs ends up in the trace, and Ctrl-C stops it cleanly with
its one-line summary."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hekitrace.events import Memslot, VmCreated, VmDestroyed
from hekitrace.trace import TraceReader

pytestmark = pytest.mark.kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vmm import Vmm  # noqa: E402  (tests/vmm.py, the tests' tiny VMM)

if os.geteuid() != 0:
    pytest.skip("kernel tests need root (BPF, /dev/kvm)", allow_module_level=True)

# The record subcommand alone: cli.build_parser() imports every subcommand, and this test
# is about this one.
_LAUNCH = ("import argparse, sys\n"
           "from hekitrace.commands import record\n"
           "parser = argparse.ArgumentParser(prog='hekitrace')\n"
           "record.add_parser(parser.add_subparsers(dest='command'))\n"
           "sys.exit(record.run(parser.parse_args(sys.argv[1:])))\n")


def _start(*args: str) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", _LAUNCH, "record", *args],
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
    child = _start("-o", str(out), "--format", encoding, "--no-discovery")
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
    child = _start("-o", str(out), "--duration", "1")
    assert child.wait(30) == 0
    assert "events in 1." in child.stderr.read().strip().splitlines()[-1]
    assert out.stat().st_size > 0


def test_record_rejects_a_non_positive_duration(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _LAUNCH, "record", "-o",
                           str(tmp_path / "x"), "--duration", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "--duration 0.0: expected a positive number of seconds" in proc.stderr
