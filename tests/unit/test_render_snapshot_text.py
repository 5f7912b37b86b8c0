"""render.snapshot_text with a 100k-range guest: the summary stays a screenful, --ranges
lists every range, every line within 80 columns, differing ranges marked."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from hekitrace.render.snapshot_text import SUMMARY_DIFFERING, render_ranges, render_summary


def big_guest(extra_ranges: int) -> dict:
    """The 1 TiB guest of test_render_svg.py (loaded from its file: tests are no package)."""
    path = Path(__file__).with_name("test_render_svg.py")
    spec = importlib.util.spec_from_file_location("_render_svg_cases", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.big_guest(extra_ranges)


def test_summary_of_100k_ranges_is_short():
    snap = big_guest(100_000)
    snap["vm"].update(state="running", uuid="u", vmm="qemu", created="2026-11-25T15:00:00Z",
                      created_ns=0, lockdown_ns=2_000_000_000, findings=0,
                      ranges_stored={"requested": 100_002, "applied": 100_001})
    text = render_summary(snap)
    lines = text.splitlines()
    assert len(lines) < 40
    assert max(len(line) for line in lines) <= 80
    assert "REQUESTED AND APPLIED DIFFER ON 1 RANGE(S)" in text
    assert "lockdown yes, since 2026-11-25T15:00:02.000000Z (+2.0s after creation)" in text
    assert "r-- I       none" in text and "DIFFERS" in text
    assert SUMMARY_DIFFERING >= 1


def test_ranges_lists_everything():
    snap = big_guest(100_000)
    lines = "".join(render_ranges(snap)).splitlines()
    assert len(lines) == 3 + len(snap["ranges"])
    assert max(len(line) for line in lines) <= 80
    assert sum("DIFFERS" in line for line in lines) == 1
