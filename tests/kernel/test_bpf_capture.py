"""Kernel tests of the capture programs: the test process is the VMM (tests/vmm.py) and
drives the KVM tracepoint programs with BPF_PROG_TEST_RUN (they never fire on this host:
docs/kernel-support.md section 2). Every assertion is on events decoded from the real rings."""

from __future__ import annotations

import ctypes
import os
import struct
import time

import pytest

from hekitrace.capture import loader, testrun
from hekitrace.capture.engine import Capture
from hekitrace.config.abi import DEFAULT_PROFILE
from hekitrace.state.events import (
    AttrApplied,
    AttrIoctl,
    CrPinRequest,
    CrWrite,
    Fault,
    FaultAccess,
    Memslot,
    ProtectFlags,
    ProtectRequest,
    VmCreated,
)
from tests.vmm import Vmm

pytestmark = pytest.mark.kernel

PROTECT = DEFAULT_PROFILE.protect_memory
LOCK_CR = DEFAULT_PROFILE.lock_cr_update
BASE = 0x100000
MAX_PAGES = 16


def _capture(**settings) -> Capture:
    s = loader.CaptureSettings(**{"max_list_pages": MAX_PAGES,
                                  "fault_report_interval_seconds": 0.3, **settings})
    return Capture(settings=s, required={"hypercall": True, "ioctl": True},
                   extra_cflags=("-DHK_WITH_FLOOD",), say=lambda m: None).start()


@pytest.fixture(scope="module")
def cap():
    c = _capture()
    yield c
    c.close()


@pytest.fixture()
def vm(cap):
    with Vmm() as v:
        v.add_memslot(BASE, 1 << 20)            # slot 0: 256 pages
        v.add_memslot(0x40000000, 64 * 4096)    # slot 1
        yield v
    cap.forget_vm(os.getpid())


def mine(cap: Capture, kind=None) -> list:
    """Events of this process (other tests may run VMMs too)."""
    evs = [e for e in cap.read() if e.tgid == os.getpid()]
    return [e for e in evs if kind is None or isinstance(e, kind)]


def hypercall(cap: Capture, nr: int, a0=0, a1=0, a2=0, a3=0) -> None:
    testrun.run_raw_tracepoint(cap.program_fd("hk_hypercall_raw"), [nr, a0, a1, a2, a3])


def test_every_program_passes_the_verifier(cap):
    for name in ("hk_hypercall_raw", "hk_hypercall_tp", "hk_ioctl_enter", "hk_ioctl_exit",
                 "hk_fault_raw", "hk_fault_tp", "hk_cr_raw", "hk_cr_tp", "hk_attr_raw",
                 "hk_attr_kprobe", "hk_flood"):
        assert cap.program_fd(name) > 0, name
    status = cap.hook_status()
    assert status["hypercall"].method == "raw_tracepoint"
    assert status["ioctl"].method == "tracepoint"
    assert status["page_fault"].method == "raw_tracepoint"
    assert status["cr"].method == "raw_tracepoint"
    # here the attr function is absent: both methods tried, both reasons kept
    if not status["attr_applied"].attached:
        assert "fentry" in status["attr_applied"].reason
        assert "kprobe" in status["attr_applied"].reason


def test_vm_memslots_and_attribute_ioctl_are_seen(cap):
    mine(cap)
    with Vmm() as v:
        v.add_memslot(BASE, 1 << 20)
        v.add_memslot(0x40000000, 8 * 4096, slot=5)
        err = v.set_memory_attributes(BASE, 4096, 1 << 3)
        evs = mine(cap)
        created = [e for e in evs if isinstance(e, VmCreated)]
        assert [(e.vm_fd, e.source) for e in created] == [(v.vm_fd, "ioctl")]
        slots = [(e.slot, e.gpa, e.size_bytes, e.hva) for e in evs if isinstance(e, Memslot)]
        assert slots == [(0, BASE, 1 << 20, v.slots[0].hva),
                         (5, 0x40000000, 8 * 4096, v.slots[5].hva)]
        attrs = [e for e in evs if isinstance(e, AttrIoctl)]
        assert len(attrs) == 1
        assert (attrs[0].address, attrs[0].size_bytes, attrs[0].attributes) == (BASE, 4096, 8)
        assert err < 0, ("this kernel has no KVM_CAP_MEMORY_ATTRIBUTES "
                         "(docs/kernel-support.md section 2)")
        assert attrs[0].result == err
    cap.forget_vm(os.getpid())


