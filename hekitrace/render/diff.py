"""Compare two snapshots (docs/snapshot.md): what changed in a guest's protection.

Typical use: save ``hekitrace snapshot web1 -o json > before.json`` after a clean boot,
and after an incident run ``hekitrace snapshot web1 --diff before.json``. Ranges are
compared per map over gfns (an interval sweep over both range lists), so a range split
in two by a later request shows as the pages that changed, not as one removal and two
additions.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

from hekitrace.config.abi import NO_ATTRIBUTE
from hekitrace.errors import UsageError
from hekitrace.render.table import WIDTH, cut, human_size
from hekitrace.state.events import PAGE_SHIFT

#: changed regions listed per map before "... and N more"
MAX_LISTED = 50


def _segments(snap: dict, name: str) -> list[tuple[int, int, str]]:
    """(gfn_start, gfn_end, flags) of map ``name``, only where it holds an attribute."""
    out = []
    for row in snap.get("ranges", ()):
        cell = row.get(name)
        if cell and cell.get("value"):
            out.append((int(row["gfn_start"]), int(row["gfn_end"]), str(cell["flags"])))
    return out


def map_changes(old: list[tuple[int, int, str]], new: list[tuple[int, int, str]]
                ) -> list[tuple[int, int, str, str]]:
    """(gfn_start, gfn_end, old_flags, new_flags) where the two maps differ, coalesced.

    Gaps are ``none`` (no attribute). Both inputs ascending and non-overlapping.
    """
    bounds = sorted({b for s, e, _ in old + new for b in (s, e)})
    if not bounds:
        return []

    def sweep(segs: list[tuple[int, int, str]]) -> Iterator[str]:
        i = 0
        for lo in bounds[:-1]:
            while i < len(segs) and segs[i][1] <= lo:
                i += 1
            yield segs[i][2] if i < len(segs) and segs[i][0] <= lo else NO_ATTRIBUTE

    out: list[tuple[int, int, str, str]] = []
    for (lo, hi), a, b in zip(itertools.pairwise(bounds), sweep(old), sweep(new)):
        if a == b:
            continue
        if out and out[-1][1] == lo and out[-1][2:] == (a, b):
            out[-1] = (out[-1][0], hi, a, b)
        else:
            out.append((lo, hi, a, b))
    return out


def diff(old: dict, new: dict) -> dict[str, Any]:
    """A structured diff of two snapshot dicts (old = the saved one)."""
    for label, snap in (("saved", old), ("current", new)):
        if not isinstance(snap, dict) or "vm" not in snap or "ranges" not in snap:
            raise UsageError(f"--diff: the {label} document is not a snapshot "
                             "(expected the output of 'hekitrace snapshot VM -o json')")
    maps = [m for m in new.get("maps", ()) if m in old.get("maps", ())]
    changes = {m: map_changes(_segments(old, m), _segments(new, m)) for m in maps}
    old_bits = {b for cr in old["vm"]["pinned_cr"].values() for b in cr["bits"]}
    new_bits = {b for cr in new["vm"]["pinned_cr"].values() for b in cr["bits"]}
    seen = {(f.get("rule"), f.get("time_ns")) for f in old.get("findings", ())}
    return {
        "maps": maps,
        "ranges": {m: [{"gfn_start": s, "gfn_end": e, "gpa_start": s << PAGE_SHIFT,
                        "gpa_end": e << PAGE_SHIFT, "old": a, "new": b} for s, e, a, b in c]
                   for m, c in changes.items()},
        "pins_added": sorted(new_bits - old_bits),
        "pins_removed": sorted(old_bits - new_bits),
        "new_findings": [f for f in new.get("findings", ())
                         if (f.get("rule"), f.get("time_ns")) not in seen],
        "findings_count": [old["vm"].get("findings", 0), new["vm"].get("findings", 0)],
        "same_vm": (old["vm"].get("uuid"), old["vm"].get("created_ns"))
                   == (new["vm"].get("uuid"), new["vm"].get("created_ns")),
    }


def render_diff(old: dict, new: dict) -> str:
    """The ``--diff`` text, within 80 columns."""
    d = diff(old, new)
    out = [cut(f"VM {new['vm']['name']}: saved {old['vm']['name']} snapshot vs now", WIDTH)]
    if not d["same_vm"]:
        out.append("note: the saved snapshot is of another VM instance (uuid or creation "
                   "time differ)")
    for name in d["maps"]:
        rows = d["ranges"][name]
        pages = sum(r["gfn_end"] - r["gfn_start"] for r in rows)
        out += ["", f"{name.upper()} MAP: {len(rows)} region(s) changed, "
                    f"{human_size(pages * 4096)}" if rows else f"{name.upper()} MAP: unchanged"]
        for r in rows[:MAX_LISTED]:
            out.append(cut(f"  {r['gpa_start']:#014x}-{r['gpa_end']:#014x} "
                           f"{human_size(r['gpa_end'] - r['gpa_start']):>10}  "
                           f"{r['old']:<7} -> {r['new']}", WIDTH))
        if len(rows) > MAX_LISTED:
            out.append(f"  ... and {len(rows) - MAX_LISTED} more (use -o json)")
    out.append("")
    if d["pins_added"] or d["pins_removed"]:
        out.append(cut("PINNED CR BITS: " + " ".join(
            [f"+{b}" for b in d["pins_added"]] + [f"-{b}" for b in d["pins_removed"]]), WIDTH))
    else:
        out.append("PINNED CR BITS: unchanged")
    before, after = d["findings_count"]
    out.append(f"FINDINGS: {before} -> {after}")
    for f in d["new_findings"]:
        out.append(cut(f"  + {str(f.get('time', ''))[11:23]}  {f.get('severity', '')}  "
                       f"{f.get('rule', '')}: {f.get('message', '')}", WIDTH))
    return "\n".join(out) + "\n"
