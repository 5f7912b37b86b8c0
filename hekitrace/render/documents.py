"""Plain-dict views of one guest: the ``vms`` row and the ``snapshot`` document.

The control socket, ``snapshot --from`` (journal) and ``replay -o json`` all return
these, and the table/SVG renderers read them, so the shape is a contract documented in
docs/snapshot.md: add keys, never rename or remove them. Everything here is JSON/YAML
ready (ints, strings, bools, lists, dicts, None); addresses are ints (renderers choose
hex), attribute values come with their flags (``r-x I``) and bounded class names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hekitrace.config.abi import AbiProfile, cr_bit_names
from hekitrace.policy.findings import Finding, format_time
from hekitrace.state.events import PAGE_SHIFT, PAGE_SIZE
from hekitrace.state.host import Guest

#: the maps a snapshot can show, in display order
MAP_NAMES = ("requested", "applied")
#: findings included in a snapshot by default (newest last)
SNAPSHOT_FINDINGS = 50
SCHEMA_VERSION = 1


def _memory_by_class(guest_map: Any, abi: AbiProfile) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for value, pages in sorted(guest_map.pages_by_value().items()):
        if value == 0:
            continue
        cls = abi.attr_class(value)
        slot = out.setdefault(cls, {"pages": 0, "bytes": 0})
        slot["pages"] += pages
        slot["bytes"] += pages * PAGE_SIZE
    return out


def vm_summary(guest: Guest, abi: AbiProfile, findings_count: int = 0) -> dict:
    """One row of ``vms``: identity, lifecycle, lockdown, pins, memory per class, health."""
    pinned = {}
    for cr, mask in sorted(guest.pinned_cr.items()):
        pinned[f"cr{cr}"] = {"mask": mask, "bits": cr_bit_names(cr, mask)}
    slots_bytes = sum(m.size_bytes for m in guest.memslots.values())
    return {
        "schema": SCHEMA_VERSION,
        "name": guest.name or f"pid-{guest.pid}",
        "uuid": guest.uuid,
        "pid": guest.pid,
        "vmm": guest.vmm,
        "created_ns": guest.created_ns,
        "created": format_time(guest.created_ns),
        "destroyed_ns": guest.destroyed_ns,
        "state": "running" if guest.destroyed_ns is None else "destroyed",
        "preexisting": guest.preexisting,
        "degraded": guest.degraded,
        "degraded_reasons": list(guest.degraded_reasons),
        "locked_down": guest.lockdown_ns is not None,
        "lockdown_ns": guest.lockdown_ns,
        "lockdown": format_time(guest.lockdown_ns) if guest.lockdown_ns is not None else None,
        "pinned_cr": pinned,
        "memory": {"requested": _memory_by_class(guest.requested, abi),
                   "applied": _memory_by_class(guest.applied, abi)},
        "ranges_stored": {"requested": len(guest.requested), "applied": len(guest.applied)},
        "memslots": len(guest.memslots),
        "guest_memory_bytes": slots_bytes,
        "counters": dict(guest.counters),
        "findings": int(findings_count),
    }


def merged_ranges(maps: dict[str, Any], abi: AbiProfile,
                  limit: int | None = None) -> tuple[list[dict], bool]:
    """Gfn ranges where any of ``maps`` holds an attribute, split where any value changes.

    Returns (rows, truncated). Each row: ``gfn_start``, ``gfn_end``, ``gpa_start``,
    ``gpa_end``, ``pages``, ``size_bytes``, one ``{value, flags, class}`` per map, and
    ``differs`` (True when two maps disagree on the range).
    """
    names = list(maps)
    stored = [list(m) for m in maps.values()]
    if not any(stored):
        return [], False
    lo = min(segs[0][0] for segs in stored if segs)
    hi = max(segs[-1][1] for segs in stored if segs)
    lists = [list(m.segments(lo, hi)) for m in maps.values()]
    idx = [0] * len(lists)
    rows: list[dict] = []
    pos = lo
    pending: list[Any] | None = None   # [start, end, values]
    truncated = False
    while pos < hi:
        stop = min(lists[k][idx[k]][1] for k in range(len(lists)))
        values = tuple(lists[k][idx[k]][2] for k in range(len(lists)))
        for k in range(len(lists)):
            if lists[k][idx[k]][1] == stop:
                idx[k] += 1
        if any(values):
            if pending is not None and pending[1] == pos and pending[2] == values:
                pending[1] = stop
            else:
                if pending is not None:
                    rows.append(_row(pending, names, abi))
                    if limit is not None and len(rows) >= limit:
                        return rows, True
                pending = [pos, stop, values]
        pos = stop
    if pending is not None:
        rows.append(_row(pending, names, abi))
    return rows, truncated


def _row(item: list[Any], names: Sequence[str], abi: AbiProfile) -> dict:
    start, end, values = item
    row: dict[str, Any] = {"gfn_start": start, "gfn_end": end,
                           "gpa_start": start << PAGE_SHIFT, "gpa_end": end << PAGE_SHIFT,
                           "pages": end - start, "size_bytes": (end - start) << PAGE_SHIFT}
    for name, value in zip(names, values):
        row[name] = {"value": value, "flags": abi.attr_flags(value),
                     "class": abi.attr_class(value)}
    row["differs"] = len(set(values)) > 1
    return row


def vm_snapshot(guest: Guest, abi: AbiProfile, findings: Sequence[Finding | dict] = (),
                maps: Sequence[str] = MAP_NAMES, *, max_ranges: int | None = None,
                max_findings: int = SNAPSHOT_FINDINGS,
                applied_unobserved: str | None = None) -> dict:
    """One guest's full picture: summary, merged ranges of ``maps``, memslots, findings.

    ``findings`` are this VM's findings, oldest first; the newest ``max_findings`` are
    included. ``applied_unobserved`` is why the host's applied map cannot be seen (no
    attribute hook), or None: then no range counts as differing, since an empty applied
    map says nothing about what the host enforces. Unknown map names raise ValueError
    (the control socket turns that into ``bad_request``).
    """
    for name in maps:
        if name not in MAP_NAMES:
            raise ValueError(f"unknown map {name!r}: expected one of {', '.join(MAP_NAMES)}")
    selected = {name: getattr(guest, name) for name in maps}
    rows, truncated = merged_ranges(selected, abi, max_ranges)
    if applied_unobserved and "applied" in maps:
        for row in rows:
            row["differs"] = False
    recent = list(findings)[-max_findings:] if max_findings else []
    return {
        "schema": SCHEMA_VERSION,
        "vm": vm_summary(guest, abi, len(findings)),
        "maps": list(maps),
        "ranges": rows,
        "ranges_truncated": truncated,
        "differing_ranges": sum(1 for r in rows if r["differs"]),
        "applied_unobserved": applied_unobserved,
        "memslots": [{"slot": slot, "gpa": m.gpa, "size_bytes": m.size_bytes, "hva": m.hva,
                      "flags": m.flags} for slot, m in sorted(guest.memslots.items())],
        "findings": [f.to_dict() if isinstance(f, Finding) else dict(f) for f in recent],
    }