def test_failed_memslot_is_not_reported(cap, vm):
    mine(cap)
    with pytest.raises(OSError):
        vm.add_memslot(BASE + 4096, 4096, slot=9)    # overlaps slot 0: EEXIST
    assert mine(cap, Memslot) == []


def _entries(n: int) -> list[tuple[int, int, int]]:
    return [(0x200000 + i * 0x2000, 0x200000 + i * 0x2000 + 0x1000, (i % 15) + 1)
            for i in range(n)]


def test_two_page_list_of_200_entries_decodes_exactly(cap, vm):
    entries = _entries(200)
    head = vm.write_heki_list([BASE + 0x3000, BASE + 0x7000], entries)
    mine(cap)
    hypercall(cap, PROTECT, head, 0xdead)
    reqs = mine(cap, ProtectRequest)
    assert len(reqs) == 1
    r = reqs[0]
    assert r.list_gpa == head and r.pages == 2 and r.flags == 0
    assert r.declared_entries == 200
    assert [tuple(e) for e in r.entries] == entries


def test_looping_chain_is_cut_and_flagged(cap, vm):
    a, b = BASE + 0x1000, BASE + 0x2000
    vm.write_list_page(a, _entries(3), next_pa=b)
    vm.write_list_page(b, _entries(2), next_pa=a)
    mine(cap)
    hypercall(cap, PROTECT, a)
    (r,) = mine(cap, ProtectRequest)
    assert r.flags & ProtectFlags.LOOP
    assert r.pages == 2 and len(r.entries) == 5


def test_self_loop_is_cut(cap, vm):
    a = BASE + 0x1000
    vm.write_list_page(a, _entries(1), next_pa=a)
    mine(cap)
    hypercall(cap, PROTECT, a)
    (r,) = mine(cap, ProtectRequest)
    assert r.flags == ProtectFlags.LOOP and r.pages == 1


def test_oversized_npages_is_bounded(cap, vm):
    a = BASE + 0x1000
    vm.write_list_page(a, _entries(169), npages=100000)
    mine(cap)
    hypercall(cap, PROTECT, a)
    (r,) = mine(cap, ProtectRequest)
    assert r.flags & ProtectFlags.NPAGES_OVERSIZE
    assert len(r.entries) == 169 and r.declared_entries == 100000


def test_gpa_outside_every_memslot(cap, vm):
    mine(cap)
    hypercall(cap, PROTECT, 0x80000000)
    (r,) = mine(cap, ProtectRequest)
    assert r.flags == ProtectFlags.OUTSIDE_MEMSLOT and r.pages == 0 and r.entries == ()


def test_chain_leaving_the_memslots_midway(cap, vm):
    a = BASE + 0x1000
    vm.write_list_page(a, _entries(4), next_pa=0x90000000)
    mine(cap)
    hypercall(cap, PROTECT, a)
    (r,) = mine(cap, ProtectRequest)
    assert r.flags == ProtectFlags.OUTSIDE_MEMSLOT and r.pages == 1 and len(r.entries) == 4


def test_misaligned_list_gpa(cap, vm):
    mine(cap)
    hypercall(cap, PROTECT, BASE + 0x1008)
    (r,) = mine(cap, ProtectRequest)
    assert r.flags == ProtectFlags.MISALIGNED_LIST and r.pages == 0


def test_too_long_chain_is_truncated(cap, vm):
    gpas = [BASE + 0x1000 * (i + 1) for i in range(MAX_PAGES + 4)]
    for i, g in enumerate(gpas):
        vm.write_list_page(g, _entries(1), next_pa=gpas[i + 1] if i + 1 < len(gpas) else 0)
    mine(cap)
    hypercall(cap, PROTECT, gpas[0])
    (r,) = mine(cap, ProtectRequest)
    assert r.flags == ProtectFlags.TRUNCATED and r.pages == MAX_PAGES
    assert len(r.entries) == MAX_PAGES


