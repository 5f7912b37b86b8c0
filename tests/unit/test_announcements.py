"""The fault rule's index of "make writable" announcements gives the old scan's answers.

``policy.vm_state.Announcements`` replaced a scan of the whole 256-entry deque on every
protected write fault. The oracle here is that scan, kept verbatim: a bounded deque,
expiry from the front, then "is there an entry covering the page whose time is within
the window". Checked on random operation sequences and on a whole fault storm through
Host + Policy (same findings, same counts, same announced_writes).
"""

from __future__ import annotations

import random
from collections import deque

import pytest

from hekitrace.config.abi import AbiProfile
from hekitrace.config.settings import parse_config
from hekitrace.policy import vm_state
from hekitrace.policy.engine import Policy
from hekitrace.policy.vm_state import MAX_RECENT_WRITABLE, Announcements
from hekitrace.state.events import (
    Fault,
    FaultAccess,
    Memslot,
    ProtectEntry,
    ProtectRequest,
    VmCreated,
)
from hekitrace.state.host import Host

T0 = 1_795_000_000_000_000_000
S = 1_000_000_000
MBEC = AbiProfile(name="heki-v2-mbec", lock_cr_update=13, protect_memory=14, mbec=True)
R, W, X, I = 1, 2, 4, 8


class ScanOracle:
    """The implementation before the index: a bounded deque scanned on every fault."""

    def __init__(self) -> None:
        self.entries: deque[tuple[int, int, int]] = deque(maxlen=MAX_RECENT_WRITABLE)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def append(self, time_ns: int, gfn_start: int, gfn_end: int) -> None:
        self.entries.append((time_ns, gfn_start, gfn_end))

    def expire(self, horizon_ns: int) -> None:
        while self.entries and self.entries[0][0] < horizon_ns:
            self.entries.popleft()

    def announced(self, gfn: int, when_ns: int, window_ns: int) -> bool:
        for t, s, e in self.entries:
            if s <= gfn < e and when_ns - t <= window_ns:
                return True
        return False


@pytest.mark.parametrize("seed", range(20))
def test_index_answers_as_the_scan_on_random_sequences(seed):
    rnd = random.Random(seed)
    index, oracle = Announcements(), ScanOracle()
    now = 0
    for _ in range(3000):
        op = rnd.random()
        now += rnd.randrange(0, 50)
        if op < 0.4:
            s = rnd.randrange(0, 400)
            limit = vm_state.INDEX_MAX_PAGES
            width = rnd.choice([1, 1, 2, 3, limit, limit + 1, 200])   # around the limit
            t = now - rnd.randrange(0, 30)                   # not always in order
            index.append(t, s, s + width)
            oracle.append(t, s, s + width)
        elif op < 0.5:
            horizon = now - rnd.randrange(0, 400)
            index.expire(horizon)
            oracle.expire(horizon)
        else:
            gfn, when = rnd.randrange(0, 600), now - rnd.randrange(0, 100)
            window = rnd.choice([10, 50, 200])
            assert index.announced(gfn, when, window) == oracle.announced(gfn, when, window)
        assert len(index) == len(oracle)
        assert list(index) == list(oracle.entries)
    # the index holds exactly the pages of the narrow entries it keeps
    pages: dict[int, list[int]] = {}
    for t, s, e in index:
        if e - s <= vm_state.INDEX_MAX_PAGES:
            for g in range(s, e):
                pages.setdefault(g, []).append(t)
    assert index.pages == pages


def _storm(seed: int) -> tuple[list, dict, dict]:
    """Boot one VM, then interleave text_poke announcements (more than the 256 kept)
    with a write-fault storm on announced and unannounced protected pages."""
    rnd = random.Random(seed)
    host = Host(MBEC)
    policy = Policy(parse_config("{}\n").policy, MBEC, clock=lambda: T0,
                    applied_hook_active=False)
    out: list = []

    def feed(event):
        out.extend(policy.evaluate(host.apply(event), host))

    tgid = 100
    feed(VmCreated(T0, tgid, tgid, name="vm", uuid="u"))
    feed(Memslot(T0, tgid, tgid, 0, 0, 0, 1 << 30, 0x7f0000000000))
    text = (0x1000, 0x1800)
    feed(ProtectRequest(T0 + 1, tgid, tgid, 0x9000,
                        (ProtectEntry(text[0] << 12, text[1] << 12, R | X),)))
    t = T0 + 2
    for step in range(4000):
        t += rnd.randrange(1, S // 20)
        if rnd.random() < 0.1:   # text_poke: make writable, then sealed again
            s = rnd.randrange(text[0], text[1] - 80)
            e = s + rnd.choice([1, 1, 2, 70])
            feed(ProtectRequest(t, tgid, tgid, 0x9000, (ProtectEntry(s << 12, e << 12, R | W),)))
            feed(ProtectRequest(t + 1, tgid, tgid, 0x9000,
                                (ProtectEntry(s << 12, e << 12, R | X),)))
        else:
            gfn = rnd.randrange(text[0], text[1])
            first = t - rnd.randrange(0, 3 * S) if rnd.random() < 0.5 else 0
            feed(Fault(t, tgid, tgid + step % 4, 0, gfn << 12, 0x182, 0xffff0000,
                       FaultAccess.WRITE, rnd.choice([1, 1, 7]), first))
    return ([f.to_dict() for f in out], dict(policy.stats),
            {k: v for k, v in policy.counts.items()})


@pytest.mark.parametrize("seed", range(3))
def test_fault_storm_with_announcements_same_findings_as_the_scan(seed, monkeypatch):
    indexed = _storm(seed)
    monkeypatch.setattr(vm_state, "Announcements", ScanOracle)
    scanned = _storm(seed)
    assert indexed == scanned
    assert indexed[1]["announced_writes"] > 0    # the storm did hit announced pages
    assert any(f["rule"] == "protected_write" for f in indexed[0])
