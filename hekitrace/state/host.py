"""Per-guest state rebuilt from the event stream: ``Host`` maps VM identity to ``Guest``.

``Host.apply(event)`` is the one entry point. It does no I/O, returns a
:class:`~hekitrace.state.changes.Change` describing what moved, and never raises on event
content: everything in an event may come from a hostile guest (page lists, CR masks) and
malformed input becomes :class:`~hekitrace.state.changes.Rejection` and
:class:`~hekitrace.state.changes.Anomaly` records that the rules read.

What the Heki host would do with a guest's requests (PROTECT_MEMORY page lists,
LOCK_CR_UPDATE) is modelled in :mod:`hekitrace.state.heki_host`; this module routes events to
guests and keeps their bookkeeping (lifecycle, memslots, counters, degraded reasons).
``AttrApplied`` sets the full value it reports (the hook's ``arg.attributes`` is the new
value, docs/heki-abi.md section 8); on a Heki host that also ran private memory this would clear
PRIVATE where Heki bits were set (not a combination any Heki build supported).
"""

from __future__ import annotations

from collections.abc import Callable

from hekitrace.config.abi import AbiProfile
from hekitrace.state.attrmap import ALL_BITS, GFN_LIMIT, AttrMap
from hekitrace.state.changes import Anomaly, Change, MapChange, VmKey
from hekitrace.state.events import (
    NAME_OF,
    PAGE_SHIFT,
    AttrApplied,
    AttrIoctl,
    CrPinRequest,
    CrWrite,
    Event,
    Fault,
    Hypercall,
    Lost,
    Memslot,
    ProtectRequest,
    VmCreated,
    VmDestroyed,
)
from hekitrace.state.heki_host import LOCK_CR_UPDATE_VERSION, PINNABLE_CR_BITS, HekiModel

__all__ = ["LOCK_CR_UPDATE_VERSION", "MAX_DEGRADED_REASONS",
           "PINNABLE_CR_BITS", "REASON_PREEXISTING", "Guest", "Host", "MemslotInfo"]

#: bound on the degraded reasons kept per guest (a hostile stream must not grow it)
MAX_DEGRADED_REASONS = 32

REASON_PREEXISTING = "running before monitoring started"
#: two creation reports by one VMM, one of them without the VM fd (a uevent without a
#: debugfs STATS_PATH), this close in time are the same VM seen by two sources (uevent
#: and ioctl hook report one KVM_CREATE_VM within the syscall, plus read/queue delay)
MERGE_WINDOW_NS = 2_000_000_000

_PAGE_MASK = (1 << PAGE_SHIFT) - 1
#: tuple.__new__ skips the NamedTuple's Python-level __new__; every field is passed
_new = tuple.__new__


class MemslotInfo:
    """One memslot: ``size_bytes`` at guest-physical ``gpa``, backed by VMM address ``hva``."""

    __slots__ = ("flags", "gpa", "hva", "size_bytes")

    def __init__(self, gpa: int, size_bytes: int, hva: int, flags: int) -> None:
        self.gpa = gpa
        self.size_bytes = size_bytes
        self.hva = hva
        self.flags = flags

    def __repr__(self) -> str:
        return (f"MemslotInfo(gpa={self.gpa:#x}, size_bytes={self.size_bytes:#x}, "
                f"hva={self.hva:#x}, flags={self.flags:#x})")


