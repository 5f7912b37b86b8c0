"""A simulated Heki v2 guest and host: the events a real Heki host would show hekitrace.

Real Heki hosts are rare (the series was never merged), so the examples, the policy's
regression suite and the benchmarks run on this model instead. It is faithful where it
matters to hekitrace (heki-kvm.md 1.7-1.11, 5.2):

* the guest's memory is a real kernel's: section boundaries from the System.map of a
  Debian linux-image package (hekitrace/data/kernel-layout-*.json, made by
  scripts/make_kernel_layout.py), converted to physical addresses;
* page lists are built as the v2 guest's ``heki_add_pa()`` builds them: adjacent pages
  with equal permissions merge into one range, a list page holds 169 entries, a full
  page is followed by a new page that becomes the head, and the hypercall gets the
  newest page's GPA; ``ProtectRequest.entries`` are in the order the host reads them
  (head page first);
* the modelled host applies entries in reverse order, checks alignment, permission bits
  and ``end > start`` (-EINVAL) and immutability (-EPERM, the range applies nothing),
  stops at the first error, skips ranges that already match, re-adds EXEC without MBEC,
  and reports each applied range once per memslot it touches (``AttrApplied``), as
  ``kvm_handle_gfn_range`` calls ``kvm_arch_post_set_memory_attributes``.

Everything is deterministic for a given seed. Scenario functions are in
:mod:`hekitrace.sim` too (:data:`SCENARIOS`); each returns a list of events in time order.
"""

from __future__ import annotations

import bisect
import heapq
import json
import random
import uuid as uuid_mod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from importlib import resources

from hekitrace.abi import HEKI_MAX_ENTRIES_PER_PAGE, HEKI_V2, KVM_HC_MAP_GPA_RANGE, AbiProfile
from hekitrace.events import (
    PAGE_SIZE,
    AttrApplied,
    AttrIoctl,
    CrPinRequest,
    CrWrite,
    Event,
    Fault,
    FaultAccess,
    Hypercall,
    Memslot,
    ProtectEntry,
    ProtectFlags,
    ProtectRequest,
    VmCreated,
    VmDestroyed,
)

DEFAULT_LAYOUT = "kernel-layout-debian-6.1.json"
#: 2026-11-25T15:00:00Z: the default start of simulated traces (any fixed value would do)
DEFAULT_START_NS = 1_795_618_800 * 1_000_000_000
GIB = 1 << 30
MIB = 1 << 20

# x86 control registers (arch/x86/include/uapi/asm/processor-flags.h)
X86_CR0_WP = 1 << 16
X86_CR4_UMIP, X86_CR4_FSGSBASE, X86_CR4_SMEP, X86_CR4_SMAP, X86_CR4_CET = (
    1 << 11, 1 << 16, 1 << 20, 1 << 21, 1 << 23)
X86_CR4_PGE = 1 << 7
#: PE|MP|ET|NE|WP|AM|PG: a booted x86-64 Linux guest's CR0
GUEST_CR0 = 0x80050033
#: PSE|PAE|MCE|PGE|OSFXSR|OSXMMEXCPT|UMIP|FSGSBASE|PCIDE|OSXSAVE|SMEP|SMAP
GUEST_CR4 = 0x370EF0
#: cr4_pinned_mask of Heki v2 (heki-kvm.md 1.11)
CR4_PINNED_MASK = X86_CR4_SMEP | X86_CR4_SMAP | X86_CR4_UMIP | X86_CR4_FSGSBASE | X86_CR4_CET

# VMX EPT-violation exit qualification bits (SDM 28.3.3.2): access W=1, fetch=2; the
# entry was readable=3, writable=4, executable=5; GLA valid=7, translation=8
EPT_WRITE, EPT_FETCH = 1 << 1, 1 << 2
EPT_READABLE, EPT_WRITABLE, EPT_EXECUTABLE = 1 << 3, 1 << 4, 1 << 5
EPT_GLA_VALID = (1 << 7) | (1 << 8)

