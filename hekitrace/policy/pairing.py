"""Pairing: every requested protection must be applied, and only those.

Each Heki-bit change of one map (``requested`` from the guest's hypercalls, ``applied``
from the kernel hook) schedules a check of that gfn range ``pairing_window_seconds``
later; the check compares the Heki bits of both maps over the range and emits
``request_not_applied`` / ``applied_without_request`` (or, once, ``protection_unsupported``
when the host never applied any Heki bit). Time is event time, so a replay gives the
daemon's findings. It needs the ``attr_applied`` hook: without it ``Policy`` turns
pairing off and says so in ``status``.

:class:`Pairing` is owned by :class:`hekitrace.policy.engine.Policy`: the rules call
:meth:`Pairing.expect`, the policy's timers :meth:`Pairing.tick`; findings go out through
storm control.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any

from hekitrace.config.abi import AbiProfile
from hekitrace.policy.findings import Finding
from hekitrace.policy.storm import Deadline, StormControl
from hekitrace.policy.vm_state import VmState
from hekitrace.state.changes import VmKey

#: bound on pending pairing checks per VM (a guest cannot grow our memory through it)
MAX_PENDING_PER_VM = 4096


class Pairing:
    """Scheduling and evaluation of pairing checks (see module docstring).

    ``enabled`` maps rule ids to whether they run; ``states`` is the policy's per-VM
    table; ``deadline`` is lowered when a check is scheduled.
    """

    def __init__(self, *, window_ns: int, abi: AbiProfile, enabled: Mapping[str, bool],
                 storm: StormControl, states: Mapping[VmKey, VmState],
                 deadline: Deadline) -> None:
        self.window_ns = window_ns
        self._abi = abi
        self._heki = abi.kvm_heki_mask
        self._enabled = enabled
        self._emit = storm.emit
        self._states = states
        self._deadline = deadline
        #: checks dropped because a VM had MAX_PENDING_PER_VM pending
        self.stats: dict[str, int] = {"pairing_overflow": 0}
        self._queue: deque[tuple[int, VmKey, str, int, int]] = deque()

    def expect(self, st: VmState, side: str, start: int, end: int, time_ns: int) -> None:
        """The ``side`` map ("requested" or "applied") changed Heki bits over gfns
        [start, end) at ``time_ns``: check the range a pairing window later."""
        key = (side, start, end)
        if key in st.pending:
            st.pending[key] = time_ns
            return
        if len(st.pending) >= MAX_PENDING_PER_VM:
            self.stats["pairing_overflow"] += 1
            return
        st.pending[key] = time_ns
        deadline = time_ns + self.window_ns
        self._queue.append((deadline, st.key, side, start, end))
        self._deadline.ns = min(self._deadline.ns, deadline)

    def tick(self, now_ns: int, out: list[Finding]) -> None:
        """Run the checks whose window passed by ``now_ns`` (a range changed again
        since waits a full window from that change)."""
        queue = self._queue
        window = self.window_ns
        states = self._states
        while queue and queue[0][0] <= now_ns:
            _, key, side, start, end = queue.popleft()
            st = states.get(key)
            if st is None:
                continue
            last = st.pending.get((side, start, end))
            if last is None:
                continue
            if last + window > now_ns:  # changed again since: wait a full window
                queue.append((last + window, key, side, start, end))
                continue
            del st.pending[(side, start, end)]
            self._check(st, side, start, end, now_ns, out)

    def flush(self, now_ns: int, out: list[Finding]) -> None:
        """Run every pending check now, as if its window had passed (end of input)."""
        queue = self._queue
        states = self._states
        while queue:
            _, key, side, start, end = queue.popleft()
            st = states.get(key)
            if st is not None and st.pending.pop((side, start, end), None) is not None:
                self._check(st, side, start, end, now_ns, out)

    def next_deadline(self) -> float:
        """When :meth:`tick` next has work (inf: never)."""
        return self._queue[0][0] if self._queue else float("inf")

    def _check(self, st: VmState, side: str, start: int, end: int, now_ns: int,
               out: list[Finding]) -> None:
        guest = st.guest
        mismatch = first_mismatch(guest.requested, guest.applied, start, end, self._heki)
        if mismatch is None:
            return
        s, e, want, got = mismatch
        for _side, ps, pe in st.pending:
            if ps < e and s < pe:
                return  # a newer change of this range is still within its window
        abi = self._abi
        evidence = {"gfn_start": s, "gfn_end": e, "requested": abi.attr_flags(want),
                    "applied": abi.attr_flags(got), "checked_gfn_start": start,
                    "checked_gfn_end": end, "window_seconds": self.window_ns / 1e9}
        enabled = self._enabled
        if side == "requested":
            if not guest.heki_applied_seen:
                if not st.unsupported_reported and enabled["protection_unsupported"]:
                    st.unsupported_reported = True
                    self._emit(out, st, "protection_unsupported", now_ns,
                               "the guest issues Heki protection requests but the host "
                               "applied none (host without Heki support?)", evidence,
                               ("unsupported",))
                return
            if enabled["request_not_applied"]:
                self._emit(out, st, "request_not_applied", now_ns,
                           f"requested {evidence['requested']} on gfns {s:#x}-{e:#x} "
                           f"not applied (host has {evidence['applied']})", evidence, (s, e))
        elif enabled["applied_without_request"]:
            self._emit(out, st, "applied_without_request", now_ns,
                       f"host applied {evidence['applied']} on gfns {s:#x}-{e:#x} "
                       f"without a matching request ({evidence['requested']})", evidence,
                       (s, e))


def clip(start: int, end: int, slots: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Parts of [start, end) inside the merged memslot ranges ``slots``."""
    out = []
    for s, e in slots:
        if e <= start:
            continue
        if s >= end:
            break
        out.append((max(s, start), min(e, end)))
    return out


def first_mismatch(requested: Any, applied: Any, start: int, end: int,
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
        _rs, re_, rv = req[i]
        _as, ae, av = app[j]
        stop = min(re_, ae)
        if (rv ^ av) & mask:
            return pos, stop, rv & mask, av & mask
        pos = stop
        if re_ == stop:
            i += 1
        if ae == stop:
            j += 1
    return None
