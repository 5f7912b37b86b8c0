# size: one hot data structure (the map, its blocks and its validator) kept in one module for speed
"""AttrMap: guest-frame-number ranges to KVM memory-attribute bits, as KVM's xarray has them.

The daemon keeps two per guest (requested and applied) and updates them at the rate guests
send requests, so the layout is chosen for CPython speed: a coalesced step function (sorted
breakpoints ``b`` and values ``v``, ``v[i]`` holding on ``[b[i], b[i+1])``, 0 elsewhere)
cut into blocks of about ``block_size`` breakpoints, as sortedcontainers does. An update is
two bisects and a splice inside one block whatever the map's size, and nothing is per page,
so a hostile guest cannot make updates slow by fragmenting its memory. A map that grows to
``_ARRAY_BLOCKS`` blocks keeps its breakpoints in ``array('q')`` (8 bytes each, not a list
slot and an int object); smaller maps keep lists, which are faster there. Design:
docs/attrmap.md; figures: BENCHMARKS.md ("AttrMap", "Daemon memory").

The public view is the contract of docs/internals.md ("AttrMap"): half-open ranges
``[start, end)`` with non-zero values, 0 meaning "no attribute", as
``kvm_vm_set_mem_attributes()`` stores NULL for 0 (docs/heki-abi.md section 5, step 6).
Inputs are checked only as far as the invariant needs (the host turns bad guest input into
anomalies first), so a ValueError from here is a caller's bug. :meth:`AttrMap.check` is the
slow validator the tests call after every operation and the daemon never calls.
"""

from __future__ import annotations

import builtins
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator
from itertools import chain, islice, pairwise
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import TypeAlias

    Points: TypeAlias = "list[int] | array[int]"

GFN_LIMIT = 1 << 52
"""Exclusive upper bound of gfns, so range ends go up to 2**52 inclusive.

The contract (docs/internals.md) fixes 2**52 pages: it covers any x86-64 guest (MAXPHYADDR is
at most 52 bits, i.e. 2**40 frames of 4 KiB) with room to spare, and a guest-supplied range
past it is rejected by the host as an anomaly before it reaches the map.
"""

ALL_BITS = (1 << 64) - 1
"""Mask meaning "every attribute bit": ``struct kvm_memory_attributes.attributes`` is a __u64."""

Segment = tuple[int, int, int]
"""``(gfn_start, gfn_end, value)``: a half-open range of pages with one value."""

ChangedSegment = tuple[int, int, int, int]
"""``(gfn_start, gfn_end, old, new)``: a uniform range of pages whose value changed."""

_GFN_TYPE = "q"
"""Typecode of breakpoint arrays: a C int64 per gfn (breakpoints are at most 2**52)."""

_ARRAY_BLOCKS = 16
"""A map that reaches this many blocks stores breakpoints in arrays from then on.

Below it a map holds at most 16 x 1024 breakpoints in lists (about 0.8 MB), so 200 such maps
stay under 160 MB; a map of 10k ranges separated by gaps (20k breakpoints, blocks of at most
1024) always has more than 16 blocks, so it is compact. Arrays are slower than lists for
small maps and faster for large ones (BENCHMARKS.md, "AttrMap", by map size)."""

DEFAULT_BLOCK_SIZE = 512
"""Breakpoints per block. Measured with ``bench/bench_attrmap.py --scaling``: blocks of a few
hundred keep both the in-block memmove and the list of blocks short up to millions of
ranges."""


class AttrMapInvariantError(AssertionError):
    """An AttrMap broke its own invariant: a bug in this module, never bad input.

    It derives from AssertionError rather than HekitraceError on purpose: HekitraceError is
    what the CLI turns into a one-line user error, and a corrupted map is not something a
    user caused or can fix; it must surface as a failed assertion with a traceback. (The
    module is also a leaf and must not import hekitrace.errors: imports point one way.)

    ``problems`` holds one line per violation, naming breakpoint indices and the ranges
    around them; ``ranges`` holds the offending ``(start, end, value)`` triples.
    """

    def __init__(self, problems: list[str], ranges: list[Segment]) -> None:
        self.problems = tuple(problems)
        self.ranges = tuple(ranges)
        shown = "; ".join(problems[:10])
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        super().__init__(f"AttrMap invariant broken: {shown}{more}")


