"""KVM VM create/destroy uevents as :class:`VmCreated` / :class:`VmDestroyed` events.

KVM announces every VM's creation and its last reference going away with a uevent on
the kvm misc device (``kvm_uevent_notify_change()`` in ``virt/kvm/kvm_main.c``, added
in Linux 4.13 by "KVM: trigger uevents when creating or destroying a VM"; docs/heki-abi.md section
11)::

    change@/devices/virtual/misc/kvm  ACTION=change DEVPATH=/devices/virtual/misc/kvm
    SUBSYSTEM=misc CREATED=<ever> COUNT=<alive> EVENT=create|destroy PID=<tid>
    STATS_PATH=/kvm/<tid>-<fd>  (STATS_PATH only while the VM's debugfs dir exists)

It is the one lifecycle source that needs no BPF hook, and the only one for *destroy*.

``PID`` is the **thread** that called ``KVM_CREATE_VM`` (``kvm->userspace_pid``), reused
at destroy. Events carry the process (tgid): at create it is read from
``/proc/<tid>/status`` (``Tgid:``). The thread is alive when the uevent is sent (before
the ioctl returns) but may have exited by the time we read it (a VMM that creates its VM
from a short-lived thread): then the one process holding a VM at the fd number of the
stats path is the VMM, if exactly one does. At destroy the tgid learnt at create is
reused; for a VM created before we listened, ``/proc/<tid>/status`` is tried, and when
that thread is gone too the tid is used as the tgid (right whenever the VMM created its
VM from its main thread, as QEMU does); such an event has ``tid == tgid``.

The socket comes from pyroute2's ``UeventSocket`` bound to the kernel multicast group;
this module reads it non-blocking itself (a dup of its fd, so the sender's netlink pid is
visible) and parses the ``KEY=VALUE`` lines itself, so that nothing a uevent contains can
raise: a KVM uevent that cannot be understood is counted in ``malformed_total`` and
becomes a ``Lost`` event (stage ``uevent``); a receive-queue overflow (``ENOBUFS``: the
kernel dropped uevents) becomes a ``Lost`` event with reason ``socket_overflow`` and count
1 (the kernel does not say how many; at least one). Uevents of other devices are counted
in ``ignored_total``; datagrams not sent by the kernel (netlink pid != 0) in
``foreign_total``.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from hekitrace.capture.vmmnames import VmIdentity, identify
from hekitrace.errors import AttachError
from hekitrace.state.events import Event, Lost, VmCreated, VmDestroyed

KVM_DEVPATH = "/devices/virtual/misc/kvm"
# pyroute2.netlink.uevent.MONITOR_GROUP_KERNEL: uevents as the kernel sends them (group 2
# is udev's re-broadcast, which arrives later and only where udevd runs).
_KERNEL_GROUP = 1
_RCVBUF_BYTES = 1 << 20
_SO_RCVBUFFORCE = 33  # include/uapi/asm-generic/socket.h; Python's socket module lacks it
_MAX_DATAGRAM = 1 << 16
_MAX_STATS_PATH = 256  # "/kvm/<pid>-<fd>" is ~25 bytes; anything longer is not KVM's


def parse_uevent(data: bytes) -> dict[str, str] | None:
    """``{"@": "action@devpath", KEY: VALUE...}`` of one kernel uevent datagram, or None
    when it is not one (empty, no ``@`` header, not UTF-8). Never raises."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    lines = text.split("\0")
    if not lines or "@" not in lines[0]:
        return None
    fields = {"@": lines[0]}
    for line in lines[1:]:
        key, sep, value = line.partition("=")
        if sep and key:
            fields[key] = value
    return fields