class Guest:
    """Everything known about one VM: two attribute maps, memslots, CR pins, counters.

    Both ``requested`` (what the guest asked, as the Heki host would have stored it) and
    ``applied`` (what the kernel hook / ioctl reported) hold KVM attribute values; 0 is
    "no attribute" (default RWX).
    """

    __slots__ = (
        "_slot_gfns",
        "applied",
        "counters",
        "created_ns",
        "degraded_reasons",
        "destroyed_ns",
        "heki_applied_seen",
        "key",
        "lockdown_ns",
        "memslots",
        "name",
        "pid",
        "pinned_cr",
        "preexisting",
        "requested",
        "stats_path",
        "uuid",
        "vm_fd",
        "vmm",
    )

    def __init__(self, key: VmKey, *, name: str = "", uuid: str = "", vmm: str = "",
                 preexisting: bool = False, vm_fd: int = -1, stats_path: str = "") -> None:
        self.key = key
        self.name = name
        self.uuid = uuid
        self.vmm = vmm
        #: the VM's fd in its VMM (-1 = unknown) and debugfs path: how a second report
        #: of the same creation (another source) is recognised (Host._same_vm)
        self.vm_fd = vm_fd
        self.stats_path = stats_path
        self.pid = key.tgid
        self.created_ns = key.created_ns
        self.destroyed_ns: int | None = None
        self.requested = AttrMap()
        self.applied = AttrMap()
        self.memslots: dict[int, MemslotInfo] = {}
        self.pinned_cr: dict[int, int] = {}
        self.lockdown_ns: int | None = None
        self.counters: dict[str, int] = dict.fromkeys(NAME_OF.values(), 0)
        self.counters.update(rejected_entries=0, anomalies=0, lost_events=0)
        self.degraded_reasons: list[str] = []
        self.preexisting = preexisting
        #: True once the applied map received any Heki bit (see policy: unsupported hosts)
        self.heki_applied_seen = False
        self._slot_gfns: list[tuple[int, int]] = []

    @property
    def degraded(self) -> bool:
        """True when this guest's history may be incomplete (see ``degraded_reasons``)."""
        return bool(self.degraded_reasons)

    @property
    def live(self) -> bool:
        return self.destroyed_ns is None

    def add_degraded(self, reason: str) -> bool:
        """Record ``reason`` once; False when already known (or the list is full)."""
        if reason in self.degraded_reasons or len(self.degraded_reasons) >= MAX_DEGRADED_REASONS:
            return False
        self.degraded_reasons.append(reason)
        return True

    def memslot_gfn_ranges(self) -> list[tuple[int, int]]:
        """Merged, sorted [gfn_start, gfn_end) ranges covered by memslots."""
        return self._slot_gfns

    def _rebuild_slot_gfns(self) -> None:
        spans = sorted((m.gpa >> PAGE_SHIFT, (m.gpa + m.size_bytes + _PAGE_MASK) >> PAGE_SHIFT)
                       for m in self.memslots.values() if m.size_bytes > 0)
        merged: list[tuple[int, int]] = []
        for start, end in spans:
            if merged and start <= merged[-1][1]:
                if end > merged[-1][1]:
                    merged[-1] = (merged[-1][0], end)
            else:
                merged.append((start, end))
        self._slot_gfns = merged

    def covered_by_memslots(self, gfn_start: int, gfn_end: int) -> bool:
        """True when [gfn_start, gfn_end) lies entirely inside known memslots."""
        pos = gfn_start
        for start, end in self._slot_gfns:
            if start > pos:
                return False
            if end > pos:
                pos = end
                if pos >= gfn_end:
                    return True
        return pos >= gfn_end

    def __repr__(self) -> str:
        return f"Guest({self.name!r}, key={tuple(self.key)}, live={self.live})"


