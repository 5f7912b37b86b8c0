"""hekitrace.sim.scenarios, simvm and simpages: page lists as the v2 guest builds them, the host's
answers, the layout, the scenarios."""

from __future__ import annotations

import itertools
import random

from hekitrace.config.abi import HEKI_V2
from hekitrace.sim import scenarios as sim
from hekitrace.sim.guest import SimVm
from hekitrace.sim.page_lists import build_page_list, load_layout
from hekitrace.state.events import AttrApplied, CrPinRequest, Memslot, ProtectEntry, ProtectRequest

PAGE = 4096


def _pool():
    return (0x500000 + i * PAGE for i in itertools.count())


def test_page_list_merges_adjacent_equal_permissions():
    ranges = [(0x1000, 0x2000, 3), (0x2000, 0x3000, 3), (0x3000, 0x4000, 5),
              (0x5000, 0x6000, 5)]
    head, entries, pages = build_page_list(ranges, _pool())
    assert pages == 1 and head == 0x500000
    assert entries == (ProtectEntry(0x1000, 0x3000, 3), ProtectEntry(0x3000, 0x4000, 5),
                       ProtectEntry(0x5000, 0x6000, 5))


def test_page_list_chains_169_entries_per_page_newest_first():
    ranges = [(i * 2 * PAGE, (i * 2 + 1) * PAGE, 3) for i in range(400)]  # never adjacent
    head, entries, pages = build_page_list(ranges, _pool())
    assert pages == 3
    # the hypercall gets the newest page (the third allocated) ...
    assert head == 0x500000 + 2 * PAGE
    # ... and the host reads it first: entries 338..399, then 169..337, then 0..168
    starts = [e.gpa // (2 * PAGE) for e in entries]
    assert starts == list(range(338, 400)) + list(range(169, 338)) + list(range(169))


def test_page_list_exactly_full_page_needs_no_second_page():
    ranges = [(i * 2 * PAGE, (i * 2 + 1) * PAGE, 3) for i in range(169)]
    assert build_page_list(ranges, _pool())[2] == 1
    assert build_page_list(ranges + [(1 << 30, (1 << 30) + PAGE, 3)], _pool())[2] == 2


def test_layout_comes_from_the_debian_system_map_with_provenance():
    layout = load_layout()
    assert layout.provenance["package"].startswith("linux-image-6.1.0-")
    assert layout.provenance["package"].endswith("-dbg")
    assert len(layout.provenance["deb_sha256"]) == 64
    # linked at 0xffffffff81000000 = phys 16 MiB without KASLR
    assert layout.text[0] == 0x1000000 // PAGE
    assert layout.text[0] < layout.text[1] <= layout.rodata[0] < layout.rodata[1]
    assert layout.rodata[1] <= layout.data[0] < layout.data[1] < layout.image_end_gfn


def _vm(**kw):
    vm = SimVm(random.Random(1), name="t", start_ns=10**18, **kw)
    vm.create()
    return vm


def test_boot_protects_text_rx_and_rodata_r_immutable():
    vm = _vm()
    vm.boot()
    pins = [e for e in vm.events if isinstance(e, CrPinRequest)]
    assert [(p.cr, p.mask) for p in pins] == [(0, 1 << 16), (4, 0x310800)]
    request = next(e for e in vm.events if isinstance(e, ProtectRequest))
    assert request.time_ns > pins[-1].time_ns  # CRs are locked first
    text = vm.layout.text
    assert ProtectEntry(text[0] * PAGE, text[1] * PAGE, 0b1101) in request.entries
    rodata = vm.layout.rodata
    assert ProtectEntry(rodata[0] * PAGE, rodata[1] * PAGE, 0b1001) in request.entries
    applied = {(e.gfn_start, e.gfn_end): e.attributes for e in vm.events
               if isinstance(e, AttrApplied)}
    assert applied[text] == HEKI_V2.guest_to_kvm(0b1101)
    assert applied[rodata] == HEKI_V2.guest_to_kvm(0b1001)


def test_applied_events_split_per_memslot():
    vm = _vm()
    slots = [e for e in vm.events if isinstance(e, Memslot)]
    assert [(s.gpa, s.size_bytes) for s in slots] == [
        (0, 0xA0000), (0x100000, 3 * 2**30 - 0x100000), (4 * 2**30, 2**30)]
    before = len(vm.events)
    # one range over the 3-4 GiB hole: two hooks, none for the hole
    vm.protect([(3 * 2**30 - PAGE, 4 * 2**30 + PAGE, 3)])
    applied = [e for e in vm.events[before:] if isinstance(e, AttrApplied)]
    assert [(a.gfn_start, a.gfn_end) for a in applied] == [
        (3 * 2**30 // PAGE - 1, 3 * 2**30 // PAGE), (2**20, 2**20 + 1)]


def test_immutable_range_is_rejected_and_applies_nothing():
    vm = _vm()
    vm.boot()
    before = len(vm.events)
    lo = vm.layout.rodata[0]
    assert vm.protect([(lo * PAGE, (lo + 2) * PAGE, 3)]) == ["EPERM"]
    assert not [e for e in vm.events[before:] if isinstance(e, AttrApplied)]


def test_host_applies_in_reverse_and_stops_at_first_error():
    vm = _vm()
    g = vm.alloc_pages(3)
    # read order: good A, bad (misaligned), good B: B is applied first, then the error stops
    ranges = [(g[0] * PAGE, (g[0] + 1) * PAGE, 1), (0x1234, 0x2000, 1),
              (g[2] * PAGE, (g[2] + 1) * PAGE, 1)]
    before = len(vm.events)
    _, entries, _ = build_page_list(ranges, _pool())
    assert vm._host_apply(entries, 1) == ["EINVAL"]
    applied = [e for e in vm.events[before:] if isinstance(e, AttrApplied)]
    assert [a.gfn_start for a in applied] == [entries[-1].gpa // PAGE]


def test_unchanged_range_runs_no_hooks():
    vm = _vm()
    vm.boot()
    before = len(vm.events)
    g = vm.alloc_pages(1)[0]
    vm.protect([(g * PAGE, (g + 1) * PAGE, 3)])  # already RW since boot
    assert not [e for e in vm.events[before:] if isinstance(e, AttrApplied)]


def test_without_mbec_the_host_adds_exec_back():
    vm = _vm(mbec=False)
    before = len(vm.events)
    g = vm.alloc_pages(1)[0]
    vm.protect([(g * PAGE, (g + 1) * PAGE, 1)])
    (applied,) = [e for e in vm.events[before:] if isinstance(e, AttrApplied)]
    assert applied.attributes == HEKI_V2.guest_to_kvm(0b101)


def test_simulation_is_deterministic_and_time_ordered():
    a = sim.simulate(["multi-vm", "all-attacks"], seed=7)
    assert a == sim.simulate(["multi-vm", "all-attacks"], seed=7)
    assert a != sim.simulate(["multi-vm", "all-attacks"], seed=8)
    assert all(x.time_ns <= y.time_ns for x, y in itertools.pairwise(a))
    assert len({e.tgid for e in a}) == 3 + len(sim.ATTACKS)


def test_module_load_builds_a_chained_list():
    events = sim.simulate(["module-load-unload"])
    assert max(e.pages for e in events if isinstance(e, ProtectRequest)) >= 2


def test_stress_reaches_its_size():
    events = sim.simulate(["stress"], stress_events=5000)
    assert 5000 <= len(events) < 5200


EXAMPLES = {  # examples/README.md: file -> simulate arguments
    "clean-guest.htrace": ["--scenario", "clean-boot"],
    "attack.jsonl": ["--scenario", "all-attacks"],
    "module-load.jsonl": ["--scenario", "module-load-unload"],
    "confidential-vm.jsonl": ["--scenario", "confidential-vm"],
    "multi-vm.htrace": ["--scenario", "multi-vm"],
}


def test_bundled_examples_regenerate_byte_for_byte(tmp_path, capsys):
    """The committed examples are what `hekitrace simulate` writes today (so they cannot
    go stale when the simulator changes), and simulate is deterministic."""
    import argparse
    from pathlib import Path

    from hekitrace.commands import simulate

    parser = argparse.ArgumentParser()
    simulate.add_parser(parser.add_subparsers())
    examples = Path(__file__).resolve().parents[2] / "examples"
    assert {p.name for p in examples.iterdir() if p.name != "README.md"} == set(EXAMPLES)
    for name, argv in EXAMPLES.items():
        out = tmp_path / name
        assert simulate.run(parser.parse_args(["simulate", *argv, "-w", str(out)])) == 0
        assert out.read_bytes() == (examples / name).read_bytes(), name
        assert f"`hekitrace simulate {' '.join(argv)} -w examples/{name}`" in (
            examples / "README.md").read_text()
