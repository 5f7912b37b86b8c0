"""render.svg: the memory picture is well-formed SVG with a legend entry per visible
class, one row per memslot, immutable ranges hatched, and renders to PNG with
rsvg-convert; for the bundled example (4 GiB), a 1 TiB guest and 100k ranges."""

from __future__ import annotations

import json
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from hekitrace.config.abi import DEFAULT_PROFILE as ABI
from hekitrace.render.svg import MAX_PIECES, render_svg

ROOT = Path(__file__).resolve().parents[2]
NS = {"s": "http://www.w3.org/2000/svg"}
GIB = 1 << 30
RX_I, R_I, RW = 208, 144, 48   # KVM attribute values (heki-v2): r-x I, r-- I, rw-


def example() -> dict:
    return json.loads((ROOT / "tests/fixtures/snapshot/snapshot.json").read_text())


def row(start: int, end: int, requested: int, applied: int) -> dict:
    out = {"gfn_start": start, "gfn_end": end, "gpa_start": start << 12, "gpa_end": end << 12,
           "pages": end - start, "size_bytes": (end - start) << 12}
    for name, value in (("requested", requested), ("applied", applied)):
        out[name] = {"value": value, "flags": ABI.attr_flags(value),
                     "class": ABI.attr_class(value)}
    out["differs"] = requested != applied
    return out


def big_guest(extra_ranges: int = 0) -> dict:
    """1 TiB in three memslots: kernel text/rodata low, rodata not applied (differs)."""
    ranges = [row(0x1000, 0x1000 + 3584, RX_I, RX_I), row(0x2000, 0x2000 + 2304, R_I, 0)]
    for i in range(extra_ranges):
        base = 0x100000 + 4 * i
        ranges.append(row(base, base + 2, RW if i % 2 else RX_I, RW if i % 2 else RX_I))
    return {
        "schema": 1, "maps": ["requested", "applied"], "ranges": ranges,
        "memslots": [{"slot": 0, "gpa": 0, "size_bytes": 640 << 10, "hva": 0, "flags": 0},
                     {"slot": 1, "gpa": 1 << 20, "size_bytes": 3 * GIB - (1 << 20), "hva": 0,
                      "flags": 0},
                     {"slot": 2, "gpa": 4 * GIB, "size_bytes": 1021 * GIB, "hva": 0,
                      "flags": 0}],
        "vm": {"name": "big1", "pid": 1, "locked_down": True,
               "lockdown": "2026-11-25T15:00:02.000000Z", "degraded": False,
               "degraded_reasons": [], "guest_memory_bytes": 1024 * GIB, "memslots": 3,
               "pinned_cr": {"cr0": {"mask": 65536, "bits": ["CR0.WP"]}},
               "memory": {"requested": {"r-x_immutable": {"pages": 3584, "bytes": 14 << 20},
                                        "r--_immutable": {"pages": 2304, "bytes": 9 << 20}},
                          "applied": {"r-x_immutable": {"pages": 3584, "bytes": 14 << 20}}}},
    }


def parse(svg: str) -> ET.Element:
    return ET.fromstring(svg.encode())


def visible_classes(root: ET.Element) -> set[str]:
    return {r.get("data-class") for r in root.iter(f"{{{NS['s']}}}rect")
            if r.get("class") == "range" and float(r.get("width")) > 0}


@pytest.mark.parametrize("make", [example, big_guest, lambda: big_guest(100_000)],
                         ids=["example-4GiB", "1TiB", "1TiB-100k-ranges"])
def test_svg_structure(make):
    snap = make()
    root = parse(render_svg(snap))
    legend = root.find(".//s:g[@class='legend']", NS)
    assert legend is not None
    items = [g.get("data-class") for g in legend.iter(f"{{{NS['s']}}}g")
             if g.get("class") == "legend-item"]
    assert sorted(items) == sorted(visible_classes(root)), "one legend entry per class"
    assert len(items) == len(set(items))
    rows = [g for g in root.iter(f"{{{NS['s']}}}g") if g.get("class") == "memslot"]
    assert len(rows) == len(snap["memslots"])
    for g in rows:   # pieces bounded per row and per map; widths fill the bar
        ranges = [r for r in g.iter(f"{{{NS['s']}}}rect") if r.get("class") == "range"]
        assert len(ranges) <= 2 * (MAX_PIECES + 250)
    text = ET.tostring(root, encoding="unicode")
    assert "Hatched: immutable" in text and "logarithmic" in text


def test_immutable_is_hatched_and_sizes_in_legend():
    svg = render_svg(big_guest())
    root = parse(svg)
    hatched = [r for r in root.iter(f"{{{NS['s']}}}rect") if r.get("fill") == "url(#hatch)"]
    assert hatched, "immutable ranges carry the hatch pattern"
    assert "r-x immutable: 14.0 MiB / 14.0 MiB" in svg
    assert "r-- immutable: 9.0 MiB / 0 B" in svg        # requested, not applied
    assert "none (no attribute)" in svg


def test_small_ranges_stay_visible_in_a_huge_guest():
    """The 14 MiB kernel text of a 1 TiB guest gets a readable width (>= 20 px)."""
    root = parse(render_svg(big_guest()))
    widths = [float(r.get("width")) for r in root.iter(f"{{{NS['s']}}}rect")
              if r.get("data-class") == "r-x_immutable"]
    assert widths and min(widths) >= 20


def test_merged_bins_keep_protected_classes():
    svg = render_svg(big_guest(100_000))
    root = parse(svg)
    slot2 = [g for g in root.iter(f"{{{NS['s']}}}g") if g.get("class") == "memslot"][2]
    classes = {r.get("data-class") for r in slot2.iter(f"{{{NS['s']}}}rect")
               if r.get("class") == "range"}
    assert "r-x_immutable" in classes and "default" in classes
    assert "ranges too small to draw were merged" in svg


@pytest.mark.skipif(shutil.which("rsvg-convert") is None,
                    reason="rsvg-convert missing: scripts/setup.sh installs librsvg2-bin")
@pytest.mark.parametrize("make", [example, big_guest], ids=["example-4GiB", "1TiB"])
def test_renders_to_png(make, tmp_path):
    snap = make()
    src = tmp_path / "m.svg"
    src.write_text(render_svg(snap))
    out = tmp_path / "m.png"
    result = subprocess.run(["rsvg-convert", str(src), "-o", str(out)], check=False, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(data[16:20], "big") == 1000    # width from the SVG
