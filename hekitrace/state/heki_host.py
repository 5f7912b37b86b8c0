"""The Heki v2 host's handling of guest requests, modelled entry by entry.

What a Heki host would do with a guest's PROTECT_MEMORY page list and LOCK_CR_UPDATE
request, applied to one guest's state (its ``requested`` map, memslots, CR pins); kept
apart from :mod:`hekitrace.state.host`, which only routes events to guests and keeps their
bookkeeping. Everything here reads guest-controlled values and never raises on them:
malformed input becomes :class:`~hekitrace.state.changes.Rejection` and
:class:`~hekitrace.state.changes.Anomaly` records.

A ``ProtectRequest`` is interpreted exactly as a Heki v2 host would
(docs/heki-abi.md sections 3-5, ``heki_protect_memory()`` / ``kvm_permissions_set()``):

* entries are applied in reverse order of reading (the host reverses the chain);
* per entry: misaligned ``gpa``/``end_gpa`` -> EINVAL; permissions 0 or outside
  ``MEM_ATTR_PROT`` -> EINVAL; EXEC silently re-added when the profile has no MBEC;
  ``end <= start`` -> EINVAL; a range that overlaps an IMMUTABLE page of the requested
  map -> EPERM, rejected as a whole without touching the map;
* processing stops at the first error and earlier entries stay applied;
* the set uses ``mask = profile.kvm_heki_mask`` and ``value = guest_to_kvm(perms)``.

Entries outside every known memslot are still applied to the requested map, because
``kvm_vm_set_mem_attributes`` stores into the attribute xarray without consulting
memslots (only the arch hooks are per memslot, docs/heki-abi.md section 8); they are reported
as an ``outside_memslots`` anomaly. A guest with no known memslot (found running) is not
checked. ``AttrApplied`` sets the full value it reports (the hook's ``arg.attributes`` is
the new value, docs/heki-abi.md section 8); on a Heki host that also ran private memory this would
clear PRIVATE where Heki bits were set (not a combination any Heki build supported). A
request with more entries than ``max_entries_per_request`` is cut to the first
ones the host would apply and the guest is marked degraded, since the model then
diverges from the host.
"""

from __future__ import annotations

from typing import Any

from hekitrace.config.abi import AbiProfile
from hekitrace.state.attrmap import GFN_LIMIT
from hekitrace.state.changes import Anomaly, MapChange, PinChange, Rejection
from hekitrace.state.events import PAGE_SHIFT, CrPinRequest, ProtectFlags, ProtectRequest

#: x86 CR bits Heki v2 accepts for pinning (docs/heki-abi.md section 7): CR0.WP; CR4 SMEP, SMAP,
#: UMIP, FSGSBASE, CET (and FRED, added in v3's base).
PINNABLE_CR_BITS: dict[int, int] = {
    0: 1 << 16,
    4: (1 << 20) | (1 << 21) | (1 << 11) | (1 << 16) | (1 << 23) | (1 << 32),
}
#: ``KVM_LOCK_CR_UPDATE_VERSION``: with cr=mask=0 the call is a version query
#: (docs/heki-abi.md section 7)
LOCK_CR_UPDATE_VERSION = 1 << 0

_PAGE_MASK = (1 << PAGE_SHIFT) - 1
#: tuple.__new__ skips the NamedTuple's Python-level __new__; every field is passed
_new = tuple.__new__

#: walker flag -> (anomaly kind, does the model diverge from the host?)
_FLAG_ANOMALIES: tuple[tuple[int, str, bool], ...] = (
    (ProtectFlags.TRUNCATED, "list_truncated", True),
    (ProtectFlags.LOOP, "list_loop", True),
    (ProtectFlags.OUTSIDE_MEMSLOT, "list_outside_memslot", True),
    (ProtectFlags.NPAGES_OVERSIZE, "npages_oversize", True),
    (ProtectFlags.READ_FAULT, "list_read_fault", True),
    (ProtectFlags.MISALIGNED_LIST, "list_misaligned", True),
    (ProtectFlags.LOST_PAGES, "list_pages_lost", True),
)
_KNOWN_FLAGS = sum(int(f) for f, _, _ in _FLAG_ANOMALIES)


