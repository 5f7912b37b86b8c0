"""Rules that turn state changes into findings, with storm control that never loses a count.

``Policy.evaluate(change, host)`` reads the :class:`~hekitrace.state.changes.Change` that
``Host.apply`` returned and runs the rule of the event's kind; ``tick`` runs the timers
(pairing checks, storm summaries) on event time. The policy owns its parts, each in the
module beside this one, and wires them together:

* :mod:`hekitrace.policy.catalogue`: rule ids, default severities, which are evaluated;
* :mod:`hekitrace.policy.findings`: :class:`Finding` and its JSON form;
* :mod:`hekitrace.policy.rules`: :class:`Rules`, one rule method per event kind;
* :mod:`hekitrace.policy.storm`: :class:`StormControl`, dedup windows and rate limits;
* :mod:`hekitrace.policy.pairing`: :class:`Pairing`, requested-vs-applied checks;
* :mod:`hekitrace.policy.vm_state`: the per-VM record the parts share by VM.

``from hekitrace.policy.engine import Policy`` is the public API.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Callable
from typing import Any

from hekitrace.config.abi import AbiProfile
from hekitrace.policy.catalogue import NOT_EVALUATED, PAIRING_RULES, RULE_IDS
from hekitrace.policy.findings import Finding, event_json, vm_identity
from hekitrace.policy.pairing import Pairing
from hekitrace.policy.rules import Rules
from hekitrace.policy.storm import TICK_GRANULARITY_NS, Deadline, StormControl
from hekitrace.policy.vm_state import VmState
from hekitrace.state.changes import Change, VmKey
from hekitrace.state.host import Guest, Host

__all__ = ["MAX_ENTRIES_INSPECTED", "Finding", "Policy"]

#: entries of one request inspected by the per-entry rules (matches the state default)
MAX_ENTRIES_INSPECTED = 4096
#: the order of ``stats`` (and of ``status()["suppressed"]``)
_STATS = ("deduplicated", "rate_limited", "excepted", "announced_writes",
          "pairing_overflow", "dedup_overflow", "internal_errors")


class Policy:
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
        self._exceptions = tuple(config.exceptions)
        severity: dict[str, str] = {}
        self._enabled: dict[str, bool] = {}
        for rule in RULE_IDS:
            rc = config.rules.get(rule) if hasattr(config.rules, "get") else None
            self._enabled[rule] = bool(rc.enabled) if rc is not None else True
            severity[rule] = rc.severity if rc is not None else "warning"
        for rule in NOT_EVALUATED:
            self._enabled[rule] = False
        self._pairing_on = applied_hook_active and any(self._enabled[r] for r in PAIRING_RULES)
        #: VmKey -> policy state of the VMs seen (read-only for the pipeline's fast path)
        self.vm_states: dict[VmKey, VmState] = {}
        #: the earliest event time :meth:`tick` has work (``deadline.ns``)
        self.deadline = Deadline()
        self._storm = StormControl(
            dedup_ns=int(config.dedup_window_seconds * 1e9),
            rate_n=int(config.rate_limit.findings),
            rate_ns=int(config.rate_limit.per_seconds * 1e9),
            severity=severity, states=self.vm_states, deadline=self.deadline)
        self._pairing = Pairing(window_ns=int(config.pairing_window_seconds * 1e9), abi=abi,
                                enabled=self._enabled, storm=self._storm,
                                states=self.vm_states, deadline=self.deadline)
        self._rules = Rules(abi=abi, enabled=self._enabled, storm=self._storm,
                            pairing=self._pairing, pairing_active=self._pairing_on,
                            applied_hook_active=applied_hook_active,
                            max_entries_inspected=max_entries_inspected)
        self._internal_errors = 0
        self.last_internal_error: str | None = None
        self._handlers = self._rules.by_kind
        #: event class -> its rule ``(change, event, state, guest, out)``, for callers
        #: that do :meth:`evaluate`'s fast path themselves (the pipeline); a rule that
        #: raises must be reported with :meth:`rule_failed`
        self.rules_by_kind = self._handlers

    # -- public API ------------------------------------------------------------------
    @property
    def counts(self) -> dict[tuple[VmKey | None, str, str], int]:
        """(VmKey, rule, severity) -> occurrences, collapsed and rate-limited included
        (``hekitrace_findings_total``); assignable, to carry counts over a reload."""
        return self._storm.counts

    @counts.setter
    def counts(self, counts: dict[tuple[VmKey | None, str, str], int]) -> None:
        self._storm.counts = counts

    @property
    def stats(self) -> dict[str, int]:
        """Occurrences that did not become findings, and rule failures, by why."""
        merged = {**self._storm.stats, **self._pairing.stats, **self._rules.stats,
                  "internal_errors": self._internal_errors}
        return {key: merged[key] for key in _STATS}

    @property
    def next_deadline_ns(self) -> float:
        """The earliest event time :meth:`tick` has work (inf: none)."""
        return self.deadline.ns

    def status(self) -> dict:
        """Which rules run, and why pairing or a rule is inactive (daemon status, docs)."""
        rules = {}
        for rule in RULE_IDS:
            if rule in NOT_EVALUATED:
                rules[rule] = "not implemented: " + NOT_EVALUATED[rule]
            elif not self._enabled[rule]:
                rules[rule] = "disabled"
            elif rule in PAIRING_RULES and not self.applied_hook_active:
                rules[rule] = "inactive: the attr_applied hook is not attached"
            else:
                rules[rule] = "active"
        return {"pairing_active": self._pairing_on,
                "pairing": "active" if self._pairing_on else
                ("inactive: the attr_applied hook is not attached"
                 if not self.applied_hook_active else "inactive: rules disabled"),
                "rules": rules, "suppressed": self.stats}

    def evaluate(self, change: Change, host: Host) -> list[Finding]:
        """The findings ``change`` raises (already deduplicated and rate limited)."""
        vm = change.vm
        if vm is None:
            return []
        st = self.vm_states.get(vm)
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
                self._storm.flush_vm(st, out, change.event.time_ns if change.event else -1)
                del self.vm_states[vm]
            if change.lifecycle == "retired":
                self._storm.forget_counts(vm)
            return out
        if st is None:
            st = self._new_state(guest)
        event = change.event
        if change.degraded and self._enabled["map_degraded"]:
            when = event.time_ns if event is not None else self.clock()
            for reason in change.degraded:
                self._storm.emit(out, st, "map_degraded", when,
                                 f"VM state may be incomplete: {reason}",
                                 {"event": event_json(event), "reason": reason,
                                  "reasons": list(guest.degraded_reasons)},
                                 ("degraded", reason))
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
        self._internal_errors += 1
        self.last_internal_error = f"{type(error).__name__}: {error}"

    def tick(self, now_ns: int | None = None) -> list[Finding]:
        """Findings due at ``now_ns``: pairing checks, storm summaries, rate-limit summaries."""
        if now_ns is None:
            now_ns = self.clock()
        out: list[Finding] = []
        self._pairing.tick(now_ns, out)
        self._storm.tick(now_ns, out)
        # the next tick: when a part has work, but not sooner than TICK_GRANULARITY_NS
        # from now (callers that tick on every event past the deadline, the pipeline,
        # then run timers at most every 50 ms of event time)
        deadline = min(self._pairing.next_deadline(), self._storm.next_deadline())
        self.deadline.ns = max(deadline, now_ns + TICK_GRANULARITY_NS)
        return out

    def flush(self, now_ns: int | None = None) -> list[Finding]:
        """Everything still held (summaries of open windows), e.g. at the end of a replay.

        Pending pairing checks are evaluated as if their window had passed.
        """
        if now_ns is None:
            now_ns = self.clock()
        out: list[Finding] = []
        self._pairing.flush(now_ns, out)
        for st in self.vm_states.values():
            self._storm.flush_vm(st, out, now_ns)
        self._storm.forget_timers()
        self.deadline.ns = float("inf")
        return out

    def prune(self, host: Host, now_ns: int) -> list[Finding]:
        """Drop the state of VMs the host no longer has (retired), flushing summaries.

        For callers that expire guests on the host directly; O(number of VMs).
        """
        out: list[Finding] = []
        for key in [k for k in self.vm_states if k not in host.guests]:
            self._storm.flush_vm(self.vm_states.pop(key), out, now_ns)
        gone = {k[0] for k in self.counts if k[0] is not None and k[0] not in host.guests}
        for key in gone:
            self._storm.forget_counts(key)
        return out

    def _new_state(self, guest: Guest) -> VmState:
        """The policy state of a VM seen for the first time: identity and the rules its
        exceptions turn off."""
        excepted: set[str] = set()
        for exc in self._exceptions:
            sel = exc.vms
            if sel.name is not None and not fnmatch.fnmatchcase(guest.name or "", sel.name):
                continue
            if sel.uuid is not None and not fnmatch.fnmatchcase(guest.uuid or "", sel.uuid):
                continue
            excepted.update(exc.rules or RULE_IDS)
        st = VmState(guest, vm_identity(guest), frozenset(excepted))
        self.vm_states[guest.key] = st
        return st
