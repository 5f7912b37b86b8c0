"""An SVG picture of one guest's physical memory and its protection, from a snapshot dict.

Layout (stated in the picture's legend too): one row per memslot, each scaled to the
full width on its own, so a 640 KiB low-memory slot and a 1 TiB slot are both readable.
Inside a row, half the width is linear in size and half logarithmic (and every range
gets at least ``MIN_PX``), so a 14 MiB kernel text in a 1 TiB guest stays visible while
big regions stay the biggest; a range drawn at under ``COMPRESSED`` of its linear share
is marked with a break (two slashes) so nobody reads sizes off a compressed
region, and sizes are written in every piece wide enough to hold them. With more ranges than fit at ``MIN_PX`` (a guest
with 100k ranges), neighbouring ranges are merged into bins coloured by the largest
attribute class they hold, and the legend says how many. Colour is per attribute class (the same bounded
classes as the metrics); immutable ranges carry a hatch pattern on top of their colour.
With both maps, each row shows requested above applied, on the same axis.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from xml.sax.saxutils import escape, quoteattr

from hekitrace.render.snapshot_text import class_label, class_sort_key
from hekitrace.render.table import human_size
from hekitrace.state.events import PAGE_SHIFT

WIDTH_PX = 1000
LABEL_PX = 170
BAR_PX = WIDTH_PX - LABEL_PX - 20
BAR_H = 22
MIN_PX = 2.0
COMPRESSED = 0.8  # drawn/true share under which a range gets a break mark
MAX_PIECES = 120  # per row; beyond, narrow neighbours are merged (min widths would eat it)
BIN_PX = 4.0      # width a bin of merged narrow pieces grows to
LOG_SHARE = 0.5   # share of each row's width laid out by log2(pages), the rest linear
LABEL_MIN_PX = 64  # pieces at least this wide carry their size as text

#: fill colours: executable = warm, read-only = blue, writable = green, none = grey
COLOURS = {
    "r-x_immutable": "#d95f0e", "r-x": "#fdae6b",
    "r--_immutable": "#2171b5", "r--": "#9ecae1",
    "rw-_immutable": "#238b45", "rw-": "#a1d99b",
    "---_immutable": "#252525", "---": "#737373",
    "rwx": "#fcbba1", "rwx_immutable": "#cb181d",
    "-wx": "#ef3b2c", "-wx_immutable": "#a50f15", "--x": "#fd8d3c", "--x_immutable": "#a63603",
    "-w-": "#c7e9c0", "-w-_immutable": "#74c476",
    "default": "#e8e8e8", "unknown": "#000000",
}
PRIVATE_COLOUR = "#9e9ac8"


def colour(cls: str) -> str:
    if cls in COLOURS:
        return COLOURS[cls]
    if cls.startswith("private"):
        return PRIVATE_COLOUR
    return "#bdbdbd"


def _rows(snap: dict) -> list[tuple[str, int, int]]:
    """(label, gfn_start, gfn_end) per memslot, or one row over all ranges if none known."""
    slots = sorted(snap.get("memslots") or (), key=lambda m: m["gpa"])
    rows = [(f"slot {m['slot']}", m["gpa"] >> PAGE_SHIFT,
             (m["gpa"] + m["size_bytes"]) >> PAGE_SHIFT) for m in slots if m["size_bytes"]]
    if rows:
        return rows
    end = max((r["gfn_end"] for r in snap.get("ranges", ())), default=1)
    return [("no memslots known", 0, end)]


def _pieces(snap: dict, maps: Sequence[str], lo: int, hi: int
            ) -> list[tuple[int, int, tuple[str, ...]]]:
    """Uniform pieces of [lo, hi): (gfn_start, gfn_end, class per map), gaps = default."""
    out: list[tuple[int, int, tuple[str, ...]]] = []
    pos = lo
    default = tuple("default" for _ in maps)
    for row in snap.get("ranges", ()):
        s, e = max(lo, row["gfn_start"]), min(hi, row["gfn_end"])
        if s >= e:
            continue
        if s > pos:
            out.append((pos, s, default))
        out.append((s, e, tuple(row[m]["class"] if m in row else "default" for m in maps)))
        pos = e
    if pos < hi:
        out.append((pos, hi, default))
    return out


def _binned(pieces: list, px: float = BAR_PX) -> tuple[list, int]:
    """Pieces with runs of too-narrow neighbours merged into bins of about ``BIN_PX``.

    Only pieces that would be drawn under ``BIN_PX`` are merged, never a wide one (a
    1 TiB region keeps its own colour and label). A bin takes the largest class *with
    an attribute* it holds (by pages), default only when it holds nothing else: ten
    4 KiB immutable pages among untouched RAM must not vanish from the picture.
    """
    weights = _weights([e - s for s, e, _ in pieces])
    if len(pieces) <= MAX_PIECES:
        return pieces, 0
    out: list = []
    group: list = []
    group_px = 0.0
    merged = 0

    def close() -> None:
        nonlocal group, group_px, merged
        if not group:
            return
        classes = []
        for k in range(len(group[0][2])):
            weight: dict[str, int] = {}
            for s, e, cls in group:
                weight[cls[k]] = weight.get(cls[k], 0) + e - s
            marked = {c: n for c, n in weight.items() if c != "default"} or weight
            classes.append(max(sorted(marked), key=marked.__getitem__))
        out.append((group[0][0], group[-1][1], tuple(classes)))
        merged += len(group) - 1
        group, group_px = [], 0.0

    for piece, weight in zip(pieces, weights):
        wide = weight * px
        if wide >= BIN_PX:
            close()
            out.append(piece)
            continue
        group.append(piece)
        group_px += wide
        if group_px >= BIN_PX:
            close()
    close()
    return out, merged


def _weights(pages: Sequence[int]) -> list[float]:
    """Half linear, half logarithmic share per piece: big regions stay the biggest, a
    14 MiB kernel text stays visible next to 1 TiB of RAM."""
    total = sum(pages) or 1
    logs = [math.log2(1 + p) for p in pages]
    log_total = sum(logs) or 1.0
    return [(1 - LOG_SHARE) * p / total + LOG_SHARE * lg / log_total
            for p, lg in zip(pages, logs)]


def _widths(sizes: Sequence[float], total_px: float) -> list[float]:
    """Widths proportional to ``sizes``, each at least MIN_PX, summing to ``total_px``."""
    fixed: set[int] = set()
    while True:
        free = [i for i in range(len(sizes)) if i not in fixed]
        room = total_px - MIN_PX * len(fixed)
        mass = sum(sizes[i] for i in free) or 1
        small = {i for i in free if room * sizes[i] / mass < MIN_PX}
        if not small:
            break
        fixed |= small
    return [MIN_PX if i in fixed else room * sizes[i] / mass for i in range(len(sizes))]


def render_svg(snap: dict, maps: Sequence[str] | None = None) -> str:
    """The SVG document (a string) for ``snap``; ``maps`` defaults to the snapshot's."""
    maps = [m for m in (maps or snap.get("maps") or ()) if m in (snap.get("maps") or ())]
    if not maps:
        maps = list(snap.get("maps") or ["requested"])
    vm = snap["vm"]
    body: list[str] = []
    y = 70
    merged_total = 0
    seen: set[str] = set()
    row_h = BAR_H * len(maps) + 4 * (len(maps) - 1) + 34
    for label, lo, hi in _rows(snap):
        pieces, merged = _binned(_pieces(snap, maps, lo, hi))
        merged_total += merged
        widths = _widths(_weights([e - s for s, e, _ in pieces]), BAR_PX)
        body.append(f'<g class="memslot" data-gfn-start="{lo}" data-gfn-end="{hi}">')
        body.append(f'<text x="10" y="{y + 15}" class="slot">{escape(label)}</text>')
        body.append(f'<text x="10" y="{y + 30}" class="small">'
                    f'{escape(human_size((hi - lo) << PAGE_SHIFT))}</text>')
        for k, name in enumerate(maps):
            by = y + k * (BAR_H + 4)
            if len(maps) > 1:
                body.append(f'<text x="{LABEL_PX - 6}" y="{by + 15}" class="small" '
                            f'text-anchor="end">{name}</text>')
            x = float(LABEL_PX)
            for (s, e, classes), w in zip(pieces, widths):
                cls = classes[k]
                seen.add(cls)
                true_w = BAR_PX * (e - s) / max(1, hi - lo)
                title = (f"{s << PAGE_SHIFT:#x}-{e << PAGE_SHIFT:#x} "
                         f"{human_size((e - s) << PAGE_SHIFT)} {class_label(cls)} ({name})")
                body.append(f'<rect class="range" data-class={quoteattr(cls)} x="{x:.2f}" '
                            f'y="{by}" width="{w:.2f}" height="{BAR_H}" '
                            f'fill="{colour(cls)}"><title>{escape(title)}</title></rect>')
                if cls.endswith("_immutable"):
                    body.append(f'<rect x="{x:.2f}" y="{by}" width="{w:.2f}" '
                                f'height="{BAR_H}" fill="url(#hatch)"/>')
                if w < COMPRESSED * true_w and w >= 14:
                    cx = x + w - 14  # off-centre: the size label sits in the middle
                    d = (f"M{cx - 5:.1f},{by + BAR_H + 2} l5,{-BAR_H - 4} "
                         f"M{cx:.1f},{by + BAR_H + 2} l5,{-BAR_H - 4}")
                    body.append(f'<path class="break" d="{d}" stroke="#ffffff" '
                                'stroke-width="4"/>')
                    body.append(f'<path d="{d}" stroke="#444444" stroke-width="1.2"/>')
                if w >= LABEL_MIN_PX:
                    dark = cls.endswith("_immutable") or cls in ("---", "unknown")
                    body.append(f'<text x="{x + w / 2:.1f}" y="{by + 15}" class="small" '
                                f'text-anchor="middle" fill="{"#ffffff" if dark else "#222222"}"'
                                f'>{escape(human_size((e - s) << PAGE_SHIFT))}</text>')
                x += w
            body.append(f'<rect x="{LABEL_PX}" y="{by}" width="{BAR_PX}" height="{BAR_H}" '
                        'fill="none" stroke="#333333" stroke-width="1"/>')
        ty = y + len(maps) * (BAR_H + 4) + 8
        body.append(f'<text x="{LABEL_PX}" y="{ty}" class="small">'
                    f'{lo << PAGE_SHIFT:#x}</text>')
        body.append(f'<text x="{LABEL_PX + BAR_PX}" y="{ty}" class="small" '
                    f'text-anchor="end">{hi << PAGE_SHIFT:#x}</text>')
        body.append("</g>")
        y += row_h
    legend, y = _legend(snap, maps, seen, y + 6, merged_total)
    height = y + 10
    title = (f"{vm['name']} (pid {vm['pid']}): guest-physical memory, "
             f"{human_size(vm.get('guest_memory_bytes') or 0)} in "
             f"{vm.get('memslots', 0)} memslot(s)")
    lock = (f"locked down {vm['lockdown']}" if vm.get("locked_down") else "NOT locked down")
    pins = " ".join(b for cr in vm["pinned_cr"].values() for b in cr["bits"]) or "none"
    head = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH_PX}" height="{height}" '
         f'viewBox="0 0 {WIDTH_PX} {height}" font-family="DejaVu Sans, sans-serif">'),
        ('<defs><pattern id="hatch" patternUnits="userSpaceOnUse" width="6" height="6" '
         'patternTransform="rotate(45)"><line x1="0" y1="0" x2="0" y2="6" '
         'stroke="#ffffff" stroke-width="2" stroke-opacity="0.7"/></pattern>'
         "<style>.slot{font-size:13px;font-weight:bold}.small{font-size:11px}"
         ".title{font-size:16px;font-weight:bold}.legend{font-size:12px}</style></defs>"),
        f'<rect width="{WIDTH_PX}" height="{height}" fill="#ffffff"/>',
        f'<text x="10" y="24" class="title">{escape(title)}</text>',
        f'<text x="10" y="46" class="small">{escape(lock)}; pinned: {escape(pins)}'
        + (" ; DEGRADED: " + escape("; ".join(vm["degraded_reasons"])) if vm.get("degraded")
           else "") + "</text>",
    ]
    return "\n".join(head + body + legend + ["</svg>"]) + "\n"


