"""render.diff: changes between two snapshots, per map over gfns, plus pins and findings."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from hekitrace.errors import UsageError
from hekitrace.render.diff import diff, map_changes, render_diff

ROOT = Path(__file__).resolve().parents[2]


def test_map_changes_sweep():
    old = [(0, 10, "r-x I"), (20, 30, "rw-")]
    new = [(0, 5, "r-x I"), (5, 10, "rw-"), (25, 40, "rw-")]
    assert map_changes(old, new) == [(5, 10, "r-x I", "rw-"), (20, 25, "rw-", "none"),
                                     (30, 40, "none", "rw-")]
    assert map_changes(old, old) == []
    assert map_changes([], []) == []


def test_diff_of_a_snapshot_with_itself_is_empty():
    snap = json.loads((ROOT / "tests/fixtures/snapshot/snapshot.json").read_text())
    d = diff(snap, snap)
    assert all(not v for v in d["ranges"].values())
    assert d["pins_added"] == d["pins_removed"] == d["new_findings"] == []
    assert d["same_vm"]
    assert "unchanged" in render_diff(snap, snap)


def test_diff_reports_relaxation_pins_and_findings():
    old = json.loads((ROOT / "tests/fixtures/snapshot/snapshot.json").read_text())
    new = copy.deepcopy(old)
    text_row = next(r for r in new["ranges"] if r["requested"]["flags"] == "r-x I")
    text_row["applied"] = {"value": 48, "flags": "rw-", "class": "rw-"}
    new["vm"]["pinned_cr"]["cr4"]["bits"].remove("CR4.SMEP")
    new["findings"].append({"rule": "immutable_relaxed", "time_ns": 1, "severity": "critical",
                            "time": "2026-11-25T15:10:00.000000Z", "message": "relaxed"})
    d = diff(old, new)
    assert d["ranges"]["requested"] == []
    [change] = d["ranges"]["applied"]
    assert (change["old"], change["new"]) == ("r-x I", "rw-")
    assert d["pins_removed"] == ["CR4.SMEP"]
    assert [f["rule"] for f in d["new_findings"]] == ["immutable_relaxed"]
    text = render_diff(old, new)
    assert "r-x I   -> rw-" in text and "-CR4.SMEP" in text and "immutable_relaxed" in text
    assert max(len(line) for line in text.splitlines()) <= 80


def test_not_a_snapshot():
    with pytest.raises(UsageError, match="not a snapshot"):
        diff({"vms": []}, {"vm": {}, "ranges": []})
