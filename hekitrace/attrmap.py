"""AttrMap: guest-frame-number ranges to KVM memory-attribute bits, as KVM's xarray has them.

The daemon keeps two of these per guest (what the guest requested, what the host applied)
and applies hundreds of thousands of range updates per second to them, so the layout is
chosen for CPython speed rather than elegance: the map is a *step function* held in two
parallel lists,

    ``_b``: strictly increasing breakpoints (gfns, ``0 <= b <= GFN_LIMIT``)
    ``_v``: ``_v[i]`` is the value on ``[_b[i], _b[i+1])``; the last value is always 0

and every gfn before ``_b[0]`` has value 0. Consecutive values always differ, which is what
"coalesced" means here: a value change happens exactly at a breakpoint, so "is this range
uniform" is one bisect and "which ranges does this update touch" is a list slice. An update
touching k stored ranges costs two bisects, O(k) Python work and one slice assignment (a C
memmove); nothing is ever per page, so a range of 2**52 pages costs the same as one page.
Adjacent stored ranges cost one breakpoint each, ranges separated by gaps two.

The public view is the contract of docs/internals.md ("AttrMap"): half-open ranges
``[start, end)`` with non-zero values ("stored ranges"), 0 meaning "no attribute", exactly as
``kvm_vm_set_mem_attributes()`` stores NULL for 0 (reference/heki-kvm.md 2.3).

Inputs are validated only as far as the invariant needs (ints, bounds, start < end): the
host validates guest input and turns it into anomalies before it gets here, so a ValueError
from this module is a bug in the caller, never a guest's doing. :meth:`AttrMap.check` is the
slow validator that tests call after every operation and the daemon never calls
(STYLE habit 12).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator
from itertools import islice

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


class AttrMapInvariantError(AssertionError):
    """An AttrMap broke its own invariant: a bug in this module, never bad input.

    It derives from AssertionError rather than HekitraceError on purpose: HekitraceError is
    what the CLI turns into a one-line user error, and a corrupted map is not something a
    user caused or can fix; it must surface as a failed assertion with a traceback. (The
    module is also a leaf and must not import hekitrace.errors, STYLE habit 1.)

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