#: upstream KVM_MEM_GUEST_MEMFD (include/uapi/linux/kvm.h)
KVM_MEM_GUEST_MEMFD = 1 << 2
#: upstream KVM_MAP_GPA_RANGE_ENCRYPTED (include/uapi/linux/kvm_para.h)
KVM_MAP_GPA_RANGE_ENCRYPTED = 1 << 4
#: KVM_HC_KICK_CPU, KVM_HC_SEND_IPI: ordinary hypercalls of a busy guest
KVM_HC_KICK_CPU, KVM_HC_SEND_IPI = 5, 10
EINVAL = 22


@dataclass(frozen=True)
class KernelLayout:
    """Physical page ranges of one kernel image (gfns, half open) and where they came from."""

    text: tuple[int, int]
    rodata: tuple[int, int]
    data: tuple[int, int]
    image_end_gfn: int
    provenance: dict


def load_layout(name: str = DEFAULT_LAYOUT) -> KernelLayout:
    """Read a layout shipped in hekitrace/data (text and rodata rounded out to pages)."""
    raw = json.loads(resources.files("hekitrace").joinpath("data", name).read_text())
    phys = {sym: int(v["phys"], 16) for sym, v in raw["symbols"].items()}

    def span(start: str, end: str) -> tuple[int, int]:
        return phys[start] // PAGE_SIZE, -(-phys[end] // PAGE_SIZE)

    return KernelLayout(text=span("_text", "_etext"), rodata=span("__start_rodata",
                                                                  "__end_rodata"),
                        data=span("_sdata", "_edata"), image_end_gfn=-(-phys["_end"] // PAGE_SIZE),
                        provenance=dict(raw["provenance"]))


class _RangeMap:
    """Half-open gfn ranges to a value (0 = nothing stored): the simulated host's xarray.

    Small and simple on purpose: it is the model's reference, independent of
    hekitrace.attrmap, so a bug there cannot hide in both.
    """

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.values: list[int] = []

    def segments(self, start: int, end: int) -> Iterator[tuple[int, int, int]]:
        i = max(0, bisect.bisect_right(self.starts, start) - 1)
        pos = start
        while pos < end:
            if i < len(self.starts) and self.starts[i] < end and self.ends[i] > pos:
                if self.starts[i] > pos:
                    yield pos, self.starts[i], 0
                    pos = self.starts[i]
                stop = min(end, self.ends[i])
                yield pos, stop, self.values[i]
                pos = stop
                i += 1
            elif i < len(self.starts) and self.ends[i] <= pos:
                i += 1
            else:
                yield pos, end, 0
                pos = end

    def set(self, start: int, end: int, value: int, mask: int) -> None:
        pieces = [(s, e, (v & ~mask) | (value & mask)) for s, e, v in self.segments(start, end)]
        lo = max(0, bisect.bisect_right(self.starts, start) - 1)
        hi = bisect.bisect_left(self.starts, end)
        keep: list[tuple[int, int, int]] = []
        for i in range(lo, hi):
            s, e, v = self.starts[i], self.ends[i], self.values[i]
            if e <= start or s >= end:
                keep.append((s, e, v))
                continue
            if s < start:
                keep.append((s, start, v))
            if e > end:
                keep.append((end, e, v))
        merged = sorted(keep + [p for p in pieces if p[2]])
        out: list[tuple[int, int, int]] = []
        for s, e, v in merged:
            if out and out[-1][1] == s and out[-1][2] == v:
                out[-1] = (out[-1][0], e, v)
            else:
                out.append((s, e, v))
        self.starts[lo:hi] = [p[0] for p in out]
        self.ends[lo:hi] = [p[1] for p in out]
        self.values[lo:hi] = [p[2] for p in out]


def build_page_list(ranges: list[tuple[int, int, int]], list_page_gpas: Iterator[int],
                    max_entries: int = HEKI_MAX_ENTRIES_PER_PAGE
                    ) -> tuple[int, tuple[ProtectEntry, ...], int]:
    """Build a v2 page list from (gpa, end_gpa, permissions) in the guest's walk order.

    Returns (GPA of the head page given to the hypercall, entries in the host's reading
    order, number of list pages). Mirrors ``heki_add_pa()``: a range adjacent to the last
    entry with equal permissions extends it; a full page (169 entries) is followed by a
    new one whose ``next_pa`` is the previous head, and the new page becomes the head.
    """
    pages: list[list[list[int]]] = [[]]
    for gpa, end_gpa, perms in ranges:
        current = pages[-1]
        if current and current[-1][1] == gpa and current[-1][2] == perms:
            current[-1][1] = end_gpa
            continue
        if len(current) == max_entries:
            current = []
            pages.append(current)
        current.append([gpa, end_gpa, perms])
    gpas = [next(list_page_gpas) for _ in pages]
    entries = tuple(ProtectEntry(*entry) for page in reversed(pages) for entry in page)
    return gpas[-1], entries, len(pages)


class SimVm:
    """One simulated VM: its VMM process, a Heki v2 guest kernel and the host's view.

    Methods append the events the host would see to :attr:`events`, advancing a private
    clock; time and random choices come from ``rng`` so runs are reproducible.
    """

    def __init__(self, rng: random.Random, *, name: str, start_ns: int,
                 abi: AbiProfile = HEKI_V2, mbec: bool = True, memory_bytes: int = 4 * GIB,
                 layout: KernelLayout | None = None, vcpus: int = 4,
                 confidential: bool = False) -> None:
        self.rng = rng
        self.abi = replace(abi, mbec=mbec) if abi.mbec != mbec else abi
        self.layout = layout or load_layout()
        self.name = name
        self.tgid = rng.randrange(1000, 4_000_000)
        self.uuid = str(uuid_mod.UUID(int=rng.getrandbits(128), version=4))
        self.vcpus = vcpus
        self.now = start_ns
        self.events: list[Event] = []
        self.attrs = _RangeMap()
        self.confidential = confidential
        self.perm = {"r": 1 << abi.guest_read, "w": 1 << abi.guest_write,
                     "x": 1 << abi.guest_exec, "i": 1 << abi.guest_immutable}
        low = min(memory_bytes, 3 * GIB)
        # QEMU pc/q35 layout: conventional memory, RAM from 1 MiB up to the PCI hole at
        # 3 GiB, the rest above 4 GiB
        self.slots = [(0, 0, 0xA0000), (1, 0x100000, low - 0x100000)]
        if memory_bytes > low:
            self.slots.append((2, 4 * GIB, memory_bytes - low))
        self._used: set[int] = set()
        self._list_pool = self._list_pages()
        self.cr4 = GUEST_CR4
        self.modules: list[dict] = []

    # -- helpers ---------------------------------------------------------------------------
    def _tick(self, low_us: float = 5, high_us: float = 2000) -> int:
        self.now += int(self.rng.uniform(low_us, high_us) * 1000)
        return self.now

    def _vcpu_tid(self) -> int:
        return self.tgid + 1 + self.rng.randrange(self.vcpus)

    def _list_pages(self) -> Iterator[int]:
        """GPAs of list pages: kmalloc'd pages in the kernel's data area after _end."""
        gfn = self.layout.image_end_gfn + 64
        while True:
            yield gfn * PAGE_SIZE
            gfn += 1

    def alloc_pages(self, count: int) -> list[int]:
        """``count`` gfns as vmalloc would get them: scattered runs of 1-4 pages in RAM."""
        out: list[int] = []
        # above the kernel image and the list-page pool
        floor = self.layout.image_end_gfn + 8192
        ram = [(max(gpa // PAGE_SIZE, floor), (gpa + size) // PAGE_SIZE)
               for _, gpa, size in self.slots[1:]]
        while len(out) < count:
            lo, hi = self.rng.choice(ram)
            # mostly single pages, sometimes a few physically adjacent ones
            run = min(1 if self.rng.random() < 0.6 else self.rng.randint(2, 4),
                      count - len(out))
            start = self.rng.randrange(lo, hi - run)
            if any(g in self._used for g in range(start, start + run)):
                continue
            for g in range(start, start + run):
                self._used.add(g)
                out.append(g)
        return out

    def free_pages(self, gfns: list[int]) -> None:
        self._used.difference_update(gfns)

    @staticmethod
    def runs(gfns: list[int], perms: int) -> list[tuple[int, int, int]]:
        """(gpa, end_gpa, perms) per page in walk order (heki_add_pa merges them)."""
        return [(g * PAGE_SIZE, (g + 1) * PAGE_SIZE, perms) for g in gfns]

    # -- VMM-side events -------------------------------------------------------------------
    def create(self) -> None:
        fd = 12 + self.rng.randrange(8)
        self.events.append(VmCreated(self._tick(), self.tgid, self.tgid, fd,
                                     f"/kvm/{self.tgid}-{fd}", self.name, self.uuid,
                                     "qemu-system-x86_64", "sim", False))
        hva = 0x7F0000000000 + self.rng.randrange(1 << 16) * (1 << 24)
        flags = KVM_MEM_GUEST_MEMFD if self.confidential else 0
        for slot, gpa, size in self.slots:
            self.events.append(Memslot(self._tick(1, 20), self.tgid, self.tgid, slot, flags,
                                       gpa, size, hva))
            hva += size + (1 << 21)
        if self.confidential:
            # the VMM makes all RAM private before the first vCPU runs
            total = sum(size for _, _, size in self.slots)
            self._set_attributes(0, self.slots[-1][1] + self.slots[-1][2],
                                 self.abi.kvm_private_mask, self.tgid, ioctl_size=total)

    def destroy(self) -> None:
        self.events.append(VmDestroyed(self._tick(), self.tgid, self.tgid,
                                       f"/kvm/{self.tgid}"))

    def _applied(self, gfn_start: int, gfn_end: int, value: int, tid: int) -> None:
        """One AttrApplied per memslot the range touches (kvm_handle_gfn_range)."""
        for _, gpa, size in self.slots:
            lo = max(gfn_start, gpa // PAGE_SIZE)
            hi = min(gfn_end, (gpa + size) // PAGE_SIZE)
            if lo < hi:
                self.events.append(AttrApplied(self._tick(1, 5), self.tgid, tid, lo, hi, value))

    def _set_attributes(self, gpa: int, end_gpa: int, value: int, tid: int, *,
                        ioctl_size: int | None = None) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES from the VMM (upstream, whole-value set)."""
        start, end = gpa // PAGE_SIZE, end_gpa // PAGE_SIZE
        mask = self.abi.kvm_private_mask
        if not all(v & mask == value for _, _, v in self.attrs.segments(start, end)):
            self.attrs.set(start, end, value, mask)
            self._applied(start, end, value, tid)
        self.events.append(AttrIoctl(self._tick(1, 10), self.tgid, tid, gpa,
                                     end_gpa - gpa, value, 0, 0))

    # -- Heki hypercalls -------------------------------------------------------------------
    def lock_cr(self) -> None:
        """End of boot: pin CR0.WP and the pinnable CR4 bits the guest runs with."""
        tid = self._vcpu_tid()
        self.events.append(CrPinRequest(self._tick(), self.tgid, tid, 0, X86_CR0_WP, 0))
        self.events.append(CrPinRequest(self._tick(1, 10), self.tgid, tid, 4,
                                        self.cr4 & CR4_PINNED_MASK, 0))

    def protect(self, ranges: list[tuple[int, int, int]], *, flags: int = 0,
                declared: int | None = None, list_gpa: int | None = None) -> list[str]:
        """A KVM_HC_PROTECT_MEMORY hypercall for ``ranges`` (walk order) and what the host
        then applies; returns the errno names of rejected entries (at most one)."""
        tid = self._vcpu_tid()
        head, entries, pages = build_page_list(ranges, self._list_pool)
        if list_gpa is not None:
            head = list_gpa
        self.events.append(ProtectRequest(self._tick(), self.tgid, tid, head, entries, pages,
                                          flags, len(entries) if declared is None else declared))
        if flags & (ProtectFlags.LOOP | ProtectFlags.NPAGES_OVERSIZE):
            # the RFC host would loop allocating list buffers (-E2BIG) or overrun its
            # buffer: it applies nothing we could model
            return ["E2BIG"]
        return self._host_apply(entries, tid)

    def _host_apply(self, entries: tuple[ProtectEntry, ...], tid: int) -> list[str]:
        abi = self.abi
        valid = abi.guest_valid_mask
        exec_bit = 1 << abi.guest_exec
        immutable = 1 << abi.kvm_immutable
        for gpa, end_gpa, perms in reversed(entries):
            if gpa % PAGE_SIZE or end_gpa % PAGE_SIZE or perms == 0 or perms & ~valid:
                return ["EINVAL"]
            if not abi.mbec and not perms & exec_bit:
                perms |= exec_bit
            start, end = gpa // PAGE_SIZE, end_gpa // PAGE_SIZE
            if end <= start:
                return ["EINVAL"]
            segments = list(self.attrs.segments(start, end))
            if any(v & immutable for _, _, v in segments):
                return ["EPERM"]
            value = abi.guest_to_kvm(perms)
            mask = abi.kvm_heki_mask
            if all(v & mask == value for _, _, v in segments):
                continue  # kvm_range_has_memory_attributes: no hooks run
            self.attrs.set(start, end, value, mask)
            self._applied(start, end, value, tid)
        return []

    def boot(self) -> None:
        """heki_late_init(): lock the CRs, then protect every mapped page (text R_X and
        rodata R__ immutable, everything writable stays mutable RW)."""
        self.now += 2_000_000_000  # firmware and early boot
        self.lock_cr()
        p = self.perm
        text, rodata = self.layout.text, self.layout.rodata
        rw = p["r"] | p["w"]
        # the kernel image splits RAM; everything else the direct map holds is RW
        cuts = ((0, text[0], rw), (text[0], text[1], p["r"] | p["x"] | p["i"]),
                (text[1], rodata[0], rw), (rodata[0], rodata[1], p["r"] | p["i"]),
                (rodata[1], 1 << 52, rw))
        walk: list[tuple[int, int, int]] = []
        for _, gpa, size in self.slots:
            lo, hi = gpa // PAGE_SIZE, (gpa + size) // PAGE_SIZE
            for s, e, perms in cuts:
                s, e = max(s, lo), min(e, hi)
                if s < e:
                    walk.append((s * PAGE_SIZE, e * PAGE_SIZE, perms))
        self.protect(walk)

    # -- runtime: what the guest kernel does on purpose (heki-kvm.md 5.2) ------------------
    def load_module(self, text_pages: int, ro_pages: int, data_pages: int) -> dict:
        """vmap (RW), then set_memory_ro on rodata and set_memory_rox on text."""
        p = self.perm
        text = self.alloc_pages(text_pages)
        ro = self.alloc_pages(ro_pages)
        data = self.alloc_pages(data_pages)
        rw = p["r"] | p["w"]
        self.protect(self.runs(text + ro + data, rw))
        self.protect(self.runs(ro, p["r"]))
        self.protect(self.runs(text, p["r"] | p["x"]))
        return {"text": text, "ro": ro, "data": data}

    def unload_module(self, module: dict) -> None:
        """set_memory_rw/nx, then vunmap: the pages revert to the default RW."""
        pages = module["text"] + module["ro"] + module["data"]
        self.protect(self.runs(pages, self.perm["r"] | self.perm["w"]))
        self.free_pages(pages)

    def text_poke(self, gfn: int) -> None:
        """Patch one page of module text: writable (not executable) while poked, then
        R_X again. Modelling choice: a W^X flip, never W+X (see docs/trace-format.md)."""
        p = self.perm
        self.protect(self.runs([gfn], p["r"] | p["w"]))
        self._tick(1, 50)
        self.protect(self.runs([gfn], p["r"] | p["x"]))

    def bpf_jit(self, pages: int = 1) -> list[int]:
        """bpf_prog_pack_alloc + text copy + seal: RW while filled, then R_X."""
        p = self.perm
        pack = self.alloc_pages(pages)
        self.protect(self.runs(pack, p["r"] | p["w"]))
        self.protect(self.runs(pack, p["r"] | p["x"]))
        return pack

    def bpf_free(self, pack: list[int]) -> None:
        self.protect(self.runs(pack, self.perm["r"] | self.perm["w"]))
        self.free_pages(pack)

    def other_hypercall(self) -> None:
        nr = self.rng.choice((KVM_HC_KICK_CPU, KVM_HC_SEND_IPI))
        self.events.append(Hypercall(self._tick(1, 100), self.tgid, self._vcpu_tid(), nr,
                                     self.rng.getrandbits(16), self.rng.randrange(self.vcpus),
                                     0, 0))

    def cr4_write(self, value: int | None = None) -> None:
        """A CR4 write KVM intercepts; by default a legitimate PGE flip (TLB flush)."""
        if value is None:
            value = self.cr4 ^ X86_CR4_PGE
        self.events.append(CrWrite(self._tick(), self.tgid, self._vcpu_tid(), 4, value))

    def map_gpa_range(self, gpa: int, pages: int, private: bool) -> None:
        """KVM_HC_MAP_GPA_RANGE from a confidential guest, then the VMM's conversion."""
        tid = self._vcpu_tid()
        attrs = KVM_MAP_GPA_RANGE_ENCRYPTED if private else 0
        self.events.append(Hypercall(self._tick(), self.tgid, tid, KVM_HC_MAP_GPA_RANGE,
                                     gpa, pages, attrs, 0))
        self._set_attributes(gpa, gpa + pages * PAGE_SIZE,
                             self.abi.kvm_private_mask if private else 0, tid)

    # -- attacks -----------------------------------------------------------------------------
    def fault(self, gfn: int, access: FaultAccess, rip: int, count: int) -> None:
        tid = self._vcpu_tid()
        first = self._tick()
        if access == FaultAccess.WRITE:
            code = EPT_WRITE | EPT_READABLE | EPT_EXECUTABLE | EPT_GLA_VALID
        else:
            code = EPT_FETCH | EPT_READABLE | EPT_WRITABLE | EPT_GLA_VALID
        # the guest retries the faulting instruction "again and again": a collapsed storm
        self.now += count * 3000
        self.events.append(Fault(self.now, self.tgid, tid, tid - self.tgid - 1,
                                 gfn * PAGE_SIZE + self.rng.randrange(0, PAGE_SIZE, 8), code,
                                 rip, int(access), count, first))


# -- scenarios ------------------------------------------------------------------------------

def _booted(rng: random.Random, name: str, start_ns: int, modules: int = 3, **kw) -> SimVm:
    vm = SimVm(rng, name=name, start_ns=start_ns, **kw)
    vm.create()
    vm.boot()
    vm.modules = [vm.load_module(rng.randint(4, 40), rng.randint(1, 8), rng.randint(1, 6))
                  for _ in range(modules)]
    return vm


def _clean_boot(vm_rng, name, start):
    return [_booted(vm_rng, name, start)]


def _module_load_unload(rng, name, start):
    vm = _booted(rng, name, start)
    # a big module (a GPU driver: 1.8 MiB of text in scattered pages) needs a chained list
    big = vm.load_module(450, 30, 16)
    vm.unload_module(vm.modules.pop(0))
    vm.unload_module(big)
    return [vm]


def _bpf_jit(rng, name, start):
    vm = _booted(rng, name, start)
    packs = [vm.bpf_jit(rng.randint(1, 2)) for _ in range(3)]
    vm.bpf_free(packs[0])
    return [vm]


def _text_poke(rng, name, start):
    vm = _booted(rng, name, start)
    for _ in range(3):
        vm.text_poke(rng.choice(vm.modules[0]["text"]))
    return [vm]


def _attack_write_text(rng, name, start):
    vm = _booted(rng, name, start)
    text = vm.layout.text
    gfn = rng.randrange(*text)
    rip = 0xFFFFFFFFC0000000 + rng.randrange(1 << 20)  # code in a module writes core text
    vm.fault(gfn, FaultAccess.WRITE, rip, 4000)
    return [vm]


def _attack_exec_data(rng, name, start):
    vm = _booted(rng, name, start)
    gfn = rng.randrange(*vm.layout.data)
    rip = 0xFFFFFFFF80000000 + gfn * PAGE_SIZE  # executing the data page itself
    vm.fault(gfn, FaultAccess.FETCH, rip, 1200)
    return [vm]


def _attack_clear_smep(rng, name, start):
    vm = _booted(rng, name, start)
    vm.cr4_write(vm.cr4 & ~X86_CR4_SMEP)
    return [vm]


def _attack_reprotect_immutable(rng, name, start):
    vm = _booted(rng, name, start)
    lo, hi = vm.layout.rodata
    s = rng.randrange(lo, hi - 4)
    vm.protect([(s * PAGE_SIZE, (s + 4) * PAGE_SIZE, vm.perm["r"] | vm.perm["w"])])
    return [vm]


def _attack_wx_request(rng, name, start):
    vm = _booted(rng, name, start)
    pages = vm.alloc_pages(2)
    p = vm.perm
    vm.protect(vm.runs(pages, p["r"] | p["w"] | p["x"]))
    return [vm]


def _attack_malformed_lists(rng, name, start):
    vm = _booted(rng, name, start)
    p = vm.perm
    g = vm.alloc_pages(1)[0] * PAGE_SIZE
    rw = p["r"] | p["w"]
    vm.protect([(g + 0x123, g + PAGE_SIZE, rw)])                 # misaligned
    vm.protect([(g + PAGE_SIZE, g, rw)])                          # end before start
    vm.protect([(g, g + PAGE_SIZE, rw | 0x30)])                   # unknown bits
    # npages = 500 declared on one page: the walker cut it at 169 (entries restate RW)
    pages = vm.alloc_pages(169)
    vm.protect(vm.runs(pages[::2], rw), flags=ProtectFlags.NPAGES_OVERSIZE, declared=500)
    # a list page whose next_pa points back at itself
    head = next(vm._list_pool)
    vm.protect([(g, g + PAGE_SIZE, rw)], flags=ProtectFlags.LOOP, list_gpa=head)
    return [vm]


def _confidential_vm(rng, name, start):
    vm = SimVm(rng, name=name, start_ns=start, confidential=True)
    vm.create()
    vm.now += 1_500_000_000
    # swiotlb bounce buffers and GHCB pages become shared, some return to private
    for _ in range(6):
        gpa = rng.randrange(0x100000, 0xB0000000, 1 << 21)
        pages = rng.choice((1, 16, 512))
        vm.map_gpa_range(gpa, pages, private=False)
        if rng.random() < 0.4:
            vm.map_gpa_range(gpa, pages, private=True)
    return [vm]


def _multi_vm(rng, name, start):
    vms = _clean_boot(rng, f"{name}-a", start)
    vms += _module_load_unload(rng, f"{name}-b", start + 300_000_000)
    vms += _bpf_jit(rng, f"{name}-c", start + 700_000_000)
    return vms


def _stress(rng, name, start, events: int = 200_000):
    """A busy guest for benchmarks: module and BPF churn, text pokes, IPIs, CR4 writes."""
    vm = _booted(rng, name, start, modules=4)
    packs: list[list[int]] = []
    while len(vm.events) < events:
        roll = rng.random()
        if roll < 0.55:
            vm.other_hypercall()
        elif roll < 0.75:
            vm.cr4_write()
        elif roll < 0.85:
            packs.append(vm.bpf_jit(1))
            if len(packs) > 8:
                vm.bpf_free(packs.pop(0))
        elif roll < 0.95:
            vm.text_poke(rng.choice(vm.modules[-1]["text"]))
        else:
            vm.modules.append(vm.load_module(rng.randint(4, 30), 2, 2))
            if len(vm.modules) > 6:
                vm.unload_module(vm.modules.pop(1))
    return [vm]


ScenarioFn = Callable[[random.Random, str, int], list[SimVm]]

#: scenario name -> (function, VM name, expected finding rule ids with the default policy)
SCENARIOS: dict[str, tuple[ScenarioFn, str, frozenset[str]]] = {
    "clean-boot": (_clean_boot, "web1", frozenset()),
    "module-load-unload": (_module_load_unload, "build1", frozenset()),
    "bpf-jit": (_bpf_jit, "bpf1", frozenset()),
    "text-poke": (_text_poke, "trace1", frozenset()),
    "attack-write-text": (_attack_write_text, "victim-wt", frozenset({"protected_write"})),
    "attack-exec-data": (_attack_exec_data, "victim-xd", frozenset({"protected_fetch"})),
    "attack-clear-smep": (_attack_clear_smep, "victim-cr", frozenset({"cr_pin_violation"})),
    # the policy names a relaxing request on locked-down memory relax_after_lockdown, its
    # more specific form of immutable_change
    "attack-reprotect-immutable": (_attack_reprotect_immutable, "victim-ro",
                                   frozenset({"relax_after_lockdown"})),
    "attack-wx-request": (_attack_wx_request, "victim-wx", frozenset({"wx_request"})),
    # an oversize npages leaves the host's outcome unknown: the VM is honestly degraded
    "attack-malformed-lists": (_attack_malformed_lists, "victim-ml",
                               frozenset({"malformed_request", "map_degraded"})),
    "confidential-vm": (_confidential_vm, "cvm1", frozenset()),
    "multi-vm": (_multi_vm, "fleet", frozenset()),
    "stress": (_stress, "busy", frozenset()),
}
ATTACKS = tuple(name for name in SCENARIOS if name.startswith("attack-"))
#: names accepted by ``simulate --scenario`` (``all-attacks`` expands to ATTACKS)
SCENARIO_NAMES = tuple(SCENARIOS) + ("all-attacks",)


def expand(names: list[str]) -> list[str]:
    out: list[str] = []
    for name in names:
        out.extend(ATTACKS if name == "all-attacks" else (name,))
    return out


def simulate(names: list[str], *, vms: int = 1, seed: int = 0,
             start_ns: int = DEFAULT_START_NS, stress_events: int = 200_000) -> list[Event]:
    """Events of every scenario in ``names`` (each on ``vms`` VMs), merged in time order.

    Unknown names raise KeyError (the CLI checks them first). VMs start 50-500 ms apart
    so their events interleave as on a busy host.
    """
    rng = random.Random(seed)
    streams: list[list[Event]] = []
    offset = 0
    for name in expand(names):
        fn, vm_name, _ = SCENARIOS[name]
        for i in range(vms):
            label = vm_name if vms == 1 else f"{vm_name}-{i + 1}"
            vm_rng = random.Random(rng.getrandbits(64))
            if fn is _stress:
                made = _stress(vm_rng, label, start_ns + offset, stress_events)
            else:
                made = fn(vm_rng, label, start_ns + offset)
            streams.extend(vm.events for vm in made)
            offset += rng.randrange(50_000_000, 500_000_000)
    return list(heapq.merge(*streams, key=lambda ev: ev.time_ns))


def expected_findings(names: list[str]) -> frozenset[str]:
    """Rule ids the default policy should report for these scenarios, no more."""
    out: set[str] = set()
    for name in expand(names):
        out |= SCENARIOS[name][2]
    return frozenset(out)