def _legend(snap: dict, maps: Sequence[str], seen: Iterable[str], y: int, merged: int
            ) -> tuple[list[str], int]:
    vm = snap["vm"]
    total = vm.get("guest_memory_bytes") or 0
    out = ['<g class="legend">',
           (f'<text x="10" y="{y + 12}" class="slot">Legend (size per class: '
            f'{" / ".join(maps)})</text>')]
    y += 22
    for i, cls in enumerate(sorted(set(seen), key=class_sort_key)):
        col, row = i % 2, i // 2
        x, yy = 10 + col * 490, y + row * 22
        sizes = []
        for name in maps:
            mem = vm["memory"].get(name, {})
            if cls == "default":
                size = max(0, total - sum(c["bytes"] for c in mem.values()))
            else:
                size = mem.get(cls, {}).get("bytes", 0)
            sizes.append(human_size(size))
        out.append(f'<g class="legend-item" data-class={quoteattr(cls)}>'
                   f'<rect x="{x}" y="{yy}" width="28" height="16" fill="{colour(cls)}" '
                   'stroke="#333333" stroke-width="0.5"/>'
                   + (f'<rect x="{x}" y="{yy}" width="28" height="16" fill="url(#hatch)"/>'
                      if cls.endswith("_immutable") else "")
                   + f'<text x="{x + 36}" y="{yy + 13}" class="legend">'
                   f'{escape(class_label(cls))}: {escape(" / ".join(sizes))}</text></g>')
    y += ((len(set(seen)) + 1) // 2) * 22 + 8
    notes = ["Hatched: immutable (cannot be changed until the guest reboots).",
             ("Axis: one row per memslot, each scaled on its own; within a row half the "
              "width is linear in size and half"),
             (f"logarithmic (log2 pages), at least {MIN_PX:g} px per range, so small ranges "
              "stay visible. Slashes (//): a range"),
             (f"drawn at under {COMPRESSED:.0%} of its linear width (compressed). Sizes: "
              "labels, legend, tooltips.")]
    if merged:
        notes.append(f"{merged} ranges too small to draw were merged into neighbours "
                     "(a bin shows the largest attribute class in it).")
    for note in notes:
        out.append(f'<text x="10" y="{y + 12}" class="small">{escape(note)}</text>')
        y += 16
    out.append("</g>")
    return out, y
