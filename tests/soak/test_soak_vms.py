"""Soak: many VMs created and destroyed under a real daemon; nothing may accumulate.

Not part of the default suite (minutes long): it runs only with ``HEKITRACE_SOAK=1``::

    HEKITRACE_SOAK=1 .venv/bin/python -m pytest -s tests/soak     # or: make soak
    HEKITRACE_SOAK_VMS=2000 ... for a longer run (default 300 VMs)

Each VM is a child process (its own tgid, like a real VMM) that creates a KVM VM with two
memslots, sends a PROTECT_MEMORY hypercall and a burst of telemetry hypercalls through
the daemon's own program, then exits. Every fifth wave runs while the daemon is stopped
(SIGSTOP) so the small telemetry ring overflows and the kernel's loss table gets entries
for those VMs too. After a warm-up wave the daemon's RSS and open file descriptors are
the baseline; at the end (grace period 0, so destroyed VMs are retired at the next
expiry pass) the test checks: every VM left the daemon's state, RSS grew by less than
RSS_GROWTH_MIB, the fd count is back to the baseline, and the daemon's BPF maps hold no
entry keyed by a dead VM's tgid (hk_memslots, hk_fault_filter, hk_loss, hk_storms).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hekitrace.service.control_client import ControlClient
from tests import child_env
from tests.e2e.daemon_proc import DaemonProcess, bpf_prog_ids_of, bpf_progs

if os.environ.get("HEKITRACE_SOAK") != "1":
    pytest.skip("soak test (minutes long): run with HEKITRACE_SOAK=1 (make soak)",
                allow_module_level=True)

VMS = int(os.environ.get("HEKITRACE_SOAK_VMS", "300"))
WAVE = 10
RSS_GROWTH_MIB = 20

CHILD = r"""
import ctypes, os, sys
from tests.vmm import Vmm
from hekitrace.capture.testrun import run_raw_tracepoint
libc = ctypes.CDLL(None, use_errno=True)
attr = (ctypes.c_uint32 * 32)(); attr[0] = int(sys.argv[1])
fd = libc.syscall(321, 13, ctypes.byref(attr), ctypes.sizeof(attr))
assert fd >= 0
with Vmm() as vm:
    vm.add_memslot(0x100000, 1 << 20)
    vm.add_memslot(0x1000000, 8 << 20)
    head = vm.write_heki_list([0x100000], [(0x1000000, 0x1200000, 1 | 4 | 8)])
    run_raw_tracepoint(fd, [int(sys.argv[2]), head, 0, 0, 0])
    for i in range(int(sys.argv[3])):
        run_raw_tracepoint(fd, [0x10001, i, 0, 0, 0])
    print("done", flush=True)
    sys.stdin.readline()
"""


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def daemon_maps(pid: int) -> dict[str, int]:
    """name -> id of the BPF maps the daemon holds open."""
    ids = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:bpf-map":
                continue
            for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
                if line.startswith("map_id:"):
                    ids.add(int(line.split()[1]))
        except OSError:
            continue
    out = subprocess.run(["bpftool", "-j", "map", "list"], capture_output=True, text=True,
                         check=True).stdout
    return {m.get("name", ""): m["id"] for m in json.loads(out) if m["id"] in ids}


def map_keys(map_id: int) -> list[bytes]:
    out = subprocess.run(["bpftool", "-j", "map", "dump", "id", str(map_id)],
                         capture_output=True, text=True, check=True).stdout
    return [bytes(int(b, 16) for b in e["key"]) for e in json.loads(out)]


def tgids_in(name: str, keys: list[bytes]) -> set[int]:
    if name in ("hk_memslots", "hk_loss"):        # u32 tgid first
        return {int.from_bytes(k[:4], "little") for k in keys}
    if name == "hk_fault_filter":                 # tgid << 32 | bucket
        return {int.from_bytes(k[:8], "little") >> 32 for k in keys}
    if name == "hk_storms":                       # tgid << 40 | gfn
        return {int.from_bytes(k[:8], "little") >> 40 for k in keys}
    return set()


@pytest.fixture(scope="module")
def daemon():
    d = DaemonProcess(extra_config="state:\n  grace_period_seconds: 0\n"
                                   "capture:\n  telemetry_ring_bytes: 16384\n").start()
    yield d
    d.close()


def run_wave(daemon: DaemonProcess, hc_id: int, stopped: bool) -> list[int]:
    from hekitrace.config.abi import DEFAULT_PROFILE
    if stopped:
        daemon.signal(signal.SIGSTOP)
    try:
        kids = [subprocess.Popen([sys.executable, "-c", CHILD, str(hc_id),
                                  str(DEFAULT_PROFILE.protect_memory), "600"],
                                 env=child_env(), stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
                for _ in range(WAVE)]
        for k in kids:
            assert k.stdout.readline().strip() == "done"
    finally:
        if stopped:
            daemon.signal(signal.SIGCONT)
    time.sleep(0.5)       # let the daemon see the VMs alive before they go
    for k in kids:
        k.stdin.close()
        assert k.wait(60) == 0
    return [k.pid for k in kids]


def test_many_vms_created_and_destroyed_leave_nothing_behind(daemon):
    ctl = ControlClient(daemon.socket_path)
    names = bpf_progs()
    hc_id = next(i for i in bpf_prog_ids_of(daemon.proc.pid)
                 if names.get(i) == "hk_hypercall_raw")
    pid = daemon.proc.pid
    dead = run_wave(daemon, hc_id, stopped=True)
    time.sleep(12)            # one expiry pass: warm-up VMs retired, caches warm
    rss0, fds0 = rss_mib(pid), fds(pid)
    start = time.monotonic()
    for wave in range(VMS // WAVE):
        dead += run_wave(daemon, hc_id, stopped=wave % 5 == 0)
    elapsed = time.monotonic() - start
    dead_set = set(dead)

    def live() -> set[int]:
        return {r["pid"] for r in ctl.request("vms")["vms"]} & dead_set

    deadline = time.monotonic() + 60
    while live() and time.monotonic() < deadline:
        time.sleep(1)
    zombies = [r for r in ctl.request("vms")["vms"] if r["pid"] in live()]
    time.sleep(2)
    rss1, fds1 = rss_mib(pid), fds(pid)
    maps = daemon_maps(pid)
    assert {"hk_memslots", "hk_fault_filter", "hk_loss", "hk_storms"} <= set(maps), maps
    leftovers = {}
    for name, map_id in maps.items():
        if name not in ("hk_memslots", "hk_fault_filter", "hk_loss", "hk_storms"):
            continue
        stale = tgids_in(name, map_keys(map_id)) & dead_set
        if stale:
            leftovers[name] = len(stale)
    print(f"{len(dead)} VMs in {elapsed:.0f} s; RSS {rss0:.1f} -> {rss1:.1f} MiB; "
          f"fds {fds0} -> {fds1}; dead VMs still in state: {len(zombies)}; "
          f"map entries of dead VMs: {leftovers or 'none'}")
    assert not zombies, f"{len(zombies)} dead VMs still in the daemon's state: {zombies}"
    assert daemon.proc.poll() is None and "Traceback" not in daemon.stderr()
    assert fds1 <= fds0 + 2, (fds0, fds1)
    assert rss1 - rss0 < RSS_GROWTH_MIB, (rss0, rss1)
    assert leftovers == {}, f"BPF map entries of dead VMs: {leftovers}"
