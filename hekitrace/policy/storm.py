"""Storm control: dedup windows and per-VM rate limits that never lose a count.

Per VM, so that one guest flooding on purpose cannot delay or suppress another guest's
findings:

* identical findings (same rule, VM and range key) within ``dedup_window_seconds`` are
  collapsed: the first is emitted at once, the repeats are counted and one summary
  finding carrying their number is emitted when the window closes (``tick``). The sum of
  ``count`` over emitted findings therefore equals the number of occurrences.
* at most ``rate_limit.findings`` findings per VM per ``rate_limit.per_seconds``; the
  excess is counted and summarised per rule when the window closes.
* ``counts`` ({(VmKey, rule, severity): n}, read by metrics as
  ``hekitrace_findings_total``) counts every occurrence, collapsed or limited.

:class:`StormControl` is owned by :class:`hekitrace.policy.engine.Policy`; the rules and
pairing hand it each occurrence (:meth:`StormControl.emit`, or :meth:`~StormControl.admit`
then :meth:`~StormControl.record` when evidence is costly to build).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping

from hekitrace.policy.findings import Finding
from hekitrace.policy.vm_state import Dedup, VmState
from hekitrace.state.changes import VmKey

#: bound on dedup entries per VM
MAX_DEDUP_PER_VM = 4096
#: timers run at most this often in event time (pairing/dedup windows are seconds long)
TICK_GRANULARITY_NS = 50_000_000


class Deadline:
    """The earliest event time at which the policy's timers have work (``ns``).

    Storm control and pairing lower it when they open a window; the policy recomputes
    it after each :meth:`~hekitrace.policy.engine.Policy.tick`. Callers compare each
    event's time with ``ns`` (one attribute read) to know when to tick.
    """

    __slots__ = ("ns",)

    def __init__(self) -> None:
        self.ns: float = float("inf")


class StormControl:
    """Admission of rule occurrences into findings (see module docstring).

    ``severity`` maps every rule id to its configured severity; ``states`` is the
    policy's per-VM table (read here to close windows by VM key); ``deadline`` is lowered
    when a window opens.
    """

    def __init__(self, *, dedup_ns: int, rate_n: int, rate_ns: int,
                 severity: Mapping[str, str], states: Mapping[VmKey, VmState],
                 deadline: Deadline) -> None:
        self._dedup_ns = dedup_ns
        self._rate_n = rate_n
        self._rate_ns = rate_ns
        self._severity = severity
        self._states = states
        self._deadline = deadline
        #: (VmKey, rule, severity) -> occurrences, collapsed and rate-limited included
        self.counts: dict[tuple[VmKey | None, str, str], int] = {}
        #: occurrences that did not become findings, by why
        self.stats: dict[str, int] = {"deduplicated": 0, "rate_limited": 0, "excepted": 0,
                                      "dedup_overflow": 0}
        self._dedup_expiry: deque[tuple[int, VmKey, tuple]] = deque()
        self._limited_vms: set[VmKey] = set()

    # -- occurrences -----------------------------------------------------------------
    def emit(self, out: list[Finding], st: VmState, rule: str, time_ns: int, message: str,
             evidence: dict, key: tuple, count: int = 1) -> None:
        """Count one occurrence of ``rule``; append its finding to ``out`` if admitted."""
        if self.admit(out, st, rule, time_ns, key, count):
            self.record(out, st, rule, time_ns, message, evidence, key, count)

    def admit(self, out: list[Finding], st: VmState, rule: str, time_ns: int, key: tuple,
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
            self._deadline.ns = min(self._deadline.ns, deadline)
            return False
        st.rate_count += 1
        return True

    def record(self, out: list[Finding], st: VmState, rule: str, time_ns: int,
               message: str, evidence: dict, key: tuple, count: int) -> None:
        """Create an admitted finding and open its dedup window."""
        dkey = (rule, key)
        finding = Finding(rule, self._severity[rule], time_ns, st.ident, st.key, message,
                          evidence, count)
        if len(st.dedup) < MAX_DEDUP_PER_VM:
            st.dedup[dkey] = Dedup(time_ns, finding)
            deadline = time_ns + self._dedup_ns
            self._dedup_expiry.append((deadline, st.key, dkey))
            self._deadline.ns = min(self._deadline.ns, deadline)
        else:
            self.stats["dedup_overflow"] += 1
        out.append(finding)

    # -- timers ----------------------------------------------------------------------
    def tick(self, now_ns: int, out: list[Finding]) -> None:
        """Close the dedup and rate windows that ended by ``now_ns``, appending their
        summaries to ``out``."""
        states = self._states
        expiry = self._dedup_expiry
        while expiry and expiry[0][0] <= now_ns:
            _, key, dkey = expiry.popleft()
            st = states.get(key)
            if st is None:
                continue
            entry = st.dedup.get(dkey)
            if entry is not None and now_ns - entry.first_ns >= self._dedup_ns:
                del st.dedup[dkey]
                if entry.extra:
                    out.append(self._summary(entry))
        for key in list(self._limited_vms):
            st = states.get(key)
            if st is None or now_ns - st.rate_start >= self._rate_ns:
                self._limited_vms.discard(key)
                if st is not None:
                    self._close_rate_window(st, now_ns, out)

    def next_deadline(self) -> float:
        """When :meth:`tick` next has work (inf: never)."""
        deadline: float = self._dedup_expiry[0][0] if self._dedup_expiry else float("inf")
        states = self._states
        for key in self._limited_vms:
            st = states.get(key)
            if st is not None and st.rate_start + self._rate_ns < deadline:
                deadline = st.rate_start + self._rate_ns
        return deadline

    def flush_vm(self, st: VmState, out: list[Finding], now_ns: int) -> None:
        """Summaries of every window ``st`` has open, now (end of input, VM gone)."""
        for entry in st.dedup.values():
            if entry.extra:
                out.append(self._summary(entry))
        st.dedup.clear()
        if st.limited:
            self._close_rate_window(st, max(now_ns, st.rate_start), out)

    def forget_timers(self) -> None:
        """Drop the window timers (after every VM was flushed)."""
        self._dedup_expiry.clear()
        self._limited_vms.clear()

    def forget_counts(self, vm: VmKey) -> None:
        """A retired VM's series disappear from ``hekitrace_findings_total``."""
        for ckey in [k for k in self.counts if k[0] == vm]:
            del self.counts[ckey]

    # -- summaries -------------------------------------------------------------------
    def _summary(self, entry: Dedup) -> Finding:
        first = entry.finding
        evidence = dict(first.evidence)
        evidence.update({"summary": "deduplicated", "first_ns": entry.first_ns,
                         "last_ns": entry.last_ns, "total": entry.extra + first.count})
        return Finding(first.rule, first.severity, entry.last_ns, first.vm, first.vm_key,
                       f"repeated {entry.extra} more time(s) within the dedup window: "
                       f"{first.message}", evidence, entry.extra)

    def _close_rate_window(self, st: VmState, now_ns: int, out: list[Finding]) -> None:
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
