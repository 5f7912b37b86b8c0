"""Host/Guest scenarios: the Heki v2 boot sequence, immutability, CR pins, malformed input."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hekitrace.config.abi import HEKI_V2, AbiProfile
from hekitrace.state.changes import VmKey
from hekitrace.state.events import (
    AttrApplied,
    AttrIoctl,
    CrPinRequest,
    CrWrite,
    Fault,
    Hypercall,
    Lost,
    Memslot,
    ProtectEntry,
    ProtectFlags,
    ProtectRequest,
    VmCreated,
    VmDestroyed,
)
from hekitrace.state.host import REASON_PREEXISTING, Host

R, W, X, I = 1, 2, 4, 8          # guest MEM_ATTR_* bits (docs/heki-abi.md section 3)
KR, KW, KX, KI, KP = 1 << 4, 1 << 5, 1 << 6, 1 << 7, 1 << 3   # KVM attribute bits
PID = 4242
T0 = 1_795_000_000_000_000_000
MBEC = AbiProfile(name="heki-v2-mbec", lock_cr_update=13, protect_memory=14, mbec=True)

# guest layout (gfns): text 0x1000-0x1400, rodata 0x1400-0x1600, data 0x1600-0x1800
TEXT, RODATA, DATA, MODULE = (0x1000, 0x1400), (0x1400, 0x1600), (0x1600, 0x1800), \
    (0x8000, 0x8010)


def entry(gfns: tuple[int, int], perms: int) -> ProtectEntry:
    return ProtectEntry(gfns[0] << 12, gfns[1] << 12, perms)


def request(t: int, *entries: ProtectEntry, flags: int = 0, tgid: int = PID) -> ProtectRequest:
    # entries given in host order; the event holds them in reading order (reversed)
    return ProtectRequest(T0 + t, tgid, tgid + 1, 0x9000, tuple(reversed(entries)),
                          flags=flags, declared_entries=len(entries))


def booted(abi: AbiProfile = MBEC) -> Host:
    host = Host(abi)
    host.apply(VmCreated(T0, PID, PID, name="web1", uuid="u-1", vmm="qemu"))
    host.apply(Memslot(T0 + 1, PID, PID, 0, 0, 0, 1 << 30, 0x7f0000000000))
    host.apply(CrPinRequest(T0 + 2, PID, PID + 1, 0, 1 << 16, 0))
    host.apply(CrPinRequest(T0 + 3, PID, PID + 1, 4, (1 << 20) | (1 << 21), 0))
    host.apply(request(4, entry(TEXT, R | X | I), entry(RODATA, R | I), entry(DATA, R | W)))
    return host


def check_maps(host: Host) -> None:
    for guest in host.guests.values():
        guest.requested.check()
        guest.applied.check()


def test_boot_sequence_builds_requested_map_and_lockdown():
    host = booted()
    guest = host.by_tgid(PID)
    assert list(guest.requested) == [(TEXT[0], TEXT[1], KR | KX | KI),
                                     (RODATA[0], RODATA[1], KR | KI),
                                     (DATA[0], DATA[1], KR | KW)]
    assert guest.pinned_cr == {0: 1 << 16, 4: (1 << 20) | (1 << 21)}
    assert guest.lockdown_ns == T0 + 2      # first CR pin
    assert not guest.degraded
    assert guest.counters["protect_request"] == 1 and guest.counters["cr_pin_request"] == 2
    check_maps(host)


def test_module_load_then_unload_round_trips_to_default_permissions():
    host = booted()
    guest = host.by_tgid(PID)
    c1 = host.apply(request(10, entry(MODULE, R | W)))
    assert [tuple(m) for m in c1.map_changes] == [("requested", *MODULE, 0, KR | KW)]
    c2 = host.apply(request(11, entry(MODULE, R | X)))
    assert [tuple(m) for m in c2.map_changes] == [("requested", *MODULE, KR | KW, KR | KX)]
    host.apply(request(12, entry(MODULE, R | W)))
    assert guest.requested.get(MODULE[0]) == KR | KW
    assert not c1.rejections and not c2.rejections
    check_maps(host)


def test_without_mbec_exec_is_added_back():
    host = booted(HEKI_V2)
    guest = host.by_tgid(PID)
    assert guest.requested.get(RODATA[0]) == KR | KX | KI
    assert guest.requested.get(DATA[0]) == KR | KW | KX


def test_change_to_immutable_range_rejected_without_touching_map():
    host = booted()
    guest = host.by_tgid(PID)
    before = guest.requested.copy()
    change = host.apply(request(20, entry((TEXT[0] + 4, TEXT[0] + 5), R | W)))
    assert [r.errno for r in change.rejections] == ["EPERM"]
    assert change.map_changes == ()
    assert guest.requested == before
    assert guest.counters["rejected_entries"] == 1


def test_processing_stops_at_first_error_earlier_entries_stay():
    host = booted()
    guest = host.by_tgid(PID)
    change = host.apply(request(20, entry(MODULE, R | W), entry(TEXT, R | W),
                                entry((0x9000, 0x9001), R)))
    assert guest.requested.get(MODULE[0]) == KR | KW       # applied before the error
    assert guest.requested.get(0x9000) == 0                # never reached
    assert [r.errno for r in change.rejections] == ["EPERM"]


def test_immutable_overlap_partial_is_rejected_as_a_whole():
    host = booted()
    guest = host.by_tgid(PID)
    change = host.apply(request(20, entry((DATA[0] - 1, DATA[0] + 4), R)))
    assert change.rejections[0].errno == "EPERM"
    assert guest.requested.get(DATA[0]) == KR | KW


def test_cr_pins_only_grow():
    host = booted()
    guest = host.by_tgid(PID)
    change = host.apply(CrPinRequest(T0 + 30, PID, PID, 4, 1 << 11, 0))
    assert change.pin_change == (4, (1 << 20) | (1 << 21), (1 << 20) | (1 << 21) | (1 << 11))
    change = host.apply(CrPinRequest(T0 + 31, PID, PID, 4, 0, 0))
    assert change.pin_change is None
    assert guest.pinned_cr[4] == (1 << 20) | (1 << 21) | (1 << 11)
    host.apply(CrWrite(T0 + 32, PID, PID, 4, 0))
    assert guest.pinned_cr[4] == (1 << 20) | (1 << 21) | (1 << 11)


def test_cr_pin_invalid_register_and_unknown_bits_are_anomalies():
    host = booted()
    c = host.apply(CrPinRequest(T0 + 30, PID, PID, 3, 0xFFFF, 0))
    assert [a.kind for a in c.anomalies] == ["cr_pin_invalid"] and c.pin_change is None
    c = host.apply(CrPinRequest(T0 + 31, PID, PID, 0, (1 << 16) | 1, 0))
    assert [a.kind for a in c.anomalies] == ["cr_pin_unknown_bits"]
    # version query changes nothing
    c = host.apply(CrPinRequest(T0 + 32, PID, PID, 0, 0, 1))
    assert c.pin_change is None and not c.anomalies


@pytest.mark.parametrize("bad, kind, errno", [
    (ProtectEntry(0x5000, 0x4000, R), "end_before_start", "EINVAL"),
    (ProtectEntry(0x5000, 0x5000, R), "end_before_start", "EINVAL"),
    (ProtectEntry(0x5001, 0x6000, R), "entry_misaligned", "EINVAL"),
    (ProtectEntry(0x5000, 0x6000, 0), "zero_permissions", "EINVAL"),
    (ProtectEntry(0x5000, 0x6000, 0x10 | R), "unknown_bits", "EINVAL"),
])
def test_malformed_entries_are_rejected_and_reported(bad, kind, errno):
    host = booted()
    change = host.apply(request(40, bad))
    assert [a.kind for a in change.anomalies] == [kind]
    assert [r.errno for r in change.rejections] == [errno]
    assert change.map_changes == ()


def test_range_past_memslots_is_anomaly_but_modelled():
    host = booted()
    change = host.apply(request(40, entry((1 << 19, (1 << 19) + 2), R)))
    assert [a.kind for a in change.anomalies] == ["outside_memslots"]
    assert host.by_tgid(PID).requested.get(1 << 19) == KR


def test_thousands_of_entries_are_cut_and_degrade_the_guest():
    host = Host(MBEC, max_entries_per_request=100)
    host.apply(VmCreated(T0, PID, PID, name="web1"))
    entries = [entry((0x100000 + 2 * i, 0x100000 + 2 * i + 1), R | W) for i in range(5000)]
    change = host.apply(request(1, *entries))
    assert "too_many_entries" in [a.kind for a in change.anomalies]
    assert len(change.map_changes) == 100
    assert host.by_tgid(PID).degraded
    check_maps(host)


def test_walker_flags_become_anomalies():
    host = booted()
    change = host.apply(request(40, entry(MODULE, R | W),
                                flags=ProtectFlags.LOOP | ProtectFlags.TRUNCATED | 0x1000))
    kinds = {a.kind for a in change.anomalies}
    assert {"list_loop", "list_truncated", "unknown_flags"} <= kinds
    assert change.degraded


def test_random_garbage_never_raises():
    rng = random.Random(7)
    host = booted()
    vals = [0, 1, -1, 0xFFF, 1 << 12, 1 << 52, (1 << 64) - 1, (1 << 64) - 4096, 1 << 70]
    for i in range(3000):
        pick = lambda: rng.choice(vals) if rng.random() < 0.5 else rng.getrandbits(64)
        kind = rng.randrange(5)
        if kind == 0:
            ev = ProtectRequest(T0 + i, PID, 1, pick(), tuple(
                ProtectEntry(pick(), pick(), pick()) for _ in range(rng.randrange(4))),
                flags=pick())
        elif kind == 1:
            ev = AttrApplied(T0 + i, PID, 1, pick(), pick(), pick())
        elif kind == 2:
            ev = AttrIoctl(T0 + i, PID, 1, pick(), pick(), pick(), 0, 0)
        elif kind == 3:
            ev = CrPinRequest(T0 + i, PID, 1, pick(), pick(), pick())
        else:
            ev = Memslot(T0 + i, PID, 1, rng.randrange(4), 0, pick() & ~0xFFF, pick(), 0)
        host.apply(ev)
    assert host.counters["internal_errors"] == 0
    check_maps(host)


def test_applied_hook_sets_full_value_and_ioctl_sets_private_bit():
    host = booted()
    guest = host.by_tgid(PID)
    c = host.apply(AttrApplied(T0 + 50, PID, PID, *TEXT, KR | KX | KI))
    assert [tuple(m) for m in c.map_changes] == [("applied", *TEXT, 0, KR | KX | KI)]
    assert guest.heki_applied_seen
    # private conversion of 16 pages via the VMM ioctl, then back to shared
    c = host.apply(AttrIoctl(T0 + 51, PID, PID, 0x200000, 0x10000, KP, 0, 0))
    assert [tuple(m) for m in c.map_changes] == [("applied", 0x200, 0x210, 0, KP)]
    failed = host.apply(AttrIoctl(T0 + 52, PID, PID, 0x200000, 0x10000, 0, 0, -22))
    assert failed.map_changes == ()
    c = host.apply(AttrIoctl(T0 + 53, PID, PID, 0x200000, 0x10000, 0, 0, 0))
    assert [tuple(m) for m in c.map_changes] == [("applied", 0x200, 0x210, KP, 0)]
    assert guest.applied.get(TEXT[0]) == KR | KX | KI


def test_unknown_tgid_creates_implicit_degraded_guest():
    host = Host(MBEC)
    c = host.apply(Fault(T0, 99, 100, 0, 0x1000, 0x1AA, 0, 2))
    guest = host.by_tgid(99)
    assert guest.preexisting and guest.degraded_reasons == [REASON_PREEXISTING]
    assert c.lifecycle == "created" and c.degraded == (REASON_PREEXISTING,)
    c2 = host.apply(Hypercall(T0 + 1, 99, 100, 12, 0, 0, 0, 0))
    assert c2.degraded == () and guest.counters["hypercall"] == 1


def test_lost_events_degrade_guest_once_per_reason():
    host = booted()
    c = host.apply(Lost(T0 + 5, PID, 0, "ring:control", "full", 3))
    assert c.degraded == ("events lost: ring:control/full",)
    c = host.apply(Lost(T0 + 6, PID, 0, "ring:control", "full", 2))
    assert c.degraded == ()
    assert host.by_tgid(PID).counters["lost_events"] == 5
    assert host.apply(Lost(T0 + 7, 0, 0, "queue", "overflow", 9)).vm is None


def test_late_loss_goes_to_the_newest_destroyed_vm_of_that_pid_and_never_creates_one():
    host = Host(MBEC, grace_period_ns=1000)
    host.apply(VmCreated(T0, PID, PID, name="old"))
    host.apply(VmDestroyed(T0 + 1, PID, PID))
    host.apply(VmCreated(T0 + 2, PID, PID, name="new"))
    host.apply(VmDestroyed(T0 + 3, PID, PID))
    c = host.apply(Lost(T0 + 4, PID, 0, "ring:telemetry", "ring_full", 7))
    assert c.vm == VmKey(PID, T0 + 2) and c.lifecycle is None
    assert host.guests[VmKey(PID, T0 + 2)].counters["lost_events"] == 7
    assert host.guests[VmKey(PID, T0)].counters["lost_events"] == 0
    assert host.by_tgid(PID) is None and len(host.guests) == 2
    host.expire(T0 + 10_000)
    # no VM left for that pid: the loss is the host's, not a new implicit VM's
    c = host.apply(Lost(T0 + 10_001, PID, 0, "ring:telemetry", "ring_full", 5))
    assert c.vm is None and host.guests == {}
    assert host.counters["unattributed_lost_events"] == 5
    assert host.counters["unattributed_events"] == 1

def test_lifecycle_destroy_grace_and_pid_reuse():
    host = Host(MBEC, grace_period_ns=1000)
    host.apply(VmCreated(T0, PID, PID, name="a"))
    old_key = VmKey(PID, T0)
    c = host.apply(VmCreated(T0 + 10, PID, PID, name="b"))
    assert [a.kind for a in c.anomalies] == ["vm_replaced"]
    assert host.guests[old_key].destroyed_ns == T0 + 10
    assert host.by_tgid(PID).name == "b"
    c = host.apply(VmDestroyed(T0 + 20, PID, PID))
    assert c.lifecycle == "destroyed" and host.by_tgid(PID) is None
    assert len(host.guests) == 2
    assert host.expire(T0 + 500) == []
    retired = host.expire(T0 + 1020)
    assert {r.vm for r in retired} == {old_key, VmKey(PID, T0 + 10)}
    assert host.guests == {}


def test_memslot_size_zero_deletes():
    host = booted()
    guest = host.by_tgid(PID)
    host.apply(Memslot(T0 + 9, PID, PID, 0, 0, 0, 0, 0))
    assert guest.memslots == {} and guest.memslot_gfn_ranges() == []


def test_mark_degraded_reports_new_reasons_only():
    host = booted()
    key = host.by_tgid(PID).key
    assert host.mark_degraded(key, "journal gap").degraded == ("journal gap",)
    assert host.mark_degraded(key, "journal gap").degraded == ()


# -- the Heki v2 host model against a naive per-page reading of docs/heki-abi.md section 5 --

_PAGES = 48


def _naive_apply(pages: dict[int, int], entries, abi: AbiProfile) -> list[str]:
    """Per page, in host order, stop at the first error; returns errnos of rejections."""
    for gpa, end_gpa, perms in reversed(entries):
        if gpa % 4096 or end_gpa % 4096:
            return ["EINVAL"]
        if perms == 0 or perms & ~0xF:
            return ["EINVAL"]
        if not abi.mbec:
            perms |= X
        start, end = gpa // 4096, end_gpa // 4096
        if end <= start:
            return ["EINVAL"]
        if any(pages.get(g, 0) & KI for g in range(start, end)):
            return ["EPERM"]
        value = abi.guest_to_kvm(perms)
        for g in range(start, end):
            pages[g] = (pages.get(g, 0) & ~abi.kvm_heki_mask) | value
    return []


_entry = st.builds(
    lambda s, n, perms, skew: ProtectEntry(s * 4096 + skew, (s + n) * 4096, perms),
    st.integers(0, _PAGES - 1), st.integers(-2, 8), st.integers(0, 0x1F),
    st.sampled_from([0] * 9 + [1]))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(_entry, min_size=1, max_size=6), min_size=1, max_size=8),
       st.booleans())
def test_protect_requests_match_naive_heki_host(requests, mbec):
    abi = MBEC if mbec else HEKI_V2
    host = Host(abi)
    host.apply(VmCreated(T0, PID, PID))
    pages: dict[int, int] = {}
    for i, entries in enumerate(requests):
        expected = _naive_apply(pages, entries, abi)
        change = host.apply(ProtectRequest(T0 + i, PID, PID, 0, tuple(entries)))
        assert [r.errno for r in change.rejections] == expected
        guest = host.by_tgid(PID)
        got = {g: guest.requested.get(g) for g in range(_PAGES + 8)}
        assert got == {g: pages.get(g, 0) for g in range(_PAGES + 8)}
        guest.requested.check()


def test_creation_reports_of_one_vm_merge_and_fill_missing_fields():
    from hekitrace.state.host import MERGE_WINDOW_NS
    host = Host(MBEC)
    created = host.apply(VmCreated(T0, PID, PID, vm_fd=7, source="ioctl"))
    assert created.lifecycle == "created"
    c = host.apply(VmCreated(T0 + 5, PID, PID + 1, vm_fd=7, stats_path="/kvm/4243-7",
                             name="web1", uuid="u", vmm="qemu", source="uevent"))
    guest = host.by_tgid(PID)
    assert c.lifecycle is None and c.anomalies == () and c.vm == created.vm
    assert (guest.name, guest.uuid, guest.vmm, guest.stats_path) == ("web1", "u", "qemu",
                                                                     "/kvm/4243-7")
    # fd unknown on one side: merged only within the window
    host.apply(VmCreated(T0 + MERGE_WINDOW_NS, PID, PID, name="other", source="uevent"))
    assert len(host.guests) == 1 and guest.name == "web1"  # filled fields are kept
    late = host.apply(VmCreated(T0 + MERGE_WINDOW_NS + 1, PID, PID, source="uevent"))
    assert late.lifecycle == "created" and len(host.guests) == 2
    assert host.counters["merged_creations"] == 2


def test_an_implicit_guest_is_replaced_not_merged_into():
    host = Host(MBEC)
    host.apply(Hypercall(T0, PID, PID, 0x99, 0, 0, 0, 0))  # implicit, degraded guest
    c = host.apply(VmCreated(T0 + 1, PID, PID, vm_fd=3, source="ioctl"))
    assert c.lifecycle == "created" and not host.by_tgid(PID).degraded
    assert host.counters["merged_creations"] == 0