def test_memslot_in_second_slot_and_deleted_slot(cap, vm):
    g = 0x40000000 + 0x3000
    vm.write_list_page(g, _entries(2))
    mine(cap)
    hypercall(cap, PROTECT, g)
    (r,) = mine(cap, ProtectRequest)
    assert r.flags == 0 and len(r.entries) == 2
    vm.delete_memslot(1)
    hypercall(cap, PROTECT, g)
    (r,) = mine(cap, ProtectRequest)
    assert r.flags == ProtectFlags.OUTSIDE_MEMSLOT


def test_lock_cr_update_goes_to_control_as_pin_request(cap):
    mine(cap)
    hypercall(cap, LOCK_CR, 4, (1 << 20) | (1 << 21), 0)
    hypercall(cap, 0x77, 1, 2, 3, 4)
    evs = mine(cap)
    pins = [e for e in evs if isinstance(e, CrPinRequest)]
    assert [(p.cr, p.mask, p.flags) for p in pins] == [(4, (1 << 20) | (1 << 21), 0)]
    others = [(e.nr, e.a0, e.a3) for e in evs if type(e).__name__ == "Hypercall"]
    assert others == [(0x77, 1, 4)]


def fault(cap, gpa: int, ec: int, prog="hk_fault_raw") -> None:
    testrun.run_raw_tracepoint(cap.program_fd(prog), [0, gpa, ec])


def test_fault_filter_and_storm_counting(cap):
    pid = os.getpid()
    gfn = 0x12345
    assert cap.protect_filter_update(pid, [(gfn, gfn + 3)]) == 1   # one 2 MiB bucket
    mine(cap)
    fault(cap, (gfn + 3) << 12, 0x1AA)          # outside the filter
    fault(cap, gfn << 12, 0x181)                 # a read: never reported
    assert mine(cap, Fault) == []
    fault(cap, (gfn << 12) + 0x10, 0x1AA)        # write to a present R-X page (VMX)
    (f,) = mine(cap, Fault)
    assert f.gpa == (gfn << 12) + 0x10 and f.access == FaultAccess.WRITE
    assert f.count == 1 and f.error_code == 0x1AA
    for _ in range(99):
        fault(cap, gfn << 12, 0x1AA)
    assert mine(cap, Fault) == [], "a storm is counted in the kernel, not streamed"
    time.sleep(0.35)
    fault(cap, gfn << 12, 0x1AA)
    (f,) = mine(cap, Fault)
    assert f.count == 100 and f.first_ns <= f.time_ns
    for _ in range(7):                           # a storm that stops: flushed from userspace
        fault(cap, (gfn + 1) << 12, 0x1AA)
    (f,) = mine(cap, Fault)
    assert f.count == 1 and f.gpa == (gfn + 1) << 12
    time.sleep(0.35)
    flushed = [e for e in cap.flush_storms() if e.tgid == pid]
    assert [(e.gpa, e.count, e.access) for e in flushed] == [((gfn + 1) << 12, 6, 2)]
    assert cap.flush_storms() == []
    cap.protect_filter_update(pid, [])
    time.sleep(0.35)
    fault(cap, gfn << 12, 0x1AA)
    assert mine(cap, Fault) == []


def test_fault_filter_reports_only_the_access_asked_for(cap):
    pid = os.getpid()
    cap.protect_filter_update(pid, [(0x500, 0x501, int(FaultAccess.FETCH))])
    mine(cap)
    fault(cap, 0x500 << 12, 0x1AA)               # write: not asked for on this page
    assert mine(cap, Fault) == []
    fault(cap, 0x500 << 12, 0x19C)               # supervisor fetch (VMX, MBEC)
    (f,) = mine(cap, Fault)
    assert f.access == FaultAccess.FETCH
    cap.protect_filter_update(pid, [])


@pytest.mark.parametrize("vendor,ec,access", [
    ("amd", (1 << 0) | (1 << 1), FaultAccess.WRITE),
    ("amd", (1 << 0) | (1 << 4), FaultAccess.FETCH),
    ("amd", (1 << 0) | (1 << 32), None),         # read on SVM: filtered out
    ("intel", 0x184, FaultAccess.FETCH),
    ("intel", 0x182, FaultAccess.WRITE),
    ("intel", 0x181, None),
])
def test_fault_vendor_decoding(vendor, ec, access):
    c = _vendor_capture(vendor)
    pid = os.getpid()
    gfn = 0x777 + ec % 97
    c.protect_filter_update(pid, [(gfn, gfn + 1)])
    c.read()
    fault(c, gfn << 12, ec)
    got = [e for e in c.read() if isinstance(e, Fault) and e.tgid == pid]
    c.protect_filter_update(pid, [])
    if access is None:
        assert got == []
    else:
        assert len(got) == 1 and got[0].access & (FaultAccess.WRITE | FaultAccess.FETCH) == access


