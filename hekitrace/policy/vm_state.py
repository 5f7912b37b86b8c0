"""Per-VM policy state: one record per VM that holds each policy part's per-VM tables.

Storm control (dedup windows, the rate window), pairing (checks pending, whether
``protection_unsupported`` was reported) and the rules ("make writable" announcements)
each keep per-VM data; keeping it in one record lets a rule reach all of it with one
lookup per event. Each field is read and written by one part only, named beside it.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hekitrace.policy.findings import Finding

#: bound on the "announced writable" ranges remembered per VM (text_poke near-miss)
MAX_RECENT_WRITABLE = 256


class Dedup:
    """One open dedup window (storm control): the finding emitted and its repeats."""

    __slots__ = ("extra", "finding", "first_ns", "last_ns")

    def __init__(self, first_ns: int, finding: Finding) -> None:
        self.first_ns = first_ns
        self.last_ns = first_ns
        self.extra = 0
        self.finding = finding


class VmState:
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
        # identity and exceptions (the policy)
        self.key = guest.key
        self.guest = guest
        self.ident = ident
        self.excepted = excepted
        # storm control: open dedup windows, the rate window, what it suppressed
        self.dedup: dict[tuple, Dedup] = {}
        self.rate_start = -1
        self.rate_count = 0
        self.limited: dict[str, int] = {}
        # pairing: (side, gfn_start, gfn_end) -> time of the latest change scheduling
        # that check; protection_unsupported reported once
        self.pending: dict[tuple[str, int, int], int] = {}
        self.unsupported_reported = False
        # the rules: (time, gfn_start, gfn_end) of "make writable" announcements
        self.recent_writable: deque[tuple[int, int, int]] = deque(maxlen=MAX_RECENT_WRITABLE)
