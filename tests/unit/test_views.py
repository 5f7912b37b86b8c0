"""Views: the vms row and the snapshot document (shape is the docs/snapshot.md contract)."""

from __future__ import annotations

import json

import pytest

from hekitrace.config.abi import AbiProfile
from hekitrace.policy.findings import Finding
from hekitrace.render.documents import merged_ranges, vm_snapshot, vm_summary
from hekitrace.render.snapshot_text import render_summary
from hekitrace.state.attrmap import AttrMap
from hekitrace.state.events import (
    AttrApplied,
    CrPinRequest,
    Memslot,
    ProtectEntry,
    ProtectRequest,
    VmCreated,
)
from hekitrace.state.host import Host

R, W, X, I = 1, 2, 4, 8
KR, KW, KX, KI, KP = 1 << 4, 1 << 5, 1 << 6, 1 << 7, 1 << 3
T0 = 1_795_000_000_000_000_000
MBEC = AbiProfile(name="heki-v2-mbec", lock_cr_update=13, protect_memory=14, mbec=True)


def guest_after_boot():
    host = Host(MBEC)
    host.apply(VmCreated(T0, 7, 7, name="web1", uuid="u-1", vmm="qemu-system-x86_64"))
    host.apply(Memslot(T0, 7, 7, 0, 0, 0, 1 << 30, 0x7f0000000000))
    host.apply(CrPinRequest(T0 + 1, 7, 7, 0, 1 << 16, 0))
    host.apply(CrPinRequest(T0 + 1, 7, 7, 4, (1 << 20) | (1 << 21), 0))
    host.apply(ProtectRequest(T0 + 2, 7, 7, 0x9000, (
        ProtectEntry(0x1600000, 0x1800000, R | W),
        ProtectEntry(0x1400000, 0x1600000, R | I),
        ProtectEntry(0x1000000, 0x1400000, R | X | I))))
    host.apply(AttrApplied(T0 + 3, 7, 7, 0x1000, 0x1400, KR | KX | KI))
    host.apply(AttrApplied(T0 + 3, 7, 7, 0x1400, 0x1500, KR | KI))   # rest of rodata missing
    return host.by_tgid(7)


def test_summary_row():
    guest = guest_after_boot()
    row = vm_summary(guest, MBEC, 3)
    assert row["name"] == "web1" and row["pid"] == 7 and row["state"] == "running"
    assert row["locked_down"] and row["lockdown_ns"] == T0 + 1
    assert row["pinned_cr"] == {"cr0": {"mask": 1 << 16, "bits": ["CR0.WP"]},
                                "cr4": {"mask": (1 << 20) | (1 << 21),
                                        "bits": ["CR4.SMEP", "CR4.SMAP"]}}
    assert row["memory"]["requested"] == {
        "r-x_immutable": {"pages": 0x400, "bytes": 0x400 * 4096},
        "r--_immutable": {"pages": 0x200, "bytes": 0x200 * 4096},
        "rw-": {"pages": 0x200, "bytes": 0x200 * 4096}}
    assert row["memory"]["applied"]["r--_immutable"]["pages"] == 0x100
    assert row["degraded"] is False and row["findings"] == 3
    assert row["guest_memory_bytes"] == 1 << 30
    json.dumps(row)


def test_snapshot_without_attribute_hook_says_applied_is_unobserved():
    """No attribute hook: the applied side is 'not observed', never a difference."""
    guest = guest_after_boot()
    snap = vm_snapshot(guest, MBEC, applied_unobserved="no attribute hook on this kernel")
    assert snap["applied_unobserved"] == "no attribute hook on this kernel"
    assert snap["differing_ranges"] == 0 and not any(r["differs"] for r in snap["ranges"])
    text = render_summary(snap)
    assert "APPLIED MAP NOT OBSERVED ON THIS HOST: no attribute hook on this kernel" in text
    assert "DIFFER" not in text
    assert vm_snapshot(guest, MBEC)["applied_unobserved"] is None


def test_snapshot_ranges_mark_where_maps_differ():
    guest = guest_after_boot()
    f = Finding("request_not_applied", "warning", T0 + 5, {"name": "web1"}, guest.key,
                "m", {"gfn_start": 0x1500})
    snap = vm_snapshot(guest, MBEC, [f, {"rule": "x"}])
    ranges = [(r["gfn_start"], r["gfn_end"], r["requested"]["flags"], r["applied"]["flags"],
               r["differs"]) for r in snap["ranges"]]
    assert ranges == [(0x1000, 0x1400, "r-x I", "r-x I", False),
                      (0x1400, 0x1500, "r-- I", "r-- I", False),
                      (0x1500, 0x1600, "r-- I", "none", True),
                      (0x1600, 0x1800, "rw-", "none", True)]
    assert snap["differing_ranges"] == 2
    assert snap["ranges"][0]["gpa_start"] == 0x1000000
    assert snap["ranges"][0]["size_bytes"] == 0x400 * 4096
    assert snap["findings"][0]["rule"] == "request_not_applied"
    assert snap["memslots"] == [{"slot": 0, "gpa": 0, "size_bytes": 1 << 30,
                                 "hva": 0x7f0000000000, "flags": 0}]
    json.dumps(snap)


def test_snapshot_single_map_and_bad_map_name():
    guest = guest_after_boot()
    snap = vm_snapshot(guest, MBEC, maps=("applied",))
    assert [(r["gfn_start"], r["gfn_end"]) for r in snap["ranges"]] == \
        [(0x1000, 0x1400), (0x1400, 0x1500)]
    assert "requested" not in snap["ranges"][0]
    with pytest.raises(ValueError, match="unknown map 'bogus'"):
        vm_snapshot(guest, MBEC, maps=("bogus",))


def test_merged_ranges_limit_and_empty():
    a = AttrMap()
    for i in range(10):
        a.set(2 * i, 2 * i + 1, KR)
    rows, truncated = merged_ranges({"requested": a}, MBEC, limit=3)
    assert len(rows) == 3 and truncated
    assert merged_ranges({"requested": AttrMap(), "applied": AttrMap()}, MBEC) == ([], False)


def test_private_pages_and_destroyed_state():
    guest = guest_after_boot()
    guest.applied.set(0x20000, 0x20010, KP)
    guest.destroyed_ns = T0 + 100
    row = vm_summary(guest, MBEC)
    assert row["memory"]["applied"]["private"] == {"pages": 16, "bytes": 16 * 4096}
    assert row["state"] == "destroyed"