_VENDOR_CAPS: dict[str, Capture] = {}


def _vendor_capture(vendor: str) -> Capture:
    if vendor not in _VENDOR_CAPS:
        s = loader.CaptureSettings(vendor=vendor, control_ring_bytes=65536,
                                   telemetry_ring_bytes=65536)
        _VENDOR_CAPS[vendor] = Capture(settings=s, required={"hypercall": False, "ioctl": False},
                                       attach=False, say=lambda m: None).start()
    return _VENDOR_CAPS[vendor]


@pytest.fixture(scope="module", autouse=True)
def _close_vendor_caps():
    yield
    for c in _VENDOR_CAPS.values():
        c.close()
    _VENDOR_CAPS.clear()


def test_cr_writes_to_cr0_cr4_only(cap):
    mine(cap)
    prog = cap.program_fd("hk_cr_raw")
    for rw, cr, val in ((1, 4, 0x3406E0), (0, 4, 1), (1, 3, 0x1000), (1, 0, 0x80050033)):
        testrun.run_raw_tracepoint(prog, [rw, cr, val])
    got = [(e.cr, e.value) for e in mine(cap, CrWrite)]
    assert got == [(4, 0x3406E0), (0, 0x80050033)]


def test_attr_applied_twin_reads_kvm_gfn_range_by_btf_offsets(cap):
    from hekitrace.capture.btf import Btf
    btf = Btf.load()
    rng = ctypes.create_string_buffer(btf.struct_size("kvm_gfn_range"))
    struct.pack_into("<Q", rng, btf.member_offset("kvm_gfn_range", "start"), 0x1000)
    struct.pack_into("<Q", rng, btf.member_offset("kvm_gfn_range", "end"), 0x1010)
    struct.pack_into("<Q", rng, btf.member_offset("kvm_gfn_range", "arg.attributes"), 0x50)
    mine(cap)
    testrun.run_raw_tracepoint(cap.program_fd("hk_attr_raw"), [0, ctypes.addressof(rng)])
    (a,) = mine(cap, AttrApplied)
    assert (a.gfn_start, a.gfn_end, a.attributes) == (0x1000, 0x1010, 0x50)


def test_event_times_are_epoch_ns(cap):
    mine(cap)
    before = time.time_ns()
    hypercall(cap, 0x55)
    (e,) = [x for x in mine(cap) if type(x).__name__ == "Hypercall"]
    assert before - 50_000_000 <= e.time_ns <= time.time_ns() + 50_000_000


def test_batches_wakes_up_on_a_record(cap):
    cap.read()
    hypercall(cap, LOCK_CR, 0, 1 << 16, 0)
    got = []
    for batch in cap.batches(timeout_seconds=2.0):
        got.extend(e for e in batch if isinstance(e, CrPinRequest) and e.tgid == os.getpid())
        if got:
            break
    assert [(e.cr, e.mask) for e in got] == [(0, 1 << 16)]


def test_seeded_memslots_let_the_walk_read_a_vm_started_earlier(cap, vm):
    head = vm.write_heki_list([BASE + 0x2000], _entries(3))
    cap.forget_vm(os.getpid())                  # as if the ioctls happened before start
    mine(cap)
    hypercall(cap, PROTECT, head)
    (r,) = mine(cap, ProtectRequest)
    assert r.flags == ProtectFlags.OUTSIDE_MEMSLOT
    s = vm.slots[0]
    assert cap.seed_memslots(os.getpid(), [(s.slot, s.gpa, s.size_bytes, s.hva)]) == 1
    hypercall(cap, PROTECT, head)
    (r,) = mine(cap, ProtectRequest)
    assert r.flags == 0 and [tuple(e) for e in r.entries] == _entries(3)
