"""The frames of ``hekitrace top``: per-VM activity between two samples of the daemon.

A sample is the daemon's ``vms`` rows (each with its event counters by kind and its
findings count) and its ``status`` document. A frame is what changed between two
samples, as totals and rates per second, sorted and filtered, so the same frame can be
drawn full-screen or printed once as a table or JSON. Pure: tested without a daemon.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

from hekitrace.render.table import Column, Table, cut

#: column key -> (heading, the vms-row counter it counts; None: computed)
COLUMNS = {
    "hc": ("HC/s", "hypercall"),
    "prot": ("PROT/s", "protect_request"),
    "appl": ("APPL/s", "attr_applied"),
    "fault": ("FLT/s", "fault"),
    "cr": ("CR/s", "cr_write"),
    "find": ("FIND", None),
    "lost": ("LOST", "lost_events"),
}
#: what --sort accepts: every counted column, and the VM's name
SORT_KEYS = ("name", *COLUMNS)


def _count(row: dict, key: str) -> int:
    if key == "find":
        return int(row.get("findings", 0))
    counter = COLUMNS[key][1]
    return int((row.get("counters") or {}).get(counter or "", 0))


def frame(before: Sequence[dict], after: Sequence[dict], seconds: float, status: dict,
          *, sort: str = "hc", vm: str | None = None) -> dict:
    """The frame between two samples ``seconds`` apart (rows: ``vms`` rows).

    A VM absent from ``before`` (new since) counts from zero; ``vm`` filters by name,
    pid or glob on the name.
    """
    old = {(r["pid"], r["created_ns"]): r for r in before}
    rows: list[dict[str, Any]] = []
    for row in after:
        if vm is not None and not (fnmatch.fnmatchcase(row.get("name") or "", vm)
                                   or str(row.get("pid")) == vm):
            continue
        prev = old.get((row["pid"], row["created_ns"]), {})
        totals = {key: _count(row, key) for key in COLUMNS}
        rates = {key: (round(max(0, totals[key] - (_count(prev, key) if prev else 0))
                             / seconds, 2) if seconds > 0 else 0.0) for key in COLUMNS}
        rows.append({"name": row.get("name"), "pid": row.get("pid"), "uuid": row.get("uuid"),
                     "state": row.get("state"), "degraded": bool(row.get("degraded")),
                     "locked_down": bool(row.get("locked_down")), "totals": totals,
                     "rates": rates})
    if sort == "name":
        rows.sort(key=lambda e: (e["name"] or "", e["pid"] or 0))
    else:
        rate_sorted = sort not in ("find", "lost")
        rows.sort(key=lambda e: (-(e["rates"] if rate_sorted else e["totals"])[sort],
                                 e["name"] or ""))
    lost = status.get("events_lost_total") or []
    return {"interval_seconds": round(seconds, 3), "sort": sort, "vms": rows,
            "ready": bool(status.get("ready")), "vms_running": status.get("vms", len(rows)),
            "events_total": sum((status.get("events_total") or {}).values()),
            "events_lost_total": sum(x["count"] for x in lost),
            "queue_depth_events": status.get("queue_depth_events", 0)}


def _rate(value: float) -> str:
    if value >= 10_000:
        return f"{value / 1000:.0f}k"
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if value else "0"


def render_frame(doc: dict, width: int = 80, height: int | None = None) -> list[str]:
    """Lines of one frame within ``width`` columns (and ``height`` lines, if given)."""
    head = (f"hekitrace top - {doc['vms_running']} VMs, {doc['events_total']} events, "
            f"{doc['events_lost_total']} lost, queue {doc['queue_depth_events']}"
            f"{'' if doc['ready'] else ', NOT READY'}; every {doc['interval_seconds']} s, "
            f"sorted by {doc['sort']}")
    # VM name gets what the fixed columns leave (each column two spaces from the next)
    fixed = 7 + 3 + 6 * len(COLUMNS) + 2 * (len(COLUMNS) + 2)
    name_width = max(8, width - fixed)
    table = Table([Column("VM", name_width), Column("PID", 7, ">"), Column("DEG", 3)]
                  + [Column(h, 6, ">") for h, _ in COLUMNS.values()],
                  max_width=max(width, name_width + fixed))
    lines = [cut(head, width), "", cut(table.header(), width)]
    for e in doc["vms"]:
        cells: list[object] = [e["name"] or "-", e["pid"],
                               "!" if e["degraded"] else ("x" if e["state"] != "running" else "")]
        for key in COLUMNS:
            cells.append(e["totals"][key] if key in ("find", "lost") else _rate(e["rates"][key]))
        lines.append(cut(table.line(cells), width))
    if not doc["vms"]:
        lines.append("(no VMs)")
    if height is not None and len(lines) > height:
        lines = lines[:height]
    return lines
