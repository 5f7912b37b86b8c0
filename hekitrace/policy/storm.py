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

:class:`StormControl` is a mixin of :class:`hekitrace.policy.engine.Policy`: it uses the
policy's settings and tables (``_dedup_ns``, ``_rate_n``, ``_rate_ns``, ``_severity``,
``counts``, ``stats``, ``_vms``, ``_dedup_expiry``, ``_limited_vms``, ``_pending``,
``next_deadline_ns``) set up by ``Policy.__init__``.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from hekitrace.policy.findings import Finding
from hekitrace.state.changes import VmKey

#: bound on the "announced writable" ranges remembered per VM (text_poke near-miss)
MAX_RECENT_WRITABLE = 256
#: bound on dedup entries per VM
MAX_DEDUP_PER_VM = 4096
#: timers run at most this often in event time (pairing/dedup windows are seconds long)
TICK_GRANULARITY_NS = 50_000_000


class _Dedup:
    __slots__ = ("extra", "finding", "first_ns", "last_ns")

    def __init__(self, first_ns: int, finding: Finding) -> None:
        self.first_ns = first_ns
        self.last_ns = first_ns
        self.extra = 0
        self.finding = finding


class _VmState:
    """Per-VM policy state: identity, exception cache, storm control, pairing, history."""

    __slots__ = (
        "dedup",
        "excepted",
        "guest",
        "ident",
        "key",
        "limited",
        "pending",
        "rate_count",
        "rate_start",
        "recent_writable",
        "unsupported_reported",
    )

    def __init__(self, guest: Any, ident: dict, excepted: frozenset[str]) -> None:
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




class StormControl:
    """Admission of rule occurrences into findings (see module docstring); a mixin."""

    # set by Policy.__init__ (declared here for the type checker)
    _dedup_ns: int
    _rate_n: int
    _rate_ns: int
    _severity: dict[str, str]
    counts: dict[tuple[VmKey | None, str, str], int]
    stats: dict[str, int]
    _vms: dict[VmKey, _VmState]
    _pending: deque[tuple[int, VmKey, str, int, int]]
    _dedup_expiry: deque[tuple[int, VmKey, tuple]]
    _limited_vms: set[VmKey]
    next_deadline_ns: float

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
            self.next_deadline_ns = min(self.next_deadline_ns, deadline)
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
            self.next_deadline_ns = min(self.next_deadline_ns, deadline)
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

