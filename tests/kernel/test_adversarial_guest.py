"""Hostile guests through the real BPF programs: the test process is the VMM
(tests/vmm.py) and plays the guest's part by writing its "guest memory" and driving the
hypercall program with BPF_PROG_TEST_RUN (docs/kernel-support.md section 3).

* Random page-list pages (hypothesis): whatever the guest writes, the walker reports one
  ProtectRequest whose entries are exactly those of the first ``pages`` pages of the
  chain as a reference walk in Python reads them, never more than ``max_list_pages``
  pages, never more than 169 entries a page, and the whole request goes through the
  Pipeline without an exception.
* Edge lists: a chain of exactly the maximum length (not truncated), a list page on the
  last page of a memslot and on the first page after it, zero-length / end-before-start
  ranges, all-ones permission bits.
* A hypercall storm with random numbers and arguments: every call is an event or a
  counted loss, for this VM only, and the Pipeline digests all of it.
(tests/kernel/test_bpf_capture.py already covers cycles, self-loops, npages = 100000,
GPAs outside every memslot and over-long chains one case each.)
"""

from __future__ import annotations

import os
import random
import struct
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hekitrace.capture import loader, testrun
from hekitrace.capture.engine import Capture
from hekitrace.config.abi import DEFAULT_PROFILE
from hekitrace.config.settings import default_config
from hekitrace.pipeline import Pipeline
from hekitrace.state.events import (
    CrPinRequest,
    Fault,
    Hypercall,
    Lost,
    ProtectFlags,
    ProtectRequest,
    VmCreated,
)
from tests.fuzz.fuzzbudget import budget
from tests.vmm import PAGE, Vmm

pytestmark = pytest.mark.kernel

PROTECT = DEFAULT_PROFILE.protect_memory
LOCK_CR = DEFAULT_PROFILE.lock_cr_update
BASE = 0x100000
SLOT_PAGES = 32
MAX_PAGES = 8
HDR = struct.Struct("<QQQ")


@pytest.fixture(scope="module")
def cap():
    s = loader.CaptureSettings(max_list_pages=MAX_PAGES)
    c = Capture(settings=s, required={"hypercall": True, "ioctl": True},
                say=lambda m: None).start()
    yield c
    c.close()


@pytest.fixture(scope="module")
def vm(cap):
    with Vmm() as v:
        v.add_memslot(BASE, SLOT_PAGES * PAGE)
        yield v
    cap.forget_vm(os.getpid())


def mine(cap: Capture, kind=None) -> list:
    evs = [e for e in cap.read() if e.tgid == os.getpid()]
    return [e for e in evs if kind is None or isinstance(e, kind)]


def protect(cap: Capture, a0: int) -> ProtectRequest:
    mine(cap)
    testrun.run_raw_tracepoint(cap.program_fd("hk_hypercall_raw"), [PROTECT, a0, 0, 0, 0])
    reqs = mine(cap, ProtectRequest)
    assert len(reqs) == 1, reqs
    return reqs[0]


def reference_pages(vm: Vmm, head: int, count: int) -> list[tuple[int, list[tuple]]]:
    """(npages, entries) of the first ``count`` pages following next_pa from ``head``."""
    out = []
    gpa = head
    for _ in range(count):
        page = vm.read_gpa(gpa, PAGE)     # ValueError if the walker read outside memory
        _next_va, next_pa, npages = HDR.unpack_from(page)
        n = min(npages, 169)
        out.append((npages, [struct.unpack_from("<QQQ", page, 24 + 24 * i)
                             for i in range(n)]))
        gpa = next_pa
    return out


def feed(events) -> None:
    pipe = Pipeline(default_config())
    for ev in events:
        pipe.feed(ev)
    pipe.tick(2**63)


ENTRY_VALUE = st.sampled_from([0, 1, 0xFFF, 0x1000, BASE, 2**52 - 1, 2**63, 2**64 - 1]) \
    | st.integers(0, 2**64 - 1)