def tgid_of(tid: int, proc_root: str | os.PathLike = "/proc") -> int | None:
    """The process (``Tgid:``) thread ``tid`` belongs to, or None if it is gone."""
    try:
        with open(Path(proc_root) / str(tid) / "status", "rb") as file:
            for line in file:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def unique_vm_fd_holder(vm_fd: int, proc_root: str | os.PathLike = "/proc") -> int | None:
    """The one process whose fd ``vm_fd`` is a VM (``anon_inode:kvm-vm``), or None when
    none or several are (then the fd number does not identify the VMM)."""
    holders = []
    root = Path(proc_root)
    try:
        pids = [entry for entry in os.listdir(root) if entry.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            if os.readlink(root / pid / "fd" / str(vm_fd)) == "anon_inode:kvm-vm":
                holders.append(int(pid))
        except OSError:
            continue
    return holders[0] if len(holders) == 1 else None


def unavailable_message(error: BaseException) -> str:
    """The one line ``record`` and the daemon say when uevents cannot be opened."""
    return f"uevents unavailable: {error}; VM lifecycle from ioctls and /proc only"


def _bind_kernel_group(nl) -> None:
    """Bind pyroute2's UeventSocket to the kernel's group only, on every pyroute2 we meet.

    pyroute2 >= 0.8 has ``UeventSocket.bind(groups=...)``; Debian bookworm's 0.7.2 has
    ``UeventSocket.bind()`` with no argument, always binding every group (udev's
    re-broadcast too). Both have the base ``NetlinkSocket.bind(groups=...)``, so when the
    keyword is refused that one is called.
    """
    try:
        nl.bind(groups=_KERNEL_GROUP)
    except TypeError:
        from pyroute2.netlink.nlsocket import NetlinkSocket
        NetlinkSocket.bind(nl, groups=_KERNEL_GROUP)


def _fd_of(stats_path: str) -> int:
    """The VM fd in ``/kvm/<tid>-<fd>`` (debugfs naming, docs/heki-abi.md section 11), else -1."""
    _, _, tail = stats_path.rpartition("-")
    return int(tail) if tail.isdigit() else -1


class UeventSource:
    """Non-blocking source of KVM lifecycle events for the daemon's event loop.

    ``fileno()`` is registered for reading; ``read_events()`` returns what arrived (empty
    when nothing did). ``proc_root`` (tgid and name lookups), ``clock`` (event time, Unix
    ns) and ``namer`` (pid -> :class:`VmIdentity`) are parameters so tests and replays can
    pass their own.
    """

    def __init__(self, *, proc_root: str | os.PathLike = "/proc",
                 clock: Callable[[], int] = time.time_ns,
                 namer: Callable[[int], VmIdentity] | None = None) -> None:
        """Open and bind the socket; any failure (no pyroute2, a pyroute2 API we do not
        know, EPERM...) is an :class:`AttachError` saying why: callers announce
        :func:`unavailable_message` and go on without uevents, never a traceback."""
        self._proc_root = proc_root
        self._clock = clock
        self._namer = namer or (lambda pid: identify(pid, proc_root))
        try:
            from pyroute2 import UeventSocket
            self._nl = UeventSocket()
        except Exception as exc:  # ImportError, OSError, pyroute2's own errors
            raise AttachError(f"cannot open the uevent socket: {type(exc).__name__}: {exc}",
                              method="uevent_socket") from exc
        try:
            _bind_kernel_group(self._nl)
            self._sock = socket.socket(fileno=os.dup(self._nl.fileno()))
        except Exception as exc:  # as above; the socket is closed first
            self._nl.close()
            raise AttachError(f"cannot bind the uevent socket: {type(exc).__name__}: {exc}",
                              method="uevent_socket") from exc
        except BaseException:
            self._nl.close()
            raise
        self._sock.setblocking(False)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, _RCVBUF_BYTES)
        except OSError:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF_BYTES)
        self._tgid_by_stats: dict[str, int] = {}
        self.received_total = 0
        self.malformed_total = 0
        self.ignored_total = 0
        self.foreign_total = 0
        self.overflows_total = 0

    def fileno(self) -> int:
        return self._sock.fileno()

    def read_events(self, max_datagrams: int = 1024) -> list[Event]:
        """Every KVM event waiting on the socket (at most ``max_datagrams`` read)."""
        events: list[Event] = []
        for _ in range(max_datagrams):
            try:
                data, (nl_pid, _groups) = self._sock.recvfrom(_MAX_DATAGRAM)
            except BlockingIOError:
                break
            except OSError as error:
                if error.errno != errno.ENOBUFS:
                    raise
                self.overflows_total += 1
                events.append(Lost(self._clock(), 0, 0, "uevent", "socket_overflow", 1))
                continue
            self.received_total += 1
            if nl_pid != 0:
                self.foreign_total += 1
                continue
            event = self.decode(data)
            if event is not None:
                events.append(event)
        return events

    def decode(self, data: bytes) -> Event | None:
        """The event of one uevent datagram: VmCreated/VmDestroyed, a ``Lost`` for a
        malformed KVM uevent, None for another device's. Never raises on ``data``."""
        fields = parse_uevent(data)
        if fields is None:
            return self._malformed()
        if fields.get("DEVPATH", fields["@"].partition("@")[2]) != KVM_DEVPATH:
            self.ignored_total += 1
            return None
        kind = fields.get("EVENT", "")
        pid_text = fields.get("PID", "")
        stats_path = fields.get("STATS_PATH", "")
        if kind not in ("create", "destroy") or not pid_text.isdigit() \
                or len(stats_path) > _MAX_STATS_PATH:
            return self._malformed()
        tid = int(pid_text)
        now = self._clock()
        if kind == "create":
            tgid = tgid_of(tid, self._proc_root)
            if tgid is None and _fd_of(stats_path) >= 0:
                tgid = unique_vm_fd_holder(_fd_of(stats_path), self._proc_root)
            if tgid is None:
                tgid = tid
            if stats_path:
                self._tgid_by_stats[stats_path] = tgid
            who = self._namer(tgid)
            return VmCreated(now, tgid, tid, _fd_of(stats_path), stats_path, who.name,
                             who.uuid, who.vmm, "uevent", False)
        tgid = self._tgid_by_stats.pop(stats_path, None) if stats_path else None
        if tgid is None:
            tgid = tgid_of(tid, self._proc_root) or tid
        return VmDestroyed(now, tgid, tid, stats_path)

    def _malformed(self) -> Lost:
        self.malformed_total += 1
        return Lost(self._clock(), 0, 0, "uevent", "malformed", 1, hook="uevent")

    def close(self) -> None:
        """Close the socket (idempotent)."""
        if self._sock.fileno() >= 0:
            self._sock.close()
            self._nl.close()
