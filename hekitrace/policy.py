"""Rules that turn state changes into findings, with storm control that never loses a count.

``Policy.evaluate(change, host)`` reads the :class:`~hekitrace.changes.Change` that
``Host.apply`` returned (never whole maps): every rule looks only at the event, the
changed ranges, the rejections and anomalies, or one page / one range of a map. Rule ids
and meanings are documented in docs/findings.md; the background is
reference/heki-kvm.md 1.8-1.11 and 5.

Storm control, per VM so that one guest flooding on purpose cannot delay or suppress
another guest's findings:

* identical findings (same rule, VM and range key) within ``dedup_window_seconds`` are
  collapsed: the first is emitted at once, the repeats are counted and one summary
  finding carrying their number is emitted when the window closes (``tick``). The sum of
  ``count`` over emitted findings therefore equals the number of occurrences.
* at most ``rate_limit.findings`` findings per VM per ``rate_limit.per_seconds``; the
  excess is counted and summarised per rule when the window closes.
* ``counts`` ({(VmKey, rule, severity): n}, read by metrics as
  ``hekitrace_findings_total``) counts every occurrence, collapsed or limited.

Pairing (``request_not_applied`` / ``applied_without_request``): each Heki-bit change of
one map schedules a check of that gfn range ``pairing_window_seconds`` later; the check
compares the Heki bits of both maps over the range. It needs the ``attr_applied`` hook:
without it (``applied_hook_active=False``) the pair is inactive and :meth:`Policy.status`
says so. Time is event time (``time_ns``), so a replay gives the daemon's findings.
"""

from __future__ import annotations

import fnmatch
import time
from collections import deque
from datetime import datetime, timezone
from typing import Any, Callable

from hekitrace.abi import AbiProfile, cr_bit_names
from hekitrace.changes import Change, VmKey
from hekitrace.config import RULE_IDS
from hekitrace.events import (PAGE_SHIFT, AttrApplied, AttrIoctl, CrPinRequest, CrWrite,
                              Event, Fault, FaultAccess, ProtectRequest, event_name)
from hekitrace.host import Guest, Host

#: rules in RULE_IDS this policy does not evaluate, and why (reported by ``status``)
UNIMPLEMENTED_RULES: dict[str, str] = {
    "cr_pin_cleared": "same evidence as cr_pin_violation (a CR write clearing a pinned "
                      "bit, reported whether or not the host blocked it)",
    "privileged_hypercall_from_user": "events carry no CPL: kvm:kvm_hypercall has no "
                                      "privilege field (heki-kvm.md 3.1)",
}
#: anomaly kinds that are not the guest's malformed input (handled elsewhere or benign)
_NOT_MALFORMED = frozenset({"vm_replaced", "internal_error", "unknown_event"})
#: bound on the "announced writable" ranges remembered per VM (text_poke near-miss)
MAX_RECENT_WRITABLE = 256
#: bound on pending pairing checks per VM (a guest cannot grow our memory through it)
MAX_PENDING_PER_VM = 4096
#: bound on dedup entries per VM
MAX_DEDUP_PER_VM = 4096
#: timers run at most this often in event time (pairing/dedup windows are seconds long)
TICK_GRANULARITY_NS = 50_000_000
#: announcements kept for this many pairing windows (faults are reported up to
#: capture.fault_report_interval_seconds after their first occurrence)
_ANNOUNCE_KEEP_WINDOWS = 4
#: plain ints: IntFlag arithmetic costs microseconds per fault on the hot path
_WRITE = int(FaultAccess.WRITE)
_FETCH = int(FaultAccess.FETCH)
#: entries of one request inspected by the per-entry rules (matches the state default)
MAX_ENTRIES_INSPECTED = 4096


