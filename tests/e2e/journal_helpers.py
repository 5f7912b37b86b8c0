"""Shared by the journal e2e tests: a journal-enabled daemon process and a PROTECT_MEMORY
driver through the daemon's own hypercall program (BPF_PROG_TEST_RUN), as in
test_flood_fairness.py."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from hekitrace.capture.testrun import run_raw_tracepoint
from hekitrace.config.abi import DEFAULT_PROFILE
from tests.e2e.daemon_proc import DaemonProcess, bpf_prog_ids_of, bpf_progs
from tests.vmm import Vmm

READ, WRITE, EXEC = 1, 2, 4
LIST_BASE = 0x100000
DATA_BASE = 0x40000000
BPF_PROG_GET_FD_BY_ID = 13
#: guest permission sequence: order matters, so a replay out of order would show
PERMS = (READ, READ | EXEC, READ | WRITE, READ)


def journal_daemon(state_dir: str | Path | None = None, extra: str = "",
                   journal: str = "") -> DaemonProcess:
    """A DaemonProcess with the journal on (frequent fsyncs and checkpoints)."""
    d = DaemonProcess()
    state = Path(state_dir) if state_dir is not None else d.dir / "state"
    text = d.base_config.replace(
        f"journal:\n  enabled: false\n  directory: {d.dir / 'state'}\n",
        f"journal:\n  enabled: true\n  directory: {state}\n"
        "  fsync_interval_seconds: 0.2\n  checkpoint_interval_seconds: 1\n" + journal)
    assert text != d.base_config
    d.base_config = text + extra
    d.config_path.write_text(d.base_config)
    d.state_dir = state
    return d


def hypercall_prog_fd(daemon: DaemonProcess) -> int:
    """An fd of the daemon's hk_hypercall_raw program (keeps it alive after a kill)."""
    names = bpf_progs()
    prog = next(i for i in bpf_prog_ids_of(daemon.proc.pid) if names.get(i) == "hk_hypercall_raw")
    libc = ctypes.CDLL(None, use_errno=True)
    attr = (ctypes.c_uint32 * 32)()
    attr[0] = prog
    fd = libc.syscall(321, BPF_PROG_GET_FD_BY_ID, ctypes.byref(attr), ctypes.sizeof(attr))
    assert fd >= 0, os.strerror(ctypes.get_errno())
    return fd


def request_range(k: int) -> tuple[int, int, int]:
    """Request number ``k``: (gpa, end_gpa, guest perms); ranges overlap across k."""
    gpa = DATA_BASE + (k % 37) * 0x1000
    return gpa, gpa + 0x1000 * (1 + k % 3), PERMS[k % len(PERMS)]


def k_of(list_gpa: int) -> int:
    """Which request a journaled ProtectRequest was (tests send fewer than 1024)."""
    return (list_gpa - LIST_BASE) // 0x1000


def send_protect(vm: Vmm, prog_fd: int, k: int) -> None:
    """PROTECT_MEMORY request ``k`` (< 1024): a one-entry list page at a page of its
    own (so the journal says which k it was), then the hypercall."""
    page = LIST_BASE + (k % 1024) * 0x1000
    gpa, end, perms = request_range(k)
    head = vm.write_heki_list([page], [(gpa, end, perms)])
    run_raw_tracepoint(prog_fd, [DEFAULT_PROFILE.protect_memory, head, 0, 0, 0])


def new_vm() -> Vmm:
    vm = Vmm()
    vm.add_memslot(LIST_BASE, 4 << 20)
    vm.add_memslot(DATA_BASE, 4 << 20)
    return vm


#: a child VMM process: run as ``[sys.executable, "-c", CHILD_VMM]`` with ``env=child_env()``
CHILD_VMM = r"""
import sys
from tests.vmm import Vmm
with Vmm() as vm:
    vm.add_memslot(0x100000, 1 << 20)
    print("ready", flush=True)
    sys.stdin.read()
"""
