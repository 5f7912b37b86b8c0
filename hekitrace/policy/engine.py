"""Rules that turn state changes into findings, with storm control that never loses a count.

``Policy.evaluate(change, host)`` reads the :class:`~hekitrace.state.changes.Change` that
``Host.apply`` returned and runs the rule of the event's kind; ``tick`` runs the timers
(pairing checks, storm summaries) on event time. The parts live beside this module:

* :mod:`hekitrace.policy.findings`: :class:`Finding` and its JSON form;
* :mod:`hekitrace.policy.rules`: one rule method per event kind;
* :mod:`hekitrace.policy.storm`: dedup windows and per-VM rate limits;
* :mod:`hekitrace.policy.pairing`: requested-vs-applied checks.

:class:`Policy` owns the configuration and every table; its methods are grouped by
concern in three mixins, ``Rules(Pairing(StormControl))``, each declaring the tables it
reads. ``from hekitrace.policy.engine import Policy, Finding`` is the public API.
"""

from __future__ import annotations

import fnmatch
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from hekitrace.config.abi import AbiProfile
from hekitrace.policy.catalogue import NOT_EVALUATED, PAIRING_RULES, RULE_IDS
from hekitrace.policy.findings import Finding, event_json, format_time, vm_identity
from hekitrace.policy.pairing import MAX_PENDING_PER_VM, _clip, _first_mismatch
from hekitrace.policy.rules import Rules
from hekitrace.policy.storm import (
    MAX_DEDUP_PER_VM,
    MAX_RECENT_WRITABLE,
    TICK_GRANULARITY_NS,
    _Dedup,
    _VmState,
)
from hekitrace.state.changes import Change, VmKey
from hekitrace.state.events import (
    AttrApplied,
    AttrIoctl,
    CrPinRequest,
    CrWrite,
    Fault,
    ProtectRequest,
)
from hekitrace.state.host import Guest, Host

__all__ = [
    "MAX_DEDUP_PER_VM",
    "MAX_ENTRIES_INSPECTED",
    "MAX_PENDING_PER_VM",
    "MAX_RECENT_WRITABLE",
    "TICK_GRANULARITY_NS",
    "UNIMPLEMENTED_RULES",
    "Finding",
    "Policy",
    "_Dedup",
    "_VmState",
    "_clip",
    "_first_mismatch",
    "event_json",
    "format_time",
    "vm_identity",
]

#: rules in RULE_IDS this policy does not evaluate, and why (reported by ``status``)
UNIMPLEMENTED_RULES = NOT_EVALUATED
#: entries of one request inspected by the per-entry rules (matches the state default)
MAX_ENTRIES_INSPECTED = 4096


class Policy(Rules):
    """Evaluates the rules on change records and applies storm control.

    ``config`` is ``config.policy`` (:class:`hekitrace.config.settings.PolicyConfig`); ``abi`` the
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
        self._pairing = applied_hook_active and any(self._enabled[r] for r in PAIRING_RULES)
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
        self._handlers: dict[type, Callable[..., None]] = {
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
            elif rule in PAIRING_RULES and not self.applied_hook_active:
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
        excepted: set[str] = set()
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
