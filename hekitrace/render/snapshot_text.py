"""Text renderings of a snapshot (docs/snapshot.md): the summary and the range table.

The summary is what an operator reads first during an incident: is this guest locked
down, what protects its memory, does the host enforce what the guest asked for, what
went wrong lately. It stays a screenful whatever the guest's size: ranges are counted
there, listed only by ``--ranges`` (which streams one line per range, so 100k ranges
cost memory only for the dicts already held).
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator, Sequence
from typing import Any

from hekitrace.render.table import WIDTH, Column, Table, cut, human_duration, human_size

#: differing ranges listed in the summary (all of them with --ranges)
SUMMARY_DIFFERING = 10
#: findings listed in the summary, newest last
SUMMARY_FINDINGS = 10
#: classes in display order: strongest protection first; others follow alphabetically
CLASS_ORDER = ("r-x_immutable", "r--_immutable", "---_immutable", "rw-_immutable",
               "r-x", "r--", "rw-", "---", "rwx", "private", "default")

_NO_ATTR = "default"


def class_label(cls: str) -> str:
    """``r-x_immutable`` -> ``r-x immutable``; ``default`` -> ``none (no attribute)``."""
    if cls == _NO_ATTR:
        return "none (no attribute)"
    return cls.replace("_", " ")


def class_sort_key(cls: str) -> tuple[int, str]:
    return (CLASS_ORDER.index(cls) if cls in CLASS_ORDER else len(CLASS_ORDER), cls)


def _offset(base_ns: int | None, when_ns: int | None) -> str:
    if base_ns is None or when_ns is None:
        return ""
    return f" (+{human_duration((when_ns - base_ns) / 1e9)} after creation)"


def memory_rows(vm: dict, maps: Sequence[str]) -> list[tuple[str, list[int]]]:
    """(class, bytes per map) rows, the default RWX remainder of guest memory last."""
    classes: set[str] = set()
    for name in maps:
        classes |= set(vm["memory"].get(name, {}))
    rows = []
    for cls in sorted(classes, key=class_sort_key):
        rows.append((cls, [vm["memory"].get(name, {}).get(cls, {}).get("bytes", 0)
                           for name in maps]))
    total = vm.get("guest_memory_bytes") or 0
    if total:
        rest = [max(0, total - sum(sizes[i] for _cls, sizes in rows))
                for i in range(len(maps))]
        rows.append((_NO_ATTR, rest))
    return rows


def render_summary(snap: dict) -> str:
    """The default ``hekitrace snapshot VM`` output, within 80 columns."""
    vm = snap["vm"]
    maps = list(snap.get("maps") or ("requested", "applied"))
    out: list[str] = []
    state = vm["state"]
    if vm.get("preexisting"):
        state += ", found running"
    out.append(cut(f"VM {vm['name']}  pid {vm['pid']}  {state}", WIDTH))
    out.append(cut(f"  uuid     {vm.get('uuid') or '-'}", WIDTH))
    out.append(cut(f"  vmm      {vm.get('vmm') or '-'}", WIDTH))
    out.append(cut(f"  created  {vm['created']}", WIDTH))
    out.append(cut(f"  memory   {human_size(vm.get('guest_memory_bytes') or 0)} in "
                   f"{vm.get('memslots', 0)} memslot(s)", WIDTH))
    if vm["locked_down"]:
        lock = f"yes, since {vm['lockdown']}{_offset(vm['created_ns'], vm['lockdown_ns'])}"
    else:
        lock = "NO: the guest has not pinned CR bits or made memory immutable"
    out.append(cut(f"  lockdown {lock}", WIDTH))
    bits = [b for cr in vm["pinned_cr"].values() for b in cr["bits"]]
    out.append(cut("  pinned   " + (" ".join(bits) if bits else "none"), WIDTH))
    if vm["degraded"]:
        out.append("  DEGRADED: this picture may be incomplete:")
        out += [cut(f"    - {r}", WIDTH) for r in vm["degraded_reasons"]]
    else:
        out.append("  degraded no")

    out += ["", "MEMORY BY ATTRIBUTE CLASS"]
    table = Table([Column("class", 26)] + [Column(m, 12, ">") for m in maps], indent=2)
    rows = memory_rows(vm, maps)
    out.append(table.header())
    for cls, sizes in rows:
        out.append(table.line([class_label(cls)] + [human_size(s) if s else "-"
                                                     for s in sizes]))
    stored = vm.get("ranges_stored", {})
    out.append(cut("  ranges   " + ", ".join(f"{stored.get(m, 0)} {m}" for m in maps)
                   + " (list them with --ranges)", WIDTH))

    differing = [r for r in snap.get("ranges", ()) if r.get("differs")]
    unobserved = snap.get("applied_unobserved")
    if "applied" in maps and unobserved:
        out += ["", cut(f"APPLIED MAP NOT OBSERVED ON THIS HOST: {unobserved}", WIDTH),
                cut("  (the applied column shows nothing the host did; it is not "
                    "compared)", WIDTH)]
    elif len(maps) > 1:
        out.append("")
        if differing:
            out.append(f"REQUESTED AND APPLIED DIFFER ON {len(differing)} RANGE(S)"
                       + (f" (first {SUMMARY_DIFFERING})" if len(differing) > SUMMARY_DIFFERING
                          else ""))
            out += list(range_lines(differing[:SUMMARY_DIFFERING], maps))
        else:
            out.append("requested and applied agree on every range")

    findings = snap.get("findings", [])
    out.append("")
    total = vm.get("findings", len(findings))
    if not findings:
        out.append(f"FINDINGS: {total}")
    else:
        shown = findings[-SUMMARY_FINDINGS:]
        out.append(f"LATEST FINDINGS ({len(shown)} of {total}, newest last)")
        out += finding_lines(shown)
    return "\n".join(out) + "\n"


def finding_lines(findings: Sequence[dict]) -> list[str]:
    table = Table([Column("time (UTC)", 12), Column("severity", 8), Column("rule", 24),
                   Column("count", 5, ">"), Column("", 20)], indent=2)
    lines = [table.header().rstrip()]
    for f in findings:
        lines.append(table.line([str(f.get("time", ""))[11:23], f.get("severity", ""),
                                 f.get("rule", ""), f.get("count", 1), ""]))
        lines += textwrap.wrap(str(f.get("message", "")), WIDTH, initial_indent="    ",
                               subsequent_indent="      ", break_on_hyphens=False)
    return lines


def _range_table(maps: Sequence[str]) -> Table:
    columns = [Column("gpa start", 14), Column("gpa end", 14), Column("size", 10, ">")]
    columns += [Column(m, 10) for m in maps]
    if len(maps) > 1:
        columns.append(Column("", 7))
    return Table(columns)


def range_lines(rows: Sequence[dict], maps: Sequence[str]) -> Iterator[str]:
    """The range table: header, then one line per merged range; differing ones marked."""
    table = _range_table(maps)
    yield table.header()
    for row in rows:
        cells: list[Any] = [f"{row['gpa_start']:#014x}", f"{row['gpa_end']:#014x}",
                            human_size(row["size_bytes"])]
        cells += [row[m]["flags"] if m in row else "?" for m in maps]
        if len(maps) > 1:
            cells.append("DIFFERS" if row.get("differs") else "")
        yield table.line(cells)


def render_ranges(snap: dict) -> Iterator[str]:
    """``--ranges``: a heading, every range (lines, newline-terminated), and a legend."""
    vm = snap["vm"]
    maps = list(snap.get("maps") or ("requested", "applied"))
    rows = snap.get("ranges", [])
    yield cut(f"VM {vm['name']}  pid {vm['pid']}: {len(rows)} range(s)"
              + (f", {snap.get('differing_ranges', 0)} differing (requested vs applied)"
                 if len(maps) > 1 else ""), WIDTH) + "\n"
    yield "flags: r/w/x allowed, I immutable, P private; none = no attribute\n"
    if "applied" in maps and snap.get("applied_unobserved"):
        yield cut(f"applied: not observed on this host ({snap['applied_unobserved']})",
                  WIDTH) + "\n"
    for line in range_lines(rows, maps):
        yield line + "\n"
    if snap.get("ranges_truncated"):
        yield "(truncated by the daemon: more ranges exist)\n"
