"""Shared hypothesis strategies and profiles for the whole test suite.

Importing this module registers two hypothesis profiles and loads one:
``ci`` (the default: few examples, so the unit tier stays fast) and ``long`` (for soak runs:
``HYPOTHESIS_PROFILE=long``; ``fuzz`` is the same). Tests import it as
``from tests import strategies``.

AttrMap strategies: the reference model in tests/unit/test_attrmap.py is per page over a
small universe, but the map must also be right at 0 and near 2**52. So an :class:`Universe`
is a sorted set of *points* (gfns, always including 0 and 2**52) drawn from small gfns,
gfns just below 2**52 and a few arbitrary ones; every range an operation uses starts and
ends on a point. Between two consecutive points (a *cell*) every page therefore always has
the same value, and a per-cell dict is an exact per-page model: cells of adjacent points
are single pages, and the few wide cells (the middle of the gfn space) weigh their page
count.
"""

from __future__ import annotations

import os
from typing import NamedTuple

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from hekitrace.state.attrmap import ALL_BITS, DEFAULT_BLOCK_SIZE, GFN_LIMIT

settings.register_profile("ci", max_examples=150, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=5000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
# `make fuzz` sets HYPOTHESIS_PROFILE=fuzz for tests/fuzz (which sizes its own budgets);
# any other test run under it gets the long profile's examples.
settings.register_profile("fuzz", parent=settings.get_profile("long"))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# How far from each end of the gfn space the dense, one-page-per-cell points go.
EDGE = 24


class Universe(NamedTuple):
    """Sorted distinct gfn ``points``, first 0, last GFN_LIMIT; cell i is
    [points[i], points[i+1])."""

    points: tuple[int, ...]

    @property
    def cells(self) -> int:
        return len(self.points) - 1


class SetOp(NamedTuple):
    """``AttrMap.set(points[lo], points[hi], attrs, mask)`` in cell coordinates (lo < hi)."""

    lo: int
    hi: int
    attrs: int
    mask: int


@st.composite
def universes(draw: st.DrawFn) -> Universe:
    """Points near 0, near 2**52 and anywhere, always with 0 and 2**52."""
    low = draw(st.sets(st.integers(0, EDGE), max_size=10))
    high = draw(st.sets(st.integers(GFN_LIMIT - EDGE, GFN_LIMIT), max_size=6))
    mid = draw(st.sets(st.integers(0, GFN_LIMIT), max_size=3))
    return Universe(tuple(sorted(low | high | mid | {0, GFN_LIMIT})))


# Few distinct values so that ranges collide and coalesce often; a high bit so that
# values past 32 bits are exercised; masks mostly "all bits" (plain set) or nibbles
# (the Heki permission bits live in 0xF0, PRIVATE is 0x8).
attr_values = st.one_of(st.integers(0, 15), st.sampled_from([0x10, 0xF0, 1 << 63, ALL_BITS]))
masks = st.one_of(st.just(ALL_BITS), st.sampled_from([0, 0x1, 0x6, 0xF, 0xF0, 1 << 63]),
                  st.integers(0, 15))


def set_ops(universe: Universe) -> st.SearchStrategy[SetOp]:
    """One masked set over a range of cells of ``universe``."""
    n = universe.cells
    return st.tuples(st.integers(0, n - 1), st.integers(1, n), attr_values, masks).map(
        lambda t: SetOp(min(t[0], t[1] - 1), max(t[0] + 1, t[1]), t[2], t[3]))


@st.composite
def universe_and_ops(draw: st.DrawFn, max_ops: int = 25) -> tuple[Universe, list[SetOp]]:
    """A universe and a sequence of masked sets on it."""
    universe = draw(universes())
    ops = draw(st.lists(set_ops(universe), max_size=max_ops))
    return universe, ops


def cell_ranges(universe: Universe) -> st.SearchStrategy[tuple[int, int]]:
    """A non-empty range of cells ``(lo, hi)`` for queries."""
    n = universe.cells
    return st.tuples(st.integers(0, n - 1), st.integers(1, n)).map(
        lambda t: (min(t[0], t[1] - 1), max(t[0] + 1, t[1])))


# AttrMap storage block sizes: tiny ones put block boundaries (splits, merges, updates
# spanning blocks) inside the small universes; the default is what the daemon runs.
block_sizes = st.sampled_from([2, 3, 8, DEFAULT_BLOCK_SIZE])