class Host:
    """All guests of this host, keyed by :class:`VmKey`; applies events to them.

    ``grace_period_ns``: how long a destroyed guest stays visible (for ``snapshot``)
    before :meth:`expire` drops it. ``max_entries_per_request``: bound on the entries of
    one ``ProtectRequest`` modelled (the rest are cut, counted and reported).
    """

    def __init__(self, abi: AbiProfile, grace_period_ns: int = 300_000_000_000, *,
                 max_entries_per_request: int = 4096) -> None:
        self.abi = abi
        self.grace_period_ns = int(grace_period_ns)
        self.max_entries_per_request = int(max_entries_per_request)
        self.guests: dict[VmKey, Guest] = {}
        self._live: dict[int, Guest] = {}
        #: the same dict, read-only for the pipeline's fast path: tgid -> live guest
        self.live_by_tgid = self._live
        #: events that belonged to no guest (tgid 0 losses, destroy of an unknown VM)
        #: merged_creations: VmCreated reports of a VM already live (another source)
        self.counters: dict[str, int] = {"unattributed_events": 0, "internal_errors": 0,
                                         "unattributed_lost_events": 0,
                                         "merged_creations": 0}
        self.last_internal_error: str | None = None
        # derived constants, computed once (hot path)
        self._heki_mask = abi.kvm_heki_mask
        self._private_mask = abi.kvm_private_mask
        self._heki = HekiModel(abi, self.max_entries_per_request)
        #: kinds that only bump a counter of their live guest -> that counter's name
        #: (read by the pipeline's fast path, which must build the Change apply would)
        self.counted_kinds: dict[type, str] = {
            cls: NAME_OF[cls] for cls in (Hypercall, Fault, CrWrite)}
        self._counted = self.counted_kinds
        self._dispatch: dict[type, Callable[..., Change]] = {
            VmCreated: self._vm_created,
            VmDestroyed: self._vm_destroyed,
            Memslot: self._memslot,
            Hypercall: self._count_only,
            ProtectRequest: self._protect_request,
            CrPinRequest: self._cr_pin_request,
            AttrApplied: self._attr_applied,
            AttrIoctl: self._attr_ioctl,
            Fault: self._count_only,
            CrWrite: self._count_only,
            Lost: self._lost,
        }

    # -- public API ------------------------------------------------------------------
    def apply(self, event: Event) -> Change:
        """Apply one event; return what changed. Never raises on event content.

        An unexpected internal error (a bug, not guest input) is counted in
        ``counters["internal_errors"]``, marks the guest degraded, and is returned as an
        ``internal_error`` anomaly rather than killing the daemon.
        """
        etype = type(event)
        try:
            # fast path: the kinds that only count, from a known live VM (most of the
            # stream); the same Change _count_only returns, built without its calls
            name = self._counted.get(etype)
            if name is not None:
                guest = self._live.get(event.tgid)
                if guest is not None:
                    guest.counters[name] += 1
                    return _new(Change, (event, guest.key, (), None, (), (), None, ()))
        except TypeError:  # an unhashable tgid (a corrupt trace): the slow path reports it
            pass
        handler = self._dispatch.get(etype)
        if handler is None:
            self.counters["unattributed_events"] += 1
            return Change(event=event, vm=None, anomalies=(Anomaly(
                "unknown_event", f"unknown event type {type(event).__name__}", {}),))
        try:
            return handler(event)
        except Exception as error:  # noqa: BLE001 - the boundary: guest input must not kill us
            self.counters["internal_errors"] += 1
            self.last_internal_error = f"{type(error).__name__}: {error}"
            tgid = getattr(event, "tgid", 0)
            guest = self._live.get(tgid) if isinstance(tgid, int) else None
            degraded: tuple[str, ...] = ()
            if guest is not None and guest.add_degraded("internal error applying an event"):
                degraded = ("internal error applying an event",)
            return Change(event=event, vm=guest.key if guest else None, degraded=degraded,
                          anomalies=(Anomaly("internal_error", self.last_internal_error,
                                             {"event": NAME_OF.get(type(event), "?")}),))

    def by_tgid(self, tgid: int) -> Guest | None:
        """The live VM of VMM process ``tgid``, or None."""
        return self._live.get(tgid)

    def live_guests(self) -> list[Guest]:
        return list(self._live.values())

    def expire(self, now_ns: int) -> list[Change]:
        """Drop destroyed guests whose grace period has passed; one ``retired`` change each."""
        gone = [g for g in self.guests.values()
                if g.destroyed_ns is not None and now_ns - g.destroyed_ns >= self.grace_period_ns]
        changes = []
        for guest in gone:
            del self.guests[guest.key]
            changes.append(Change(event=None, vm=guest.key, lifecycle="retired"))
        return changes

    def mark_degraded(self, key: VmKey, reason: str) -> Change:
        """Mark a guest degraded (journal gap, ...); the change lists the reason if new."""
        guest = self.guests.get(key)
        if guest is None or not guest.add_degraded(reason):
            return Change(event=None, vm=key if guest else None)
        return Change(event=None, vm=key, degraded=(reason,))

    # -- helpers -----------------------------------------------------------------------
    def _guest_for(self, event: Event) -> tuple[Guest, tuple[str, ...], str | None]:
        """The live guest of ``event.tgid``, creating an implicit (degraded) one if needed."""
        guest = self._live.get(event.tgid)
        if guest is not None:
            guest.counters[NAME_OF[type(event)]] += 1
            return guest, (), None
        guest = Guest(VmKey(event.tgid, event.time_ns), preexisting=True)
        guest.add_degraded(REASON_PREEXISTING)
        self.guests[guest.key] = guest
        self._live[event.tgid] = guest
        guest.counters[NAME_OF[type(event)]] = 1
        return guest, (REASON_PREEXISTING,), "created"

    def _count_only(self, event: Event) -> Change:
        guest = self._live.get(event.tgid)
        if guest is not None:
            guest.counters[NAME_OF[type(event)]] += 1
            return Change(event, guest.key)
        guest, degraded, lifecycle = self._guest_for(event)
        return Change(event, guest.key, lifecycle=lifecycle, degraded=degraded)

    # -- lifecycle ---------------------------------------------------------------------
    def _same_vm(self, guest: Guest, event: VmCreated) -> bool:
        """True when ``event`` reports ``guest`` again (another source, not a new VM).

        The ioctl hook, the uevent and start-up discovery each report a VM's creation.
        The same VM: the same VM fd, or exactly one side's fd unknown (-1) and the reports within
        MERGE_WINDOW_NS. Different known fds are a second VM of that VMM. An implicit
        guest (made by a VM's events, no creation seen) is never merged into.
        """
        if not guest.counters["vm_created"]:
            return False
        if guest.vm_fd >= 0 and event.vm_fd >= 0:
            return guest.vm_fd == event.vm_fd
        if guest.vm_fd < 0 and event.vm_fd < 0:
            return False  # no evidence either way (two uevents are two VMs): a new VM
        return abs(event.time_ns - guest.created_ns) <= MERGE_WINDOW_NS

    def _merge_creation(self, guest: Guest, event: VmCreated) -> Change:
        """Fill what ``guest`` lacks from a second report of its creation; keep the rest
        (its key, history, and whether it was seen being born rather than preexisting)."""
        self.counters["merged_creations"] += 1
        if not guest.name:
            guest.name = event.name
        if not guest.uuid:
            guest.uuid = event.uuid
        if not guest.vmm:
            guest.vmm = event.vmm
        if not guest.stats_path:
            guest.stats_path = event.stats_path
        if guest.vm_fd < 0:
            guest.vm_fd = event.vm_fd
        return Change(event, guest.key)

    def _vm_created(self, event: VmCreated) -> Change:
        anomalies: tuple[Anomaly, ...] = ()
        live = self._live.get(event.tgid)
        if live is not None and self._same_vm(live, event):
            return self._merge_creation(live, event)
        old = self._live.pop(event.tgid, None)
        if old is not None:
            # pid reuse, or a VMM that created a second VM: the old one is gone for us
            old.destroyed_ns = event.time_ns
            anomalies = (Anomaly("vm_replaced", "a new VM was created by the same process; "
                                 "the previous one is treated as destroyed",
                                 {"previous": {"tgid": old.key.tgid,
                                               "created_ns": old.key.created_ns}}),)
        key = VmKey(event.tgid, event.time_ns)
        while key in self.guests:  # two creations in the same ns: keep both
            key = VmKey(key.tgid, key.created_ns + 1)
        guest = Guest(key, name=event.name, uuid=event.uuid, vmm=event.vmm,
                      preexisting=bool(event.preexisting), vm_fd=event.vm_fd,
                      stats_path=event.stats_path)
        guest.counters["vm_created"] = 1
        degraded: tuple[str, ...] = ()
        if event.preexisting:
            guest.add_degraded(REASON_PREEXISTING)
            degraded = (REASON_PREEXISTING,)
        self.guests[key] = guest
        self._live[event.tgid] = guest
        return Change(event, key, anomalies=anomalies, lifecycle="created", degraded=degraded)

    def _vm_destroyed(self, event: VmDestroyed) -> Change:
        guest = self._live.pop(event.tgid, None)
        if guest is None:
            self.counters["unattributed_events"] += 1
            return Change(event, None)
        guest.counters["vm_destroyed"] = 1
        guest.destroyed_ns = event.time_ns
        return Change(event, guest.key, lifecycle="destroyed")

    def _memslot(self, event: Memslot) -> Change:
        guest, degraded, lifecycle = self._guest_for(event)
        if event.size_bytes <= 0:
            guest.memslots.pop(event.slot, None)
        else:
            guest.memslots[event.slot] = MemslotInfo(event.gpa, event.size_bytes, event.hva,
                                                     event.flags)
        guest._rebuild_slot_gfns()
        return Change(event, guest.key, lifecycle=lifecycle, degraded=degraded)

    def _lost(self, event: Lost) -> Change:
        """Charge a loss to its VM: the live one, else the newest destroyed one in grace.

        Losses are read from the kernel's table periodically, so a VMM's last ones can
        arrive after its ``VmDestroyed``; they never create an implicit guest (no destroy
        would ever come for it). A loss with no such VM is counted on the host
        (``unattributed_events``, ``unattributed_lost_events``); the pipeline's
        per-stage loss totals count it either way.
        """
        count = event.count if isinstance(event.count, int) and event.count > 0 else 1
        guest = self.loss_owner(event.tgid) if event.tgid else None
        if guest is None:
            self.counters["unattributed_events"] += 1
            self.counters["unattributed_lost_events"] += count
            return Change(event, None)
        guest.counters[NAME_OF[Lost]] += 1
        guest.counters["lost_events"] += count
        reason = f"events lost: {event.stage}/{event.reason}"
        degraded: tuple[str, ...] = (reason,) if guest.add_degraded(reason) else ()
        return Change(event, guest.key, degraded=degraded)

    def loss_owner(self, tgid: int) -> Guest | None:
        """The guest a loss of VMM ``tgid`` belongs to: its live VM, else its newest
        destroyed VM still in its grace period, else None (see ``_lost``)."""
        guest = self._live.get(tgid)
        if guest is not None:
            return guest
        newest = None
        for key, candidate in self.guests.items():
            if key.tgid == tgid and (newest is None or key.created_ns > newest.key.created_ns):
                newest = candidate
        return newest

    # -- protection ----------------------------------------------------------------------
    # -- protection (the Heki host's side is modelled in hekimodel) ----------------------
    def _protect_request(self, event: ProtectRequest) -> Change:
        guest, degraded, lifecycle = self._guest_for(event)
        map_changes, rejections, anomalies, degraded = self._heki.protect(guest, event,
                                                                          degraded)
        return _new(Change, (event, guest.key, map_changes, None, rejections, anomalies,
                             lifecycle, degraded))

    def _cr_pin_request(self, event: CrPinRequest) -> Change:
        guest, degraded, lifecycle = self._guest_for(event)
        pin, anomalies = self._heki.pin_cr(guest, event)
        return Change(event, guest.key, pin_change=pin, anomalies=anomalies,
                      lifecycle=lifecycle, degraded=degraded)

    def _attr_applied(self, event: AttrApplied) -> Change:
        guest, degraded, lifecycle = self._guest_for(event)
        start, end = event.gfn_start, event.gfn_end
        if not (0 <= start < end <= GFN_LIMIT) or not 0 <= event.attributes <= ALL_BITS:
            guest.counters["anomalies"] += 1
            return Change(event, guest.key, anomalies=(Anomaly(
                "applied_bad_range", "applied range empty or outside the 52-bit space",
                {"gfn_start": start, "gfn_end": end}),), lifecycle=lifecycle, degraded=degraded)
        attributes = event.attributes
        if attributes & self._heki_mask:
            guest.heki_applied_seen = True
        changes = tuple([_new(MapChange, ("applied", s, e, old, new))
                         for s, e, old, new in guest.applied.set(start, end, attributes,
                                                                 ALL_BITS)])
        return Change(event, guest.key, changes, lifecycle=lifecycle, degraded=degraded)

    def _attr_ioctl(self, event: AttrIoctl) -> Change:
        guest, degraded, lifecycle = self._guest_for(event)
        if event.result != 0:
            return Change(event, guest.key, lifecycle=lifecycle, degraded=degraded)
        start = event.address >> PAGE_SHIFT
        end = (event.address + event.size_bytes) >> PAGE_SHIFT
        anomalies: tuple[Anomaly, ...] = ()
        if event.attributes & ~self._private_mask:
            anomalies = (Anomaly("unknown_bits", "ioctl attributes beyond PRIVATE",
                                 {"attributes": hex(event.attributes)}),)
        if not (0 <= start < end <= GFN_LIMIT) or not 0 <= event.attributes <= ALL_BITS:
            anomalies += (Anomaly("applied_bad_range", "ioctl range empty or too large",
                                  {"address": event.address, "size_bytes": event.size_bytes}),)
            guest.counters["anomalies"] += len(anomalies)
            return Change(event, guest.key, anomalies=anomalies, lifecycle=lifecycle,
                          degraded=degraded)
        guest.counters["anomalies"] += len(anomalies)
        # upstream KVM_SET_MEMORY_ATTRIBUTES stores the full value; PRIVATE is the only
        # supported bit, so masking with it leaves Heki bits (if any) untouched
        changes = tuple(MapChange("applied", s, e, old, new)
                        for s, e, old, new in guest.applied.set(start, end, event.attributes,
                                                                self._private_mask))
        return Change(event, guest.key, changes, anomalies=anomalies, lifecycle=lifecycle,
                      degraded=degraded)
