"""Benchmark AttrMap against portion.IntervalDict and intervaltree.IntervalTree.

Run: ``.venv/bin/python bench/bench_attrmap.py`` (``--help`` for sizes). Prints a markdown
table for BENCHMARKS.md ("## AttrMap").

Workload (one seeded sequence, shared by every library in the same run):

- build: a map of ``--ranges`` stored ranges (lengths 1-24 pages, half of them adjacent to
  the previous one, the rest after a 1-12 page gap; 8 distinct values shaped like Heki KVM
  bits, adjacent values always differ);
- update: random masked range updates ``new = (old & ~mask) | (attrs & mask)`` (start
  uniform over the populated span; 80% 1-16 pages, 18% 16-128 pages, 2% 128-2048 pages;
  masks: Heki R/W/X/IMMUTABLE nibble, single bits, or all bits; 15% clear bits). These
  proportions keep the map near its initial size (100k ranges stay 95k-105k over 200k
  updates), so every update really runs against a map of about ``--ranges`` ranges;
- point query: value of a random gfn (0 if unset);
- iterate: every stored range in ascending order as ``(start, end, value)``.

The baselines have no masked update, so each is given the cheapest emulation its API
allows:

- IntervalDict: ``d[closedopen(s, e)]`` (the overlapping pieces), then one assignment per
  piece with its combined value, plus one for the uncovered part when the update sets bits.
  IntervalDict keeps one (non-atomic) Interval per distinct value and merges equal values,
  so it is always coalesced, like AttrMap. Built with ``_from_items`` (one Interval per
  value) because 100k ``__setitem__`` calls would take hours.
- IntervalTree: ``overlap(s, e)``, ``chop(s, e)``, then ``addi`` for each clipped piece with
  its combined value and for each gap. It does NOT coalesce (that is a global
  ``merge_equals``), which makes its updates cheaper than an equivalent coalesced map; its
  iteration is unordered, so the benchmark sorts it. Built with ``from_tuples``.

Slow baselines run only a prefix of the update/query sequence (sized by a time budget);
AttrMap is timed on the same prefix, from the same built map, for each ratio, interleaved
with the baseline; every timing is the best of ``--repeat`` runs (the build host is shared
and noisy). After each
prefix the three maps' contents are compared (after coalescing the IntervalTree), so the
three did the same work. Memory per stored range is tracemalloc's count of bytes still
allocated after building the map from a freshly made list and dropping that list.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import platform
import random
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import portion
from intervaltree import IntervalTree

from hekitrace.state.attrmap import ALL_BITS, AttrMap

# KVM attribute bits as Heki v2 stores them (docs/heki-abi.md section 3): PRIVATE 0x8,
# HEKI_READ 0x10, HEKI_WRITE 0x20, HEKI_EXEC 0x40, HEKI_IMMUTABLE 0x80.
VALUES = (0x10, 0x30, 0x50, 0x70, 0x90, 0xD0, 0x18, 0x38)
MASKS = (0xF0, 0xF0, 0x20, 0x40, 0x80, 0x08, ALL_BITS)

Update = tuple[int, int, int, int]


def make_ranges(rng: random.Random, count: int) -> list[tuple[int, int, int]]:
    """``count`` ascending, coalesced (start, end, value) ranges."""
    out: list[tuple[int, int, int]] = []
    pos = 0
    prev = 0
    for _ in range(count):
        adjacent = rng.random() < 0.5
        if not adjacent:
            pos += rng.randint(1, 12)
            prev = 0
        value = rng.choice(VALUES)
        while value == prev:
            value = rng.choice(VALUES)
        end = pos + rng.randint(1, 24)
        out.append((pos, end, value))
        pos, prev = end, value
    return out


def make_updates(rng: random.Random, span: int, count: int) -> list[Update]:
    out: list[Update] = []
    for _ in range(count):
        r = rng.random()
        length = (rng.randint(1, 16) if r < 0.80 else
                  rng.randint(16, 128) if r < 0.98 else rng.randint(128, 2048))
        start = rng.randrange(0, span)
        mask = rng.choice(MASKS)
        attrs = rng.choice(VALUES)
        if rng.random() < 0.15:
            attrs = 0  # clear bits (e.g. module unload back to default)
        out.append((start, start + length, attrs, mask))
    return out


# -- AttrMap -------------------------------------------------------------------------------

def am_build(ranges: list[tuple[int, int, int]]) -> AttrMap:
    return AttrMap.from_list(ranges)


def am_update(m: AttrMap, updates: list[Update]) -> None:
    setter = m.set
    for s, e, a, k in updates:
        setter(s, e, a, k)


def am_query(m: AttrMap, gfns: list[int]) -> int:
    get = m.get
    total = 0
    for g in gfns:
        total ^= get(g)
    return total


def am_iterate(m: AttrMap) -> int:
    return sum(1 for _ in m)


def am_contents(m: AttrMap) -> list[tuple[int, int, int]]:
    return m.to_list()


# -- portion.IntervalDict ------------------------------------------------------------------

def pd_build(ranges: list[tuple[int, int, int]]) -> portion.IntervalDict:
    by_value: dict[int, list[portion.Interval]] = {}
    for s, e, v in ranges:
        by_value.setdefault(v, []).append(portion.closedopen(s, e))
    return portion.IntervalDict._from_items(
        [(portion.Interval(*atoms), v) for v, atoms in by_value.items()])


def pd_update(d: portion.IntervalDict, updates: list[Update]) -> None:
    closedopen = portion.closedopen
    for s, e, a, k in updates:
        key = closedopen(s, e)
        add = a & k
        keep = ~k
        pieces = d[key]
        assigned = []
        for interval, old in list(pieces.items()):
            new = (old & keep) | add
            if new != old:
                assigned.append((interval, new))
        if add:
            gap = key - pieces.domain()
            if not gap.empty:
                assigned.append((gap, add))
        for interval, new in assigned:
            if new:
                d[interval] = new
            else:
                del d[interval]


def pd_query(d: portion.IntervalDict, gfns: list[int]) -> int:
    get = d.get
    total = 0
    for g in gfns:
        total ^= get(g, 0)
    return total


def pd_iterate(d: portion.IntervalDict) -> int:
    return len(pd_contents(d))


def _closedopen_bounds(atom: portion.Interval) -> tuple[int, int]:
    lo = atom.lower if atom.left == portion.CLOSED else atom.lower + 1
    hi = atom.upper if atom.right == portion.OPEN else atom.upper + 1
    return lo, hi


def pd_contents(d: portion.IntervalDict) -> list[tuple[int, int, int]]:
    out = []
    for interval, v in d.items():
        for atom in interval:
            lo, hi = _closedopen_bounds(atom)
            out.append((lo, hi, v))
    out.sort()
    return out


# -- intervaltree.IntervalTree -------------------------------------------------------------

def it_build(ranges: list[tuple[int, int, int]]) -> IntervalTree:
    return IntervalTree.from_tuples(ranges)


def it_update(t: IntervalTree, updates: list[Update]) -> None:
    for s, e, a, k in updates:
        add = a & k
        keep = ~k
        overlapping = sorted(t.overlap(s, e))
        t.chop(s, e)
        pos = s
        for iv in overlapping:
            lo = max(s, iv.begin)
            hi = min(e, iv.end)
            if add and lo > pos:
                t.addi(pos, lo, add)
            new = (iv.data & keep) | add
            if new:
                t.addi(lo, hi, new)
            pos = hi
        if add and pos < e:
            t.addi(pos, e, add)


def it_query(t: IntervalTree, gfns: list[int]) -> int:
    total = 0
    for g in gfns:
        hit = t.at(g)
        if hit:
            total ^= next(iter(hit)).data
    return total


def it_iterate(t: IntervalTree) -> int:
    return sum(1 for _ in sorted(t))


def it_contents(t: IntervalTree) -> list[tuple[int, int, int]]:
    return [(iv.begin, iv.end, iv.data) for iv in sorted(t)]


# -- harness -------------------------------------------------------------------------------

def coalesce(items: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = []
    for s, e, v in items:
        if out and out[-1][1] == s and out[-1][2] == v:
            out[-1] = (out[-1][0], e, v)
        else:
            out.append((s, e, v))
    return out


def timed(fn: Callable[[], object]) -> float:
    gc.collect()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def memory_per_range(build: Callable, rng_seed: int, count: int) -> float:
    """Bytes still allocated per stored range after building from a dropped input list."""
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    ranges = make_ranges(random.Random(rng_seed), count)
    structure = build(ranges)
    del ranges
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    del structure
    return used / count


def fit_prefix(update: Callable, build: Callable, ranges: list, updates: list[Update],
               budget_s: float) -> int:
    """How many updates fit in ``budget_s`` for a library, from a 5-update probe."""
    probe = min(5, len(updates))
    obj = build(ranges)
    t = timed(lambda: update(obj, updates[:probe]))
    return max(probe, min(len(updates), int(budget_s / max(t / probe, 1e-9))))


def load_attrmap(path: str) -> type[AttrMap]:
    """``AttrMap`` from another copy of attrmap.py (say the previous commit's, from
    ``git show HEAD~1:hekitrace/state/attrmap.py > /tmp/old_attrmap.py``), for an A/B in one run."""
    spec = importlib.util.spec_from_file_location("attrmap_against", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--against {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.AttrMap  # type: ignore[no-any-return]


def scaling(seed: int, repeat: int, against: str | None = None) -> int:
    """AttrMap alone at growing sizes: shows the O(n) memmove of a splice taking over.

    With ``against``, another AttrMap (a path to its attrmap.py) runs the same workload,
    interleaved with this one, and gets its own columns."""
    classes: dict[str, type[AttrMap]] = {"": AttrMap}
    if against:
        classes[" (--against)"] = load_attrmap(against)
    head = " | ".join(f"updates/s{tag} | point queries/s{tag} | bytes/range{tag}"
                      for tag in classes)
    print(f"| stored ranges | {head} |")
    print("|---:" * (1 + 3 * len(classes)) + "|")
    for count in (1_000, 10_000, 100_000, 1_000_000):
        rng = random.Random(seed)
        ranges = make_ranges(rng, count)
        span = ranges[-1][1]
        updates = make_updates(rng, span, 100_000)
        gfns = [rng.randrange(0, span) for _ in range(100_000)]
        up = dict.fromkeys(classes, float("inf"))
        q = dict.fromkeys(classes, float("inf"))
        for _ in range(repeat):
            for tag, cls in classes.items():  # interleaved: load hits both alike
                m = cls.from_list(ranges)
                up[tag] = min(up[tag], timed(lambda: am_update(m, updates)))
                q[tag] = min(q[tag], timed(lambda: am_query(m, gfns)))
        cells = " | ".join(
            f"{len(updates) / up[tag]:,.0f} | {len(gfns) / q[tag]:,.0f} | "
            f"{memory_per_range(cls.from_list, seed, count):,.0f}"
            for tag, cls in classes.items())
        print(f"| {count:,} | {cells} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranges", type=int, default=100_000,
                        help="stored ranges in the built map (default: %(default)s)")
    parser.add_argument("--updates", type=int, default=200_000,
                        help="masked updates for AttrMap (default: %(default)s)")
    parser.add_argument("--queries", type=int, default=200_000,
                        help="point queries for AttrMap (default: %(default)s)")
    parser.add_argument("--budget", type=float, default=4.0,
                        help="seconds per slow baseline per operation (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="timings are the best of this many runs (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=20261125, help="(default: %(default)s)")
    parser.add_argument("--scaling", action="store_true",
                        help="only AttrMap: updates/s and queries/s at 1k..1M ranges")
    parser.add_argument("--against", metavar="ATTRMAP_PY",
                        help="with --scaling: also time the AttrMap of this attrmap.py file, "
                        "interleaved (default: none)")
    args = parser.parse_args(argv)
    if args.scaling:
        return scaling(args.seed, args.repeat, args.against)

    rng = random.Random(args.seed)
    ranges = make_ranges(rng, args.ranges)
    span = ranges[-1][1]
    updates = make_updates(rng, span, args.updates)
    gfns = [rng.randrange(0, span) for _ in range(args.queries)]

    libs = {
        "AttrMap": (am_build, am_update, am_query, am_iterate, am_contents),
        "portion.IntervalDict": (pd_build, pd_update, pd_query, pd_iterate, pd_contents),
        "intervaltree.IntervalTree": (it_build, it_update, it_query, it_iterate, it_contents),
    }
    rows: dict[str, dict[str, object]] = {}
    reference_built = am_build(ranges)
    for name, (build, update, query, iterate, contents) in libs.items():
        row: dict[str, object] = {}
        print(f"{name}: building", file=sys.stderr, flush=True)
        row["build_s"] = timed(lambda: build(ranges))
        obj = build(ranges)
        row["stored_ranges"] = len(contents(obj))
        row["iterate_s"] = timed(lambda: iterate(obj))
        nq = len(gfns) if name == "AttrMap" else max(
            100, min(len(gfns), int(args.budget / max(timed(lambda: query(obj, gfns[:100])) / 100,
                                                      1e-9))))
        row["queries"] = nq
        row["query_s"] = row["am_query_s"] = float("inf")
        am = reference_built.copy()
        for _ in range(args.repeat):
            # Interleaved, best of --repeat: load from other processes hits both alike.
            row["query_s"] = min(row["query_s"], timed(lambda: query(obj, gfns[:nq])))
            row["am_query_s"] = min(row["am_query_s"], timed(lambda: am_query(am, gfns[:nq])))
        assert query(obj, gfns[:nq]) == am_query(am, gfns[:nq]), name
        nu = len(updates) if name == "AttrMap" else fit_prefix(update, build, ranges, updates,
                                                               args.budget)
        row["updates"] = nu
        print(f"{name}: {nu} updates", file=sys.stderr, flush=True)
        row["update_s"] = row["am_update_s"] = float("inf")
        for _ in range(args.repeat):
            obj = build(ranges)
            row["update_s"] = min(row["update_s"], timed(lambda: update(obj, updates[:nu])))
            am = reference_built.copy()
            row["am_update_s"] = min(row["am_update_s"],
                                     timed(lambda: am_update(am, updates[:nu])))
        got = coalesce(contents(obj))
        assert got == am.to_list(), f"{name} disagrees with AttrMap after {nu} updates"
        row["ranges_after"] = len(am)
        print(f"{name}: memory", file=sys.stderr, flush=True)
        row["bytes_per_range"] = memory_per_range(build, args.seed, args.ranges)
        rows[name] = row

    am = rows["AttrMap"]
    try:
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        load = "unknown"
    print(f"\nPython {platform.python_version()}, load average {load}, {args.ranges} built ranges "
          f"({am['stored_ranges']} stored), seed {args.seed}; "
          f"{am['ranges_after']} stored ranges after {am['updates']} updates.\n")
    print("| library | updates/s | vs AttrMap (same prefix) | point queries/s "
          "| full iteration | build | bytes/range |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    best_update_ratio = None
    for name, row in rows.items():
        ups = row["updates"] / row["update_s"]
        qps = row["queries"] / row["query_s"]
        if name == "AttrMap":
            ratio = "1x"
        else:
            r = row["update_s"] / row["updates"] / (row["am_update_s"] / row["updates"])
            best_update_ratio = r if best_update_ratio is None else min(best_update_ratio, r)
            qr = row["query_s"] / row["am_query_s"]
            ratio = f"AttrMap {r:,.0f}x faster on {row['updates']:,} updates; {qr:,.1f}x on queries"
        ups_text = f"{ups:,.0f}" if ups >= 10 else f"{ups:.2f}"
        print(f"| {name} | {ups_text} | {ratio} | {qps:,.0f} | "
              f"{row['iterate_s'] * 1e3:,.1f} ms | {row['build_s'] * 1e3:,.0f} ms | "
              f"{row['bytes_per_range']:,.0f} |")
    if best_update_ratio is not None:
        verdict = "meets" if best_update_ratio >= 10 else "MISSES"
        print(f"\nUpdate speedup over the faster baseline: {best_update_ratio:,.1f}x "
              f"({verdict} the 10x target).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
