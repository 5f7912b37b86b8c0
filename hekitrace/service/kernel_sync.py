"""The capture engine's per-VM kernel tables kept in step with the state.

Two tables in the kernel depend on what userspace knows of a VM:

* the fault filter: only write and fetch faults on protected pages reach userspace
  (docs/capture.md, "Faults: filter and storms"). :mod:`hekitrace.state.fault_filter`
  computes the ranges from a guest map; :class:`FaultFilterSync` hands them to the engine
  once per batch, for the VMs whose maps changed in it.
* the memslot table of the page-list walk: a VM known before capture started (restored
  by the journal's recovery) set its memslots before the ioctl hook could see them;
  :func:`seed_memslots` teaches the kernel what the state knows, so its PROTECT_MEMORY
  page lists are readable without waiting for the VMM to change a memslot again.
"""

from __future__ import annotations

from collections.abc import Callable

from hekitrace.config.abi import AbiProfile
from hekitrace.errors import HekitraceError
from hekitrace.service.parts import CaptureEngine
from hekitrace.state.changes import VmKey
from hekitrace.state.fault_filter import protected_ranges
from hekitrace.state.host import Host


class FaultFilterSync:
    """VMs whose maps changed are marked (:meth:`mark`, from a pipeline observer); after
    the batch, :meth:`sync` replaces their kernel filters. A failed update is counted in
    ``errors`` (``filter_errors`` in ``status``) and said once: faults on that VM's
    protected pages may then be missed, which must not go unnoticed nor flood the log."""

    def __init__(self, capture: CaptureEngine, say: Callable[[str], None]) -> None:
        self._capture = capture
        self._say = say
        #: VMs changed since the last sync
        self._dirty: set[VmKey] = set()
        self.errors = 0

    def mark(self, vm: VmKey) -> None:
        """``vm``'s maps changed: its filter is replaced at the next :meth:`sync`."""
        self._dirty.add(vm)

    @property
    def pending(self) -> bool:
        """Whether a VM waits for its filter to be replaced."""
        return bool(self._dirty)

    def sync(self, host: Host, abi: AbiProfile, use_applied: bool) -> None:
        """Replace the filter of every marked live VM, from its applied map when the
        applied hook runs, else from its requested map."""
        dirty = list(self._dirty)
        self._dirty.clear()
        for key in dirty:
            guest = host.guests.get(key)
            if guest is None or guest.destroyed_ns is not None:
                continue
            ranges = protected_ranges(guest.applied if use_applied else guest.requested, abi)
            try:
                self._capture.protect_filter_update(key.tgid, ranges)
            except (OSError, KeyError, HekitraceError) as error:
                self.errors += 1
                if self.errors == 1:
                    self._say(f"WARNING: cannot update the kernel fault filter for pid "
                              f"{key.tgid}: {error}; faults on its protected pages may be "
                              "missed (counted in status filter_errors)")


def seed_memslots(capture: CaptureEngine, host: Host, say: Callable[[str], None]) -> None:
    """Write the known memslots of every live VM into the kernel's memslot table.

    One VM's table that cannot be written costs that VM's page lists (said in the log),
    never the daemon.
    """
    for guest in host.guests.values():
        if guest.destroyed_ns is None and guest.memslots:
            slots = [(slot, m.gpa, m.size_bytes, m.hva)
                     for slot, m in sorted(guest.memslots.items())]
            try:
                capture.seed_memslots(guest.pid, slots)
            except Exception as error:  # noqa: BLE001 - one VM's table, not the daemon
                say(f"WARNING: cannot seed the memslots of pid {guest.pid} into the "
                    f"kernel ({error}); its page lists are unreadable until its "
                    "VMM changes a memslot")
