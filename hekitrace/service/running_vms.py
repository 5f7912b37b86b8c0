"""VMs whose life is not (fully) told by events: those running at start-up, and implicit
VMs whose VMM exited without a destroy event.

At start-up, discovery reports the VMs already running. The journal's recovery may have
rebuilt some of them (covered: they keep their maps); the hooks may have seen others being
created between attach and discovery (``Host`` merges the two reports: monitored since
birth). Every other one is registered "running before monitoring started", a degraded
reason, because what it did earlier is unknown.

An implicit VM (its events came, its creation was never seen) is destroyed only by a
destroy event; when its VMM has exited and none came (a missed uevent), it would stay in
state, /metrics and ``vms`` forever, and so would its kernel map entries.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from hekitrace.capture.discovery import exited_vmms
from hekitrace.state.changes import VmKey
from hekitrace.state.events import Event, VmCreated, VmDestroyed
from hekitrace.state.host import Host

PREEXISTING_REASON = "running before monitoring started"


def register_discovered(host: Host, found: Iterable[VmCreated], covered: set[VmKey],
                        apply: Callable[[Event], None]) -> None:
    """Register the VMs discovery ``found`` running (the caller holds the state lock).

    ``covered`` are the keys recovery rebuilt (they only get back their VM fd, which a
    checkpoint does not keep and by which ``Host`` merges reports); ``apply`` feeds one
    event to the pipeline that owns ``host``.
    """
    for event in found:
        guest = host.by_tgid(event.tgid)
        if guest is not None and guest.key in covered:
            if guest.vm_fd < 0:
                guest.vm_fd = event.vm_fd
            continue
        merged = merged_creations(host)
        apply(event)
        if merged_creations(host) != merged:
            # Host merged it: the hooks saw this VM being created after capture started;
            # monitored since birth, not "running before monitoring"
            continue
        guest = host.by_tgid(event.tgid)
        if guest is not None and PREEXISTING_REASON not in guest.degraded_reasons:
            host.mark_degraded(guest.key, PREEXISTING_REASON)


def merged_creations(host: Host) -> int:
    """Creation reports of a VM already known from another source (ioctl hook, uevent,
    discovery), merged by ``Host``, so a replay of a recording merges them exactly as the
    daemon did."""
    return host.counters.get("merged_creations", 0)


def exited_implicit_vms(host: Host, now_ns: int, proc_root: str | os.PathLike = "/proc"
                        ) -> list[VmDestroyed]:
    """A ``VmDestroyed`` for each implicit live VM whose VMM process is gone.

    Only implicit VMs are checked: a created VM's destroy is reported by KVM itself.
    """
    implicit = [guest.pid for guest in host.live_guests()
                if guest.preexisting and not guest.counters.get("vm_created")]
    return [VmDestroyed(now_ns, pid, 0, "") for pid in exited_vmms(implicit, proc_root)]