def _range_error(start: object, end: object, what: str = "range") -> Exception:
    """Build (not raise) the error for a bad ``[start, end)``; kept off the fast path."""
    if type(start) is not int or type(end) is not int:
        return TypeError(f"{what} bounds must be int gfns, got {start!r}, {end!r}")
    if start >= end:  # type: ignore[operator]
        return ValueError(f"{what} [{start:#x}, {end:#x}) is empty or reversed: "
                          "expected start < end")
    return ValueError(f"{what} [{start:#x}, {end:#x}) is outside the gfn space "
                      f"[0, {GFN_LIMIT:#x})")


def _set_error(start: object, end: object, attrs: object, mask: object) -> Exception:
    """Build the error for bad :meth:`AttrMap.set` arguments."""
    for name, value in (("attrs", attrs), ("mask", mask)):
        if type(value) is not int:
            return TypeError(f"{name} must be an int, got {value!r}")
        if not 0 <= value <= ALL_BITS:  # type: ignore[operator]
            return ValueError(f"{name} {value:#x} is not a 64-bit attribute value")
    return _range_error(start, end)


def _rebuild(b: Points, v: list[int], p: int, q: int, before: int, start: int, end: int,
             keep: int, add: int) -> list[ChangedSegment]:
    """The general case of :meth:`AttrMap.set` on one block: breakpoints ``b[p:q]`` lie in
    [start, end] and ``before`` is the value just before ``start``. Rewrites that slice
    (coalesced against ``before`` and the value after ``end``) unless nothing changes."""
    after = v[q - 1]  # the old value at end; it continues past end and is kept there
    if b[p] == start:
        cur = v[p]
        first = p + 1
    else:
        cur = before
        first = p
    stop = q - 1 if b[q - 1] == end else q
    newb: list[int] = []
    newv: list[int] = []
    changes: list[ChangedSegment] = []
    last = before
    pos = start
    for i in range(first, stop):
        nxt = b[i]
        new = (cur & keep) | add
        if new != cur:
            changes.append((pos, nxt, cur, new))
        if new != last:
            newb.append(pos)
            newv.append(new)
            last = new
        pos = nxt
        cur = v[i]
    new = (cur & keep) | add
    if new != cur:
        changes.append((pos, end, cur, new))
    if not changes:
        return changes
    if new != last:
        newb.append(pos)
        newv.append(new)
        last = new
    if after != last:
        newb.append(end)
        newv.append(after)
    if isinstance(b, list):
        b[p:q] = newb
    else:
        b[p:q] = array(_GFN_TYPE, newb)
    v[p:q] = newv
    return changes


