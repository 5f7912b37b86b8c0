"""AttrMap against a naive per-page model, plus worked examples.

The property tests run random sequences of masked sets on an AttrMap and on
:class:`CellModel` (a dict per cell of a :class:`strategies.Universe`, which is exact per
page because every range starts and ends on a cell boundary), and require identical answers
from every query, ``check()`` after every operation, and the canonical coalesced form.
"""

from __future__ import annotations

from bisect import bisect_right

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hekitrace.state.attrmap import ALL_BITS, GFN_LIMIT, AttrMap, AttrMapInvariantError
from tests import strategies
from tests.strategies import SetOp, Universe


class CellModel:
    """Per-cell values of a universe; the obviously-correct reference for AttrMap."""

    def __init__(self, universe: Universe) -> None:
        self.points = universe.points
        self.values = [0] * universe.cells

    def set(self, op: SetOp) -> list[tuple[int, int, int, int]]:
        """Apply ``op``; return changed cells merged into runs of equal (old, new)."""
        changes: list[tuple[int, int, int, int]] = []
        for c in range(op.lo, op.hi):
            old = self.values[c]
            new = (old & ~op.mask) | (op.attrs & op.mask)
            self.values[c] = new
            if new == old:
                continue
            s, e = self.points[c], self.points[c + 1]
            if changes and changes[-1][1] == s and changes[-1][2:] == (old, new):
                changes[-1] = (changes[-1][0], e, old, new)
            else:
                changes.append((s, e, old, new))
        return changes

    def get(self, gfn: int) -> int:
        return self.values[bisect_right(self.points, gfn) - 1]

    def segments(self, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """Coalesced (s, e, value) over cells [lo, hi), zeros included."""
        out: list[tuple[int, int, int]] = []
        for c in range(lo, hi):
            s, e, x = self.points[c], self.points[c + 1], self.values[c]
            if out and out[-1][2] == x:
                out[-1] = (out[-1][0], e, x)
            else:
                out.append((s, e, x))
        return out

    def stored(self) -> list[tuple[int, int, int]]:
        return [seg for seg in self.segments(0, len(self.values)) if seg[2]]

    def pages_by_value(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for c, x in enumerate(self.values):
            if x:
                counts[x] = counts.get(x, 0) + self.points[c + 1] - self.points[c]
        return counts


def run(universe: Universe, ops: list[SetOp], block_size: int = 512
        ) -> tuple[AttrMap, CellModel]:
    m, model = AttrMap(block_size=block_size), CellModel(universe)
    for op in ops:
        m.set(universe.points[op.lo], universe.points[op.hi], op.attrs, op.mask)
        model.set(op)
    return m, model


def assert_same(m: AttrMap, model: CellModel) -> None:
    m.check()
    assert m.to_list() == model.stored()
    assert list(m) == model.stored()
    assert len(m) == len(model.stored())
    assert bool(m) == bool(model.stored())
    for c in range(len(model.values)):
        first, last = model.points[c], model.points[c + 1] - 1
        assert m.get(first) == model.values[c]
        assert m.get(last) == model.values[c]


# -- properties ------------------------------------------------------------------------------

@given(strategies.universe_and_ops(max_ops=40), strategies.block_sizes)
def test_set_sequence_matches_model(case: tuple[Universe, list[SetOp]], block_size: int
                                    ) -> None:
    universe, ops = case
    m, model = AttrMap(block_size=block_size), CellModel(universe)
    for op in ops:
        got = m.set(universe.points[op.lo], universe.points[op.hi], op.attrs, op.mask)
        assert got == model.set(op), op
        assert_same(m, model)
    assert m.pages_by_value() == model.pages_by_value()


@given(st.data())
def test_queries_match_model(data: st.DataObject) -> None:
    universe, ops = data.draw(strategies.universe_and_ops())
    m, model = run(universe, ops, data.draw(strategies.block_sizes))
    pts = universe.points
    for lo, hi in data.draw(st.lists(strategies.cell_ranges(universe), min_size=1, max_size=8)):
        s, e = pts[lo], pts[hi]
        cells = model.values[lo:hi]
        assert m.values_in(s, e) == set(cells)
        assert list(m.segments(s, e)) == model.segments(lo, hi)
        for value in {cells[0], cells[-1], 0, 5}:
            assert m.all_equal(s, e, value) == all(x == value for x in cells)
        for bits in (0, 1, 2, 4, 8, 0xF0, 1 << 63, ALL_BITS):
            assert m.any_bits(s, e, bits) == any(x & bits for x in cells)


@given(st.data())
def test_diff_matches_model(data: st.DataObject) -> None:
    universe = data.draw(strategies.universes())
    ops_a = data.draw(st.lists(strategies.set_ops(universe), max_size=15))
    ops_b = data.draw(st.lists(strategies.set_ops(universe), max_size=15))
    a, model_a = run(universe, ops_a, data.draw(strategies.block_sizes))
    b, model_b = run(universe, ops_b, data.draw(strategies.block_sizes))
    expected: list[tuple[int, int, int, int]] = []
    for c, (x, y) in enumerate(zip(model_a.values, model_b.values)):
        if x == y:
            continue
        s, e = universe.points[c], universe.points[c + 1]
        if expected and expected[-1][1] == s and expected[-1][2:] == (x, y):
            expected[-1] = (expected[-1][0], e, x, y)
        else:
            expected.append((s, e, x, y))
    assert list(a.diff(b)) == expected
    assert list(b.diff(a)) == [(s, e, y, x) for s, e, x, y in expected]
    assert (a == b) == (not expected)
    assert list(a.diff(a.copy())) == []


@given(strategies.universe_and_ops(), strategies.block_sizes, strategies.block_sizes)
def test_copy_and_checkpoint_round_trip(case: tuple[Universe, list[SetOp]], block_size: int,
                                        other_block_size: int) -> None:
    universe, ops = case
    m, model = run(universe, ops, block_size)
    twin = m.copy()
    twin.check()
    assert twin == m
    loaded = AttrMap.from_list(m.to_list(), block_size=other_block_size)
    loaded.check()
    assert loaded == m  # equal content, whatever the blocks
    # Uncoalesced input with zeros (one triple per cell) gives the same canonical map.
    cells = [(universe.points[c], universe.points[c + 1], x) for c, x in enumerate(model.values)]
    rebuilt = AttrMap.from_list(cells)
    rebuilt.check()
    assert rebuilt == m
    # The copy is independent.
    twin.set(0, GFN_LIMIT, 0x5A)
    twin.check()
    assert m.to_list() == model.stored()


# -- examples --------------------------------------------------------------------------------

def test_set_adjacent_equal_ranges_coalesce() -> None:
    m = AttrMap()
    assert m.set(10, 20, 0x30) == [(10, 20, 0, 0x30)]
    assert m.set(20, 30, 0x30) == [(20, 30, 0, 0x30)]
    assert m.set(5, 10, 0x30) == [(5, 10, 0, 0x30)]
    m.check()
    assert m.to_list() == [(5, 30, 0x30)]
    assert len(m) == 1


def test_set_adjacent_different_ranges_stay_apart() -> None:
    m = AttrMap()
    m.set(10, 20, 0x50)
    m.set(20, 30, 0x30)
    m.check()
    assert m.to_list() == [(10, 20, 0x50), (20, 30, 0x30)]
    assert m.values_in(10, 30) == {0x50, 0x30}
    assert m.values_in(9, 30) == {0, 0x50, 0x30}


def test_set_overlapping_masked_returns_one_segment_per_old_value() -> None:
    m = AttrMap()
    m.set(10, 20, 0x10)
    m.set(20, 30, 0x30)
    # Add EXEC (0x40) over [15, 35): three old values (0x10, 0x30, then a 0-gap).
    got = m.set(15, 35, 0x40, mask=0x40)
    assert got == [(15, 20, 0x10, 0x50), (20, 30, 0x30, 0x70), (30, 35, 0, 0x40)]
    m.check()
    assert m.to_list() == [(10, 15, 0x10), (15, 20, 0x50), (20, 30, 0x70), (30, 35, 0x40)]


def test_set_nested_splits_then_remerges() -> None:
    m = AttrMap()
    m.set(0, 100, 0x70)
    assert m.set(40, 60, 0x50) == [(40, 60, 0x70, 0x50)]
    assert m.to_list() == [(0, 40, 0x70), (40, 60, 0x50), (60, 100, 0x70)]
    assert m.set(40, 60, 0x70) == [(40, 60, 0x50, 0x70)]
    m.check()
    assert m.to_list() == [(0, 100, 0x70)]


def test_set_returns_empty_and_keeps_map_when_nothing_changes() -> None:
    m = AttrMap()
    m.set(0, 10, 0x70)
    m.set(10, 20, 0x50)
    before = m.copy()
    assert m.set(2, 5, 0x70) == []                       # inside one range
    assert m.set(0, 20, 0x10, mask=0x10) == []           # bit already set everywhere
    assert m.set(0, 20, 0x80, mask=0) == []              # empty mask
    assert m.set(100, 200, 0) == []                      # clearing a gap
    assert m.set(0, 20, 0, mask=0x80) == []              # clearing a bit nobody has
    assert m == before


def test_set_zero_clears_and_drops_ranges() -> None:
    m = AttrMap()
    m.set(0, 10, 0x70)
    m.set(20, 30, 0x50)
    assert m.set(0, 30, 0) == [(0, 10, 0x70, 0), (20, 30, 0x50, 0)]
    m.check()
    assert len(m) == 0 and not m and m == AttrMap()


def test_whole_gfn_space_and_its_edges() -> None:
    m = AttrMap()
    assert m.set(0, GFN_LIMIT, 0xF0) == [(0, GFN_LIMIT, 0, 0xF0)]
    assert m.pages_by_value() == {0xF0: GFN_LIMIT}
    assert m.get(0) == m.get(GFN_LIMIT - 1) == 0xF0
    assert m.set(GFN_LIMIT - 1, GFN_LIMIT, 0x10) == [(GFN_LIMIT - 1, GFN_LIMIT, 0xF0, 0x10)]
    assert m.set(0, 1, 0, mask=ALL_BITS) == [(0, 1, 0xF0, 0)]
    m.check()
    assert m.to_list() == [(1, GFN_LIMIT - 1, 0xF0), (GFN_LIMIT - 1, GFN_LIMIT, 0x10)]
    assert m.pages_by_value() == {0xF0: GFN_LIMIT - 2, 0x10: 1}
    assert list(m.segments(0, GFN_LIMIT)) == [
        (0, 1, 0), (1, GFN_LIMIT - 1, 0xF0), (GFN_LIMIT - 1, GFN_LIMIT, 0x10)]
    assert m.all_equal(1, GFN_LIMIT - 1, 0xF0)
    assert not m.all_equal(1, GFN_LIMIT, 0xF0)


def test_high_attribute_bits_kept_exactly() -> None:
    m = AttrMap()
    m.set(5, 6, ALL_BITS)
    m.set(5, 6, 0, mask=1 << 63)
    assert m.get(5) == ALL_BITS >> 1
    assert m.any_bits(0, 10, 1 << 62) and not m.any_bits(0, 10, 1 << 63)


@pytest.mark.parametrize("start, end", [
    (5, 5), (6, 5), (-1, 3), (0, GFN_LIMIT + 1), (GFN_LIMIT, GFN_LIMIT + 1)])
def test_set_rejects_bad_ranges_without_touching_the_map(start: int, end: int) -> None:
    m = AttrMap()
    m.set(1, 4, 0x10)
    with pytest.raises(ValueError, match=r"\[.*\)"):
        m.set(start, end, 0x20)
    assert m.to_list() == [(1, 4, 0x10)]


@pytest.mark.parametrize("args, error", [
    ((1.0, 4, 1), TypeError), ((1, 4, 1.5), TypeError), ((1, 4, -1), ValueError),
    ((1, 4, 1 << 64), ValueError), ((1, 4, 1, -1), ValueError), ((1, 4, 1, "x"), TypeError)])
def test_set_rejects_bad_types_and_values(args: tuple, error: type) -> None:
    m = AttrMap()
    with pytest.raises(error):
        m.set(*args)
    assert not m


def test_queries_reject_out_of_range_gfns() -> None:
    m = AttrMap()
    with pytest.raises(ValueError, match="outside the gfn space"):
        m.get(GFN_LIMIT)
    with pytest.raises(ValueError, match="outside the gfn space"):
        m.get(-1)
    with pytest.raises(ValueError, match="empty or reversed"):
        m.values_in(3, 3)
    with pytest.raises(ValueError):
        m.segments(0, GFN_LIMIT + 1)


def test_from_list_rejects_corrupt_checkpoints() -> None:
    with pytest.raises(ValueError, match="item 1: .* overlaps"):
        AttrMap.from_list([(0, 10, 1), (5, 20, 2)])
    with pytest.raises(ValueError, match="item 0: .*empty or reversed"):
        AttrMap.from_list([(10, 10, 1)])
    with pytest.raises(ValueError, match="item 0: expected"):
        AttrMap.from_list([(1, 2)])
    with pytest.raises(ValueError, match="item 0: value"):
        AttrMap.from_list([(1, 2, -3)])
    with pytest.raises(TypeError):
        AttrMap.from_list([("1", 2, 3)])


def test_check_names_the_offending_ranges() -> None:
    m = AttrMap()
    m.set(10, 20, 0x10)
    m.set(30, 40, 0x20)
    m.check()
    m._bb[0][2] = 20  # corrupt: [20, 20) is empty, and 0x10 continues into 0 at 20
    with pytest.raises(AttrMapInvariantError) as info:
        m.check()
    assert "breakpoint 1" in str(info.value)
    assert (20, 20, 0) in info.value.ranges
    m = AttrMap()
    m.set(10, 20, 0x10)
    m._bv[0][1] = 0x10  # corrupt: value runs to infinity and equals its neighbour
    with pytest.raises(AttrMapInvariantError, match="last value is not 0") as info:
        m.check()
    assert "not coalesced" in str(info.value)
    assert isinstance(info.value, AssertionError)


def test_clear_copy_eq_and_repr() -> None:
    m = AttrMap()
    m.set(0x1000, 0x1200, 0x50)
    c = m.copy()
    m.clear()
    assert not m and c.to_list() == [(0x1000, 0x1200, 0x50)]
    assert m != c and m == AttrMap()
    assert "[0x1000, 0x1200): 0x50" in repr(c)
    assert (m == 3) is False


def test_check_names_broken_blocks() -> None:
    m = AttrMap(block_size=2)
    for gfn in range(0, 40, 2):
        m.set(gfn, gfn + 1, 0x10)
    m.check()
    assert len(m._bb) > 1
    m._mins[1] += 1
    with pytest.raises(AttrMapInvariantError, match="block 1: minimum"):
        m.check()


def test_many_blocks_split_merge_and_span() -> None:
    """Thousands of single-page ranges, then updates across many blocks, then clearing."""
    m = AttrMap(block_size=16)
    for gfn in range(0, 20000, 2):
        m.set(gfn, gfn + 1, 0x10 if gfn % 4 else 0x30)
    m.check()
    assert len(m) == 10000 and len(m._bb) > 100
    assert m.set(1001, 1004, 0x40, mask=0x40) == [
        (1001, 1002, 0, 0x40), (1002, 1003, 0x10, 0x50), (1003, 1004, 0, 0x40)]
    changed = m.set(5000, 15000, 0x70)
    m.check()
    assert changed[0] == (5000, 5001, 0x30, 0x70) and changed[-1] == (14999, 15000, 0, 0x70)
    assert len(changed) == 10000
    assert m.all_equal(5000, 15000, 0x70) and m.get(15000) == 0x30
    assert m.values_in(4999, 15001) == {0, 0x30, 0x70}
    assert m.set(0, 20000, 0) and not m and m._bb == []
    m.check()


def test_blocks_that_shrink_are_merged_into_a_neighbour() -> None:
    m = AttrMap(block_size=12)  # blocks of 12, split past 24, merged below 3 breakpoints
    one_block = AttrMap(block_size=1000)
    for gfn in range(0, 128, 2):
        m.set(gfn, gfn + 1, 0x10 if gfn % 4 else 0x30)
        one_block.set(gfn, gfn + 1, 0x10 if gfn % 4 else 0x30)
    blocks = len(m._bb)
    assert blocks > 4
    # Make the middle of a block uniform: most of its breakpoints coalesce away.
    inner = list(m._bb[2])
    changed = m.set(inner[0] + 1, inner[-1], 0x30)
    assert changed == one_block.set(inner[0] + 1, inner[-1], 0x30)
    m.check()
    assert len(m._bb) == blocks - 1
    assert m == one_block and m.to_list() == one_block.to_list()