def format_time(time_ns: int) -> str:
    """RFC 3339 UTC with microseconds, ``2026-11-25T15:20:01.123456Z``."""
    try:
        seconds, rest = divmod(int(time_ns), 1_000_000_000)
        moment = datetime.fromtimestamp(seconds, tz=timezone.utc).replace(
            microsecond=rest // 1000)
    except (OverflowError, OSError, ValueError, TypeError):
        return ""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def event_json(event: Event | None) -> dict | None:
    """An event as a JSON-ready dict (``kind`` + its fields); page lists are summarised
    as their entry count so evidence stays small whatever the guest sent."""
    if event is None:
        return None
    out: dict[str, Any] = {"kind": event_name(event)}
    for name, value in zip(event._fields, event):
        if name == "entries":
            out["entries_count"] = len(value)
        else:
            out[name] = value
    return out


class Finding:
    """One finding: a rule fired for a VM at a time, with evidence.

    ``vm_key`` is the :class:`VmKey` (not serialised); ``vm`` the identity dict;
    ``count`` how many occurrences this object stands for (1, or a summary's number).
    """

    __slots__ = ("rule", "severity", "time_ns", "vm", "vm_key", "message", "count",
                 "evidence")

    def __init__(self, rule: str, severity: str, time_ns: int, vm: dict,
                 vm_key: VmKey | None, message: str, evidence: dict, count: int = 1) -> None:
        self.rule = rule
        self.severity = severity
        self.time_ns = time_ns
        self.vm = vm
        self.vm_key = vm_key
        self.message = message
        self.evidence = evidence
        self.count = count

    def to_dict(self) -> dict:
        """The stable JSON object (docs/internals.md "Findings", docs/findings.md)."""
        return {"rule": self.rule, "severity": self.severity,
                "time": format_time(self.time_ns), "time_ns": self.time_ns,
                "vm": dict(self.vm), "message": self.message, "count": self.count,
                "evidence": self.evidence}

    def __repr__(self) -> str:
        return f"Finding({self.rule!r}, {self.severity!r}, vm={self.vm.get('name')!r}, " \
               f"count={self.count})"


class _Dedup:
    __slots__ = ("first_ns", "last_ns", "extra", "finding")

    def __init__(self, first_ns: int, finding: Finding) -> None:
        self.first_ns = first_ns
        self.last_ns = first_ns
        self.extra = 0
        self.finding = finding


class _VmState:
    """Per-VM policy state: identity, exception cache, storm control, pairing, history."""

    __slots__ = ("key", "guest", "ident", "excepted", "dedup", "rate_start", "rate_count",
                 "limited", "pending", "recent_writable", "unsupported_reported")

    def __init__(self, guest: Guest, ident: dict, excepted: frozenset[str]) -> None:
        self.key = guest.key
        self.guest = guest
        self.ident = ident
        self.excepted = excepted
        self.dedup: dict[tuple, _Dedup] = {}
        self.rate_start = -1
        self.rate_count = 0
        self.limited: dict[str, int] = {}
        #: (side, gfn_start, gfn_end) -> time of the latest change scheduling that check
        self.pending: dict[tuple[str, int, int], int] = {}
        self.recent_writable: deque[tuple[int, int, int]] = deque(maxlen=MAX_RECENT_WRITABLE)
        self.unsupported_reported = False


def vm_identity(guest: Guest) -> dict:
    """The ``vm`` object of a finding."""
    return {"name": guest.name or f"pid-{guest.pid}", "uuid": guest.uuid, "pid": guest.pid,
            "created_ns": guest.created_ns}


class Policy:
    """Evaluates the rules on change records and applies storm control.

    ``config`` is ``config.policy`` (:class:`hekitrace.config.PolicyConfig`); ``abi`` the
    profile; ``clock`` returns Unix-epoch ns for :meth:`tick` without an argument.
    """

    def __init__(self, config: Any, abi: AbiProfile,
                 clock: Callable[[], int] = time.time_ns, *, applied_hook_active: bool = True,
                 max_entries_inspected: int = MAX_ENTRIES_INSPECTED) -> None:
        self.abi = abi
        self.clock = clock
        self.applied_hook_active = applied_hook_active
        self.max_entries_inspected = max_entries_inspected
        self._window_ns = int(config.pairing_window_seconds * 1e9)
        self._dedup_ns = int(config.dedup_window_seconds * 1e9)
        self._rate_n = int(config.rate_limit.findings)
        self._rate_ns = int(config.rate_limit.per_seconds * 1e9)
        self._exceptions = tuple(config.exceptions)
        self._severity: dict[str, str] = {}
        self._enabled: dict[str, bool] = {}
        for rule in RULE_IDS:
            rc = config.rules.get(rule) if hasattr(config.rules, "get") else None
            self._enabled[rule] = bool(rc.enabled) if rc is not None else True
            self._severity[rule] = rc.severity if rc is not None else "warning"
        for rule in UNIMPLEMENTED_RULES:
            self._enabled[rule] = False
        self._pairing = applied_hook_active and (self._enabled["request_not_applied"]
                                                 or self._enabled["applied_without_request"]
                                                 or self._enabled["protection_unsupported"])
        #: (VmKey, rule, severity) -> occurrences, collapsed and rate-limited included
        self.counts: dict[tuple[VmKey | None, str, str], int] = {}
        self.stats: dict[str, int] = {"deduplicated": 0, "rate_limited": 0, "excepted": 0,
                                      "announced_writes": 0, "pairing_overflow": 0,
                                      "dedup_overflow": 0, "internal_errors": 0}
        self.last_internal_error: str | None = None
        self._vms: dict[VmKey, _VmState] = {}
        #: the same dict, read-only for the pipeline's fast path (VMs with policy state)
        self.vm_states = self._vms
        self._pending: deque[tuple[int, VmKey, str, int, int]] = deque()
        self._dedup_expiry: deque[tuple[int, VmKey, tuple]] = deque()
        self._limited_vms: set[VmKey] = set()
        self.next_deadline_ns: float = float("inf")
        heki = abi.kvm_heki_mask
        self._heki = heki
        self._kw = 1 << abi.kvm_write
        self._kx = 1 << abi.kvm_exec
        self._ki = 1 << abi.kvm_immutable
        self._gw = 1 << abi.guest_write
        self._gx = 1 << abi.guest_exec
        self._gvalid = abi.guest_valid_mask
        self._handlers = {
            ProtectRequest: self._on_protect,
            AttrApplied: self._on_applied,
            AttrIoctl: self._on_applied,
            CrPinRequest: self._on_cr_pin,
            CrWrite: self._on_cr_write,
            Fault: self._on_fault,
        }
        #: event class -> its rule ``(change, event, state, guest, out)``, for callers
        #: that do :meth:`evaluate`'s fast path themselves (the pipeline); a rule that
        #: raises must be reported with :meth:`rule_failed`
        self.rules_by_kind = self._handlers

    # -- public API ------------------------------------------------------------------
    def status(self) -> dict:
        """Which rules run, and why pairing or a rule is inactive (daemon status, docs)."""
        rules = {}
        for rule in RULE_IDS:
            if rule in UNIMPLEMENTED_RULES:
                rules[rule] = "not implemented: " + UNIMPLEMENTED_RULES[rule]
            elif not self._enabled[rule]:
                rules[rule] = "disabled"
            elif rule in ("request_not_applied", "applied_without_request",
                          "protection_unsupported") and not self.applied_hook_active:
                rules[rule] = "inactive: the attr_applied hook is not attached"
            else:
                rules[rule] = "active"
        return {"pairing_active": self._pairing,
                "pairing": "active" if self._pairing else
                ("inactive: the attr_applied hook is not attached"
                 if not self.applied_hook_active else "inactive: rules disabled"),
                "rules": rules, "suppressed": dict(self.stats)}

    def evaluate(self, change: Change, host: Host) -> list[Finding]:
        """The findings ``change`` raises (already deduplicated and rate limited)."""
        vm = change.vm
        if vm is None:
            return []
        st = self._vms.get(vm)
        guest = host.guests.get(vm)
        if st is not None and guest is not None and change.lifecycle is None \
                and not change.degraded:
            # fast path (most events): a known VM, nothing but the kind's own rule to run
            event = change.event
            handler = self._handlers.get(type(event))
            if handler is None:
                return []
            out: list[Finding] = []
            try:
                handler(change, event, st, guest, out)
            except Exception as error:  # noqa: BLE001 - a rule bug must not stop the daemon
                self.rule_failed(error)
            return out
        out = []
        if change.lifecycle == "retired" or guest is None:
            if st is not None:
                self._flush_vm(st, out, change.event.time_ns if change.event else -1)
                del self._vms[vm]
            if change.lifecycle == "retired":
                self._forget_counts(vm)
            return out
        if st is None:
            st = self._new_state(guest)
        event = change.event
        if change.degraded and self._enabled["map_degraded"]:
            when = event.time_ns if event is not None else self.clock()
            for reason in change.degraded:
                self._emit(out, st, "map_degraded", when,
                           f"VM state may be incomplete: {reason}",
                           {"event": event_json(event), "reason": reason,
                            "reasons": list(guest.degraded_reasons)}, ("degraded", reason))
        handler = self._handlers.get(type(event))
        if handler is not None:
            try:
                handler(change, event, st, guest, out)
            except Exception as error:  # noqa: BLE001 - a rule bug must not stop the daemon
                self.rule_failed(error)
        return out

    def rule_failed(self, error: Exception) -> None:
        """Count a rule that raised (a bug, never guest input): the event loses its
        findings, the daemon keeps running, ``status`` shows the last error."""
        self.stats["internal_errors"] += 1
        self.last_internal_error = f"{type(error).__name__}: {error}"

    def tick(self, now_ns: int | None = None) -> list[Finding]:
        """Findings due at ``now_ns``: pairing checks, storm summaries, rate-limit summaries."""
        if now_ns is None:
            now_ns = self.clock()
        out: list[Finding] = []
        pending = self._pending
        while pending and pending[0][0] <= now_ns:
            _, key, side, start, end = pending.popleft()
            st = self._vms.get(key)
            if st is None:
                continue
            last = st.pending.get((side, start, end))
            if last is None:
                continue
            if last + self._window_ns > now_ns:  # changed again since: wait a full window
                pending.append((last + self._window_ns, key, side, start, end))
                continue
            del st.pending[(side, start, end)]
            self._check_pair(st, side, start, end, now_ns, out)
        expiry = self._dedup_expiry
        while expiry and expiry[0][0] <= now_ns:
            _, key, dkey = expiry.popleft()
            st = self._vms.get(key)
            if st is None:
                continue
            entry = st.dedup.get(dkey)
            if entry is not None and now_ns - entry.first_ns >= self._dedup_ns:
                del st.dedup[dkey]
                if entry.extra:
                    out.append(self._summary(entry))
        for key in list(self._limited_vms):
            st = self._vms.get(key)
            if st is None or now_ns - st.rate_start >= self._rate_ns:
                self._limited_vms.discard(key)
                if st is not None:
                    self._close_rate_window(st, now_ns, out)
        self._recompute_deadline(now_ns)
        return out

    def flush(self, now_ns: int | None = None) -> list[Finding]:
        """Everything still held (summaries of open windows), e.g. at the end of a replay.

        Pending pairing checks are evaluated as if their window had passed.
        """
        if now_ns is None:
            now_ns = self.clock()
        out: list[Finding] = []
        while self._pending:
            _, key, side, start, end = self._pending.popleft()
            st = self._vms.get(key)
            if st is not None and st.pending.pop((side, start, end), None) is not None:
                self._check_pair(st, side, start, end, now_ns, out)
        for st in self._vms.values():
            self._flush_vm(st, out, now_ns)
        self._dedup_expiry.clear()
        self._limited_vms.clear()
        self.next_deadline_ns = float("inf")
        return out

    def prune(self, host: Host, now_ns: int) -> list[Finding]:
        """Drop the state of VMs the host no longer has (retired), flushing summaries.

        For callers that expire guests on the host directly; O(number of VMs).
        """
        out: list[Finding] = []
        for key in [k for k in self._vms if k not in host.guests]:
            self._flush_vm(self._vms.pop(key), out, now_ns)
        gone = {k[0] for k in self.counts if k[0] is not None and k[0] not in host.guests}
        for key in gone:
            self._forget_counts(key)
        return out

    def _forget_counts(self, vm: VmKey) -> None:
        """A retired VM's series disappear from ``hekitrace_findings_total``."""
        for ckey in [k for k in self.counts if k[0] == vm]:
            del self.counts[ckey]

    # -- storm control -----------------------------------------------------------------
    def _new_state(self, guest: Guest) -> _VmState:
        excepted = set()
        for exc in self._exceptions:
            sel = exc.vms
            if sel.name is not None and not fnmatch.fnmatchcase(guest.name or "", sel.name):
                continue
            if sel.uuid is not None and not fnmatch.fnmatchcase(guest.uuid or "", sel.uuid):
                continue
            excepted.update(exc.rules or RULE_IDS)
        st = _VmState(guest, vm_identity(guest), frozenset(excepted))
        self._vms[guest.key] = st
        return st

    def _emit(self, out: list[Finding], st: _VmState, rule: str, time_ns: int, message: str,
              evidence: dict, key: tuple, count: int = 1) -> None:
        if self._admit(out, st, rule, time_ns, key, count):
            self._record(out, st, rule, time_ns, message, evidence, key, count)

    def _admit(self, out: list[Finding], st: _VmState, rule: str, time_ns: int, key: tuple,
               count: int) -> bool:
        """Count one occurrence; True when it must become a new finding (not excepted,
        not a repeat within the dedup window, within the rate limit). Cheap, so hot rules
        call it before building their evidence."""
        if rule in st.excepted:
            self.stats["excepted"] += count
            return False
        ckey = (st.key, rule, self._severity[rule])
        counts = self.counts
        counts[ckey] = counts.get(ckey, 0) + count
        dkey = (rule, key)
        dedup = st.dedup
        entry = dedup.get(dkey)
        if entry is not None:
            if time_ns - entry.first_ns < self._dedup_ns:
                entry.extra += count
                entry.last_ns = time_ns
                self.stats["deduplicated"] += count
                return False
            del dedup[dkey]
            if entry.extra:
                out.append(self._summary(entry))
        if st.rate_start < 0 or time_ns - st.rate_start >= self._rate_ns:
            self._close_rate_window(st, time_ns, out)
        if st.rate_count >= self._rate_n:
            st.limited[rule] = st.limited.get(rule, 0) + count
            self.stats["rate_limited"] += count
            self._limited_vms.add(st.key)
            deadline = st.rate_start + self._rate_ns
            if deadline < self.next_deadline_ns:
                self.next_deadline_ns = deadline
            return False
        st.rate_count += 1
        return True

    def _record(self, out: list[Finding], st: _VmState, rule: str, time_ns: int,
                message: str, evidence: dict, key: tuple, count: int) -> None:
        """Create an admitted finding and open its dedup window."""
        dkey = (rule, key)
        finding = Finding(rule, self._severity[rule], time_ns, st.ident, st.key, message,
                          evidence, count)
        if len(st.dedup) < MAX_DEDUP_PER_VM:
            st.dedup[dkey] = _Dedup(time_ns, finding)
            deadline = time_ns + self._dedup_ns
            self._dedup_expiry.append((deadline, st.key, dkey))
            if deadline < self.next_deadline_ns:
                self.next_deadline_ns = deadline
        else:
            self.stats["dedup_overflow"] += 1
        out.append(finding)

    def _summary(self, entry: _Dedup) -> Finding:
        first = entry.finding
        evidence = dict(first.evidence)
        evidence.update({"summary": "deduplicated", "first_ns": entry.first_ns,
                         "last_ns": entry.last_ns, "total": entry.extra + first.count})
        return Finding(first.rule, first.severity, entry.last_ns, first.vm, first.vm_key,
                       f"repeated {entry.extra} more time(s) within the dedup window: "
                       f"{first.message}", evidence, entry.extra)

    def _close_rate_window(self, st: _VmState, now_ns: int, out: list[Finding]) -> None:
        if st.limited:
            for rule, n in sorted(st.limited.items()):
                out.append(Finding(
                    rule, self._severity[rule], now_ns, st.ident, st.key,
                    f"{n} more {rule} finding(s) suppressed by the per-VM rate limit "
                    f"({self._rate_n} per {self._rate_ns / 1e9:g} s)",
                    {"summary": "rate_limited", "window_start_ns": st.rate_start,
                     "suppressed": n}, n))
            st.limited = {}
        st.rate_start = now_ns
        st.rate_count = 0

    def _flush_vm(self, st: _VmState, out: list[Finding], now_ns: int) -> None:
        for entry in st.dedup.values():
            if entry.extra:
                out.append(self._summary(entry))
        st.dedup.clear()
        if st.limited:
            self._close_rate_window(st, max(now_ns, st.rate_start), out)

    def _recompute_deadline(self, now_ns: int) -> None:
        """Next time :meth:`tick` has work, but not sooner than ``TICK_GRANULARITY_NS``
        after this one: callers that tick on every event past the deadline (the
        pipeline) then run timers at most every 50 ms of event time."""
        deadline: float = float("inf")
        if self._pending:
            deadline = self._pending[0][0]
        if self._dedup_expiry and self._dedup_expiry[0][0] < deadline:
            deadline = self._dedup_expiry[0][0]
        for key in self._limited_vms:
            st = self._vms.get(key)
            if st is not None and st.rate_start + self._rate_ns < deadline:
                deadline = st.rate_start + self._rate_ns
        self.next_deadline_ns = max(deadline, now_ns + TICK_GRANULARITY_NS)

    # -- pairing -----------------------------------------------------------------------
    def _expect(self, st: _VmState, guest: Guest, side: str, start: int, end: int,
                time_ns: int) -> None:
        key = (side, start, end)
        if key in st.pending:
            st.pending[key] = time_ns
            return
        if len(st.pending) >= MAX_PENDING_PER_VM:
            self.stats["pairing_overflow"] += 1
            return
        st.pending[key] = time_ns
        deadline = time_ns + self._window_ns
        self._pending.append((deadline, st.key, side, start, end))
        if deadline < self.next_deadline_ns:
            self.next_deadline_ns = deadline

    def _check_pair(self, st: _VmState, side: str, start: int, end: int, now_ns: int,
                    out: list[Finding]) -> None:
        guest = st.guest
        mismatch = _first_mismatch(guest.requested, guest.applied, start, end, self._heki)
        if mismatch is None:
            return
        s, e, want, got = mismatch
        for _side, ps, pe in st.pending:
            if ps < e and s < pe:
                return  # a newer change of this range is still within its window
        abi = self.abi
        evidence = {"gfn_start": s, "gfn_end": e, "requested": abi.attr_flags(want),
                    "applied": abi.attr_flags(got), "checked_gfn_start": start,
                    "checked_gfn_end": end, "window_seconds": self._window_ns / 1e9}
        if side == "requested":
            if not guest.heki_applied_seen:
                if not st.unsupported_reported and self._enabled["protection_unsupported"]:
                    st.unsupported_reported = True
                    self._emit(out, st, "protection_unsupported", now_ns,
                               "the guest issues Heki protection requests but the host "
                               "applied none (host without Heki support?)", evidence,
                               ("unsupported",))
                return
            if self._enabled["request_not_applied"]:
                self._emit(out, st, "request_not_applied", now_ns,
                           f"requested {evidence['requested']} on gfns {s:#x}-{e:#x} "
                           f"not applied (host has {evidence['applied']})", evidence, (s, e))
        elif self._enabled["applied_without_request"]:
            self._emit(out, st, "applied_without_request", now_ns,
                       f"host applied {evidence['applied']} on gfns {s:#x}-{e:#x} "
                       f"without a matching request ({evidence['requested']})", evidence,
                       (s, e))

    # -- rules -------------------------------------------------------------------------
    def _on_protect(self, change: Change, event: ProtectRequest, st: _VmState, guest: Guest,
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
            kinds = sorted({a.kind for a in bad} | {"rejected_" + r.errno for r in einval})
            self._emit(out, st, "malformed_request", time_ns,
                       f"malformed protect request at gpa {event.list_gpa:#x}: "
                       + ", ".join(kinds),
                       {"event": event_json(event), "kinds": kinds,
                        "anomalies": [{"kind": a.kind, "message": a.message,
                                       "detail": a.detail} for a in bad[:16]],
                        "rejections": [{"entry": list(r.entry), "errno": r.errno,
                                        "reason": r.reason} for r in einval[:16]]},
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
                st.recent_writable.append((time_ns, mc.gfn_start, mc.gfn_end))
        for rejection in change.rejections:
            if rejection.errno == "EPERM":
                self._on_eperm(rejection.entry, event, st, guest, out)
        if self._pairing and not guest.preexisting:
            slots = guest.memslot_gfn_ranges()
            for mc in change.map_changes:
                if (mc.old ^ mc.new) & heki:
                    if slots:
                        for s, e in _clip(mc.gfn_start, mc.gfn_end, slots):
                            self._expect(st, guest, "requested", s, e, time_ns)
                    else:
                        self._expect(st, guest, "requested", mc.gfn_start, mc.gfn_end, time_ns)

    def _on_eperm(self, entry: Any, event: ProtectRequest, st: _VmState, guest: Guest,
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

    def _on_applied(self, change: Change, event: Event, st: _VmState, guest: Guest,
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
                self._expect(st, guest, "applied", mc.gfn_start, mc.gfn_end, event.time_ns)

    def _on_cr_pin(self, change: Change, event: CrPinRequest, st: _VmState, guest: Guest,
                   out: list[Finding]) -> None:
        if change.anomalies and self._enabled["malformed_request"]:
            kinds = sorted({a.kind for a in change.anomalies})
            self._emit(out, st, "malformed_request", event.time_ns,
                       f"malformed CR pin request (CR{event.cr}): " + ", ".join(kinds),
                       {"event": event_json(event), "kinds": kinds,
                        "anomalies": [{"kind": a.kind, "message": a.message,
                                       "detail": a.detail} for a in change.anomalies]},
                       ("cr_pin", event.cr, tuple(kinds)))

    def _on_cr_write(self, change: Change, event: CrWrite, st: _VmState, guest: Guest,
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

    def _on_fault(self, change: Change, event: Fault, st: _VmState, guest: Guest,
                  out: list[Finding]) -> None:
        # hot during a fault storm: fields unpacked once, no attribute chains
        time_ns, _tgid, _tid, _vcpu, gpa, _ec, rip, access, count, first_ns = event
        gfn = gpa >> PAGE_SHIFT
        source = guest.applied if self.applied_hook_active else guest.requested
        value = source.get(gfn) if 0 <= gfn < (1 << 52) else 0
        if not value & self._heki:
            return
        if not (isinstance(count, int) and count > 0):
            count = 1
        if access & _WRITE and not value & self._kw and self._enabled["protected_write"]:
            recent = st.recent_writable
            announced = False
            if recent:
                # announcements far older than any fault could refer to are dropped
                window = self._window_ns
                horizon = time_ns - _ANNOUNCE_KEEP_WINDOWS * window
                while recent and recent[0][0] < horizon:
                    recent.popleft()
                when = first_ns or time_ns
                for t, s, e in recent:
                    if s <= gfn < e and when - t <= window:
                        self.stats["announced_writes"] += count
                        announced = True
                        break
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


def _clip(start: int, end: int, slots: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Parts of [start, end) inside the merged memslot ranges ``slots``."""
    out = []
    for s, e in slots:
        if e <= start:
            continue
        if s >= end:
            break
        out.append((max(s, start), min(e, end)))
    return out


def _first_mismatch(requested: Any, applied: Any, start: int, end: int,
                    mask: int) -> tuple[int, int, int, int] | None:
    """First sub-range of [start, end) where the two maps' ``mask`` bits differ."""
    # common case: both maps uniform over the range (four bisects, no lists)
    rv = requested.get(start)
    if requested.all_equal(start, end, rv):
        av = applied.get(start)
        if applied.all_equal(start, end, av):
            if (rv ^ av) & mask:
                return start, end, rv & mask, av & mask
            return None
    req = list(requested.segments(start, end))
    app = list(applied.segments(start, end))
    i = j = 0
    pos = start
    while pos < end and i < len(req) and j < len(app):
        rs, re_, rv = req[i]
        as_, ae, av = app[j]
        stop = min(re_, ae)
        if (rv ^ av) & mask:
            return pos, stop, rv & mask, av & mask
        pos = stop
        if re_ == stop:
            i += 1
        if ae == stop:
            j += 1
    return None