def _cut(b: Points, v: list[int], size: int) -> tuple[list[Points], list[list[int]]]:
    """Cut parallel breakpoints and values into ceil(n / size) blocks of near-equal length
    (never a runt: every block of a cut of more than ``size`` items holds at least size /
    2). Blocks are slices, so of the kind ``b`` is."""
    n = len(b)
    k = max(1, -(-n // size))
    edges = [n * i // k for i in range(k + 1)]
    pairs = list(pairwise(edges))
    return [b[x:y] for x, y in pairs], [v[x:y] for x, y in pairs]


def _segments(start: int, end: int, cur: int, points: list[int], values: list[int]
              ) -> Iterator[Segment]:
    pos = start
    for nxt, value in zip(points, values):
        yield (pos, nxt, cur)
        pos = nxt
        cur = value
    yield (pos, end, cur)


def _diff(ab: list[int], av: list[int], bb: list[int], bv: list[int]
          ) -> Iterator[ChangedSegment]:
    """Merge two step functions (flat breakpoints/values) and yield where they differ."""
    na, nb = len(ab), len(bb)
    i = j = 0
    pos = mine = theirs = 0
    past = GFN_LIMIT + 1
    while i < na or j < nb:
        x = ab[i] if i < na else past
        y = bb[j] if j < nb else past
        nxt = x if x < y else y  # noqa: FURB136 - hot loop: no min() call
        if mine != theirs:
            yield (pos, nxt, mine, theirs)
        if x == nxt:
            mine = av[i]
            i += 1
        if y == nxt:
            theirs = bv[j]
            j += 1
        pos = nxt


class AttrMap:
    """Half-open gfn ranges to non-zero attribute bits; always coalesced.

    Only non-zero values are stored; no two adjacent stored ranges have equal values and
    none is empty, so two maps with the same content have the same ranges and ``==``
    compares them. ``block_size`` only tunes the storage (tests make it tiny to exercise
    block boundaries); it never changes results.
    """

    __slots__ = ("_bb", "_bv", "_half", "_max", "_min", "_mins")
    __hash__ = None  # type: ignore[assignment]  # mutable

    def __init__(self, *, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        if type(block_size) is not int or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        # blocks of breakpoints (gfns), each non-empty: all lists, or all arrays from the
        # time the map first reached _ARRAY_BLOCKS blocks
        self._bb: list[Points] = []
        self._bv: list[list[int]] = []   # the values starting at those breakpoints
        self._mins: list[int] = []       # _mins[i] == _bb[i][0], for the first bisect
        self._half = block_size           # size of blocks made by a split
        self._max = 2 * block_size        # split a block past this
        self._min = block_size // 4       # merge a block with a neighbour below this

    # -- updates ---------------------------------------------------------------------------

    def set(self, start: int, end: int, attrs: int, mask: int = ALL_BITS
            ) -> list[ChangedSegment]:
        """Set ``new = (old & ~mask) | (attrs & mask)`` on every page of gfns [start, end).

        This is the update ``kvm_vm_set_mem_attributes()`` performs (docs/heki-abi.md section 5,
        step 6). Returns the uniform segments that actually changed, as
        ``(gfn_start, gfn_end, old, new)`` in ascending order, split where the old value
        changes; ``[]`` when nothing changed, in which case the map's content is not touched
        (KVM's early return, when no hook fires). ``attrs`` and ``mask`` are 64-bit values.
        Raises ValueError/TypeError for an empty, reversed or out-of-range range: callers
        validate guest input first, so that is a caller bug.
        """
        if (type(start) is not int or type(end) is not int or not 0 <= start < end <= GFN_LIMIT
                or type(attrs) is not int or type(mask) is not int
                or not 0 <= attrs <= ALL_BITS or not 0 <= mask <= ALL_BITS):
            raise _set_error(start, end, attrs, mask)
        add = attrs & mask
        keep = ~mask  # negative int; ``old & keep`` stays non-negative for old >= 0
        mins = self._mins
        if not mins:
            if not add:
                return []
            self._bb.append([start, end])
            self._bv.append([add, 0])
            mins.append(start)
            return [(start, end, 0, add)]
        bi = bisect_right(mins, start) - 1
        if bi < 0:  # noqa: PLR1730 - hot path: no max() call
            bi = 0
        merged = bi + 1 < len(mins) and mins[bi + 1] <= end
        if merged:
            # The breakpoints in [start, end] span blocks: make them one block (rare; the
            # cost is the blocks' size, and _fix splits the result again).
            bj = bisect_right(mins, end)
            bb, bv = self._bb, self._bv
            joined, joined_values = bb[bi], bv[bi]
            for k in range(bi + 1, bj):
                joined += bb[k]  # type: ignore[operator]  # same kind: all lists or all arrays
                joined_values += bv[k]
            del bb[bi + 1:bj], bv[bi + 1:bj], mins[bi + 1:bj]
        b = self._bb[bi]
        v = self._bv[bi]
        p = bisect_left(b, start)       # first breakpoint >= start
        q = bisect_right(b, end, p)     # first breakpoint > end
        if p:
            before = v[p - 1]           # value just before start (and at start if p == q)
        else:
            before = self._bv[bi - 1][-1] if bi else 0
        if p == q:
            # No breakpoint in [start, end]: the range lies strictly inside one segment
            # (or gap), the most common case. Cut it out with two new breakpoints.
            new = (before & keep) | add
            if new == before:
                if merged:
                    self._fix(bi)
                return []
            if isinstance(b, list):
                b[p:p] = (start, end)
            else:  # two inserts beat building a 2-item array for a slice assignment
                b.insert(p, end)
                b.insert(p, start)
            v[p:p] = (new, before)
            if merged or not p or len(b) > self._max:
                self._fix(bi)
            return [(start, end, before, new)]
        changes = _rebuild(b, v, p, q, before, start, end, keep, add)
        if merged or not p or not b or not self._min <= len(b) <= self._max:
            self._fix(bi)
        return changes

    def _fix(self, bi: int) -> None:
        """Restore the block invariants of block ``bi`` after a splice: not empty, its
        first breakpoint in ``_mins``, between ``_min`` and ``_max`` breakpoints long
        (except when it is the only block)."""
        bb, bv, mins = self._bb, self._bv, self._mins
        b = bb[bi]
        n = len(b)
        if not n:
            del bb[bi], bv[bi], mins[bi]
            return
        if n < self._min and len(bb) > 1:
            j = bi if bi + 1 < len(bb) else bi - 1
            bb[j:j + 2] = [bb[j] + bb[j + 1]]  # type: ignore[operator]  # of one kind
            bv[j:j + 2] = [bv[j] + bv[j + 1]]
            del mins[j + 1]
            bi = j
            b = bb[bi]
            n = len(b)
        if n > self._max:
            pieces_b, pieces_v = _cut(b, bv[bi], self._half)
            bb[bi:bi + 1] = pieces_b
            bv[bi:bi + 1] = pieces_v
            mins[bi:bi + 1] = [piece[0] for piece in pieces_b]
            if len(bb) >= _ARRAY_BLOCKS and isinstance(b, list):
                self._bb = [array(_GFN_TYPE, block) for block in bb]
        else:
            mins[bi] = b[0]

    def clear(self) -> None:
        """Forget every stored range."""
        self._bb.clear()
        self._bv.clear()
        self._mins.clear()

    def copy(self) -> AttrMap:
        """An independent copy (O(n) at C speed: list and array copies; values are ints)."""
        other = AttrMap.__new__(AttrMap)
        other._bb = [b[:] for b in self._bb]
        other._bv = [v.copy() for v in self._bv]
        other._mins = self._mins.copy()
        other._half, other._max, other._min = self._half, self._max, self._min
        return other

    def _flat(self) -> tuple[list[int], list[int]]:
        """All breakpoints and values as two flat lists (O(n), C speed)."""
        return (list(chain.from_iterable(self._bb)), list(chain.from_iterable(self._bv)))

    def _load_flat(self, b: list[int], v: list[int]) -> None:
        """Replace the content with flat breakpoint/value lists, cut into blocks."""
        self._bb, self._bv = _cut(b, v, self._half) if b else ([], [])
        if len(self._bb) >= _ARRAY_BLOCKS:
            self._bb = [array(_GFN_TYPE, block) for block in self._bb]
        self._mins = [piece[0] for piece in self._bb]

    # -- queries ---------------------------------------------------------------------------

    def get(self, gfn: int) -> int:
        """The attribute value of page ``gfn`` (0 where nothing is stored)."""
        if not 0 <= gfn < GFN_LIMIT:
            raise ValueError(f"gfn {gfn:#x} is outside the gfn space [0, {GFN_LIMIT:#x})")
        bi = bisect_right(self._mins, gfn) - 1
        if bi < 0:
            return 0
        return self._bv[bi][bisect_right(self._bb[bi], gfn) - 1]

    def _inside(self, start: int, end: int) -> tuple[int, list[int], list[int]]:
        """Validate [start, end); return the value at start and the breakpoints strictly
        inside (start, end) with their values."""
        if not 0 <= start < end <= GFN_LIMIT:
            raise _range_error(start, end)
        bb, bv, mins = self._bb, self._bv, self._mins
        bi = bisect_right(mins, start) - 1
        if bi < 0:
            cur, bi, i = 0, 0, 0
        else:
            i = bisect_right(bb[bi], start)
            cur = bv[bi][i - 1]
        points: list[int] = []
        values: list[int] = []
        while bi < len(bb):
            b = bb[bi]
            j = bisect_left(b, end, i)
            points += b[i:j]
            values += bv[bi][i:j]
            if j < len(b):
                break
            bi += 1
            i = 0
        return cur, points, values

    def values_in(self, start: int, end: int) -> builtins.set[int]:
        """Distinct values over gfns [start, end), 0 included if any page there is unset."""
        cur, _, values = self._inside(start, end)
        found = set(values)
        found.add(cur)
        return found

    def all_equal(self, start: int, end: int, value: int) -> bool:
        """True if every page of gfns [start, end) has exactly ``value`` (0: unset)."""
        if not 0 <= start < end <= GFN_LIMIT:
            raise _range_error(start, end)
        mins = self._mins
        bi = bisect_right(mins, start) - 1
        if bi < 0:
            cur = 0
            nxt = mins[0] if mins else GFN_LIMIT
        else:
            b = self._bb[bi]
            i = bisect_right(b, start)
            cur = self._bv[bi][i - 1]
            nxt = b[i] if i < len(b) else mins[bi + 1] if bi + 1 < len(mins) else GFN_LIMIT
        # Coalesced: a breakpoint inside the range means the value changes there.
        return cur == value and nxt >= end

    def any_bits(self, start: int, end: int, bits: int) -> bool:
        """True if some page of gfns [start, end) has any of ``bits`` set."""
        cur, _, values = self._inside(start, end)
        return bool(cur & bits) or any(x & bits for x in values)

    def segments(self, start: int, end: int) -> Iterator[Segment]:
        """Yield ``(s, e, value)`` covering gfns [start, end) exactly, 0-gaps included.

        Consecutive segments have different values; the first starts at ``start`` and the
        last ends at ``end``. The range is validated when called, not when iterated.
        """
        cur, points, values = self._inside(start, end)
        return _segments(start, end, cur, points, values)

    def __iter__(self) -> Iterator[Segment]:
        """Stored (non-zero) ranges ``(start, end, value)``, ascending."""
        b, v = self._flat()
        # zip stops after len(b) - 1 triples: the last breakpoint only ends a range.
        return ((s, e, x) for s, e, x in zip(b, islice(b, 1, None), v) if x)

    def __len__(self) -> int:
        """Number of stored (non-zero) ranges; O(n) but at C speed (list counts)."""
        return sum(len(v) - v.count(0) for v in self._bv)

    def __bool__(self) -> bool:
        return bool(self._mins)

    def pages_by_value(self) -> dict[int, int]:
        """Pages per distinct non-zero value (unset pages, value 0, are not counted)."""
        counts: dict[int, int] = {}
        b, v = self._flat()
        for s, e, x in zip(b, islice(b, 1, None), v):
            if x:
                counts[x] = counts.get(x, 0) + (e - s)
        return counts

    def diff(self, other: AttrMap) -> Iterator[ChangedSegment]:
        """Yield ``(start, end, mine, theirs)`` for maximal ranges where the maps differ.

        Ranges come in ascending order; consecutive ones are either not adjacent or have a
        different (mine, theirs) pair. O(n + m) Python work, O(n) at C speed (list
        compares) when the maps are equal.
        """
        ab, av = self._flat()
        bb, bv = other._flat()
        if ab == bb and av == bv:
            return iter(())
        return _diff(ab, av, bb, bv)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AttrMap):
            return NotImplemented
        if self._bb == other._bb and self._bv == other._bv:
            return True
        return self._flat() == other._flat()

    def __repr__(self) -> str:
        shown = ", ".join(f"[{s:#x}, {e:#x}): {x:#x}" for s, e, x in islice(self, 4))
        more = ", ..." if len(self) > 4 else ""
        return f"<AttrMap {len(self)} ranges {{{shown}{more}}}>"

    # -- checkpoints -----------------------------------------------------------------------

    def to_list(self) -> list[Segment]:
        """Stored ranges as ``[(start, end, value), ...]``, for checkpoints and snapshots."""
        return list(self)

    @classmethod
    def from_list(cls, items: Iterable[Segment], *, block_size: int = DEFAULT_BLOCK_SIZE
                  ) -> AttrMap:
        """Build a map from ``(start, end, value)`` triples, as :meth:`to_list` gives them.

        The triples must be ascending and disjoint, with int bounds in [0, 2**52] and
        64-bit values; anything else (a corrupt checkpoint) raises ValueError/TypeError
        naming the item's index. Zero values are skipped and adjacent equal values merged,
        so the result is canonical even if the input was not.
        """
        b: list[int] = []
        v: list[int] = []
        prev_end = 0
        for index, item in enumerate(items):
            try:
                start, end, value = item
            except (TypeError, ValueError):
                raise ValueError(f"item {index}: expected (start, end, value), got {item!r}"
                                 ) from None
            if type(start) is not int or type(end) is not int or not 0 <= start < end <= GFN_LIMIT:
                raise _range_error(start, end, f"item {index}: range")
            if type(value) is not int or not 0 <= value <= ALL_BITS:
                raise ValueError(f"item {index}: value {value!r} is not a 64-bit attribute value")
            if start < prev_end:
                raise ValueError(f"item {index}: range [{start:#x}, {end:#x}) overlaps or "
                                 f"precedes the previous one, which ends at {prev_end:#x}")
            prev_end = end
            if not value:
                continue
            if b and b[-1] == start:
                # Adjacent to the previous stored range, whose end breakpoint has value 0.
                if v[-2] == value:
                    b[-1] = end
                    continue
                v[-1] = value
                b.append(end)
                v.append(0)
            else:
                b += (start, end)
                v += (value, 0)
        result = cls(block_size=block_size)
        result._load_flat(b, v)
        return result

    # -- validation (tests only) -----------------------------------------------------------

    def check(self) -> None:
        """Verify the representation invariant; raise AttrMapInvariantError naming ranges.

        Slow and thorough (O(n) Python); tests call it after every operation, the daemon
        never does, so the hot path pays nothing for it.
        """
        b, v = self._flat()
        problems: list[str] = []
        ranges: list[Segment] = []
        bb, bv, mins = self._bb, self._bv, self._mins
        if not len(bb) == len(bv) == len(mins):
            problems.append(f"{len(bb)} breakpoint blocks, {len(bv)} value blocks, "
                            f"{len(mins)} block minimums")
        big = len(bb) >= _ARRAY_BLOCKS
        arrays = big or (bool(bb) and type(bb[0]) is array)
        for k, (kb, kv) in enumerate(zip(bb, bv)):
            if ((arrays and not (type(kb) is array and kb.typecode == _GFN_TYPE))
                    or (not arrays and type(kb) is not list)):
                problems.append(f"block {k} of {len(bb)}: breakpoints in a {type(kb).__name__}"
                                f", expected {'an array(q)' if arrays else 'a list'}: blocks "
                                f"are all lists or all arrays, arrays from {_ARRAY_BLOCKS} on")
            if type(kv) is not list:
                problems.append(f"block {k}: values in a {type(kv).__name__}, expected a list")
            if not kb or len(kb) != len(kv):
                problems.append(f"block {k}: {len(kb)} breakpoints, {len(kv)} values")
            elif k < len(mins) and mins[k] != kb[0]:
                problems.append(f"block {k}: minimum {mins[k]!r} but first breakpoint "
                                f"{kb[0]!r}")
            if len(kb) > self._max or (len(kb) < self._min and len(bb) > 1):
                problems.append(f"block {k}: {len(kb)} breakpoints, outside "
                                f"[{self._min}, {self._max}]")

        def bad(i: int, why: str) -> None:
            s = b[i] if i < len(b) else None
            e = b[i + 1] if i + 1 < len(b) else None
            x = v[i] if i < len(v) else None
            problems.append(f"breakpoint {i} ([{s!r}, {e!r}) value {x!r}): {why}")
            if isinstance(s, int) and isinstance(e, int) and isinstance(x, int):
                ranges.append((s, e, x))

        if len(b) != len(v):
            problems.append(f"{len(b)} breakpoints but {len(v)} values")
        if b and v and v[-1] != 0:
            bad(len(v) - 1, "last value is not 0 (a range would extend to infinity)")
        if v and v[0] == 0:
            bad(0, "first value is 0 (an empty gap breakpoint)")
        for i in range(min(len(b), len(v))):
            s, x = b[i], v[i]
            if type(s) is not int or not 0 <= s <= GFN_LIMIT:
                bad(i, f"breakpoint {s!r} is not an int in [0, {GFN_LIMIT:#x}]")
            if type(x) is not int or not 0 <= x <= ALL_BITS:
                bad(i, f"value {x!r} is not a 64-bit int")
            if i and type(s) is int and type(b[i - 1]) is int and b[i - 1] >= s:
                bad(i - 1, "empty or unsorted range (breakpoints not strictly increasing)")
            if i and x == v[i - 1]:
                bad(i - 1, "not coalesced: next range is adjacent with an equal value")
        if problems:
            raise AttrMapInvariantError(problems, ranges)
