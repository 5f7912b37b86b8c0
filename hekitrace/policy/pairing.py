"""Pairing: every requested protection must be applied, and only those.

Each Heki-bit change of one map (``requested`` from the guest's hypercalls, ``applied``
from the kernel hook) schedules a check of that gfn range ``pairing_window_seconds``
later; the check compares the Heki bits of both maps over the range and emits
``request_not_applied`` / ``applied_without_request`` (or, once, ``protection_unsupported``
when the host never applied any Heki bit). Time is event time, so a replay gives the
daemon's findings. It needs the ``attr_applied`` hook: without it ``Policy`` turns
pairing off and says so in ``status``.

:class:`Pairing` is a mixin of :class:`hekitrace.policy.engine.Policy` (its ``_pending`` queue,
``_window_ns``, ``_enabled``, ``_heki``, ``abi``, ``stats`` and storm control's ``_emit``).
"""

from __future__ import annotations

from typing import Any

from hekitrace.config.abi import AbiProfile
from hekitrace.policy.findings import Finding
from hekitrace.policy.storm import StormControl, _VmState

#: bound on pending pairing checks per VM (a guest cannot grow our memory through it)
MAX_PENDING_PER_VM = 4096


class Pairing(StormControl):
    """Scheduling and evaluation of pairing checks (see module docstring); a mixin."""

    # set by Policy.__init__ (declared here for the type checker)
    abi: AbiProfile
    _window_ns: int
    _enabled: dict[str, bool]
    _heki: int

    def _expect(self, st: _VmState, guest: Any, side: str, start: int, end: int,
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
        self.next_deadline_ns = min(self.next_deadline_ns, deadline)

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

