"""The state-and-rules pipeline shared by the daemon and ``hekitrace replay``.

One :class:`~hekitrace.state.host.Host` and one :class:`~hekitrace.policy.engine.Policy`, fed event by
event: ``feed(event)`` applies it, evaluates the rules, runs the policy's timers when the
event's time passes their next deadline (so a replay reproduces the daemon's pairing and
storm summaries from event time alone), tells the observers, and returns the findings.
Replaying a trace through this class is therefore "exactly the daemon's state and rules"
(docs/internals.md, principle 1). It counts events by kind and losses by (stage, reason) in
``stats``; it does no I/O itself: sinks are observers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from hekitrace.policy.engine import Policy
from hekitrace.policy.findings import Finding
from hekitrace.state.changes import NO_CHANGE, Change
from hekitrace.state.events import KIND_OF, NAME_OF, Event, Lost
from hekitrace.state.host import Host

Observer = Callable[[Change, list[Finding]], None]


class Pipeline:
    """Host + Policy wired together; ``config`` is a :class:`hekitrace.config.settings.Config`.

    ``applied_hook_active`` says whether the ``attr_applied`` hook is attached (pairing
    rules need it); ``clock`` returns Unix-epoch ns for :meth:`tick` without argument.
    """

    def __init__(self, config: Any, applied_hook_active: bool = True, *,
                 clock: Callable[[], int] = time.time_ns) -> None:
        self.config = config
        self.abi = config.abi_profile()
        state = config.state
        self.host = Host(self.abi, int(state.grace_period_seconds * 1e9),
                         max_entries_per_request=int(state.max_entries_per_request))
        self.policy = Policy(config.policy, self.abi, clock,
                             applied_hook_active=applied_hook_active,
                             max_entries_inspected=int(state.max_entries_per_request))
        self.clock = clock
        self._observers: list[Observer] = []
        self._by_type: dict[type, int] = {cls: 0 for cls in KIND_OF}
        self.lost: dict[tuple[str, str], int] = {}
        self.findings_emitted = 0
        self.last_event_ns = 0

    # -- observers -----------------------------------------------------------------------
    def add_observer(self, observer: Observer) -> None:
        """Call ``observer(change, findings)`` after every event and every timer run
        (timer runs pass :data:`~hekitrace.state.changes.NO_CHANGE`)."""
        self._observers.append(observer)

    def remove_observer(self, observer: Observer) -> None:
        self._observers.remove(observer)

    # -- feeding -------------------------------------------------------------------------
    def feed(self, event: Event) -> list[Finding]:
        """Apply one event; return its findings (and any that fell due at its time)."""
        etype = type(event)
        if etype in self._by_type:
            self._by_type[etype] += 1
        if etype is Lost:
            key = (event.stage, event.reason)  # type: ignore[union-attr]  # etype is Lost
            self.lost[key] = self.lost.get(key, 0) + (event.count if event.count > 0 else 0)  # type: ignore[union-attr, operator]  # noqa: FURB136 - etype is Lost; hot path: no max() call
        change = self.host.apply(event)
        policy = self.policy
        findings = policy.evaluate(change, self.host)
        now = event.time_ns
        if now > self.last_event_ns:  # noqa: PLR1730 - hot path: no max() call
            self.last_event_ns = now
        if now >= policy.deadline.ns:
            findings += policy.tick(now)
        if findings:
            self.findings_emitted += len(findings)
        for observer in self._observers:
            observer(change, findings)
        return findings

    def feed_many(self, events: Iterable[Event]) -> list[Finding]:
        """Apply a batch; the same as ``feed`` on each, with the lookups hoisted.

        Events of the kinds that only count (hypercalls, CR writes, faults) from a VM
        that host and policy already know take a fast path: the counter bump and the
        ``Change`` of ``Host.apply``'s count-only case, then only that kind's rule
        (``Policy.evaluate``'s own fast path, inlined). Anything else, or anything that
        does not look like such an event, goes through ``Host.apply`` and
        ``Policy.evaluate``; tests/unit/test_pipeline.py checks both give the same.
        """
        # Why the inlining stays: calling Host.apply and Policy.evaluate for every event
        # instead was measured against this loop (bench/bench_pipeline.py, same run) and
        # lost far more than the 10 % budget on telemetry batches and fault storms, the
        # daemon's steady-state stream; the figures are in BENCHMARKS.md "End to end".
        by_type = self._by_type
        lost = self.lost
        host = self.host
        apply = host.apply
        policy = self.policy
        evaluate = policy.evaluate
        observers = self._observers
        live = host.live_by_tgid
        states = policy.vm_states
        rules = policy.rules_by_kind
        # kind -> (its counter name, its rule or None): one lookup per event
        fast = {cls: (name, rules.get(cls)) for cls, name in host.counted_kinds.items()}
        rule_failed = policy.rule_failed
        deadline = policy.deadline
        new = tuple.__new__
        out: list[Finding] = []
        last = self.last_event_ns
        key: Any  # a VmKey on the fast path, a (stage, reason) pair for Lost
        for event in events:
            etype = type(event)
            try:
                by_type[etype] += 1
            except KeyError:   # not an event class: Host.apply reports it
                pass
            change = None
            kind = fast.get(etype)
            if kind is not None:
                name, rule = kind
                try:
                    guest = live.get(event.tgid)
                except TypeError:  # unhashable: Host.apply reports it
                    guest = None
                if guest is not None:
                    key = guest.key
                    st = states.get(key)
                    if st is not None:
                        guest.counters[name] += 1
                        change = new(Change, (event, key, (), None, (), (), None, ()))
                        findings: list[Finding] = []
                        if rule is not None:
                            try:
                                rule(change, event, st, guest, findings)
                            except Exception as error:  # noqa: BLE001 - as Policy.evaluate
                                rule_failed(error)
            if change is None:
                if etype is Lost:
                    key = (event.stage, event.reason)  # type: ignore[union-attr]  # etype is Lost
                    lost[key] = lost.get(key, 0) + (event.count if event.count > 0 else 0)  # type: ignore[union-attr, operator]  # noqa: FURB136 - etype is Lost; hot path: no max() call
                change = apply(event)
                findings = evaluate(change, host)
            now = event.time_ns
            if now > last:  # noqa: PLR1730 - hot path: no max() call
                last = now
            if now >= deadline.ns:
                findings += policy.tick(now)
            if findings:
                out += findings
            for observer in observers:
                observer(change, findings)
        self.last_event_ns = last
        self.findings_emitted += len(out)
        return out

    # -- timers --------------------------------------------------------------------------
    def tick(self, now_ns: int | None = None) -> list[Finding]:
        """Run the policy's timers at ``now_ns`` and drop policy state of forgotten VMs."""
        if now_ns is None:
            now_ns = self.clock()
        findings = self.policy.tick(now_ns)
        findings += self.policy.prune(self.host, now_ns)
        self._notify_timer(findings)
        return findings

    def expire(self, now_ns: int | None = None) -> tuple[list[Change], list[Finding]]:
        """Retire guests past their grace period (host and policy); returns both."""
        if now_ns is None:
            now_ns = self.clock()
        changes = self.host.expire(now_ns)
        findings: list[Finding] = []
        for change in changes:
            found = self.policy.evaluate(change, self.host)
            findings += found
            for observer in self._observers:
                observer(change, found)
        self.findings_emitted += len(findings)
        return changes, findings

    def flush(self, now_ns: int | None = None) -> list[Finding]:
        """End of input (replay): pending pairing checks and open storm summaries now."""
        if now_ns is None:
            now_ns = max(self.last_event_ns, 0) or self.clock()
        findings = self.policy.flush(now_ns)
        self._notify_timer(findings)
        return findings

    def _notify_timer(self, findings: list[Finding]) -> None:
        self.findings_emitted += len(findings)
        if self._observers:
            for observer in self._observers:
                observer(NO_CHANGE, findings)

    # -- statistics ------------------------------------------------------------------------
    @property
    def events_by_kind(self) -> dict[str, int]:
        """Events fed, by JSON kind name (``fault``, ``protect_request``...)."""
        return {NAME_OF[cls]: n for cls, n in self._by_type.items()}

    @property
    def stats(self) -> dict:
        """Counters for status output and tests: events by kind, losses, findings, state."""
        lost = {f"{stage}/{reason}": n for (stage, reason), n in sorted(self.lost.items())}
        return {"events": self.events_by_kind, "events_total": sum(self._by_type.values()),
                "lost": lost, "lost_total": sum(self.lost.values()),
                "findings": self.findings_emitted,
                "host": dict(self.host.counters),
                "policy": self.policy.status()}
