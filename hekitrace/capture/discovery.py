"""Find the VMs that already run when hekitrace starts.

Their creation happened before any hook or uevent listener existed, so the daemon must
look for them once at start-up (and mark them ``preexisting``: their protection history
before that moment is unknown). Two independent sources, merged:

``/proc/<pid>/fd/*``
    A VM fd is an anonymous inode whose link reads ``anon_inode:kvm-vm``
    (``anon_inode_getfile("kvm-vm", ...)`` in ``kvm_dev_ioctl_create_vm()``). This finds
    every process holding a VM fd (needs root or CAP_SYS_PTRACE to read other processes'
    fd links) and gives the VMM's tgid directly.
``<debugfs>/kvm/<tid>-<fd>``
    KVM's per-VM debugfs directory (docs/heki-abi.md section 11; ``<tid>`` is the thread
    that created the VM, ``<fd>`` the number ``KVM_CREATE_VM`` returned). It gives the
    ``stats_path`` the uevents carry (``/kvm/<tid>-<fd>``) and still finds a VM whose
    creator closed its fd while vCPU fds or mappings keep it alive. debugfs is only **read
    where it is already mounted**; hekitrace never mounts it (mounting debugfs on a
    production host is the operator's decision). Without it, discovery says so in one line
    and uses ``/proc`` alone (``stats_path`` is then "").

A VM found in both is reported once: the debugfs entry ``<tid>-<fd>`` matches the fd
``<fd>`` of the process that thread belongs to. Names come from
:mod:`hekitrace.capture.vmmnames`.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from hekitrace.capture.uevents import tgid_of
from hekitrace.capture.vmmnames import VmIdentity, identify
from hekitrace.state.events import VmCreated

VM_FD_LINK = "anon_inode:kvm-vm"
_DEBUGFS_VM = re.compile(r"^(\d+)-(\d+)$")


def vm_fds(proc_root: str | os.PathLike = "/proc") -> list[tuple[int, int]]:
    """(tgid, fd) of every open VM fd, ascending. Processes that vanish or whose fd
    directory cannot be read are skipped (a race with exit is normal, not an error)."""
    found = []
    root = Path(proc_root)
    try:
        pids = [int(entry) for entry in os.listdir(root) if entry.isdigit()]
    except OSError:
        return []
    for pid in sorted(pids):
        fd_dir = root / str(pid) / "fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd_dir / fd)
            except OSError:
                continue
            if target == VM_FD_LINK and fd.isdigit():
                found.append((pid, int(fd)))
    return sorted(found)


def debugfs_vms(debugfs_root: str | os.PathLike = "/sys/kernel/debug"
                ) -> list[tuple[int, int]] | None:
    """(creator tid, fd) of every ``kvm/<tid>-<fd>`` directory, or None when
    ``<debugfs_root>/kvm`` does not exist (debugfs not mounted, or kvm not loaded)."""
    kvm_dir = Path(debugfs_root) / "kvm"
    try:
        names = os.listdir(kvm_dir)
    except OSError:
        return None
    found = []
    for name in names:
        match = _DEBUGFS_VM.match(name)
        if match:
            found.append((int(match.group(1)), int(match.group(2))))
    return sorted(found)


def discover_vms(proc_root: str | os.PathLike = "/proc",
                 debugfs_root: str | os.PathLike = "/sys/kernel/debug", *,
                 clock: Callable[[], int] = time.time_ns,
                 namer: Callable[[int], VmIdentity] | None = None,
                 say: Callable[[str], None] | None = None) -> list[VmCreated]:
    """VmCreated events (``source="discovery"``, ``preexisting=True``) for running VMs.

    One event per (tgid, VM fd) from ``/proc`` plus one per debugfs VM not held open
    under its creator's fd number (tgid from the creator thread when it is alive, else
    the tid itself). ``say`` receives the one-line notice when debugfs is not mounted
    (default: stderr).
    """
    say = say or (lambda line: print(f"hekitrace: {line}", file=sys.stderr))
    namer = namer or (lambda pid: identify(pid, proc_root))
    now = clock()
    held = vm_fds(proc_root)
    from_debugfs = debugfs_vms(debugfs_root)
    stats_by_key: dict[tuple[int, int], tuple[int, str]] = {}
    orphans: list[tuple[int, int, str]] = []
    if from_debugfs is None:
        say(f"debugfs is not mounted at {debugfs_root} (no kvm/ directory): running VMs "
            "are found from /proc fd links only, without their stats path")
    else:
        held_set = set(held)
        for tid, fd in from_debugfs:
            tgid = tgid_of(tid, proc_root)
            stats_path = f"/kvm/{tid}-{fd}"
            if tgid is not None and (tgid, fd) in held_set:
                stats_by_key[(tgid, fd)] = (tid, stats_path)
            else:
                orphans.append((tgid if tgid is not None else tid, tid, stats_path))
    events = []
    names: dict[int, VmIdentity] = {}
    for tgid, fd in held:
        tid, stats_path = stats_by_key.get((tgid, fd), (tgid, ""))
        who = names.setdefault(tgid, namer(tgid))
        events.append(VmCreated(now, tgid, tid, fd, stats_path, who.name, who.uuid,
                                who.vmm, "discovery", True))
    for tgid, tid, stats_path in orphans:
        who = names.setdefault(tgid, namer(tgid))
        events.append(VmCreated(now, tgid, tid, -1, stats_path, who.name, who.uuid,
                                who.vmm, "discovery", True))
    return events


def exited_vmms(pids: Iterable[int], proc_root: str | os.PathLike = "/proc") -> list[int]:
    """The pids among ``pids`` that have no ``<proc_root>/<pid>`` any more: their VMM
    process exited. The daemon asks this of VMs whose creation it never saw, which only a
    destroy event would otherwise retire (see the daemon's expiry timer)."""
    root = Path(proc_root)
    return [pid for pid in pids if not (root / str(pid)).exists()]