class AttrMap:
    """Half-open gfn ranges to non-zero attribute bits; always coalesced.

    Only non-zero values are stored; no two adjacent stored ranges have equal values and
    none is empty, so two maps with the same content have the same representation and
    ``==`` is a list comparison.
    """

    __slots__ = ("_b", "_v")
    __hash__ = None  # type: ignore[assignment]  # mutable

    def __init__(self) -> None:
        self._b: list[int] = []
        self._v: list[int] = []

    # -- updates ---------------------------------------------------------------------------

    def set(self, start: int, end: int, attrs: int, mask: int = ALL_BITS
            ) -> list[ChangedSegment]:
        """Set ``new = (old & ~mask) | (attrs & mask)`` on every page of gfns [start, end).

        This is the update ``kvm_vm_set_mem_attributes()`` performs (reference/heki-kvm.md
        1.8 step 6, 2.3). Returns the uniform segments that actually changed, as
        ``(gfn_start, gfn_end, old, new)`` in ascending order, split where the old value
        changes; ``[]`` when nothing changed, in which case the map is not touched (KVM's
        early return, when no hook fires). ``attrs`` and ``mask`` are 64-bit values.
        Raises ValueError/TypeError for an empty, reversed or out-of-range range: callers
        validate guest input first, so that is a caller bug.
        """
        if (type(start) is not int or type(end) is not int or not 0 <= start < end <= GFN_LIMIT
                or type(attrs) is not int or type(mask) is not int
                or not 0 <= attrs <= ALL_BITS or not 0 <= mask <= ALL_BITS):
            raise _set_error(start, end, attrs, mask)
        add = attrs & mask
        keep = ~mask  # negative int; ``old & keep`` stays non-negative for old >= 0
        b = self._b
        v = self._v
        p = bisect_left(b, start)       # first breakpoint >= start
        q = bisect_right(b, end, p)     # first breakpoint > end
        before = v[p - 1] if p else 0   # value just before start (and at start if p == q)
        if p == q:
            # No breakpoint in [start, end]: the range lies strictly inside one segment
            # (or gap), the most common case. Cut it out with two new breakpoints.
            new = (before & keep) | add
            if new == before:
                return []
            b[p:p] = (start, end)
            v[p:p] = (new, before)
            return [(start, end, before, new)]
        # Breakpoints b[p:q] lie in [start, end]; rebuild that slice. ``after`` is the old
        # value at ``end`` (it continues past end and is kept there).
        after = v[q - 1]
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
        b[p:q] = newb
        v[p:q] = newv
        return changes

    def clear(self) -> None:
        """Forget every stored range."""
        self._b.clear()
        self._v.clear()

    def copy(self) -> AttrMap:
        """An independent copy (O(n) at C speed: two list copies; values are ints)."""
        other = AttrMap.__new__(AttrMap)
        other._b = self._b.copy()
        other._v = self._v.copy()
        return other

    # -- queries ---------------------------------------------------------------------------

    def get(self, gfn: int) -> int:
        """The attribute value of page ``gfn`` (0 where nothing is stored)."""
        if not 0 <= gfn < GFN_LIMIT:
            raise ValueError(f"gfn {gfn:#x} is outside the gfn space [0, {GFN_LIMIT:#x})")
        i = bisect_right(self._b, gfn)
        return self._v[i - 1] if i else 0

    def _span(self, start: int, end: int) -> tuple[int, int]:
        """Validate [start, end) and return ``(i, j)``: the value at start is ``_v[i-1]``
        (0 if i == 0) and ``_b[i:j]`` are the breakpoints strictly inside (start, end)."""
        if not 0 <= start < end <= GFN_LIMIT:
            raise _range_error(start, end)
        b = self._b
        i = bisect_right(b, start)
        return i, bisect_left(b, end, i)

    def values_in(self, start: int, end: int) -> set[int]:
        """Distinct values over gfns [start, end), 0 included if any page there is unset."""
        i, j = self._span(start, end)
        v = self._v
        values = set(v[i:j])
        values.add(v[i - 1] if i else 0)
        return values

    def all_equal(self, start: int, end: int, value: int) -> bool:
        """True if every page of gfns [start, end) has exactly ``value`` (0: unset)."""
        i, j = self._span(start, end)
        # Coalesced: a breakpoint inside the range means the value changes there.
        return i == j and (self._v[i - 1] if i else 0) == value

    def any_bits(self, start: int, end: int, bits: int) -> bool:
        """True if some page of gfns [start, end) has any of ``bits`` set."""
        i, j = self._span(start, end)
        v = self._v
        if (v[i - 1] if i else 0) & bits:
            return True
        return any(x & bits for x in islice(v, i, j))

    def segments(self, start: int, end: int) -> Iterator[Segment]:
        """Yield ``(s, e, value)`` covering gfns [start, end) exactly, 0-gaps included.

        Consecutive segments have different values; the first starts at ``start`` and the
        last ends at ``end``. The range is validated when called, not when iterated.
        """
        i, j = self._span(start, end)
        return self._segments(start, end, i, j)

    def _segments(self, start: int, end: int, i: int, j: int) -> Iterator[Segment]:
        b = self._b
        v = self._v
        pos = start
        cur = v[i - 1] if i else 0
        for k in range(i, j):
            nxt = b[k]
            yield (pos, nxt, cur)
            pos = nxt
            cur = v[k]
        yield (pos, end, cur)

    def __iter__(self) -> Iterator[Segment]:
        """Stored (non-zero) ranges ``(start, end, value)``, ascending."""
        b = self._b
        # zip stops after len(b) - 1 triples: the last breakpoint only ends a range.
        return ((s, e, x) for s, e, x in zip(b, islice(b, 1, None), self._v) if x)

    def __len__(self) -> int:
        """Number of stored (non-zero) ranges; O(n) but at C speed (a list count)."""
        v = self._v
        return len(v) - v.count(0)

    def __bool__(self) -> bool:
        return bool(self._b)

    def pages_by_value(self) -> dict[int, int]:
        """Pages per distinct non-zero value (unset pages, value 0, are not counted)."""
        counts: dict[int, int] = {}
        b = self._b
        for s, e, x in zip(b, islice(b, 1, None), self._v):
            if x:
                counts[x] = counts.get(x, 0) + (e - s)
        return counts

    def diff(self, other: AttrMap) -> Iterator[ChangedSegment]:
        """Yield ``(start, end, mine, theirs)`` for maximal ranges where the maps differ.

        Ranges come in ascending order; consecutive ones are either not adjacent or have a
        different (mine, theirs) pair. O(n + m) Python work, O(1) (two C list compares) when
        the maps are equal.
        """
        if self._b == other._b and self._v == other._v:
            return iter(())
        return self._diff(other)

    def _diff(self, other: AttrMap) -> Iterator[ChangedSegment]:
        ab, av, bb, bv = self._b, self._v, other._b, other._v
        na, nb = len(ab), len(bb)
        i = j = 0
        pos = mine = theirs = 0
        past = GFN_LIMIT + 1
        while i < na or j < nb:
            x = ab[i] if i < na else past
            y = bb[j] if j < nb else past
            nxt = x if x < y else y
            if mine != theirs:
                yield (pos, nxt, mine, theirs)
            if x == nxt:
                mine = av[i]
                i += 1
            if y == nxt:
                theirs = bv[j]
                j += 1
            pos = nxt

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AttrMap):
            return NotImplemented
        return self._b == other._b and self._v == other._v

    def __repr__(self) -> str:
        shown = ", ".join(f"[{s:#x}, {e:#x}): {x:#x}" for s, e, x in islice(self, 4))
        more = ", ..." if len(self) > 4 else ""
        return f"<AttrMap {len(self)} ranges {{{shown}{more}}}>"

    # -- checkpoints -----------------------------------------------------------------------

    def to_list(self) -> list[Segment]:
        """Stored ranges as ``[(start, end, value), ...]``, for checkpoints and snapshots."""
        return list(self)

    @classmethod
    def from_list(cls, items: Iterable[Segment]) -> AttrMap:
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
        result = cls()
        result._b = b
        result._v = v
        return result

    # -- validation (tests only) -----------------------------------------------------------

    def check(self) -> None:
        """Verify the representation invariant; raise AttrMapInvariantError naming ranges.

        Slow and thorough (O(n) Python); tests call it after every operation, the daemon
        never does (STYLE habit 12).
        """
        b, v = self._b, self._v
        problems: list[str] = []
        ranges: list[Segment] = []

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