class HekiModel:
    """The host's request handling for one ABI profile (see module docstring).

    ``max_entries_per_request``: bound on the entries of one request modelled; the rest
    are cut, reported as ``too_many_entries`` and the guest marked degraded.
    """

    def __init__(self, abi: AbiProfile, max_entries_per_request: int = 4096) -> None:
        self.max_entries_per_request = int(max_entries_per_request)
        # derived constants, computed once (hot path)
        self._mbec = abi.mbec
        self._guest_to_kvm = abi.guest_to_kvm
        self._heki_mask = abi.kvm_heki_mask
        self._valid_guest = abi.guest_valid_mask
        self._guest_exec = 1 << abi.guest_exec
        self._kvm_immutable = 1 << abi.kvm_immutable
        #: guest permission bits -> KVM attribute value (at most 16 valid inputs)
        self._to_kvm: dict[int, int] = {}

    def protect(self, guest: Any, event: ProtectRequest,
                degraded: tuple[str, ...]) -> tuple[tuple, tuple, tuple, tuple[str, ...]]:
        """Apply one PROTECT_MEMORY request to ``guest.requested`` as the host would.

        Returns (map changes, rejections, anomalies, ``degraded`` plus the degraded
        reasons this request added); counts rejections and anomalies on the guest.
        """
        anomalies: list[Anomaly] = []
        rejections: list[Rejection] = []
        map_changes: list[MapChange] = []

        flags = event.flags if isinstance(event.flags, int) else 0
        if flags:
            for flag, kind, diverges in _FLAG_ANOMALIES:
                if flags & flag:
                    anomalies.append(Anomaly(kind, f"page-list walk: {kind.replace('_', ' ')}",
                                             {"list_gpa": event.list_gpa, "flags": flags,
                                              "pages": event.pages}))
                    if diverges:
                        reason = f"incomplete protect request ({kind})"
                        if guest.add_degraded(reason):
                            degraded = degraded + (reason,)
            if flags & ~_KNOWN_FLAGS:
                anomalies.append(Anomaly("unknown_flags", "unknown page-list walker flags",
                                         {"flags": hex(flags)}))

        entries = event.entries
        limit = self.max_entries_per_request
        # the host applies list pages in reverse order of reading (docs/heki-abi.md
        # section 4; inside one page it keeps the stored order, not modelled here yet)
        order = entries[::-1]
        if len(order) > limit:
            anomalies.append(Anomaly(
                "too_many_entries",
                f"request has {len(entries)} entries; modelled only the first {limit} "
                "the host applies", {"entries": len(entries), "limit": limit,
                                     "declared_entries": event.declared_entries}))
            order = order[:limit]
            reason = "incomplete protect request (too_many_entries)"
            if guest.add_degraded(reason):
                degraded = degraded + (reason,)

        requested = guest.requested
        heki_mask = self._heki_mask
        valid = self._valid_guest
        exec_bit = self._guest_exec
        immutable = self._kvm_immutable
        mbec = self._mbec
        check_slots = bool(guest.memslot_gfn_ranges())
        to_kvm = self._to_kvm
        time_ns = event.time_ns
        last = len(entries) - 1   # anomalies name an entry by its index as the guest stored it
        for index, entry in enumerate(order):
            gpa, end_gpa, perms = entry
            if (gpa & _PAGE_MASK) or (end_gpa & _PAGE_MASK):
                rejections.append(Rejection(entry, "EINVAL", "gpa or end_gpa not page aligned"))
                anomalies.append(Anomaly("entry_misaligned", "entry not page aligned",
                                         {"gpa": gpa, "end_gpa": end_gpa, "index": last - index}))
                break
            if perms == 0 or perms & ~valid:
                kind = "zero_permissions" if perms == 0 else "unknown_bits"
                rejections.append(Rejection(entry, "EINVAL",
                                            "permissions zero" if perms == 0 else
                                            f"unknown permission bits {perms & ~valid:#x}"))
                anomalies.append(Anomaly(kind, "invalid permissions",
                                         {"permissions": perms, "index": last - index}))
                break
            start = gpa >> PAGE_SHIFT
            end = end_gpa >> PAGE_SHIFT
            if end <= start:
                rejections.append(Rejection(entry, "EINVAL", "end_gpa <= gpa"))
                anomalies.append(Anomaly("end_before_start", "range ends before it starts",
                                         {"gpa": gpa, "end_gpa": end_gpa, "index": last - index}))
                break
            if start < 0 or end > GFN_LIMIT:
                # cannot happen with u64 guest values; a corrupt trace could carry it
                rejections.append(Rejection(entry, "EINVAL", "gfn outside 52-bit space"))
                anomalies.append(Anomaly("gfn_overflow", "range outside the 52-bit space",
                                         {"gpa": gpa, "end_gpa": end_gpa, "index": last - index}))
                break
            if not mbec and not perms & exec_bit:
                # "Clearing kernel exec depends on MBEC" (docs/heki-abi.md section 5)
                perms |= exec_bit
            if requested.any_bits(start, end, immutable):
                rejections.append(Rejection(entry, "EPERM",
                                            "range overlaps an immutable page"))
                break
            if check_slots and not guest.covered_by_memslots(start, end):
                anomalies.append(Anomaly("outside_memslots",
                                         "range not (fully) backed by a memslot",
                                         {"gpa": gpa, "end_gpa": end_gpa, "index": last - index}))
            value = to_kvm.get(perms)
            if value is None:
                value = to_kvm[perms] = self._guest_to_kvm(perms)
            for seg_start, seg_end, old, new in requested.set(start, end, value, heki_mask):
                map_changes.append(_new(MapChange, ("requested", seg_start, seg_end, old, new)))
            if value & immutable and guest.lockdown_ns is None:
                guest.lockdown_ns = time_ns

        if rejections:
            guest.counters["rejected_entries"] += len(rejections)
        if anomalies:
            guest.counters["anomalies"] += len(anomalies)
        return tuple(map_changes), tuple(rejections), tuple(anomalies), degraded


    def pin_cr(self, guest: Any, event: CrPinRequest) -> tuple[PinChange | None,
                                                               tuple[Anomaly, ...]]:
        """Apply one LOCK_CR_UPDATE request to ``guest.pinned_cr`` as the host would.

        Returns the pin change (None when nothing new is pinned) and the anomalies
        (counted on the guest); a version query (cr = mask = 0) changes nothing.
        """
        cr, mask, flags = event.cr, event.mask, event.flags
        if flags & LOCK_CR_UPDATE_VERSION and cr == 0 and mask == 0:
            return None, ()
        anomalies: list[Anomaly] = []
        allowed = PINNABLE_CR_BITS.get(cr)
        if allowed is None:
            anomalies.append(Anomaly("cr_pin_invalid", f"cannot pin CR{cr} (host: -EINVAL)",
                                     {"cr": cr, "mask": mask, "flags": flags}))
            guest.counters["anomalies"] += 1
            return None, tuple(anomalies)
        if mask & ~allowed:
            anomalies.append(Anomaly("cr_pin_unknown_bits", "bits that cannot be pinned",
                                     {"cr": cr, "bits": hex(mask & ~allowed)}))
        if flags & ~LOCK_CR_UPDATE_VERSION:
            anomalies.append(Anomaly("cr_pin_unknown_flags", "unknown LOCK_CR_UPDATE flags",
                                     {"flags": hex(flags)}))
        guest.counters["anomalies"] += len(anomalies)
        old = guest.pinned_cr.get(cr, 0)
        new = old | (mask & allowed)
        pin = None
        if new != old:
            guest.pinned_cr[cr] = new
            pin = PinChange(cr, old, new)
            if guest.lockdown_ns is None:
                guest.lockdown_ns = event.time_ns
        return pin, tuple(anomalies)

