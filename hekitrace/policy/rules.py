"""The rules: what each kind of change record means for a Heki guest.

Every rule looks only at the :class:`~hekitrace.state.changes.Change` that ``Host.apply``
returned (the event, the changed ranges, rejections and anomalies) or at one page / one
range of a map, never at whole maps. Rule ids and meanings are in
:mod:`hekitrace.policy.catalogue` and docs/findings.md; the background is
docs/heki-abi.md sections 5-7 and 12.

:class:`Rules` is owned by :class:`hekitrace.policy.engine.Policy`: one method per event
kind, ``(change, event, state, guest, out)``, listed in :attr:`Rules.by_kind`, appending
findings to ``out`` through storm control (``emit``, or ``admit`` + ``record`` when
evidence is costly to build) and scheduling pairing checks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from hekitrace.config.abi import AbiProfile, cr_bit_names
from hekitrace.policy.findings import Finding, event_json
from hekitrace.policy.pairing import Pairing, clip
from hekitrace.policy.storm import StormControl
from hekitrace.policy.vm_state import VmState
from hekitrace.state.attrmap import GFN_LIMIT
from hekitrace.state.changes import Change
from hekitrace.state.events import (
    PAGE_SHIFT,
    PAGE_SIZE,
    AttrApplied,
    AttrIoctl,
    CrPinRequest,
    CrWrite,
    Event,
    Fault,
    FaultAccess,
    ProtectEntry,
    ProtectRequest,
)

#: anomaly kinds that are not the guest's malformed input (handled elsewhere or benign)
_NOT_MALFORMED = frozenset({"vm_replaced", "internal_error", "unknown_event"})
#: announcements kept for this many pairing windows (faults are reported up to
#: capture.fault_report_interval_seconds after their first occurrence)
_ANNOUNCE_KEEP_WINDOWS = 4
#: plain ints: IntFlag arithmetic costs microseconds per fault on the hot path
_WRITE = int(FaultAccess.WRITE)
_FETCH = int(FaultAccess.FETCH)


#: malformed entries listed in a finding's evidence (all of them are counted)
MALFORMED_SHOWN = 16


def malformed_entries(entries: Sequence[ProtectEntry], valid: int) -> list[dict]:
    """Every malformed entry of a request, in the guest's order, with its index in the
    list as read (head page first, entries in stored order). The host stops at the first
    one; the operator needs them all to see what the guest sent."""
    out = []
    for index, (gpa, end_gpa, perms) in enumerate(entries):
        kinds = []
        if (gpa | end_gpa) & (PAGE_SIZE - 1):
            kinds.append("entry_misaligned")
        if end_gpa <= gpa:
            kinds.append("end_before_start")
        if perms == 0:
            kinds.append("zero_permissions")
        elif perms & ~valid:
            kinds.append("unknown_bits")
        for kind in kinds:
            out.append({"index": index, "kind": kind, "gpa": hex(gpa),
                        "end_gpa": hex(end_gpa), "permissions": hex(perms)})
    return out


class Rules:
    """One rule method per event kind (see module docstring).

    ``enabled`` maps rule ids to whether they run; ``pairing_active`` says whether
    map changes schedule pairing checks (the policy decides it from the hook and the
    pairing rules); ``applied_hook_active`` which map faults are judged against.
    """

    def __init__(self, *, abi: AbiProfile, enabled: Mapping[str, bool], storm: StormControl,
                 pairing: Pairing, pairing_active: bool, applied_hook_active: bool,
                 max_entries_inspected: int) -> None:
        self.abi = abi
        self.applied_hook_active = applied_hook_active
        self.max_entries_inspected = max_entries_inspected
        self._enabled = enabled
        self._pairing = pairing_active
        self._window_ns = pairing.window_ns
        # bound methods of the parts, held here: the rules call them on hot paths
        self._emit = storm.emit
        self._admit = storm.admit
        self._record = storm.record
        self._expect = pairing.expect
        self._heki = abi.kvm_heki_mask
        self._kw = 1 << abi.kvm_write
        self._kx = 1 << abi.kvm_exec
        self._ki = 1 << abi.kvm_immutable
        self._gw = 1 << abi.guest_write
        self._gx = 1 << abi.guest_exec
        self._gvalid = abi.guest_valid_mask
        #: faults on pages of a "make writable" announcement (not findings)
        self.stats: dict[str, int] = {"announced_writes": 0}
        #: event class -> its rule ``(change, event, state, guest, out)``
        self.by_kind: dict[type, Callable[..., None]] = {
            ProtectRequest: self._on_protect,
            AttrApplied: self._on_applied,
            AttrIoctl: self._on_applied,
            CrPinRequest: self._on_cr_pin,
            CrWrite: self._on_cr_write,
            Fault: self._on_fault,
        }

    def _on_protect(self, change: Change, event: ProtectRequest, st: VmState, guest: Any,
                    out: list[Finding]) -> None:
        abi = self.abi
        time_ns = event.time_ns
        enabled = self._enabled
        entries = event.entries
        if len(entries) > 1:
            entries = entries[::-1][:self.max_entries_inspected]  # host order
        rejected = None
        bad: list = []
        einval: list = []
        if change.rejections or change.anomalies:
            rejected = change.rejections[0].entry if change.rejections else None
            bad = [a for a in change.anomalies if a.kind not in _NOT_MALFORMED]
            einval = [r for r in change.rejections if r.errno != "EPERM"]
        if (bad or einval) and enabled["malformed_request"]:
            malformed = malformed_entries(event.entries[:self.max_entries_inspected],
                                          self._gvalid)
            kinds = sorted({a.kind for a in bad} | {"rejected_" + r.errno for r in einval})
            self._emit(out, st, "malformed_request", time_ns,
                       f"malformed protect request at gpa {event.list_gpa:#x}: "
                       + ", ".join(kinds),
                       {"event": event_json(event), "kinds": kinds,
                        "anomalies": [{"kind": a.kind, "message": a.message,
                                       "detail": a.detail} for a in bad[:16]],
                        "rejections": [{"entry": list(r.entry), "errno": r.errno,
                                        "reason": r.reason} for r in einval[:16]],
                        "malformed_entries": malformed[:MALFORMED_SHOWN],
                        "malformed_entries_total": len(malformed)},
                       ("request", tuple(kinds)))
        gw, gx, valid = self._gw, self._gx, self._gvalid
        for entry in entries:
            perms = entry.permissions
            if perms & gw and perms & gx and not perms & ~valid and enabled["wx_request"]:
                s, e = entry.gpa >> PAGE_SHIFT, entry.end_gpa >> PAGE_SHIFT
                self._emit(out, st, "wx_request", time_ns,
                           f"guest requested write+execute on gfns {s:#x}-{e:#x}",
                           {"event": event_json(event), "entry": list(entry),
                            "gfn_start": s, "gfn_end": e,
                            "new": abi.attr_flags(abi.guest_to_kvm(perms))}, (s, e))
            if entry is rejected:
                break
        # "make writable" announcements: a protected, non-writable range became writable
        # (text_poke's first request); a later write fault there is expected, not an attack
        kw, heki = self._kw, self._heki
        for mc in change.map_changes:
            if mc.new & kw and not mc.old & kw and mc.old & heki:
                st.recent_writable.append(time_ns, mc.gfn_start, mc.gfn_end)
        for rejection in change.rejections:
            if rejection.errno == "EPERM":
                self._on_eperm(rejection.entry, event, st, guest, out)
        if self._pairing and not guest.preexisting:
            slots = guest.memslot_gfn_ranges()
            for mc in change.map_changes:
                if (mc.old ^ mc.new) & heki:
                    if slots:
                        for s, e in clip(mc.gfn_start, mc.gfn_end, slots):
                            self._expect(st, "requested", s, e, time_ns)
                    else:
                        self._expect(st, "requested", mc.gfn_start, mc.gfn_end, time_ns)

    def _on_eperm(self, entry: Any, event: ProtectRequest, st: VmState, guest: Any,
                  out: list[Finding]) -> None:
        abi = self.abi
        s, e = entry.gpa >> PAGE_SHIFT, entry.end_gpa >> PAGE_SHIFT
        perms = entry.permissions
        olds = sorted(guest.requested.values_in(s, e))
        relax = False
        for old in olds:
            if old & self._ki:
                if perms & self._gw and not old & self._kw:
                    relax = True
                if abi.mbec and perms & self._gx and not old & self._kx:
                    relax = True
        evidence = {"event": event_json(event), "entry": list(entry), "gfn_start": s,
                    "gfn_end": e, "old": [abi.attr_flags(v) for v in olds],
                    "new": abi.attr_flags(abi.guest_to_kvm(perms)), "errno": "EPERM",
                    "lockdown_ns": guest.lockdown_ns}
        if relax and guest.lockdown_ns is not None and self._enabled["relax_after_lockdown"]:
            self._emit(out, st, "relax_after_lockdown", event.time_ns,
                       f"after lockdown the guest asked to make immutable gfns {s:#x}-{e:#x} "
                       f"{evidence['new']} (host refused: EPERM)", evidence, (s, e))
        elif self._enabled["immutable_change"]:
            self._emit(out, st, "immutable_change", event.time_ns,
                       f"request to change immutable gfns {s:#x}-{e:#x} to {evidence['new']} "
                       "(host refused: EPERM)", evidence, (s, e))

    def _on_applied(self, change: Change, event: Event, st: VmState, guest: Any,
                    out: list[Finding]) -> None:
        abi = self.abi
        ki, kw, kx, heki = self._ki, self._kw, self._kx, self._heki
        pairing = self._pairing and not guest.preexisting
        for mc in change.map_changes:
            old, new = mc.old, mc.new
            if old & ki:
                relaxed = (not new & ki or not new & heki or (new & kw and not old & kw)
                           or (new & kx and not old & kx))
                rule = "immutable_relaxed" if relaxed else "immutable_change"
                if self._enabled[rule]:
                    what = "lost protection" if relaxed else "changed"
                    self._emit(out, st, rule, event.time_ns,
                               f"applied map: immutable gfns {mc.gfn_start:#x}-{mc.gfn_end:#x} "
                               f"{what}: {abi.attr_flags(old)} -> {abi.attr_flags(new)}",
                               {"event": event_json(event), "gfn_start": mc.gfn_start,
                                "gfn_end": mc.gfn_end, "old": abi.attr_flags(old),
                                "new": abi.attr_flags(new)}, (mc.gfn_start, mc.gfn_end))
            if pairing and (old ^ new) & heki:
                self._expect(st, "applied", mc.gfn_start, mc.gfn_end, event.time_ns)

    def _on_cr_pin(self, change: Change, event: CrPinRequest, st: VmState, guest: Any,
                   out: list[Finding]) -> None:
        if change.anomalies and self._enabled["malformed_request"]:
            kinds = sorted({a.kind for a in change.anomalies})
            self._emit(out, st, "malformed_request", event.time_ns,
                       f"malformed CR pin request (CR{event.cr}): " + ", ".join(kinds),
                       {"event": event_json(event), "kinds": kinds,
                        "anomalies": [{"kind": a.kind, "message": a.message,
                                       "detail": a.detail} for a in change.anomalies]},
                       ("cr_pin", event.cr, tuple(kinds)))

    def _on_cr_write(self, change: Change, event: CrWrite, st: VmState, guest: Any,
                     out: list[Finding]) -> None:
        pinned = guest.pinned_cr.get(event.cr)
        if not pinned or not self._enabled["cr_pin_violation"]:
            return
        cleared = pinned & ~event.value
        if cleared:
            names = cr_bit_names(event.cr, cleared)
            self._emit(out, st, "cr_pin_violation", event.time_ns,
                       f"guest wrote CR{event.cr}={event.value:#x}, clearing pinned "
                       + ", ".join(names),
                       {"event": event_json(event), "cr": event.cr, "value": event.value,
                        "pinned": pinned, "cleared": names}, (event.cr, cleared))

    def _on_fault(self, change: Change, event: Fault, st: VmState, guest: Any,
                  out: list[Finding]) -> None:
        # hot during a fault storm: fields unpacked once, no attribute chains
        time_ns, _tgid, _tid, _vcpu, gpa, _ec, rip, access, count, first_ns = event
        gfn = gpa >> PAGE_SHIFT
        source = guest.applied if self.applied_hook_active else guest.requested
        value = source.get(gfn) if 0 <= gfn < GFN_LIMIT else 0
        if not value & self._heki:
            return
        if not (isinstance(count, int) and count > 0):
            count = 1
        if access & _WRITE and not value & self._kw and self._enabled["protected_write"]:
            recent = st.recent_writable
            announced = False
            if recent:
                # announcements far older than any fault could refer to are dropped; then
                # one index lookup on the page (vm_state.Announcements), not a scan
                window = self._window_ns
                recent.expire(time_ns - _ANNOUNCE_KEEP_WINDOWS * window)
                if recent.announced(gfn, first_ns or time_ns, window):
                    self.stats["announced_writes"] += count
                    announced = True
            if not announced and self._admit(out, st, "protected_write", time_ns,
                                             (gfn, "w"), count):
                self._record(out, st, "protected_write", time_ns,
                             f"write to protected gpa {gpa:#x} "
                             f"({self.abi.attr_flags(value)}) x{count} at rip {rip:#x}",
                             self._fault_evidence(event, gfn, value), (gfn, "w"), count)
        if access & _FETCH and not value & self._kx \
                and self._enabled["protected_fetch"] \
                and self._admit(out, st, "protected_fetch", time_ns, (gfn, "x"), count):
            self._record(out, st, "protected_fetch", time_ns,
                         f"kernel fetch from non-executable gpa {gpa:#x} "
                         f"({self.abi.attr_flags(value)}) x{count} at rip {rip:#x}",
                         self._fault_evidence(event, gfn, value), (gfn, "x"), count)

    def _fault_evidence(self, event: Fault, gfn: int, value: int) -> dict:
        return {"event": event_json(event), "gfn_start": gfn, "gfn_end": gfn + 1,
                "gpa": event.gpa, "rip": event.rip, "count": event.count,
                "attributes": self.abi.attr_flags(value),
                "map": "applied" if self.applied_hook_active else "requested"}

