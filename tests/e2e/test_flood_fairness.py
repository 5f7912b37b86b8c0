"""Flood and fairness: one VM floods telemetry while another changes its protections.

A real daemon (daemon_proc.py) with a deliberately small telemetry ring (16 KiB: 256
hypercall records). Two VMMs, each a real KVM VM: a child process (the flooder) drives
the daemon's own ``hk_hypercall_raw`` program with BPF_PROG_TEST_RUN in a tight ctypes
loop (non-Heki hypercall numbers, random arguments: telemetry), and this test process
sends PROTECT_MEMORY hypercalls (control) through the same program meanwhile. The flood
runs twice: once against the running daemon, once while the daemon is stopped (SIGSTOP,
as if descheduled), so that the ring certainly overflows.

Checked, per VM, from the daemon's own outputs (control socket, /metrics):
* control records sent = received (every protect request of the quiet VM arrives);
* telemetry sent = received + counted lost, for the flooder;
* the quiet VM has no loss, is not degraded and has no map_degraded finding; the
  flooder is degraded, has a map_degraded finding and its loss in
  hekitrace_vm_events_lost_total;
* daemon RSS stays under RSS_BOUND_MIB throughout;
* the daemon survives and prints no traceback.
The in-kernel XDP generator (bpf/flood.c) cannot be used here: it writes tgid 0 (no VM)
and is only compiled into test captures, not into the daemon.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hekitrace.capture.testrun import run_raw_tracepoint
from hekitrace.config.abi import DEFAULT_PROFILE
from hekitrace.service.control_client import ControlClient
from tests import child_env
from tests.e2e.daemon_proc import DaemonProcess, bpf_prog_ids_of, bpf_progs, metric_value, wait_for
from tests.vmm import Vmm

pytestmark = pytest.mark.e2e

RSS_BOUND_MIB = 400
READ, EXEC = 1, 4
BPF_PROG_GET_FD_BY_ID = 13
FLOOD_RUNNING, FLOOD_STOPPED = 300_000, 30_000
CONTROLS_RUNNING, CONTROLS_STOPPED = 200, 40

# The flooder: its own VM, its own fd on the daemon's program, a tight syscall loop.
FLOODER = r"""
import ctypes, os, random, struct, sys
from tests.vmm import Vmm
libc = ctypes.CDLL(None, use_errno=True)
attr = (ctypes.c_uint32 * 32)(); attr[0] = int(sys.argv[1])
fd = libc.syscall(321, 13, ctypes.byref(attr), ctypes.sizeof(attr))
assert fd >= 0, os.strerror(ctypes.get_errno())
ctx = ctypes.create_string_buffer(40)
tr = ctypes.create_string_buffer(160)
# union bpf_attr.test: prog_fd, retval, data_size_in, data_size_out, data_in, data_out,
# repeat, duration, ctx_size_in, ctx_size_out, ctx_in, ctx_out, flags, cpu, batch_size
struct.pack_into("<IIIIQQIIIIQQIII", tr, 0, fd, 0, 0, 0, 0, 0, 0, 0, 40, 0,
                 ctypes.addressof(ctx), 0, 0, 0, 0)
rng = random.Random(7)
with Vmm() as vm:
    vm.add_memslot(0, 1 << 20)
    print("ready", flush=True)
    for line in sys.stdin:
        n = int(line)
        sent = 0
        for i in range(n):
            struct.pack_into("<5Q", ctx, 0, 0x10000 + (i & 7), i, rng.getrandbits(64), 0, 0)
            if libc.syscall(321, 10, tr, 160) == 0:
                sent += 1
        print(sent, flush=True)
