"""Guest physical memory of the simulated Heki guest: kernel layout, ranges, page lists.

Split from hekitrace.sim.scenarios (the VM model and the scenarios) because these three pieces are
what the model's faithfulness rests on and each is tested alone: the layout is a real
Debian kernel's (hekitrace/data/kernel-layout-*.json, from scripts/make_kernel_layout.py),
:class:`RangeMap` is the simulated host's xarray, and :func:`build_page_list` builds page
lists exactly as the v2 guest's ``heki_add_pa()`` does (docs/heki-abi.md section 4).
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources

from hekitrace.config.abi import HEKI_MAX_ENTRIES_PER_PAGE
from hekitrace.state.events import PAGE_SIZE, ProtectEntry

DEFAULT_LAYOUT = "kernel-layout-debian-6.1.json"


@dataclass(frozen=True)
class KernelLayout:
    """Physical page ranges of one kernel image (gfns, half open) and where they came from."""

    text: tuple[int, int]
    rodata: tuple[int, int]
    data: tuple[int, int]
    image_end_gfn: int
    provenance: dict


def load_layout(name: str = DEFAULT_LAYOUT) -> KernelLayout:
    """Read a layout shipped in hekitrace/data (text and rodata rounded out to pages)."""
    raw = json.loads(resources.files("hekitrace").joinpath("data", name).read_text())
    phys = {sym: int(v["phys"], 16) for sym, v in raw["symbols"].items()}

    def span(start: str, end: str) -> tuple[int, int]:
        return phys[start] // PAGE_SIZE, -(-phys[end] // PAGE_SIZE)

    return KernelLayout(text=span("_text", "_etext"), rodata=span("__start_rodata",
                                                                  "__end_rodata"),
                        data=span("_sdata", "_edata"), image_end_gfn=-(-phys["_end"] // PAGE_SIZE),
                        provenance=dict(raw["provenance"]))


class RangeMap:
    """Half-open gfn ranges to a value (0 = nothing stored): the simulated host's xarray.

    Small and simple on purpose: it is the model's reference, independent of
    hekitrace.state.attrmap, so a bug there cannot hide in both.
    """

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.values: list[int] = []

    def segments(self, start: int, end: int) -> Iterator[tuple[int, int, int]]:
        i = max(0, bisect.bisect_right(self.starts, start) - 1)
        pos = start
        while pos < end:
            if i < len(self.starts) and self.starts[i] < end and self.ends[i] > pos:
                if self.starts[i] > pos:
                    yield pos, self.starts[i], 0
                    pos = self.starts[i]
                stop = min(end, self.ends[i])
                yield pos, stop, self.values[i]
                pos = stop
                i += 1
            elif i < len(self.starts) and self.ends[i] <= pos:
                i += 1
            else:
                yield pos, end, 0
                pos = end

    def set(self, start: int, end: int, value: int, mask: int) -> None:
        pieces = [(s, e, (v & ~mask) | (value & mask)) for s, e, v in self.segments(start, end)]
        lo = max(0, bisect.bisect_right(self.starts, start) - 1)
        hi = bisect.bisect_left(self.starts, end)
        keep: list[tuple[int, int, int]] = []
        for i in range(lo, hi):
            s, e, v = self.starts[i], self.ends[i], self.values[i]
            if e <= start or s >= end:
                keep.append((s, e, v))
                continue
            if s < start:
                keep.append((s, start, v))
            if e > end:
                keep.append((end, e, v))
        merged = sorted(keep + [p for p in pieces if p[2]])
        out: list[tuple[int, int, int]] = []
        for s, e, v in merged:
            if out and out[-1][1] == s and out[-1][2] == v:
                out[-1] = (out[-1][0], e, v)
            else:
                out.append((s, e, v))
        self.starts[lo:hi] = [p[0] for p in out]
        self.ends[lo:hi] = [p[1] for p in out]
        self.values[lo:hi] = [p[2] for p in out]


def build_page_list(ranges: list[tuple[int, int, int]], list_page_gpas: Iterator[int],
                    max_entries: int = HEKI_MAX_ENTRIES_PER_PAGE
                    ) -> tuple[int, tuple[ProtectEntry, ...], int]:
    """Build a v2 page list from (gpa, end_gpa, permissions) in the guest's walk order.

    Returns (GPA of the head page given to the hypercall, entries in the host's reading
    order, number of list pages). Mirrors ``heki_add_pa()``: a range adjacent to the last
    entry with equal permissions extends it; a full page (169 entries) is followed by a
    new one whose ``next_pa`` is the previous head, and the new page becomes the head.
    """
    pages: list[list[list[int]]] = [[]]
    for gpa, end_gpa, perms in ranges:
        current = pages[-1]
        if current and current[-1][1] == gpa and current[-1][2] == perms:
            current[-1][1] = end_gpa
            continue
        if len(current) == max_entries:
            current = []
            pages.append(current)
        current.append([gpa, end_gpa, perms])
    gpas = [next(list_page_gpas) for _ in pages]
    entries = tuple(ProtectEntry(*entry) for page in reversed(pages) for entry in page)
    return gpas[-1], entries, len(pages)
