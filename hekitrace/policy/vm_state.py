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
#: announcements up to this many pages wide are indexed page by page; wider ones (module
#: unloads; text_poke announces a page or two) are kept in a short list that is scanned
INDEX_MAX_PAGES = 8


class Announcements:
    """The "make writable" announcements of one VM, oldest first, at most
    :data:`MAX_RECENT_WRITABLE` (the oldest is dropped first), with an index.

    Each entry is (time, gfn_start, gfn_end). ``pages`` maps every page of an entry up to
    :data:`INDEX_MAX_PAGES` wide to the times of the entries covering it (oldest first:
    entries leave in the order they came), ``wide`` holds the wider entries. A write fault
    asks :meth:`announced`: a dict lookup on its page (plus the few wide entries) instead
    of a scan of every announcement; the answer is the scan's: is there an entry covering
    the page whose time is at most ``window`` before ``when``.
    """

    __slots__ = ("entries", "pages", "wide")

    def __init__(self) -> None:
        self.entries: deque[tuple[int, int, int]] = deque()
        self.pages: dict[int, list[int]] = {}
        self.wide: deque[tuple[int, int, int]] = deque()

    def __len__(self) -> int:
        return len(self.entries)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.entries)

    def append(self, time_ns: int, gfn_start: int, gfn_end: int) -> None:
        if len(self.entries) >= MAX_RECENT_WRITABLE:
            self._drop_oldest()
        entry = (time_ns, gfn_start, gfn_end)
        self.entries.append(entry)
        if gfn_end - gfn_start > INDEX_MAX_PAGES:
            self.wide.append(entry)
            return
        pages = self.pages
        for gfn in range(gfn_start, gfn_end):
            times = pages.get(gfn)
            if times is None:
                pages[gfn] = [time_ns]
            else:
                times.append(time_ns)

    def _drop_oldest(self) -> None:
        _time_ns, gfn_start, gfn_end = self.entries.popleft()
        if gfn_end - gfn_start > INDEX_MAX_PAGES:
            self.wide.popleft()
            return
        pages = self.pages
        for gfn in range(gfn_start, gfn_end):
            times = pages[gfn]
            if len(times) == 1:
                del pages[gfn]
            else:
                del times[0]

    def expire(self, horizon_ns: int) -> None:
        """Drop the entries from the front older than ``horizon_ns`` (as the scan did:
        the front only, in arrival order)."""
        entries = self.entries
        while entries and entries[0][0] < horizon_ns:
            self._drop_oldest()

    def announced(self, gfn: int, when_ns: int, window_ns: int) -> bool:
        """Whether an entry covers ``gfn`` with ``when_ns - time <= window_ns``."""
        times = self.pages.get(gfn)
        if times is not None:
            for t in times:
                if when_ns - t <= window_ns:
                    return True
        for t, s, e in self.wide:
            if s <= gfn < e and when_ns - t <= window_ns:
                return True
        return False


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
        self.recent_writable = Announcements()