"""


def prog_id(daemon: DaemonProcess, name: str) -> int:
    names = bpf_progs()
    return next(i for i in bpf_prog_ids_of(daemon.proc.pid) if names.get(i) == name)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@pytest.fixture(scope="module")
def daemon():
    d = DaemonProcess(extra_config="capture:\n  telemetry_ring_bytes: 16384\n").start()
    yield d
    d.close()


def test_flooding_vm_loses_only_its_own_telemetry(daemon):
    ctl = ControlClient(daemon.socket_path)
    hc_id = prog_id(daemon, "hk_hypercall_raw")
    libc = ctypes.CDLL(None, use_errno=True)
    attr = (ctypes.c_uint32 * 32)()
    attr[0] = hc_id
    hc = libc.syscall(321, BPF_PROG_GET_FD_BY_ID, ctypes.byref(attr), ctypes.sizeof(attr))
    assert hc >= 0
    flooder = subprocess.Popen([sys.executable, "-c", FLOODER, str(hc_id)], env=child_env(),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    rss = [rss_mib(daemon.proc.pid)]
    sampling = True

    def sample() -> None:
        while sampling:
            rss.append(rss_mib(daemon.proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        with Vmm() as quiet:
            quiet.add_memslot(0x100000, 4 << 20)        # list pages
            quiet.add_memslot(0x40000000, 4 << 20)      # the memory it protects
            assert flooder.stdout.readline().strip() == "ready"
            me, fl = os.getpid(), flooder.pid

            def rows() -> dict[int, dict]:
                return {r["pid"]: r for r in ctl.request("vms")["vms"]}

            wait_for(lambda: me in rows() and fl in rows(), "both VMs", daemon)
            sampler.start()

            def controls(first: int, count: int) -> None:
                for k in range(first, first + count):
                    page = 0x100000 + (k % 1024) * 0x1000
                    gpa = 0x40000000 + k * 0x2000
                    head = quiet.write_heki_list([page], [(gpa, gpa + 0x1000, READ | EXEC)])
                    run_raw_tracepoint(hc, [DEFAULT_PROFILE.protect_memory, head, 0, 0, 0])

            # 1. flood against the running daemon, protect requests meanwhile
            t0 = time.monotonic()
            flooder.stdin.write(f"{FLOOD_RUNNING}\n")
            flooder.stdin.flush()
            controls(0, CONTROLS_RUNNING)
            sent = int(flooder.stdout.readline())
            print(f"flood: {sent / (time.monotonic() - t0):.0f} hypercalls/s")
            # 2. flood while the daemon is stopped: the 16 KiB ring must overflow
            daemon.signal(signal.SIGSTOP)
            try:
                flooder.stdin.write(f"{FLOOD_STOPPED}\n")
                flooder.stdin.flush()
                controls(CONTROLS_RUNNING, CONTROLS_STOPPED)
                sent += int(flooder.stdout.readline())
            finally:
                daemon.signal(signal.SIGCONT)
            assert sent == FLOOD_RUNNING + FLOOD_STOPPED

            def accounted():
                r = rows()
                c, q = r[fl]["counters"], r[me]["counters"]
                got = (c.get("hypercall", 0) + c.get("lost_events", 0),
                       q.get("protect_request", 0))
                return got if got == (sent, CONTROLS_RUNNING + CONTROLS_STOPPED) else None

            try:
                wait_for(accounted, "every record received or counted lost", daemon)
            finally:
                r = rows()
                got_fl, got_q = r[fl], r[me]
                print("flooder", got_fl["counters"], got_fl["degraded_reasons"])
                print("quiet", got_q["counters"], got_q["degraded_reasons"])

            # per VM: the quiet VM lost nothing and is whole
            assert got_q["counters"]["lost_events"] == 0
            assert got_q["counters"]["anomalies"] == 0
            assert got_q["degraded"] is False, got_q["degraded_reasons"]
            assert got_fl["degraded"] is True
            assert got_fl["counters"]["lost_events"] > 0
            assert any("ring:telemetry" in r for r in got_fl["degraded_reasons"])

            text = daemon.metrics()
            name_fl, name_q = got_fl["name"], got_q["name"]
            lost_lines = [x for x in text.splitlines()
                          if x.startswith("hekitrace_vm_events_lost_total{")]
            assert any(f'vm="{name_fl}"' in x for x in lost_lines), lost_lines
            assert not any(f'vm="{name_q}"' in x and not x.endswith(" 0.0")
                           for x in lost_lines), lost_lines
            assert metric_value(text, f'hekitrace_vm_degraded{{vm="{name_fl}"}}') == 1.0
            assert metric_value(text, f'hekitrace_vm_degraded{{vm="{name_q}"}}') == 0.0
            degraded_findings = [x for x in text.splitlines()
                                 if x.startswith("hekitrace_findings_total{")
                                 and 'rule="map_degraded"' in x]
            assert any(f'vm="{name_fl}"' in x for x in degraded_findings), degraded_findings
            assert not any(f'vm="{name_q}"' in x for x in degraded_findings)
            ring_lost = sum(float(x.rsplit(" ", 1)[1]) for x in text.splitlines()
                            if x.startswith("hekitrace_events_lost_total{")
                            and 'stage="ring:telemetry"' in x)
            assert ring_lost >= got_fl["counters"]["lost_events"] - \
                sum(float(x.rsplit(" ", 1)[1]) for x in text.splitlines()
                    if x.startswith("hekitrace_events_lost_total{") and 'stage="queue"' in x)
    finally:
        sampling = False
        flooder.stdin.close()
        flooder.wait(30)
        os.close(hc)
    print(f"daemon RSS: start {rss[0]:.0f} MiB, peak {max(rss):.0f} MiB over {len(rss)} samples")
    assert max(rss) < RSS_BOUND_MIB, max(rss)
    assert daemon.proc.poll() is None
    assert "Traceback" not in daemon.stderr(), daemon.stderr()