@st.composite
def list_page(draw) -> bytes:
    """A page the guest wrote: plausible header or random bytes."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(min_size=PAGE, max_size=PAGE))
    next_pa = draw(st.sampled_from(
        [0, 0, BASE + draw(st.integers(0, SLOT_PAGES - 1)) * PAGE,      # inside, maybe a loop
         BASE + SLOT_PAGES * PAGE,                                     # first page after
         BASE - PAGE, BASE + 8, 2**64 - PAGE, 2**64 - 1]))
    npages = draw(st.sampled_from([0, 1, 2, 168, 169, 170, 1000, 2**32, 2**64 - 1])
                  | st.integers(0, 200))
    page = bytearray(PAGE)
    HDR.pack_into(page, 0, draw(st.integers(0, 2**64 - 1)), next_pa, npages)
    for i in range(draw(st.integers(0, 169))):
        struct.pack_into("<QQQ", page, 24 + 24 * i, draw(ENTRY_VALUE), draw(ENTRY_VALUE),
                         draw(ENTRY_VALUE))
    return bytes(page)


@given(pages=st.lists(list_page(), min_size=1, max_size=MAX_PAGES + 3),
       head=st.integers(0, SLOT_PAGES - 1))
@budget(60)
def test_random_list_pages_are_walked_within_bounds(cap, vm, pages, head):
    for i, page in enumerate(pages):
        vm.write_gpa(BASE + ((head + i) % SLOT_PAGES) * PAGE, page)
    r = protect(cap, BASE + head * PAGE)
    assert 0 <= r.pages <= MAX_PAGES
    walked = reference_pages(vm, r.list_gpa, r.pages)
    assert [tuple(e) for e in r.entries] == [e for _, es in walked for e in es]
    assert r.declared_entries == sum(n for n, _ in walked) or \
        r.flags & (ProtectFlags.NPAGES_OVERSIZE | ProtectFlags.LOOP | ProtectFlags.TRUNCATED)
    assert not r.flags & ProtectFlags.LOST_PAGES
    feed([VmCreated(r.time_ns - 1, r.tgid, r.tid, 3, "", source="ioctl"), r])


def test_chain_of_exactly_the_maximum_length_is_not_truncated(cap, vm):
    gpas = [BASE + PAGE * (i + 1) for i in range(MAX_PAGES)]
    for i, g in enumerate(gpas):
        vm.write_list_page(g, [(0x200000 + i * PAGE, 0x201000 + i * PAGE, 5)] * 169,
                           next_pa=gpas[i + 1] if i + 1 < len(gpas) else 0)
    r = protect(cap, gpas[0])
    assert r.flags == 0 and r.pages == MAX_PAGES and len(r.entries) == MAX_PAGES * 169


def test_list_page_on_the_last_page_of_the_slot_and_just_after(cap, vm):
    last = BASE + (SLOT_PAGES - 1) * PAGE
    vm.write_list_page(last, [(0x300000, 0x301000, 5)], next_pa=last + PAGE)
    r = protect(cap, last)
    assert r.pages == 1 and len(r.entries) == 1
    assert r.flags == ProtectFlags.OUTSIDE_MEMSLOT
    r = protect(cap, BASE - PAGE)           # just below the slot
    assert r.flags == ProtectFlags.OUTSIDE_MEMSLOT and r.pages == 0


@pytest.mark.parametrize("entry", [
    (0x400000, 0x400000, 5),            # zero length
    (0x500000, 0x4ff000, 5),            # end before start
    (0x600000, 0x601000, 2**64 - 1),    # every permission bit, and unknown ones
    (2**64 - PAGE, 2**64 - 1, 1),       # at the top of the address space
    (0x700001, 0x700fff, 1),            # not page aligned
], ids=["zero-length", "end-before-start", "all-ones-bits", "top-of-space", "misaligned"])
def test_degenerate_entry_is_a_malformed_request_finding(cap, vm, entry):
    vm.write_list_page(BASE + PAGE, [(0x800000, 0x801000, 5), entry])
    r = protect(cap, BASE + PAGE)
    assert [tuple(e) for e in r.entries] == [(0x800000, 0x801000, 5), entry]  # verbatim
    pipe = Pipeline(default_config())
    pipe.feed(VmCreated(r.time_ns - 1, r.tgid, r.tid, 3, "", source="ioctl"))
    findings = pipe.feed(r)
    assert [f.rule for f in findings] == ["malformed_request"], findings
    guest = pipe.host.by_tgid(r.tgid)
    assert list(guest.requested) == [], "a rejected request must change nothing"


def test_hypercall_storm_with_random_arguments_is_all_events_or_counted_losses(cap, vm):
    rng = random.Random(11)
    fd = cap.program_fd("hk_hypercall_raw")
    mine(cap)
    sent = 3000
    numbers = [PROTECT, LOCK_CR, 0, 1, 5, 12, 13, 15, 2**32 - 1, 2**64 - 1]
    for _ in range(sent):
        nr = rng.choice(numbers) if rng.random() < 0.8 else rng.getrandbits(64)
        args = [rng.choice([0, BASE, BASE + PAGE, 2**64 - 1, rng.getrandbits(64)])
                for _ in range(4)]
        testrun.run_raw_tracepoint(fd, [nr, *args])
    events = []
    for _ in range(5):
        events += mine(cap)
    calls = sum(1 for e in events if isinstance(e, (Hypercall, CrPinRequest, ProtectRequest)))
    lost = sum(e.count for e in events if isinstance(e, Lost))
    assert calls + lost == sent, (calls, lost)
    feed([VmCreated(events[0].time_ns - 1, os.getpid(), os.getpid(), 3, "", source="ioctl"),
          *events])


def test_guest_spinning_on_a_protected_page_gets_one_record_per_interval(cap):
    """A vCPU hammering a write-protected text page: the fault program counts in the
    kernel and emits at most one record per report interval; the counts (plus the storm
    flush) add up to every fault."""
    pid = os.getpid()
    gfn = 0x23456
    cap.protect_filter_update(pid, [(gfn, gfn + 1)])
    fd = cap.program_fd("hk_fault_raw")
    interval = cap.settings.fault_report_interval_seconds
    try:
        mine(cap)
        spins = 0
        start = time.monotonic()
        while time.monotonic() - start < 2.5 * interval:
            for _ in range(500):
                testrun.run_raw_tracepoint(fd, [0, gfn << 12, 0x1AA])   # VMX write fault
            spins += 500
        elapsed = time.monotonic() - start
        faults = [e for e in mine(cap, Fault) if e.gpa >> 12 == gfn]
        time.sleep(interval + 0.1)
        faults += [e for e in cap.flush_storms() if e.tgid == pid and e.gpa >> 12 == gfn]
        assert sum(f.count for f in faults) == spins
        assert len(faults) <= elapsed / interval + 2, (len(faults), spins)
    finally:
        cap.protect_filter_update(pid, [])


def test_regression_forget_vm_removes_the_vms_loss_entries():
    s = loader.CaptureSettings(telemetry_ring_bytes=4096)
    c = Capture(settings=s, required={"hypercall": False, "ioctl": False}, attach=False,
                say=lambda m: None).start()
    try:
        fd = c.program_fd("hk_hypercall_raw")
        for i in range(200):                       # 64 records fit: the rest are lost
            testrun.run_raw_tracepoint(fd, [0x10001, i, 0, 0, 0])
        lost = sum(e.count for e in c.read() + c.read()
                   if isinstance(e, Lost) and e.tgid == os.getpid())
        assert lost > 0
        c.forget_vm(os.getpid())
        keys = [k.tgid for k in c.bpf[b"hk_loss"]]
        assert os.getpid() not in keys, "the dead VM's loss entries stay in hk_loss"
    finally:
        c.close()


def kernel_losses(c: Capture, tgid: int) -> int:
    return sum(sum(v) for k, v in c.bpf[b"hk_loss"].items() if k.tgid == tgid)


def test_forget_vm_reports_unread_losses_and_a_reused_pid_reports_all_of_its_own():
    s = loader.CaptureSettings(telemetry_ring_bytes=4096)
    c = Capture(settings=s, required={"hypercall": False, "ioctl": False}, attach=False,
                say=lambda m: None).start()
    pid = os.getpid()
    try:
        fd = c.program_fd("hk_hypercall_raw")
        for i in range(200):
            testrun.run_raw_tracepoint(fd, [0x10001, i, 0, 0, 0])
        unread = kernel_losses(c, pid)
        assert unread > 0
        final = c.forget_vm(pid)           # nothing polled yet: the final read has it all
        assert all(isinstance(e, Lost) and e.tgid == pid for e in final)
        assert sum(e.count for e in final) == unread
        c.read(), c.read()                 # drain the ring
        for i in range(200):               # "the same pid, a new VM"
            testrun.run_raw_tracepoint(fd, [0x10001, i, 0, 0, 0])
        again = kernel_losses(c, pid)
        assert again > 0
        reported = sum(e.count for e in c.poll_losses() if e.tgid == pid)
        assert reported == again, (reported, again, unread)
    finally:
        c.forget_vm(pid)
        c.close()
